//! `RecvTarget`: where a destination's channels put their pages.

use std::sync::Arc;

use crate::{RamList, RamStats};

/// Where a channel's pages go and what it checks. Made with [`RecvTarget::new`];
/// more fields may come.
#[derive(Clone)]
#[non_exhaustive]
pub struct RecvTarget {
    /// The destination's RAM.
    pub list: Arc<RamList>,
    /// The load's counters.
    pub stats: Arc<RamStats>,
    /// Record written pages in the blocks' bitmaps (see `RamSection::with_fresh_memory`).
    pub fresh: bool,
    /// This VM's UUID: a channel must present it.
    pub uuid: [u8; 16],
    /// Pages are expected compressed (this side's `multifd-compression` is not none):
    /// the channels' socket buffers are kept small, so that the source cannot think
    /// sent what this side still has to decompress.
    pub compressed: bool,
}

impl RecvTarget {
    /// Pages into `list`, counted in `stats`, from channels that present `uuid`; memory
    /// not known to be fresh, pages not compressed (set the fields to change that).
    pub fn new(list: Arc<RamList>, stats: Arc<RamStats>, uuid: [u8; 16]) -> Self {
        RecvTarget {
            list,
            stats,
            fresh: false,
            uuid,
            compressed: false,
        }
    }
}

impl std::fmt::Debug for RecvTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvTarget")
            .field("fresh", &self.fresh)
            .finish()
    }
}
