//! zstd per multifd packet, as QEMU 7.2's `multifd-zstd.c`: each channel is one zstd
//! stream that is never ended; a packet's pages go in one after the other and the stream
//! is flushed at the packet's end, so the packet's compressed bytes (its
//! `next_packet_size`) decompress on their own given the stream before them.

use ::zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::MULTIFD_PACKET_SIZE;
use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, Result};

/// Most compressed bytes a packet may carry (QEMU's `zbuff_len`: twice the packet).
pub const MAX_COMPRESSED: usize = 2 * MULTIFD_PACKET_SIZE;
/// The kernel receive buffer of a destination's channel carrying compressed pages: a
/// buffer full of zstd output can stand for hundreds of times its size in pages, which
/// the destination must still decompress after the source thinks them sent, while the
/// guest is paused at the switchover. (The source counts its own send queues: what they
/// hold, times the last packet's ratio, is still pending there.)
pub const COMPRESSED_SOCKET_BUFFER: usize = 64 << 10;
/// Highest `multifd-zstd-level`.
pub const MAX_ZSTD_LEVEL: u8 = 20;

const PAGE: usize = TARGET_PAGE_SIZE as usize;

fn zstd_error(what: &str, e: std::io::Error) -> Error {
    Error::Compression {
        reason: format!("zstd {what}: {e}"),
    }
}

/// A sending channel's zstd stream.
pub struct ZstdSend {
    enc: Encoder<'static>,
    out: Vec<u8>,
}

impl std::fmt::Debug for ZstdSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdSend")
    }
}

impl ZstdSend {
    /// A stream at `level` (0 to [`MAX_ZSTD_LEVEL`]; 0 is zstd's default, 3).
    ///
    /// # Errors
    /// [`Error::Compression`] when zstd cannot set up.
    pub fn new(level: u8) -> Result<Self> {
        Ok(ZstdSend {
            enc: Encoder::new(i32::from(level)).map_err(|e| zstd_error("setup", e))?,
            out: vec![0; MAX_COMPRESSED],
        })
    }

    /// Compresses one packet's pages and flushes: the bytes to send.
    ///
    /// # Errors
    /// [`Error::Compression`]: zstd failed, or the output would not fit in
    /// [`MAX_COMPRESSED`] bytes (which a receiver refuses).
    pub fn compress<'a>(&mut self, pages: impl Iterator<Item = &'a [u8]>) -> Result<&[u8]> {
        let mut out = OutBuffer::around(&mut self.out[..]);
        for page in pages {
            let mut input = InBuffer::around(page);
            while input.pos() < page.len() {
                if out.pos() == out.capacity() {
                    return Err(Error::Compression {
                        reason: "zstd output larger than a packet may carry".into(),
                    });
                }
                self.enc
                    .run(&mut input, &mut out)
                    .map_err(|e| zstd_error("compression", e))?;
            }
        }
        loop {
            let left = self
                .enc
                .flush(&mut out)
                .map_err(|e| zstd_error("flush", e))?;
            if left == 0 {
                break;
            }
            if out.pos() == out.capacity() {
                return Err(Error::Compression {
                    reason: "zstd output larger than a packet may carry".into(),
                });
            }
        }
        let n = out.pos();
        Ok(&self.out[..n])
    }
}

/// A receiving channel's zstd stream.
pub struct ZstdRecv {
    dec: Decoder<'static>,
    input: Vec<u8>,
}

impl std::fmt::Debug for ZstdRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdRecv")
    }
}

impl ZstdRecv {
    /// A stream.
    ///
    /// # Errors
    /// [`Error::Compression`] when zstd cannot set up.
    pub fn new() -> Result<Self> {
        Ok(ZstdRecv {
            dec: Decoder::new().map_err(|e| zstd_error("setup", e))?,
            input: vec![0; MAX_COMPRESSED],
        })
    }

    /// Where a packet's `len` compressed bytes are read to.
    ///
    /// # Errors
    /// [`Error::Compression`] when `len` is more than [`MAX_COMPRESSED`].
    pub fn input(&mut self, len: usize) -> Result<&mut [u8]> {
        if len > MAX_COMPRESSED {
            return Err(Error::Compression {
                reason: format!("a packet of {len} compressed bytes; at most {MAX_COMPRESSED}"),
            });
        }
        Ok(&mut self.input[..len])
    }

