//! `RamStats`: the counters behind `query-migrate`'s `ram` object.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::TARGET_PAGE_SIZE;

/// Counters of the RAM section, shared with whoever reports progress (the monitor).
/// Written by the migration thread (or the loading thread), read by anyone.
#[derive(Debug, Default)]
pub struct RamStats {
    duplicate: AtomicU64,
    normal: AtomicU64,
    dirty_sync_count: AtomicU64,
    dirty_pages_rate: AtomicU64,
    pages_per_second: AtomicU64,
    remaining: AtomicU64,
    total: AtomicU64,
}

/// A snapshot of [`RamStats`], with QEMU's `query-migrate` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RamStatsSnapshot {
    /// Zero pages sent (or loaded) as ZERO records.
    pub duplicate: u64,
    /// Pages sent (or loaded) whole.
    pub normal: u64,
    /// Bytes of those pages.
    pub normal_bytes: u64,
    /// Dirty-log syncs made.
    pub dirty_sync_count: u64,
    /// Pages the guest dirtied per second, measured between the last two syncs.
    pub dirty_pages_rate: u64,
    /// Pages sent per second between the last two syncs.
    pub pages_per_second: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Bytes of RAM in all blocks.
    pub total: u64,
}

impl RamStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> RamStatsSnapshot {
        let normal = self.normal.load(Ordering::Relaxed);
        RamStatsSnapshot {
            duplicate: self.duplicate.load(Ordering::Relaxed),
            normal,
            normal_bytes: normal * TARGET_PAGE_SIZE,
            dirty_sync_count: self.dirty_sync_count.load(Ordering::Relaxed),
            dirty_pages_rate: self.dirty_pages_rate.load(Ordering::Relaxed),
            pages_per_second: self.pages_per_second.load(Ordering::Relaxed),
            remaining: self.remaining.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn reset(&self, total: u64) {
        for c in [
            &self.duplicate,
            &self.normal,
            &self.dirty_sync_count,
            &self.dirty_pages_rate,
            &self.pages_per_second,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.total.store(total, Ordering::Relaxed);
        self.remaining.store(total, Ordering::Relaxed);
    }

    pub(crate) fn add_pages(&self, zero: u64, normal: u64) {
        self.duplicate.fetch_add(zero, Ordering::Relaxed);
        self.normal.fetch_add(normal, Ordering::Relaxed);
    }

    pub(crate) fn pages_sent(&self) -> u64 {
        self.duplicate.load(Ordering::Relaxed) + self.normal.load(Ordering::Relaxed)
    }

    pub(crate) fn synced(&self, dirty_rate: u64, send_rate: u64) {
        self.dirty_sync_count.fetch_add(1, Ordering::Relaxed);
        self.dirty_pages_rate.store(dirty_rate, Ordering::Relaxed);
        self.pages_per_second.store(send_rate, Ordering::Relaxed);
    }

    pub(crate) fn set_remaining(&self, bytes: u64) {
        self.remaining.store(bytes, Ordering::Relaxed);
    }
}
