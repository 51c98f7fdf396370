//! Guest RAM: one vm-memory region at guest-physical 0, registered in a `RamList` as the
//! block `"pc.ram"` (QEMU's name, so streams read alike).

use std::sync::Arc;

use anyhow::{Context, Result};
use dirty_bitmap::DirtyLogSource;
use ram_list::{MemfdMemory, RamBacking, RamBlock, RamList};
use rayon::prelude::*;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The RAM block's name in the stream.
pub const RAM_BLOCK: &str = "pc.ram";
/// Largest guest: RAM stays below the 4 GiB boundary and the local APIC / IOAPIC pages.
pub const MAX_MEMORY: u64 = 3 << 30;

/// Where guest RAM lives (`--memory-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MemoryBackend {
    /// Private anonymous memory (QEMU's `memory-backend-ram`).
    #[default]
    Anonymous,
    /// A memfd mapped shared (QEMU's `memory-backend-memfd,share=on`): with the
    /// `x-ignore-shared` capability a migration over a unix socket hands it over to the
    /// destination instead of copying it.
    Memfd,
}

/// The guest's memory and its RAM list.
#[derive(Debug)]
pub struct GuestRam {
    /// The guest memory, through which the VMM's own writes are dirty-tracked.
    pub mem: GuestMemoryMmap<AtomicBitmap>,
    /// The RAM list that migration walks.
    pub list: Arc<RamList>,
    /// The `"pc.ram"` block.
    pub block: Arc<RamBlock>,
    /// With `--memory-backend memfd`: the memfd, which a local migration hands over.
    pub memfd: Option<Arc<MemfdMemory>>,
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM; `log` makes the block's dirty-log source from the
    /// region (KVM's log plus the VMM's writes, or the VMM's alone).
    ///
    /// # Errors
    /// A size that is not a multiple of 2 MiB or is too large, or a failed mapping.
    pub fn new(
        size: u64,
        backend: MemoryBackend,
        prefault: bool,
        log: impl FnOnce(&Arc<GuestRegionMmap<AtomicBitmap>>) -> Result<Box<dyn DirtyLogSource>>,
    ) -> Result<Self> {
        anyhow::ensure!(
            size >= 4 << 20 && size % (2 << 20) == 0 && size <= MAX_MEMORY,
            "guest memory must be a multiple of 2 MiB from 4 MiB to {} MiB, not {} bytes",
            MAX_MEMORY >> 20,
            size
        );
        let (region, memfd) = match backend {
            MemoryBackend::Anonymous => (
                GuestRegionMmap::<AtomicBitmap>::from_range(GuestAddress(0), size as usize, None)
                    .context("mapping guest memory")?,
                None,
            ),
            MemoryBackend::Memfd => {
                let (region, memfd) = memfd_region(size as usize)?;
                (region, Some(memfd))
            }
        };
        let region = Arc::new(region);
        advise_huge_pages(&region);
        if prefault {
            prefault_region(&region)?;
        }
        let mem = GuestMemoryMmap::from_arc_regions(vec![region.clone()])
            .context("guest memory layout")?;
        let list = Arc::new(RamList::new());
        let mut block = RamBlock::new(RAM_BLOCK, region.clone(), log(&region)?)?;
        if let Some(m) = &memfd {
            block = block.with_shared(m.clone());
        }
        let block = list.add(block)?;
        Ok(GuestRam {
            mem,
            list,
            block,
            memfd,
        })
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.block.max_length()
    }

    /// Reads a little-endian u64 at guest-physical `gpa`.
    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_obj::<u64>(GuestAddress(gpa)).unwrap_or(0)
    }

    /// Writes `data` at guest-physical `gpa` (dirty-tracked).
    ///
    /// # Errors
    /// Outside guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .with_context(|| format!("writing {} bytes at guest address {gpa:#x}", data.len()))
    }

    /// A 64-bit hash of all guest RAM, computed in parallel (the `verify` check; the guest
    /// must be stopped for the answer to mean anything).
    pub fn hash(&self) -> u64 {
        const CHUNK: usize = 1 << 20;
        let size = self.size() as usize;
        let block = &self.block;
        let parts: Vec<u64> = (0..size.div_ceil(CHUNK))
            .into_par_iter()
            .map(|i| {
                let mut buf = vec![0u8; CHUNK.min(size - i * CHUNK)];
                block.read_bytes((i * CHUNK) as u64, &mut buf);
                hash_bytes(i as u64, &buf)
            })
            .collect();
        combine(&parts)
    }
}

