//! QEMU's multifd channel framing (QEMU 7.2, `migration/multifd.c`), byte for byte.
//!
//! With the `multifd` capability the RAM section's normal pages travel over extra
//! connections, the channels, while the main stream keeps everything else (zero pages
//! included). Each channel opens with a [`ChannelInit`], then carries packets: a
//! [`PacketHeader`] of fixed size (its offset array always has room for
//! [`PAGES_PER_PACKET`] pages, as a receiver reads a fixed length), followed by the
//! data of its `normal` pages. A header with [`MULTIFD_FLAG_SYNC`] marks the end of a
//! round: the destination's main stream waits at each RAM EOS record until every channel
//! delivered its sync packet.
//!
//! This module is the framing alone: golden bytes and the checks a hostile channel must
//! pass. The channels are [`send`] (source) and [`recv`] (destination).

use qemu_file::QemuFile;

use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, Result};

pub use target::RecvTarget;

#[cfg(feature = "multifd")]
pub mod recv;
#[cfg(not(feature = "multifd"))]
#[path = "recv_off.rs"]
pub mod recv;
#[cfg(feature = "multifd")]
pub mod send;
#[cfg(not(feature = "multifd"))]
#[path = "send_off.rs"]
pub mod send;
mod target;
#[cfg(feature = "zstd")]
pub mod zstd;
#[cfg(not(feature = "zstd"))]
#[path = "zstd_off.rs"]
pub mod zstd;

/// `multifd-compression`: QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MultifdCompression {
    /// `none`: pages as they are.
    #[default]
    None,
    /// `zstd`: each channel one zstd stream, flushed at the end of every packet.
    Zstd,
}

impl MultifdCompression {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MultifdCompression::None => "none",
            MultifdCompression::Zstd => "zstd",
        }
    }
}

/// A packet's compression field (QEMU's `MULTIFD_FLAG_COMPRESSION_MASK`).
pub const MULTIFD_FLAG_COMPRESSION_MASK: u32 = 0xf << 1;
/// Pages compressed with zlib (not supported here).
pub const MULTIFD_FLAG_ZLIB: u32 = 1 << 1;
/// Pages compressed with zstd.
pub const MULTIFD_FLAG_ZSTD: u32 = 2 << 1;

/// First word of every multifd message.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// The only version.
pub const MULTIFD_VERSION: u32 = 1;
/// The packet ends a round.
pub const MULTIFD_FLAG_SYNC: u32 = 1;
/// Bytes of page data a packet can carry (QEMU's `MULTIFD_PACKET_SIZE`).
pub const MULTIFD_PACKET_SIZE: usize = 512 * 1024;
/// Pages a packet has room for.
pub const PAGES_PER_PACKET: usize = MULTIFD_PACKET_SIZE / TARGET_PAGE_SIZE as usize;
/// Size of [`ChannelInit`] on the wire.
pub const INIT_LEN: usize = 64;
/// Room for the RAM block name, NUL-terminated.
const RAMBLOCK_LEN: usize = 256;
/// Fixed part of a packet header: six be32, packet_num, four reserved be64, the name.
const FIXED_LEN: usize = 6 * 4 + 8 + 4 * 8 + RAMBLOCK_LEN;
/// A packet header on the wire, offsets included.
pub const PACKET_HEADER_LEN: usize = FIXED_LEN + 8 * PAGES_PER_PACKET;

/// A channel's opening message (`MultiFDInit_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInit {
    /// The source VM's UUID (QEMU's `-uuid`, all zero by default); the destination
    /// refuses a channel whose UUID is not its own.
    pub uuid: [u8; 16],
    /// The channel's number, from 0.
    pub id: u8,
}

impl ChannelInit {
    /// Writes the 64 bytes.
    pub fn write_to(&self, f: &mut QemuFile) {
        f.put_be32(MULTIFD_MAGIC);
        f.put_be32(MULTIFD_VERSION);
        f.put_buffer(&self.uuid);
        f.put_u8(self.id);
        f.put_buffer(&[0; 7 + 32]);
    }

