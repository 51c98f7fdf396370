//! The error type of dirty-log sources.

use std::io;

/// A dirty-log source failed to start, stop or sync.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl on a memory slot failed.
    #[error("KVM {op} on memory slot {slot} failed")]
    Kvm {
        /// What was being done (`get dirty log`, `enable dirty logging`, ...).
        op: &'static str,
        /// The memory slot.
        slot: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A raw bitmap does not fit the bitmap it is merged into.
    #[error(
        "a dirty log of {words} words at page {first_page} does not fit a bitmap of {pages} pages"
    )]
    OutOfRange {
        /// First page the raw bitmap describes.
        first_page: usize,
        /// Its length in 64-bit words.
        words: usize,
        /// Pages in the target bitmap.
        pages: usize,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
