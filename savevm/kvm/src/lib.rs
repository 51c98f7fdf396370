//! KVM x86 state as savevm sections, so a KVM VMM gets QEMU-format vCPU and in-kernel
//! device state without writing it field by field.
//!
//! - [`VcpuState`]: one vCPU's registers, segment and control registers, FPU/SSE,
//!   XSAVE, XCRs, MSRs, LAPIC, events, MP state and debug registers, read from a stopped
//!   vCPU ([`VcpuState::save`]) and loaded into one ([`VcpuState::restore`]) with the
//!   ioctls kvm-ioctls wraps; written as the `"cpu"` section's described fields
//!   ([`CpuFields`], `#[derive(VmState)]`), so a dump or QEMU's `analyze-migration.py`
//!   names every register.
//! - [`Irqchip`], [`Pit`], [`Clock`]: the in-kernel PICs and IOAPIC, i8254 and clock.
//! - [`Raw`]: any plain kernel structure as one `buffer` field.
//!
//! The VMM keeps the wiring: which thread may call a vCPU's ioctls, when state read from
//! a stream is applied (after the whole stream loaded, before the guest runs). A
//! `DeviceHandler` for a vCPU section is a few lines:
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use kvm_ioctls::VcpuFd;
//! use savevm::{DeviceHandler, FieldReader, FieldWriter, SectionError, SectionInfo};
//! use savevm_kvm::{CpuFields, VcpuState};
//!
//! struct CpuSection {
//!     fd: Arc<VcpuFd>,
//!     msrs: Vec<u32>,
//!     loaded: Arc<Mutex<Option<VcpuState>>>,
//! }
//!
//! impl DeviceHandler for CpuSection {
//!     fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
//!         VcpuState::save(&self.fd, &self.msrs)?.write_fields(w);
//!         Ok(())
//!     }
//!     fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
//!         *self.loaded.lock().unwrap() = Some(VcpuState::read_fields(r, version)?);
//!         Ok(())
//!     }
//! }
//!
//! let info = SectionInfo::for_state::<CpuFields>("cpu", 0);
//! ```
//!
//! Whole VMs built on the crates: ram-list's `examples/` (a snapshot, a live migration
//! between threads with a VMM's own `VmControl`, the same over TCP) and the repository's
//! `examples/outside-vmm/`, a VMM outside the workspace doing all three in 150 lines.

mod cpu_section;
mod error;
mod raw;
mod vcpu;
mod vm;

pub use cpu_section::{ControlRegs, CpuFields, Fpu, MAX_MSRS, Msr, Regs, Xcrs, Xsave};
pub use error::{Error, Result};
pub use raw::Raw;
pub use vcpu::{MSR_CANDIDATES, VcpuState, supported_msrs};
pub use vm::{Clock, IRQCHIPS, Irqchip, Pit};
