//! `BlockStats`: the counters behind `query-migrate`'s `disk` object.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the block section, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct BlockStats {
    transferred: AtomicU64,
    remaining: AtomicU64,
    total: AtomicU64,
    zero_chunks: AtomicU64,
    bulk_percent: AtomicU64,
}

/// A snapshot of [`BlockStats`], with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStatsSnapshot {
    /// Disk bytes sent (or loaded), zero chunks included.
    pub transferred: u64,
    /// Disk bytes still to send: the rest of the bulk copy and the dirty chunks.
    pub remaining: u64,
    /// Bytes of all migrated disks.
    pub total: u64,
    /// Chunks sent as ZERO_BLOCK records.
    pub zero_chunks: u64,
    /// Progress of the bulk copy, in percent.
    pub bulk_percent: u64,
}

impl BlockStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> BlockStatsSnapshot {
        BlockStatsSnapshot {
            transferred: self.transferred.load(Ordering::Relaxed),
            remaining: self.remaining.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            zero_chunks: self.zero_chunks.load(Ordering::Relaxed),
            bulk_percent: self.bulk_percent.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn reset(&self, total: u64) {
        self.transferred.store(0, Ordering::Relaxed);
        self.zero_chunks.store(0, Ordering::Relaxed);
        self.bulk_percent.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.remaining.store(total, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: u64, zero: bool) {
        self.transferred.fetch_add(bytes, Ordering::Relaxed);
        if zero {
            self.zero_chunks.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn set_remaining(&self, bytes: u64) {
        self.remaining.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_bulk_percent(&self, p: u64) {
        self.bulk_percent.store(p, Ordering::Relaxed);
    }
}
