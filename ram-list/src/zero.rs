//! Zero-page detection at memory speed.

/// Whether `len` bytes at `p` are all zero. Reads eight words per step and stops at the
/// first non-zero cache line, so a data page usually costs one cache line.
///
/// # Safety
/// `p..p + len` must be readable and `len` a multiple of 64. The memory may be written
/// concurrently (a running guest): the answer is then any mix of old and new contents,
/// which the dirty log makes good.
pub(crate) unsafe fn is_zero(p: *const u8, len: usize) -> bool {
    debug_assert_eq!(len % 64, 0);
    let words = p.cast::<u64>();
    let mut i = 0;
    while i < len / 8 {
        // SAFETY: the caller guarantees `len` readable bytes and `i + 7 < len / 8`. Plain
        // loads that the compiler may widen; a concurrent guest write only makes the
        // answer stale, and the dirty log sends that page again.
        let acc = unsafe {
            words.add(i).read_unaligned()
                | words.add(i + 1).read_unaligned()
                | words.add(i + 2).read_unaligned()
                | words.add(i + 3).read_unaligned()
                | words.add(i + 4).read_unaligned()
                | words.add(i + 5).read_unaligned()
                | words.add(i + 6).read_unaligned()
                | words.add(i + 7).read_unaligned()
        };
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_single_set_bit_anywhere() {
        let mut page = vec![0u8; 4096];
        // SAFETY: 4096 readable bytes.
        assert!(unsafe { is_zero(page.as_ptr(), 4096) });
        for i in [0, 7, 63, 64, 2048, 4095] {
            page[i] = 0x80;
            // SAFETY: as above.
            assert!(!unsafe { is_zero(page.as_ptr(), 4096) }, "byte {i}");
            page[i] = 0;
        }
    }
}
