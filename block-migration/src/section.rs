//! `BlockMigration`: the live `"block"` section that copies disks while the guest writes
//! them.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use qemu_file::{KeepAlive, QemuFile};
use savevm::{SectionError, SectionHandler, SectionInfo};

use crate::format::{
    BLK_MIG_FLAG_DEVICE_BLOCK, BLK_MIG_FLAG_DEVICE_INFO, BLK_MIG_FLAG_EOS, BLK_MIG_FLAG_PROGRESS,
    BLK_MIG_FLAG_ZERO_BLOCK, CHUNK_SIZE, Record, SECTOR_SIZE, SECTORS_PER_CHUNK,
};
use dirty_bitmap::DirtyBitmap;

use crate::{BlockStats, Disk, Error, Result};

/// The version this section writes: QEMU's version 1 plus the device list at START.
pub const BLOCK_SECTION_VERSION: u32 = 2;

/// Where the copy of one disk stands (migration thread only).
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    /// Next chunk of the bulk copy.
    bulk_next: u64,
    bulk_done: bool,
    /// Where the search for dirty chunks goes on.
    dirty_next: u64,
}

/// The chunks to resend, as of the last sync, per disk. Writes mark the disk's own bitmap
/// as they happen; a sync moves those bits here, as the KVM dirty log does for RAM, so a
/// chunk the guest keeps writing is resent once per sync, not on every iteration.
fn sync_into(d: &Disk, to_send: &DirtyBitmap) -> u64 {
    let live = d.dirty();
    let mut raw = Vec::with_capacity(live.word_count());
    for w in 0..live.word_count() {
        raw.push(live.take_word(w));
    }
    // Both bitmaps cover the same chunks, so a merge at chunk 0 always fits.
    to_send.merge_raw(0, &raw).unwrap_or(0) as u64
}

/// A chunk read and waiting to be sent; `None` data: all zero.
struct Ready {
    disk: usize,
    chunk: u64,
    data: Option<Arc<Vec<u8>>>,
}

/// The live section that migrates the disks opened with `migrate=on`.
///
/// Saving: setup lists every disk with its size and clears the dirty bitmaps; each
/// iteration first copies the disks in bulk, chunk after chunk (an all-zero chunk as a
/// ZERO_BLOCK record), then resends chunks written since they were copied; chunks are read
/// in [`SectionHandler::prepare`], outside the VM lock, with one `pread` each, and queued
/// on the stream by reference. The migration cannot complete while a bulk copy runs. At
/// completion (the guest stopped, the disks flushed) whatever is left is sent.
///
/// Loading: the device list must name exactly this side's migrated disks with their sizes
/// (a disk opened with `create` takes the stream's size) before any chunk is written; every
/// chunk must fall inside its disk; the disks are flushed before the guest may run.
///
/// All fields are touched only by the thread that runs the migration or the load.
pub struct BlockMigration {
    disks: Vec<Arc<Disk>>,
    stats: Arc<BlockStats>,
    cursors: Vec<Cursor>,
    /// Per disk: the chunks the last sync found written (see [`sync_into`]).
    to_send: Vec<DirtyBitmap>,
    ready: VecDeque<Ready>,
    ready_bytes: u64,
    progress: Option<u64>,
    // Load side.
    listed: bool,
    created: Vec<bool>,
    last: Option<usize>,
    buf: Vec<u8>,
}

impl fmt::Debug for BlockMigration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockMigration")
            .field("disks", &self.disks)
            .field("ready", &self.ready.len())
            .finish()
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to gives aligned words in between.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|x| *x == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|x| *x == 0)
}

impl BlockMigration {
    /// The section for `disks` (those with `migrate=on`; others are ignored), reporting
    /// into `stats`. `created[i]` says that disk i was created on this destination and may
    /// take the stream's size.
    pub fn new(disks: Vec<Arc<Disk>>, stats: Arc<BlockStats>) -> Self {
        let disks: Vec<_> = disks.into_iter().filter(|d| d.migrates()).collect();
        let n = disks.len();
        BlockMigration {
            disks,
            stats,
            cursors: vec![Cursor::default(); n],
            to_send: Vec::new(),
            ready: VecDeque::new(),
            ready_bytes: 0,
            progress: None,
            listed: false,
            created: vec![false; n],
            last: None,
            buf: Vec::new(),
        }
    }

