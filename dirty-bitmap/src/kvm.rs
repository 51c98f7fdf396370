//! KVM's dirty log of guest writes (`KVM_GET_DIRTY_LOG` per memory slot).

use std::fmt;
use std::io;
use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;

use crate::{DirtyBitmap, DirtyLogSource, Error, Result};

/// The pages a guest wrote in one KVM memory slot.
///
/// [`DirtyLogSource::start`] re-registers the slot with `KVM_MEM_LOG_DIRTY_PAGES`, which
/// makes KVM write-protect it and record the first write to each page; each sync fetches
/// and resets that record. [`DirtyLogSource::stop`] turns logging off again, so a guest
/// that is not migrating runs without the write faults.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
}

impl KvmDirtyLog {
    /// The log of the slot `region` (as registered with `KVM_SET_USER_MEMORY_REGION`).
    pub fn new(vm: Arc<VmFd>, region: kvm_userspace_memory_region) -> Self {
        KvmDirtyLog { vm, region }
    }

    fn set_flags(&mut self, flags: u32, op: &'static str) -> Result<()> {
        let mut r = self.region;
        r.flags = flags;
        // SAFETY: the region is the one the VMM registered for this slot: its host memory is
        // mapped and stays mapped while the VM exists (the caller's contract in `new`). Only
        // the logging flag changes.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| Error::Kvm {
            op,
            slot: r.slot,
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        self.region = r;
        Ok(())
    }
}

impl fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmDirtyLog")
            .field("slot", &self.region.slot)
            .field("size", &self.region.memory_size)
            .field(
                "logging",
                &(self.region.flags & KVM_MEM_LOG_DIRTY_PAGES != 0),
            )
            .finish()
    }
}

impl DirtyLogSource for KvmDirtyLog {
    fn start(&mut self) -> Result<()> {
        let flags = self.region.flags | KVM_MEM_LOG_DIRTY_PAGES;
        self.set_flags(flags, "enable dirty logging")
    }

    fn stop(&mut self) -> Result<()> {
        let flags = self.region.flags & !KVM_MEM_LOG_DIRTY_PAGES;
        self.set_flags(flags, "disable dirty logging")
    }

    fn sync(&mut self, bitmap: &DirtyBitmap) -> Result<usize> {
        if self.region.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
            return Ok(0);
        }
        let words = self
            .vm
            .get_dirty_log(self.region.slot, self.region.memory_size as usize)
            .map_err(|e| Error::Kvm {
                op: "get dirty log",
                slot: self.region.slot,
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
        bitmap.merge_raw(0, &words)
    }
}
