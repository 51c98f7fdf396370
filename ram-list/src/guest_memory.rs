//! RAM blocks from a vm-memory `GuestMemoryMmap` as a VMM built it: one block per region.

use std::fmt;

use dirty_bitmap::DirtyLogSource;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::{RamBacking, RamBlock, RamList, Result};

/// Region `index` of a guest memory, as the backing of a RAM block. It holds a clone of
/// the guest memory (which shares its regions), so the mapping lives as long as the block.
pub struct RegionBacking<B: Bitmap + 'static> {
    mem: GuestMemoryMmap<B>,
    index: usize,
}

impl<B: Bitmap + 'static> RegionBacking<B> {
    /// Region `index` (in address order) of `mem`, or None past the last.
    pub fn new(mem: &GuestMemoryMmap<B>, index: usize) -> Option<Self> {
        (index < mem.num_regions()).then(|| RegionBacking {
            mem: mem.clone(),
            index,
        })
    }

    /// The region.
    pub fn region(&self) -> &GuestRegionMmap<B> {
        self.mem
            .iter()
            .nth(self.index)
            .expect("the index was checked at creation and regions never change")
    }
}

impl<B: Bitmap + 'static> fmt::Debug for RegionBacking<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionBacking")
            .field("index", &self.index)
            .field("guest_address", &self.region().start_addr().0)
            .field("len", &self.region().len())
            .finish()
    }
}

// SAFETY: the region is kept mapped by the guest memory's clone this value holds, and a
// region's pointer and size never change.
unsafe impl<B: Bitmap + Send + Sync + 'static> RamBacking for RegionBacking<B> {
    fn as_ptr(&self) -> *mut u8 {
        let m: &MmapRegion<B> = self.region();
        m.as_ptr()
    }
    fn size(&self) -> usize {
        self.region().len() as usize
    }
    fn unpopulated_is_zero(&self) -> bool {
        let m: &MmapRegion<B> = self.region();
        crate::backing::private_anonymous(m)
    }
}

impl RamList {
    /// A list with one block per region of `mem`, in address order, named `ram0`,
    /// `ram1`... (both sides of a migration must build theirs alike), each at its guest
    /// address; `log(index, region)` gives each block's dirty-log source (`Box::new(())`
    /// for memory that only changes while the VM is stopped, e.g. for a snapshot).
    ///
    /// A block's offsets are offsets into its region: a guest-physical address `a` is
    /// block `i` at `a - region.start_addr()`.
    ///
    /// # Errors
    /// A region that is not a whole number of pages.
    pub fn from_guest_memory<B: Bitmap + Send + Sync + 'static>(
        mem: &GuestMemoryMmap<B>,
        mut log: impl FnMut(usize, &GuestRegionMmap<B>) -> Box<dyn DirtyLogSource>,
    ) -> Result<Self> {
        let list = RamList::new();
        for (i, region) in mem.iter().enumerate() {
            let backing = RegionBacking::new(mem, i).expect("the region exists");
            let block = RamBlock::new(
                format!("ram{i}"),
                std::sync::Arc::new(backing),
                log(i, region),
            )?
            .with_guest_address(region.start_addr().0);
            list.add(block)?;
        }
        Ok(list)
    }
}
