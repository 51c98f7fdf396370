//! Test doubles: a live section over a small word-addressed memory that a fake guest
//! dirties, a device, and a fake VM with a VM lock and stoppable vCPUs.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use qemu_file::QemuFile;
use savevm::format::SectionType;
use savevm::{
    DeviceHandler, DumpSink, FieldReader, FieldWriter, SectionError, SectionHandler, SectionWalker,
    VmControl, VmLock,
};

/// Record layout of the "words" section: `be64 index | be64 value`, ended by `be64 !0`;
/// START carries `be64 WORDS_COUNT | count` first.
pub const WORDS_EOS: u64 = u64::MAX;
/// Flag of the START's count record.
pub const WORDS_COUNT: u64 = 1 << 63;

/// A memory of u64 words with one dirty flag per word.
#[derive(Debug)]
pub struct Words {
    pub data: Vec<AtomicU64>,
    pub dirty: Vec<AtomicBool>,
}

impl Words {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Words {
            data: (0..n).map(|i| AtomicU64::new(i as u64 * 3)).collect(),
            dirty: (0..n).map(|_| AtomicBool::new(false)).collect(),
        })
    }
    pub fn write(&self, i: usize, v: u64) {
        self.data[i].store(v, Ordering::SeqCst);
        self.dirty[i].store(true, Ordering::SeqCst);
    }
    pub fn snapshot(&self) -> Vec<u64> {
        self.data.iter().map(|w| w.load(Ordering::SeqCst)).collect()
    }
}

/// The live section over [`Words`]. `synced` holds what the last sync saw dirty.
pub struct WordsSection {
    pub mem: Arc<Words>,
    pub synced: Vec<bool>,
    pub next: usize,
    pub cleanups: Arc<AtomicU32>,
    pub syncs: u32,
}

impl WordsSection {
    pub fn new(mem: Arc<Words>) -> Self {
        let n = mem.data.len();
        WordsSection {
            mem,
            synced: vec![false; n],
            next: 0,
            cleanups: Arc::new(AtomicU32::new(0)),
            syncs: 0,
        }
    }
    fn dirty_count(&self) -> u64 {
        self.synced.iter().filter(|d| **d).count() as u64
    }
    fn send_dirty(&mut self, f: &mut QemuFile, limit: bool) -> bool {
        let n = self.synced.len();
        for _ in 0..n {
            let i = self.next;
            self.next = (self.next + 1) % n;
            if self.synced[i] {
                self.synced[i] = false;
                f.put_be64(i as u64);
                f.put_be64(self.mem.data[i].load(Ordering::SeqCst));
                if limit && f.budget_exhausted() {
                    f.put_be64(WORDS_EOS);
                    return self.dirty_count() == 0;
                }
            }
        }
        f.put_be64(WORDS_EOS);
        true
    }
}

impl SectionHandler for WordsSection {
    fn setup(&mut self, f: &mut QemuFile) -> Result<(), SectionError> {
        f.put_be64(WORDS_COUNT | self.synced.len() as u64);
        self.synced.iter_mut().for_each(|d| *d = true);
        for d in &self.mem.dirty {
            d.store(false, Ordering::SeqCst);
        }
        f.put_be64(WORDS_EOS);
        Ok(())
    }
    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool, SectionError> {
        Ok(self.send_dirty(f, true))
    }
    fn pending_estimate(&self) -> u64 {
        self.dirty_count() * 16
    }
    fn pending_exact(&mut self) -> Result<u64, SectionError> {
        self.syncs += 1;
        for (i, d) in self.mem.dirty.iter().enumerate() {
            if d.swap(false, Ordering::SeqCst) {
                self.synced[i] = true;
            }
        }
        Ok(self.pending_estimate())
    }
    fn complete(&mut self, f: &mut QemuFile) -> Result<(), SectionError> {
        self.send_dirty(f, false);
        Ok(())
    }
    fn cleanup(&mut self) {
        self.cleanups.fetch_add(1, Ordering::SeqCst);
    }
    fn load(&mut self, f: &mut QemuFile, _version: u32) -> Result<(), SectionError> {
        let n = self.mem.data.len() as u64;
        loop {
            let i = f.get_be64()?;
            if i == WORDS_EOS {
                return Ok(());
            }
            if i & WORDS_COUNT != 0 {
                if i & !WORDS_COUNT != n {
                    return Err(format!(
                        "the stream has {} words, this memory {n}",
                        i & !WORDS_COUNT
                    )
                    .into());
                }
                continue;
            }
            if i >= n {
                return Err(format!("word {i} is past the end ({n} words)").into());
            }
            self.mem.data[i as usize].store(f.get_be64()?, Ordering::SeqCst);
        }
    }
}

