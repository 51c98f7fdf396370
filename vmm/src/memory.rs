//! Guest RAM: one host mapping, registered in a `RamList` as the block `"pc.ram"` (QEMU's
//! name, so streams read alike), and seen by the guest as QEMU's pc machine lays it out:
//! up to 3 GiB at guest-physical 0, the rest from 4 GiB (the hole between holds the local
//! APIC and IOAPIC pages).

use std::sync::Arc;

use anyhow::{Context, Result};
use dirty_bitmap::DirtyLogSource;
use ram_list::{MemfdMemory, RamBacking, RamBlock, RamList};
use rayon::prelude::*;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The RAM block's name in the stream.
pub const RAM_BLOCK: &str = "pc.ram";
/// RAM below the 4 GiB hole: up to this much sits at guest-physical 0 (QEMU's pc machine
/// with more than 3.5 GiB uses the same split).
pub const LOW_MEMORY: u64 = 3 << 30;
/// Where RAM above the hole starts.
pub const HIGH_MEMORY_START: u64 = 1 << 32;
/// Largest guest.
pub const MAX_MEMORY: u64 = 256 << 30;

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

/// One contiguous piece of guest-physical RAM: a vm-memory region over part of the
/// block's mapping, and the block page it starts at (what a memory slot and its dirty
/// log cover).
#[derive(Debug, Clone)]
pub struct RamSlot {
    /// The region (its guest address is where the guest sees it).
    pub region: Arc<GuestRegionMmap<AtomicBitmap>>,
    /// The block page of its first page.
    pub first_page: usize,
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
    /// slots (KVM's log plus the VMM's writes, or the VMM's alone). `prefault` allocates
    /// every page now.
    ///
    /// # Errors
    /// A size that is not a multiple of 2 MiB or is too large, or a failed mapping.
    pub fn new(
        size: u64,
        backend: MemoryBackend,
        prefault: bool,
        log: impl FnOnce(&[RamSlot]) -> Result<Box<dyn DirtyLogSource>>,
    ) -> Result<Self> {
        anyhow::ensure!(
            size >= 4 << 20 && size % (2 << 20) == 0 && size <= MAX_MEMORY,
            "guest memory must be a multiple of 2 MiB from 4 MiB to {} GiB, not {} bytes",
            MAX_MEMORY >> 30,
            size
        );
        let (host, memfd, flags): (Arc<dyn RamBacking>, _, _) = match backend {
            MemoryBackend::Anonymous => (
                Arc::new(MmapRegion::<()>::new(size as usize).context("mapping guest memory")?),
                None,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            MemoryBackend::Memfd => {
                let m = Arc::new(
                    MemfdMemory::new(RAM_BLOCK, size as usize)
                        .context("creating the memfd for guest RAM")?,
                );
                (m.clone(), Some(m), libc::MAP_SHARED)
            }
        };
        // The regions borrow the mapping, which must outlive every clone of the guest
        // memory (vCPU threads, devices): it lives as long as the process, this
        // reference is never dropped.
        std::mem::forget(host.clone());
        advise_huge_pages(&*host);
        if prefault {
            prefault_memory(&*host)?;
        }
        let low = size.min(LOW_MEMORY);
        let mut slots = vec![slot(&*host, flags, 0, low, 0)?];
        if size > low {
            slots.push(slot(&*host, flags, low, size - low, HIGH_MEMORY_START)?);
        }
        let mem =
            GuestMemoryMmap::from_arc_regions(slots.iter().map(|s| s.region.clone()).collect())
                .context("guest memory layout")?;
        let list = Arc::new(RamList::new());
        let mut block = RamBlock::new(RAM_BLOCK, host, log(&slots)?)?;
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

/// The region of `len` bytes at byte `offset` of `host`, seen by the guest at `gpa`, with
/// a dirty bitmap of its own for the VMM's writes.
fn slot(host: &dyn RamBacking, flags: i32, offset: u64, len: u64, gpa: u64) -> Result<RamSlot> {
    let len = len as usize;
    // SAFETY: the range is inside `host`'s mapping, which is never unmapped (see
    // `GuestRam::new`); an adopted memfd is mapped at the same address.
    let builder = unsafe {
        MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_raw_mmap_pointer(host.as_ptr().add(offset as usize))
    };
    let mmap = builder
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .context("guest memory region")?;
    let region = GuestRegionMmap::new(mmap, GuestAddress(gpa)).context("guest memory layout")?;
    Ok(RamSlot {
        region: Arc::new(region),
        first_page: (offset / 4096) as usize,
    })
}

/// Asks for transparent huge pages (MADV_HUGEPAGE), as QEMU does for guest RAM: fewer
/// faults and TLB misses for the guest, and never-touched memory reads as the huge zero
/// page, one fault per 2 MiB, when migration scans it. Best effort.
fn advise_huge_pages(host: &dyn RamBacking) {
    // SAFETY: advice on the block's own mapping; it changes no contents.
    unsafe {
        libc::madvise(host.as_ptr().cast(), host.size(), libc::MADV_HUGEPAGE);
    }
}

/// Allocates every page of guest RAM now (MADV_POPULATE_WRITE), before it is given to
/// KVM: a destination that will receive the whole of RAM then loads it at memory speed,
/// and steadily, instead of taking a first-touch fault per page during the migration
/// (costly under a shadow-paging hypervisor, and variable with the host's supply of huge
/// pages); a source (`--mem-prealloc`) has it all from the start.
fn prefault_memory(host: &dyn RamBacking) -> Result<()> {
    // SAFETY: the range is exactly the block's own mapping; populating it changes no
    // contents (the pages read as they did).
    let r = unsafe { libc::madvise(host.as_ptr().cast(), host.size(), libc::MADV_POPULATE_WRITE) };
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
            GuestRam::new(
                MAX_MEMORY + (2 << 20),
                MemoryBackend::Anonymous,
                false,
                |_| Ok(Box::new(()))
            )
            .is_err()
        );
    }

    #[test]
    fn memory_above_3_gib_is_seen_from_4_gib_on_as_on_qemus_pc() {
        for backend in [MemoryBackend::Anonymous, MemoryBackend::Memfd] {
            let mut seen = Vec::new();
            let ram = GuestRam::new(5 << 30, backend, false, |slots| {
                seen = slots
                    .iter()
                    .map(|s| (s.region.start_addr().0, s.region.len(), s.first_page))
                    .collect();
                Ok(Box::new(()))
            })
            .unwrap();
            use vm_memory::GuestMemoryRegion as _;
            assert_eq!(
                seen,
                [(0, 3 << 30, 0), (4 << 30, 2 << 30, (3 << 30) / 4096)],
                "{backend:?}"
            );
            ram.write((4 << 30) + 8, b"high").unwrap();
            let mut back = [0u8; 4];
            ram.block.read_bytes((3 << 30) + 8, &mut back);
            assert_eq!(&back, b"high", "{backend:?}");
            assert!(ram.write(3 << 30, b"hole").is_err(), "{backend:?}");
            assert_eq!(ram.memfd.is_some(), backend == MemoryBackend::Memfd);
        }
    }
}
