//! The bulk copy of a 1 GiB disk image through the block section (read, stream over a unix
//! socket, load into the destination image, fsync), beside `cp` of the same image followed
//! by an fsync, in the same run. Both read a warm page cache.
//!
//! `cargo bench -p block-migration` (set BENCH_DIR to put the images elsewhere than /tmp).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_migration::{BlockMigration, BlockStats, Disk, DiskOptions};
use qemu_file::{QemuFile, UnixTransport};
use savevm::SaveVm;

const SIZE: u64 = 1 << 30;

fn make_image(p: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(p).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for chunk in 0..SIZE >> 20 {
        // One chunk in eight left zero, as real images have holes.
        if chunk % 8 == 7 {
            buf.fill(0);
        } else {
            for w in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn ours(src: &Path, dst: &Path) -> Duration {
    std::fs::File::create(dst).unwrap().set_len(SIZE).unwrap();
    let s = Arc::new(Disk::open(src, "disk0", &DiskOptions::default()).unwrap());
    let d = Arc::new(Disk::open(dst, "disk0", &DiskOptions::default()).unwrap());
    let (a, b) = UnixStream::pair().unwrap();
    let t = Instant::now();
    let loader = std::thread::spawn(move || {
        let mut vm = SaveVm::new("pc");
        vm.register_live(
            BlockMigration::info(),
            Box::new(BlockMigration::new(vec![d], Arc::default())),
        )
        .unwrap();
        vm.load(&mut QemuFile::new(Box::new(UnixTransport::new(
            b,
            "bench".into(),
        ))))
        .unwrap();
    });
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        BlockMigration::info(),
        Box::new(BlockMigration::new(
            vec![s],
            Arc::new(BlockStats::default()),
        )),
    )
    .unwrap();
    let mut f = QemuFile::new(Box::new(UnixTransport::new(a, "bench".into())));
    vm.save_header(&mut f);
    vm.save_setup(&mut f).unwrap();
    while vm.completion_blocked() {
        vm.prepare_iterate(8 << 20).unwrap();
        vm.save_iterate(&mut f).unwrap();
        f.flush().unwrap();
    }
    vm.save_complete(&mut f).unwrap();
    vm.save_devices(&mut f).unwrap();
    f.finish().unwrap();
    vm.save_cleanup();
    drop(f);
    loader.join().unwrap();
    t.elapsed()
}

fn cp(src: &Path, dst: &Path) -> Duration {
    let _ = std::fs::remove_file(dst);
    let t = Instant::now();
    assert!(
        Command::new("cp")
            .arg(src)
            .arg(dst)
            .status()
            .unwrap()
            .success()
    );
    std::fs::File::open(dst).unwrap().sync_all().unwrap();
    t.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("bulk: bench");
        return;
    }
    let dir: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("blockmig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, a, b) = (
        dir.join("src.img"),
        dir.join("ours.img"),
        dir.join("cp.img"),
    );
    make_image(&src);
    let gibps = |d: Duration| SIZE as f64 / (1u64 << 30) as f64 / d.as_secs_f64();
    let mut ratios = vec![];
    for round in 0..3 {
        let (to, tc) = (ours(&src, &a), cp(&src, &b));
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "the copies differ"
        );
        println!(
            "round {round}: block migration {:.2} GiB/s, cp + fsync {:.2} GiB/s, ratio {:.2}",
            gibps(to),
            gibps(tc),
            tc.as_secs_f64() / to.as_secs_f64()
        );
        ratios.push(tc.as_secs_f64() / to.as_secs_f64());
    }
    ratios.sort_by(|x, y| x.partial_cmp(y).unwrap());
    println!("median block migration / cp = {:.2}", ratios[1]);
    std::fs::remove_dir_all(&dir).unwrap();
}
