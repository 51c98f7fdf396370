//! The `Cpus` seam: what runs the guest's code, KVM vCPU threads or the software
//! backend's thread.

use anyhow::Result;
use savevm::SaveVm;

/// What runs the guest's code: KVM vCPU threads or the software backend's thread.
pub trait Cpus: Send + Sync {
    /// `kvm` or `soft`.
    fn name(&self) -> &'static str;
    /// The host thread id of each vCPU, in vCPU order.
    fn thread_ids(&self) -> Vec<i32>;
    /// Lets the vCPUs run.
    fn resume(&self);
    /// Stops every vCPU; returns when all are out of KVM_RUN with their I/O completed.
    ///
    /// # Errors
    /// A vCPU that cannot be stopped.
    fn pause(&self) -> Result<()>;
    /// Why the guest cannot run any more, if so.
    fn fault(&self) -> Option<String>;
    /// Throttles the vCPUs to run `100 - percent` percent of the time; 0 ends it.
    fn set_throttle(&self, percent: u8);
    /// The throttle in effect, percent.
    fn throttle(&self) -> u8;
    /// Registers the vCPU (and in-kernel device) sections.
    ///
    /// # Errors
    /// A duplicate registration.
    fn register_sections(&self, savevm: &mut SaveVm) -> Result<()>;
    /// Applies state the sections loaded (the destination, after the whole stream).
    ///
    /// # Errors
    /// KVM refused the state.
    fn apply_loaded(&self) -> Result<()>;
}
