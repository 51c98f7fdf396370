//! `RamSection`: the live `"ram"` section, QEMU's RAM format version 4.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use dirty_bitmap::DirtyBitmap;
use qemu_file::{KeepAlive, QemuFile};
use savevm::{SectionError, SectionHandler, SectionInfo};

use crate::format::{
    BlockEntry, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO, RecordHeader,
    TARGET_PAGE_SIZE, read_block_list, write_block_list,
};
use crate::multifd::recv::MultifdReceiver;
use crate::multifd::send::MultifdSender;
use crate::place_batch::{PlaceBatch, next_page_is};
use crate::populated::Populated;
use crate::postcopy_incoming::PostcopyIncoming;
use crate::requests::PageRequests;
use crate::{Error, PostcopyRam, RamBlock, RamList, RamStats, Result};

/// The version of QEMU's RAM format this section writes and reads.
pub const RAM_SECTION_VERSION: u32 = 4;

/// Most pages one iteration examines: zero pages cost the stream 9 bytes each, so the
/// byte budget alone would let one chunk scan all of RAM while the VM lock is held.
const MAX_PAGES_PER_ITERATION: u64 = 16 * 1024;
/// Longest one iteration may run (checked every 256 pages), as QEMU's 50 ms bound.
const MAX_ITERATION_TIME: std::time::Duration = std::time::Duration::from_millis(20);

/// The live section that migrates every block of a [`RamList`].
///
/// Saving: setup marks every used page dirty, starts each block's dirty log and sends the
/// block list; iterate walks the migration bitmaps from where it stopped
/// (`last_seen_block`), sends a ZERO record for an all-zero page and a PAGE record (the
/// page queued by reference, not copied) otherwise, leaves out the block name while the
/// block equals `last_sent_block`, and stops when the file's budget is used; pending is
/// dirty pages × page size; complete sends everything left. A change of the list's version
/// fails the migration.
///
/// Loading: the block list must name exactly our blocks with our sizes; every page record
/// must fall inside its block; a zero page's fill byte must be 0.
///
/// All fields are touched only by the thread that runs the migration or the load.
pub struct RamSection {
    list: Arc<RamList>,
    stats: Arc<RamStats>,
    /// The blocks as they were at setup, with a keep-alive for zero-copy sends.
    blocks: Vec<(Arc<RamBlock>, KeepAlive)>,
    version: u64,
    last_seen_block: usize,
    last_page: usize,
    last_sent_block: Option<usize>,
    last_sync: Option<(Instant, u64)>,
    logging: bool,
    /// Which pages were never populated (their zero check needs no read).
    populated: Populated,
    /// With multifd: the channels that carry normal pages (zero pages stay here).
    multifd: Option<MultifdSender>,
    /// `x-ignore-shared`: shared blocks are handed over, not sent (both sides).
    ignore_shared: bool,
    /// This migration's setup handed memory over.
    handed_over: bool,
    /// Post-copy: pages the destination asked for, sent before the background pass.
    requests: Option<Arc<PageRequests>>,
    /// The `postcopy-ram` capability (both sides).
    postcopy: bool,
    /// Post-copy (source): the switch happened; pages go on the main stream only.
    switched: bool,
    // Load side.
    /// With multifd: the channels that load normal pages; each EOS waits for them.
    multifd_recv: Option<Arc<MultifdReceiver>>,
    load_listed: bool,
    load_block: Option<Arc<RamBlock>>,
    /// Blocks whose memory the source handed over: no page may be loaded into them.
    adopted: Vec<Arc<RamBlock>>,
    /// The destination's memory is all zero when the load starts (a new VM): pages no
    /// PAGE record wrote are known to be zero (tracked in the blocks' bitmaps).
    fresh: bool,
    /// Post-copy (destination): the source advised it.
    advised: bool,
    /// Post-copy (destination): what outlives the load (shared with the VMM).
    incoming: Arc<PostcopyIncoming>,
    /// Post-copy (destination), from LISTEN: the registered RAM pages are placed in.
    listening: Option<Arc<PostcopyRam>>,
    /// Post-copy (destination), from LISTEN: consecutive pages read and not placed yet.
    batch: PlaceBatch,
    /// Post-copy (destination), from ADVISE to LISTEN: per block, the pages pre-copy sent
    /// as zero that this side left unwritten (known zero in fresh memory); LISTEN maps
    /// them, so they do not fault afterwards (the source will not send them again).
    zero_absent: Vec<(Arc<RamBlock>, DirtyBitmap)>,
    /// Post-copy (destination), from ADVISE to LISTEN: per block, the pages the source's
    /// discards dropped (the others are there at LISTEN).
    dropped: Vec<(Arc<RamBlock>, DirtyBitmap)>,
}

