//! `RamBlock`: one named range of guest RAM with its migration bitmap and dirty log.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dirty_bitmap::{DirtyBitmap, DirtyLogSource};

use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, RamBacking, Result, SharedMemory};

/// A RAM block (QEMU's `RAMBlock`): a named range of guest RAM backed by host memory.
///
/// The name (`idstr`) identifies the block in the stream, so both sides must use the same
/// names. The block owns its migration bitmap (pages still to send) and its dirty-log
/// source (where written pages come from).
pub struct RamBlock {
    // Immutable after creation.
    idstr: String,
    host: Arc<dyn RamBacking>,
    max_length: u64,
    page_size: usize,
    /// The memory, when another process can map it (a local hand-over passes it).
    shared: Option<Arc<dyn SharedMemory>>,
    /// Guest-physical address of the block's start (QEMU's `mr->addr`).
    guest_address: u64,
    // Lock: written only by `RamList` under its mutex (which also bumps the list's
    // version); read by anyone.
    offset: AtomicU64,
    used_length: AtomicU64,
    /// Pages still to send: set by dirty syncs and setup, cleared by the sender. Atomic
    /// words; in practice only the migration thread touches it.
    pub(crate) bitmap: DirtyBitmap,
    // Lock: its own mutex; held by the migration thread across start, sync, clear and
    // stop.
    log: Mutex<Box<dyn DirtyLogSource>>,
    /// With a log that re-arms pages only when told ([`DirtyLogSource::clear`]): pages per
    /// chunk, and one bit per chunk that a sync reported pages in and no clear re-armed
    /// yet (QEMU's `clear_bmap`). Only the migration thread touches it.
    clear: Option<(usize, DirtyBitmap)>,
}

impl fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBlock")
            .field("idstr", &self.idstr)
            .field("offset", &self.offset())
            .field("used_length", &self.used_length())
            .field("max_length", &self.max_length)
            .field("dirty", &self.bitmap.dirty_count())
            .finish()
    }
}

impl RamBlock {
    /// A block named `idstr` over all of `host`, whose writes `log` reports. The page size
    /// is the target page size; use [`RamBlock::with_page_size`] for huge-page backings.
    ///
    /// # Errors
    /// [`Error::BadName`] for an empty or 128+ byte name, [`Error::BadSize`] for a backing
    /// that is not a whole number of pages.
    pub fn new(
        idstr: impl Into<String>,
        host: Arc<dyn RamBacking>,
        log: Box<dyn DirtyLogSource>,
    ) -> Result<Self> {
        let idstr = idstr.into();
        if idstr.is_empty() || idstr.len() > 127 {
            return Err(Error::BadName {
                len: idstr.len(),
                idstr,
            });
        }
        let size = host.size() as u64;
        if size == 0 || size % TARGET_PAGE_SIZE != 0 {
            return Err(Error::BadSize {
                idstr,
                reason: format!("{size} bytes is not a positive multiple of {TARGET_PAGE_SIZE}"),
            });
        }
        let pages = (size / TARGET_PAGE_SIZE) as usize;
        let clear = log
            .clear_granularity()
            .filter(|&g| g > 0)
            .map(|g| (g, DirtyBitmap::new(pages.div_ceil(g))));
        Ok(RamBlock {
            clear,
            idstr,
            max_length: size,
            page_size: TARGET_PAGE_SIZE as usize,
            shared: None,
            guest_address: 0,
            offset: AtomicU64::new(0),
            used_length: AtomicU64::new(size),
            bitmap: DirtyBitmap::new(pages),
            log: Mutex::new(log),
            host,
        })
    }

