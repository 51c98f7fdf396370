//! Dumps of golden RAM streams, as reviewed snapshots.

use std::sync::Arc;

use qemu_file::MemBuffer;
use ram_list::{RamBlock, RamList, RamSection, RamStats, RamWalker};
use savevm::{
    DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo, dump_stream,
};
use vm_memory::MmapRegion;

struct Cpu;

impl DeviceHandler for Cpu {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.u64("rip", 0x7c00);
        w.u64("rflags", 0x2);
        w.buffer("xsave", &[0; 40]);
        Ok(())
    }
    fn load(&mut self, _r: &mut FieldReader<'_>, _v: u32) -> Result<(), SectionError> {
        Ok(())
    }
}

#[test]
fn dump_of_a_ram_and_cpu_snapshot() {
    let list = Arc::new(RamList::new());
    for (name, pages) in [("pc.ram", 16), ("vga.vram", 4)] {
        let host = Arc::new(MmapRegion::<()>::new(pages * 4096).unwrap());
        list.add(RamBlock::new(name, host, Box::new(())).unwrap())
            .unwrap();
    }
    let blocks = list.blocks();
    for p in [1usize, 2, 3, 9] {
        blocks[0].write_bytes(p as u64 * 4096 + 7, &[p as u8]);
    }
    blocks[1].write_bytes(3 * 4096, b"vga");
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        RamSection::info(),
        Box::new(RamSection::new(list, Arc::new(RamStats::default()))),
    )
    .unwrap();
    vm.register_device(SectionInfo::new("cpu", 0, 1), Box::new(Cpu))
        .unwrap();
    let buf = MemBuffer::new();
    vm.save_snapshot(&mut buf.file()).unwrap();
    let path = std::env::temp_dir().join(format!("ram-list-dump-{}", std::process::id()));
    std::fs::write(&path, buf.contents()).unwrap();
    let text = dump_stream(&path, &mut [&mut RamWalker::default()]).unwrap();
    std::fs::remove_file(&path).unwrap();
    insta::assert_snapshot!(text);
}
