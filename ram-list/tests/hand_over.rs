//! `x-ignore-shared`: memfd RAM handed over with the stream over a unix socket, and the
//! ways it is refused.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use qemu_file::{MemBuffer, QemuFile, UnixTransport};
use ram_list::{MemfdMemory, RamBlock, RamList, RamSection, RamStats};
use savevm::SaveVm;
use vm_memory::MmapRegion;

const SIZE: usize = 64 << 20;

struct Side {
    vm: SaveVm,
    block: Arc<RamBlock>,
    memfd: Option<Arc<MemfdMemory>>,
}

/// A VM with one 64 MiB block "pc.ram", in a memfd (`shared`) or private memory.
fn side(shared: bool, ignore_shared: bool) -> Side {
    let list = Arc::new(RamList::new());
    let (block, memfd) = if shared {
        let m = Arc::new(MemfdMemory::new("pc.ram", SIZE).unwrap());
        let b = RamBlock::new("pc.ram", m.clone(), Box::new(()))
            .unwrap()
            .with_shared(m.clone());
        (b, Some(m))
    } else {
        let host = Arc::new(MmapRegion::<()>::new(SIZE).unwrap());
        (RamBlock::new("pc.ram", host, Box::new(())).unwrap(), None)
    };
    let block = list.add(block).unwrap();
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        RamSection::info(),
        Box::new(
            RamSection::new(list, Arc::new(RamStats::default())).with_ignore_shared(ignore_shared),
        ),
    )
    .unwrap();
    Side { vm, block, memfd }
}

fn unix_pair() -> (QemuFile, QemuFile) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        QemuFile::new(Box::new(UnixTransport::new(a, "unix:src".into()))),
        QemuFile::new(Box::new(UnixTransport::new(b, "unix:dst".into()))),
    )
}

/// Saves `src` into one end and loads the other into `dst`; returns the load's result
/// (as text) and the stream's size.
fn migrate(mut src: Side, dst: &mut Side) -> (Result<(), String>, u64, Side) {
    let (mut tx, mut rx) = unix_pair();
    let t = std::thread::spawn(move || {
        let r = src
            .vm
            .save_snapshot(&mut tx)
            .map_err(|e| savevm::error_chain(&e));
        (r, tx.bytes_written(), src)
    });
    let loaded = dst
        .vm
        .load(&mut rx)
        .map(|_| ())
        .map_err(|e| savevm::error_chain(&e));
    let (saved, bytes, src) = t.join().unwrap();
    (saved.and(loaded), bytes, src)
}

#[test]
fn memfd_memory_is_handed_over_not_copied() {
    let src = side(true, true);
    for i in 0..SIZE / 4096 {
        src.block
            .write_bytes((i * 4096) as u64, &(i as u64).to_le_bytes());
    }
    let mut dst = side(true, true);
    let (r, bytes, src) = migrate(src, &mut dst);
    r.unwrap();
    assert!(bytes < 4096, "{bytes} bytes: no page was sent");
    let mut word = [0u8; 8];
    for i in [0usize, 1, SIZE / 4096 / 2, SIZE / 4096 - 1] {
        dst.block.read_bytes((i * 4096) as u64, &mut word);
        assert_eq!(u64::from_le_bytes(word), i as u64, "page {i}");
    }
    // One memory: what either side writes, the other reads.
    src.block.write_bytes(4096 * 7, b"after");
    let mut five = [0u8; 5];
    dst.block.read_bytes(4096 * 7, &mut five);
    assert_eq!(&five, b"after");
    // The ownership lock excludes the two processes' open files (here: one process,
    // two open files, which flock treats alike).
    let (s, d) = (src.memfd.unwrap(), dst.memfd.unwrap());
    s.try_lock().unwrap();
    assert!(
        d.try_lock().is_err(),
        "the destination must wait for the source"
    );
    s.unlock();
    d.try_lock().unwrap();
    // Detached, the destination has memory of its own again, zero.
    d.detach().unwrap();
    dst.block.read_bytes(4096 * 7, &mut five);
    assert_eq!(five, [0; 5]);
}

#[test]
fn without_the_capability_memfd_memory_is_copied() {
    let src = side(true, false);
    src.block.write_bytes(4096 * 3, b"copied");
    let mut dst = side(false, false);
    let (r, bytes, _src) = migrate(src, &mut dst);
    r.unwrap();
    assert!(bytes > 4096, "the page went in the stream");
    let mut six = [0u8; 6];
    dst.block.read_bytes(4096 * 3, &mut six);
    assert_eq!(&six, b"copied");
}

#[test]
fn a_stream_that_cannot_carry_descriptors_is_refused_at_setup() {
    let mut src = side(true, true);
    let buf = MemBuffer::new();
    let e = savevm::error_chain(&src.vm.save_snapshot(&mut buf.file()).unwrap_err());
    assert!(
        e.contains("only a unix: socket without TLS carries") && e.contains("x-ignore-shared off"),
        "{e}"
    );
}

#[test]
fn a_destination_without_the_capability_says_so() {
    let mut dst = side(true, false);
    let (r, _, _) = migrate(side(true, true), &mut dst);
    let e = r.unwrap_err();
    assert!(
        e.contains("this side's x-ignore-shared capability is off"),
        "{e}"
    );
}

#[test]
fn private_memory_on_either_side_is_refused_clearly() {
    // The destination keeps its RAM private: the memory handed over has nowhere to go.
    let mut dst = side(false, true);
    let (r, _, _) = migrate(side(true, true), &mut dst);
    let e = r.unwrap_err();
    assert!(e.contains("keeps private"), "{e}");
    // The source's RAM is private: it sends pages, and passes no memory.
    let mut dst = side(true, true);
    let (r, _, _) = migrate(side(false, true), &mut dst);
    let e = r.unwrap_err();
    assert!(e.contains("passed no descriptor"), "{e}");
}
