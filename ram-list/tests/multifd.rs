//! A destination's multifd channels against hostile or broken sources: every fault is a
//! clear error from the round's sync, never a panic or a hang.

use std::sync::Arc;

use qemu_file::{MemBuffer, QemuFile, Transport};
use ram_list::multifd::{ChannelInit, MULTIFD_FLAG_SYNC, PacketHeader};
use ram_list::{MultifdReceiver, RamBlock, RamList, RamStats, RecvTarget};
use vm_memory::MmapRegion;

const PAGE: usize = 4096;

fn list() -> Arc<RamList> {
    let list = Arc::new(RamList::new());
    let host = Arc::new(MmapRegion::<()>::new(16 * PAGE).unwrap());
    list.add(RamBlock::new("pc.ram", host, Box::new(())).unwrap())
        .unwrap();
    list
}

/// A channel's bytes, built with the framing's own writers.
fn channel(f: impl FnOnce(&mut QemuFile)) -> Box<dyn Transport> {
    let buf = MemBuffer::new();
    let mut q = buf.file();
    f(&mut q);
    q.flush().unwrap();
    Box::new(MemBuffer::from_bytes(buf.contents()))
}

fn init(id: u8, uuid: [u8; 16]) -> impl Fn(&mut QemuFile) {
    move |q| ChannelInit { uuid, id }.write_to(q)
}

fn pages(q: &mut QemuFile, num: u64, offsets: &[u64], fill: u8) {
    PacketHeader {
        flags: 0,
        next_packet_size: (offsets.len() * PAGE) as u32,
        packet_num: num,
        ramblock: "pc.ram".into(),
        offsets: offsets.to_vec(),
    }
    .write_to(q);
    for _ in offsets {
        q.put_buffer(&[fill; PAGE]);
    }
}

fn sync(q: &mut QemuFile, num: u64) {
    PacketHeader {
        flags: MULTIFD_FLAG_SYNC,
        next_packet_size: 0,
        packet_num: num,
        ramblock: String::new(),
        offsets: vec![],
    }
    .write_to(q);
}

fn receive(list: &Arc<RamList>, channels: Vec<Box<dyn Transport>>) -> ram_list::Result<()> {
    let target = RecvTarget::new(list.clone(), Arc::new(RamStats::default()), [0; 16]);
    let r = MultifdReceiver::start(channels, target, None)?;
    let out = r.sync();
    r.finish();
    out
}

fn chain(e: &ram_list::Error) -> String {
    savevm::error_chain(e)
}

#[test]
fn pages_of_a_round_are_in_memory_when_its_sync_returns() {
    let l = list();
    let c0 = channel(|q| {
        init(0, [0; 16])(q);
        pages(q, 0, &[0x3000, 0x5000], 0xab);
        sync(q, 2);
    });
    let c1 = channel(|q| {
        init(1, [0; 16])(q);
        pages(q, 1, &[0xf000], 0xcd);
        sync(q, 3);
    });
    receive(&l, vec![c1, c0]).unwrap();
    let b = l.find("pc.ram").unwrap();
    let mut page = [0u8; PAGE];
    for (off, fill) in [(0x3000, 0xab), (0x5000, 0xab), (0xf000, 0xcd), (0x4000, 0)] {
        b.read_bytes(off, &mut page);
        assert!(page.iter().all(|&x| x == fill), "{off:#x}");
    }
}

