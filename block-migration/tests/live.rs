//! Block migration end to end in one process: live copies with writes between iterations,
//! and every way a destination refuses a stream before writing anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block_migration::{BlockMigration, BlockStats, BlockWalker, Disk, DiskOptions, Error};
use qemu_file::{MemBuffer, QemuFile};
use savevm::SaveVm;

const MIB: u64 = 1 << 20;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blockmig-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image(dir: &Path, file: &str, size: u64) -> PathBuf {
    let p = dir.join(file);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn open(p: &Path, name: &str) -> Arc<Disk> {
    Arc::new(Disk::open(p, name, &DiskOptions::default()).unwrap())
}

fn vm(disks: Vec<Arc<Disk>>) -> (SaveVm, Arc<BlockStats>) {
    let stats = Arc::new(BlockStats::default());
    let mut s = SaveVm::new("pc");
    s.register_live(
        BlockMigration::info(),
        Box::new(BlockMigration::new(disks, stats.clone())),
    )
    .unwrap();
    (s, stats)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A guest write: a random run of bytes somewhere in the disk.
fn guest_write(d: &Disk, rng: &mut Rng) {
    let len = 1 + (rng.next() % 20_000) as usize;
    let off = rng.next() % (d.size() - len as u64);
    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    d.write_at(&data, off).unwrap();
}

fn contents(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn live_copies_with_writes_between_iterations_end_identical() {
    let d = dir("live");
    // Two disks, one not a whole number of MiB (its last chunk is partial).
    let (sa, sb) = (
        image(&d, "a.src", 9 * MIB),
        image(&d, "b.src", 3 * MIB + 8 * 512),
    );
    let (ta, tb) = (
        image(&d, "a.dst", 9 * MIB),
        image(&d, "b.dst", 3 * MIB + 8 * 512),
    );
    let (da, db) = (open(&sa, "disk-a"), open(&sb, "disk-b"));
    let mut rng = Rng(0x5eed);
    for _ in 0..50 {
        guest_write(&da, &mut rng);
    }
    let (mut src, stats) = vm(vec![da.clone(), db.clone()]);
    let buf = MemBuffer::new();
    let mut f = buf.file();
    src.save_header(&mut f);
    src.save_setup(&mut f).unwrap();
    let mut rounds = 0;
    while src.completion_blocked() || rounds < 5 {
        rounds += 1;
        for _ in 0..(rng.next() % 6) {
            guest_write(if rng.next() % 2 == 0 { &da } else { &db }, &mut rng);
        }
        src.prepare_iterate(2 * MIB as usize).unwrap();
        src.save_iterate(&mut f).unwrap();
        f.flush().unwrap();
        assert!(rounds < 100);
    }
    assert!(src.pending_exact().unwrap() > 0 || stats.snapshot().remaining == 0);
    // The guest stops: the rest goes at completion.
    src.save_complete(&mut f).unwrap();
    src.save_devices(&mut f).unwrap();
    f.finish().unwrap();
    src.save_cleanup();
    let s = stats.snapshot();
    assert_eq!(s.total, 12 * MIB + 8 * 512);
    assert_eq!(s.remaining, 0);
    assert!(s.zero_chunks > 0);
    assert!(s.transferred >= s.total, "{s:?}");

    let (ta_d, tb_d) = (open(&ta, "disk-a"), open(&tb, "disk-b"));
    let (mut dst, dstats) = vm(vec![ta_d, tb_d]);
    dst.load(&mut QemuFile::from_bytes(buf.contents())).unwrap();
    assert_eq!(contents(&ta), contents(&sa));
    assert_eq!(contents(&tb), contents(&sb));
    assert_eq!(dstats.snapshot().bulk_percent, 100);
    std::fs::remove_dir_all(&d).unwrap();
}

fn stream_of(disks: &[(&str, u64)], d: &Path) -> Vec<u8> {
    let ds: Vec<_> = disks
        .iter()
        .map(|(n, size)| {
            let p = image(d, &format!("{n}.src"), *size);
            let disk = open(&p, n);
            disk.write_at(&[0x5a; 4096], 0).unwrap();
            disk
        })
        .collect();
    let (mut src, _) = vm(ds);
    let buf = MemBuffer::new();
    src.save_snapshot(&mut buf.file()).unwrap();
    buf.contents()
}

/// Loads `stream` into fresh images of `disks`; the error, and whether any image changed.
fn refuse(stream: Vec<u8>, disks: &[(&str, u64)], d: &Path) -> (Error, bool) {
    let paths: Vec<_> = disks
        .iter()
        .map(|(n, s)| image(d, &format!("{n}.dst"), *s))
        .collect();
    let ds = disks
        .iter()
        .zip(&paths)
        .map(|((n, _), p)| open(p, n))
        .collect();
    let (mut dst, _) = vm(ds);
    let e = dst.load(&mut QemuFile::from_bytes(stream)).unwrap_err();
    let touched = paths.iter().any(|p| contents(p).iter().any(|b| *b != 0));
    match e {
        savevm::Error::Section { source, .. } => (*source.downcast::<Error>().unwrap(), touched),
        other => panic!("{other}"),
    }
}

#[test]
fn a_size_mismatch_is_refused_before_any_write() {
    let d = dir("size");
    let s = stream_of(&[("d0", 4 * MIB), ("d1", 2 * MIB)], &d);
    let (e, touched) = refuse(s, &[("d0", 4 * MIB), ("d1", 3 * MIB)], &d);
    assert!(
        matches!(&e, Error::SizeMismatch { name, local, stream } if name == "d1" && *local == 3 * MIB && *stream == 2 * MIB),
        "{e}"
    );
    assert!(!touched, "a chunk was written before the refusal");
    assert!(e.to_string().contains("same size"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_unknown_or_missing_disk_is_refused_before_any_write() {
    let d = dir("names");
    let s = stream_of(&[("d0", 2 * MIB), ("other", 2 * MIB)], &d);
    let (e, touched) = refuse(s, &[("d0", 2 * MIB)], &d);
    assert!(
        matches!(&e, Error::UnknownDisk { name } if name == "other"),
        "{e}"
    );
    assert!(!touched);
    let s = stream_of(&[("d0", 2 * MIB)], &d);
    let (e, touched) = refuse(s, &[("d0", 2 * MIB), ("d9", 2 * MIB)], &d);
    assert!(
        matches!(&e, Error::MissingDisk { name } if name == "d9"),
        "{e}"
    );
    assert!(!touched);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_created_destination_takes_the_streams_size() {
    let d = dir("create");
    let s = stream_of(&[("d0", 5 * MIB)], &d);
    let p = d.join("new.img");
    let mut options = DiskOptions::default();
    options.create = true;
    let disk = Arc::new(Disk::open(&p, "d0", &options).unwrap());
    let stats = Arc::new(BlockStats::default());
    let mut mig = BlockMigration::new(vec![disk.clone()], stats);
    mig.allow_resize("d0");
    let mut dst = SaveVm::new("pc");
    dst.register_live(BlockMigration::info(), Box::new(mig))
        .unwrap();
    dst.load(&mut QemuFile::from_bytes(s)).unwrap();
    assert_eq!(disk.size(), 5 * MIB);
    assert_eq!(&contents(&p)[..4096], &[0x5a; 4096][..]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn hostile_streams_are_refused_without_panics() {
    let d = dir("hostile");
    let s = stream_of(&[("d0", 2 * MIB)], &d);
    let eof = s.iter().rposition(|b| *b == 0x06).unwrap() - 1;
    // Every cut through the headers and records, and through the data every 4 KiB.
    let cuts = (0..eof).filter(|c| *c < 200 || c % 4096 == 0 || *c > eof - 200);
    for cut in cuts {
        let p = image(&d, "t.dst", 2 * MIB);
        let (mut dst, _) = vm(vec![open(&p, "d0")]);
        assert!(
            dst.load(&mut QemuFile::from_bytes(s[..cut].to_vec()))
                .is_err(),
            "cut {cut}"
        );
    }
    let mut rng = Rng(3);
    for _ in 0..300 {
        let mut b = s.clone();
        let i = (rng.next() as usize) % eof.min(4096);
        b[i] ^= 1 << (rng.next() % 8);
        let p = image(&d, "t.dst", 2 * MIB);
        let (mut dst, _) = vm(vec![open(&p, "d0")]);
        let _ = dst.load(&mut QemuFile::from_bytes(b));
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn dump_of_a_disk_stream() {
    let d = dir("dump");
    let s = stream_of(&[("disk0", 3 * MIB)], &d);
    let p = d.join("stream");
    std::fs::write(&p, s).unwrap();
    let text = savevm::dump_stream(&p, &mut [&mut BlockWalker::default()]).unwrap();
    std::fs::remove_dir_all(&d).unwrap();
    insta::assert_snapshot!(text);
}
