//! `FieldWriter`: a device's fields into the stream, each recorded in the description.

use qemu_file::QemuFile;

use super::{
    FieldDesc, FieldError, FieldType, MAX_ELEMENTS, MAX_FIELD_LEN, QEMU_VM_SUBSECTION, StructDesc,
};

/// Writes a device's fields and records their description, as QEMU's
/// `vmstate_save_state` does: scalars, buffers, arrays (described once when every element
/// has the same layout, QEMU's compressed arrays), nested structs and subsections.
///
/// What a [`FieldReader`](super::FieldReader) would refuse is refused here too, so
/// nothing is saved that cannot be loaded: a `buffer` longer than [`MAX_FIELD_LEN`] or an
/// array longer than [`MAX_ELEMENTS`] writes nothing and fails the device's save, naming
/// the field.
#[derive(Debug)]
pub struct FieldWriter<'a> {
    f: &'a mut QemuFile,
    /// The struct being written (the device itself when `outer` is empty).
    current: StructDesc,
    /// The structs around it, innermost last, each with what its field in the enclosing
    /// one needs: the field's name and the stream offset it started at (None for a
    /// subsection).
    outer: Vec<(StructDesc, Option<(String, u64)>)>,
    /// Inside the second and later elements of a compressed array: fields are written,
    /// not described.
    quiet: u32,
    /// The longest array allowed here: [`MAX_ELEMENTS`], or less inside a field that
    /// says so.
    max_elements: usize,
    /// The first field refused; the save fails with it.
    refused: Option<FieldError>,
}

impl<'a> FieldWriter<'a> {
    pub(crate) fn new(f: &'a mut QemuFile) -> Self {
        FieldWriter {
            f,
            current: StructDesc::default(),
            outer: Vec::new(),
            quiet: 0,
            max_elements: MAX_ELEMENTS,
            refused: None,
        }
    }

    /// The device's description (its vmsd name empty unless [`FieldWriter::state`] set
    /// it), or the first field refused.
    pub(crate) fn into_description(self) -> Result<StructDesc, FieldError> {
        debug_assert!(self.outer.is_empty(), "a struct was left open");
        match self.refused {
            Some(e) => Err(e),
            None => Ok(self.current),
        }
    }

    /// Whether no struct or subsection is open: what is written is the device's own.
    pub(super) fn at_top(&self) -> bool {
        self.outer.is_empty()
    }

    /// Describes the device as `vmsd_name` at `version`.
    pub(super) fn describe_as(&mut self, vmsd_name: &str, version: u32) {
        self.current.vmsd_name = vmsd_name.to_string();
        self.current.version = version;
    }

    fn describe(&mut self, name: &str, ty: FieldType, size: usize) {
        if self.quiet == 0 {
            self.current.fields.push(FieldDesc {
                name: name.to_string(),
                array_len: None,
                index: None,
                ty: ty.qemu_name().to_string(),
                nested: None,
                size: size as u64,
            });
        }
    }