impl fmt::Debug for RamSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamSection")
            .field("blocks", &self.blocks.len())
            .field("version", &self.version)
            .field("last_seen_block", &self.last_seen_block)
            .field("last_page", &self.last_page)
            .finish()
    }
}

impl RamSection {
    /// The section for `list`, reporting into `stats`.
    pub fn new(list: Arc<RamList>, stats: Arc<RamStats>) -> Self {
        RamSection {
            list,
            stats,
            blocks: Vec::new(),
            version: 0,
            last_seen_block: 0,
            last_page: 0,
            last_sent_block: None,
            last_sync: None,
            logging: false,
            populated: Populated::new(),
            multifd: None,
            ignore_shared: false,
            handed_over: false,
            requests: None,
            postcopy: false,
            switched: false,
            advised: false,
            incoming: Arc::default(),
            listening: None,
            batch: PlaceBatch::default(),
            zero_absent: Vec::new(),
            dropped: Vec::new(),
            multifd_recv: None,
            adopted: Vec::new(),
            load_listed: false,
            fresh: false,
            load_block: None,
        }
    }

    /// Declares that the memory a load goes into is all zero (a VM that never ran): ZERO
    /// records for pages the load has not written then cost nothing, not even a read.
    pub fn with_fresh_memory(mut self) -> Self {
        self.fresh = true;
        self
    }

    /// Sends normal pages over multifd channels (QEMU 7.2's layout: zero pages and the
    /// records' order stay on the main stream; every EOS record follows a SYNC packet on
    /// each channel).
    pub fn with_multifd(mut self, channels: MultifdSender) -> Self {
        self.multifd = Some(channels);
        self
    }

    /// Loads normal pages from multifd channels: each EOS record waits until every
    /// channel applied that round's pages.
    pub fn with_multifd_receiver(mut self, channels: Arc<MultifdReceiver>) -> Self {
        self.multifd_recv = Some(channels);
        self
    }

    /// The `x-ignore-shared` capability (QEMU's name; set it on both sides): blocks
    /// with [`SharedMemory`](crate::SharedMemory) send no pages; their memory is handed
    /// over with the stream over a unix socket, to a process of the same user, and the
    /// destination maps it in place of its own. The block list carries each block's
    /// guest address, as QEMU's does.
    pub fn with_ignore_shared(mut self, on: bool) -> Self {
        self.ignore_shared = on;
        self
    }

    /// The `postcopy-ram` capability (set it on both sides): a source may switch to
    /// post-copy, its requested pages served first; a destination takes the switch,
    /// its RAM registered with userfaultfd from LISTEN on, so that the guest waits for
    /// the pages it lacks. A destination's VMM keeps `incoming` for as long as the
    /// guest may lack pages (a load that stops half-way leaves RAM registered there, the
    /// guest waiting rather than reading zeros), and reads the faults' waits from it; a
    /// source's is unused.
    pub fn with_postcopy(mut self, incoming: Arc<PostcopyIncoming>) -> Self {
        self.postcopy = true;
        self.requests
            .get_or_insert_with(|| Arc::new(PageRequests::new()));
        self.incoming = incoming;
        self
    }

    /// Serves the pages in `requests` (a post-copy destination's) before the dirty pages
    /// of the background pass, each once (a page sent since it was asked for is not sent
    /// again); the pass goes on after the last page served, as QEMU's does.
    pub fn with_page_requests(mut self, requests: Arc<PageRequests>) -> Self {
        self.requests = Some(requests);
        self
    }

    /// The next requested page still to send, as (block, page).
    ///
    /// # Errors
    /// A request for a block this migration does not send, or past its end.
    fn next_requested(&self) -> Result<Option<(usize, usize)>> {
        let Some(r) = &self.requests else {
            return Ok(None);
        };
        while let Some((name, offset)) = r.pop() {
            let Some(bi) = self.blocks.iter().position(|(b, _)| b.idstr() == name) else {
                return Err(Error::BadPageRequest {
                    reason: format!("no block {name:?} is migrated"),
                });
            };
            let block = &self.blocks[bi].0;
            if offset >= block.used_length() {
                return Err(Error::BadPageRequest {
                    reason: format!(
                        "offset {offset:#x} is past the end of block {name:?} ({} bytes)",
                        block.used_length()
                    ),
                });
            }
            let page = (offset / TARGET_PAGE_SIZE) as usize;
            if block.bitmap.test(page) {
                return Ok(Some((bi, page)));
            }
        }
        Ok(None)
    }

    /// How the section registers: `"ram"`, instance 0, version 4.
    pub fn info() -> SectionInfo {
        SectionInfo::new("ram", 0, RAM_SECTION_VERSION)
    }

    fn check_version(&self) -> Result<()> {
        let now = self.list.version();
        if now != self.version {
            return Err(Error::ListChanged {
                at_setup: self.version,
                now,
            });
        }
        Ok(())
    }

