//! The software backend, for machines without /dev/kvm: the built-in guest's workload run
//! by a host thread on the same guest memory. Its writes go through vm-memory, whose dirty
//! bitmap is the block's dirty log, so every migration path runs as with KVM. Its
//! "vCPU state" is the workload's progress, migrated as the `"soft-cpu"` section.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use dirty_bitmap::{DirtyLogSource, MergedLog, VmmWriteLog};
use savevm::{DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo, VmState};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::Bus;
use crate::cpus::Cpus;
use crate::guest::{self, GuestParams, LOAD_ADDR, Workload};
use crate::memory::{GuestRam, MemoryBackend};
use crate::serial::COM1;
use crate::throttle::Throttle;

const PAGE: u64 = 4096;
/// Where the built-in guest keeps its disk request block and buffer (guest.S).
const DISK_REQ: u64 = 0x8800;
const DISK_BUF: u64 = 0x9000;

/// Guest RAM for the software backend: only the VMM's own writes exist.
///
/// # Errors
/// As [`GuestRam::new`].
pub fn ram(size: u64, backend: MemoryBackend, prefault: bool) -> Result<GuestRam> {
    GuestRam::new(size, backend, prefault, |slots| {
        Ok(Box::new(MergedLog(
            slots
                .iter()
                .map(|s| {
                    Box::new(VmmWriteLog::new(s.region.clone()).at_page(s.first_page))
                        as Box<dyn DirtyLogSource>
                })
                .collect(),
        )))
    })
}

/// Where the workload stands; what migrates (section `"soft-cpu"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, VmState)]
#[vmstate(name = "soft-cpu")]
pub struct SoftState {
    /// 0: not started, 1: working, 2: halted.
    pub phase: u8,
    /// The pass in progress (dirty) or 0.
    pub pass: u64,
    /// Next page of the range to write.
    pub next_page: u64,
    /// A stale page was found in this pass.
    #[vmstate(rename = "bad_pass")]
    pub bad: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Quit,
}

struct Ctl {
    want: Want,
    parked: bool,
    exited: bool,
    /// The state as of the last park.
    state: SoftState,
    /// A loaded state to continue from.
    load: Option<SoftState>,
}

struct Shared {
    // Lock: control state; the thread parks on `cond`, requesters wait on it.
    ctl: Mutex<Ctl>,
    cond: Condvar,
    /// Fast check, per page, of whether the thread may go on.
    run: AtomicBool,
    /// A throttle's sleep in nanoseconds (0: none), taken before the next page.
    nap_ns: AtomicU64,
    /// The thread's host id (0 until it started).
    tid: AtomicI32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The software "vCPU".
pub struct SoftBackend {
    /// Declared first: its thread ends before the worker does.
    throttle: Throttle,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pending: Arc<Mutex<Option<SoftState>>>,
}

impl SoftBackend {
    /// Starts the workload thread, parked.
    pub fn new(ram: &GuestRam, bus: Arc<Bus>) -> Self {
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                parked: false,
                exited: false,
                state: SoftState::default(),
                load: None,
            }),
            cond: Condvar::new(),
            run: AtomicBool::new(false),
            nap_ns: AtomicU64::new(0),
            tid: AtomicI32::new(0),
        });
        let s = shared.clone();
        let mem = ram.mem.clone();
        let mem_size = ram.size();
        let thread = std::thread::Builder::new()
            .name("soft-cpu".into())
            .spawn(move || Worker::new(mem, mem_size, bus, s).run())
            .expect("spawning the software vCPU thread");
        let naps = shared.clone();
        let throttle = Throttle::new(move |d| {
            let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
            naps.nap_ns.store(ns, Ordering::Release);
        })
        .expect("spawning the throttle thread");
        SoftBackend {
            throttle,
            shared,
            thread: Some(thread),
            pending: Arc::new(Mutex::new(None)),
        }
    }
}

