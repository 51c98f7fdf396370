//! Built without the `zstd` feature: the same interface as `zstd.rs`, whose streams
//! cannot be made, so `multifd-compression zstd` fails clearly on either side.

use std::convert::Infallible;

use super::MULTIFD_PACKET_SIZE;
use crate::{Error, Result};

/// Most compressed bytes a packet may carry (QEMU's `zbuff_len`: twice the packet).
pub const MAX_COMPRESSED: usize = 2 * MULTIFD_PACKET_SIZE;
/// The kernel receive buffer of a destination's channel carrying compressed pages.
pub const COMPRESSED_SOCKET_BUFFER: usize = 64 << 10;
/// Highest `multifd-zstd-level`.
pub const MAX_ZSTD_LEVEL: u8 = 20;

fn missing() -> Error {
    Error::Compression {
        reason: "this build has no zstd (ram-list's `zstd` feature is off)".into(),
    }
}

/// A sending channel's zstd stream: never made in this build.
#[derive(Debug)]
pub struct ZstdSend(Infallible);

impl ZstdSend {
    /// Fails: no zstd in this build.
    ///
    /// # Errors
    /// Always.
    pub fn new(_level: u8) -> Result<Self> {
        Err(missing())
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    /// None.
    pub fn compress<'a>(&mut self, _pages: impl Iterator<Item = &'a [u8]>) -> Result<&[u8]> {
        match self.0 {}
    }
}

/// A receiving channel's zstd stream: never made in this build.
#[derive(Debug)]
pub struct ZstdRecv(Infallible);

impl ZstdRecv {
    /// Fails: no zstd in this build.
    ///
    /// # Errors
    /// Always.
    pub fn new() -> Result<Self> {
        Err(missing())
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    /// None.
    pub fn input(&mut self, _len: usize) -> Result<&mut [u8]> {
        match self.0 {}
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    /// None.
    pub fn decompress(&mut self, _len: usize, _pieces: &mut [&mut [u8]]) -> Result<()> {
        match self.0 {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zstd_is_refused_with_the_reason() {
        for e in [
            super::ZstdSend::new(1).unwrap_err(),
            super::ZstdRecv::new().unwrap_err(),
        ] {
            assert!(e.to_string().contains("`zstd` feature is off"), "{e}");
        }
    }
}