    /// Reads the 64 bytes and checks magic, version and that the channel number is
    /// below `channels`.
    ///
    /// # Errors
    /// [`Error::BadMultifd`], or a stream error (truncation).
    pub fn read_from(f: &mut QemuFile, channels: u8) -> Result<Self> {
        let at = f.bytes_read();
        check_magic_version(f, at)?;
        let mut uuid = [0; 16];
        f.get_buffer(&mut uuid)?;
        let id = f.get_u8()?;
        let mut reserved = [0; 7 + 32];
        f.get_buffer(&mut reserved)?;
        if id >= channels {
            return Err(bad(
                at,
                format!("channel {id}, but only {channels} channels were set up"),
            ));
        }
        Ok(ChannelInit { uuid, id })
    }
}

/// A packet header (`MultiFDPacket_t`); its pages' data follows it on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketHeader {
    /// [`MULTIFD_FLAG_SYNC`], and how the pages are compressed (`MULTIFD_FLAG_ZSTD`).
    pub flags: u32,
    /// Bytes of page data after the header: pages × page size, or the compressed size.
    /// (QEMU leaves the previous packet's value in a packet without pages.)
    pub next_packet_size: u32,
    /// Global packet number across channels.
    pub packet_num: u64,
    /// The RAM block the pages belong to (empty when there are none).
    pub ramblock: String,
    /// Byte offsets of the pages in the block, in the order their data follows.
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    /// Writes the header ([`PACKET_HEADER_LEN`] bytes); the caller then writes the pages'
    /// data in `offsets` order.
    ///
    /// # Panics
    /// More than [`PAGES_PER_PACKET`] offsets, or a block name of 256 bytes or more (the
    /// sender's bugs: names are at most 127 bytes).
    pub fn write_to(&self, f: &mut QemuFile) {
        assert!(self.offsets.len() <= PAGES_PER_PACKET, "too many pages");
        assert!(self.ramblock.len() < RAMBLOCK_LEN, "block name too long");
        f.put_be32(MULTIFD_MAGIC);
        f.put_be32(MULTIFD_VERSION);
        f.put_be32(self.flags);
        f.put_be32(PAGES_PER_PACKET as u32);
        f.put_be32(self.offsets.len() as u32);
        f.put_be32(self.next_packet_size);
        f.put_be64(self.packet_num);
        f.put_buffer(&[0; 32]);
        let mut name = [0u8; RAMBLOCK_LEN];
        name[..self.ramblock.len()].copy_from_slice(self.ramblock.as_bytes());
        f.put_buffer(&name);
        for i in 0..PAGES_PER_PACKET {
            f.put_be64(self.offsets.get(i).copied().unwrap_or(0));
        }
    }

    /// Parses and checks a header already read from a channel at stream offset `at` (a
    /// receiver reads exactly the header's bytes, so the pages after it can be read
    /// straight into guest memory): magic, version, the page counts, the block name
    /// (NUL-terminated UTF-8, present when there are pages) and every offset (page
    /// aligned, none twice). Whether the block exists and holds the offsets is the
    /// caller's check.
    ///
    /// # Errors
    /// [`Error::BadMultifd`] with the channel's offsets.
    pub fn parse(bytes: &[u8; PACKET_HEADER_LEN], at: u64) -> Result<Self> {
        let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let be64 = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        check_words(be32(0), be32(4), at)?;
        let flags = be32(8);
        let pages_alloc = be32(12);
        let normal = be32(16);
        let next_packet_size = be32(20);
        let packet_num = be64(24);
        // 32 reserved bytes, then the name, then the offsets.
        let name = &bytes[64..64 + RAMBLOCK_LEN];
        let mut offsets: Vec<u64> = (0..PAGES_PER_PACKET)
            .map(|i| be64(FIXED_LEN + 8 * i))
            .collect();
        if pages_alloc as usize != PAGES_PER_PACKET {
            return Err(bad(
                at,
                format!("room for {pages_alloc} pages; packets here have {PAGES_PER_PACKET}"),
            ));
        }
        if normal > pages_alloc {
            return Err(bad(
                at,
                format!("{normal} pages in a packet with room for {pages_alloc}"),
            ));
        }
        if flags & !(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK) != 0 {
            return Err(bad(at, format!("unknown flags {flags:#x}")));
        }
        match flags & MULTIFD_FLAG_COMPRESSION_MASK {
            0 | MULTIFD_FLAG_ZSTD => {}
            MULTIFD_FLAG_ZLIB => {
                return Err(bad(
                    at,
                    "zlib-compressed pages; only none and zstd are supported".into(),
                ));
            }
            c => return Err(bad(at, format!("unknown compression {c:#x}"))),
        }
        let len = name
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad(at, "the RAM block name is not NUL-terminated".to_string()))?;
        let ramblock = std::str::from_utf8(&name[..len])
            .map_err(|_| bad(at, "the RAM block name is not UTF-8".to_string()))?
            .to_string();
        if normal > 0 && ramblock.is_empty() {
            return Err(bad(at, format!("{normal} pages but no RAM block name")));
        }
        offsets.truncate(normal as usize);
        if let Some(o) = offsets.iter().find(|&&o| o % TARGET_PAGE_SIZE != 0) {
            return Err(bad(at, format!("page offset {o:#x} is not page aligned")));
        }
        // A page twice in one packet would be two writable views of one guest page at
        // once on the receiver; no sender puts a page twice in a packet.
        let mut sorted = offsets.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(
                at,
                format!("page offset {:#x} is in the packet twice", w[0]),
            ));
        }
        Ok(PacketHeader {
            flags,
            next_packet_size,
            packet_num,
            ramblock,
            offsets,
        })
    }

    /// Reads a header and checks it as [`PacketHeader::parse`] does.
    ///
    /// # Errors
    /// [`Error::BadMultifd`], or a stream error (truncation).
    pub fn read_from(f: &mut QemuFile) -> Result<Self> {
        let at = f.bytes_read();
        let mut raw = [0u8; PACKET_HEADER_LEN];
        f.get_buffer(&mut raw)?;
        PacketHeader::parse(&raw, at)
    }
}