impl Drop for SoftBackend {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Quit;
        self.shared.run.store(false, Ordering::SeqCst);
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cpus for SoftBackend {
    fn name(&self) -> &'static str {
        "soft"
    }

    fn thread_ids(&self) -> Vec<i32> {
        vec![self.shared.tid.load(Ordering::Relaxed)]
    }

    fn resume(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Pause {
            c.want = Want::Run;
            self.shared.run.store(true, Ordering::SeqCst);
        }
        drop(c);
        self.shared.cond.notify_all();
    }

    fn pause(&self) -> Result<()> {
        let mut c = self.shared.lock();
        if c.want == Want::Run {
            c.want = Want::Pause;
        }
        self.shared.run.store(false, Ordering::SeqCst);
        self.shared.cond.notify_all();
        while !c.parked && !c.exited {
            c = self.shared.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    fn fault(&self) -> Option<String> {
        None
    }

    fn set_throttle(&self, percent: u8) {
        self.throttle.set(percent);
    }

    fn throttle(&self) -> u8 {
        self.throttle.percent()
    }

    fn register_sections(&self, savevm: &mut SaveVm) -> Result<()> {
        savevm.register_device(
            SectionInfo::for_state::<SoftState>("soft-cpu", 0),
            Box::new(SoftSection {
                shared: self.shared.clone(),
                pending: self.pending.clone(),
            }),
        )?;
        Ok(())
    }

    fn apply_loaded(&self) -> Result<()> {
        let st = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(st) = st {
            self.shared.lock().load = Some(st);
        }
        Ok(())
    }
}

/// `"soft-cpu"`: the workload's progress.
struct SoftSection {
    shared: Arc<Shared>,
    pending: Arc<Mutex<Option<SoftState>>>,
}

impl DeviceHandler for SoftSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let c = self.shared.lock();
        if !c.parked {
            return Err("the software vCPU is not stopped".into());
        }
        w.state(&c.state);
        Ok(())
    }

    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let mut st = SoftState::default();
        r.state(&mut st, version)?;
        if st.phase > 2 {
            return Err(format!("phase {} does not exist", st.phase).into());
        }
        if st.phase == 1 && st.pass == 0 {
            return Err("a running workload is in pass 0, which does not exist".into());
        }
        // next_page is checked against the range once the parameters are read from the
        // loaded memory (Worker::read_params).
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(st);
        Ok(())
    }
}

struct Worker {
    mem: GuestMemoryMmap<AtomicBitmap>,
    mem_size: u64,
    bus: Arc<Bus>,
    shared: Arc<Shared>,
    st: SoftState,
    params: Option<GuestParams>,
    deadline: Instant,
}

impl Worker {
    fn new(
        mem: GuestMemoryMmap<AtomicBitmap>,
        mem_size: u64,
        bus: Arc<Bus>,
        shared: Arc<Shared>,
    ) -> Self {
        Worker {
            mem,
            mem_size,
            bus,
            shared,
            st: SoftState::default(),
            params: None,
            deadline: Instant::now(),
        }
    }

    fn putc(&self, c: u8) {
        self.bus.io_out(COM1, &[c]);
    }

    fn read_params(&mut self) {
        let mut image = [0u8; 512];
        let _ = self.mem.read_slice(&mut image, GuestAddress(LOAD_ADDR));
        self.params = GuestParams::read(&image);
    }

