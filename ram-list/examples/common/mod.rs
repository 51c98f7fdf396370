//! What the migration examples share: a VM of two memory regions, its `VmControl`, its
//! "vCPU" (a thread writing counters into its pages) and its sections.
// Each example uses part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirty_bitmap::VmmWriteLog;
use ram_list::{PostcopyIncoming, RamList, RamSection, RamStats};
use savevm::{SaveVm, SectionError, VmControl};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Where the guest lives: 32 MiB below the hole, 8 MiB above it.
pub const LAYOUT: [(GuestAddress, usize); 2] = [
    (GuestAddress(0), 32 << 20),
    (GuestAddress(4 << 30), 8 << 20),
];

/// The source VM as the migration thread sees it (no device emulation here, so no VM
/// lock: `VmControl::lock` keeps its default).
pub struct Vm {
    /// Held by the vCPU while it runs an instruction; taken to know it stopped.
    pub vcpu: Mutex<()>,
    pub stopped: AtomicBool,
}

impl VmControl for Vm {
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

/// How many writes the guest makes between two 1 ms naps: at most 64k pages a second
/// (256 MB/s dirtied), like a busy guest rather than a thread spinning as fast as the
/// host's memory goes, so the migration converges on any machine with the 30 ms limit.
const WRITES_PER_MS: u64 = 64;

/// The guest: writes a counter into page after page of both regions, for ever. Writes go
/// through vm-memory, whose bitmaps are the dirty log here (KVM's would add to them).
pub fn run_guest(mem: Memory, vm: Arc<Vm>, quit: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let pages: Vec<u64> = LAYOUT
        .iter()
        .flat_map(|(at, len)| (0..*len as u64 / 4096).map(move |p| at.0 + p * 4096))
        .collect();
    for n in 0u64.. {
        if quit.load(Ordering::SeqCst) {
            return;
        }
        if n % WRITES_PER_MS == 0 {
            std::thread::sleep(Duration::from_millis(1));
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
pub fn sections(mem: &Memory) -> SaveVm {
    sections_with(mem, None)
}

/// The same, with the `postcopy-ram` capability when `postcopy` is given (a
/// destination's post-copy state; a source's is unused).
pub fn sections_with(mem: &Memory, postcopy: Option<Arc<PostcopyIncoming>>) -> SaveVm {
    let list = RamList::from_guest_memory(mem, |i, _| {
        Box::new(VmmWriteLog::for_region(mem, i).expect("the region exists"))
    })
    .expect("RAM blocks");
    let mut ram = RamSection::new(Arc::new(list), Arc::new(RamStats::default()));
    if let Some(incoming) = postcopy {
        ram = ram.with_postcopy(incoming);
    }
    let mut savevm = SaveVm::new("example-vmm");
    savevm
        .register_live(RamSection::info(), Box::new(ram))
        .expect("one RAM section");
    savevm
}

/// A running guest: its VM, and what stops its thread.
pub struct Running {
    /// The VM the migration drives.
    pub vm: Arc<Vm>,
    quit: Arc<AtomicBool>,
    /// Writes so far.
    pub writes: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the guest on `mem`.
pub fn start_guest(mem: &Memory) -> Running {
    let vm = Arc::new(Vm {
        vcpu: Mutex::new(()),
        stopped: AtomicBool::new(false),
    });
    let (quit, writes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let thread = {
        let (mem, vm, quit, writes) = (mem.clone(), vm.clone(), quit.clone(), writes.clone());
        std::thread::spawn(move || run_guest(mem, vm, quit, writes))
    };
    std::thread::sleep(Duration::from_millis(50));
    Running {
        vm,
        quit,
        writes,
        thread,
    }
}

impl Running {
    /// Ends the guest's thread.
    pub fn end(self) {
        self.quit.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

/// A hash of all of `mem`, region by region.
pub fn hash(mem: &Memory) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (at, len) in LAYOUT {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, at).unwrap();
        for w in buf.chunks_exact(8) {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}
