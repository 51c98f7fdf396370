//! QEMU's migration stream and the machinery around it (QEMU's `savevm.c`, `vmstate.c`
//! and `migration.c`): the format constants and framing ([`format`](mod@format)), the
//! section registry [`SaveVm`] with live sections ([`SectionHandler`]) and device
//! sections ([`DeviceHandler`]) whose state is declared once ([`VmState`], usually
//! `#[derive(VmState)]`), the hostile-input-proof loader ([`SaveVm::load`]), the
//! migration thread ([`run_migration`], generic over [`VmControl`]) and a text dump of any
//! stream ([`dump_stream`]).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use qemu_file::{MemBuffer, QemuFile};
//! use savevm::{SaveVm, SectionInfo, VmState};
//!
//! #[derive(VmState, Default, Debug, PartialEq)]
//! #[vmstate(name = "counter")]
//! struct Counter {
//!     count: u32,
//!     log: Vec<u64>,
//! }
//!
//! let source = Arc::new(Mutex::new(Counter { count: 42, log: vec![1, 2] }));
//! let mut vm = SaveVm::new("pc");
//! vm.register_device(SectionInfo::for_state::<Counter>("counter", 0), Box::new(source))?;
//! let stream = MemBuffer::new();
//! vm.save_snapshot(&mut stream.file())?;
//!
//! let dest = Arc::new(Mutex::new(Counter::default()));
//! let mut vm = SaveVm::new("pc");
//! vm.register_device(SectionInfo::for_state::<Counter>("counter", 0), Box::new(dest.clone()))?;
//! let report = vm.load(&mut QemuFile::from_bytes(stream.contents()))?;
//! assert_eq!(report.records, 1);
//! assert_eq!(*dest.lock().unwrap(), Counter { count: 42, log: vec![1, 2] });
//! # Ok::<(), savevm::Error>(())
//! ```
//!
//! Whole VMs: ram-list's examples (`ram-list/examples/`: a snapshot, a live migration
//! between threads with a VMM's own [`VmControl`], the same over TCP), and
//! `examples/outside-vmm/` in the repository, a VMM outside the workspace doing all three
//! in 150 lines. KVM x86 vCPU and in-kernel device state: the savevm-kvm crate.

// The derive names `::savevm::…`, which this crate's own tests and examples use too.
extern crate self as savevm;

mod control;
pub mod convergence;
mod dump;
mod error;
pub mod format;
mod load;
mod migration;
mod params;
pub mod postcopy;
mod postcopy_source;
pub mod priority;
mod registry;
pub mod return_path;
mod section;
mod status;
pub mod switchover;
mod vm_control;
mod vmstate;

pub use control::MigrationControl;
pub use dump::{DumpSink, SectionWalker, dump_stream, dump_stream_to};
pub use error::{Error, Result, error_chain};
pub use load::LoadReport;
pub use migration::{WINDOW, run_migration};
pub use params::MigrationParams;
pub use registry::{PostcopyHooks, SaveVm, TARGET_PAGE_SIZE};
/// `#[derive(VmState)]`: see [`VmState`] (feature `derive`, on by default).
#[cfg(feature = "derive")]
pub use savevm_derive::VmState;
pub use section::{DeviceHandler, SectionError, SectionHandler, SectionInfo};
pub use status::{CompletionTimes, MigrationInfo, MigrationStatus};
pub use vm_control::{VmControl, VmLock};
pub use vmstate::{
    DeviceDescription, FieldDesc, FieldError, FieldReader, FieldType, FieldWriter, MAX_ELEMENTS,
    MAX_FIELD_LEN, StructDesc, VmDescription, VmField, VmState, check_version,
};