    /// Lets disk `name` take the stream's size (it was created empty on this destination).
    pub fn allow_resize(&mut self, name: &str) {
        if let Some(i) = self.disks.iter().position(|d| d.name() == name) {
            self.created[i] = true;
        }
    }

    /// How the section registers: `"block"`, instance 0, versions 1 to 2.
    pub fn info() -> SectionInfo {
        SectionInfo {
            idstr: "block".into(),
            instance_id: 0,
            version_id: BLOCK_SECTION_VERSION,
            minimum_version_id: 1,
        }
    }

    /// Whether any disk is migrated (otherwise the section need not be registered).
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// The next chunk to copy: the bulk copies first, then dirty chunks.
    fn next_chunk(&mut self) -> Option<(usize, u64)> {
        for (i, d) in self.disks.iter().enumerate() {
            let c = &mut self.cursors[i];
            let chunks = d.chunks();
            if !c.bulk_done {
                let chunk = c.bulk_next;
                c.bulk_next += 1;
                c.bulk_done = c.bulk_next >= chunks;
                if chunk < chunks {
                    // Copied now: only a write from here on makes it dirty again.
                    d.dirty().test_and_clear(chunk as usize);
                    return Some((i, chunk));
                }
                continue;
            }
            let dirty = &self.to_send[i];
            let found = dirty
                .find_next_dirty(c.dirty_next as usize)
                .or_else(|| dirty.find_next_dirty(0));
            if let Some(chunk) = found {
                c.dirty_next = chunk as u64 + 1;
                if dirty.test_and_clear(chunk) {
                    return Some((i, chunk as u64));
                }
            }
        }
        None
    }

    /// Reads chunks until `budget` bytes are queued or nothing is left to copy.
    fn fill(&mut self, budget: u64) -> Result<()> {
        while self.ready_bytes < budget {
            let Some((i, chunk)) = self.next_chunk() else {
                break;
            };
            let d = &self.disks[i];
            let offset = chunk * CHUNK_SIZE;
            let len = CHUNK_SIZE.min(d.size() - offset) as usize;
            let mut data = vec![0u8; CHUNK_SIZE as usize];
            d.read_at(&mut data[..len], offset)?;
            let data = (!is_zero(&data)).then(|| Arc::new(data));
            self.ready_bytes += if data.is_some() { CHUNK_SIZE } else { 64 };
            self.ready.push_back(Ready {
                disk: i,
                chunk,
                data,
            });
        }
        Ok(())
    }

    /// Queues the ready chunks on the stream.
    fn emit(&mut self, f: &mut QemuFile) {
        while let Some(r) = self.ready.pop_front() {
            let d = &self.disks[r.disk];
            let sector = r.chunk * SECTORS_PER_CHUNK;
            let bytes = CHUNK_SIZE.min(d.size() - r.chunk * CHUNK_SIZE);
            match r.data {
                None => {
                    Record::write_to(
                        f,
                        sector,
                        BLK_MIG_FLAG_DEVICE_BLOCK | BLK_MIG_FLAG_ZERO_BLOCK,
                        Some(d.name()),
                    );
                    self.stats.sent(bytes, true);
                }
                Some(data) => {
                    Record::write_to(f, sector, BLK_MIG_FLAG_DEVICE_BLOCK, Some(d.name()));
                    let owner: KeepAlive = data.clone();
                    // SAFETY: `data` is a live allocation of CHUNK_SIZE bytes kept alive by
                    // `owner` until the queue is flushed.
                    unsafe { f.put_buffer_external(data.as_ptr(), data.len(), &owner) };
                    self.stats.sent(bytes, false);
                }
            }
        }
        self.ready_bytes = 0;
    }

    fn write_progress(&mut self, f: &mut QemuFile) {
        let total: u64 = self.disks.iter().map(|d| d.chunks()).sum();
        let done: u64 = self
            .disks
            .iter()
            .zip(&self.cursors)
            .map(|(d, c)| c.bulk_next.min(d.chunks()))
            .sum();
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if self.progress != Some(percent) {
            self.progress = Some(percent);
            self.stats.set_bulk_percent(percent);
            Record::write_to(f, percent, BLK_MIG_FLAG_PROGRESS, None);
        }
    }

