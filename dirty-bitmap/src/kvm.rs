//! KVM's dirty log of guest writes (`KVM_GET_DIRTY_LOG` per memory slot), optionally
//! with manual protect (`KVM_CLEAR_DIRTY_LOG`).
//!
//! Turning logging on or off means registering the slot again with
//! `KVM_MEM_LOG_DIRTY_PAGES` added or removed. The log does that itself from the region it
//! was given ([`KvmDirtyLog::new`]), or asks the VMM that owns its slots
//! ([`KvmDirtyLog::with_slot_flags`] and [`SlotFlags`]).
//!
//! The dirty ring (`KVM_CAP_DIRTY_LOG_RING`) is the other way KVM reports writes; a VM
//! that enabled it cannot use `KVM_GET_DIRTY_LOG`. A VMM with rings implements
//! [`DirtyLogSource`] over its harvest instead: `sync` reads the rings' entries of the
//! slot, sets their pages with [`DirtyBitmap::set`], and resets the rings
//! (`KVM_RESET_DIRTY_RINGS`); `start`/`stop` toggle the slot's flag as here.

use std::fmt;
use std::io;
use std::sync::Arc;

use std::os::fd::AsRawFd;

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, kvm_clear_dirty_log,
    kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;

use crate::{DirtyBitmap, DirtyLogSource, Error, Result};

/// The pages a guest wrote in one KVM memory slot.
///
/// [`DirtyLogSource::start`] re-registers the slot with `KVM_MEM_LOG_DIRTY_PAGES`, which
/// makes KVM write-protect it and record the first write to each page; each sync fetches
/// and resets that record. [`DirtyLogSource::stop`] turns logging off again, so a guest
/// that is not migrating runs without the write faults.
///
/// With manual protect ([`KvmDirtyLog::manual_protect`]) a sync only reads the log: the
/// pages it reports stay writable, without faults, until [`DirtyLogSource::clear`]
/// re-protects them just before the migration reads them, chunk by chunk. Logging then
/// starts with every page reported and none write-protected
/// (`KVM_DIRTY_LOG_INITIALLY_SET`), so the first pass over RAM costs the guest no faults
/// on pages not yet sent.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slot: u32,
    memory_size: u64,
    /// Who turns the slot's logging flag on and off.
    flags: Box<dyn SlotFlags>,
    /// Whether logging is on (KVM then has a log to read).
    logging: bool,
    /// The block page the slot's first page is.
    first_page: usize,
    /// Manual protect: the pages syncs reported and no clear re-protected yet.
    reported: Option<Vec<u64>>,
}

/// Pages per [`DirtyLogSource::clear`] with manual protect: 64 MiB of 4 KiB pages.
pub const CLEAR_CHUNK_PAGES: usize = 1 << 14;

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<kvm_clear_dirty_log>() as libc::c_ulong) << 16)
    | (0xae << 8)
    | 0xc0;

/// What `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is enabled with.
const MANUAL_PROTECT_FLAGS: u64 =
    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;

/// Turns dirty logging on and off for one memory slot the VMM registered: the VMM
/// registers the slot again with `KVM_MEM_LOG_DIRTY_PAGES` added or removed, keeping
/// whatever else it set (read-only, guest_memfd ...). Any `FnMut(bool) -> io::Result<()>`
/// is one.
pub trait SlotFlags: Send {
    /// Registers the slot again with dirty logging `on` or off.
    ///
    /// # Errors
    /// The VMM's (KVM's) error.
    fn set_dirty_logging(&mut self, on: bool) -> io::Result<()>;
}

impl<F: FnMut(bool) -> io::Result<()> + Send> SlotFlags for F {
    fn set_dirty_logging(&mut self, on: bool) -> io::Result<()> {
        self(on)
    }
}

/// The slot registered again by the log from the region it was given.
struct ReRegister {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
}

impl SlotFlags for ReRegister {
    fn set_dirty_logging(&mut self, on: bool) -> io::Result<()> {
        let mut r = self.region;
        if on {
            r.flags |= KVM_MEM_LOG_DIRTY_PAGES;
        } else {
            r.flags &= !KVM_MEM_LOG_DIRTY_PAGES;
        }
        // SAFETY: the region is the one the VMM registered for this slot: its host memory is
        // mapped and stays mapped while the VM exists (the caller's contract in `new`). Only
        // the logging flag changes.
        unsafe { self.vm.set_user_memory_region(r) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        self.region = r;
        Ok(())
    }
}

impl KvmDirtyLog {
    /// The log of the slot `region` (as registered with `KVM_SET_USER_MEMORY_REGION`),
    /// which the log registers again itself to turn logging on and off.
    pub fn new(vm: Arc<VmFd>, region: kvm_userspace_memory_region) -> Self {
        let flags = ReRegister {
            vm: vm.clone(),
            region,
        };
        KvmDirtyLog::with_slot_flags(vm, region.slot, region.memory_size, flags)
    }

    /// The log of slot `slot` of `memory_size` bytes, which the VMM registered and
    /// registers again when `flags` asks (logging on at the migration's start, off at
    /// its end).
    pub fn with_slot_flags(
        vm: Arc<VmFd>,
        slot: u32,
        memory_size: u64,
        flags: impl SlotFlags + 'static,
    ) -> Self {
        KvmDirtyLog {
            vm,
            slot,
            memory_size,
            flags: Box::new(flags),
            logging: false,
            first_page: 0,
            reported: None,
        }
    }

