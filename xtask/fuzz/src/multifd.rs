//! Target `multifd`: one multifd channel's bytes, read by the destination's receiver into a
//! small RAM block, round after round until the channel ends or fails.

use std::sync::Arc;

use qemu_file::{MemBuffer, Transport};
use ram_list::multifd::MULTIFD_FLAG_ZSTD;
use ram_list::multifd::zstd::ZstdSend;
use ram_list::multifd::{ChannelInit, MULTIFD_FLAG_SYNC, PacketHeader};
use ram_list::{MultifdReceiver, RamBlock, RamList, RamStats, RecvTarget};
use vm_memory::MmapRegion;

use crate::bounded::check_error;

const PAGE: usize = 4096;
const PAGES: usize = 32;

/// Target `multifd`.
pub fn channel(data: &[u8]) {
    let list = Arc::new(RamList::new());
    let host = Arc::new(MmapRegion::<()>::new(PAGES * PAGE).expect("mmap"));
    list.add(RamBlock::new("pc.ram", host, Box::new(())).expect("block"))
        .expect("add");
    let mut target = RecvTarget::new(list, Arc::new(RamStats::default()), [0; 16]);
    target.fresh = true;
    let t: Box<dyn Transport> = Box::new(MemBuffer::from_bytes(data.to_vec()));
    let r = MultifdReceiver::start(vec![t], target, None).expect("start");
    // Each round ends with the channel's SYNC; the input ends (or fails) within a few.
    for _ in 0..64 {
        if let Err(e) = r.sync() {
            check_error(&e);
            break;
        }
    }
    r.finish();
}

/// A channel with a plain packet, a SYNC, a zstd packet and a SYNC.
pub fn seeds() -> Vec<Vec<u8>> {
    let buf = MemBuffer::new();
    let mut f = buf.file();
    ChannelInit {
        uuid: [0; 16],
        id: 0,
    }
    .write_to(&mut f);
    let header = |flags, size, offsets: Vec<u64>| PacketHeader {
        flags,
        next_packet_size: size,
        packet_num: 0,
        ramblock: "pc.ram".into(),
        offsets,
    };
    header(0, 2 * PAGE as u32, vec![0, 5 * PAGE as u64]).write_to(&mut f);
    f.put_buffer(&[0x5a; 2 * PAGE]);
    header(MULTIFD_FLAG_SYNC, 0, vec![]).write_to(&mut f);
    let page = [0xa5u8; PAGE];
    let mut z = ZstdSend::new(1).expect("zstd");
    let packed = z
        .compress([&page[..], &page[..]].into_iter())
        .expect("compress");
    header(
        MULTIFD_FLAG_ZSTD,
        packed.len() as u32,
        vec![PAGE as u64, 31 * PAGE as u64],
    )
    .write_to(&mut f);
    f.put_buffer(packed);
    header(MULTIFD_FLAG_SYNC, 0, vec![]).write_to(&mut f);
    f.flush().expect("flush");
    vec![buf.contents()]
}
