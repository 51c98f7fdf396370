//! QEMU's RAM section records, format version 4 (QEMU `migration/ram.c`).
//!
//! Every record starts with a be64 holding the page's offset within its block (a multiple
//! of the target page size) ORed with flags in the low bits:
//!
//! ```text
//! be64 total | MEM_SIZE, then per block: u8 len | idstr | be64 used_length
//!                                   [| be64 guest address]  (START only)
//! be64 offset | ZERO [| CONTINUE]  [u8 len | idstr]  u8 0                      zero page
//! be64 offset | PAGE [| CONTINUE]  [u8 len | idstr]  4096 bytes                 page
//! be64 EOS                                                                     end of payload
//! ```
//! CONTINUE means "same block as the previous record", so the idstr is left out. The
//! guest address is there when the `x-ignore-shared` capability is on: shared blocks
//! then send no pages (the destination maps the same memory).

use std::os::fd::BorrowedFd;

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

/// One entry of the block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    /// The block's name.
    pub idstr: String,
    /// Its used length in bytes.
    pub used_length: u64,
    /// Its guest-physical address (QEMU's `mr->addr`): in the list only when the
    /// `x-ignore-shared` capability is on (on both sides: the stream does not say).
    pub addr: Option<u64>,
}

/// Writes the block list of a START payload: the total size of all blocks, then each
/// block's name, size and (with `x-ignore-shared`) guest address. `fds` go with the
/// list's first bytes (a local hand-over's shared memory); none: a plain write.
///
/// # Errors
/// Only with `fds`: a transport that cannot pass them, or a failed write.
pub fn write_block_list(
    f: &mut QemuFile,
    blocks: &[BlockEntry],
    fds: &[BorrowedFd<'_>],
) -> qemu_file::Result<()> {
    let total: u64 = blocks.iter().map(|b| b.used_length).sum();
    let header = total | RAM_SAVE_FLAG_MEM_SIZE;
    if fds.is_empty() {
        f.put_be64(header);
    } else {
        f.put_buffer_with_fds(&header.to_be_bytes(), fds)?;
    }
    for b in blocks {
        f.put_counted_string(&b.idstr);
        f.put_be64(b.used_length);
        if let Some(addr) = b.addr {
            f.put_be64(addr);
        }
    }
    Ok(())
}

/// Reads the entries of a block list whose header said `total` bytes; `with_addr`: each
/// entry has a guest address (`x-ignore-shared`). No more than `max_entries` entries are
/// read, so a hostile total cannot make the loop run long.
///
/// # Errors
/// Entries that overshoot `total`, too many entries, or a stream error.
pub fn read_block_list(
    f: &mut QemuFile,
    total: u64,
    max_entries: usize,
    with_addr: bool,
) -> Result<Vec<BlockEntry>> {
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
        let addr = if with_addr { Some(f.get_be64()?) } else { None };
        entries.push(BlockEntry {
            idstr,
            used_length: len,
            addr,
        });
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

    fn entries(list: &[(&str, u64, Option<u64>)]) -> Vec<BlockEntry> {
        list.iter()
            .map(|&(n, len, addr)| BlockEntry {
                idstr: n.into(),
                used_length: len,
                addr,
            })
            .collect()
    }

    fn write(list: &[(&str, u64, Option<u64>)]) -> Vec<u8> {
        bytes(|f| write_block_list(f, &entries(list), &[]).unwrap())
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
        let list = [("pc.ram", 1u64 << 30, None), ("rom", 1 << 20, None)];
        assert_eq!(write(&list), golden);
        let mut r = reader(golden);
        let h = RecordHeader::read_from(&mut r).unwrap();
        assert_eq!(
            (h.flags, h.offset, h.idstr),
            (RAM_SAVE_FLAG_MEM_SIZE, (1 << 30) + (1 << 20), None)
        );
        assert_eq!(
            read_block_list(&mut r, h.offset, 8, false).unwrap(),
            entries(&list)
        );
        for cut in 8..golden.len() {
            let mut r = reader(&golden[..cut]);
            r.get_be64().unwrap();
            assert!(
                read_block_list(&mut r, h.offset, 8, false).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn block_list_with_guest_addresses_golden_bytes() {
        // QEMU 7.2's ram_save_setup with x-ignore-shared: each entry ends with mr->addr.
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x04, // total 1 GiB | MEM_SIZE
            0x06, b'p', b'c', b'.', b'r', b'a', b'm',       // "pc.ram"
            0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, // 1 GiB
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // at 4 GiB
        ];
        let list = [("pc.ram", 1u64 << 30, Some(1u64 << 32))];
        assert_eq!(write(&list), golden);
        let mut r = reader(golden);
        r.get_be64().unwrap();
        assert_eq!(
            read_block_list(&mut r, 1 << 30, 8, true).unwrap(),
            entries(&list)
        );
        let mut r = reader(&golden[..golden.len() - 1]);
        r.get_be64().unwrap();
        assert!(read_block_list(&mut r, 1 << 30, 8, true).is_err());
    }

    #[test]
    fn block_list_that_overshoots_or_never_ends_is_refused() {
        let b = write(&[("a", 8192u64, None), ("b", 8192, None)]);
        let mut r = reader(&b);
        r.get_be64().unwrap();
        assert!(matches!(
            read_block_list(&mut r, 4096, 8, false),
            Err(Error::BadBlockList { .. })
        ));
        let mut r = reader(&b);
        r.get_be64().unwrap();
        assert!(matches!(
            read_block_list(&mut r, !4095, 2, false),
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