    /// This log, for a slot that holds part of a RAM block: its first page is page
    /// `first_page` of the block (a multiple of 64), where syncs report its pages and
    /// clears name them. A block in several slots (RAM below and above the 4 GiB hole)
    /// merges their logs ([`MergedLog`](crate::MergedLog)).
    pub fn at_page(mut self, first_page: usize) -> Self {
        debug_assert_eq!(first_page % 64, 0);
        self.first_page = first_page;
        self
    }

    /// Whether this KVM offers manual dirty log protect with initially-set bitmaps.
    pub fn manual_protect_supported(vm: &VmFd) -> bool {
        let flags = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        flags > 0 && (flags as u64 & MANUAL_PROTECT_FLAGS) == MANUAL_PROTECT_FLAGS
    }

    /// Enables manual protect on the VM (every slot: call it before any slot logs, and
    /// make every slot's log with [`KvmDirtyLog::manual_protect`]).
    ///
    /// # Errors
    /// KVM refuses (e.g. it does not offer it: see
    /// [`KvmDirtyLog::manual_protect_supported`]).
    pub fn enable_manual_protect(vm: &VmFd) -> Result<()> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = MANUAL_PROTECT_FLAGS;
        vm.enable_cap(&cap).map_err(|e| Error::Kvm {
            op: "enable manual dirty log protect",
            slot: 0,
            source: io::Error::from_raw_os_error(e.errno()),
        })
    }

    /// This log, for a VM with manual protect enabled.
    pub fn manual_protect(mut self) -> Self {
        let pages = (self.memory_size as usize).div_ceil(4096);
        self.reported = Some(vec![0; pages.div_ceil(64)]);
        self
    }

    fn set_logging(&mut self, on: bool, op: &'static str) -> Result<()> {
        self.flags
            .set_dirty_logging(on)
            .map_err(|source| Error::Kvm {
                op,
                slot: self.slot,
                source,
            })?;
        self.logging = on;
        Ok(())
    }

    fn kvm_error(&self, op: &'static str, e: kvm_ioctls::Error) -> Error {
        Error::Kvm {
            op,
            slot: self.slot,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }
}

impl fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmDirtyLog")
            .field("slot", &self.slot)
            .field("size", &self.memory_size)
            .field("logging", &self.logging)
            .field("manual_protect", &self.reported.is_some())
            .finish()
    }
}

impl DirtyLogSource for KvmDirtyLog {
    fn start(&mut self) -> Result<()> {
        self.set_logging(true, "enable dirty logging")?;
        if let Some(r) = &mut self.reported {
            // A fresh log starts all set, nothing protected: it is all "reported".
            r.fill(!0);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        self.set_logging(false, "disable dirty logging")
    }

    fn sync(&mut self, bitmap: &DirtyBitmap) -> Result<usize> {
        if !self.logging {
            return Ok(0);
        }
        let words = self
            .vm
            .get_dirty_log(self.slot, self.memory_size as usize)
            .map_err(|e| self.kvm_error("get dirty log", e))?;
        let newly = bitmap.merge_raw(self.first_page, &words)?;
        if let Some(r) = &mut self.reported {
            for (r, w) in r.iter_mut().zip(&words) {
                *r |= w;
            }
        }
        Ok(newly)
    }

    fn clear_granularity(&self) -> Option<usize> {
        self.reported.as_ref().map(|_| CLEAR_CHUNK_PAGES)
    }

    fn clear(&mut self, first_page: usize, pages: usize) -> Result<()> {
        let Some(reported) = &mut self.reported else {
            return Ok(());
        };
        if !self.logging {
            return Ok(());
        }
        // Block pages to this slot's: the part of the range inside the slot.
        let total = reported.len() * 64;
        let end = (first_page + pages).min(self.first_page + total);
        if first_page + pages <= self.first_page || first_page >= self.first_page + total {
            return Ok(());
        }
        let first_page = first_page.max(self.first_page) - self.first_page;
        let pages = end - self.first_page - first_page;
        if first_page % 64 != 0 || first_page >= total {
            return Err(Error::OutOfRange {
                first_page,
                words: pages.div_ceil(64),
                pages: total,
            });
        }
        let words = &mut reported[first_page / 64..(first_page + pages).min(total).div_ceil(64)];
        if words.iter().all(|&w| w == 0) {
            return Ok(());
        }
        // KVM wants a multiple of 64 pages, or the range up to the slot's end.
        let slot_pages = (self.memory_size as usize).div_ceil(4096);
        let num_pages = (words.len() * 64).min(slot_pages - first_page);
        let mut arg = kvm_clear_dirty_log {
            slot: self.slot,
            num_pages: num_pages as u32,
            first_page: first_page as u64,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = words.as_mut_ptr().cast();
        // SAFETY: the VM fd is valid; `arg` names this log's slot and a range inside it,
        // with a bitmap of at least `num_pages` bits that lives across the call (KVM only
        // reads it).
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
        if ret != 0 {
            return Err(Error::Kvm {
                op: "clear dirty log",
                slot: self.slot,
                source: io::Error::last_os_error(),
            });
        }
        words.fill(0);
        Ok(())
    }
}
