//! The RAM section end to end: randomized live round trips and hostile streams.

use std::sync::Arc;

use std::sync::Mutex;

use dirty_bitmap::{DirtyBitmap, DirtyLogSource, ManualLog};
use qemu_file::{MemBuffer, MemTransport, QemuFile, Transport, mem_channel};
use ram_list::{
    Error, MultifdCompression, MultifdReceiver, MultifdSender, RamBlock, RamList, RamSection,
    RamStats, RecvTarget,
};
use savevm::SaveVm;
use vm_memory::MmapRegion;

const PAGE: usize = 4096;

struct Vm {
    savevm: SaveVm,
    list: Arc<RamList>,
    logs: Vec<Log>,
    stats: Arc<RamStats>,
}

/// A destination whose section knows its memory starts zeroed.
fn vm_fresh(blocks: &[(&str, usize)]) -> Vm {
    let mut v = vm(blocks);
    v.savevm = SaveVm::new("pc");
    v.savevm
        .register_live(
            RamSection::info(),
            Box::new(RamSection::new(v.list.clone(), v.stats.clone()).with_fresh_memory()),
        )
        .unwrap();
    v
}

/// A guest's writes as a dirty log sees them.
#[derive(Clone)]
enum Log {
    /// Every write is reported by the next sync.
    Classic(ManualLog),
    /// KVM with manual protect, modelled.
    Protect(ProtectModel),
}

impl Log {
    fn mark(&self, p: usize) {
        match self {
            Log::Classic(l) => l.mark(p),
            Log::Protect(m) => m.write(p),
        }
    }
}

/// KVM's dirty log with manual protect and initially-set bitmaps: a write to a protected
/// page faults, unprotects it and sets its bit; a write to an unprotected page is not
/// seen at all; a sync reads the bits without touching them; a clear resets the bits of
/// the pages syncs reported (and only those: a page written after the last sync keeps
/// its bit) and protects them again. Logging starts with every bit set, nothing
/// protected.
#[derive(Clone, Debug, Default)]
struct ProtectModel(Arc<Mutex<Pages>>);

#[derive(Debug, Default)]
struct Pages {
    bits: Vec<bool>,
    protected: Vec<bool>,
    reported: Vec<bool>,
}

const CHUNK: usize = 64;

impl ProtectModel {
    fn new(pages: usize) -> Self {
        ProtectModel(Arc::new(Mutex::new(Pages {
            bits: vec![true; pages],
            protected: vec![false; pages],
            reported: vec![true; pages],
        })))
    }

    fn write(&self, p: usize) {
        let mut m = self.0.lock().unwrap();
        if m.protected[p] {
            m.protected[p] = false;
            m.bits[p] = true;
        }
    }
}

impl DirtyLogSource for ProtectModel {
    fn start(&mut self) -> dirty_bitmap::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.bits.fill(true);
        m.protected.fill(false);
        m.reported.fill(true);
        Ok(())
    }

    fn sync(&mut self, bitmap: &DirtyBitmap) -> dirty_bitmap::Result<usize> {
        let mut m = self.0.lock().unwrap();
        let mut raw = vec![0u64; m.bits.len().div_ceil(64)];
        for p in 0..m.bits.len() {
            if m.bits[p] {
                raw[p / 64] |= 1 << (p % 64);
                m.reported[p] = true;
            }
        }
        bitmap.merge_raw(0, &raw)
    }

    fn clear_granularity(&self) -> Option<usize> {
        Some(CHUNK)
    }

    fn clear(&mut self, first_page: usize, pages: usize) -> dirty_bitmap::Result<()> {
        assert_eq!(first_page % CHUNK, 0);
        let mut m = self.0.lock().unwrap();
        let end = (first_page + pages).min(m.bits.len());
        for p in first_page..end {
            if m.reported[p] {
                m.reported[p] = false;
                m.bits[p] = false;
                m.protected[p] = true;
            }
        }
        Ok(())
    }
}

fn vm(blocks: &[(&str, usize)]) -> Vm {
    vm_with(blocks, false)
}

fn vm_with(blocks: &[(&str, usize)], protect: bool) -> Vm {
    vm_custom(blocks, protect, RamSection::new)
}