/// Guest RAM in a memfd: the vm-memory region over [`MemfdMemory`]'s mapping.
fn memfd_region(size: usize) -> Result<(GuestRegionMmap<AtomicBitmap>, Arc<MemfdMemory>)> {
    let memfd =
        Arc::new(MemfdMemory::new(RAM_BLOCK, size).context("creating the memfd for guest RAM")?);
    // The region borrows the mapping, which must outlive every clone of the guest memory
    // (vCPU threads, devices): it lives as long as the process, this reference is never
    // dropped.
    std::mem::forget(memfd.clone());
    // SAFETY: the pointer is the start of the memfd's live mapping of `size` bytes, which
    // is never unmapped (above); an adopted memory is mapped at the same address.
    let builder = unsafe {
        MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_raw_mmap_pointer(memfd.as_ptr())
    };
    let mmap = builder
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .context("guest memory region over the memfd")?;
    let region = GuestRegionMmap::new(mmap, GuestAddress(0)).context("guest memory layout")?;
    Ok((region, memfd))
}

/// Asks for transparent huge pages (MADV_HUGEPAGE), as QEMU does for guest RAM: fewer
/// faults and TLB misses for the guest, and never-touched memory reads as the huge zero
/// page, one fault per 2 MiB, when migration scans it. Best effort.
fn advise_huge_pages(region: &GuestRegionMmap<AtomicBitmap>) {
    let mmap: &vm_memory::MmapRegion<AtomicBitmap> = region;
    // SAFETY: advice on the region's own anonymous mapping; it changes no contents.
    unsafe {
        libc::madvise(mmap.as_ptr().cast(), mmap.size(), libc::MADV_HUGEPAGE);
    }
}

/// Allocates every page of `region` now (MADV_POPULATE_WRITE), before it is given to KVM:
/// a destination that will receive the whole of RAM then loads it at memory speed, and
/// steadily, instead of taking a first-touch fault per page during the migration (costly
/// under a shadow-paging hypervisor, and variable with the host's supply of huge pages).
fn prefault_region(region: &GuestRegionMmap<AtomicBitmap>) -> Result<()> {
    let mmap: &vm_memory::MmapRegion<AtomicBitmap> = region;
    // SAFETY: the range is exactly the region's own private anonymous mapping; populating
    // it changes no contents (the pages read as zero either way).
    let r = unsafe { libc::madvise(mmap.as_ptr().cast(), mmap.size(), libc::MADV_POPULATE_WRITE) };
    if r != 0 {
        // Older kernels lack the advice: the load then faults pages in as it goes.
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(anyhow::Error::new(e).context("preallocating guest memory"));
        }
    }
    Ok(())
}

/// Combines per-chunk hashes in order.
pub fn combine(parts: &[u64]) -> u64 {
    parts.iter().fold(0xcbf2_9ce4_8422_2325, |h, p| {
        (h ^ p).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A fast 64-bit hash of `data` (four multiply-xor lanes), seeded with `seed`.
pub fn hash_bytes(seed: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lanes = [seed ^ K, seed.rotate_left(17), seed.rotate_left(31), !seed];
    for chunk in data.chunks_exact(32) {
        for (l, w) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            *l = (*l ^ v).wrapping_mul(K).rotate_left(29);
        }
    }
    let mut h = data.len() as u64;
    for l in lanes {
        h = (h ^ l).wrapping_mul(K).rotate_left(23);
    }
    for &b in data.chunks_exact(32).remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_a_single_byte_change() {
        let ram = GuestRam::new(4 << 20, MemoryBackend::Anonymous, false, |_| {
            Ok(Box::new(()))
        })
        .unwrap();
        let h0 = ram.hash();
        ram.write(3 << 20, &[1]).unwrap();
        let h1 = ram.hash();
        assert_ne!(h0, h1);
        ram.write(3 << 20, &[0]).unwrap();
        assert_eq!(ram.hash(), h0);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(
            GuestRam::new(3 << 20, MemoryBackend::Anonymous, false, |_| Ok(Box::new(
                ()
            )))
            .is_err()
        );
        assert!(
            GuestRam::new(5 << 20, MemoryBackend::Anonymous, false, |_| Ok(Box::new(
                ()
            )))
            .is_err()
        );
        assert!(
            GuestRam::new(4 << 30, MemoryBackend::Anonymous, false, |_| Ok(Box::new(
                ()
            )))
            .is_err()
        );
    }
}