    /// What is still to send: dirty pages, and pages handed to multifd channels that
    /// they have not written yet.
    fn pending_bytes(&self) -> u64 {
        self.dirty_pages() * TARGET_PAGE_SIZE + self.multifd.as_ref().map_or(0, |m| m.in_flight())
    }

    fn dirty_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|(b, _)| b.bitmap.dirty_count() as u64)
            .sum()
    }

    /// The next dirty page at or after the cursor, wrapping around once.
    fn find_dirty(&self) -> Option<(usize, usize)> {
        let n = self.blocks.len();
        for k in 0..=n {
            let bi = (self.last_seen_block + k) % n;
            let from = if k == 0 { self.last_page } else { 0 };
            let (b, _) = &self.blocks[bi];
            if b.bitmap.dirty_count() == 0 {
                continue;
            }
            if let Some(p) = b.bitmap.find_next_dirty(from) {
                if p < b.used_pages() {
                    return Some((bi, p));
                }
            }
        }
        None
    }

    /// Sends dirty pages until none is left or (`limited`) the budget is used. Returns
    /// whether none is left.
    ///
    /// # Errors
    /// A dirty log that cannot re-arm a chunk before its pages are read (the EOS record
    /// is still written, so the stream stays well-formed up to the failure).
    fn send_pages(&mut self, f: &mut QemuFile, limited: bool) -> Result<bool> {
        if self.blocks.is_empty() {
            // Nothing to send (no blocks, or all handed over): the payload still ends.
            f.put_be64(RAM_SAVE_FLAG_EOS);
            return Ok(true);
        }
        let mut failed = None;
        let (mut zero, mut normal) = (0u64, 0u64);
        let started = Instant::now();
        if let Some(m) = &mut self.multifd {
            // Stopped (not `limited`), everything goes at once, as QEMU's completion.
            m.set_bandwidth(if limited {
                f.rate_limiter().max_bytes_per_sec()
            } else {
                0
            });
        }
        let done = loop {
            let requested = match self.next_requested() {
                Ok(r) => r,
                Err(e) => {
                    failed = Some(e);
                    break false;
                }
            };
            let was_requested = requested.is_some();
            let Some((bi, page)) = requested.or_else(|| self.find_dirty()) else {
                break true;
            };
            let (block, owner) = &self.blocks[bi];
            if let Some(m) = &self.multifd {
                if !m.can_take(block) {
                    if limited {
                        // The channels are full: the rest waits for the next iteration.
                        break false;
                    }
                    if let Err(e) = m.wait_one() {
                        failed = Some(e);
                        break false;
                    }
                }
            }
            self.last_seen_block = bi;
            self.last_page = page + 1;
            if !block.bitmap.test_and_clear(page) {
                continue;
            }
            // Writes from here on are logged again, before the page is looked at.
            match block.arm_before_send(page) {
                Ok(true) => self.populated.invalidate(),
                Ok(false) => {}
                Err(e) => {
                    block.bitmap.set(page);
                    failed = Some(e);
                    break false;
                }
            }
            let idstr = (self.last_sent_block != Some(bi)).then(|| block.idstr());
            let offset = page as u64 * TARGET_PAGE_SIZE;
            let never_populated = block.host().unpopulated_is_zero()
                && self.populated.never_populated(
                    block.page_ptr(page) as usize,
                    block.armed_span_end(page) - page,
                );
            if never_populated || block.is_zero_page(page) {
                RecordHeader::write_page(f, offset, RAM_SAVE_FLAG_ZERO, idstr);
                f.put_u8(0);
                zero += 1;
                self.last_sent_block = Some(bi);
            } else if let Some(m) = &mut self.multifd {
                if let Err(e) = m.push(block, page) {
                    failed = Some(e);
                    break false;
                }
                f.account_elsewhere(m.take_written());
                normal += 1;
            } else {
                RecordHeader::write_page(f, offset, RAM_SAVE_FLAG_PAGE, idstr);
                // SAFETY: the page lies inside the block's backing (`page < used_pages`),
                // which `owner` (the block itself) keeps mapped.
                unsafe {
                    f.put_buffer_external(block.page_ptr(page), TARGET_PAGE_SIZE as usize, owner)
                };
                normal += 1;
                self.last_sent_block = Some(bi);
            }
            let examined = zero + normal;
            // A requested page goes out now: the guest waits for it.
            let flush_now = was_requested && self.requests.as_ref().is_some_and(|r| r.is_empty());
            if limited
                && (flush_now
                    || f.budget_exhausted()
                    || examined >= MAX_PAGES_PER_ITERATION
                    || (examined % 256 == 0 && started.elapsed() >= MAX_ITERATION_TIME))
            {
                break self.dirty_pages() == 0;
            }
        };
        if let Some(m) = &mut self.multifd {
            if let Err(e) = m.end_round() {
                failed.get_or_insert(e);
            }
            f.account_elsewhere(m.take_written());
        }
        f.put_be64(RAM_SAVE_FLAG_EOS);
        self.stats.add_pages(zero, normal);
        self.stats.set_remaining(self.pending_bytes());
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    fn sync(&mut self) -> Result<u64> {
        self.check_version()?;
        if self.switched {
            // After the switch to post-copy the guest runs elsewhere: nothing to sync.
            return Ok(self.pending_bytes());
        }
        // A sync folds writes into bits that may still be set from before, so a page
        // written since the pagemap window was read goes only once: the window must not
        // say it was never populated.
        self.populated.invalidate();
        let mut newly = 0u64;
        for (b, _) in &self.blocks {
            newly += b.sync_dirty_log()? as u64;
        }
        let now = Instant::now();
        let sent = self.stats.pages_sent();
        let (dirty_rate, send_rate) = match self.last_sync {
            Some((t, sent_then)) => {
                let secs = now.duration_since(t).as_secs_f64().max(1e-6);
                (
                    (newly as f64 / secs) as u64,
                    ((sent - sent_then) as f64 / secs) as u64,
                )
            }
            None => (0, 0),
        };
        self.last_sync = Some((now, sent));
        self.stats.synced(dirty_rate, send_rate);
        let pending = self.pending_bytes();
        self.stats.set_remaining(pending);
        Ok(pending)
    }

    fn stop_logging(&mut self) {
        if self.logging {
            for (b, _) in &self.blocks {
                let _ = b.log().stop();
            }
            self.logging = false;
        }
    }

    fn load_records(&mut self, f: &mut QemuFile) -> Result<()> {
        const RAM_SAVE_FLAG_EOS_FLUSH: u64 = RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_MULTIFD_FLUSH;
        loop {
            let at = f.bytes_read();
            let h = RecordHeader::read_from(f)?;
            // As QEMU's ram_load: one kind per record (CONTINUE only on pages); anything
            // else, flags 0 included, is refused rather than skipped.
            let kind = h.flags & !RAM_SAVE_FLAG_CONTINUE;
            match kind {
                RAM_SAVE_FLAG_MEM_SIZE if h.flags == kind => self.load_block_list(f, h.offset)?,
                RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE => self.load_page(f, &h, at)?,
                RAM_SAVE_FLAG_MULTIFD_FLUSH if h.flags == kind => {}
                RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_EOS_FLUSH if h.flags == kind => {
                    // After post-copy's switch the channels carry nothing (the source
                    // closed them): its pages come on this stream.
                    if let (Some(m), None) = (&self.multifd_recv, &self.listening) {
                        m.sync()?;
                    }
                    self.populate_zero_absent()?;
                    return Ok(());
                }
                _ => return Err(Error::UnknownFlags { at, flags: h.flags }),
            }
        }
    }

    /// Post-copy advised, before LISTEN: maps the zero pages left absent so far, a run
    /// at a time (`MADV_POPULATE_READ`, as a read of each page would, without a fault
    /// apiece), so that LISTEN, in the guest's pause, has little left to map.
    fn populate_zero_absent(&mut self) -> Result<()> {
        if self.listening.is_some() {
            return Ok(());
        }
        for (b, z) in &self.zero_absent {
            if z.dirty_count() == 0 {
                continue;
            }
            for r in z.ranges() {
                let len = r.len() * TARGET_PAGE_SIZE as usize;
                // SAFETY: the range lies inside the block's mapping (its bitmap has a bit
                // per used page); populating reads it, which the guest (not running)
                // cannot notice.
                let rc = unsafe {
                    libc::madvise(b.page_ptr(r.start).cast(), len, libc::MADV_POPULATE_READ)
                };
                if rc != 0 {
                    // An older kernel: LISTEN maps them instead.
                    return Ok(());
                }
                for p in r {
                    z.test_and_clear(p);
                }
            }
        }
        Ok(())
    }

    fn load_block_list(&mut self, f: &mut QemuFile, total: u64) -> Result<()> {
        let blocks = self.list.blocks();
        if self.load_listed {
            return Err(Error::BadBlockList {
                reason: "the block list was sent twice".into(),
            });
        }
        let entries = read_block_list(f, total, blocks.len(), self.ignore_shared)?;
        // The descriptors of handed-over memory came with the list's first bytes.
        let mut fds = std::collections::VecDeque::from(f.take_received_fds());
        let mut adopt = Vec::new();
        for e in &entries {
            let b = blocks
                .iter()
                .find(|b| b.idstr() == e.idstr)
                .ok_or_else(|| Error::UnknownBlock {
                    idstr: e.idstr.clone(),
                })?;
            if b.used_length() != e.used_length {
                return Err(Error::SizeMismatch {
                    idstr: e.idstr.clone(),
                    local: b.used_length(),
                    stream: e.used_length,
                });
            }
            if let (Some(addr), Some(shared)) = (e.addr, b.shared()) {
                if addr != b.guest_address() {
                    return Err(Error::BadBlockList {
                        reason: format!(
                            "Mismatched GPAs for block {:?}: {addr:#x} in the stream, {:#x} here",
                            e.idstr,
                            b.guest_address()
                        ),
                    });
                }
                let fd = fds.pop_front().ok_or_else(|| Error::HandOver {
                    idstr: e.idstr.clone(),
                    reason: "the source passed no descriptor for it: its memory is not shared \
                             (start both sides with the same memory backend), or the stream did \
                             not come over a unix: socket"
                        .into(),
                })?;
                adopt.push((b.clone(), shared.clone(), fd));
            }
        }
        if let Some(missing) = blocks
            .iter()
            .find(|b| !entries.iter().any(|e| e.idstr == b.idstr()))
        {
            return Err(Error::BadBlockList {
                reason: format!(
                    "it does not include this VM's block {:?}: the source has different memory devices",
                    missing.idstr()
                ),
            });
        }
        if !fds.is_empty() && !self.ignore_shared {
            return Err(Error::BadBlockList {
                reason: "the source handed its memory over (x-ignore-shared), but this side's \
                         x-ignore-shared capability is off: set it on both sides"
                    .into(),
            });
        }
        if !fds.is_empty() {
            return Err(Error::BadBlockList {
                reason: format!(
                    "the source handed over the memory of {} block(s) that this VM keeps private: \
                     start both sides with the same memory backend",
                    fds.len()
                ),
            });
        }
        if let Some((b, _, _)) = adopt.first() {
            check_same_user(f, b.idstr(), "the descriptor comes from")?;
        }
        for (b, shared, fd) in adopt {
            shared.adopt(fd).map_err(|e| Error::HandOver {
                idstr: b.idstr().to_string(),
                reason: e.to_string(),
            })?;
            self.adopted.push(b);
        }
        let total: u64 = blocks
            .iter()
            .filter(|b| !self.adopted.iter().any(|a| Arc::ptr_eq(a, b)))
            .map(|b| b.used_length())
            .sum();
        self.stats.reset(total);
        self.load_listed = true;
        Ok(())
    }

    fn load_page(&mut self, f: &mut QemuFile, h: &RecordHeader, at: u64) -> Result<()> {
        let bad = |reason: String| Error::BadPage { at, reason };
        if !self.load_listed {
            return Err(bad("a page came before the block list".into()));
        }
        if let Some(name) = &h.idstr {
            let b = self.list.find(name).ok_or_else(|| Error::UnknownBlock {
                idstr: name.clone(),
            })?;
            self.load_block = Some(b);
        }
        let block = self
            .load_block
            .as_ref()
            .ok_or_else(|| bad("CONTINUE with no previous block".into()))?;
        if self.adopted.iter().any(|a| Arc::ptr_eq(a, block)) {
            return Err(bad(format!(
                "a page of block {:?}, whose memory the source handed over",
                block.idstr()
            )));
        }
        // Offsets are page aligned, so this bound is exact and cannot overflow.
        if h.offset >= block.used_length() {
            return Err(bad(format!(
                "offset {:#x} is past the end of block {:?} ({} bytes)",
                h.offset,
                block.idstr(),
                block.used_length()
            )));
        }
        let page = (h.offset / TARGET_PAGE_SIZE) as usize;
        if h.flags & RAM_SAVE_FLAG_ZERO != 0 {
            let fill = f.get_u8()?;
            if fill != 0 {
                return Err(bad(format!("a zero page has fill byte {fill:#04x}, not 0")));
            }
            // A page known to be zero is left alone; otherwise one that is already zero is
            // not written (so not allocated).
            if let Some(ram) = &self.listening {
                ram.place(block.idstr(), h.offset, None)?;
                self.stats.add_pages(1, 0);
                return Ok(());
            }
            let known_zero = self.fresh && !block.bitmap.test(page);
            if known_zero && self.advised {
                // Left absent, it would fault after LISTEN and the source, which sent
                // it, would not send it again: LISTEN maps it.
                if let Some((_, z)) = self.zero_absent.iter().find(|(b, _)| Arc::ptr_eq(b, block)) {
                    z.set(page);
                }
            } else if !known_zero && !block.is_zero_page(page) {
                block.write_bytes(h.offset, &[0; TARGET_PAGE_SIZE as usize]);
            }
            self.stats.add_pages(1, 0);
        } else if let Some(ram) = &self.listening {
            // The guest runs: pages are placed whole, atomically, waking their waiters; a
            // run of consecutive pages with one call, never held while the stream waits.
            let block = block.clone();
            if !self.batch.continues(&block, h.offset) {
                self.batch.place(ram)?;
                self.batch.start(block, h.offset);
            }
            self.batch.read_page(f)?;
            self.stats.add_pages(0, 1);
            let next = h.offset + TARGET_PAGE_SIZE;
            if self.batch.is_full() || !next_page_is(f, next)? {
                self.batch.place(ram)?;
            }
        } else {
            // SAFETY: the page is inside the block's backing (checked above), and the
            // destination VM does not run during a load, so nothing else accesses it.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(block.page_ptr(page), TARGET_PAGE_SIZE as usize)
            };
            // Written once and not read until the guest runs: past the cache.
            f.get_buffer_streaming(dst)?;
            if self.fresh {
                block.bitmap.set(page);
            }
            if let Some((_, z)) = self.zero_absent.iter().find(|(b, _)| Arc::ptr_eq(b, block)) {
                z.test_and_clear(page);
            }
            self.stats.add_pages(0, 1);
        }
        Ok(())
    }
}

