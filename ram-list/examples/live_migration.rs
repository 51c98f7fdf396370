//! A live migration between two threads, as another VMM would wire it: guest memory of
//! two regions written by a "vCPU" thread while it migrates, the VMM's own `VmControl`,
//! and the destination side, which loads the stream and answers on the same connection.
//!
//! ```text
//! cargo run -p ram-list --example live_migration
//! ```

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dirty_bitmap::VmmWriteLog;
use qemu_file::{QemuFile, UnixTransport};
use ram_list::{RamList, RamSection, RamStats};
use savevm::{
    MigrationControl, MigrationParams, SaveVm, SectionError, VmControl, return_path, run_migration,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Where the guest lives: 32 MiB below the hole, 8 MiB above it.
const LAYOUT: [(GuestAddress, usize); 2] = [
    (GuestAddress(0), 32 << 20),
    (GuestAddress(4 << 30), 8 << 20),
];

/// The source VM as the migration thread sees it.
struct Vm {
    /// The VMM's lock around device emulation (held for short moments by the migration).
    lock: Mutex<()>,
    /// Held by the vCPU while it runs an instruction; taken to know it stopped.
    vcpu: Mutex<()>,
    stopped: AtomicBool,
}

impl VmControl for Vm {
    type Guard<'a> = MutexGuard<'a, ()>;

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap()
    }
    fn stop_vcpus(&self) -> Result<(), SectionError> {
        self.stopped.store(true, Ordering::SeqCst);
        // Whatever the vCPU was doing is done once its lock is free.
        drop(self.vcpu.lock().unwrap());
        Ok(())
    }
    fn resume_vcpus(&self) -> Result<(), SectionError> {
        self.stopped.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// The guest: writes a counter into page after page of both regions, for ever. Writes go
/// through vm-memory, whose bitmaps are the dirty log here (KVM's would add to them).
fn run_guest(mem: Memory, vm: Arc<Vm>, quit: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let pages: Vec<u64> = LAYOUT
        .iter()
        .flat_map(|(at, len)| (0..*len as u64 / 4096).map(move |p| at.0 + p * 4096))
        .collect();
    for n in 0u64.. {
        if quit.load(Ordering::SeqCst) {
            return;
        }
        let _running = vm.vcpu.lock().unwrap();
        if vm.stopped.load(Ordering::SeqCst) {
            drop(_running);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let at = pages[(n.wrapping_mul(7919) % pages.len() as u64) as usize];
        mem.write_obj(n, GuestAddress(at)).unwrap();
        writes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The sections of a VM with memory `mem`: one RAM block per region, each with the
/// vm-memory log of its region.
fn sections(mem: &Memory) -> SaveVm {
    let list = RamList::from_guest_memory(mem, |i, _| {
        Box::new(VmmWriteLog::for_region(mem, i).expect("the region exists"))
    })
    .expect("RAM blocks");
    let mut savevm = SaveVm::new("example-vmm");
    savevm
        .register_live(
            RamSection::info(),
            Box::new(RamSection::new(
                Arc::new(list),
                Arc::new(RamStats::default()),
            )),
        )
        .expect("one RAM section");
    savevm
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (a, b) = UnixStream::pair()?;

    // The destination: a VM of the same layout, never run, loading what arrives and
    // saying so on the same connection (the source waits for that answer).
    let destination = std::thread::spawn(move || -> Result<Memory, String> {
        let mem = Memory::from_ranges(&LAYOUT).map_err(|e| e.to_string())?;
        let mut f = QemuFile::new(Box::new(UnixTransport::new(b, "unix:source".into())));
        let loaded = sections(&mem).load(&mut f);
        return_path::send_load_result(&mut f, loaded.is_ok()).map_err(|e| e.to_string())?;
        loaded.map_err(|e| e.to_string())?;
        Ok(mem)
    });

    // The source, its guest running.
    let mem = Memory::from_ranges(&LAYOUT)?;
    let vm = Arc::new(Vm {
        lock: Mutex::new(()),
        vcpu: Mutex::new(()),
        stopped: AtomicBool::new(false),
    });
    let (quit, writes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let guest = {
        let (mem, vm, quit, writes) = (mem.clone(), vm.clone(), quit.clone(), writes.clone());
        std::thread::spawn(move || run_guest(mem, vm, quit, writes))
    };
    std::thread::sleep(Duration::from_millis(50));

    let ctl = MigrationControl::new(MigrationParams {
        downtime_limit: Duration::from_millis(30),
        return_path: true,
        ..MigrationParams::default()
    });
    let mut f = QemuFile::new(Box::new(UnixTransport::new(a, "unix:destination".into())));
    let info = run_migration(&mut sections(&mem), &mut f, &*vm, &ctl)?;
    let at_switchover = writes.load(Ordering::SeqCst);
    quit.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let arrived = destination.join().unwrap()?;

    // The guest was stopped at the switchover (and stays so: it runs at the destination
    // now), so both memories must be equal.
    for (at, len) in LAYOUT {
        let (mut here, mut there) = (vec![0u8; len], vec![0u8; len]);
        mem.read_slice(&mut here, at)?;
        arrived.read_slice(&mut there, at)?;
        assert!(here == there, "region at {:#x} differs", at.0);
    }
    println!(
        "{:?} in {:?} with {} bytes while the guest made {} writes; downtime {:?}; memory equal",
        info.status,
        info.total_time,
        info.transferred,
        at_switchover,
        info.completion.map(|c| c.total).unwrap_or_default()
    );
    Ok(())
}
