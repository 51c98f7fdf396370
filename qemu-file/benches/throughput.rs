//! 1 GiB of 4 KiB pages through `QemuFile` into a unix socket read by a drain thread, beside
//! a plain `write_all` loop of the same pages on the same kind of socket, in the same run.
//!
//! `cargo bench -p qemu-file` prints both throughputs and their ratio (goal: QemuFile at
//! least 90% of the plain loop). Rounds are interleaved so machine noise hits both alike.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qemu_file::{QemuFile, UnixTransport};

#[path = "common/pages.rs"]
mod pages;
use pages::{PAGE, TOTAL, send_pages};

const SOURCE: usize = 256 << 20;
const ROUNDS: usize = 5;

fn drain(mut s: UnixStream) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k as u64,
            }
        }
    })
}

fn plain(mem: &[u8]) -> Duration {
    let (mut a, b) = UnixStream::pair().unwrap();
    let d = drain(b);
    let t = Instant::now();
    for i in 0..TOTAL / PAGE {
        let off = (i * PAGE) % mem.len();
        a.write_all(&mem[off..off + PAGE]).unwrap();
    }
    drop(a);
    assert_eq!(d.join().unwrap(), TOTAL as u64);
    t.elapsed()
}

fn qemu_file(mem: &Arc<Vec<u8>>) -> Duration {
    let (a, b) = UnixStream::pair().unwrap();
    let d = drain(b);
    let mut f = QemuFile::new(Box::new(UnixTransport::new(a, "bench".into())));
    let t = Instant::now();
    send_pages(&mut f, mem);
    drop(f);
    let expect = (TOTAL / PAGE * (PAGE + 8)) as u64;
    assert_eq!(d.join().unwrap(), expect);
    t.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("qemu_file_vs_plain: bench");
        return;
    }
    let mem: Arc<Vec<u8>> = Arc::new((0..SOURCE).map(|i| (i * 31 % 255) as u8 + 1).collect());
    let gib = TOTAL as f64 / (1u64 << 30) as f64;
    let (mut p, mut q, mut ratios) = (vec![], vec![], vec![]);
    for r in 0..ROUNDS {
        let tp = plain(&mem).as_secs_f64();
        let tq = qemu_file(&mem).as_secs_f64();
        // Headers count as payload for QemuFile: it carries 8 more bytes per page.
        let (gp, gq) = (gib / tp, gib / tq);
        println!(
            "round {r}: plain write_all {gp:.2} GiB/s, QemuFile {gq:.2} GiB/s (pages only), ratio {:.2}",
            gq / gp
        );
        p.push(gp);
        q.push(gq);
        ratios.push(gq / gp);
    }
    println!(
        "median of {ROUNDS}: plain write_all {:.2} GiB/s, QemuFile {:.2} GiB/s, QemuFile/plain = {:.2} (goal >= 0.90)",
        median(p),
        median(q),
        median(ratios)
    );
}