    fn remaining(&self) -> u64 {
        let mut bytes = self.ready_bytes;
        for (d, c) in self.disks.iter().zip(&self.cursors) {
            if !c.bulk_done {
                bytes += (d.chunks().saturating_sub(c.bulk_next)) * CHUNK_SIZE;
            }
        }
        for t in &self.to_send {
            bytes += t.dirty_count() as u64 * CHUNK_SIZE;
        }
        bytes
    }

    fn nothing_left(&self) -> bool {
        self.ready.is_empty()
            && self
                .disks
                .iter()
                .zip(&self.cursors)
                .all(|(_, c)| c.bulk_done)
            && self.to_send.iter().all(|t| t.dirty_count() == 0)
    }

    fn disk_index(&self, name: &str) -> Result<usize> {
        self.disks
            .iter()
            .position(|d| d.name() == name)
            .ok_or_else(|| Error::UnknownDisk { name: name.into() })
    }

    fn load_device_list(&mut self, f: &mut QemuFile) -> Result<()> {
        let mut seen = vec![false; self.disks.len()];
        loop {
            let at = f.bytes_read();
            let r = Record::read_from(f)?;
            r.check(at)?;
            if r.flags == BLK_MIG_FLAG_EOS {
                break;
            }
            if r.flags & BLK_MIG_FLAG_PROGRESS != 0 {
                continue;
            }
            if r.flags != BLK_MIG_FLAG_DEVICE_INFO {
                return Err(Error::BadRecord {
                    at,
                    reason: "a chunk before the device list ended".into(),
                });
            }
            let name = r.name.unwrap_or_default();
            let i = self.disk_index(&name)?;
            if seen[i] {
                return Err(Error::BadRecord {
                    at,
                    reason: format!("disk {name:?} listed twice"),
                });
            }
            seen[i] = true;
            let stream = r
                .value
                .checked_mul(SECTOR_SIZE)
                .ok_or_else(|| Error::BadRecord {
                    at,
                    reason: format!("disk {name:?} claims {} sectors", r.value),
                })?;
            let local = self.disks[i].size();
            if stream != local {
                if !self.created[i] {
                    return Err(Error::SizeMismatch {
                        name,
                        local,
                        stream,
                    });
                }
                self.disks[i].set_size(stream)?;
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(Error::MissingDisk {
                name: self.disks[i].name().into(),
            });
        }
        let total = self.disks.iter().map(|d| d.size()).sum();
        self.stats.reset(total);
        self.listed = true;
        Ok(())
    }

    fn load_chunks(&mut self, f: &mut QemuFile) -> Result<()> {
        loop {
            let at = f.bytes_read();
            let r = Record::read_from(f)?;
            r.check(at)?;
            if r.flags & BLK_MIG_FLAG_DEVICE_INFO != 0 {
                return Err(Error::BadRecord {
                    at,
                    reason: "a device list outside the setup".into(),
                });
            }
            if r.flags & BLK_MIG_FLAG_DEVICE_BLOCK != 0 {
                let name = r.name.unwrap_or_default();
                let i = match self.last {
                    Some(i) if self.disks[i].name() == name => i,
                    _ => self.disk_index(&name)?,
                };
                self.last = Some(i);
                let d = &self.disks[i];
                let offset = r
                    .value
                    .checked_mul(SECTOR_SIZE)
                    .filter(|o| *o < d.size())
                    .ok_or_else(|| Error::BadRecord {
                        at,
                        reason: format!(
                            "sector {} is past the end of disk {name:?} ({} bytes)",
                            r.value,
                            d.size()
                        ),
                    })?;
                let len = CHUNK_SIZE.min(d.size() - offset) as usize;
                self.buf.resize(CHUNK_SIZE as usize, 0);
                if r.flags & BLK_MIG_FLAG_ZERO_BLOCK != 0 {
                    self.buf.fill(0);
                } else {
                    f.get_buffer(&mut self.buf)?;
                }
                d.write_at(&self.buf[..len], offset)?;
                self.stats
                    .sent(len as u64, r.flags & BLK_MIG_FLAG_ZERO_BLOCK != 0);
            } else if r.flags & BLK_MIG_FLAG_PROGRESS != 0 {
                if r.value > 100 {
                    return Err(Error::BadRecord {
                        at,
                        reason: format!("progress of {} %", r.value),
                    });
                }
                self.stats.set_bulk_percent(r.value);
            } else if r.flags & BLK_MIG_FLAG_EOS != 0 {
                return Ok(());
            } else {
                // `check` lets no other kind through; never skip a record silently.
                return Err(Error::BadRecord {
                    at,
                    reason: format!("Unknown block migration flags: {:#x}", r.flags),
                });
            }
        }
    }
}

impl SectionHandler for BlockMigration {
    fn setup(&mut self, f: &mut QemuFile) -> std::result::Result<(), SectionError> {
        self.cursors = vec![Cursor::default(); self.disks.len()];
        self.to_send.clear();
        self.ready.clear();
        self.ready_bytes = 0;
        self.progress = None;
        let mut total = 0;
        for d in &self.disks {
            if d.size() % SECTOR_SIZE != 0 {
                return Err(format!(
                    "disk {:?} is not a whole number of 512-byte sectors",
                    d.name()
                )
                .into());
            }
            // The bulk copy covers everything written before now.
            d.dirty().clear_all();
            self.to_send.push(DirtyBitmap::new(d.chunks() as usize));
            total += d.size();
            Record::write_to(
                f,
                d.size() / SECTOR_SIZE,
                BLK_MIG_FLAG_DEVICE_INFO,
                Some(d.name()),
            );
        }
        self.stats.reset(total);
        self.write_progress(f);
        Record::write_to(f, 0, BLK_MIG_FLAG_EOS, None);
        Ok(())
    }

