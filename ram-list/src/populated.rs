//! Pages never populated read as zero: for private anonymous memory, the kernel's
//! `/proc/self/pagemap` says which pages are in RAM or in swap, and any other page has
//! never been written. The sender then knows such a page is zero without reading it
//! (which would fault in the zero page, one fault per 4 KiB, for an idle guest's RAM).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::format::TARGET_PAGE_SIZE;

/// Pages of pagemap read at a time (4 KiB of it).
const WINDOW: usize = 512;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// A window onto `/proc/self/pagemap`.
#[derive(Debug, Default)]
pub(crate) struct Populated {
    /// None where pagemap cannot be read or host pages are not target pages.
    pagemap: Option<File>,
    /// The host page the window starts at, and its entries.
    window: Option<(usize, Vec<u64>)>,
}

impl Populated {
    pub(crate) fn new() -> Self {
        let page_size_matches = host_page_size() == TARGET_PAGE_SIZE as usize;
        Populated {
            pagemap: page_size_matches
                .then(|| File::open("/proc/self/pagemap").ok())
                .flatten(),
            window: None,
        }
    }

    /// Forgets what was read (a chunk was re-armed, or a sync folded new writes into
    /// bits still set: what the window says may predate them).
    pub(crate) fn invalidate(&mut self) {
        self.window = None;
    }

    /// Whether the page at host address `addr` was never populated, reading ahead up to
    /// `ahead` pages (which must all be armed for dirty logging already: a page written
    /// after the read is then logged and sent again, as long as the window is forgotten
    /// at the next sync). False when unknown.
    pub(crate) fn never_populated(&mut self, addr: usize, ahead: usize) -> bool {
        let Some(pagemap) = &self.pagemap else {
            return false;
        };
        let hp = addr / TARGET_PAGE_SIZE as usize;
        let hit = |w: &(usize, Vec<u64>)| hp >= w.0 && hp < w.0 + w.1.len();
        if !self.window.as_ref().is_some_and(hit) {
            let n = ahead.clamp(1, WINDOW);
            let mut raw = vec![0u8; n * 8];
            let Ok(got) = pagemap.read_at(&mut raw, (hp * 8) as u64) else {
                self.pagemap = None;
                return false;
            };
            let entries = raw[..got - got % 8]
                .chunks_exact(8)
                .map(|e| u64::from_ne_bytes(e.try_into().expect("8 bytes")))
                .collect::<Vec<_>>();
            if entries.is_empty() {
                return false;
            }
            self.window = Some((hp, entries));
        }
        let (first, entries) = self.window.as_ref().expect("just filled");
        entries[hp - first] & (PRESENT | SWAPPED) == 0
    }
}

fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_page_is_populated_an_untouched_one_is_not() {
        let r = vm_memory::MmapRegion::<()>::new(64 * 4096).unwrap();
        let base = r.as_ptr() as usize;
        // SAFETY: inside the fresh mapping.
        unsafe { r.as_ptr().add(5 * 4096).write(1) };
        let mut p = Populated::new();
        if p.pagemap.is_none() {
            eprintln!("no /proc/self/pagemap here: nothing to check");
            return;
        }
        assert!(p.never_populated(base + 4 * 4096, 64 - 4));
        assert!(!p.never_populated(base + 5 * 4096, 64 - 5));
        assert!(p.never_populated(base + 63 * 4096, 1));
        // A stale window is forgotten on demand.
        // SAFETY: as above.
        unsafe { r.as_ptr().add(6 * 4096).write(1) };
        p.invalidate();
        assert!(!p.never_populated(base + 6 * 4096, 58));
    }
}
