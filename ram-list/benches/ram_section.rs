//! The RAM section's send path for a 1 GiB block, in the same run as physical references:
//!
//! - all-zero RAM: every page checked and sent as a ZERO record (GiB/s of guest RAM);
//! - non-zero RAM into a unix socket read by a drain thread, against a plain `write_all`
//!   of the same memory, page by page, on the same kind of socket (ratio).
//!
//! `cargo bench -p ram-list`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qemu_file::{MemBuffer, QemuFile, Transport, UnixTransport};
use ram_list::{RamBlock, RamList, RamSection, RamStats};
use savevm::SaveVm;
use vm_memory::MmapRegion;

const SIZE: usize = 1 << 30;
const PAGE: usize = 4096;

fn ram(fill: impl Fn(usize) -> u8) -> (SaveVm, Arc<RamBlock>) {
    let list = Arc::new(RamList::new());
    let host = Arc::new(MmapRegion::<()>::new(SIZE).unwrap());
    let block = list
        .add(RamBlock::new("pc.ram", host, Box::new(())).unwrap())
        .unwrap();
    let page: Vec<u8> = vec![0; PAGE];
    for p in 0..SIZE / PAGE {
        let mut page = page.clone();
        page[p % PAGE] = fill(p);
        block.write_bytes((p * PAGE) as u64, &page);
    }
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        RamSection::info(),
        Box::new(RamSection::new(list, Arc::new(RamStats::default()))),
    )
    .unwrap();
    (vm, block)
}

fn migrate(vm: &mut SaveVm, t: Box<dyn Transport>) -> Duration {
    let mut f = QemuFile::new(t);
    f.set_chunk_budget(2 << 20);
    let t0 = Instant::now();
    vm.save_header(&mut f);
    vm.save_setup(&mut f).unwrap();
    while !vm.save_iterate(&mut f).unwrap() {
        f.flush().unwrap();
    }
    vm.pending_exact().unwrap();
    vm.save_complete(&mut f).unwrap();
    vm.save_devices(&mut f).unwrap();
    f.finish().unwrap();
    let d = t0.elapsed();
    vm.save_cleanup();
    d
}

fn drain(mut s: UnixStream) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    })
}

fn gibps(d: Duration) -> f64 {
    SIZE as f64 / (1u64 << 30) as f64 / d.as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("ram_section: bench");
        return;
    }
    let (mut zero_vm, _) = ram(|_| 0);
    let mut zero = vec![];
    for _ in 0..3 {
        zero.push(migrate(&mut zero_vm, Box::new(MemBuffer::new())));
    }
    zero.sort();
    println!(
        "all-zero 1 GiB: {:.1} GiB/s of guest RAM checked and sent as ZERO records",
        gibps(zero[1])
    );
    drop(zero_vm);

    let (mut vm, block) = ram(|p| (p % 251) as u8 + 1);
    let mut ratios = vec![];
    for round in 0..3 {
        let (a, b) = UnixStream::pair().unwrap();
        let d = drain(b);
        let tq = migrate(&mut vm, Box::new(UnixTransport::new(a, "bench".into())));
        d.join().unwrap();

        let (mut a, b) = UnixStream::pair().unwrap();
        let d = drain(b);
        let t0 = Instant::now();
        let mut page = vec![0u8; PAGE];
        for p in 0..SIZE / PAGE {
            block.read_bytes((p * PAGE) as u64, &mut page);
            a.write_all(&page).unwrap();
        }
        drop(a);
        let tp = t0.elapsed();
        d.join().unwrap();
        println!(
            "round {round}: RAM section {:.2} GiB/s, plain copy+write_all {:.2} GiB/s, ratio {:.2}",
            gibps(tq),
            gibps(tp),
            tp.as_secs_f64() / tq.as_secs_f64()
        );
        ratios.push(tp.as_secs_f64() / tq.as_secs_f64());
    }
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("median RAM section / plain = {:.2}", ratios[1]);
}
