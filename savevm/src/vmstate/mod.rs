//! Described device state: the fields of a FULL section, written and read with QEMU's
//! vmstate rules ([`FieldWriter`], [`FieldReader`]), declared once as a [`VmState`]
//! struct, and the JSON VM description that lets a reader (QEMU's
//! `analyze-migration.py`, our dump) walk a device it does not know.

mod description;
mod field;
mod reader;
mod state;
mod writer;

pub use description::{DeviceDescription, FieldDesc, FieldType, StructDesc, VmDescription};
pub use field::VmField;
pub use reader::{FieldError, FieldReader, check_version};
pub use state::VmState;
pub use writer::FieldWriter;

/// Largest `buffer` field, in bytes, on both sides: a writer refuses a longer one, a
/// reader a longer length.
pub const MAX_FIELD_LEN: usize = 1 << 24;

/// Most elements of one array field (a `Vec`'s length), on both sides: as many as a
/// `buffer` may hold bytes.
pub const MAX_ELEMENTS: usize = MAX_FIELD_LEN;

use crate::format::QEMU_VM_SUBSECTION;

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::{MemBuffer, QemuFile};

    #[test]
    fn what_a_reader_refuses_is_not_written() {
        let b = MemBuffer::new();
        let mut f = b.file();
        let mut w = FieldWriter::new(&mut f);
        w.u32("count", 200_000);
        w.buffer("items", &vec![7u8; MAX_FIELD_LEN]);
        w.buffer("more", &vec![7u8; MAX_FIELD_LEN + 1]);
        w.buffer("even_more", &vec![7u8; 2 * MAX_FIELD_LEN]);
        let e = w.into_description().unwrap_err().to_string();
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
        let fields = w.into_description().unwrap().fields;
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
}
