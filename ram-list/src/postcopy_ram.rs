//! A post-copy destination's RAM: every block registered with userfaultfd, so that a
//! thread touching a page that has not arrived waits for it, a vCPU inside `KVM_RUN`
//! included; pages dropped by the source's discards fault again; each fault becomes a
//! request (QEMU's fault thread and `postcopy_request_page`), and each page that arrives,
//! asked for or not, is placed atomically and marked received.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirty_bitmap::DirtyBitmap;

use crate::blocktime::{Blocktime, PageKey, VcpuBlocktime};
use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, Placed, RamBlock, RamList, Result, Userfault};

/// The blocks of a destination during post-copy, and what arrived of them.
#[derive(Debug)]
pub struct PostcopyRam {
    uffd: Arc<Userfault>,
    /// Each block with its received pages (set by [`PostcopyRam::place`]).
    blocks: Vec<(Arc<RamBlock>, DirtyBitmap)>,
    /// Tells the fault thread to end.
    stop: Arc<AtomicBool>,
    /// Faults that asked for a page, and what they waited (QEMU's blocktime).
    waits: FaultWaits,
}

/// How long faults waited for their pages.
#[derive(Debug, Default)]
struct FaultWaits {
    // Lock: the fault thread adds a fault (under it, after seeing its page missing);
    // `place` resolves the page's faults once the page is there; readers of the figures.
    state: Mutex<Waits>,
    requests: AtomicU64,
    /// The thread that placed the main stream's pages last (its id; 0 before any): the
    /// loading thread, raised while a fault waits (`Waits::boosted`). After a recovery
    /// the new loading thread takes its place with its first page.
    loader: AtomicI32,
}

#[derive(Debug, Default)]
struct Waits {
    /// The pages faulted on and not placed yet, since their first fault.
    waiting: HashMap<PageKey, Instant>,
    /// Each resolved fault's wait, microseconds, by the connection its page came on:
    /// the preempt connection, or the main stream (sent by the background pass before
    /// it was asked for, or asked for with no preempt connection). All the waits are
    /// the two together.
    preempt_us: Vec<u32>,
    stream_us: Vec<u32>,
    /// The vCPUs' waits, QEMU's way.
    vcpus: Blocktime,
    /// The loading thread while raised: from a fault on a missing page until no fault
    /// waits (`savevm::priority::boost`). Raised for the whole post-copy phase it
    /// would take the cores from the background pass and the guest; raised never, a
    /// vCPU waiting for a page the main stream carries waits for it to get a core.
    boosted: Option<i32>,
    /// Raising was refused (no `CAP_SYS_NICE`, or no real-time budget): not tried again.
    refused: bool,
}

impl Waits {
    /// Raises loading thread `tid` (0: not known yet) unless it is raised already.
    fn raise(&mut self, tid: i32) {
        if self.boosted.is_none() && tid != 0 && !self.refused {
            if savevm::priority::boost(tid) {
                self.boosted = Some(tid);
            } else {
                self.refused = true;
            }
        }
    }
}

/// What the faults of a post-copy destination waited, so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultWaitStats {
    /// Pages asked for (one per fault on a page not there, repeats included).
    pub requests: u64,
    /// Faults whose page arrived, and the sum of their waits (QEMU's
    /// `postcopy-blocktime`, per page rather than per vCPU).
    pub resolved: u64,
    /// The sum of the waits, microseconds.
    pub total_us: u64,
    /// The median, 99th percentile and longest wait, microseconds.
    pub p50_us: u32,
    /// 99th percentile.
    pub p99_us: u32,
    /// The longest.
    pub max_us: u32,
    /// Pages faulted on that have not arrived yet.
    pub waiting: u64,
    /// The vCPUs' waits (QEMU's `postcopy-blocktime` and `postcopy-vcpu-blocktime`).
    pub vcpus: VcpuBlocktime,
    /// The distribution of the waits: (bound, count), each count the waits of at least
    /// half the bound and below it (the first from 0), microseconds, empty ones left out.
    pub histogram: Vec<(u64, u64)>,
}

/// A set of waits in brief.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitSummary {
    /// How many.
    pub count: u64,
    /// The median, microseconds.
    pub p50_us: u32,
    /// The 99th percentile, microseconds.
    pub p99_us: u32,
    /// The longest, microseconds.
    pub max_us: u32,
}

