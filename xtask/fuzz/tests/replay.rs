//! Every target on its seeds, on every input that once crashed it (`regressions/<target>/`),
//! and on a few thousand deterministic mutations of the seeds: truncations, bit flips,
//! overwritten lengths. A short, always-run version of `cargo xtask fuzz`.

use std::path::Path;

use fuzz_targets::TARGETS;

#[test]
fn seeds_and_regressions_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    for t in TARGETS {
        let seeds = (t.seeds)();
        assert!(!seeds.is_empty(), "{} has seeds", t.name);
        for s in &seeds {
            (t.run)(s);
        }
        let Ok(entries) = std::fs::read_dir(dir.join(t.name)) else {
            continue;
        };
        for e in entries.flatten() {
            let input = std::fs::read(e.path()).unwrap();
            (t.run)(&input);
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutated_seeds_never_panic() {
    let mut rng = Rng(0x00f0_1234_5678_9abc);
    for t in TARGETS {
        for seed in (t.seeds)() {
            for _ in 0..400 {
                let mut m = seed.clone();
                match rng.below(4) {
                    0 => m.truncate(rng.below(m.len())),
                    1 => {
                        for _ in 0..1 + rng.below(4) {
                            let i = rng.below(m.len());
                            if let Some(b) = m.get_mut(i) {
                                *b ^= 1 << rng.below(8);
                            }
                        }
                    }
                    2 => {
                        // A length or offset field replaced by something huge or odd.
                        let i = rng.below(m.len().saturating_sub(8));
                        let v = [u64::MAX, 1 << 40, 0x7fff_ffff, 4097, 0][rng.below(5)];
                        let n = m.len().min(i + 8) - i;
                        m[i..i + n].copy_from_slice(&v.to_be_bytes()[..n]);
                    }
                    _ => {
                        let i = rng.below(m.len());
                        let tail = m.split_off(i);
                        m.extend(std::iter::repeat_n(rng.next() as u8, rng.below(64)));
                        m.extend(tail);
                    }
                }
                (t.run)(&m);
            }
        }
    }
}