/// The descriptors of the shared blocks `handed` for the destination, after checking
/// that the stream can carry them to a process of this user.
fn hand_over(f: &QemuFile, handed: &[Arc<RamBlock>]) -> Result<Vec<OwnedFd>> {
    let Some(first) = handed.first() else {
        return Ok(Vec::new());
    };
    check_same_user(f, first.idstr(), "the destination is")?;
    handed
        .iter()
        .map(|b| {
            let shared = b.shared().expect("only shared blocks are handed over");
            shared.descriptor().map_err(|e| Error::HandOver {
                idstr: b.idstr().to_string(),
                reason: format!("duplicating its descriptor: {e}"),
            })
        })
        .collect()
}

/// Memory goes only between processes of one user, over a unix socket.
fn check_same_user(f: &QemuFile, idstr: &str, peer: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let refuse = |reason: String| Error::HandOver {
        idstr: idstr.to_string(),
        reason,
    };
    match f.peer_uid() {
        Some(uid) if uid == me => Ok(()),
        Some(uid) => Err(refuse(format!(
            "{peer} a process of user {uid}, not of this one ({me}): memory is handed over only \
             between processes of the same user"
        ))),
        None => Err(refuse(format!(
            "x-ignore-shared passes the memory's descriptor, which only a unix: socket without TLS \
             carries, not {}: migrate to a unix: URI, or turn x-ignore-shared off to copy the memory",
            f.name()
        ))),
    }
}

