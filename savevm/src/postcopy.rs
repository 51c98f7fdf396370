//! Post-copy's commands on the forward stream, byte for byte as QEMU 7.2 writes and reads
//! them (`migration/savevm.c`, `postcopy-ram.c`); docs/postcopy.md has the whole
//! exchange. Each is a [`QEMU_VM_COMMAND`](crate::format::QEMU_VM_COMMAND) record:
//!
//! ```text
//! ADVISE (3)       be64 page-size summary | be64 target page size    (or nothing)
//! LISTEN (4), RUN (5), POSTCOPY_RESUME (9)                              (nothing)
//! RAM_DISCARD (6)  u8 version 0 | u8 n | name[n] | u8 0 | up to 12 x (be64 start, be64 length)
//! PACKAGED (7)     be32 N, then N bytes of stream outside the command's length
//! RECV_BITMAP (10) u8 n | name[n]
//! ```

use qemu_file::QemuFile;

use crate::format::write_command;
use crate::{Error, Result};

/// Command: post-copy may follow; the destination checks its page sizes.
pub const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// Command: the destination registers its RAM and reads the rest of the stream on
/// another thread (inside the package).
pub const MIG_CMD_POSTCOPY_LISTEN: u16 = 4;
/// Command: the destination starts the guest (the end of the package).
pub const MIG_CMD_POSTCOPY_RUN: u16 = 5;
/// Command: ranges of one block the destination must drop (stale or never sent).
pub const MIG_CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
/// Command: a stream within the stream (the devices' state at the switch).
pub const MIG_CMD_PACKAGED: u16 = 7;
/// Command: resume a paused post-copy (recovery).
pub const MIG_CMD_POSTCOPY_RESUME: u16 = 9;
/// Command: the destination sends which pages of a block it has (recovery).
pub const MIG_CMD_RECV_BITMAP: u16 = 10;

/// The version of the discard command's layout.
const DISCARD_VERSION: u8 = 0;
/// Ranges per discard command, as QEMU batches them.
pub const MAX_DISCARDS_PER_COMMAND: usize = 12;
/// The largest package read (QEMU allows up to 4 GiB; devices' state is far smaller).
pub const MAX_PACKAGE_LEN: u32 = 256 << 20;

/// What ADVISE carries when RAM goes post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advise {
    /// The OR of every RAM block's page size (0x1000 for 4 KiB pages only).
    pub page_size_summary: u64,
    /// The target's page size.
    pub target_page_size: u64,
}

/// Writes ADVISE: 16 bytes when RAM may go post-copy (`Some`), none otherwise (QEMU's
/// dirty-bitmaps-only post-copy).
pub fn write_advise(f: &mut QemuFile, advise: Option<Advise>) {
    match advise {
        Some(a) => {
            let mut data = [0u8; 16];
            data[..8].copy_from_slice(&a.page_size_summary.to_be_bytes());
            data[8..].copy_from_slice(&a.target_page_size.to_be_bytes());
            write_command(f, MIG_CMD_POSTCOPY_ADVISE, &data);
        }
        None => write_command(f, MIG_CMD_POSTCOPY_ADVISE, &[]),
    }
}

/// Reads ADVISE's payload of `len` bytes (after the command header).
///
/// # Errors
/// A length other than 0 or 16, or the stream's.
pub fn read_advise(f: &mut QemuFile, len: u16) -> Result<Option<Advise>> {
    match len {
        0 => Ok(None),
        16 => Ok(Some(Advise {
            page_size_summary: f.get_be64()?,
            target_page_size: f.get_be64()?,
        })),
        _ => Err(Error::BadCommand {
            command: MIG_CMD_POSTCOPY_ADVISE,
            reason: format!("an advise of {len} bytes (0 or 16)"),
        }),
    }
}

/// Writes LISTEN.
pub fn write_listen(f: &mut QemuFile) {
    write_command(f, MIG_CMD_POSTCOPY_LISTEN, &[]);
}

/// Writes RUN.
pub fn write_run(f: &mut QemuFile) {
    write_command(f, MIG_CMD_POSTCOPY_RUN, &[]);
}

/// Writes POSTCOPY_RESUME.
pub fn write_resume(f: &mut QemuFile) {
    write_command(f, MIG_CMD_POSTCOPY_RESUME, &[]);
}

