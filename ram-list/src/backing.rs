//! `RamBacking`: the host memory behind a RAM block.

use std::fmt;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// Host memory that backs a RAM block.
///
/// # Safety
/// An implementation promises that `as_ptr()..as_ptr() + size()` is mapped, readable and
/// writable memory for as long as the value lives, and that the pointer and size never
/// change.
pub unsafe trait RamBacking: Send + Sync + fmt::Debug {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Its size in bytes.
    fn size(&self) -> usize;
    /// Whether a page the kernel never populated reads as zero (private anonymous
    /// memory), so the sender may skip reading it. False (the default) for anything a
    /// file or another process could have filled.
    fn unpopulated_is_zero(&self) -> bool {
        false
    }
}

pub(crate) fn private_anonymous<B: Bitmap>(m: &MmapRegion<B>) -> bool {
    m.file_offset().is_none()
        && m.flags() & libc::MAP_ANONYMOUS != 0
        && m.flags() & libc::MAP_PRIVATE != 0
}

// SAFETY: an `MmapRegion` owns its mapping until it is dropped; pointer and size are fixed
// at creation.
unsafe impl<B: Bitmap + Send + Sync + fmt::Debug> RamBacking for MmapRegion<B> {
    fn as_ptr(&self) -> *mut u8 {
        MmapRegion::as_ptr(self)
    }
    fn size(&self) -> usize {
        MmapRegion::size(self)
    }
    fn unpopulated_is_zero(&self) -> bool {
        private_anonymous(self)
    }
}

// SAFETY: a guest region owns (an `Arc` of) its mapping until it is dropped.
unsafe impl<B: Bitmap + Send + Sync + fmt::Debug> RamBacking for GuestRegionMmap<B> {
    fn as_ptr(&self) -> *mut u8 {
        let m: &MmapRegion<B> = self;
        m.as_ptr()
    }
    fn size(&self) -> usize {
        self.len() as usize
    }
    fn unpopulated_is_zero(&self) -> bool {
        private_anonymous(self)
    }
}
