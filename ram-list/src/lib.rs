//! Guest RAM for live migration: the versioned [`RamList`] of [`RamBlock`]s (QEMU's
//! `ram_list`, behind its own mutex) and the live [`RamSection`] that migrates them in
//! QEMU's RAM format version 4 (QEMU's `ram_save_*` / `ram_load`).
//!
//! A block is named host memory ([`RamBacking`], e.g. a vm-memory region) with a
//! migration bitmap and a dirty-log source (dirty-bitmap's `DirtyLogSource`). A VMM with
//! a vm-memory `GuestMemoryMmap` gets one block per region from
//! [`RamList::from_guest_memory`]. Guest RAM in a memfd ([`MemfdMemory`]) can be handed
//! over to a destination on the same host instead of copied ([`SharedMemory`], QEMU's
//! `x-ignore-shared`).
//!
//! Examples, run by `cargo xtask ci`: `examples/snapshot.rs` saves and restores a VM of
//! two memory regions and a device of its own; `examples/live_migration.rs` migrates one
//! between two threads while its guest writes, with the VMM's own `VmControl` and the
//! destination's answer on the same connection; `examples/tcp_migration.rs` does the same
//! between two processes over TCP. `examples/outside-vmm/` at the repository's top does all
//! three as a crate outside the workspace would, in 150 lines.
//!
//! ```
//! use std::sync::Arc;
//! use qemu_file::{MemBuffer, QemuFile};
//! use ram_list::{RamBlock, RamList, RamSection, RamStats};
//! use savevm::SaveVm;
//! use vm_memory::MmapRegion;
//!
//! let ram = |name: &str| {
//!     let list = Arc::new(RamList::new());
//!     let host = Arc::new(MmapRegion::<()>::new(16 * 4096).unwrap());
//!     let block = list.add(RamBlock::new(name, host, Box::new(())).unwrap()).unwrap();
//!     let mut vm = SaveVm::new("pc");
//!     vm.register_live(RamSection::info(), Box::new(RamSection::new(list, Arc::new(RamStats::default()))))
//!         .unwrap();
//!     (vm, block)
//! };
//!
//! let (mut source, src_block) = ram("pc.ram");
//! src_block.write_bytes(5 * 4096, b"hello");
//! let stream = MemBuffer::new();
//! source.save_snapshot(&mut stream.file())?;
//!
//! let (mut dest, dst_block) = ram("pc.ram");
//! dest.load(&mut QemuFile::from_bytes(stream.contents()))?;
//! let mut back = [0u8; 5];
//! dst_block.read_bytes(5 * 4096, &mut back);
//! assert_eq!(&back, b"hello");
//! # Ok::<(), savevm::Error>(())
//! ```

mod backing;
mod block;
mod blocktime;
mod error;
pub mod format;
mod guest_memory;
mod list;
mod memfd;
pub mod multifd;
mod place_batch;
mod populated;
mod postcopy_incoming;
mod postcopy_ram;
mod preempt;
mod requests;
mod section;
mod shared;
mod stats;
mod uffd;
mod walker;
mod zero;

pub use backing::RamBacking;
pub use block::RamBlock;
pub use blocktime::VcpuBlocktime;
pub use error::{Error, Result};
pub use guest_memory::RegionBacking;
pub use list::RamList;
pub use memfd::MemfdMemory;
pub use multifd::MultifdCompression;
pub use multifd::RecvTarget;
pub use multifd::recv::MultifdReceiver;
pub use multifd::send::{MultifdSender, QUEUED_BATCHES};
pub use postcopy_incoming::{PostcopyIncoming, PostcopyIncomingInfo};
pub use postcopy_ram::{FaultWaitStats, PostcopyRam, WaitSummary};
pub use requests::PageRequests;
pub use section::{RAM_SECTION_VERSION, RamSection};
pub use shared::SharedMemory;
pub use stats::{RamStats, RamStatsSnapshot};
pub use uffd::{PageFault, Placed, Userfault};
pub use walker::RamWalker;