/// Reads "words" records for dumps.
#[derive(Default)]
pub struct WordsWalker {
    pub records: u64,
}

impl SectionWalker for WordsWalker {
    fn idstr(&self) -> &str {
        "words"
    }
    fn walk(
        &mut self,
        f: &mut QemuFile,
        kind: SectionType,
        _v: u32,
        out: &mut DumpSink,
    ) -> Result<(), SectionError> {
        if kind == SectionType::Start {
            out.line(format_args!("{} words", f.get_be64()? & !WORDS_COUNT));
        }
        let mut n = 0;
        while f.get_be64()? != WORDS_EOS {
            f.get_be64()?;
            n += 1;
        }
        self.records += n;
        out.line(format_args!("{n} words sent"));
        Ok(())
    }
    fn summary(&self, out: &mut DumpSink) {
        out.line(format_args!("words: {} records in all", self.records));
    }
}

/// A device with a few fields of each type.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Uart {
    pub lcr: u8,
    pub divisor: u16,
    pub enabled: bool,
    pub ticks: u64,
    pub fifo: Vec<u8>,
}

/// Shares a [`Uart`] between the test and the registry.
pub struct UartSection(pub Arc<Mutex<Uart>>);

impl DeviceHandler for UartSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let u = self.0.lock().unwrap();
        w.u8("lcr", u.lcr);
        w.u16("divisor", u.divisor);
        w.bool("enabled", u.enabled);
        w.u64("ticks", u.ticks);
        w.u32("fifo_len", u.fifo.len() as u32);
        w.buffer("fifo", &u.fifo);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, _v: u32) -> Result<(), SectionError> {
        let lcr = r.u8("lcr")?;
        let divisor = r.u16("divisor")?;
        let enabled = r.bool("enabled")?;
        let ticks = r.u64("ticks")?;
        let len = r.u32("fifo_len")? as usize;
        if len > 16 {
            return Err(format!("fifo of {len} bytes; the device holds 16").into());
        }
        let fifo = r.buffer("fifo", len)?;
        *self.0.lock().unwrap() = Uart {
            lcr,
            divisor,
            enabled,
            ticks,
            fifo,
        };
        Ok(())
    }
}

/// A fake VM: a VM lock, and a guest thread that writes words while its vCPU runs.
pub struct FakeVm {
    pub lock: Mutex<()>,
    state: Arc<(Mutex<VcpuState>, Condvar)>,
    pub stops: AtomicU32,
    pub resumes: AtomicU32,
    pub fail_stop: AtomicBool,
    guest: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct VcpuState {
    run: bool,
    running: bool,
    quit: bool,
}

impl FakeVm {
    /// A VM whose guest writes `writes_per_ms` words per millisecond (0: idle guest).
    pub fn new(mem: Arc<Words>, writes_per_ms: usize) -> Arc<Self> {
        let state = Arc::new((
            Mutex::new(VcpuState {
                run: true,
                ..Default::default()
            }),
            Condvar::new(),
        ));
        let s = state.clone();
        let guest = std::thread::spawn(move || {
            let mut x = 1u64;
            let mut pass = 0u64;
            loop {
                {
                    let (m, c) = &*s;
                    let mut st = m.lock().unwrap();
                    st.running = false;
                    c.notify_all();
                    while !st.run && !st.quit {
                        st = c.wait(st).unwrap();
                    }
                    if st.quit {
                        return;
                    }
                    st.running = true;
                }
                pass += 1;
                for _ in 0..writes_per_ms {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x % mem.data.len() as u64) as usize;
                    mem.write(i, pass);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Arc::new(FakeVm {
            lock: Mutex::new(()),
            state,
            stops: AtomicU32::new(0),
            resumes: AtomicU32::new(0),
            fail_stop: AtomicBool::new(false),
            guest: Mutex::new(Some(guest)),
        })
    }

    pub fn is_running(&self) -> bool {
        self.state.0.lock().unwrap().run
    }

    pub fn shutdown(&self) {
        self.state.0.lock().unwrap().quit = true;
        self.state.1.notify_all();
        if let Some(g) = self.guest.lock().unwrap().take() {
            g.join().unwrap();
        }
    }
}

impl VmControl for FakeVm {
    fn lock(&self) -> VmLock<'_> {
        VmLock::holding(self.lock.lock().unwrap())
    }

    fn stop_vcpus(&self) -> Result<(), SectionError> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        if self.fail_stop.load(Ordering::SeqCst) {
            return Err("vCPU 0 did not stop".into());
        }
        let (m, c) = &*self.state;
        let mut st = m.lock().unwrap();
        st.run = false;
        while st.running {
            st = c.wait(st).unwrap();
        }
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), SectionError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        self.state.0.lock().unwrap().run = true;
        self.state.1.notify_all();
        Ok(())
    }
}