/// A VM whose RAM section `section` makes from the list and the counters.
fn vm_custom(
    blocks: &[(&str, usize)],
    protect: bool,
    section: impl FnOnce(Arc<RamList>, Arc<RamStats>) -> RamSection,
) -> Vm {
    let list = Arc::new(RamList::new());
    let mut logs = Vec::new();
    for (name, pages) in blocks {
        let log = if protect {
            Log::Protect(ProtectModel::new(*pages))
        } else {
            Log::Classic(ManualLog::new(*pages))
        };
        let boxed: Box<dyn DirtyLogSource> = match log.clone() {
            Log::Classic(l) => Box::new(l),
            Log::Protect(m) => Box::new(m),
        };
        let host = Arc::new(MmapRegion::<()>::new(pages * PAGE).unwrap());
        list.add(RamBlock::new(*name, host, boxed).unwrap())
            .unwrap();
        logs.push(log);
    }
    let stats = Arc::new(RamStats::default());
    let mut savevm = SaveVm::new("pc");
    savevm
        .register_live(
            RamSection::info(),
            Box::new(section(list.clone(), stats.clone())),
        )
        .unwrap();
    Vm {
        savevm,
        list,
        logs,
        stats,
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
}

/// Writes page `p` of block `b` like a guest: zero or random content, and logs it.
fn guest_write(vm: &Vm, rng: &mut Rng, b: usize, p: usize) {
    let block = &vm.list.blocks()[b];
    let mut page = vec![0u8; PAGE];
    if rng.next() % 3 != 0 {
        for w in page.chunks_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
    }
    block.write_bytes((p * PAGE) as u64, &page);
    vm.logs[b].mark(p);
}

fn memory(vm: &Vm) -> Vec<Vec<u8>> {
    vm.list
        .blocks()
        .iter()
        .map(|b| {
            let mut m = vec![0u8; b.used_length() as usize];
            b.read_bytes(0, &mut m);
            m
        })
        .collect()
}

/// A live migration by hand: setup, iterations with guest writes between them, final sync
/// and completion; the stream is then loaded into a fresh VM.
fn live_round_trip(seed: u64, fresh: bool) {
    live_round_trip_with(seed, fresh, false);
}

fn live_round_trip_with(seed: u64, fresh: bool, protect: bool) {
    let src = vm_with(&SHAPE, protect);
    let buf = MemBuffer::new();
    let f = buf.file();
    let src = migrate_live(src, f, seed);
    let mut dst = if fresh { vm_fresh(&SHAPE) } else { vm(&SHAPE) };
    dst.savevm
        .load(&mut QemuFile::from_bytes(buf.contents()))
        .unwrap();
    assert_eq!(memory(&dst), memory(&src), "seed {seed}");
}

const SHAPE: [(&str, usize); 2] = [("pc.ram", 300), ("vga.vram", 70)];

/// A live migration of `src` (of [`SHAPE`]) by hand into `f`: setup, iterations with guest
/// writes between them, final sync and completion. Returns the source to compare with.
fn migrate_live(mut src: Vm, mut f: QemuFile, seed: u64) -> Vm {
    let shape = SHAPE;
    let mut rng = Rng(seed);
    for (b, (_, pages)) in shape.iter().enumerate() {
        for p in 0..*pages {
            guest_write(&src, &mut rng, b, p);
        }
    }
    f.set_chunk_budget(64 * 1024);
    src.savevm.save_header(&mut f);
    src.savevm.save_setup(&mut f).unwrap();
    let mut rounds = 0;
    loop {
        rounds += 1;
        // The guest keeps writing while the section iterates.
        for _ in 0..(rng.next() % 40) {
            let b = (rng.next() % 2) as usize;
            let p = (rng.next() % shape[b].1 as u64) as usize;
            guest_write(&src, &mut rng, b, p);
        }
        if src.savevm.pending_estimate() == 0 {
            src.savevm.pending_exact().unwrap();
        }
        src.savevm.save_iterate(&mut f).unwrap();
        f.flush().unwrap();
        if rounds > 30 {
            break;
        }
    }
    // Stop: final sync and completion.
    src.savevm.pending_exact().unwrap();
    src.savevm.save_complete(&mut f).unwrap();
    src.savevm.save_devices(&mut f).unwrap();
    f.finish().unwrap();
    src.savevm.save_cleanup();
    let s = src.stats.snapshot();
    assert!(s.duplicate > 0 && s.normal > 0, "{s:?}");
    assert!(s.dirty_sync_count >= 1);
    src
}

/// The same live migration with multifd: normal pages over `channels` connections
/// (zstd-compressed or not), loaded in parallel by a destination running meanwhile.
fn multifd_round_trip(seed: u64, channels: usize, zstd: bool, fresh: bool) {
    let (main_tx, main_rx) = mem_channel(256 * 1024);
    let (tx, rx): (Vec<_>, Vec<_>) = (0..channels).map(|_| mem_channel(64 * 1024)).unzip();
    let compression = if zstd {
        MultifdCompression::Zstd
    } else {
        MultifdCompression::None
    };
    let boxed = |v: Vec<MemTransport>| -> Vec<Box<dyn Transport>> {
        v.into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    };
    let sender = MultifdSender::start(boxed(tx), [0; 16], compression, 1).unwrap();
    let src = vm_custom(&SHAPE, false, |l, s| {
        RamSection::new(l, s).with_multifd(sender)
    });
    let on_error = main_rx.shutdown_handle();
    let mut receiver = None;
    let dst = vm_custom(&SHAPE, false, |list, stats| {
        let mut target = RecvTarget::new(list.clone(), stats.clone(), [0; 16]);
        target.fresh = fresh;
        target.compressed = zstd;
        let r = Arc::new(MultifdReceiver::start(boxed(rx), target, on_error).unwrap());
        receiver = Some(r.clone());
        let s = RamSection::new(list, stats).with_multifd_receiver(r);
        if fresh { s.with_fresh_memory() } else { s }
    });
    let loader = std::thread::spawn(move || {
        let mut dst = dst;
        let r = dst.savevm.load(&mut QemuFile::new(Box::new(main_rx)));
        (dst, r)
    });
    let f = QemuFile::new(Box::new(main_tx));
    let src = migrate_live(src, f, seed);
    let (dst, r) = loader.join().unwrap();
    let receiver = receiver.unwrap();
    r.unwrap_or_else(|e| panic!("{e}; channels: {:?}", receiver.error()));
    receiver.finish();
    assert_eq!(memory(&dst), memory(&src), "seed {seed}");
    let (s, d) = (src.stats.snapshot(), dst.stats.snapshot());
    assert_eq!((s.normal, s.duplicate), (d.normal, d.duplicate));
}

#[test]
fn multifd_live_round_trips_reproduce_memory() {
    for seed in 1..=4 {
        multifd_round_trip(seed, 1 + seed as usize % 3, false, seed % 2 == 0);
    }
}

#[test]
fn multifd_with_zstd_live_round_trips_reproduce_memory() {
    for seed in 5..=7 {
        multifd_round_trip(seed, 2, true, seed % 2 == 0);
    }
}

#[test]
fn randomized_live_round_trips_reproduce_memory() {
    for seed in 1..=12 {
        live_round_trip(seed * 0x9e37_79b9, false);
    }
}

/// With manual protect the guest's writes land on unprotected pages (not reported) and
/// re-protected ones (reported once) alike; the destination must still match.
#[test]
fn with_manual_protect_live_round_trips_reproduce_memory() {
    for seed in 1..=12 {
        live_round_trip_with(seed * 0x2545_f491, false, true);
    }
}

/// Re-arming is what makes manual protect converge: once every page was sent, a sync
/// without guest writes finds nothing, and one write makes one page.
#[test]
fn with_manual_protect_sent_pages_are_reported_again_only_when_written() {
    let shape = [("pc.ram", 200)];
    let mut src = vm_with(&shape, true);
    let mut rng = Rng(7);
    for p in 0..200 {
        guest_write(&src, &mut rng, 0, p);
    }
    let mut f = QemuFile::new(Box::new(MemBuffer::new()));
    src.savevm.save_header(&mut f);
    src.savevm.save_setup(&mut f).unwrap();
    assert_eq!(src.savevm.pending_exact().unwrap(), 200 * PAGE as u64);
    while src.savevm.pending_estimate() > 0 {
        src.savevm.save_iterate(&mut f).unwrap();
    }
    assert_eq!(src.savevm.pending_exact().unwrap(), 0);
    guest_write(&src, &mut rng, 0, 150);
    guest_write(&src, &mut rng, 0, 3);
    assert_eq!(src.savevm.pending_exact().unwrap(), 2 * PAGE as u64);
    src.savevm.save_cleanup();
}

/// A page never populated when the sender looked it up (ahead of its cursor), written
/// before the cursor reached it, with a sync in between: the sync's report of the write
/// falls on a bit still set from the first pass, so the page goes once, and must go with
/// its content, not as the zero page the earlier look said it was.
#[test]
fn a_page_written_after_the_sender_looked_ahead_arrives_with_its_content() {
    let shape = [("pc.ram", 64)];
    let mut src = vm(&shape);
    let mut rng = Rng(11);
    guest_write(&src, &mut rng, 0, 0);
    let buf = MemBuffer::new();
    let mut f = buf.file();
    f.set_chunk_budget(1);
    src.savevm.save_header(&mut f);
    src.savevm.save_setup(&mut f).unwrap();
    f.flush().unwrap();
    // One page per iteration: page 0 goes, and the sender has looked at pages ahead.
    src.savevm.save_iterate(&mut f).unwrap();
    f.flush().unwrap();
    let block = &src.list.blocks()[0];
    block.write_bytes(10 * PAGE as u64, &[0x5a; PAGE]);
    src.logs[0].mark(10);
    src.savevm.pending_exact().unwrap();
    while src.savevm.pending_estimate() > 0 {
        src.savevm.save_iterate(&mut f).unwrap();
        f.flush().unwrap();
    }
    src.savevm.pending_exact().unwrap();
    src.savevm.save_complete(&mut f).unwrap();
    src.savevm.save_devices(&mut f).unwrap();
    f.finish().unwrap();
    src.savevm.save_cleanup();
    let mut dst = vm(&shape);
    dst.savevm
        .load(&mut QemuFile::from_bytes(buf.contents()))
        .unwrap();
    let (got, want) = (memory(&dst), memory(&src));
    assert_eq!(got[0][10 * PAGE..11 * PAGE], want[0][10 * PAGE..11 * PAGE]);
    assert!(got == want, "another page differs");
}

#[test]
fn a_fresh_destination_skips_zero_pages_it_never_wrote_and_still_matches() {
    for seed in 1..=6 {
        live_round_trip(seed * 0x5851_f42d, true);
    }
}

/// A snapshot stream of `shape` with a few written pages.
fn snapshot(shape: &[(&str, usize)]) -> Vec<u8> {
    let mut src = vm(shape);
    let blocks = src.list.blocks();
    blocks[0].write_bytes(PAGE as u64, &[0xaa; PAGE]);
    let buf = MemBuffer::new();
    src.savevm.save_snapshot(&mut buf.file()).unwrap();
    buf.contents()
}

fn load_err(shape: &[(&str, usize)], bytes: Vec<u8>) -> Error {
    let mut dst = vm(shape);
    let e = dst
        .savevm
        .load(&mut QemuFile::from_bytes(bytes))
        .unwrap_err();
    match e {
        savevm::Error::Section { idstr, source, .. } => {
            assert_eq!(idstr, "ram");
            *source.downcast::<Error>().unwrap()
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_size_mismatch_is_refused_before_any_page_is_written() {
    let bytes = snapshot(&[("pc.ram", 8)]);
    let mut dst = vm(&[("pc.ram", 16)]);
    let e = savevm::error_chain(
        &dst.savevm
            .load(&mut QemuFile::from_bytes(bytes))
            .unwrap_err(),
    );
    assert!(
        e.contains("destination RAM block \"pc.ram\" is 65536 bytes") && e.contains("32768"),
        "{e}"
    );
    assert!(
        memory(&dst)[0].iter().all(|b| *b == 0),
        "nothing was written"
    );
}

#[test]
fn an_unknown_or_missing_block_is_refused() {
    let bytes = snapshot(&[("pc.ram", 8)]);
    assert!(
        matches!(load_err(&[("ram0", 8)], bytes.clone()), Error::UnknownBlock { idstr } if idstr == "pc.ram")
    );
    assert!(matches!(
        load_err(&[("pc.ram", 8), ("rom", 1)], bytes),
        Error::BadBlockList { reason } if reason.contains("rom")
    ));
}

/// Offset of the PAGE record of page 1, which continues the zero page 0's block.
fn first_page_record(bytes: &[u8]) -> usize {
    bytes
        .windows(8)
        .position(|w| w == [0, 0, 0, 0, 0, 0, 0x10, 0x28])
        .unwrap()
}

#[test]
fn a_page_past_the_end_of_its_block_is_refused() {
    let mut bytes = snapshot(&[("pc.ram", 8)]);
    let at = first_page_record(&bytes);
    bytes[at + 6] = 0x80; // offset 0x8000: one past the last page
    assert!(
        matches!(load_err(&[("pc.ram", 8)], bytes), Error::BadPage { reason, .. } if reason.contains("past the end"))
    );
}

#[test]
fn an_offset_at_the_top_of_the_address_space_is_refused() {
    let mut bytes = snapshot(&[("pc.ram", 8)]);
    let at = first_page_record(&bytes);
    bytes[at..at + 6].copy_from_slice(&[0xff; 6]);
    bytes[at + 6] = 0xf0;
    assert!(
        matches!(load_err(&[("pc.ram", 8)], bytes), Error::BadPage { reason, .. } if reason.contains("past the end"))
    );
}

#[test]
fn a_zero_page_with_a_nonzero_fill_byte_is_refused() {
    let mut bytes = snapshot(&[("pc.ram", 8)]);
    // The END payload's first record is the zero page 0 (ZERO, "pc.ram", fill).
    let at = bytes
        .windows(9)
        .position(|w| w == [0, 0, 0, 0, 0, 0, 0, 0x02, 6])
        .unwrap();
    bytes[at + 15] = 1;
    assert!(
        matches!(load_err(&[("pc.ram", 8)], bytes), Error::BadPage { reason, .. } if reason.contains("fill byte"))
    );
}

#[test]
fn unknown_flags_are_refused() {
    let bytes = snapshot(&[("pc.ram", 8)]);
    let at = first_page_record(&bytes);
    // PAGE | CONTINUE | XBZRLE; no kind at all; ZERO | PAGE; EOS | CONTINUE: each is one
    // record QEMU refuses ("Unknown combination of migration flags"), never skipped.
    for flags in [0x68u8, 0x00, 0x2a, 0x30] {
        let mut b = bytes.clone();
        b[at + 7] = flags;
        let e = load_err(&[("pc.ram", 8)], b);
        assert!(
            matches!(e, Error::UnknownFlags { flags: f, .. } if f & 0xff == u64::from(flags)),
            "{flags:#x}: {e}"
        );
        assert!(e.to_string().contains("Unknown combination"), "{e}");
    }
}

#[test]
fn every_truncation_is_refused() {
    let bytes = snapshot(&[("pc.ram", 4), ("rom", 2)]);
    let eof = bytes.iter().rposition(|b| *b == 0x06).unwrap() - 1;
    for cut in 0..eof {
        let mut dst = vm(&[("pc.ram", 4), ("rom", 2)]);
        let r = dst
            .savevm
            .load(&mut QemuFile::from_bytes(bytes[..cut].to_vec()));
        assert!(r.is_err(), "cut at {cut}");
    }
}

#[test]
fn random_corruption_never_panics() {
    let bytes = snapshot(&[("pc.ram", 4), ("rom", 2)]);
    let mut rng = Rng(77);
    for _ in 0..2000 {
        let mut b = bytes.clone();
        let i = (rng.next() as usize) % b.len();
        b[i] = rng.next() as u8;
        let mut dst = vm(&[("pc.ram", 4), ("rom", 2)]);
        let _ = dst.savevm.load(&mut QemuFile::from_bytes(b));
    }
}

#[test]
fn a_block_list_change_during_migration_fails_it() {
    let mut src = vm(&[("pc.ram", 8)]);
    let mut f = QemuFile::new(Box::new(MemBuffer::new()));
    src.savevm.save_header(&mut f);
    src.savevm.save_setup(&mut f).unwrap();
    src.list.resize("pc.ram", 4 * PAGE as u64).unwrap();
    let e = savevm::error_chain(&src.savevm.save_iterate(&mut f).unwrap_err());
    assert!(e.contains("RAM block list changed"), "{e}");
    src.savevm.save_cleanup();
}

#[test]
fn consecutive_pages_of_one_block_use_continue() {
    let bytes = snapshot(&[("pc.ram", 4)]);
    let names = bytes.windows(7).filter(|w| *w == b"\x06pc.ram").count();
    // Once in the block list, once for the first page record; every other record continues.
    assert_eq!(names, 2);
}

/// The RAM records of one PART section in `bytes`: (block, page) in stream order.
fn part_pages(bytes: &[u8]) -> Vec<(String, u64)> {
    let mut f = QemuFile::from_bytes(bytes.to_vec());
    assert_eq!(f.get_u8().unwrap(), 0x02, "a PART section");
    f.get_be32().unwrap();
    let (mut out, mut block) = (Vec::new(), String::new());
    loop {
        let word = f.get_be64().unwrap();
        let (offset, flags) = (word & !0xfff, word & 0xfff);
        if flags & 0x10 != 0 {
            return out;
        }
        if flags & 0x20 == 0 {
            block = f.get_counted_string("block").unwrap();
        }
        if flags & 0x02 != 0 {
            f.get_u8().unwrap();
        } else {
            f.skip(PAGE as u64).unwrap();
        }
        out.push((block.clone(), offset / PAGE as u64));
    }
}

/// Post-copy's requested pages go before the background pass, each once.
#[test]
fn requested_pages_are_sent_first_and_once() {
    let requests = Arc::new(ram_list::PageRequests::new());
    let r = requests.clone();
    let mut src = vm_custom(&SHAPE, false, |l, s| {
        RamSection::new(l, s).with_page_requests(r)
    });
    let mut rng = Rng(3);
    for (b, (_, pages)) in SHAPE.iter().enumerate() {
        for p in 0..*pages {
            guest_write(&src, &mut rng, b, p);
        }
    }
    let buf = MemBuffer::new();
    let mut f = buf.file();
    src.savevm.save_header(&mut f);
    src.savevm.save_setup(&mut f).unwrap();
    f.flush().unwrap();
    let setup_len = buf.contents().len();
    requests
        .push(Some("vga.vram"), 5 * PAGE as u64, PAGE as u64)
        .unwrap();
    requests
        .push(Some("pc.ram"), 200 * PAGE as u64, 2 * PAGE as u64)
        .unwrap();
    // A budget of about four pages.
    f.set_chunk_budget(4 * PAGE);
    src.savevm.save_iterate(&mut f).unwrap();
    f.flush().unwrap();
    let first = part_pages(&buf.contents()[setup_len..]);
    // The chunk ends with the last requested page: it goes out at once.
    assert_eq!(
        first,
        [
            ("vga.vram".to_string(), 5),
            ("pc.ram".to_string(), 200),
            ("pc.ram".to_string(), 201)
        ],
        "{first:?}"
    );
    let before = buf.contents().len();
    src.savevm.save_iterate(&mut f).unwrap();
    f.flush().unwrap();
    let next = part_pages(&buf.contents()[before..]);
    // (Its first record continues pc.ram, so it carries no name.)
    assert_eq!(next[0].1, 202, "the pass goes on from there: {next:?}");
    // Asked again once sent: not sent again.
    requests
        .push(Some("pc.ram"), 200 * PAGE as u64, PAGE as u64)
        .unwrap();
    let before = buf.contents().len();
    src.savevm.save_iterate(&mut f).unwrap();
    f.flush().unwrap();
    let second = part_pages(&buf.contents()[before..]);
    assert!(!second.contains(&("pc.ram".to_string(), 200)), "{second:?}");
    // A request past a block's end fails the migration, naming it.
    requests
        .push(Some("vga.vram"), 70 * PAGE as u64, PAGE as u64)
        .unwrap();
    let e = src.savevm.save_iterate(&mut f).unwrap_err();
    assert!(savevm::error_chain(&e).contains("past the end"), "{e}");
    src.savevm.save_cleanup();
}