    /// Parks until allowed to run; false when the thread must end.
    fn park(&mut self) -> bool {
        let mut c = self.shared.lock();
        c.state = self.st;
        loop {
            match c.want {
                Want::Quit => {
                    c.exited = true;
                    self.shared.cond.notify_all();
                    return false;
                }
                Want::Run if self.st.phase != 2 || c.load.is_some() => {
                    if let Some(st) = c.load.take() {
                        self.st = st;
                        c.state = st;
                        drop(c);
                        self.read_params();
                        c = self.shared.lock();
                    }
                    c.parked = false;
                    self.deadline = Instant::now();
                    self.shared.cond.notify_all();
                    return true;
                }
                _ => {}
            }
            if !c.parked {
                c.parked = true;
                self.shared.cond.notify_all();
            }
            c = self.shared.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The throttle's sleep, cut short by a pause or quit.
    fn nap(&self) {
        let ns = self.shared.nap_ns.swap(0, Ordering::Acquire);
        let c = self.shared.lock();
        drop(crate::throttle::nap(
            &self.shared.cond,
            c,
            Duration::from_nanos(ns),
            |c| c.want == Want::Run,
        ));
    }

    fn run(mut self) {
        // SAFETY: gettid has no preconditions.
        self.shared
            .tid
            .store(unsafe { libc::gettid() }, Ordering::Relaxed);
        // However the worker ends, a thread waiting for it to park must not wait forever.
        struct Exited(Arc<Shared>);
        impl Drop for Exited {
            fn drop(&mut self) {
                self.0.lock().exited = true;
                self.0.cond.notify_all();
            }
        }
        let _exited = Exited(self.shared.clone());
        loop {
            if (!self.shared.run.load(Ordering::Acquire) || self.st.phase == 2) && !self.park() {
                return;
            }
            if self.shared.nap_ns.load(Ordering::Relaxed) != 0 {
                self.nap();
            }
            self.step();
        }
    }

    /// Units (pages or disk blocks) of the workload, or None when the parameters or the
    /// progress make no sense (memory from a stream could say anything): the guest halts.
    fn units(&self, p: &GuestParams) -> Option<u64> {
        let units = match p.workload {
            Workload::Disk => p.disk_blocks,
            Workload::Mixed => (p.range_size / PAGE).saturating_add(p.disk_blocks),
            _ => p.range_size / PAGE,
        };
        let range_ok = p.workload == Workload::Disk
            || p.range_start
                .checked_add(p.range_size)
                .is_some_and(|end| p.range_start >= guest::MIN_RANGE_START && end <= self.mem_size);
        (range_ok && units > 0 && self.st.next_page < units && self.st.pass >= 1).then_some(units)
    }

    /// One unit of work: a page (dirty), a disk block (disk), a MiB (fill), or the boot.
    fn step(&mut self) {
        if self.st.phase == 0 {
            self.read_params();
            self.putc(b'S');
            self.st.phase = 1;
            self.st.pass = self
                .mem
                .read_obj::<u64>(GuestAddress(guest::PASS_ADDR))
                .unwrap_or(0)
                .saturating_add(1);
            return;
        }
        let Some(p) = self.params else {
            self.st.phase = 2;
            return;
        };
        if p.workload == Workload::Idle {
            self.st.phase = 2;
            return;
        }
        let Some(units) = self.units(&p) else {
            self.putc(b'?');
            self.st.phase = 2;
            return;
        };
        match p.workload {
            Workload::Idle => {}
            Workload::Fill => {
                let chunk = 256.min(units - self.st.next_page);
                let page = [0xa5; PAGE as usize];
                for i in self.st.next_page..self.st.next_page + chunk {
                    let _ = self.mem.write_slice(&page, GuestAddress(p.page_address(i)));
                }
                self.st.next_page += chunk;
                if self.st.next_page >= units {
                    self.putc(b'F');
                    self.st.phase = 2;
                }
            }
            Workload::Dirty => {
                self.dirty_page(&p, self.st.next_page);
                self.advance(&p, units);
            }
            Workload::Disk => {
                self.disk_block(self.st.next_page);
                self.advance(&p, units);
            }
            Workload::Mixed => {
                // The range's pages, then the disk's blocks, in one pass.
                let pages = p.range_size / PAGE;
                match self.st.next_page.checked_sub(pages) {
                    None => self.dirty_page(&p, self.st.next_page),
                    Some(block) => self.disk_block(block),
                }
                self.advance(&p, units);
            }
        }
    }

    /// As the guest does: checks that page `i` of the range holds the previous pass, then
    /// writes this one.
    fn dirty_page(&mut self, p: &GuestParams, i: u64) {
        let addr = GuestAddress(p.page_address(i));
        let old = self.mem.read_obj::<u64>(addr).unwrap_or(0);
        if old != self.st.pass - 1 {
            self.mismatch();
        }
        let _ = self.mem.write_obj(self.st.pass, addr);
    }

    /// As the guest does: from pass 2 on reads disk block `block` back and checks it holds
    /// the previous pass's pattern, then writes this pass's.
    fn disk_block(&mut self, block: u64) {
        let pattern = |pass: u64| (block << 32 | (pass & 0xffff_ffff)).to_le_bytes();
        if self.st.pass > 1 {
            let ok = self.disk_request(crate::disk::CMD_READ, block);
            let mut first = [0u8; 8];
            let mut last = [0u8; 8];
            let _ = self.mem.read_slice(&mut first, GuestAddress(DISK_BUF));
            let _ = self
                .mem
                .read_slice(&mut last, GuestAddress(DISK_BUF + PAGE - 8));
            let want = pattern(self.st.pass - 1);
            if ok && (first != want || last != want) {
                self.mismatch();
            }
        }
        let word = pattern(self.st.pass);
        let buf: Vec<u8> = word.iter().copied().cycle().take(PAGE as usize).collect();
        let _ = self.mem.write_slice(&buf, GuestAddress(DISK_BUF));
        self.disk_request(crate::disk::CMD_WRITE, block);
    }

    /// Writes the request block for 4 KiB block `block` through the buffer and rings the
    /// doorbell; a request not done counts as a mismatch (false).
    fn disk_request(&mut self, cmd: u32, block: u64) -> bool {
        let mut req = [0u8; 32];
        req[0..4].copy_from_slice(&cmd.to_le_bytes());
        req[8..16].copy_from_slice(&(block * 8).to_le_bytes());
        req[16..20].copy_from_slice(&8u32.to_le_bytes());
        req[24..32].copy_from_slice(&DISK_BUF.to_le_bytes());
        let _ = self.mem.write_slice(&req, GuestAddress(DISK_REQ));
        self.bus
            .io_out(guest::DISK_PORT, &(DISK_REQ as u32).to_le_bytes());
        let status = self
            .mem
            .read_obj::<u32>(GuestAddress(DISK_REQ + 4))
            .unwrap_or(0);
        if status != crate::disk::STATUS_DONE {
            self.mismatch();
            return false;
        }
        true
    }

    fn mismatch(&mut self) {
        let a = GuestAddress(guest::MISMATCH_ADDR);
        let n = self.mem.read_obj::<u64>(a).unwrap_or(0);
        let _ = self.mem.write_obj(n + 1, a);
        self.st.bad = true;
    }

    /// Paces, moves to the next unit, and ends the pass after the last one.
    fn advance(&mut self, p: &GuestParams, units: u64) {
        self.st.next_page += 1;
        if p.rate > 0 {
            self.deadline += Duration::from_secs_f64(1.0 / f64::from(p.rate));
            let now = Instant::now();
            if self.deadline > now + Duration::from_millis(1) {
                std::thread::sleep(self.deadline - now);
            } else if now > self.deadline + Duration::from_millis(10) {
                // Far behind (after a stop): do not catch up in a burst.
                self.deadline = now;
            }
        }
        if self.st.next_page >= units {
            let _ = self
                .mem
                .write_obj(self.st.pass, GuestAddress(guest::PASS_ADDR));
            let letter = if self.st.bad {
                b'!'
            } else {
                b'A' + (self.st.pass & 15) as u8
            };
            self.putc(letter);
            self.st.pass += 1;
            self.st.next_page = 0;
            self.st.bad = false;
        }
    }
}
