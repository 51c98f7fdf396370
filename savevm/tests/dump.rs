//! `dump_stream` on golden streams, as reviewed text snapshots.

mod common;

use std::sync::{Arc, Mutex};

use common::{Uart, UartSection, Words, WordsSection, WordsWalker};
use qemu_file::MemBuffer;
use savevm::{SaveVm, SectionInfo, dump_stream};

/// A deterministic live stream: setup, two iterations with writes between them, completion.
fn golden_stream() -> Vec<u8> {
    let mem = Words::new(8);
    let uart = Arc::new(Mutex::new(Uart {
        lcr: 3,
        divisor: 12,
        enabled: true,
        ticks: 123_456_789,
        fifo: b"hello, world! 0123456789".to_vec(),
    }));
    let mut vm = SaveVm::new("pc-i440fx-7.2");
    vm.register_live(
        SectionInfo::new("words", 0, 2),
        Box::new(WordsSection::new(mem.clone())),
    )
    .unwrap();
    vm.register_device(SectionInfo::new("uart", 0, 1), Box::new(UartSection(uart)))
        .unwrap();
    let buf = MemBuffer::new();
    let mut f = buf.file();
    vm.save_header(&mut f);
    vm.save_setup(&mut f).unwrap();
    f.flush().unwrap();
    // A budget of three records: the first iteration stops part way.
    f.set_chunk_budget(40);
    vm.save_iterate(&mut f).unwrap();
    f.flush().unwrap();
    mem.write(1, 11);
    mem.write(6, 66);
    vm.pending_exact().unwrap();
    f.set_chunk_budget(usize::MAX);
    vm.save_iterate(&mut f).unwrap();
    mem.write(2, 22);
    vm.pending_exact().unwrap();
    vm.save_complete(&mut f).unwrap();
    vm.save_devices(&mut f).unwrap();
    f.finish().unwrap();
    vm.save_cleanup();
    buf.contents()
}

fn dump_bytes(bytes: &[u8], name: &str) -> Result<String, savevm::Error> {
    let path = std::env::temp_dir().join(format!("savevm-dump-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let mut walker = WordsWalker::default();
    let r = dump_stream(&path, &mut [&mut walker]);
    std::fs::remove_file(&path).unwrap();
    r
}

#[test]
fn dump_of_a_live_stream() {
    insta::assert_snapshot!(dump_bytes(&golden_stream(), "live").unwrap());
}

#[test]
fn dump_reports_where_a_stream_breaks() {
    let mut b = golden_stream();
    let at = b.windows(5).position(|w| w == b"\x04uart").unwrap();
    b.truncate(at + 20);
    let e = dump_bytes(&b, "cut").unwrap_err();
    assert!(e.to_string().contains("not described"), "{e}");
}

#[test]
fn dump_without_a_walker_names_the_section() {
    let path = std::env::temp_dir().join(format!("savevm-dump-{}-nowalker", std::process::id()));
    std::fs::write(&path, golden_stream()).unwrap();
    let e = dump_stream(&path, &mut []).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(e.to_string().contains("words"), "{e}");
}

#[test]
fn a_hostile_description_cannot_make_the_dump_loop_forever() {
    let b = golden_stream();
    let at = b.iter().rposition(|x| *x == 0x06).unwrap();
    let hostile = br#"{"page_size":4096,"devices":[{"name":"uart","instance_id":0,"vmsd_name":"uart","version":1,"fields":[{"name":"lcr","type":"uint8","size":0,"array_len":1000000000000000}]}]}"#;
    let mut s = b[..at].to_vec();
    s.push(0x06);
    s.extend_from_slice(&(hostile.len() as u32).to_be_bytes());
    s.extend_from_slice(hostile);
    let e = dump_bytes(&s, "hostile").unwrap_err();
    assert!(e.to_string().contains("corrupt or hostile"), "{e}");
}
