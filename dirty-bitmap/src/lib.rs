//! Finding dirty guest pages fast: [`DirtyBitmap`], a page-granular bitmap of atomic words
//! with test-and-clear and word-at-a-time search, and [`DirtyLogSource`], the seam through
//! which the hypervisor's and the VMM's records of written pages are synced into it
//! (QEMU's migration bitmap and `memory_region_test_and_clear_dirty`).
//!
//! Sources: [`VmmWriteLog`] (writes the VMM makes through vm-memory), [`ManualLog`]
//! (marked by hand), `KvmDirtyLog` (KVM's dirty log; cargo feature `kvm`), combined per
//! block with [`MergedLog`].
//!
//! ```
//! use dirty_bitmap::{DirtyBitmap, DirtyLogSource, ManualLog};
//!
//! let bitmap = DirtyBitmap::new(1024);
//! let mut log = ManualLog::new(1024);
//! log.mark(3);
//! log.mark(700);
//! assert_eq!(log.sync(&bitmap)?, 2);
//! let mut sent = vec![];
//! let mut page = 0;
//! while let Some(p) = bitmap.find_next_dirty(page) {
//!     if bitmap.test_and_clear(p) {
//!         sent.push(p);
//!     }
//!     page = p + 1;
//! }
//! assert_eq!(sent, [3, 700]);
//! assert_eq!(bitmap.dirty_count(), 0);
//! # Ok::<(), dirty_bitmap::Error>(())
//! ```
//!
//! Whole VMs built on the crates: ram-list's `examples/` (a snapshot, a live migration
//! between threads with a VMM's own `VmControl`, the same over TCP) and the repository's
//! `examples/outside-vmm/`, a VMM outside the workspace doing all three in 150 lines.

mod bitmap;
mod error;
#[cfg(feature = "kvm")]
mod kvm;
mod source;
mod vmm_log;

pub use bitmap::{DirtyBitmap, DirtyPages, DirtyRanges};
pub use error::{Error, Result};
#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyLog, SlotFlags};
pub use source::{DirtyLogSource, ManualLog, MergedLog};
pub use vmm_log::VmmWriteLog;
