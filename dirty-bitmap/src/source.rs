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
