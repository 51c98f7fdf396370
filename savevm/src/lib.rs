//! QEMU's migration stream and the machinery around it (QEMU's `savevm.c` and
//! `migration.c`): the format constants and framing ([`format`](mod@format)), the section registry
//! [`SaveVm`] with live sections ([`SectionHandler`]) and described device sections
//! ([`DeviceHandler`]), the hostile-input-proof loader ([`SaveVm::load`]), the migration
//! thread ([`run_migration`], generic over [`VmControl`]) and a text dump of any stream
//! ([`dump_stream`]).
//!
//! ```
//! use qemu_file::{MemBuffer, QemuFile};
//! use savevm::{DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo};
//!
//! #[derive(Default)]
//! struct Counter(u32);
//!
//! impl DeviceHandler for Counter {
//!     fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
//!         w.u32("count", self.0);
//!         Ok(())
//!     }
//!     fn load(&mut self, r: &mut FieldReader<'_>, _version: u32) -> Result<(), SectionError> {
//!         self.0 = r.u32("count")?;
//!         Ok(())
//!     }
//! }
//!
//! let mut source = SaveVm::new("pc");
//! source.register_device(SectionInfo::new("counter", 0, 1), Box::new(Counter(42)))?;
//! let stream = MemBuffer::new();
//! source.save_snapshot(&mut stream.file())?;
//!
//! let mut dest = SaveVm::new("pc");
//! dest.register_device(SectionInfo::new("counter", 0, 1), Box::new(Counter::default()))?;
//! let report = dest.load(&mut QemuFile::from_bytes(stream.contents()))?;
//! assert_eq!(report.records, 1);
//! # Ok::<(), savevm::Error>(())
//! ```

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
pub use params::{MigrationParams, MultifdCompression};
pub use registry::{SaveVm, TARGET_PAGE_SIZE};
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