/// Writes the discard commands of block `block` (a name of 1 to 255 bytes): `ranges`
/// of (start, length) in bytes, at most [`MAX_DISCARDS_PER_COMMAND`] per command. A
/// block with no ranges gets no command, as in QEMU.
pub fn write_discards(f: &mut QemuFile, block: &str, ranges: &[(u64, u64)]) {
    debug_assert!(!block.is_empty() && block.len() < 256);
    for chunk in ranges.chunks(MAX_DISCARDS_PER_COMMAND) {
        let mut data = Vec::with_capacity(3 + block.len() + 16 * chunk.len());
        data.push(DISCARD_VERSION);
        data.push(block.len() as u8);
        data.extend_from_slice(block.as_bytes());
        data.push(0);
        for (start, length) in chunk {
            data.extend_from_slice(&start.to_be_bytes());
            data.extend_from_slice(&length.to_be_bytes());
        }
        write_command(f, MIG_CMD_POSTCOPY_RAM_DISCARD, &data);
    }
}

/// Reads a discard command's payload of `len` bytes: the block's name and its ranges,
/// checked as QEMU's `loadvm_postcopy_ram_handle_discard` checks them.
///
/// # Errors
/// A short or misshapen command, another version, or the stream's.
pub fn read_discard(f: &mut QemuFile, len: u16) -> Result<(String, Vec<(u64, u64)>)> {
    let bad = |reason: String| Error::BadCommand {
        command: MIG_CMD_POSTCOPY_RAM_DISCARD,
        reason,
    };
    if len < 20 {
        return Err(bad(format!("{len} bytes, fewer than one range needs")));
    }
    let version = f.get_u8()?;
    if version != DISCARD_VERSION {
        return Err(bad(format!("version {version}, this side reads 0")));
    }
    let name = f.get_counted_string("RAM block name")?;
    if name.is_empty() {
        return Err(bad("an empty block name".into()));
    }
    if f.get_u8()? != 0 {
        return Err(bad("the block name is not followed by its nil".into()));
    }
    let rest = usize::from(len)
        .checked_sub(3 + name.len())
        .ok_or_else(|| bad("the block name runs past the command".into()))?;
    if rest % 16 != 0 {
        return Err(bad(format!("{rest} bytes of ranges, not a multiple of 16")));
    }
    let mut ranges = Vec::with_capacity(rest / 16);
    for _ in 0..rest / 16 {
        ranges.push((f.get_be64()?, f.get_be64()?));
    }
    Ok((name, ranges))
}

/// Writes PACKAGED with `package` (a stream without file header or EOF) after it.
pub fn write_packaged(f: &mut QemuFile, package: &[u8]) {
    write_command(f, MIG_CMD_PACKAGED, &(package.len() as u32).to_be_bytes());
    f.put_buffer(package);
}

/// Reads a package whose command's payload (`len` bytes, the package's length) follows.
///
/// # Errors
/// A length field of another size, a package over [`MAX_PACKAGE_LEN`], or the stream's.
pub fn read_packaged(f: &mut QemuFile, len: u16) -> Result<Vec<u8>> {
    if len != 4 {
        return Err(Error::BadCommand {
            command: MIG_CMD_PACKAGED,
            reason: format!("a length field of {len} bytes, not 4"),
        });
    }
    let n = f.get_be32()?;
    Ok(f.get_bytes(n.into(), MAX_PACKAGE_LEN as usize, "post-copy package")?)
}

/// Writes RECV_BITMAP for block `block`.
pub fn write_recv_bitmap(f: &mut QemuFile, block: &str) {
    let mut data = Vec::with_capacity(1 + block.len());
    data.push(block.len() as u8);
    data.extend_from_slice(block.as_bytes());
    write_command(f, MIG_CMD_RECV_BITMAP, &data);
}