    fn prepare(&mut self, budget: usize) -> std::result::Result<(), SectionError> {
        Ok(self.fill(budget as u64)?)
    }

    fn blocks_completion(&self) -> bool {
        self.cursors.iter().any(|c| !c.bulk_done)
    }

    fn iterate(&mut self, f: &mut QemuFile) -> std::result::Result<bool, SectionError> {
        if self.ready.is_empty() {
            // Nobody prepared (a caller without prepare): read here, one chunk's worth.
            self.fill(CHUNK_SIZE)?;
        }
        self.emit(f);
        self.write_progress(f);
        Record::write_to(f, 0, BLK_MIG_FLAG_EOS, None);
        self.stats.set_remaining(self.remaining());
        Ok(self.nothing_left())
    }

    /// The rest of the bulk copy and what the last sync found; writes since then are
    /// counted by the next sync.
    fn pending_estimate(&self) -> u64 {
        self.remaining()
    }

    fn pending_exact(&mut self) -> std::result::Result<u64, SectionError> {
        for (d, t) in self.disks.iter().zip(&self.to_send) {
            sync_into(d, t);
        }
        let r = self.remaining();
        self.stats.set_remaining(r);
        Ok(r)
    }

    fn complete(&mut self, f: &mut QemuFile) -> std::result::Result<(), SectionError> {
        loop {
            self.fill(8 * CHUNK_SIZE)?;
            if self.ready.is_empty() {
                break;
            }
            self.emit(f);
        }
        self.write_progress(f);
        if self.progress != Some(100) {
            Record::write_to(f, 100, BLK_MIG_FLAG_PROGRESS, None);
        }
        Record::write_to(f, 0, BLK_MIG_FLAG_EOS, None);
        self.stats.set_remaining(0);
        Ok(())
    }

    fn cleanup(&mut self) {
        self.ready.clear();
        self.ready_bytes = 0;
    }

    fn load_setup(&mut self) -> std::result::Result<(), SectionError> {
        self.listed = false;
        self.last = None;
        Ok(())
    }

    fn load(&mut self, f: &mut QemuFile, version_id: u32) -> std::result::Result<(), SectionError> {
        if version_id >= 2 && !self.listed {
            // The START payload of version 2: the device list.
            return Ok(self.load_device_list(f)?);
        }
        Ok(self.load_chunks(f)?)
    }

    fn load_cleanup(&mut self, ok: bool) -> std::result::Result<(), SectionError> {
        self.buf = Vec::new();
        if ok {
            // The guest may run from here: what it reads must be on stable storage.
            for d in &self.disks {
                d.flush()?;
            }
        }
        Ok(())
    }
}