impl WaitSummary {
    fn of(mut waits_us: Vec<u32>) -> Self {
        waits_us.sort_unstable();
        WaitSummary {
            count: waits_us.len() as u64,
            p50_us: percentile(&waits_us, 0.5),
            p99_us: percentile(&waits_us, 0.99),
            max_us: waits_us.last().copied().unwrap_or(0),
        }
    }
}

/// The `q` quantile of `sorted` (nearest rank), 0 when empty.
fn percentile(sorted: &[u32], q: f64) -> u32 {
    match sorted.len() {
        0 => 0,
        n => sorted[((n - 1) as f64 * q).round() as usize],
    }
}

/// Where a placed page came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Stream,
    Preempt,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Postcopy {
        reason: format!("{what}: {e}"),
    }
}

/// Drops `len` bytes at `start` of `block` (whole pages inside it): they read as zero,
/// or fault once the block is registered. Private memory goes with `MADV_DONTNEED`,
/// shared memory with `MADV_REMOVE` (which frees its pages in the file too).
pub(crate) fn drop_pages(b: &RamBlock, start: u64, len: u64) -> Result<()> {
    let end = start.checked_add(len);
    if start % TARGET_PAGE_SIZE != 0
        || len % TARGET_PAGE_SIZE != 0
        || end.is_none_or(|e| e > b.used_length())
    {
        return Err(Error::Postcopy {
            reason: format!(
                "a discard of {len:#x} bytes at {start:#x} of block {:?} ({} bytes)",
                b.idstr(),
                b.used_length()
            ),
        });
    }
    if len == 0 {
        return Ok(());
    }
    let advice = if b.host().unpopulated_is_zero() {
        libc::MADV_DONTNEED
    } else {
        libc::MADV_REMOVE
    };
    let first = (start / TARGET_PAGE_SIZE) as usize;
    // SAFETY: the range lies inside the block's mapping (checked above); dropping its
    // pages is what the source asked for, and the guest does not run meanwhile (or
    // waits for them, registered).
    let r = unsafe { libc::madvise(b.page_ptr(first).cast(), len as usize, advice) };
    if r != 0 {
        return Err(io_error("madvise", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Waits by powers of two: (bound, count) for the waits below the bound, at least half of
/// it (from 0 for the first), the empty ones left out.
fn histogram(waits_us: &[u32]) -> Vec<(u64, u64)> {
    let mut counts = [0u64; 33];
    for &w in waits_us {
        counts[(u32::BITS - w.leading_zeros()) as usize] += 1;
    }
    counts
        .iter()
        .enumerate()
        .filter(|&(_, &n)| n > 0)
        .map(|(i, &n)| (1u64 << i, n))
        .collect()
}

impl PostcopyRam {
    /// Registers every block of `list` with a new userfaultfd (QEMU's
    /// `postcopy_ram_incoming_setup`, at LISTEN): pages already in place (loaded before
    /// the switch) stay; the others make whoever touches them wait.
    ///
    /// # Errors
    /// No userfaultfd here, or a block's memory cannot be registered.
    pub fn register(list: &RamList) -> Result<Self> {
        let uffd = Arc::new(Userfault::new().map_err(|e| io_error("userfaultfd", e))?);
        let mut blocks = Vec::new();
        for b in list.blocks() {
            uffd.register(b.page_ptr(0), b.used_length() as usize)
                .map_err(|e| io_error(&format!("block {:?}", b.idstr()), e))?;
            let received = DirtyBitmap::new(b.used_pages());
            blocks.push((b, received));
        }
        Ok(PostcopyRam {
            uffd,
            blocks,
            stop: Arc::new(AtomicBool::new(false)),
            waits: FaultWaits::default(),
        })
    }

    fn block(&self, name: &str) -> Result<&(Arc<RamBlock>, DirtyBitmap)> {
        self.blocks
            .iter()
            .find(|(b, _)| b.idstr() == name)
            .ok_or_else(|| Error::UnknownBlock {
                idstr: name.to_string(),
            })
    }

    fn page_of(&self, name: &str, offset: u64) -> Result<(&Arc<RamBlock>, &DirtyBitmap, usize)> {
        let (b, received) = self.block(name)?;
        if offset % TARGET_PAGE_SIZE != 0 || offset >= b.used_length() {
            return Err(Error::Postcopy {
                reason: format!(
                    "offset {offset:#x} is not a page of block {name:?} ({} bytes)",
                    b.used_length()
                ),
            });
        }
        Ok((b, received, (offset / TARGET_PAGE_SIZE) as usize))
    }

    /// Drops `len` bytes at `start` of block `name` (a source's discard: pages dirtied
    /// after they were sent, or never sent): they fault again until placed. Private
    /// memory is dropped with `MADV_DONTNEED`, shared memory with `MADV_REMOVE` (which
    /// frees its pages in the file too).
    ///
    /// # Errors
    /// An unknown block, a range outside it or not of whole pages, or the kernel's.
    pub fn discard(&self, name: &str, start: u64, len: u64) -> Result<()> {
        let (b, received, first) = self.page_of(name, start)?;
        drop_pages(b, start, len)?;
        for p in first..first + (len / TARGET_PAGE_SIZE) as usize {
            received.test_and_clear(p);
        }
        Ok(())
    }

    /// Places page `offset` of block `name`: `data` (one page), or zeros (None). A page
    /// that is there already is left as it was ([`Placed::Already`]).
    ///
    /// # Errors
    /// An unknown block or offset, a short page, or the kernel's.
    pub fn place(&self, name: &str, offset: u64, data: Option<&[u8]>) -> Result<Placed> {
        self.place_via(name, offset, data, Via::Stream)
    }

    /// [`Self::place`] for a page that came on the preempt connection.
    pub(crate) fn place_preempt(
        &self,
        name: &str,
        offset: u64,
        data: Option<&[u8]>,
    ) -> Result<Placed> {
        self.place_via(name, offset, data, Via::Preempt)
    }

    fn place_via(&self, name: &str, offset: u64, data: Option<&[u8]>, via: Via) -> Result<Placed> {
        let (b, received, page) = self.page_of(name, offset)?;
        let dst = b.page_ptr(page);
        let placed = match data {
            Some(d) if d.len() == TARGET_PAGE_SIZE as usize => self.uffd.copy(dst, d),
            Some(d) => {
                return Err(Error::Postcopy {
                    reason: format!("a page of {} bytes", d.len()),
                });
            }
            None => self.uffd.zero(dst, TARGET_PAGE_SIZE as usize),
        }
        .map_err(|e| io_error("placing a page", e))?;
        self.arrived(b, received, page..page + 1, via);
        Ok(placed)
    }

    /// Places consecutive pages `data` (whole pages) at `offset` of block `name` with
    /// one call where the kernel allows (the background stream's runs of pages); pages
    /// in place already are left as they were. Returns how many were placed now.
    ///
    /// # Errors
    /// An unknown block, a range outside it or not of whole pages, or the kernel's.
    pub fn place_pages(&self, name: &str, offset: u64, data: &[u8]) -> Result<usize> {
        let (b, received, first) = self.page_of(name, offset)?;
        let page = TARGET_PAGE_SIZE as usize;
        let pages = data.len() / page;
        if data.len() % page != 0 || first + pages > b.used_pages() {
            return Err(Error::Postcopy {
                reason: format!("{} bytes of pages at {offset:#x} of {name:?}", data.len()),
            });
        }
        let placed = self
            .uffd
            .copy_pages(b.page_ptr(first), data, page)
            .map_err(|e| io_error("placing pages", e))?;
        self.arrived(b, received, first..first + pages, Via::Stream);
        Ok(placed)
    }

    /// Pages `pages` of block `b` are in place (come `via` a connection): received, and
    /// the waits for them end.
    fn arrived(&self, b: &Arc<RamBlock>, received: &DirtyBitmap, pages: Range<usize>, via: Via) {
        for p in pages.clone() {
            received.set(p);
        }
        if via == Via::Stream {
            self.waits
                .loader
                .store(savevm::priority::current_thread(), Ordering::Relaxed);
        }
        let Some(bi) = self.blocks.iter().position(|(x, _)| Arc::ptr_eq(x, b)) else {
            return;
        };
        let mut w = lock(&self.waits.state);
        if w.waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        for p in pages {
            if let Some(since) = w.waiting.remove(&(bi, p)) {
                let us = now.duration_since(since).as_micros().min(u32::MAX as u128) as u32;
                match via {
                    Via::Preempt => w.preempt_us.push(us),
                    Via::Stream => w.stream_us.push(us),
                }
                w.vcpus.end((bi, p), now);
            }
        }
        if w.waiting.is_empty() {
            if let Some(tid) = w.boosted.take() {
                savevm::priority::unboost(tid);
            }
        } else if via == Via::Stream {
            // Faults that came before this thread was known as the loading one.
            w.raise(savevm::priority::current_thread());
        }
    }

    /// Places zero pages over `len` bytes at `start` of block `name` (pages pre-copy
    /// sent as zero and this side never wrote: one call maps them all, where a read of
    /// each would cost a fault apiece).
    ///
    /// # Errors
    /// An unknown block or range, or the kernel's.
    pub fn place_zero_range(&self, name: &str, start: u64, len: u64) -> Result<()> {
        let (b, received, first) = self.page_of(name, start)?;
        let pages = (len / TARGET_PAGE_SIZE) as usize;
        if len % TARGET_PAGE_SIZE != 0 || first + pages > b.used_pages() {
            return Err(Error::Postcopy {
                reason: format!("zero pages of {len:#x} bytes at {start:#x} of {name:?}"),
            });
        }
        let placed = self
            .uffd
            .zero(b.page_ptr(first), len as usize)
            .map_err(|e| io_error("placing zero pages", e))?;
        if placed == Placed::Already && pages > 1 {
            // Some page of the range was there: the others one by one.
            for p in first..first + pages {
                self.uffd
                    .zero(b.page_ptr(p), TARGET_PAGE_SIZE as usize)
                    .map_err(|e| io_error("placing a zero page", e))?;
            }
        }
        for p in first..first + pages {
            received.set(p);
        }
        Ok(())
    }

    /// Marks every page of `block` received but those set in `dropped` (at LISTEN: what
    /// pre-copy brought is there, what the source's discards dropped is not).
    pub(crate) fn set_received_except(&self, block: &Arc<RamBlock>, dropped: &DirtyBitmap) {
        let Some((b, received)) = self.blocks.iter().find(|(b, _)| Arc::ptr_eq(b, block)) else {
            return;
        };
        // A word at a time: this runs in the guest's pause.
        let pages = b.used_pages();
        let mut raw: Vec<u64> = (0..pages.div_ceil(64))
            .map(|w| !dropped.take_word(w))
            .collect();
        if pages % 64 != 0 {
            if let Some(last) = raw.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        // Sized from the same block: nothing falls past its end.
        let _ = received.merge_raw(0, &raw);
    }

    /// The received pages of block `name` as QEMU's RECV_BITMAP carries them: bit i % 8
    /// of byte i / 8 for page i, padded to whole 64-bit words. None for an unknown block.
    pub fn received_bitmap(&self, name: &str) -> Option<Vec<u8>> {
        let (b, received) = self.block(name).ok()?;
        let pages = b.used_pages();
        let mut out = vec![0u8; pages.div_ceil(64) * 8];
        for p in 0..pages {
            if received.test(p) {
                out[p / 8] |= 1 << (p % 8);
            }
        }
        Some(out)
    }

    /// The pages faulted on that have not arrived: (block, offset).
    pub fn waiting_pages(&self) -> Vec<(String, u64)> {
        lock(&self.waits.state)
            .waiting
            .keys()
            .map(|&(bi, page)| {
                (
                    self.blocks[bi].0.idstr().to_string(),
                    page as u64 * TARGET_PAGE_SIZE,
                )
            })
            .collect()
    }

    /// What the faults waited so far.
    pub fn fault_waits(&self) -> FaultWaitStats {
        let (mut w, waiting, vcpus) = {
            let s = lock(&self.waits.state);
            (
                [s.preempt_us.as_slice(), &s.stream_us].concat(),
                s.waiting.len() as u64,
                s.vcpus.figures(),
            )
        };
        w.sort_unstable();
        FaultWaitStats {
            requests: self.waits.requests.load(Ordering::Relaxed),
            resolved: w.len() as u64,
            total_us: w.iter().map(|&x| u64::from(x)).sum(),
            p50_us: percentile(&w, 0.5),
            p99_us: percentile(&w, 0.99),
            max_us: w.last().copied().unwrap_or(0),
            waiting,
            vcpus,
            histogram: histogram(&w),
        }
    }

    /// The resolved faults' waits by the connection their page came on: `[preempt
    /// connection, main stream]`. With `postcopy-preempt` a page asked for comes on the
    /// main stream only if the background pass sent it before the request: which of
    /// the two makes a long wait.
    pub fn fault_waits_by_connection(&self) -> [WaitSummary; 2] {
        let s = lock(&self.waits.state);
        [&s.preempt_us, &s.stream_us].map(|w| WaitSummary::of(w.clone()))
    }

    /// Whether page `offset` of block `name` was placed (since the last discard of it).
    pub fn is_received(&self, name: &str, offset: u64) -> bool {
        self.page_of(name, offset)
            .is_ok_and(|(_, received, page)| received.test(page))
    }

    /// Counts the waits of the threads `vcpus` (their ids, in vCPU order) as vCPU
    /// blocktime ([`FaultWaitStats::vcpus`]); before the fault thread starts.
    pub fn set_vcpu_threads(&self, vcpus: Vec<u32>) {
        lock(&self.waits.state).vcpus = Blocktime::new(vcpus);
    }

    /// Starts the fault thread: each fault on a page not placed yet calls `request` with
    /// the block's name and the page's offset (the caller asks the source for it), once
    /// per fault event; a fault on a page placed meanwhile is dropped. It ends at
    /// [`PostcopyRam::stop_faults`] or on the descriptor's error.
    pub fn start_faults(
        self: &Arc<Self>,
        mut request: impl FnMut(&str, u64) + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                // Each fault it reads is a vCPU waiting.
                savevm::priority::serve_waiting_guest();
                while !me.stop.load(Ordering::SeqCst) {
                    let fault = match me.uffd.read_event(Some(Duration::from_millis(100))) {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(_) => return,
                    };
                    if let Some((bi, page)) = me.locate(fault.address) {
                        let (b, received) = &me.blocks[bi];
                        // Looked at under the lock `place` resolves faults under, after
                        // marking its page: a page placed meanwhile is seen here.
                        let missing = {
                            let mut w = lock(&me.waits.state);
                            let missing = !received.test(page);
                            if missing {
                                let now = Instant::now();
                                w.waiting.entry((bi, page)).or_insert(now);
                                w.vcpus.begin(fault.thread, (bi, page), now);
                                // The guest now waits on the loading thread too
                                // (its page may come on the main stream): it runs
                                // ahead of normal threads until no fault waits.
                                w.raise(me.waits.loader.load(Ordering::Relaxed));
                            }
                            missing
                        };
                        if missing {
                            me.waits.requests.fetch_add(1, Ordering::Relaxed);
                            request(b.idstr(), page as u64 * TARGET_PAGE_SIZE);
                        }
                    }
                }
            })
    }

    /// The index of the block and the page of host address `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        self.blocks.iter().enumerate().find_map(|(i, (b, _))| {
            let start = b.page_ptr(0) as u64;
            (addr >= start && addr < start + b.used_length())
                .then(|| (i, ((addr - start) / TARGET_PAGE_SIZE) as usize))
        })
    }

    /// Ends the fault thread (it notices within 100 ms).
    pub fn stop_faults(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Ends the registration of every block (post-copy is over: everything arrived).
    ///
    /// # Errors
    /// The kernel's.
    pub fn unregister(&self) -> Result<()> {
        for (b, _) in &self.blocks {
            self.uffd
                .unregister(b.page_ptr(0), b.used_length() as usize)
                .map_err(|e| io_error("unregistering", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::histogram;

    #[test]
    fn waits_fall_in_powers_of_two() {
        assert_eq!(histogram(&[]), []);
        // 0 below 1; 1 in [1, 2); 3 in [2, 4); 100 and 127 in [64, 128); 128 in [128, 256).
        assert_eq!(
            histogram(&[0, 1, 3, 100, 127, 128, u32::MAX]),
            [(1, 1), (2, 1), (4, 1), (128, 2), (256, 1), (1 << 32, 1)]
        );
    }
}