/// Reads RECV_BITMAP's payload of `len` bytes: the block's name.
///
/// # Errors
/// A name that does not fill the command exactly, or the stream's.
pub fn read_recv_bitmap(f: &mut QemuFile, len: u16) -> Result<String> {
    let name = f.get_counted_string("RAM block name")?;
    if name.is_empty() || usize::from(len) != name.len() + 1 {
        return Err(Error::BadCommand {
            command: MIG_CMD_RECV_BITMAP,
            reason: format!("a name of {} bytes in {len}", name.len()),
        });
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    fn bytes(write: impl FnOnce(&mut QemuFile)) -> Vec<u8> {
        let b = MemBuffer::new();
        let mut f = b.file();
        write(&mut f);
        f.flush().unwrap();
        b.contents()
    }

    #[test]
    fn advise_listen_run_resume_golden_bytes() {
        let advise = Advise {
            page_size_summary: 0x1000,
            target_page_size: 0x1000,
        };
        #[rustfmt::skip]
        assert_eq!(bytes(|f| write_advise(f, Some(advise))), [
            0x08, 0x00, 0x03, 0x00, 0x10,
            0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 0, 0, 0, 0, 0x10, 0,
        ]);
        assert_eq!(bytes(|f| write_advise(f, None)), [8, 0, 3, 0, 0]);
        assert_eq!(bytes(write_listen), [8, 0, 4, 0, 0]);
        assert_eq!(bytes(write_run), [8, 0, 5, 0, 0]);
        assert_eq!(bytes(write_resume), [8, 0, 9, 0, 0]);
        let wire = bytes(|f| write_advise(f, Some(advise)));
        let mut f = QemuFile::from_bytes(wire[5..].to_vec());
        assert_eq!(read_advise(&mut f, 16).unwrap(), Some(advise));
        assert!(read_advise(&mut QemuFile::from_bytes(vec![0; 8]), 8).is_err());
    }

    #[test]
    fn discards_golden_bytes_twelve_ranges_a_command() {
        #[rustfmt::skip]
        assert_eq!(bytes(|f| write_discards(f, "pc.ram", &[(0x2000, 0x1000)])), [
            0x08, 0x00, 0x06, 0x00, 25,
            0, 6, b'p', b'c', b'.', b'r', b'a', b'm', 0,
            0, 0, 0, 0, 0, 0, 0x20, 0,
            0, 0, 0, 0, 0, 0, 0x10, 0,
        ]);
        assert!(bytes(|f| write_discards(f, "pc.ram", &[])).is_empty());
        let ranges: Vec<(u64, u64)> = (0..25).map(|i| (i * 0x2000, 0x1000)).collect();
        let wire = bytes(|f| write_discards(f, "pc.ram", &ranges));
        let mut f = QemuFile::from_bytes(wire);
        let mut got = Vec::new();
        for expect in [12, 12, 1] {
            assert_eq!(f.get_u8().unwrap(), 8);
            assert_eq!(f.get_be16().unwrap(), MIG_CMD_POSTCOPY_RAM_DISCARD);
            let len = f.get_be16().unwrap();
            let (name, r) = read_discard(&mut f, len).unwrap();
            assert_eq!((name.as_str(), r.len()), ("pc.ram", expect));
            got.extend(r);
        }
        assert_eq!(got, ranges);
    }

    #[test]
    fn misshapen_discards_are_refused_with_the_reason() {
        let cases: [(&[u8], &str); 4] = [
            (&[1, 1, b'a', 0], "version 1"),
            (&[0, 1, b'a', 7], "nil"),
            (&[0, 0, 0], "empty block name"),
            (&[0, 1, b'a', 0, 1, 2, 3], "multiple of 16"),
        ];
        for (payload, why) in cases {
            let mut data = payload.to_vec();
            data.resize(data.len().max(20) + 8, 0);
            let len = if why == "multiple of 16" {
                21
            } else {
                data.len() as u16
            };
            let e = read_discard(&mut QemuFile::from_bytes(data), len).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
        let e = read_discard(&mut QemuFile::from_bytes(vec![0; 40]), 19).unwrap_err();
        assert!(e.to_string().contains("fewer than one range"), "{e}");
    }

    #[test]
    fn a_package_and_a_recv_bitmap_golden_bytes() {
        assert_eq!(
            bytes(|f| write_packaged(f, &[8, 0, 4, 0, 0])),
            [8, 0, 7, 0, 4, 0, 0, 0, 5, 8, 0, 4, 0, 0]
        );
        let mut f = QemuFile::from_bytes(vec![0, 0, 0, 5, 8, 0, 4, 0, 0]);
        assert_eq!(read_packaged(&mut f, 4).unwrap(), [8, 0, 4, 0, 0]);
        let mut f = QemuFile::from_bytes(vec![0xff, 0xff, 0xff, 0xff]);
        assert!(read_packaged(&mut f, 4).is_err(), "4 GiB is refused");
        assert_eq!(
            bytes(|f| write_recv_bitmap(f, "pc.ram")),
            [8, 0, 10, 0, 7, 6, b'p', b'c', b'.', b'r', b'a', b'm']
        );
        let mut f = QemuFile::from_bytes(b"\x06pc.ram".to_vec());
        assert_eq!(read_recv_bitmap(&mut f, 7).unwrap(), "pc.ram");
        let mut f = QemuFile::from_bytes(b"\x06pc.ram".to_vec());
        assert!(read_recv_bitmap(&mut f, 9).is_err());
    }
}
