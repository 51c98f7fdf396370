//! Described device state: the fields of a FULL section and the JSON VM description that
//! lets a reader (QEMU's `analyze-migration.py`, our dump) walk a device it does not know.

use qemu_file::QemuFile;
use serde::{Deserialize, Serialize};

/// Largest single field a device may load (bounds a length read from an earlier field).
pub const MAX_FIELD_LEN: usize = 1 << 20;

/// QEMU's field type names, as they appear in the JSON description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// `bool`: one byte, 0 or 1.
    Bool,
    /// `uint8`
    U8,
    /// `uint16`
    U16,
    /// `uint32`
    U32,
    /// `uint64`
    U64,
    /// `int32`
    I32,
    /// `int64`
    I64,
    /// `buffer`: raw bytes.
    Buffer,
}

impl FieldType {
    /// QEMU's name of the type.
    pub fn qemu_name(self) -> &'static str {
        match self {
            FieldType::Bool => "bool",
            FieldType::U8 => "uint8",
            FieldType::U16 => "uint16",
            FieldType::U32 => "uint32",
            FieldType::U64 => "uint64",
            FieldType::I32 => "int32",
            FieldType::I64 => "int64",
            FieldType::Buffer => "buffer",
        }
    }
}

/// One field of a device description: `{"name": …, "type": …, "size": …}`, with QEMU's
/// optional nesting (`struct`) and compressed arrays (`array_len`) for streams QEMU wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDesc {
    /// The field's name.
    pub name: String,
    /// QEMU's type name, e.g. `uint32`, `buffer`, `struct`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Bytes the field takes in the stream.
    pub size: u64,
    /// The layout of a `struct` field.
    #[serde(rename = "struct", default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<Box<StructDesc>>,
    /// How many times the field repeats (QEMU compresses equal array entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_len: Option<u64>,
}

/// The fields and subsections of a `struct` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StructDesc {
    /// The fields in stream order.
    #[serde(default)]
    pub fields: Vec<FieldDesc>,
    /// Subsections after the fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsections: Vec<DeviceDescription>,
}

/// One device of the VM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// The section idstr (for subsections, their name).
    #[serde(default)]
    pub name: String,
    /// The section instance.
    #[serde(default)]
    pub instance_id: u32,
    /// The VMState description's name.
    #[serde(default)]
    pub vmsd_name: String,
    /// The section version.
    #[serde(default)]
    pub version: u32,
    /// The fields in stream order.
    #[serde(default)]
    pub fields: Vec<FieldDesc>,
    /// Subsections after the fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsections: Vec<DeviceDescription>,
}

/// The JSON trailer after EOF: `{"page_size": 4096, "devices": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// The target page size of the RAM section.
    pub page_size: u64,
    /// Every FULL section, in stream order.
    pub devices: Vec<DeviceDescription>,
}

impl VmDescription {
    /// The device whose section is `idstr` / `instance_id`.
    pub fn device(&self, idstr: &str, instance_id: u32) -> Option<&DeviceDescription> {
        self.devices
            .iter()
            .find(|d| d.name == idstr && d.instance_id == instance_id)
    }
}

/// Writes a device's fields and records their description.
///
/// What a [`FieldReader`] would refuse is refused here too, so nothing is saved that
/// cannot be loaded: a `buffer` longer than [`MAX_FIELD_LEN`] writes nothing and fails
/// the device's save, naming the field.
#[derive(Debug)]
pub struct FieldWriter<'a> {
    f: &'a mut QemuFile,
    fields: Vec<FieldDesc>,
    /// The first field refused; the save fails with it.
    refused: Option<FieldError>,
}

impl<'a> FieldWriter<'a> {
    pub(crate) fn new(f: &'a mut QemuFile) -> Self {
        FieldWriter {
            f,
            fields: Vec::new(),
            refused: None,
        }
    }

    /// The fields written, or the first one refused.
    pub(crate) fn into_fields(self) -> Result<Vec<FieldDesc>, FieldError> {
        match self.refused {
            Some(e) => Err(e),
            None => Ok(self.fields),
        }
    }

    fn describe(&mut self, name: &str, ty: FieldType, size: usize) {
        self.fields.push(FieldDesc {
            name: name.to_string(),
            ty: ty.qemu_name().to_string(),
            size: size as u64,
            nested: None,
            array_len: None,
        });
    }

    /// Writes a `bool` (one byte, 0 or 1).
    pub fn bool(&mut self, name: &str, v: bool) {
        self.describe(name, FieldType::Bool, 1);
        self.f.put_u8(v.into());
    }

    /// Writes a `uint8`.
    pub fn u8(&mut self, name: &str, v: u8) {
        self.describe(name, FieldType::U8, 1);
        self.f.put_u8(v);
    }

