//! QEMU's RAM section records, format version 4 (QEMU `migration/ram.c`).
//!
//! Every record starts with a be64 holding the page's offset within its block (a multiple
//! of the target page size) ORed with flags in the low bits:
//!
//! ```text
//! be64 total | MEM_SIZE, then per block: u8 len | idstr | be64 used_length   (START only)
//! be64 offset | ZERO [| CONTINUE]  [u8 len | idstr]  u8 0                      zero page
//! be64 offset | PAGE [| CONTINUE]  [u8 len | idstr]  4096 bytes                 page
//! be64 EOS                                                                     end of payload
//! ```
//! CONTINUE means "same block as the previous record", so the idstr is left out.

use qemu_file::QemuFile;

use crate::{Error, Result};

/// The target page size: the unit of RAM records.
pub const TARGET_PAGE_SIZE: u64 = 4096;
/// A zero page: one fill byte (always 0) instead of the page.
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
/// The block list follows (setup only).
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
/// One page of raw bytes follows.
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
/// End of this payload.
pub const RAM_SAVE_FLAG_EOS: u64 = 0x10;
/// Same block as the previous record: no idstr.
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
/// Delta-encoded page (XBZRLE); not produced, refused on load.
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
/// A multifd sync point; carries nothing in the main stream.
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;

const FLAG_MASK: u64 = TARGET_PAGE_SIZE - 1;

/// Writes the block list of a START payload: total size, then name and size of each block.
pub fn write_block_list<'a>(
    f: &mut QemuFile,
    blocks: impl IntoIterator<Item = (&'a str, u64)> + Clone,
) {
    let total: u64 = blocks.clone().into_iter().map(|(_, len)| len).sum();
    f.put_be64(total | RAM_SAVE_FLAG_MEM_SIZE);
    for (idstr, len) in blocks {
        f.put_counted_string(idstr);
        f.put_be64(len);
    }
}

/// Reads the entries of a block list whose header said `total` bytes. No more than
/// `max_entries` entries are read, so a hostile total cannot make the loop run long.
///
/// # Errors
/// Entries that overshoot `total`, too many entries, or a stream error.
pub fn read_block_list(
    f: &mut QemuFile,
    total: u64,
    max_entries: usize,
) -> Result<Vec<(String, u64)>> {
    let mut entries = Vec::new();
    let mut sum = 0u64;
    while sum < total {
        if entries.len() == max_entries {
            return Err(Error::BadBlockList {
                reason: format!(
                    "it claims {total} bytes but {max_entries} blocks add up to only {sum}"
                ),
            });
        }
        let idstr = f.get_counted_string("RAM block name")?;
        let len = f.get_be64()?;
        sum = sum
            .checked_add(len)
            .filter(|s| *s <= total)
            .ok_or_else(|| Error::BadBlockList {
                reason: format!("block {idstr:?} of {len} bytes goes past the total of {total}"),
            })?;
        entries.push((idstr, len));
    }
    Ok(entries)
}

/// The header of one RAM record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// The flag bits.
    pub flags: u64,
    /// The page offset within the block (or, with MEM_SIZE, the total size).
    pub offset: u64,
    /// The block name, unless the record has CONTINUE or carries no page.
    pub idstr: Option<String>,
}

impl RecordHeader {
    /// Writes a page record header: offset and flags, and the idstr unless `idstr` is
    /// `None` (then CONTINUE is set).
    pub fn write_page(f: &mut QemuFile, offset: u64, flags: u64, idstr: Option<&str>) {
        debug_assert_eq!(offset & FLAG_MASK, 0);
        match idstr {
            Some(name) => {
                f.put_be64(offset | flags);
                f.put_counted_string(name);
            }
            None => f.put_be64(offset | flags | RAM_SAVE_FLAG_CONTINUE),
        }
    }

