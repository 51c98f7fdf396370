//! QEMU's historical block migration records (QEMU `migration/block.c`, section "block"),
//! plus the device list of our version 2.
//!
//! Every record starts with a be64 = (sector << 9) | flags, sectors of 512 bytes:
//!
//! ```text
//! (sector << 9) | DEVICE_BLOCK            u8 len | name | 1 MiB of data    a chunk
//! (sector << 9) | DEVICE_BLOCK | ZERO     u8 len | name                     an all-zero chunk
//! (percent << 9) | PROGRESS                                                 bulk progress
//! EOS                                                                       end of payload
//! (sectors << 9) | DEVICE_INFO            u8 len | name                     version 2, START only:
//!                                                                           a disk and its size
//! ```
//! A chunk is 1 MiB (2048 sectors) at a multiple of 2048 sectors; the last chunk of a disk
//! that is not a whole number of MiB still carries 1 MiB, of which the destination writes
//! what fits. Version 1 (QEMU's) has no DEVICE_INFO, so a destination could check a disk's
//! size only at its first chunk; version 2 lists every disk first, so a wrong size or name
//! is refused before anything is written.

use qemu_file::QemuFile;

use crate::{Error, Result};

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes per chunk: the unit of copying and of dirty tracking.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Sectors per chunk.
pub const SECTORS_PER_CHUNK: u64 = CHUNK_SIZE / SECTOR_SIZE;
/// A chunk (followed by the device name, then the data unless ZERO_BLOCK).
pub const BLK_MIG_FLAG_DEVICE_BLOCK: u64 = 0x01;
/// End of this payload.
pub const BLK_MIG_FLAG_EOS: u64 = 0x02;
/// Bulk progress in percent, in the sector bits.
pub const BLK_MIG_FLAG_PROGRESS: u64 = 0x04;
/// With DEVICE_BLOCK: the chunk is all zero, no data follows.
pub const BLK_MIG_FLAG_ZERO_BLOCK: u64 = 0x08;
/// Version 2: a disk's name and size in sectors (START payload only).
pub const BLK_MIG_FLAG_DEVICE_INFO: u64 = 0x10;

const FLAG_MASK: u64 = SECTOR_SIZE - 1;

/// One record's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Flag bits.
    pub flags: u64,
    /// The sector (DEVICE_BLOCK), percent (PROGRESS) or size in sectors (DEVICE_INFO).
    pub value: u64,
    /// The device name, for DEVICE_BLOCK and DEVICE_INFO.
    pub name: Option<String>,
}

impl Record {
    /// Writes a header: `be64 (value << 9) | flags`, then the name if given.
    pub fn write_to(f: &mut QemuFile, value: u64, flags: u64, name: Option<&str>) {
        f.put_be64(value << 9 | flags);
        if let Some(n) = name {
            f.put_counted_string(n);
        }
    }

    /// Reads a header (and the name of DEVICE_BLOCK and DEVICE_INFO records).
    ///
    /// # Errors
    /// A stream error.
    pub fn read_from(f: &mut QemuFile) -> Result<Self> {
        let v = f.get_be64()?;
        let flags = v & FLAG_MASK;
        let name = if flags & (BLK_MIG_FLAG_DEVICE_BLOCK | BLK_MIG_FLAG_DEVICE_INFO) != 0 {
            Some(f.get_counted_string("disk name")?)
        } else {
            None
        };
        Ok(Record {
            flags,
            value: v >> 9,
            name,
        })
    }