    /// Writes a big-endian `uint16`.
    pub fn u16(&mut self, name: &str, v: u16) {
        self.describe(name, FieldType::U16, 2);
        self.f.put_be16(v);
    }

    /// Writes a big-endian `uint32`.
    pub fn u32(&mut self, name: &str, v: u32) {
        self.describe(name, FieldType::U32, 4);
        self.f.put_be32(v);
    }

    /// Writes a big-endian `uint64`.
    pub fn u64(&mut self, name: &str, v: u64) {
        self.describe(name, FieldType::U64, 8);
        self.f.put_be64(v);
    }

    /// Writes a big-endian `int32`.
    pub fn i32(&mut self, name: &str, v: i32) {
        self.describe(name, FieldType::I32, 4);
        self.f.put_be32(v as u32);
    }

    /// Writes a big-endian `int64`.
    pub fn i64(&mut self, name: &str, v: i64) {
        self.describe(name, FieldType::I64, 8);
        self.f.put_be64(v as u64);
    }

    /// Writes raw bytes as a `buffer`: at most [`MAX_FIELD_LEN`], what a reader takes.
    /// A longer one is not written, and the device's save fails naming it.
    pub fn buffer(&mut self, name: &str, data: &[u8]) {
        if data.len() > MAX_FIELD_LEN {
            self.refused.get_or_insert_with(|| FieldError::Invalid {
                field: name.to_string(),
                reason: format!(
                    "{} bytes, more than the {MAX_FIELD_LEN} a reader takes (MAX_FIELD_LEN): \
                     saved, it could not be loaded",
                    data.len()
                ),
            });
            return;
        }
        self.describe(name, FieldType::Buffer, data.len());
        self.f.put_buffer(data);
    }
}

/// An error reading one field of a device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// The stream failed while reading the field.
    #[error("field {field:?}")]
    Stream {
        /// The field.
        field: String,
        /// The stream error.
        #[source]
        source: qemu_file::Error,
    },
    /// The field holds a value this side cannot accept.
    #[error("field {field:?}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads a device's fields back, in the order they were written.
#[derive(Debug)]
pub struct FieldReader<'a> {
    f: &'a mut QemuFile,
}

impl<'a> FieldReader<'a> {
    pub(crate) fn new(f: &'a mut QemuFile) -> Self {
        FieldReader { f }
    }

    fn wrap<T>(name: &str, r: qemu_file::Result<T>) -> Result<T, FieldError> {
        r.map_err(|source| FieldError::Stream {
            field: name.to_string(),
            source,
        })
    }

