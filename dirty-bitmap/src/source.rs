//! `DirtyLogSource`: where the dirty pages of a RAM block come from.

use crate::{DirtyBitmap, Result};

/// Reports the pages written since the last sync into a [`DirtyBitmap`].
///
/// A source covers one RAM block: page 0 of the bitmap is the block's first page. Several
/// sources of one block (KVM's log of guest writes, the VMM's own writes through
/// vm-memory) are combined with [`MergedLog`], so one sync sees both.
pub trait DirtyLogSource: Send + std::fmt::Debug {
    /// Starts logging: pages written from now on are reported by the next sync.
    ///
    /// # Errors
    /// When the hypervisor refuses to log (e.g. KVM_SET_USER_MEMORY_REGION fails).
    fn start(&mut self) -> Result<()> {
        Ok(())
    }

    /// Stops logging (the migration ended, was cancelled or failed).
    ///
    /// # Errors
    /// When the hypervisor refuses.
    fn stop(&mut self) -> Result<()> {
        Ok(())
    }

    /// ORs the pages written since the last sync into `bitmap`, resets the source's own
    /// record, and returns how many pages became newly dirty in `bitmap`.
    ///
    /// # Errors
    /// When the log cannot be read; `bitmap` is then unchanged.
    fn sync(&mut self, bitmap: &DirtyBitmap) -> Result<usize>;

    /// For a source whose sync does not re-arm the pages it reports (KVM's manual dirty
    /// log protect): how many pages one [`DirtyLogSource::clear`] covers. None (the
    /// default): sync re-arms everything itself.
    fn clear_granularity(&self) -> Option<usize> {
        None
    }

    /// Re-arms logging of the pages that syncs reported in `[first_page, first_page +
    /// pages)`, so writes from now on are reported again. The migration calls it before
    /// it reads any of those pages to send them: a write before the clear is in what it
    /// sends, one after is reported by the next sync. `first_page` is a multiple of the
    /// granularity.
    ///
    /// # Errors
    /// When the hypervisor refuses; the pages must then not be sent as clean.
    fn clear(&mut self, _first_page: usize, _pages: usize) -> Result<()> {
        Ok(())
    }
}

/// No writes are ever reported: memory that only changes while the VM is stopped.
impl DirtyLogSource for () {
    fn sync(&mut self, _bitmap: &DirtyBitmap) -> Result<usize> {
        Ok(0)
    }
}

/// Several sources of one block, synced together.
#[derive(Debug, Default)]
pub struct MergedLog(pub Vec<Box<dyn DirtyLogSource>>);

impl DirtyLogSource for MergedLog {
    fn start(&mut self) -> Result<()> {
        for (i, s) in self.0.iter_mut().enumerate() {
            if let Err(e) = s.start() {
                // Leave nothing half started.
                for s in &mut self.0[..i] {
                    let _ = s.stop();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        let mut first = Ok(());
        for s in &mut self.0 {
            let r = s.stop();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn sync(&mut self, bitmap: &DirtyBitmap) -> Result<usize> {
        let mut newly = 0;
        for s in &mut self.0 {
            newly += s.sync(bitmap)?;
        }
        Ok(newly)
    }

    /// The finest granularity any part needs (each part clears whole chunks of its own).
    fn clear_granularity(&self) -> Option<usize> {
        self.0.iter().filter_map(|s| s.clear_granularity()).min()
    }

    fn clear(&mut self, first_page: usize, pages: usize) -> Result<()> {
        for s in &mut self.0 {
            if s.clear_granularity().is_some() {
                s.clear(first_page, pages)?;
            }
        }
        Ok(())
    }
}

/// A source fed by hand: pages marked with [`ManualLog::mark`] are reported by the next
/// sync. For tests, and for writers that track their own pages.
#[derive(Debug, Clone)]
pub struct ManualLog {
    pending: std::sync::Arc<DirtyBitmap>,
}

impl ManualLog {
    /// A source for a block of `pages` pages.
    pub fn new(pages: usize) -> Self {
        ManualLog {
            pending: std::sync::Arc::new(DirtyBitmap::new(pages)),
        }
    }

    /// Records a write to `page` (any thread, any clone).
    pub fn mark(&self, page: usize) {
        self.pending.set(page);
    }
}

impl DirtyLogSource for ManualLog {
    fn sync(&mut self, bitmap: &DirtyBitmap) -> Result<usize> {
        let mut raw = Vec::with_capacity(self.pending.word_count());
        for w in 0..self.pending.word_count() {
            raw.push(self.pending.take_word(w));
        }
        bitmap.merge_raw(0, &raw)
    }
}