    /// Fails the device's save: field `field` cannot be written as it is, for `reason`.
    /// The first refusal is the one reported.
    pub fn refuse(&mut self, field: &str, reason: impl Into<String>) {
        self.refused.get_or_insert_with(|| FieldError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        });
    }

    /// The longest array (`Vec`) a field may hold here: what a reader takes.
    pub fn max_elements(&self) -> usize {
        self.max_elements
    }

    /// Runs `body` with arrays bounded to `n` elements (a field's own bound, which its
    /// reader applies too: [`FieldReader::with_max_elements`](super::FieldReader::with_max_elements)).
    pub fn with_max_elements<R>(&mut self, n: usize, body: impl FnOnce(&mut Self) -> R) -> R {
        let outer = self.max_elements;
        self.max_elements = n.min(outer);
        let r = body(self);
        self.max_elements = outer;
        r
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

    /// Writes an `int8`.
    pub fn i8(&mut self, name: &str, v: i8) {
        self.describe(name, FieldType::I8, 1);
        self.f.put_u8(v as u8);
    }

    /// Writes a big-endian `int16`.
    pub fn i16(&mut self, name: &str, v: i16) {
        self.describe(name, FieldType::I16, 2);
        self.f.put_be16(v as u16);
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
            self.refuse(
                name,
                format!(
                    "{} bytes, more than the {MAX_FIELD_LEN} a reader takes (MAX_FIELD_LEN): \
                     saved, it could not be loaded",
                    data.len()
                ),
            );
            return;
        }
        self.describe(name, FieldType::Buffer, data.len());
        self.f.put_buffer(data);
    }

    /// Writes an array of `n` elements, `each(w, i)` writing element `i` as one field
    /// (QEMU's `VMS_ARRAY`). With `same_layout` (every element described alike) the
    /// description holds the first element with `array_len`, as QEMU compresses arrays;
    /// otherwise every element with its `index`. More than [`MAX_ELEMENTS`] is refused.
    pub fn array(
        &mut self,
        name: &str,
        n: usize,
        same_layout: bool,
        mut each: impl FnMut(&mut Self, usize),
    ) {
        if n > self.max_elements {
            self.refuse(
                name,
                format!(
                    "{n} elements, more than the {} a reader takes: saved, it could not be \
                     loaded",
                    self.max_elements
                ),
            );
            return;
        }
        for i in 0..n {
            if same_layout && i > 0 {
                self.quiet += 1;
                each(self, i);
                self.quiet -= 1;
                continue;
            }
            let at = self.current.fields.len();
            each(self, i);
            if n > 1 && self.quiet == 0 {
                if let Some(d) = self.current.fields.get_mut(at) {
                    if same_layout {
                        d.array_len = Some(n as u64);
                    } else {
                        d.index = Some(i as u64);
                    }
                }
            }
        }
    }

    /// Writes a nested struct as field `name` of type `struct` (QEMU's `VMS_STRUCT`):
    /// `body` writes its fields and subsections, described under `vmsd_name` / `version`.
    pub fn structure(
        &mut self,
        name: &str,
        vmsd_name: &str,
        version: u32,
        body: impl FnOnce(&mut Self),
    ) {
        let inner = StructDesc {
            vmsd_name: vmsd_name.to_string(),
            version,
            ..StructDesc::default()
        };
        let start = self.f.bytes_written();
        let outer = std::mem::replace(&mut self.current, inner);
        self.outer.push((outer, Some((name.to_string(), start))));
        body(self);
        self.close();
    }

    /// Writes a subsection (QEMU's `vmstate_subsection_save`): the subsection byte, its
    /// name, its version, then what `body` writes. A loader finds it by `name`, which
    /// must start with the enclosing description's name and a `/`.
    pub fn subsection(&mut self, name: &str, version: u32, body: impl FnOnce(&mut Self)) {
        if name.is_empty() || name.len() > 255 {
            self.refuse(name, "a subsection name must be 1 to 255 bytes");
            return;
        }
        self.f.put_u8(QEMU_VM_SUBSECTION);
        self.f.put_counted_string(name);
        self.f.put_be32(version);
        let inner = StructDesc {
            vmsd_name: name.to_string(),
            version,
            ..StructDesc::default()
        };
        let outer = std::mem::replace(&mut self.current, inner);
        self.outer.push((outer, None));
        body(self);
        self.close();
    }

    /// Ends the innermost struct or subsection.
    fn close(&mut self) {
        let (outer, field) = self.outer.pop().expect("a struct is open");
        let inner = std::mem::replace(&mut self.current, outer);
        match field {
            Some((name, start)) => {
                if self.quiet == 0 {
                    self.current.fields.push(FieldDesc {
                        name,
                        array_len: None,
                        index: None,
                        ty: FieldType::Struct.qemu_name().to_string(),
                        nested: Some(Box::new(inner)),
                        size: self.f.bytes_written() - start,
                    });
                }
            }
            None => {
                if self.quiet == 0 {
                    self.current.subsections.push(inner);
                }
            }
        }
    }
}