    /// Reads a `bool`; a byte other than 0 or 1 is refused.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn bool(&mut self, name: &str) -> Result<bool, FieldError> {
        match Self::wrap(name, self.f.get_u8())? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(FieldError::Invalid {
                field: name.to_string(),
                reason: format!("a bool must be 0 or 1, the stream has {b:#04x}"),
            }),
        }
    }

    /// Reads a `uint8`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u8(&mut self, name: &str) -> Result<u8, FieldError> {
        Self::wrap(name, self.f.get_u8())
    }

    /// Reads a `uint16`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u16(&mut self, name: &str) -> Result<u16, FieldError> {
        Self::wrap(name, self.f.get_be16())
    }

    /// Reads a `uint32`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u32(&mut self, name: &str) -> Result<u32, FieldError> {
        Self::wrap(name, self.f.get_be32())
    }

    /// Reads a `uint64`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u64(&mut self, name: &str) -> Result<u64, FieldError> {
        Self::wrap(name, self.f.get_be64())
    }

    /// Reads an `int32`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn i32(&mut self, name: &str) -> Result<i32, FieldError> {
        Self::wrap(name, self.f.get_be32()).map(|v| v as i32)
    }

    /// Reads an `int64`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn i64(&mut self, name: &str) -> Result<i64, FieldError> {
        Self::wrap(name, self.f.get_be64()).map(|v| v as i64)
    }

    /// Reads a `buffer` of exactly `dst.len()` bytes.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn buffer_into(&mut self, name: &str, dst: &mut [u8]) -> Result<(), FieldError> {
        Self::wrap(name, self.f.get_buffer(dst))
    }

    /// Reads a `buffer` of `len` bytes, `len` being at most [`MAX_FIELD_LEN`] (it may come
    /// from an earlier field, so it is checked before allocating).
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn buffer(&mut self, name: &str, len: usize) -> Result<Vec<u8>, FieldError> {
        Self::wrap(
            name,
            self.f.get_bytes(len as u64, MAX_FIELD_LEN, "device field"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    #[test]
    fn what_a_reader_refuses_is_not_written() {
        let b = MemBuffer::new();
        let mut f = b.file();
        let mut w = FieldWriter::new(&mut f);
        w.u32("count", 200_000);
        w.buffer("items", &vec![7u8; MAX_FIELD_LEN]);
        w.buffer("more", &vec![7u8; MAX_FIELD_LEN + 1]);
        w.buffer("even_more", &vec![7u8; 2 * MAX_FIELD_LEN]);
        let e = w.into_fields().unwrap_err().to_string();
        assert!(
            e.contains("\"more\"") && e.contains("could not be loaded"),
            "{e}"
        );
        f.flush().unwrap();
        // The field at the limit went out, the longer ones not.
        assert_eq!(b.contents().len(), 4 + MAX_FIELD_LEN);
        let mut f = b.file();
        let mut r = FieldReader::new(&mut f);
        assert_eq!(r.u32("count").unwrap(), 200_000);
        assert_eq!(
            r.buffer("items", MAX_FIELD_LEN).unwrap().len(),
            MAX_FIELD_LEN
        );
    }

    #[test]
    fn fields_golden_bytes_and_description() {
        let b = MemBuffer::new();
        let mut f = b.file();
        let mut w = FieldWriter::new(&mut f);
        w.bool("enabled", true);
        w.u8("lcr", 0x03);
        w.u16("divisor", 0x000c);
        w.u32("flags", 0xdead_beef);
        w.u64("tsc", 0x0102_0304_0506_0708);
        w.i32("delta", -2);
        w.i64("offset", -1);
        w.buffer("fifo", b"ab");
        let fields = w.into_fields().unwrap();
        f.flush().unwrap();
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x01,                                           // bool enabled
            0x03,                                           // uint8 lcr
            0x00, 0x0c,                                     // uint16 divisor
            0xde, 0xad, 0xbe, 0xef,                         // uint32 flags
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // uint64 tsc
            0xff, 0xff, 0xff, 0xfe,                         // int32 delta
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // int64 offset
            b'a', b'b',                                     // buffer fifo
        ];
        assert_eq!(b.contents(), golden);
        let desc: Vec<(&str, &str, u64)> = fields
            .iter()
            .map(|d| (d.name.as_str(), d.ty.as_str(), d.size))
            .collect();
        assert_eq!(
            desc,
            [
                ("enabled", "bool", 1),
                ("lcr", "uint8", 1),
                ("divisor", "uint16", 2),
                ("flags", "uint32", 4),
                ("tsc", "uint64", 8),
                ("delta", "int32", 4),
                ("offset", "int64", 8),
                ("fifo", "buffer", 2),
            ]
        );
        let read = |bytes: &[u8]| -> Result<_, FieldError> {
            let mut f = QemuFile::from_bytes(bytes.to_vec());
            let mut r = FieldReader::new(&mut f);
            Ok((
                r.bool("enabled")?,
                r.u8("lcr")?,
                r.u16("divisor")?,
                r.u32("flags")?,
                r.u64("tsc")?,
                r.i32("delta")?,
                r.i64("offset")?,
                r.buffer("fifo", 2)?,
            ))
        };
        assert_eq!(
            read(golden).unwrap(),
            (
                true,
                3,
                12,
                0xdead_beef,
                0x0102_0304_0506_0708,
                -2,
                -1,
                b"ab".to_vec()
            )
        );
        for cut in 0..golden.len() {
            let e = read(&golden[..cut]).unwrap_err();
            assert!(matches!(e, FieldError::Stream { .. }), "{cut}: {e}");
        }
    }

    #[test]
    fn a_bool_that_is_not_0_or_1_is_refused() {
        let mut f = QemuFile::from_bytes(vec![2]);
        let e = FieldReader::new(&mut f).bool("enabled").unwrap_err();
        assert!(e.to_string().contains("enabled"), "{e}");
    }

    #[test]
    fn a_huge_buffer_length_is_refused_before_allocating() {
        let mut f = QemuFile::from_bytes(vec![0; 8]);
        let e = FieldReader::new(&mut f)
            .buffer("msrs", usize::MAX)
            .unwrap_err();
        assert!(e.to_string().contains("msrs"), "{e}");
    }

    #[test]
    fn description_json_matches_qemus_shape() {
        let d = VmDescription {
            page_size: 4096,
            devices: vec![DeviceDescription {
                name: "serial".into(),
                instance_id: 0,
                vmsd_name: "serial".into(),
                version: 1,
                fields: vec![FieldDesc {
                    name: "lcr".into(),
                    ty: "uint8".into(),
                    size: 1,
                    nested: None,
                    array_len: None,
                }],
                subsections: vec![],
            }],
        };
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"page_size":4096,"devices":[{"name":"serial","instance_id":0,"vmsd_name":"serial","version":1,"fields":[{"name":"lcr","type":"uint8","size":1}]}]}"#
        );
        assert_eq!(serde_json::from_str::<VmDescription>(&json).unwrap(), d);
    }
}
