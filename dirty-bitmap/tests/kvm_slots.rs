//! `KvmDirtyLog` on a slot the VMM registered: the log asks the VMM to turn logging on
//! and off, and reads KVM's log only while it is on. Needs /dev/kvm (skipped without).
#![cfg(feature = "kvm")]

use std::io;
use std::sync::{Arc, Mutex};

use dirty_bitmap::{DirtyBitmap, DirtyLogSource, KvmDirtyLog};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

const PAGES: usize = 64;

/// Host memory for a slot, page-aligned.
struct HostMemory(Vec<u8>);

impl HostMemory {
    fn addr(&self) -> u64 {
        (self.0.as_ptr() as u64).next_multiple_of(4096)
    }
}

/// A VM with one slot of `PAGES` pages, registered by "the VMM" (this test); None
/// without KVM. The memory is returned first so that it is dropped after the VM.
fn vm_with_slot() -> Option<(HostMemory, Arc<VmFd>, kvm_userspace_memory_region)> {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("SKIPPED: no /dev/kvm");
        return None;
    };
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    let mem = HostMemory(vec![0u8; (PAGES + 1) * 4096]);
    let region = kvm_userspace_memory_region {
        slot: 3,
        flags: 0,
        guest_phys_addr: 0x10_0000,
        memory_size: (PAGES * 4096) as u64,
        userspace_addr: mem.addr(),
    };
    // SAFETY: the memory outlives the VM (dropped after it, see above).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    Some((mem, vm, region))
}

#[test]
fn the_vmm_turns_logging_on_and_off_for_its_own_slot() {
    let Some((_mem, vm, region)) = vm_with_slot() else {
        return;
    };
    let calls = Arc::new(Mutex::new(Vec::new()));
    let flags = {
        let (vm, calls) = (vm.clone(), calls.clone());
        move |on: bool| -> io::Result<()> {
            calls.lock().unwrap().push(on);
            let mut r = region;
            r.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the slot's memory outlives the VM.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        }
    };
    let mut log = KvmDirtyLog::with_slot_flags(vm.clone(), region.slot, region.memory_size, flags);
    let bitmap = DirtyBitmap::new(PAGES);
    assert_eq!(
        log.sync(&bitmap).unwrap(),
        0,
        "not logging: nothing to read"
    );
    log.start().unwrap();
    // KVM has a log for the slot now (KVM_GET_DIRTY_LOG fails on a slot without one).
    assert_eq!(log.sync(&bitmap).unwrap(), 0, "no guest ran: nothing dirty");
    log.stop().unwrap();
    assert_eq!(*calls.lock().unwrap(), [true, false]);
    assert!(
        vm.get_dirty_log(region.slot, PAGES * 4096).is_err(),
        "logging is off again"
    );
}

#[test]
fn a_vmm_that_cannot_turn_logging_on_fails_the_start_naming_the_slot() {
    let Some((_mem, vm, region)) = vm_with_slot() else {
        return;
    };
    let refuse = |_on: bool| -> io::Result<()> { Err(io::Error::other("slot is busy")) };
    let mut log = KvmDirtyLog::with_slot_flags(vm, region.slot, region.memory_size, refuse);
    let e = log.start().unwrap_err();
    assert!(e.to_string().contains("memory slot 3"), "{e}");
    assert_eq!(
        log.sync(&DirtyBitmap::new(PAGES)).unwrap(),
        0,
        "never logging"
    );
}
