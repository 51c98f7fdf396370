//! `cargo bench -p qemu-file --bench streaming`: writing 4 KiB pages from a hot read
//! buffer into cold memory (a destination loading guest RAM), with `memcpy` and with
//! `copy_streaming`'s non-temporal stores; 5 rounds each, interleaved, 1 GiB a round.

use std::time::Instant;

use qemu_file::{copy_streaming, store_fence};

const SIZE: usize = 1 << 30;
const PAGE: usize = 4096;
const ROUNDS: usize = 5;

fn round(streaming: bool) -> f64 {
    let src: Vec<u8> = (0..256 * 1024u32).map(|i| i as u8).collect();
    let mut dst = vec![0u8; SIZE];
    // Populated, as a destination's RAM is once the guest ran or was prefaulted.
    for p in (0..SIZE).step_by(PAGE) {
        dst[p] = 1;
    }
    let t = Instant::now();
    let mut s = 0;
    for page in dst.chunks_exact_mut(PAGE) {
        // Records sit at any offset of the read buffer (8-byte headers between pages).
        let from = &src[s..s + PAGE];
        if streaming {
            copy_streaming(page, from);
        } else {
            page.copy_from_slice(from);
        }
        s = (s + PAGE + 8) % (250 * 1024);
    }
    store_fence();
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    SIZE as f64 / secs / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (mut plain, mut nt) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        plain.push(round(false));
        nt.push(round(true));
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        format!("{lo:.2}–{hi:.2}")
    };
    println!(
        "4 KiB pages into cold memory, {ROUNDS} rounds: memcpy {:.2} GB/s ({}), \
         non-temporal {:.2} GB/s ({}); ratio {:.2}",
        median(plain.clone()),
        range(&plain),
        median(nt.clone()),
        range(&nt),
        median(nt.clone()) / median(plain.clone())
    );
}