    /// Refuses flag combinations no writer produces.
    ///
    /// # Errors
    /// [`Error::BadRecord`].
    pub fn check(&self, at: u64) -> Result<()> {
        let known = BLK_MIG_FLAG_DEVICE_BLOCK
            | BLK_MIG_FLAG_EOS
            | BLK_MIG_FLAG_PROGRESS
            | BLK_MIG_FLAG_ZERO_BLOCK
            | BLK_MIG_FLAG_DEVICE_INFO;
        let bad = |reason: String| Err(Error::BadRecord { at, reason });
        if self.flags & !known != 0 {
            return bad(format!("unknown flags {:#x}", self.flags & !known));
        }
        if self.flags & BLK_MIG_FLAG_ZERO_BLOCK != 0 && self.flags & BLK_MIG_FLAG_DEVICE_BLOCK == 0
        {
            return bad("ZERO_BLOCK without DEVICE_BLOCK".into());
        }
        // Exactly the kinds a writer makes (QEMU's and ours): anything else, flags 0
        // included, is not a record this reader may skip.
        let kind = self.flags & !BLK_MIG_FLAG_ZERO_BLOCK;
        if ![
            BLK_MIG_FLAG_DEVICE_BLOCK,
            BLK_MIG_FLAG_EOS,
            BLK_MIG_FLAG_PROGRESS,
            BLK_MIG_FLAG_DEVICE_INFO,
        ]
        .contains(&kind)
        {
            return bad(format!("Unknown block migration flags: {:#x}", self.flags));
        }
        if self.flags & BLK_MIG_FLAG_DEVICE_BLOCK != 0 && self.value % SECTORS_PER_CHUNK != 0 {
            return bad(format!("sector {} is not at a chunk boundary", self.value));
        }
        Ok(())
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

    fn read(b: &[u8]) -> Result<Record> {
        Record::read_from(&mut QemuFile::from_bytes(b.to_vec()))
    }

    #[test]
    fn chunk_header_golden_bytes() {
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, 0x01, // sector 4096 << 9 | DEVICE_BLOCK
            0x05, b'd', b'i', b's', b'k', b'0',             // "disk0"
        ];
        assert_eq!(
            bytes(|f| Record::write_to(f, 4096, BLK_MIG_FLAG_DEVICE_BLOCK, Some("disk0"))),
            golden
        );
        let r = read(golden).unwrap();
        assert_eq!(
            r,
            Record {
                flags: 1,
                value: 4096,
                name: Some("disk0".into())
            }
        );
        r.check(0).unwrap();
        for cut in 0..golden.len() {
            assert!(read(&golden[..cut]).is_err());
        }
    }

    #[test]
    fn zero_chunk_progress_eos_and_device_info_golden_bytes() {
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, // sector 0 | DEVICE_BLOCK | ZERO_BLOCK
            0x01, b'a',
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc8, 0x04, // 100 % | PROGRESS
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, // EOS
            0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x10, // 524288 sectors (256 MiB) | DEVICE_INFO
            0x01, b'a',
        ];
        let b = bytes(|f| {
            Record::write_to(
                f,
                0,
                BLK_MIG_FLAG_DEVICE_BLOCK | BLK_MIG_FLAG_ZERO_BLOCK,
                Some("a"),
            );
            Record::write_to(f, 100, BLK_MIG_FLAG_PROGRESS, None);
            Record::write_to(f, 0, BLK_MIG_FLAG_EOS, None);
            Record::write_to(f, 524_288, BLK_MIG_FLAG_DEVICE_INFO, Some("a"));
        });
        assert_eq!(b, golden);
        let mut f = QemuFile::from_bytes(golden.to_vec());
        let recs: Vec<Record> = (0..4).map(|_| Record::read_from(&mut f).unwrap()).collect();
        assert_eq!(recs[0].flags, 9);
        assert_eq!((recs[1].flags, recs[1].value), (BLK_MIG_FLAG_PROGRESS, 100));
        assert_eq!(recs[2].flags, BLK_MIG_FLAG_EOS);
        assert_eq!(
            (recs[3].value, recs[3].name.as_deref()),
            (524_288, Some("a"))
        );
        for r in &recs {
            r.check(0).unwrap();
        }
    }

    #[test]
    fn impossible_records_are_refused() {
        for (flags, value) in [
            (0x20, 0),
            (BLK_MIG_FLAG_ZERO_BLOCK, 0),
            (BLK_MIG_FLAG_DEVICE_BLOCK, 7),
            // No kind at all (QEMU: "Unknown block migration flags: 0x0"), and two kinds.
            (0, 0),
            (BLK_MIG_FLAG_EOS | BLK_MIG_FLAG_PROGRESS, 0),
            (BLK_MIG_FLAG_DEVICE_BLOCK | BLK_MIG_FLAG_EOS, 0),
        ] {
            let r = Record {
                flags,
                value,
                name: None,
            };
            assert!(
                matches!(r.check(9), Err(Error::BadRecord { at: 9, .. })),
                "{flags:#x}"
            );
        }
    }
}
