//! `VmControl`: what the migration thread needs from the VM it migrates.

use crate::SectionError;

/// What the migration thread needs from the VM.
pub trait VmControl: Send + Sync {
    /// Takes the VM lock (QEMU's big lock), which device emulation and the monitor take
    /// too: the migration thread holds it while it asks what is pending and queues a
    /// chunk, so no device changes state in between. A VM whose devices need no such
    /// lock keeps the default, which holds nothing.
    fn lock(&self) -> VmLock<'_> {
        VmLock::none()
    }

    /// Stops every vCPU and returns once all of them are out of KVM_RUN with their pending
    /// I/O completed. Called without the VM lock held, so a vCPU finishing an exit can
    /// take it.
    ///
    /// # Errors
    /// When a vCPU cannot be stopped; the migration fails and the VM is resumed.
    fn stop_vcpus(&self) -> std::result::Result<(), SectionError>;

    /// Lets the vCPUs run again (after a failed or cancelled migration).
    ///
    /// # Errors
    /// When a vCPU cannot be resumed.
    fn resume_vcpus(&self) -> std::result::Result<(), SectionError>;

    /// Flushes the VM's disks to stable storage (the vCPUs are stopped).
    ///
    /// # Errors
    /// When a flush fails; the migration fails and the VM is resumed.
    fn flush_disks(&self) -> std::result::Result<(), SectionError> {
        Ok(())
    }

    /// Writes the disks' data to stable storage while the guest runs (no VM lock held),
    /// so the flush of the completion finds little left; called when the switchover is
    /// near, and timed.
    ///
    /// # Errors
    /// When a sync fails; the migration fails and the VM runs on.
    fn sync_disks(&self) -> std::result::Result<(), SectionError> {
        Ok(())
    }

    /// The migration completed: the guest now belongs to the destination. Called before
    /// the status turns `completed`, so that whoever sees that status also sees the VM
    /// in its after-migration state (QEMU's `postmigrate`).
    fn handed_over(&self) {}

    /// Throttles every vCPU to run only `100 - percent` percent of the time (0 ends the
    /// throttle), for `auto-converge`. Called without the VM lock held.
    ///
    /// # Errors
    /// When the VM cannot throttle its vCPUs (the default): the migration fails, the VM
    /// runs on.
    fn set_throttle(&self, percent: u8) -> std::result::Result<(), SectionError> {
        match percent {
            0 => Ok(()),
            _ => Err("this VM cannot throttle its vCPUs (auto-converge)".into()),
        }
    }
}

/// The VM lock, held until dropped: whatever guard the VM's lock hands out, or nothing.
pub struct VmLock<'a>(Option<Box<dyn Held + 'a>>);

/// Anything held: the guard's own `Drop` releases the lock.
trait Held {}
impl<T> Held for T {}

impl<'a> VmLock<'a> {
    /// Holds nothing (a VM without a lock).
    pub fn none() -> Self {
        VmLock(None)
    }

    /// Holds `guard` (e.g. a `MutexGuard`) until dropped.
    pub fn holding<G: 'a>(guard: G) -> Self {
        VmLock(Some(Box::new(guard)))
    }
}

impl std::fmt::Debug for VmLock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "VmLock(held)"
        } else {
            "VmLock(none)"
        })
    }
}