    /// Reads a record header; for ZERO and PAGE records without CONTINUE, the idstr too.
    ///
    /// # Errors
    /// A stream error.
    pub fn read_from(f: &mut QemuFile) -> Result<Self> {
        let v = f.get_be64()?;
        let flags = v & FLAG_MASK;
        let offset = v & !FLAG_MASK;
        let has_page = flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE) != 0;
        let idstr = if has_page && flags & RAM_SAVE_FLAG_CONTINUE == 0 {
            Some(f.get_counted_string("RAM block name")?)
        } else {
            None
        };
        Ok(RecordHeader {
            flags,
            offset,
            idstr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    fn bytes(f: impl FnOnce(&mut QemuFile)) -> Vec<u8> {
        let b = MemBuffer::new();
        let mut q = b.file();
        f(&mut q);
        q.flush().unwrap();
        b.contents()
    }

    fn reader(b: &[u8]) -> QemuFile {
        QemuFile::from_bytes(b.to_vec())
    }

    #[test]
    fn block_list_golden_bytes() {
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x40, 0x10, 0x00, 0x04, // total 1 GiB + 1 MiB | MEM_SIZE
            0x06, b'p', b'c', b'.', b'r', b'a', b'm',       // "pc.ram"
            0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, // 1 GiB
            0x03, b'r', b'o', b'm',                         // "rom"
            0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // 1 MiB
        ];
        let list = [("pc.ram", 1u64 << 30), ("rom", 1 << 20)];
        assert_eq!(bytes(|f| write_block_list(f, list.iter().copied())), golden);
        let mut r = reader(golden);
        let h = RecordHeader::read_from(&mut r).unwrap();
        assert_eq!(
            (h.flags, h.offset, h.idstr),
            (RAM_SAVE_FLAG_MEM_SIZE, (1 << 30) + (1 << 20), None)
        );
        assert_eq!(
            read_block_list(&mut r, h.offset, 8).unwrap(),
            [
                ("pc.ram".to_string(), 1 << 30),
                ("rom".to_string(), 1 << 20)
            ]
        );
        for cut in 8..golden.len() {
            let mut r = reader(&golden[..cut]);
            r.get_be64().unwrap();
            assert!(read_block_list(&mut r, h.offset, 8).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn block_list_that_overshoots_or_never_ends_is_refused() {
        let b = bytes(|f| write_block_list(f, [("a", 8192u64), ("b", 8192)]));
        let mut r = reader(&b);
        r.get_be64().unwrap();
        assert!(matches!(
            read_block_list(&mut r, 4096, 8),
            Err(Error::BadBlockList { .. })
        ));
        let mut r = reader(&b);
        r.get_be64().unwrap();
        assert!(matches!(
            read_block_list(&mut r, !4095, 2),
            Err(Error::BadBlockList { .. })
        ));
    }

    #[test]
    fn page_record_golden_bytes() {
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x08, // offset 0x3000 | PAGE
            0x06, b'p', b'c', b'.', b'r', b'a', b'm',       // "pc.ram"
        ];
        assert_eq!(
            bytes(|f| RecordHeader::write_page(f, 0x3000, RAM_SAVE_FLAG_PAGE, Some("pc.ram"))),
            golden
        );
        let h = RecordHeader::read_from(&mut reader(golden)).unwrap();
        assert_eq!(
            h,
            RecordHeader {
                flags: RAM_SAVE_FLAG_PAGE,
                offset: 0x3000,
                idstr: Some("pc.ram".into())
            }
        );
        for cut in 0..golden.len() {
            assert!(
                RecordHeader::read_from(&mut reader(&golden[..cut])).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn zero_record_with_continue_golden_bytes() {
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x22, // offset 0x10000 | ZERO | CONTINUE
        ];
        assert_eq!(
            bytes(|f| RecordHeader::write_page(f, 0x10000, RAM_SAVE_FLAG_ZERO, None)),
            golden
        );
        let h = RecordHeader::read_from(&mut reader(golden)).unwrap();
        assert_eq!(
            h,
            RecordHeader {
                flags: RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE,
                offset: 0x10000,
                idstr: None
            }
        );
        for cut in 0..golden.len() {
            assert!(RecordHeader::read_from(&mut reader(&golden[..cut])).is_err());
        }
    }

    #[test]
    fn eos_golden_bytes() {
        let golden = [0, 0, 0, 0, 0, 0, 0, 0x10];
        assert_eq!(bytes(|f| f.put_be64(RAM_SAVE_FLAG_EOS)), golden);
        let h = RecordHeader::read_from(&mut reader(&golden)).unwrap();
        assert_eq!((h.flags, h.offset, h.idstr), (RAM_SAVE_FLAG_EOS, 0, None));
    }
}
