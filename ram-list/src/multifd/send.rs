//! The source's multifd channels (QEMU 7.2's `multifd_send_*`): one thread per extra
//! connection writes packets of up to [`PAGES_PER_PACKET`] pages of one block, straight
//! from guest memory (or zstd-compressed).
//!
//! The RAM section fills a batch page by page and hands full batches to the channel with
//! the shortest queue. The queues together are bounded ([`QUEUED_BATCHES`]): the section
//! stops an iteration when they are full, and [`MultifdSender::wait_room`], called
//! without the VM lock, waits until they are half empty. Each round (each RAM EOS) ends
//! with a SYNC packet queued on every channel behind that round's pages; the destination
//! applies a round's pages before it reads past the EOS, so nothing here waits for the
//! sync to be written.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qemu_file::{KeepAlive, QemuFile, RateLimiter, ShutdownHandle, Transport, UnsentProbe};

use super::zstd::ZstdSend;
use super::{MULTIFD_FLAG_ZSTD, MultifdCompression};
use crate::format::TARGET_PAGE_SIZE;
use crate::multifd::{
    ChannelInit, MULTIFD_FLAG_SYNC, MULTIFD_PACKET_SIZE, PACKET_HEADER_LEN, PAGES_PER_PACKET,
    PacketHeader,
};
use crate::{Error, RamBlock, Result};

/// Batches all channels together may have queued or in writing: two of the RAM
/// section's longest iterations (16 Ki pages), so that after [`MultifdSender::wait_room`]
/// one whole iteration fits while the previous one is written. Each iteration ends a
/// round, and every round costs the destination a barrier across all channels (QEMU 7.2's
/// sync at each EOS): a queue of a few MiB per channel made rounds so short that channels
/// lost to one stream (see the bench). A batch is page numbers, not data (pages are read
/// from guest memory as they are written), so the bound costs no memory.
pub const QUEUED_BATCHES: usize = 256;

const PAGE: usize = TARGET_PAGE_SIZE as usize;

enum Job {
    Pages {
        num: u64,
        block: Arc<RamBlock>,
        pages: Vec<usize>,
    },
    Sync {
        num: u64,
    },
}

struct Shared {
    // Lock: the channels' queues, the first error and whether to stop; `work[i]` wakes
    // channel threads, `room` the sender.
    state: Mutex<State>,
    work: Vec<Condvar>,
    room: Condvar,
    /// Page batches queued or being written (the sender reads it without the lock).
    page_jobs: AtomicUsize,
    /// Bytes the channels wrote: opening messages, headers, page data.
    written: AtomicU64,
    /// Per channel, page bytes per byte of its last packet's data, × 1000 (1000 when
    /// not compressed): what a byte still in its socket's send queue stands for.
    ratio_milli: Vec<AtomicU64>,
}

#[derive(Default)]
struct State {
    queues: Vec<VecDeque<Job>>,
    /// No more jobs come: channels end once their queue is empty.
    closing: bool,
    /// Stop at once (failure, cancel, drop).
    abort: bool,
    /// The first channel's error, until someone reports it.
    error: Option<Error>,
    failed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_all(&self) {
        for c in &self.work {
            c.notify_all();
        }
    }
}

/// The source's multifd channels, owned by the RAM section of one migration.
pub struct MultifdSender {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    shutdowns: Vec<ShutdownHandle>,
    /// Per channel, its send queue in the kernel (written, not yet acknowledged).
    unsent: Vec<Option<UnsentProbe>>,
    packet_num: u64,
    batch_block: Option<Arc<RamBlock>>,
    batch: Vec<usize>,
    /// Of `shared.written`, what was already reported by [`MultifdSender::take_written`].
    reported: u64,
    /// The bandwidth limit the queues are sized for, bytes/s (0: none).
    bandwidth: u64,
}

impl std::fmt::Debug for MultifdSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultifdSender")
            .field("channels", &self.threads.len())
            .field("packet_num", &self.packet_num)
            .finish()
    }
}