impl SectionHandler for RamSection {
    fn setup(&mut self, f: &mut QemuFile) -> std::result::Result<(), SectionError> {
        let (blocks, version) = self.list.snapshot();
        self.version = version;
        let entries: Vec<BlockEntry> = blocks
            .iter()
            .map(|b| BlockEntry {
                idstr: b.idstr().to_string(),
                used_length: b.used_length(),
                addr: self.ignore_shared.then(|| b.guest_address()),
            })
            .collect();
        let (handed, sent): (Vec<_>, Vec<_>) = blocks
            .into_iter()
            .partition(|b| self.ignore_shared && b.shared().is_some());
        let fds = hand_over(f, &handed)?;
        self.blocks = sent
            .into_iter()
            .map(|b| {
                let owner: KeepAlive = b.clone();
                (b, owner)
            })
            .collect();
        self.last_seen_block = 0;
        self.last_page = 0;
        self.last_sent_block = None;
        self.last_sync = None;
        let total: u64 = self.blocks.iter().map(|(b, _)| b.used_length()).sum();
        self.stats.reset(total);
        for (b, _) in &self.blocks {
            b.bitmap.clear_all();
            b.bitmap.set_range(0..b.used_pages());
        }
        for i in 0..self.blocks.len() {
            let (b, _) = &self.blocks[i];
            if let Err(source) = b.start_logging() {
                for (b, _) in &self.blocks[..i] {
                    let _ = b.log().stop();
                }
                return Err(Box::new(Error::DirtyLog {
                    idstr: b.idstr().to_string(),
                    source,
                }));
            }
        }
        self.logging = true;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        write_block_list(f, &entries, &borrowed).map_err(Error::from)?;
        if let Some(m) = &mut self.multifd {
            m.end_round()?;
        }
        f.put_be64(RAM_SAVE_FLAG_EOS);
        self.handed_over = !fds.is_empty();
        Ok(())
    }

