//! `DirtyBitmap`: one bit per page, atomic words, a running count of dirty pages.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::{Error, Result};

const BITS: usize = 64;

/// A page-granular dirty bitmap of atomic 64-bit words (QEMU's migration bitmap).
///
/// Any thread may set bits; the migration thread clears them as it sends pages. Bit `n` of
/// word `w` is page `64 * w + n`, the layout of KVM's dirty log, so a raw KVM bitmap merges
/// word by word. The number of dirty pages is kept as bits change, so asking for it is free.
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
    dirty: AtomicUsize,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("pages", &self.pages)
            .field("dirty", &self.dirty_count())
            .finish()
    }
}

impl DirtyBitmap {
    /// A clean bitmap of `pages` pages.
    pub fn new(pages: usize) -> Self {
        let words = (0..pages.div_ceil(BITS))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyBitmap {
            words,
            pages,
            dirty: AtomicUsize::new(0),
        }
    }

    /// Number of pages the bitmap covers.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether the bitmap covers no page at all.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Number of dirty pages.
    pub fn dirty_count(&self) -> usize {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Mask of the valid bits of word `w` (the last word may be partial).
    fn valid(&self, w: usize) -> u64 {
        let end = self.pages - w * BITS;
        if end >= BITS { !0 } else { (1u64 << end) - 1 }
    }

    /// Marks `page` dirty; returns whether it was clean. Pages past the end are ignored.
    pub fn set(&self, page: usize) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % BITS);
        let old = self.words[page / BITS].fetch_or(bit, Ordering::AcqRel);
        let newly = old & bit == 0;
        if newly {
            self.dirty.fetch_add(1, Ordering::Relaxed);
        }
        newly
    }

    /// Whether `page` is dirty.
    pub fn test(&self, page: usize) -> bool {
        page < self.pages
            && self.words[page / BITS].load(Ordering::Acquire) & (1 << (page % BITS)) != 0
    }

    /// Clears `page` and returns whether it was dirty (the sender's claim on the page).
    pub fn test_and_clear(&self, page: usize) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % BITS);
        let old = self.words[page / BITS].fetch_and(!bit, Ordering::AcqRel);
        let was = old & bit != 0;
        if was {
            self.dirty.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }

    /// Marks the pages in `range` dirty (clipped to the bitmap), a word at a time.
    pub fn set_range(&self, range: Range<usize>) {
        let (start, end) = (range.start.min(self.pages), range.end.min(self.pages));
        let mut p = start;
        while p < end {
            let w = p / BITS;
            let lo = p % BITS;
            let hi = (end - w * BITS).min(BITS);
            let mask = if hi - lo == BITS {
                !0
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w].fetch_or(mask, Ordering::AcqRel);
            self.dirty
                .fetch_add((mask & !old).count_ones() as usize, Ordering::Relaxed);
            p = (w + 1) * BITS;
        }
    }

    /// Marks every page dirty (the start of a migration: everything must be sent once).
    pub fn set_all(&self) {
        self.set_range(0..self.pages);
    }

    /// Clears every page.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            let old = w.swap(0, Ordering::AcqRel);
            self.dirty
                .fetch_sub(old.count_ones() as usize, Ordering::Relaxed);
        }
    }

    /// ORs a raw bitmap (KVM's layout) in, starting at `first_page`, and returns how many
    /// pages became newly dirty. Bits past the end of this bitmap must be clear.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when a set bit falls past the end of the bitmap; nothing is
    /// merged then.
    pub fn merge_raw(&self, first_page: usize, raw: &[u64]) -> Result<usize> {
        let out_of_range = || Error::OutOfRange {
            first_page,
            words: raw.len(),
            pages: self.pages,
        };
        // Check first so a bad bitmap leaves this one untouched.
        for (i, &r) in raw.iter().enumerate() {
            if r == 0 {
                continue;
            }
            let last = first_page + i * BITS + (BITS - 1 - r.leading_zeros() as usize);
            if last >= self.pages {
                return Err(out_of_range());
            }
        }
        let shift = first_page % BITS;
        let base = first_page / BITS;
        let mut newly = 0usize;
        let mut or_into = |w: usize, bits: u64| {
            if bits != 0 {
                let old = self.words[w].fetch_or(bits, Ordering::AcqRel);
                newly += (bits & !old).count_ones() as usize;
            }
        };
        for (i, &r) in raw.iter().enumerate() {
            if r == 0 {
                continue;
            }
            if shift == 0 {
                or_into(base + i, r);
            } else {
                or_into(base + i, r << shift);
                or_into(base + i + 1, r >> (BITS - shift));
            }
        }
        self.dirty.fetch_add(newly, Ordering::Relaxed);
        Ok(newly)
    }

    /// The first dirty page at or after `from`, skipping clean words whole.
    pub fn find_next_dirty(&self, from: usize) -> Option<usize> {
        if from >= self.pages {
            return None;
        }
        let mut w = from / BITS;
        let mut word = self.words[w].load(Ordering::Acquire) & (!0u64 << (from % BITS));
        loop {
            if word != 0 {
                let page = w * BITS + word.trailing_zeros() as usize;
                return (page < self.pages).then_some(page);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w].load(Ordering::Acquire);
        }
    }

    /// Takes word `w` (pages `64w..64w+64`) and leaves it clean: a sender that walks a word
    /// at a time pays one atomic per 64 pages.
    pub fn take_word(&self, w: usize) -> u64 {
        let old = self.words[w].swap(0, Ordering::AcqRel) & self.valid(w);
        self.dirty
            .fetch_sub(old.count_ones() as usize, Ordering::Relaxed);
        old
    }

    /// Number of 64-bit words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// The dirty pages in ascending order (a snapshot taken as the walk goes; bits are not
    /// cleared).
    pub fn iter(&self) -> DirtyPages<'_> {
        DirtyPages {
            bitmap: self,
            next: 0,
        }
    }

    /// The dirty pages coalesced into ranges of consecutive pages.
    pub fn ranges(&self) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            next: 0,
        }
    }
}

