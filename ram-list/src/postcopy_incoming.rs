//! A post-copy destination's RAM as the VMM keeps it, beyond the load that set it up:
//! the registration and the fault thread from LISTEN on, the fault waits for
//! `query-migrate`, and, should the stream stop before every page arrived, the
//! registration kept, so that the guest waits for its pages and never reads a missing
//! one as zeros.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qemu_file::{QemuFile, ShutdownHandle};
use savevm::return_path::ReturnPath;

use crate::format::TARGET_PAGE_SIZE;
use crate::postcopy_ram::{FaultWaitStats, WaitSummary};
use crate::{Error, PostcopyRam, RamList, RamStats, Result};

/// How long a completed post-copy waits for the preempt connection's EOS after the
/// main stream's end (the source writes it at the end of the post-copy phase).
const PREEMPT_END_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a destination's post-copy stands; share it between the RAM section (which sets
/// it up at LISTEN and ends it when every page arrived) and the VMM (which keeps it for
/// as long as the guest may lack pages, and reports on it).
#[derive(Debug, Default)]
pub struct PostcopyIncoming {
    // Lock: set at LISTEN and cleared at the end by the loading thread; read by anyone.
    state: Mutex<Option<Listening>>,
    // Lock: set by the VMM before the load, read at LISTEN.
    vcpu_threads: Mutex<Vec<u32>>,
    // Lock: the preempt connection, set by the VMM (before the load, and at a resume)
    // and read from LISTEN on by a thread of its own; ended by the loading thread at
    // the end, by the VMM at a pause.
    preempt: Mutex<Preempt>,
    /// Pages that came on the preempt connection.
    preempt_pages: Arc<AtomicU64>,
}

/// The preempt connection (`postcopy-preempt`), before LISTEN and after.
#[derive(Debug, Default)]
struct Preempt {
    /// Accepted, not read yet (LISTEN starts its reader), with the main stream's
    /// interrupter (a failed preempt connection ends the main stream too).
    waiting: Option<(QemuFile, Option<ShutdownHandle>)>,
    /// Reading it.
    reader: Option<PreemptReader>,
    /// What the pages it brings count into.
    stats: Option<Arc<RamStats>>,
}

#[derive(Debug)]
struct PreemptReader {
    thread: JoinHandle<Result<()>>,
    stop: Arc<AtomicBool>,
    shut: Option<ShutdownHandle>,
}

impl PreemptReader {
    /// Reads `f` on a thread of its own, placing its pages in `ram`.
    fn start(
        ram: Arc<PostcopyRam>,
        stats: Arc<RamStats>,
        pages: Arc<AtomicU64>,
        mut f: QemuFile,
        main: Option<ShutdownHandle>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let shut = f.shutdown_handle();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-preempt".into())
            .spawn(move || {
                // A vCPU waits for each page that comes here.
                savevm::priority::serve_waiting_guest();
                let r = crate::preempt::receive(&mut f, &ram, &stats, &pages, &stopped);
                if r.is_err() && !stopped.load(Ordering::SeqCst) {
                    // The main stream's loader sees the failure, and post-copy pauses.
                    if let Some(h) = main {
                        h.shutdown();
                    }
                }
                r
            })
            .map_err(|e| Error::Postcopy {
                reason: format!("no thread for the preempt connection: {e}"),
            })?;
        Ok(PreemptReader { thread, stop, shut })
    }

    /// Ends it now (a pause): its connection is shut down.
    fn stop(self) -> Option<Error> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = &self.shut {
            h.shutdown();
        }
        self.thread.join().ok().and_then(|r| r.err())
    }

    /// Waits for its EOS, at most `timeout`.
    fn finish(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !self.thread.is_finished() {
            let _ = self.stop();
            return Err(Error::Postcopy {
                reason: format!(
                    "the source did not end the preempt connection within {} s of the main stream",
                    timeout.as_secs()
                ),
            });
        }
        self.thread.join().unwrap_or_else(|_| {
            Err(Error::Postcopy {
                reason: "the preempt connection's reader panicked".into(),
            })
        })
    }
}

#[derive(Debug)]
struct Listening {
    ram: Arc<PostcopyRam>,
    faults: Option<JoinHandle<()>>,
    /// Every page arrived and the registration ended.
    complete: bool,
}

/// What `query-migrate` says of a destination's post-copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyIncomingInfo {
    /// Post-copy started here (LISTEN).
    pub listening: bool,
    /// Every page arrived.
    pub complete: bool,
    /// The faults' waits.
    pub waits: FaultWaitStats,
    /// Pages that came on the preempt connection (`postcopy-preempt`).
    pub preempt_pages: u64,
}

impl PostcopyIncoming {
    /// Nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Listening>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest's vCPU threads (their ids, in vCPU order): their waits for pages are
    /// counted apiece (QEMU's `postcopy-vcpu-blocktime`).
    pub fn set_vcpu_threads(&self, threads: Vec<u32>) {
        *self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
    }

