//! `RamList`: the VM's RAM blocks, sorted, versioned, behind their own mutex.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, RamBlock, Result};

/// The RAM blocks of a VM (QEMU's `ram_list`).
///
/// Blocks are kept sorted by their offset in the RAM address space, so an address is found
/// by binary search after a most-recently-used check. Every add, remove and resize bumps
/// `version`, so a migration that started with one list notices a change. The list has
/// its own mutex, never the VM lock: the migration thread walks it without stopping
/// device emulation.
pub struct RamList {
    // Lock: this mutex guards the whole list; it is held only for short lookups and
    // changes, never across I/O.
    inner: Mutex<Inner>,
}

struct Inner {
    /// Sorted by offset.
    blocks: Vec<Arc<RamBlock>>,
    /// Index of the block `block_for_addr` found last.
    mru: usize,
    /// Bumped on every add, remove and resize.
    version: u64,
}

impl fmt::Debug for RamList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("RamList")
            .field("version", &g.version)
            .field("blocks", &g.blocks)
            .finish()
    }
}

impl Default for RamList {
    fn default() -> Self {
        Self::new()
    }
}

impl RamList {
    /// An empty list at version 0.
    pub fn new() -> Self {
        RamList {
            inner: Mutex::new(Inner {
                blocks: Vec::new(),
                mru: 0,
                version: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a block at the lowest free offset that fits its maximum length (QEMU's
    /// `find_ram_offset`); returns the block.
    ///
    /// # Errors
    /// [`Error::DuplicateBlock`] if the name is taken.
    pub fn add(&self, block: RamBlock) -> Result<Arc<RamBlock>> {
        let mut g = self.lock();
        if g.blocks.iter().any(|b| b.idstr() == block.idstr()) {
            return Err(Error::DuplicateBlock {
                idstr: block.idstr().to_string(),
            });
        }
        let mut offset = 0u64;
        for b in &g.blocks {
            if b.offset() >= offset + block.max_length() {
                break;
            }
            offset = offset.max(b.offset() + b.max_length());
        }
        block.set_offset(offset);
        let block = Arc::new(block);
        let at = g.blocks.partition_point(|b| b.offset() < offset);
        g.blocks.insert(at, Arc::clone(&block));
        g.mru = at;
        g.version += 1;
        Ok(block)
    }

    /// Removes the block named `idstr`.
    ///
    /// # Errors
    /// [`Error::UnknownBlock`].
    pub fn remove(&self, idstr: &str) -> Result<Arc<RamBlock>> {
        let mut g = self.lock();
        let i = g
            .blocks
            .iter()
            .position(|b| b.idstr() == idstr)
            .ok_or_else(|| Error::UnknownBlock {
                idstr: idstr.into(),
            })?;
        let b = g.blocks.remove(i);
        g.mru = 0;
        g.version += 1;
        Ok(b)
    }

    /// Changes how much of a block is in use (a resizable memory device).
    ///
    /// # Errors
    /// [`Error::UnknownBlock`], or [`Error::BadSize`] past the backing or not page aligned.
    pub fn resize(&self, idstr: &str, used_length: u64) -> Result<()> {
        let mut g = self.lock();
        let b = g
            .blocks
            .iter()
            .find(|b| b.idstr() == idstr)
            .ok_or_else(|| Error::UnknownBlock {
                idstr: idstr.into(),
            })?;
        if used_length == 0 || used_length > b.max_length() || used_length % TARGET_PAGE_SIZE != 0 {
            return Err(Error::BadSize {
                idstr: idstr.into(),
                reason: format!(
                    "cannot use {used_length} bytes of a {}-byte block (page multiples only)",
                    b.max_length()
                ),
            });
        }
        b.set_used_length(used_length);
        g.version += 1;
        Ok(())
    }

    /// The list's version: it changes on every add, remove and resize.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// The blocks in offset order, with the version they belong to.
    pub fn snapshot(&self) -> (Vec<Arc<RamBlock>>, u64) {
        let g = self.lock();
        (g.blocks.clone(), g.version)
    }

    /// The blocks in offset order.
    pub fn blocks(&self) -> Vec<Arc<RamBlock>> {
        self.snapshot().0
    }

    /// The block named `idstr`.
    pub fn find(&self, idstr: &str) -> Option<Arc<RamBlock>> {
        self.lock()
            .blocks
            .iter()
            .find(|b| b.idstr() == idstr)
            .cloned()
    }

    /// The block holding RAM address `addr`, and the offset of `addr` within it.
    ///
    /// A RAM address is QEMU's `ram_addr_t`: the blocks laid end to end in the order they
    /// were added (each at its [`RamBlock::offset`]), not a guest physical address. A VMM
    /// that maps blocks at other guest physical addresses (a hole below 4 GiB, several
    /// regions) translates through its own memory map first.
    pub fn block_for_addr(&self, addr: u64) -> Option<(Arc<RamBlock>, u64)> {
        let mut g = self.lock();
        let contains = |b: &RamBlock| addr >= b.offset() && addr - b.offset() < b.used_length();
        if let Some(b) = g.blocks.get(g.mru) {
            if contains(b) {
                return Some((Arc::clone(b), addr - b.offset()));
            }
        }
        let i = g
            .blocks
            .partition_point(|b| b.offset() <= addr)
            .checked_sub(1)?;
        let b = &g.blocks[i];
        if !contains(b) {
            return None;
        }
        let found = (Arc::clone(b), addr - b.offset());
        g.mru = i;
        Some(found)
    }

    /// Bytes in use over all blocks.
    pub fn total_used(&self) -> u64 {
        self.lock().blocks.iter().map(|b| b.used_length()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::MmapRegion;

    fn block(name: &str, pages: usize) -> RamBlock {
        RamBlock::new(
            name,
            Arc::new(MmapRegion::<()>::new(pages * 4096).unwrap()),
            Box::new(()),
        )
        .unwrap()
    }

    #[test]
    fn blocks_are_placed_sorted_and_found_by_address() {
        let l = RamList::new();
        let a = l.add(block("pc.ram", 4)).unwrap();
        let b = l.add(block("vga", 2)).unwrap();
        assert_eq!((a.offset(), b.offset()), (0, 4 * 4096));
        assert_eq!(l.version(), 2);
        let (f, off) = l.block_for_addr(5 * 4096 + 12).unwrap();
        assert_eq!((f.idstr(), off), ("vga", 4096 + 12));
        let (f, off) = l.block_for_addr(3).unwrap();
        assert_eq!((f.idstr(), off), ("pc.ram", 3));
        assert!(l.block_for_addr(6 * 4096).is_none());
        // A hole is reused by the next block that fits.
        l.remove("pc.ram").unwrap();
        let c = l.add(block("rom", 1)).unwrap();
        assert_eq!(c.offset(), 0);
        assert_eq!(
            l.blocks()
                .iter()
                .map(|b| b.idstr().to_string())
                .collect::<Vec<_>>(),
            ["rom", "vga"]
        );
        assert_eq!(l.version(), 4);
    }

    #[test]
    fn every_change_bumps_the_version() {
        let l = RamList::new();
        l.add(block("a", 4)).unwrap();
        let v = l.version();
        l.resize("a", 2 * 4096).unwrap();
        assert_eq!(l.version(), v + 1);
        assert_eq!(l.total_used(), 2 * 4096);
        assert!(l.block_for_addr(3 * 4096).is_none(), "past the used length");
        assert!(matches!(
            l.resize("a", 5 * 4096),
            Err(Error::BadSize { .. })
        ));
        assert!(matches!(l.resize("a", 100), Err(Error::BadSize { .. })));
        assert!(matches!(
            l.resize("b", 4096),
            Err(Error::UnknownBlock { .. })
        ));
        assert_eq!(l.version(), v + 1, "failed changes do not count");
    }

    #[test]
    fn names_are_unique_and_bounded() {
        let l = RamList::new();
        l.add(block("a", 1)).unwrap();
        assert!(matches!(
            l.add(block("a", 1)),
            Err(Error::DuplicateBlock { .. })
        ));
        let host = Arc::new(MmapRegion::<()>::new(4096).unwrap());
        assert!(matches!(
            RamBlock::new("", host.clone(), Box::new(())),
            Err(Error::BadName { .. })
        ));
        assert!(matches!(
            RamBlock::new("x".repeat(128), host, Box::new(())),
            Err(Error::BadName { .. })
        ));
        let odd = Arc::new(MmapRegion::<()>::new(4000).unwrap());
        assert!(matches!(
            RamBlock::new("odd", odd, Box::new(())),
            Err(Error::BadSize { .. })
        ));
    }
}
