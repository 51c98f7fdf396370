//! Live migration of disks (QEMU's historical `migration/block.c`, per disk and opt-in):
//! a [`Disk`] is a raw image whose writes mark a dirty bitmap of 1 MiB chunks, and
//! [`BlockMigration`] is the live `"block"` section that copies every disk opened with
//! `migrate` in bulk, then the chunks written meanwhile, then the rest with the guest
//! stopped. Disks not migrated are shared storage: flushed at completion, not copied.
//!
//! ```
//! use std::sync::Arc;
//! use block_migration::{BlockMigration, BlockStats, Disk, DiskOptions};
//! use qemu_file::{MemBuffer, QemuFile};
//! use savevm::SaveVm;
//!
//! let dir = std::env::temp_dir().join(format!("blockmig-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let image = |n: &str| {
//!     let p = dir.join(n);
//!     std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
//!     Arc::new(Disk::open(&p, "disk0", &DiskOptions::default()).unwrap())
//! };
//! let (src, dst) = (image("src.img"), image("dst.img"));
//! src.write_at(b"hello", 3 << 20)?;
//!
//! let mut source = SaveVm::new("pc");
//! source.register_live(BlockMigration::info(), Box::new(BlockMigration::new(vec![src], Arc::default())))?;
//! let stream = MemBuffer::new();
//! source.save_snapshot(&mut stream.file())?;
//!
//! let mut dest = SaveVm::new("pc");
//! dest.register_live(BlockMigration::info(), Box::new(BlockMigration::new(vec![dst.clone()], Arc::default())))?;
//! dest.load(&mut QemuFile::from_bytes(stream.contents()))?;
//! let mut back = [0u8; 5];
//! dst.read_at(&mut back, 3 << 20)?;
//! assert_eq!(&back, b"hello");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Whole VMs built on the crates: ram-list's `examples/` (a snapshot, a live migration
//! between threads with a VMM's own `VmControl`, the same over TCP) and the repository's
//! `examples/outside-vmm/`, a VMM outside the workspace doing all three in 150 lines.

mod disk;
mod error;
pub mod format;
mod section;
mod stats;
mod walker;

pub use disk::{Disk, DiskOptions};
pub use error::{Error, Result};
pub use section::{BLOCK_SECTION_VERSION, BlockMigration};
pub use stats::{BlockStats, BlockStatsSnapshot};
pub use walker::BlockWalker;