fn check_magic_version(f: &mut QemuFile, at: u64) -> Result<()> {
    // The magic first: a main stream sent to a channel is told as such, however short.
    check_magic(f.get_be32()?, at)?;
    check_version(f.get_be32()?, at)
}

fn check_words(magic: u32, version: u32, at: u64) -> Result<()> {
    check_magic(magic, at)?;
    check_version(version, at)
}

fn check_magic(magic: u32, at: u64) -> Result<()> {
    if magic != MULTIFD_MAGIC {
        return Err(bad(
            at,
            format!("magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}"),
        ));
    }
    Ok(())
}

fn check_version(version: u32, at: u64) -> Result<()> {
    if version != MULTIFD_VERSION {
        return Err(bad(
            at,
            format!("version {version}, expected {MULTIFD_VERSION}"),
        ));
    }
    Ok(())
}

fn bad(at: u64, reason: String) -> Error {
    Error::BadMultifd { at, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    fn bytes(f: impl FnOnce(&mut QemuFile)) -> Vec<u8> {
        let buf = MemBuffer::new();
        let mut q = buf.file();
        f(&mut q);
        q.flush().unwrap();
        buf.contents()
    }

    fn reader(b: &[u8]) -> QemuFile {
        QemuFile::from_bytes(b.to_vec())
    }

    #[test]
    fn channel_init_golden_bytes() {
        let init = ChannelInit {
            uuid: *b"0123456789abcdef",
            id: 2,
        };
        let golden = bytes(|f| init.write_to(f));
        #[rustfmt::skip]
        let head: &[u8] = &[
            0x11, 0x22, 0x33, 0x44, // MULTIFD_MAGIC
            0x00, 0x00, 0x00, 0x01, // MULTIFD_VERSION
        ];
        assert_eq!(golden.len(), INIT_LEN);
        assert_eq!(&golden[..8], head);
        assert_eq!(&golden[8..24], b"0123456789abcdef", "uuid");
        assert_eq!(golden[24], 2, "channel id");
        assert!(golden[25..].iter().all(|&b| b == 0), "reserved");
        assert_eq!(
            ChannelInit::read_from(&mut reader(&golden), 3).unwrap(),
            init
        );
        for cut in 0..golden.len() {
            assert!(ChannelInit::read_from(&mut reader(&golden[..cut]), 3).is_err());
        }
        let e = ChannelInit::read_from(&mut reader(&golden), 2).unwrap_err();
        assert!(e.to_string().contains("channel 2, but only 2"), "{e}");
        let mut wrong = golden.clone();
        wrong[0] = 0x51; // "QEVM" starts a main stream, not a channel
        let e = ChannelInit::read_from(&mut reader(&wrong), 3).unwrap_err();
        assert!(e.to_string().contains("magic 0x51223344"), "{e}");
    }

    fn packet() -> PacketHeader {
        PacketHeader {
            flags: 0,
            next_packet_size: 0,
            packet_num: 7,
            ramblock: "pc.ram".into(),
            offsets: vec![0x1000, 0x7000],
        }
    }

    #[test]
    fn packet_header_golden_bytes() {
        let p = packet();
        let golden = bytes(|f| p.write_to(f));
        #[rustfmt::skip]
        let head: &[u8] = &[
            0x11, 0x22, 0x33, 0x44, // MULTIFD_MAGIC
            0x00, 0x00, 0x00, 0x01, // version 1
            0x00, 0x00, 0x00, 0x00, // flags
            0x00, 0x00, 0x00, 0x80, // pages_alloc 128
            0x00, 0x00, 0x00, 0x02, // normal pages 2
            0x00, 0x00, 0x00, 0x00, // next_packet_size
            0, 0, 0, 0, 0, 0, 0, 7, // packet_num 7
        ];
        assert_eq!(golden.len(), PACKET_HEADER_LEN);
        assert_eq!(PACKET_HEADER_LEN, 1344);
        assert_eq!(&golden[..32], head);
        assert!(golden[32..64].iter().all(|&b| b == 0), "reserved");
        assert_eq!(&golden[64..71], b"pc.ram\0");
        assert!(golden[71..320].iter().all(|&b| b == 0), "name padding");
        assert_eq!(
            &golden[320..336],
            &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x70, 0]
        );
        assert!(golden[336..].iter().all(|&b| b == 0), "unused offsets");
        assert_eq!(PacketHeader::read_from(&mut reader(&golden)).unwrap(), p);
        for cut in 0..golden.len() {
            assert!(PacketHeader::read_from(&mut reader(&golden[..cut])).is_err());
        }
    }

    #[test]
    fn a_sync_packet_without_pages_needs_no_block() {
        let p = PacketHeader {
            flags: MULTIFD_FLAG_SYNC,
            next_packet_size: 0,
            packet_num: 9,
            ramblock: String::new(),
            offsets: vec![],
        };
        let b = bytes(|f| p.write_to(f));
        assert_eq!(PacketHeader::read_from(&mut reader(&b)).unwrap(), p);
    }

    #[test]
    fn hostile_headers_are_refused_with_the_reason() {
        let good = bytes(|f| packet().write_to(f));
        type Corrupt = fn(&mut Vec<u8>);
        let cases: [(Corrupt, &str); 11] = [
            (|b| b[7] = 2, "version 2"),
            (|b| b[11] = 0x20, "unknown flags 0x20"),
            (|b| b[11] = 2, "zlib-compressed"),
            (|b| b[11] = 6, "unknown compression 0x6"),
            (|b| b[15] = 0x81, "room for 129 pages"),
            (|b| b[19] = 0x81, "129 pages in a packet"),
            (|b| b[64..320].fill(b'x'), "not NUL-terminated"),
            (|b| b[64] = 0xff, "not UTF-8"),
            (|b| b[64] = 0, "no RAM block name"),
            (|b| b[327] = 1, "0x1001 is not page aligned"),
            (|b| b[334] = 0x10, "0x1000 is in the packet twice"),
        ];
        for (corrupt, needle) in cases {
            let mut b = good.clone();
            corrupt(&mut b);
            let e = PacketHeader::read_from(&mut reader(&b)).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
            assert!(e.to_string().len() < 200, "{e}");
        }
    }
}