    /// Records the host page size of the backing (informational; records stay 4 KiB).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size;
        self
    }

    /// Declares the block's memory shared: with the `x-ignore-shared` capability its
    /// pages are not sent but its memory handed over ([`SharedMemory`]).
    pub fn with_shared(mut self, memory: Arc<dyn SharedMemory>) -> Self {
        self.shared = Some(memory);
        self
    }

    /// Sets the guest-physical address where the block starts (0 by default), which
    /// `x-ignore-shared` streams carry and check.
    pub fn with_guest_address(mut self, gpa: u64) -> Self {
        self.guest_address = gpa;
        self
    }

    /// The block's shared memory, if it is shared.
    pub fn shared(&self) -> Option<&Arc<dyn SharedMemory>> {
        self.shared.as_ref()
    }

    /// Guest-physical address of the block's start.
    pub fn guest_address(&self) -> u64 {
        self.guest_address
    }

    /// The block's name in the stream.
    pub fn idstr(&self) -> &str {
        &self.idstr
    }

    /// Where the block starts in the RAM address space (QEMU's `ram_addr_t`).
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    pub(crate) fn set_offset(&self, offset: u64) {
        self.offset.store(offset, Ordering::Release);
    }

    /// Bytes in use (what migrates).
    pub fn used_length(&self) -> u64 {
        self.used_length.load(Ordering::Acquire)
    }

    pub(crate) fn set_used_length(&self, len: u64) {
        self.used_length.store(len, Ordering::Release);
    }

    /// Size of the backing: the most the block can grow to.
    pub fn max_length(&self) -> u64 {
        self.max_length
    }

    /// Host page size of the backing.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Target pages in use.
    pub fn used_pages(&self) -> usize {
        (self.used_length() / TARGET_PAGE_SIZE) as usize
    }

    /// The host memory.
    pub fn host(&self) -> &Arc<dyn RamBacking> {
        &self.host
    }

    /// Host address of target page `page`.
    ///
    /// # Panics
    /// If `page` is past the backing (a bug in the caller).
    pub fn page_ptr(&self, page: usize) -> *mut u8 {
        assert!(
            (page as u64) < self.max_length / TARGET_PAGE_SIZE,
            "page {page} past the block"
        );
        // SAFETY: in bounds of the backing, which `RamBacking` guarantees is mapped.
        unsafe { self.host.as_ptr().add(page * TARGET_PAGE_SIZE as usize) }
    }

    /// Whether target page `page` is all zero (the guest may be changing it).
    pub fn is_zero_page(&self, page: usize) -> bool {
        // SAFETY: `page_ptr` checked the page is inside the mapped backing.
        unsafe { crate::zero::is_zero(self.page_ptr(page), TARGET_PAGE_SIZE as usize) }
    }

    /// The migration bitmap: pages still to send.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// The block's dirty-log source.
    pub fn log(&self) -> MutexGuard<'_, Box<dyn DirtyLogSource>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves pages written since the last sync into the migration bitmap; returns how many
    /// became newly dirty.
    ///
    /// # Errors
    /// [`Error::DirtyLog`] when the source fails.
    pub fn sync_dirty_log(&self) -> Result<usize> {
        let newly = self
            .log()
            .sync(&self.bitmap)
            .map_err(|source| Error::DirtyLog {
                idstr: self.idstr.clone(),
                source,
            })?;
        if let Some((_, chunks)) = &self.clear {
            // Every chunk may hold reported pages; a clear of one without any is free.
            chunks.set_all();
        }
        Ok(newly)
    }

    /// Starts the dirty log. With a manual-protect log every chunk counts as reported
    /// (logging starts with nothing write-protected), so each is re-armed before the
    /// first pass reads it.
    ///
    /// # Errors
    /// The source's.
    pub fn start_logging(&self) -> dirty_bitmap::Result<()> {
        self.log().start()?;
        if let Some((_, chunks)) = &self.clear {
            chunks.set_all();
        }
        Ok(())
    }

    /// Makes sure writes to `page` from now on are logged, before the page is read to be
    /// sent: with a manual-protect log, the first page of each chunk since a sync
    /// re-arms the whole chunk.
    ///
    /// Returns whether it re-armed anything.
    ///
    /// # Errors
    /// [`Error::DirtyLog`] when the source fails; the page must not be sent.
    pub fn arm_before_send(&self, page: usize) -> Result<bool> {
        let Some((chunk, pending)) = &self.clear else {
            return Ok(false);
        };
        let c = page / chunk;
        if !pending.test_and_clear(c) {
            return Ok(false);
        }
        if let Err(source) = self.log().clear(c * chunk, *chunk) {
            pending.set(c);
            return Err(Error::DirtyLog {
                idstr: self.idstr.clone(),
                source,
            });
        }
        Ok(true)
    }

    /// The end of the span around `page` that one arm covers (its chunk, or the block).
    pub fn armed_span_end(&self, page: usize) -> usize {
        let end = match &self.clear {
            Some((chunk, _)) => (page / chunk + 1) * chunk,
            None => usize::MAX,
        };
        end.min(self.used_pages())
    }

    /// Copies `data` into the block at byte `offset` (the destination's load path, and
    /// tests). The caller must make sure no vCPU runs: guest memory is written directly.
    ///
    /// # Panics
    /// If the range is outside the backing.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) {
        assert!(
            offset + data.len() as u64 <= self.max_length,
            "write past the block"
        );
        // SAFETY: the range is inside the mapped backing (checked above); `data` cannot
        // overlap guest memory that we write to, as it is a Rust slice the caller owns.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.host.as_ptr().add(offset as usize),
                data.len(),
            );
        }
    }

    /// Copies bytes at `offset` out of the block into `out`.
    ///
    /// # Panics
    /// If the range is outside the backing.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) {
        assert!(
            offset + out.len() as u64 <= self.max_length,
            "read past the block"
        );
        // SAFETY: the range is inside the mapped backing (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.host.as_ptr().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
    }
}
