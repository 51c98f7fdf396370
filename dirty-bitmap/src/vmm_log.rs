//! The VMM's own writes to guest memory, tracked by vm-memory's `AtomicBitmap`.

use std::fmt;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::{DirtyBitmap, DirtyLogSource, Result};

/// Pages the VMM wrote through vm-memory (device DMA, the software vCPU backend): vm-memory
/// marks its region's `AtomicBitmap` on every write, and a sync moves those bits over.
pub struct VmmWriteLog {
    region: Region,
    /// The block page the region's first page is.
    first_page: usize,
}

/// Where the region comes from.
enum Region {
    /// A region the VMM holds.
    Own(Arc<GuestRegionMmap<AtomicBitmap>>),
    /// Region `index` of a guest memory (whose clone keeps it).
    Of(GuestMemoryMmap<AtomicBitmap>, usize),
}

impl VmmWriteLog {
    /// The write log of one guest memory region that is a whole RAM block.
    pub fn new(region: Arc<GuestRegionMmap<AtomicBitmap>>) -> Self {
        VmmWriteLog {
            region: Region::Own(region),
            first_page: 0,
        }
    }

    /// The write log of region `index` (in address order) of a guest memory as the VMM
    /// built it (`RamList::from_guest_memory` makes one block of each region); None past
    /// the last region.
    pub fn for_region(mem: &GuestMemoryMmap<AtomicBitmap>, index: usize) -> Option<Self> {
        (index < mem.num_regions()).then(|| VmmWriteLog {
            region: Region::Of(mem.clone(), index),
            first_page: 0,
        })
    }

    fn region(&self) -> &GuestRegionMmap<AtomicBitmap> {
        match &self.region {
            Region::Own(r) => r,
            Region::Of(mem, i) => mem.iter().nth(*i).expect("checked at creation"),
        }
    }

    /// This log, for a region that holds part of a RAM block: its first page is page
    /// `first_page` of the block (a multiple of 64).
    pub fn at_page(mut self, first_page: usize) -> Self {
        debug_assert_eq!(first_page % 64, 0);
        self.first_page = first_page;
        self
    }

    /// The region's whole bitmap (not the per-access slice vm-memory's region trait gives).
    fn bitmap(&self) -> &AtomicBitmap {
        let mmap: &vm_memory::MmapRegion<AtomicBitmap> = self.region();
        mmap.bitmap()
    }
}

impl fmt::Debug for VmmWriteLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmmWriteLog")
            .field("start", &self.region().start_addr())
            .finish()
    }
}

use vm_memory::GuestMemoryRegion as _;

impl DirtyLogSource for VmmWriteLog {
    fn start(&mut self) -> Result<()> {
        // Writes made before the migration started are covered by its first full pass.
        self.bitmap().reset();
        Ok(())
    }

    fn sync(&mut self, bitmap: &DirtyBitmap) -> Result<usize> {
        let words = self.bitmap().get_and_reset();
        bitmap.merge_raw(self.first_page, &words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn writes_through_vm_memory_show_up_in_the_next_sync() {
        let region = Arc::new(
            GuestRegionMmap::<AtomicBitmap>::from_range(GuestAddress(0x10_0000), 64 * 4096, None)
                .unwrap(),
        );
        let mem = GuestMemoryMmap::from_arc_regions(vec![region.clone()]).unwrap();
        let mut log = VmmWriteLog::new(region);
        let b = DirtyBitmap::new(64);
        log.start().unwrap();
        mem.write_obj(7u8, GuestAddress(0x10_0000 + 3 * 4096 + 10))
            .unwrap();
        mem.write_slice(&[1; 8192], GuestAddress(0x10_0000 + 10 * 4096))
            .unwrap();
        assert_eq!(log.sync(&b).unwrap(), 3);
        assert_eq!(b.iter().collect::<Vec<_>>(), [3, 10, 11]);
        assert_eq!(log.sync(&b).unwrap(), 0, "a sync resets the source");
    }

    #[test]
    fn a_region_that_is_part_of_a_block_reports_at_its_place_in_it() {
        let region = Arc::new(
            GuestRegionMmap::<AtomicBitmap>::from_range(GuestAddress(1 << 32), 64 * 4096, None)
                .unwrap(),
        );
        let mem = GuestMemoryMmap::from_arc_regions(vec![region.clone()]).unwrap();
        let mut log = VmmWriteLog::new(region).at_page(128);
        let b = DirtyBitmap::new(192);
        log.start().unwrap();
        mem.write_obj(7u8, GuestAddress((1 << 32) + 5 * 4096))
            .unwrap();
        assert_eq!(log.sync(&b).unwrap(), 1);
        assert_eq!(b.iter().collect::<Vec<_>>(), [133]);
    }
}
