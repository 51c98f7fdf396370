//! A post-copy destination's RAM as the VMM keeps it, beyond the load that set it up:
//! the registration and the fault thread from LISTEN on, the fault waits for
//! `query-migrate`, and, should the stream stop before every page arrived, the
//! registration kept, so that the guest waits for its pages and never reads a missing
//! one as zeros.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use savevm::return_path::ReturnPath;

use crate::format::TARGET_PAGE_SIZE;
use crate::postcopy_ram::FaultWaitStats;
use crate::{PostcopyRam, RamList, Result};

/// Where a destination's post-copy stands; share it between the RAM section (which sets
/// it up at LISTEN and ends it when every page arrived) and the VMM (which keeps it for
/// as long as the guest may lack pages, and reports on it).
#[derive(Debug, Default)]
pub struct PostcopyIncoming {
    // Lock: set at LISTEN and cleared at the end by the loading thread; read by anyone.
    state: Mutex<Option<Listening>>,
    // Lock: set by the VMM before the load, read at LISTEN.
    vcpu_threads: Mutex<Vec<u32>>,
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

    /// LISTEN: registers the blocks of `list` and starts the fault thread, whose
    /// requests go on `rp`.
    pub(crate) fn listen(&self, list: &RamList, rp: Arc<ReturnPath>) -> Result<Arc<PostcopyRam>> {
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

    /// Every page arrived: the fault thread ends and the registration with it.
    pub(crate) fn complete(&self) -> Result<()> {
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
            },
        }
    }

    /// Whether the guest may lack pages: post-copy started here and did not complete.
    pub fn waiting_for_pages(&self) -> bool {
        self.lock().as_ref().is_some_and(|l| !l.complete)
    }
}