    /// Decompresses the `len` bytes given to [`ZstdRecv::input`] into `pieces` (runs of
    /// consecutive pages), filling each exactly; every input byte must be used.
    ///
    /// # Errors
    /// [`Error::Compression`]: corrupt data, too little for the pages, or bytes left over.
    pub fn decompress(&mut self, len: usize, pieces: &mut [&mut [u8]]) -> Result<()> {
        let mut input = InBuffer::around(&self.input[..len]);
        let pages: usize = pieces.iter().map(|p| p.len() / PAGE).sum();
        let mut done = 0;
        for piece in pieces.iter_mut() {
            let size = piece.len();
            let mut out = OutBuffer::around(&mut piece[..]);
            while out.pos() < size {
                let before = (input.pos(), out.pos());
                self.dec
                    .run(&mut input, &mut out)
                    .map_err(|e| zstd_error("decompression", e))?;
                if (input.pos(), out.pos()) == before {
                    return Err(Error::Compression {
                        reason: format!(
                            "the packet's {len} compressed bytes end within page {} of {pages}",
                            done + out.pos() / PAGE
                        ),
                    });
                }
            }
            done += size / PAGE;
        }
        // The decoder may have taken input it has not yet produced: one more byte of
        // output means the packet holds more than its pages.
        let mut probe = [0u8; 1];
        let mut out = OutBuffer::around(&mut probe[..]);
        self.dec
            .run(&mut input, &mut out)
            .map_err(|e| zstd_error("decompression", e))?;
        if input.pos() != len || out.pos() != 0 {
            return Err(Error::Compression {
                reason: format!(
                    "the packet's {len} compressed bytes hold more than its {pages} pages"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|i| if i % 64 < 8 { seed ^ i as u8 } else { 0 })
            .collect()
    }

    #[test]
    fn packets_round_trip_through_one_stream_each() {
        let mut tx = ZstdSend::new(1).unwrap();
        let mut rx = ZstdRecv::new().unwrap();
        for round in 0..3u8 {
            let pages: Vec<Vec<u8>> = (0..5).map(|i| page(round * 10 + i)).collect();
            let packet = tx.compress(pages.iter().map(|p| &p[..])).unwrap().to_vec();
            assert!(packet.len() < 5 * PAGE / 4, "{} bytes", packet.len());
            rx.input(packet.len()).unwrap().copy_from_slice(&packet);
            let mut back = vec![vec![0u8; PAGE]; 5];
            let mut slices: Vec<&mut [u8]> = back.iter_mut().map(|p| &mut p[..]).collect();
            rx.decompress(packet.len(), &mut slices).unwrap();
            assert_eq!(back, pages, "round {round}");
        }
    }

    #[test]
    fn runs_of_pages_are_filled_in_order_and_a_short_run_names_its_page() {
        let mut tx = ZstdSend::new(1).unwrap();
        let pages: Vec<Vec<u8>> = (0..4).map(|i| page(40 + i)).collect();
        let packet = tx.compress(pages.iter().map(|p| &p[..])).unwrap().to_vec();
        // A run of 3 pages, then one page.
        let mut run = vec![0u8; 3 * PAGE];
        let mut last = vec![0u8; PAGE];
        let mut rx = ZstdRecv::new().unwrap();
        rx.input(packet.len()).unwrap().copy_from_slice(&packet);
        rx.decompress(packet.len(), &mut [&mut run[..], &mut last[..]])
            .unwrap();
        assert_eq!(run, pages[..3].concat());
        assert_eq!(last, pages[3]);
        // The same 4 pages into runs of 3 and 2: the data ends in the second run's
        // second page, page 4 of 5.
        let mut two = vec![0u8; 2 * PAGE];
        let mut rx = ZstdRecv::new().unwrap();
        rx.input(packet.len()).unwrap().copy_from_slice(&packet);
        let e = rx
            .decompress(packet.len(), &mut [&mut run[..], &mut two[..]])
            .unwrap_err();
        assert!(e.to_string().contains("within page 4 of 5"), "{e}");
    }

    #[test]
    fn incompressible_pages_fit_a_full_packet() {
        let mut tx = ZstdSend::new(3).unwrap();
        let mut x = 0x1234_5678u32;
        let pages: Vec<Vec<u8>> = (0..crate::multifd::PAGES_PER_PACKET)
            .map(|_| {
                (0..PAGE)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect()
            })
            .collect();
        let n = tx.compress(pages.iter().map(|p| &p[..])).unwrap().len();
        assert!(n <= MAX_COMPRESSED && n > MULTIFD_PACKET_SIZE / 2, "{n}");
    }

    #[test]
    fn short_long_and_corrupt_packets_are_refused() {
        let mut tx = ZstdSend::new(1).unwrap();
        let pages = [page(1), page(2)];
        let packet = tx.compress(pages.iter().map(|p| &p[..])).unwrap().to_vec();
        let mut back = vec![vec![0u8; PAGE]; 3];
        for (data, n_pages, needle) in [
            (packet.clone(), 3, "end within page 2"),
            (packet.clone(), 1, "hold more than its 1 pages"),
            (vec![0xff; 40], 1, "zstd decompression"),
        ] {
            let mut rx = ZstdRecv::new().unwrap();
            rx.input(data.len()).unwrap().copy_from_slice(&data);
            let mut slices: Vec<&mut [u8]> =
                back.iter_mut().take(n_pages).map(|p| &mut p[..]).collect();
            let e = rx.decompress(data.len(), &mut slices).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        let mut rx = ZstdRecv::new().unwrap();
        assert!(rx.input(MAX_COMPRESSED + 1).is_err());
    }
}