    fn setup_needs_acknowledgement(&self) -> bool {
        // The destination maps the memory: not in the pause.
        self.handed_over
    }

    fn prepare(&mut self, _budget: usize) -> std::result::Result<(), SectionError> {
        if let Some(m) = &self.multifd {
            // Without the VM lock: the channels drain to half full, so the iteration
            // that follows has room; with nothing dirty, what is in flight is all that
            // is pending: give it a moment rather than send an empty round.
            m.wait_room()?;
            if self.dirty_pages() == 0 && m.in_flight() > 0 {
                m.wait_drained(std::time::Duration::from_millis(5))?;
            }
        }
        Ok(())
    }

    fn iterate(&mut self, f: &mut QemuFile) -> std::result::Result<bool, SectionError> {
        self.check_version()?;
        Ok(self.send_pages(f, true)?)
    }

    fn pending_estimate(&self) -> u64 {
        self.pending_bytes()
    }

    fn pending_exact(&mut self) -> std::result::Result<u64, SectionError> {
        Ok(self.sync()?)
    }

    fn complete(&mut self, f: &mut QemuFile) -> std::result::Result<(), SectionError> {
        self.check_version()?;
        self.send_pages(f, false)?;
        if let Some(mut m) = self.multifd.take() {
            // Everything is queued: the channels write it out and end their connections.
            m.finish()?;
            f.account_elsewhere(m.take_written());
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        self.stop_logging();
        self.blocks.clear();
        // A failed or cancelled migration's channels stop (their connections are shut).
        self.multifd = None;
    }

    fn postcopy_capable(&self) -> bool {
        self.postcopy
    }

    fn page_requests(&self) -> Option<Arc<dyn savevm::return_path::PageRequestSink>> {
        match &self.requests {
            Some(r) if self.postcopy => Some(Arc::new(crate::preempt::RequestServer::new(
                r.clone(),
                self.blocks.iter().map(|(b, _)| b.clone()).collect(),
                self.stats.clone(),
            ))),
            _ => None,
        }
    }

    fn postcopy_switch(&mut self, f: &mut QemuFile) -> std::result::Result<(), SectionError> {
        self.check_version()?;
        // Pre-copy's multifd pages all went before the last round's EOS, which the
        // destination waits for before it reads on; from here pages go on the main
        // stream, as QEMU 7.2's post-copy does.
        if let Some(mut m) = self.multifd.take() {
            m.finish()?;
            f.account_elsewhere(m.take_written());
        }
        // The guest runs at the destination from now on: nothing here changes RAM. The
        // dirty log stays on, idle, until the end (turning it off costs milliseconds of
        // KVM's time, which would delay the pause or the first requested pages).
        self.switched = true;
        // Every run of pages still to send (never sent, or dirtied since) is dropped
        // there, so that the guest waits for it (QEMU's discard bitmap).
        for (b, _) in &self.blocks {
            let used = b.used_pages();
            let ranges: Vec<(u64, u64)> = b
                .bitmap
                .ranges()
                .filter(|r| r.start < used)
                .map(|r| {
                    let end = r.end.min(used);
                    (
                        r.start as u64 * TARGET_PAGE_SIZE,
                        (end - r.start) as u64 * TARGET_PAGE_SIZE,
                    )
                })
                .collect();
            savevm::postcopy::write_discards(f, b.idstr(), &ranges);
        }
        // The background pass starts again from the first block.
        self.last_seen_block = 0;
        self.last_page = 0;
        self.last_sent_block = None;
        Ok(f.check().map_err(Error::from)?)
    }

    fn postcopy_blocks(&self) -> Vec<String> {
        match self.switched {
            true => self
                .blocks
                .iter()
                .map(|(b, _)| b.idstr().to_string())
                .collect(),
            false => Vec::new(),
        }
    }

    fn postcopy_resume(
        &mut self,
        received: &[(String, Vec<u8>)],
    ) -> std::result::Result<(), SectionError> {
        for (b, _) in &self.blocks {
            let Some((_, bits)) = received.iter().find(|(n, _)| n == b.idstr()) else {
                return Err(Box::new(Error::Postcopy {
                    reason: format!("no received bitmap for block {:?}", b.idstr()),
                }));
            };
            let pages = b.used_pages();
            if bits.len() * 8 < pages {
                return Err(Box::new(Error::Postcopy {
                    reason: format!(
                        "a received bitmap of {} bytes for block {:?} of {pages} pages",
                        bits.len(),
                        b.idstr()
                    ),
                }));
            }
            // What the destination lacks goes again, whatever this side sent before the
            // break (QEMU's `ram_dirty_bitmap_reload`).
            for p in 0..pages {
                if bits[p / 8] & (1 << (p % 8)) == 0 {
                    b.bitmap.set(p);
                } else {
                    b.bitmap.test_and_clear(p);
                }
            }
        }
        if let Some(r) = &self.requests {
            r.clear();
        }
        // A new connection: the first page names its block.
        self.last_sent_block = None;
        self.last_seen_block = 0;
        self.last_page = 0;
        self.stats.set_remaining(self.pending_bytes());
        Ok(())
    }

    fn load_postcopy_recv_bitmap(
        &mut self,
        block: &str,
    ) -> std::result::Result<Option<Vec<u8>>, SectionError> {
        match &self.listening {
            Some(ram) => Ok(ram.received_bitmap(block)),
            None => Err(Box::new(Error::Postcopy {
                reason: "RECV_BITMAP before LISTEN".into(),
            })),
        }
    }

    fn load_postcopy_resume(
        &mut self,
        rp: &Arc<savevm::return_path::ReturnPath>,
    ) -> std::result::Result<(), SectionError> {
        if self.listening.is_some() {
            self.incoming.request_again(rp)?;
        }
        // A new connection: its first page names its block.
        self.load_block = None;
        Ok(())
    }

    fn load_postcopy_advise(&mut self) -> std::result::Result<bool, SectionError> {
        if !self.postcopy {
            return Err(Box::new(Error::Postcopy {
                reason: "the source advised post-copy, but the postcopy-ram capability is off \
                         on this side: set it on both sides"
                    .into(),
            }));
        }
        if self.ignore_shared {
            return Err(Box::new(Error::Postcopy {
                reason: "x-ignore-shared and post-copy do not go together (as in QEMU)".into(),
            }));
        }
        crate::Userfault::new().map_err(|e| Error::Postcopy {
            reason: format!("this host cannot wait for pages (userfaultfd): {e}"),
        })?;
        self.advised = true;
        let per_block = || -> Vec<(Arc<RamBlock>, DirtyBitmap)> {
            self.list
                .blocks()
                .into_iter()
                .map(|b| {
                    let z = DirtyBitmap::new(b.used_pages());
                    (b, z)
                })
                .collect()
        };
        self.zero_absent = per_block();
        self.dropped = per_block();
        Ok(true)
    }

    fn load_postcopy_discard(
        &mut self,
        block: &str,
        ranges: &[(u64, u64)],
    ) -> std::result::Result<bool, SectionError> {
        let Some(b) = self.list.find(block) else {
            return Ok(false);
        };
        let zero = self.zero_absent.iter().find(|(x, _)| Arc::ptr_eq(x, &b));
        let dropped = self.dropped.iter().find(|(x, _)| Arc::ptr_eq(x, &b));
        for &(start, len) in ranges {
            crate::postcopy_ram::drop_pages(&b, start, len)?;
            let pages =
                (start / TARGET_PAGE_SIZE) as usize..((start + len) / TARGET_PAGE_SIZE) as usize;
            if let Some((_, d)) = dropped {
                d.set_range(pages.clone());
            }
            // (Pre-copy's EOS mapped them as it went: rarely any left.)
            if let Some((_, z)) = zero.filter(|(_, z)| z.dirty_count() > 0) {
                for p in pages {
                    z.test_and_clear(p);
                }
            }
        }
        Ok(true)
    }

    fn load_postcopy_listen(
        &mut self,
        rp: &Arc<savevm::return_path::ReturnPath>,
    ) -> std::result::Result<(), SectionError> {
        if !self.advised {
            return Err(Box::new(Error::Postcopy {
                reason: "LISTEN before ADVISE".into(),
            }));
        }
        let ram = self
            .incoming
            .listen(&self.list, rp.clone(), self.stats.clone())?;
        for (b, d) in std::mem::take(&mut self.dropped) {
            ram.set_received_except(&b, &d);
        }
        for (b, z) in std::mem::take(&mut self.zero_absent) {
            for r in z.ranges() {
                ram.place_zero_range(
                    b.idstr(),
                    r.start as u64 * TARGET_PAGE_SIZE,
                    r.len() as u64 * TARGET_PAGE_SIZE,
                )?;
            }
        }
        self.listening = Some(ram);
        Ok(())
    }

    fn load_setup(&mut self) -> std::result::Result<(), SectionError> {
        self.load_listed = false;
        self.load_block = None;
        self.adopted.clear();
        if self.fresh {
            // The bitmaps record what this load writes (a later migration resets them).
            for b in self.list.blocks() {
                b.bitmap.clear_all();
            }
        }
        Ok(())
    }

    fn load_cleanup(&mut self, ok: bool) -> std::result::Result<(), SectionError> {
        if self.listening.take().is_some() && ok {
            // Every page arrived: the guest no longer waits for any.
            self.incoming.complete()?;
        }
        // Otherwise the registration stays (in `incoming`): the guest waits for pages
        // that have not come rather than read them as zeros.
        self.advised = false;
        self.zero_absent.clear();
        self.dropped.clear();
        Ok(())
    }

    fn load(&mut self, f: &mut QemuFile, version_id: u32) -> std::result::Result<(), SectionError> {
        if version_id != RAM_SECTION_VERSION {
            return Err(Box::new(Error::Version(version_id)));
        }
        let loaded = self.load_records(f);
        // Pages were written with non-temporal stores: ordered before whatever follows
        // the load (the vCPUs, another thread's hash).
        qemu_file::store_fence();
        Ok(loaded?)
    }
}

impl Drop for RamSection {
    fn drop(&mut self) {
        self.stop_logging();
    }
}
