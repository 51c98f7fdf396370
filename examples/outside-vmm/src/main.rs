//! A VMM of its own on the crates, as a user would write it: guest memory of two regions, a
//! device declared with `#[derive(VmState)]`, a `VmControl`, a guest writing while it migrates.
//! Snapshot and restore; live migration between two threads, and over TCP to a second process.
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirty_bitmap::{DirtyLogSource, VmmWriteLog};
use qemu_file::{Listener, MemBuffer, MigrationUri, QemuFile, Transport, UnixTransport, connect};
use ram_list::{RamList, RamSection};
use savevm::{MigrationControl, MigrationParams, SaveVm, SectionError, SectionInfo, VmControl};
use savevm::{VmState, return_path, run_migration};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(VmState, Default, Debug, Clone, PartialEq, Hash)]
#[vmstate(name = "timer")]
struct Timer {
    ticks: u64,
    armed: bool,
    history: Vec<u32>,
}

#[derive(Default)]
struct Vm {
    mem: GuestMemoryMmap<AtomicBitmap>,
    timer: Arc<Mutex<Timer>>,
    /// Held by the guest while it writes; taken to know it stopped.
    vcpu: Mutex<()>,
    stopped: AtomicBool,
}

impl Vm {
    fn new() -> Arc<Vm> {
        let ranges = [(GuestAddress(0), 16 << 20), (GuestAddress(4 << 30), 4 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
        Arc::new(Vm { mem, ..Vm::default() })
    }

    /// One RAM block per region, logged by vm-memory's bitmaps; the timer as it is.
    fn sections(&self) -> SaveVm {
        let log = |i, _: &_| -> Box<dyn DirtyLogSource> {
            Box::new(VmmWriteLog::for_region(&self.mem, i).expect("region"))
        };
        let ram = RamList::from_guest_memory(&self.mem, log).expect("RAM blocks");
        let mut s = SaveVm::new("outside-vmm");
        let ram = RamSection::new(Arc::new(ram), Arc::default());
        s.register_live(RamSection::info(), Box::new(ram)).unwrap();
        let timer = SectionInfo::for_state::<Timer>("timer", 0);
        s.register_device(timer, Box::new(self.timer.clone())).unwrap();
        s
    }

    /// A hash of the memory and the device.
    fn hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for r in self.mem.iter() {
            let mut buf = vec![0u8; r.len() as usize];
            self.mem.read_slice(&mut buf, r.start_addr()).unwrap();
            buf.hash(&mut h);
        }
        self.timer.lock().unwrap().hash(&mut h);
        h.finish()
    }

    /// The guest: a counter into page after page of both regions, 32 a millisecond.
    fn run_guest(self: Arc<Self>) {
        for n in 0u64.. {
            std::thread::sleep(Duration::from_millis((n % 32 == 0).into()));
            let _running = self.vcpu.lock().unwrap();
            if self.stopped.load(SeqCst) {
                return;
            }
            let r = self.mem.iter().nth(n as usize % 2).unwrap();
            let at = r.start_addr().0 + n * 7919 % (r.len() / 4096) * 4096;
            self.mem.write_obj(n, GuestAddress(at)).unwrap();
            self.timer.lock().unwrap().ticks = n;
        }
    }
}

impl VmControl for Vm {
    fn stop_vcpus(&self) -> Result<(), SectionError> {
        self.stopped.store(true, SeqCst);
        drop(self.vcpu.lock().unwrap());
        Ok(())
    }
    fn resume_vcpus(&self) -> Result<(), SectionError> {
        Err("this example never resumes a guest".into())
    }
}

/// Loads a migration from `t` into a new VM, answers on the same stream, returns its hash.
fn destination(t: Box<dyn Transport>) -> Result<u64, Error> {
    let (vm, mut f) = (Vm::new(), QemuFile::new(t));
    let loaded = vm.sections().load(&mut f);
    return_path::send_load_result(&mut f, loaded.is_ok())?;
    loaded?;
    Ok(vm.hash())
}

/// Migrates a running guest over `t`; returns the source's hash at the switchover.
fn source(what: &str, t: Box<dyn Transport>) -> Result<u64, Error> {
    let vm = Vm::new();
    let g = vm.clone();
    let guest = std::thread::spawn(move || g.run_guest());
    let mut params = MigrationParams::default();
    (params.downtime_limit, params.return_path) = (Duration::from_millis(30), true);
    let ctl = MigrationControl::new(params);
    let info = run_migration(&mut vm.sections(), &mut QemuFile::new(t), &*vm, &ctl)?;
    guest.join().unwrap();
    println!("{what}: {:?} in {:?}, {} bytes", info.status, info.total_time, info.transferred);
    Ok(vm.hash())
}

fn main() -> Result<(), Error> {
    if std::env::args().nth(1).as_deref() == Some("destination") {
        let listener = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0")?)?;
        println!("{}", listener.local_uri());
        println!("{:x}", destination(listener.accept()?)?);
        return Ok(());
    }
    let (vm, file) = (Vm::new(), MemBuffer::new());
    vm.mem.write_slice(b"above the hole", GuestAddress((4 << 30) + 4096))?;
    *vm.timer.lock().unwrap() = Timer { ticks: 42, armed: true, history: vec![7, 11] };
    vm.sections().save_snapshot(&mut file.file())?;
    let back = Vm::new();
    back.sections().load(&mut QemuFile::from_bytes(file.contents()))?;
    assert_eq!(back.hash(), vm.hash(), "the restored VM differs");
    println!("snapshot: {} bytes, restored with memory and timer as saved", file.contents().len());

    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    let dest = std::thread::spawn(|| destination(Box::new(UnixTransport::new(b, "unix:s".into()))));
    let ours = source("between threads", Box::new(UnixTransport::new(a, "unix:dest".into())))?;
    assert_eq!(dest.join().unwrap()?, ours, "the destination's VM differs");

    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe).arg("destination").stdout(Stdio::piped()).spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let uri = MigrationUri::parse(&lines.next().ok_or("no address")??)?;
    let ours = source("over TCP to another process", connect(&uri)?)?;
    let theirs = lines.next().ok_or("the destination printed no hash")??;
    assert!(child.wait()?.success() && theirs == format!("{ours:x}"), "the VMs differ");
    Ok(())
}
