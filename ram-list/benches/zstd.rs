//! zstd per multifd packet (128 pages), on three kinds of page: what it costs and what it
//! saves, to tell when `multifd-compression zstd` pays off.
//!
//! - sparse: a few non-zero words per page (the built-in guest's fill and dirty data);
//! - text: log-like lines with changing numbers;
//! - random: incompressible.
//!
//! `cargo bench -p ram-list --bench zstd`

use std::time::Instant;

use ram_list::multifd::PAGES_PER_PACKET;
use ram_list::multifd::zstd::{ZstdRecv, ZstdSend};

const PAGE: usize = 4096;
/// Guest memory compressed per case.
const TOTAL: usize = 256 << 20;

fn pages(kind: &str) -> Vec<Vec<u8>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..TOTAL / PAGE)
        .map(|p| match kind {
            "sparse" => {
                let mut v = vec![0u8; PAGE];
                for w in (0..PAGE).step_by(512) {
                    v[w..w + 8].copy_from_slice(&(p as u64 * 31 + w as u64).to_le_bytes());
                }
                v
            }
            "text" => {
                let mut s = String::new();
                while s.len() < PAGE {
                    let n = next();
                    s += &format!(
                        "2026-11-26T05:{:02}:{:02} worker-{} handled request {} in {} us\n",
                        n % 60,
                        (n >> 8) % 60,
                        (n >> 16) % 8,
                        n >> 40,
                        (n >> 20) % 5000
                    );
                }
                s.into_bytes()[..PAGE].to_vec()
            }
            _ => (0..PAGE / 8).flat_map(|_| next().to_le_bytes()).collect(),
        })
        .collect()
}

fn main() {
    println!("| pages | level | ratio | compress MB/s | decompress MB/s |");
    println!("|---|---:|---:|---:|---:|");
    for kind in ["sparse", "text", "random"] {
        let data = pages(kind);
        for level in [1u8, 3] {
            let mut tx = ZstdSend::new(level).unwrap();
            let t = Instant::now();
            let packets: Vec<Vec<u8>> = data
                .chunks(PAGES_PER_PACKET)
                .map(|c| tx.compress(c.iter().map(|p| &p[..])).unwrap().to_vec())
                .collect();
            let ct = t.elapsed().as_secs_f64();
            let out: usize = packets.iter().map(Vec::len).sum();
            let mut rx = ZstdRecv::new().unwrap();
            let mut back = vec![vec![0u8; PAGE]; PAGES_PER_PACKET];
            let t = Instant::now();
            for (p, c) in packets.iter().zip(data.chunks(PAGES_PER_PACKET)) {
                rx.input(p.len()).unwrap().copy_from_slice(p);
                let mut slices: Vec<&mut [u8]> =
                    back.iter_mut().take(c.len()).map(|b| &mut b[..]).collect();
                rx.decompress(p.len(), &mut slices).unwrap();
            }
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(back[..], data[data.len() - PAGES_PER_PACKET..]);
            let mb = TOTAL as f64 / 1e6;
            println!(
                "| {kind} | {level} | {:.1} | {:.0} | {:.0} |",
                TOTAL as f64 / out as f64,
                mb / ct,
                mb / dt
            );
        }
    }
}