    fn preempt(&self) -> std::sync::MutexGuard<'_, Preempt> {
        self.preempt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Post-copy preempt: `f` is the source's second connection, which carries the
    /// pages asked for. It is read from LISTEN on (at once, after a resume); a failure
    /// on it shuts down `main`, the main stream, so that post-copy pauses.
    ///
    /// # Errors
    /// No thread to read it.
    pub fn set_preempt_channel(&self, f: QemuFile, main: Option<ShutdownHandle>) -> Result<()> {
        let ram = self
            .lock()
            .as_ref()
            .filter(|l| !l.complete)
            .map(|l| l.ram.clone());
        let mut p = self.preempt();
        if let Some(old) = p.reader.take() {
            old.stop();
        }
        match (ram, p.stats.clone()) {
            (Some(ram), Some(stats)) => {
                let pages = self.preempt_pages.clone();
                p.reader = Some(PreemptReader::start(ram, stats, pages, f, main)?);
            }
            _ => p.waiting = Some((f, main)),
        }
        Ok(())
    }

    /// Ends the preempt connection's reader (a pause: the source will open a new one).
    /// Returns the error it ended with, if it failed by itself.
    pub fn stop_preempt(&self) -> Option<String> {
        let mut p = self.preempt();
        p.waiting = None;
        p.reader
            .take()
            .and_then(|r| r.stop())
            .map(|e| e.to_string())
    }

    /// LISTEN: registers the blocks of `list` and starts the fault thread, whose
    /// requests go on `rp`, and the preempt connection's reader if there is one (pages
    /// it brings count into `stats`).
    pub(crate) fn listen(
        &self,
        list: &RamList,
        rp: Arc<ReturnPath>,
        stats: Arc<RamStats>,
    ) -> Result<Arc<PostcopyRam>> {
        let ram = Arc::new(PostcopyRam::register(list)?);
        ram.set_vcpu_threads(
            self.vcpu_threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        let faults = ram
            .start_faults(move |block, offset| {
                // A failed request leaves the guest waiting for the page: the stream
                // failed too, and the load reports it.
                let _ = rp.request_pages(block, offset, TARGET_PAGE_SIZE as u32);
            })
            .map_err(|e| crate::Error::Postcopy {
                reason: format!("no fault thread: {e}"),
            })?;
        *self.lock() = Some(Listening {
            ram: ram.clone(),
            faults: Some(faults),
            complete: false,
        });
        let mut p = self.preempt();
        p.stats = Some(stats.clone());
        if let Some((f, main)) = p.waiting.take() {
            let pages = self.preempt_pages.clone();
            p.reader = Some(PreemptReader::start(ram.clone(), stats, pages, f, main)?);
        }
        Ok(ram)
    }

    /// A resume: asks again on `rp` for every page a fault still waits for (the source
    /// forgot the requests made before the break).
    pub(crate) fn request_again(&self, rp: &ReturnPath) -> Result<()> {
        let ram = match &*self.lock() {
            Some(l) => l.ram.clone(),
            None => return Ok(()),
        };
        for (block, offset) in ram.waiting_pages() {
            rp.request_pages(&block, offset, TARGET_PAGE_SIZE as u32)
                .map_err(|e| crate::Error::Postcopy {
                    reason: format!("asking again for pages: {e}"),
                })?;
        }
        Ok(())
    }

    /// Every page arrived: the preempt connection's EOS is awaited, the fault thread
    /// ends and the registration with it.
    pub(crate) fn complete(&self) -> Result<()> {
        let reader = self.preempt().reader.take();
        if let Some(r) = reader {
            r.finish(PREEMPT_END_TIMEOUT)?;
        }
        let mut g = self.lock();
        let Some(l) = g.as_mut() else {
            return Ok(());
        };
        l.ram.stop_faults();
        if let Some(t) = l.faults.take() {
            let _ = t.join();
        }
        l.ram.unregister()?;
        l.complete = true;
        Ok(())
    }

    /// Where it stands.
    pub fn info(&self) -> PostcopyIncomingInfo {
        match &*self.lock() {
            None => PostcopyIncomingInfo::default(),
            Some(l) => PostcopyIncomingInfo {
                listening: true,
                complete: l.complete,
                waits: l.ram.fault_waits(),
                preempt_pages: self.preempt_pages.load(Ordering::Relaxed),
            },
        }
    }

    /// The faults' waits by the connection their page came on, `[preempt connection,
    /// main stream]` ([`PostcopyRam::fault_waits_by_connection`]); zeros before LISTEN.
    pub fn fault_waits_by_connection(&self) -> [WaitSummary; 2] {
        match &*self.lock() {
            None => Default::default(),
            Some(l) => l.ram.fault_waits_by_connection(),
        }
    }

    /// Whether the guest may lack pages: post-copy started here and did not complete.
    pub fn waiting_for_pages(&self) -> bool {
        self.lock().as_ref().is_some_and(|l| !l.complete)
    }
}