/// Iterator over dirty pages, see [`DirtyBitmap::iter`].
#[derive(Debug)]
pub struct DirtyPages<'a> {
    bitmap: &'a DirtyBitmap,
    next: usize,
}

impl Iterator for DirtyPages<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let p = self.bitmap.find_next_dirty(self.next)?;
        self.next = p + 1;
        Some(p)
    }
}

/// Iterator over runs of dirty pages, see [`DirtyBitmap::ranges`].
#[derive(Debug)]
pub struct DirtyRanges<'a> {
    bitmap: &'a DirtyBitmap,
    next: usize,
}

impl Iterator for DirtyRanges<'_> {
    type Item = Range<usize>;
    fn next(&mut self) -> Option<Range<usize>> {
        let start = self.bitmap.find_next_dirty(self.next)?;
        let mut end = start + 1;
        while end < self.bitmap.pages {
            let w = end / BITS;
            // The clean bits from `end` on in this word; the run stops at the first of them.
            let clean = !self.bitmap.words[w].load(Ordering::Acquire) & (!0u64 << (end % BITS));
            if clean != 0 {
                end = (w * BITS + clean.trailing_zeros() as usize).min(self.bitmap.pages);
                break;
            }
            end = (w + 1) * BITS;
        }
        let end = end.min(self.bitmap.pages);
        self.next = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_test_and_clear_keep_the_count() {
        let b = DirtyBitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130), "past the end is ignored");
        assert_eq!(b.dirty_count(), 2);
        assert!(b.test(129));
        assert!(b.test_and_clear(129));
        assert!(!b.test_and_clear(129));
        assert_eq!(b.dirty_count(), 1);
    }

    #[test]
    fn find_next_dirty_skips_clean_words() {
        let b = DirtyBitmap::new(1000);
        assert_eq!(b.find_next_dirty(0), None);
        b.set(5);
        b.set(700);
        b.set(999);
        assert_eq!(b.find_next_dirty(0), Some(5));
        assert_eq!(b.find_next_dirty(5), Some(5));
        assert_eq!(b.find_next_dirty(6), Some(700));
        assert_eq!(b.find_next_dirty(701), Some(999));
        assert_eq!(b.find_next_dirty(1000), None);
        assert_eq!(b.iter().collect::<Vec<_>>(), [5, 700, 999]);
    }

    #[test]
    fn set_range_and_ranges_coalesce() {
        let b = DirtyBitmap::new(300);
        b.set_range(3..70);
        b.set_range(128..256);
        b.set(299);
        b.set_range(290..1000);
        assert_eq!(b.dirty_count(), 67 + 128 + 10);
        assert_eq!(b.ranges().collect::<Vec<_>>(), [3..70, 128..256, 290..300]);
        b.set_all();
        assert_eq!(b.dirty_count(), 300);
        let all: Vec<_> = b.ranges().collect();
        assert_eq!((all.len(), all[0].clone()), (1, 0..300));
        b.clear_all();
        assert_eq!(b.dirty_count(), 0);
        assert_eq!(b.ranges().count(), 0);
    }

    #[test]
    fn merge_raw_counts_only_new_pages() {
        let b = DirtyBitmap::new(128);
        b.set(1);
        assert_eq!(b.merge_raw(0, &[0b111, 1 << 63]).unwrap(), 3);
        assert_eq!(b.dirty_count(), 4);
        assert_eq!(b.iter().collect::<Vec<_>>(), [0, 1, 2, 127]);
    }

    #[test]
    fn merge_raw_at_an_unaligned_page() {
        let b = DirtyBitmap::new(200);
        assert_eq!(b.merge_raw(60, &[0b1_0001, 1]).unwrap(), 3);
        assert_eq!(b.iter().collect::<Vec<_>>(), [60, 64, 124]);
    }

    #[test]
    fn merge_raw_refuses_bits_past_the_end_and_changes_nothing() {
        let b = DirtyBitmap::new(70);
        let e = b.merge_raw(0, &[1, 1 << 6]).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        assert_eq!(b.dirty_count(), 0);
        assert_eq!(b.merge_raw(0, &[1, 1 << 5]).unwrap(), 2);
    }

    #[test]
    fn take_word_clears_and_counts() {
        let b = DirtyBitmap::new(100);
        b.set_range(60..100);
        assert_eq!(b.take_word(1), (1u64 << 36) - 1);
        assert_eq!(b.dirty_count(), 4);
        assert_eq!(b.word_count(), 2);
    }

    #[test]
    fn concurrent_setters_and_a_clearer_agree_on_the_count() {
        let b = std::sync::Arc::new(DirtyBitmap::new(1 << 16));
        let setters: Vec<_> = (0..2)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..(1 << 16) {
                        b.set((i * 7 + t) % (1 << 16));
                    }
                })
            })
            .collect();
        let mut cleared = 0;
        for _ in 0..4 {
            for p in 0..(1 << 16) {
                cleared += b.test_and_clear(p) as usize;
            }
        }
        for s in setters {
            s.join().unwrap();
        }
        let left = b.iter().count();
        assert_eq!(b.dirty_count(), left);
        assert!(cleared + left >= 1 << 16);
    }
}