impl MultifdSender {
    /// Starts one thread per connection; each first writes its opening message (channel
    /// number = position in `channels`, `uuid` the source VM's).
    ///
    /// # Errors
    /// No channels, more than 255, or [`Error::Compression`] when zstd cannot set up.
    pub fn start(
        channels: Vec<Box<dyn Transport>>,
        uuid: [u8; 16],
        compression: MultifdCompression,
        zstd_level: u8,
    ) -> Result<Self> {
        if channels.is_empty() || channels.len() > 255 {
            return Err(Error::MultifdSetup {
                reason: format!("{} channels; 1 to 255 are possible", channels.len()),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queues: channels.iter().map(|_| VecDeque::new()).collect(),
                ..State::default()
            }),
            work: channels.iter().map(|_| Condvar::new()).collect(),
            room: Condvar::new(),
            page_jobs: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            ratio_milli: channels.iter().map(|_| AtomicU64::new(1000)).collect(),
        });
        let mut codecs = Vec::new();
        for _ in &channels {
            codecs.push(match compression {
                MultifdCompression::None => None,
                MultifdCompression::Zstd => Some(ZstdSend::new(zstd_level)?),
            });
        }
        let mut sender = MultifdSender {
            shared: shared.clone(),
            threads: Vec::new(),
            shutdowns: channels
                .iter()
                .filter_map(|t| t.shutdown_handle())
                .collect(),
            unsent: channels.iter().map(|t| t.unsent_probe()).collect(),
            packet_num: 0,
            batch_block: None,
            batch: Vec::with_capacity(PAGES_PER_PACKET),
            reported: 0,
            bandwidth: 0,
        };
        for (id, (t, codec)) in channels.into_iter().zip(codecs).enumerate() {
            let shared = shared.clone();
            let id = id as u8;
            let spawned = std::thread::Builder::new()
                .name(format!("multifd-send-{id}"))
                .spawn(move || {
                    let r = run_channel(id, t, uuid, codec, &shared);
                    let mut st = shared.lock();
                    if let Err(e) = r {
                        if !st.failed {
                            st.failed = true;
                            st.error = Some(Error::Channel {
                                channel: id,
                                source: Box::new(e),
                            });
                        }
                        st.abort = true;
                        shared.wake_all();
                    }
                    drop(st);
                    shared.room.notify_all();
                });
            match spawned {
                Ok(h) => sender.threads.push(h),
                Err(e) => {
                    return Err(Error::Channel {
                        channel: id,
                        source: Box::new(Error::MultifdSetup {
                            reason: format!("cannot start its thread: {e}"),
                        }),
                    });
                }
            }
        }
        Ok(sender)
    }

    /// Sizes the queues for a bandwidth limit (bytes/s, 0: none). Channel bytes count
    /// against the limit once written, so what is queued is a burst the limiter only
    /// sees afterwards: under a limit the queues hold at most what one of its 100 ms
    /// windows allows (at least a batch per channel), not [`QUEUED_BATCHES`] (up to
    /// 128 MiB of pages queued on a 20 MB/s link).
    pub fn set_bandwidth(&mut self, bytes_per_sec: u64) {
        self.bandwidth = bytes_per_sec;
    }

    fn capacity(&self) -> usize {
        let limit = match self.bandwidth {
            0 => QUEUED_BATCHES,
            b => {
                let window = u128::from(b) * RateLimiter::WINDOW.as_millis() / 1000;
                let batches = window / MULTIFD_PACKET_SIZE as u128;
                batches.min(QUEUED_BATCHES as u128) as usize
            }
        };
        limit.max(self.threads.len())
    }

    /// Whether a page of `block` can be taken now without waiting: the current batch has
    /// room for it, or a queue has room for the batch it would complete.
    pub fn can_take(&self, block: &Arc<RamBlock>) -> bool {
        let fits = match &self.batch_block {
            None => true,
            Some(b) => Arc::ptr_eq(b, block) && self.batch.len() < PAGES_PER_PACKET,
        };
        fits || self.shared.page_jobs.load(Ordering::Acquire) < self.capacity()
    }

    /// Adds a page of `block` to the batch; a full batch, or one of another block, goes
    /// to a channel. Call [`MultifdSender::can_take`] first, or the queues overflow their
    /// bound (which is allowed, not wanted).
    ///
    /// # Errors
    /// A channel failed.
    pub fn push(&mut self, block: &Arc<RamBlock>, page: usize) -> Result<()> {
        if self
            .batch_block
            .as_ref()
            .is_some_and(|b| !Arc::ptr_eq(b, block) || self.batch.len() == PAGES_PER_PACKET)
        {
            self.hand_off()?;
        }
        if self.batch_block.is_none() {
            self.batch_block = Some(block.clone());
        }
        self.batch.push(page);
        if self.batch.len() == PAGES_PER_PACKET
            && self.shared.page_jobs.load(Ordering::Acquire) < self.capacity()
        {
            self.hand_off()?;
        }
        Ok(())
    }

    fn hand_off(&mut self) -> Result<()> {
        let Some(block) = self.batch_block.take() else {
            return Ok(());
        };
        let pages = std::mem::replace(&mut self.batch, Vec::with_capacity(PAGES_PER_PACKET));
        let num = self.next_num();
        let mut st = self.shared.lock();
        check(&mut st)?;
        let shortest = (0..st.queues.len())
            .min_by_key(|&i| st.queues[i].len())
            .expect("at least one channel");
        st.queues[shortest].push_back(Job::Pages { num, block, pages });
        self.shared.page_jobs.fetch_add(1, Ordering::AcqRel);
        drop(st);
        self.shared.work[shortest].notify_one();
        Ok(())
    }

    fn next_num(&mut self) -> u64 {
        let n = self.packet_num;
        self.packet_num += 1;
        n
    }

    /// Ends a round: the last partial batch goes out, then a SYNC packet on every channel
    /// (QEMU's `multifd_send_sync_main`). Written before the RAM EOS record.
    ///
    /// # Errors
    /// A channel failed.
    pub fn end_round(&mut self) -> Result<()> {
        self.hand_off()?;
        let nums: Vec<u64> = (0..self.threads.len()).map(|_| self.next_num()).collect();
        let mut st = self.shared.lock();
        check(&mut st)?;
        for (q, num) in st.queues.iter_mut().zip(nums) {
            q.push_back(Job::Sync { num });
        }
        drop(st);
        self.shared.wake_all();
        Ok(())
    }

    /// Waits until at most half the queues' room is taken (called without the VM lock,
    /// before an iteration).
    ///
    /// # Errors
    /// A channel failed.
    pub fn wait_room(&self) -> Result<()> {
        let target = self.capacity() / 2;
        let mut st = self.shared.lock();
        loop {
            check(&mut st)?;
            if self.shared.page_jobs.load(Ordering::Acquire) <= target {
                return Ok(());
            }
            st = self.shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits, up to `limit`, until the channels have written everything and their
    /// kernel send queues are empty: called when there is nothing to send but what is in
    /// flight, so that the migration thread does not spin out empty rounds (each one a
    /// SYNC packet per channel) while the destination catches up.
    ///
    /// # Errors
    /// A channel failed.
    pub fn wait_drained(&self, limit: Duration) -> Result<()> {
        let end = Instant::now() + limit;
        let mut st = self.shared.lock();
        loop {
            check(&mut st)?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            if self.shared.page_jobs.load(Ordering::Acquire) == 0 {
                break;
            }
            st = self
                .shared
                .room
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        while Instant::now() < end && self.unsent.iter().flatten().any(|p| p.unsent() > 0) {
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    /// Waits until a queue has room for one more batch (completion: the guest is stopped
    /// and everything must go).
    ///
    /// # Errors
    /// A channel failed.
    pub fn wait_one(&self) -> Result<()> {
        let mut st = self.shared.lock();
        loop {
            check(&mut st)?;
            if self.shared.page_jobs.load(Ordering::Acquire) < self.capacity() {
                return Ok(());
            }
            st = self.shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Page bytes handed over or batched and not yet written (at most a packet's worth
    /// per queued batch), plus what the channels' kernel send queues still hold, in page
    /// bytes (a compressed byte stands for the ratio of the channel's last packet): still
    /// to send, as far as the switchover is concerned.
    pub fn in_flight(&self) -> u64 {
        let batches = self.shared.page_jobs.load(Ordering::Acquire) as u64;
        let queued = batches * MULTIFD_PACKET_SIZE as u64 + (self.batch.len() * PAGE) as u64;
        let unsent: u64 = self
            .unsent
            .iter()
            .zip(&self.shared.ratio_milli)
            .filter_map(|(p, r)| {
                Some(p.as_ref()?.unsent() as u64 * r.load(Ordering::Relaxed) / 1000)
            })
            .sum();
        queued + unsent
    }

    /// Bytes the channels wrote since the last call (for the main stream's accounting).
    pub fn take_written(&mut self) -> u64 {
        let now = self.shared.written.load(Ordering::Acquire);
        let n = now - self.reported;
        self.reported = now;
        n
    }

    /// Lets the channels write everything queued, end their connections and stop.
    ///
    /// # Errors
    /// A channel failed.
    pub fn finish(&mut self) -> Result<()> {
        self.hand_off()?;
        self.shared.lock().closing = true;
        self.shared.wake_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        check(&mut self.shared.lock())
    }
}

fn check(st: &mut State) -> Result<()> {
    if !st.failed {
        return Ok(());
    }
    Err(st.error.take().unwrap_or(Error::MultifdSetup {
        reason: "a channel failed (reported before)".into(),
    }))
}

impl Drop for MultifdSender {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.lock().abort = true;
        self.shared.wake_all();
        // Channels blocked in a write to a peer that stopped reading give up.
        for h in &self.shutdowns {
            h.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_channel(
    id: u8,
    transport: Box<dyn Transport>,
    uuid: [u8; 16],
    mut codec: Option<ZstdSend>,
    shared: &Shared,
) -> Result<()> {
    let mut f = QemuFile::new(transport);
    ChannelInit { uuid, id }.write_to(&mut f);
    f.flush()?;
    shared
        .written
        .fetch_add(f.bytes_written(), Ordering::AcqRel);
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.abort {
                    return Ok(());
                }
                if let Some(j) = st.queues[id as usize].pop_front() {
                    break j;
                }
                if st.closing {
                    drop(st);
                    f.finish()?;
                    return Ok(());
                }
                st = shared.work[id as usize]
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let before = f.bytes_written();
        match job {
            Job::Pages { num, block, pages } => {
                let r = write_pages(&mut f, num, &block, &pages, codec.as_mut());
                let data = (f.bytes_written() - before).saturating_sub(PACKET_HEADER_LEN as u64);
                if let Some(ratio) = ((pages.len() * PAGE) as u64 * 1000).checked_div(data) {
                    shared.ratio_milli[id as usize].store(ratio.max(1), Ordering::Relaxed);
                }
                shared.page_jobs.fetch_sub(1, Ordering::AcqRel);
                // Through the lock: a waiter checks the count under it, then waits, and a
                // notify between the two would be lost (with a bound of one batch, for
                // good).
                drop(shared.lock());
                shared.room.notify_all();
                r?;
            }
            Job::Sync { num } => {
                PacketHeader {
                    flags: MULTIFD_FLAG_SYNC,
                    next_packet_size: 0,
                    packet_num: num,
                    ramblock: String::new(),
                    offsets: Vec::new(),
                }
                .write_to(&mut f);
                f.flush()?;
            }
        }
        shared
            .written
            .fetch_add(f.bytes_written() - before, Ordering::AcqRel);
    }
}

fn write_pages(
    f: &mut QemuFile,
    num: u64,
    block: &Arc<RamBlock>,
    pages: &[usize],
    codec: Option<&mut ZstdSend>,
) -> Result<()> {
    let mut header = PacketHeader {
        flags: 0,
        next_packet_size: (pages.len() * PAGE) as u32,
        packet_num: num,
        ramblock: block.idstr().to_string(),
        offsets: pages.iter().map(|&p| p as u64 * TARGET_PAGE_SIZE).collect(),
    };
    match codec {
        None => {
            header.write_to(f);
            let owner: KeepAlive = block.clone();
            for &p in pages {
                // SAFETY: the page is inside the block (the section took it from the
                // block's bitmap, below `used_pages`), which `owner` keeps mapped until the
                // flush below wrote it.
                unsafe { f.put_buffer_external(block.page_ptr(p), PAGE, &owner) };
            }
        }
        Some(z) => {
            let data = z.compress(pages.iter().map(|&p| {
                // SAFETY: as above; `block` outlives the slices, which are only read (the
                // guest may change the bytes meanwhile: the dirty log sends them again).
                unsafe { std::slice::from_raw_parts(block.page_ptr(p), PAGE) }
            }))?;
            header.flags |= MULTIFD_FLAG_ZSTD;
            header.next_packet_size = data.len() as u32;
            header.write_to(f);
            f.put_buffer(data);
        }
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::mem_channel;
    use vm_memory::MmapRegion;

    /// Pages `push` takes before `can_take` says the queues are full, with channels whose
    /// reader never reads (so nothing queued is ever written).
    fn pages_taken(bandwidth: u64) -> usize {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..2).map(|_| mem_channel(PAGE)).unzip();
        let channels = tx
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect();
        let mut m = MultifdSender::start(channels, [0; 16], MultifdCompression::None, 1).unwrap();
        let pages = 64 * 1024;
        let host = Arc::new(MmapRegion::<()>::new(pages * PAGE).unwrap());
        let block = Arc::new(RamBlock::new("pc.ram", host, Box::new(())).unwrap());
        m.set_bandwidth(bandwidth);
        let mut taken = 0;
        while taken < pages && m.can_take(&block) {
            m.push(&block, taken).unwrap();
            taken += 1;
        }
        // The readers go first: the channels' blocked writes fail and they end.
        drop(rx);
        drop(m);
        taken
    }

    #[test]
    fn under_a_bandwidth_limit_the_queues_hold_one_window() {
        // 10 MB/s: a 100 ms window is 1 MB, less than 2 batches; each of the 2 channels
        // may still hold one, plus the batch being filled.
        assert_eq!(pages_taken(10_000_000), 3 * PAGES_PER_PACKET);
        assert_eq!(pages_taken(0), (QUEUED_BATCHES + 1) * PAGES_PER_PACKET);
    }
}