#[test]
fn runs_of_consecutive_pages_land_where_their_offsets_say() {
    let l = list();
    // Runs of 3, 1, 2 and 1 pages (the receiver reads each run as one piece), each
    // page a different fill so a page read into its neighbour's place shows.
    let offsets = [0x1000, 0x2000, 0x3000, 0x6000, 0x9000, 0xa000, 0x4000];
    let c0 = channel(|q| {
        init(0, [0; 16])(q);
        PacketHeader {
            flags: 0,
            next_packet_size: (offsets.len() * PAGE) as u32,
            packet_num: 0,
            ramblock: "pc.ram".into(),
            offsets: offsets.to_vec(),
        }
        .write_to(q);
        for (i, _) in offsets.iter().enumerate() {
            q.put_buffer(&[0x10 + i as u8; PAGE]);
        }
        sync(q, 1);
    });
    receive(&l, vec![c0]).unwrap();
    let b = l.find("pc.ram").unwrap();
    let mut page = [0u8; PAGE];
    for (i, &off) in offsets.iter().enumerate() {
        b.read_bytes(off, &mut page);
        assert!(page.iter().all(|&x| x == 0x10 + i as u8), "{off:#x}");
    }
    for off in [0, 0x5000, 0x7000, 0x8000, 0xb000] {
        b.read_bytes(off, &mut page);
        assert!(page.iter().all(|&x| x == 0), "{off:#x} untouched");
    }
}

#[test]
fn broken_channels_fail_the_round_with_the_reason() {
    type Build = Box<dyn Fn(&mut QemuFile)>;
    let cases: Vec<(Vec<Build>, &str)> = vec![
        (vec![Box::new(init(0, [7; 16]))], "UUID 0707"),
        (
            vec![Box::new(init(0, [0; 16])), Box::new(init(0, [0; 16]))],
            "channel 0 opened twice",
        ),
        (vec![Box::new(init(2, [0; 16]))], "channel 2, but only 1"),
        (
            vec![Box::new(|q: &mut QemuFile| q.put_be32(0x5145_564d))],
            "magic",
        ),
        (
            vec![Box::new(|q: &mut QemuFile| {
                init(0, [0; 16])(q);
                pages(q, 0, &[0x10000], 1);
                sync(q, 1);
            })],
            "past the end of block",
        ),
        (
            vec![Box::new(|q: &mut QemuFile| {
                init(0, [0; 16])(q);
                PacketHeader {
                    flags: 0,
                    next_packet_size: PAGE as u32,
                    packet_num: 0,
                    ramblock: "rom".into(),
                    offsets: vec![0],
                }
                .write_to(q);
            })],
            "no RAM block named \"rom\"",
        ),
        (
            vec![Box::new(|q: &mut QemuFile| {
                init(0, [0; 16])(q);
                PacketHeader {
                    flags: 0,
                    next_packet_size: 5,
                    packet_num: 0,
                    ramblock: "pc.ram".into(),
                    offsets: vec![0],
                }
                .write_to(q);
            })],
            "5 bytes of data for 1 uncompressed pages",
        ),
        (
            vec![Box::new(|q: &mut QemuFile| {
                init(0, [0; 16])(q);
                pages(q, 0, &[0x1000], 1);
            })],
            "channels before the end of the stream's round",
        ),
        (
            vec![Box::new(|q: &mut QemuFile| {
                init(0, [0; 16])(q);
                pages(q, 0, &[0x1000, 0x2000], 1);
                q.put_buffer(&[0; 1400]);
            })],
            "channel 0: multifd channel data at byte 9600: magic 0x00000000",
        ),
    ];
    for (builds, needle) in cases {
        let n = builds.len();
        let channels = builds.iter().map(|b| channel(|q| b(q))).collect();
        let e = receive(&list(), channels).unwrap_err();
        let text = chain(&e);
        assert!(text.contains(needle), "{needle} ({n} channels): {text}");
        assert!(text.len() < 300, "{text}");
    }
}

#[test]
fn truncated_channels_never_hang_or_panic() {
    let full = {
        let buf = MemBuffer::new();
        let mut q = buf.file();
        init(0, [0; 16])(&mut q);
        pages(&mut q, 0, &[0x1000, 0x2000], 9);
        sync(&mut q, 1);
        q.flush().unwrap();
        buf.contents()
    };
    for cut in (0..full.len()).step_by(97) {
        let c: Box<dyn Transport> = Box::new(MemBuffer::from_bytes(full[..cut].to_vec()));
        assert!(receive(&list(), vec![c]).is_err(), "cut at {cut}");
    }
    let c: Box<dyn Transport> = Box::new(MemBuffer::from_bytes(full));
    receive(&list(), vec![c]).unwrap();
}
