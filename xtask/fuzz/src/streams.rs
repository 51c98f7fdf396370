//! Migration streams into a destination, and `vmm analyze` of a stream file.
//!
//! The destination is shaped like a vmm's, small so the fuzzer reaches real offsets: two
//! RAM blocks, a disk whose last chunk is partial, and the vmm's device sections (the
//! `"cpu"` state and the KVM devices' structures) parsed by savevm-kvm's code, which the
//! vmm uses.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use block_migration::{BlockMigration, BlockWalker, Disk, DiskOptions};
use kvm_bindings::{kvm_irqchip, kvm_regs, kvm_xcrs};
use qemu_file::{MemBuffer, QemuFile};
use ram_list::{RamBlock, RamList, RamSection, RamWalker};
use savevm::{DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo};
use savevm_kvm::{Clock, CpuFields, IRQCHIPS, Irqchip, Pit, Raw, VcpuState};
use vm_memory::MmapRegion;

use crate::bounded::check_error;
use crate::memfd::MemFile;

/// The RAM blocks: name and size.
const RAM: &[(&str, usize)] = &[("pc.ram", 256 << 10), ("vga.vram", 64 << 10)];
/// The disk's name and size: a full 1 MiB chunk and a partial one (seeds stay small).
const DISK: (&str, u64) = ("disk0", (1 << 20) + 8192);

/// RAM and a disk, as a destination (or a source) holds them.
struct Memory {
    ram: Arc<RamList>,
    disk: Arc<Disk>,
    _image: MemFile,
}

impl Memory {
    fn new() -> Self {
        let ram = Arc::new(RamList::new());
        for (name, size) in RAM {
            let host = Arc::new(MmapRegion::<()>::new(*size).expect("mmap"));
            ram.add(RamBlock::new(*name, host, Box::new(())).expect("block"))
                .expect("add");
        }
        let image = MemFile::new("fuzz-disk");
        image.file.set_len(DISK.1).expect("size the disk");
        let disk = Arc::new(
            Disk::open(&image.path(), DISK.0, &DiskOptions::default()).expect("open the disk"),
        );
        Memory {
            ram,
            disk,
            _image: image,
        }
    }

    /// The destination, made once per process: loads overwrite it.
    fn destination() -> &'static Memory {
        static DEST: OnceLock<Memory> = OnceLock::new();
        DEST.get_or_init(Memory::new)
    }
}

/// Which sections a VM registers.
#[derive(Clone, Copy)]
struct Sections {
    ram: bool,
    block: bool,
    devices: bool,
}

const ALL: Sections = Sections {
    ram: true,
    block: true,
    devices: true,
};

fn vm(m: &Memory, s: Sections) -> SaveVm {
    let mut vm = SaveVm::new("pc");
    if s.ram {
        let mut section = RamSection::new(m.ram.clone(), Arc::default());
        if s.devices {
            // The whole-VM target loads the way a fresh vmm destination does.
            section = section.with_fresh_memory();
        }
        vm.register_live(RamSection::info(), Box::new(section))
            .expect("register ram");
    }
    if s.block {
        vm.register_live(
            BlockMigration::info(),
            Box::new(BlockMigration::new(vec![m.disk.clone()], Arc::default())),
        )
        .expect("register block");
    }
    if s.devices {
        for (name, instance, chip) in IRQCHIPS {
            let c = Irqchip {
                irqchip: Raw(kvm_irqchip {
                    chip_id: chip,
                    ..Default::default()
                }),
            };
            vm.register_device(
                SectionInfo::for_state::<Irqchip>(name, instance),
                Box::new(Arc::new(Mutex::new(c))),
            )
            .expect("register irqchip");
        }
        vm.register_device(
            SectionInfo::for_state::<Pit>("kvm-pit", 0),
            Box::new(Arc::new(Mutex::new(Pit::default()))),
        )
        .expect("register pit");
        let clock = Clock {
            clock: 123_456_789,
            flags: 0,
        };
        vm.register_device(
            SectionInfo::for_state::<Clock>("kvmclock", 0),
            Box::new(Arc::new(Mutex::new(clock))),
        )
        .expect("register clock");
        vm.register_device(SectionInfo::for_state::<CpuFields>("cpu", 0), Box::new(Cpu))
            .expect("register cpu");
    }
    vm
}

/// The vmm's `"cpu"` section, parsed by savevm-kvm's [`VcpuState::read_fields`].
struct Cpu;

impl DeviceHandler for Cpu {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let st = VcpuState {
            regs: kvm_regs {
                rip: 0x40_0000,
                rflags: 2,
                ..Default::default()
            },
            xsave: Some(Box::default()),
            xcrs: Some(kvm_xcrs::default()),
            msrs: vec![(0x10, 77), (0xc000_0080, 0x500)],
            ..VcpuState::default()
        };
        st.write_fields(w);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        VcpuState::read_fields(r, version)?;
        Ok(())
    }
}

fn try_load(data: &[u8], s: Sections) -> savevm::Result<savevm::LoadReport> {
    load_from(&mut QemuFile::from_bytes(data), s)
}

/// A load of whatever `f` carries into the destination with every section.
pub(crate) fn load_all_from(f: &mut QemuFile) -> savevm::Result<savevm::LoadReport> {
    load_from(f, ALL)
}

/// A load of the stream in memory into the destination with every section.
pub(crate) fn load_all(data: &[u8]) -> savevm::Result<savevm::LoadReport> {
    try_load(data, ALL)
}

fn load_from(f: &mut QemuFile, s: Sections) -> savevm::Result<savevm::LoadReport> {
    let mut vm = vm(Memory::destination(), s);
    vm.load(f)
}

fn load(data: &[u8], s: Sections) {
    if let Err(e) = try_load(data, s) {
        check_error(&e);
    }
}

/// Target `stream`.
pub fn full(data: &[u8]) {
    load(data, ALL);
}

/// Target `ram`.
pub fn ram(data: &[u8]) {
    load(
        data,
        Sections {
            ram: true,
            block: false,
            devices: false,
        },
    );
}

/// Target `block`.
pub fn block(data: &[u8]) {
    load(
        data,
        Sections {
            ram: false,
            block: true,
            devices: false,
        },
    );
}

/// Target `analyze`: the stream as a file, dumped with the RAM and block walkers.
pub fn analyze(data: &[u8]) {
    thread_local! {
        static FILE: MemFile = MemFile::new("fuzz-analyze");
    }
    FILE.with(|m| {
        m.file.set_len(0).expect("truncate");
        (&m.file).write_all(data).expect("write");
        let (mut ram, mut block) = (RamWalker::default(), BlockWalker::default());
        if let Err(e) = savevm::dump_stream(&m.path(), &mut [&mut ram, &mut block]) {
            check_error(&e);
        }
    });
}

/// Streams of a source shaped like the destination: a snapshot with data in RAM and on
/// the disk, one of an untouched VM, and a live migration (setup, iterations, completion).
fn seeds(s: Sections) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for variant in 0..3 {
        let m = Memory::new();
        if variant != 1 {
            for (i, b) in m.ram.blocks().iter().enumerate() {
                b.write_bytes(4096 * (3 + i as u64), b"guest data");
                b.write_bytes(4096 * 7 + 100, &[0x5a; 3000]);
            }
            m.disk
                .write_at(b"disk data", (1 << 20) + 5 * 512)
                .expect("disk write");
            m.disk
                .write_at(&[0xa5; 4096], DISK.1 - 4096)
                .expect("disk write");
        }
        let mut vm = vm(&m, s);
        let buf = MemBuffer::new();
        let mut f = buf.file();
        let r = if variant == 2 {
            live(&mut vm, &m, &mut f)
        } else {
            vm.save_snapshot(&mut f)
        };
        r.expect("a seed stream");
        out.push(buf.contents());
    }
    // The first stream without its configuration section (refused, as QEMU refuses it).
    if let Some(first) = out.first().cloned() {
        let len = first
            .get(9..13)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let mut cut = first;
        if cut.len() > 13 + len {
            cut.drain(8..13 + len);
            out.push(cut);
        }
    }
    out
}

/// A live migration's stream: guest writes between iterations.
fn live(vm: &mut SaveVm, m: &Memory, f: &mut QemuFile) -> savevm::Result<()> {
    let r = (|| {
        vm.save_header(f);
        vm.save_setup(f)?;
        for round in 0..3u8 {
            vm.prepare_iterate(64 << 10)?;
            vm.save_iterate(f)?;
            if let Some(b) = m.ram.blocks().first() {
                b.write_bytes(4096 * 9, &[round + 1; 64]);
            }
        }
        vm.pending_exact()?;
        vm.save_complete(f)?;
        vm.save_devices(f)?;
        Ok(f.finish()?)
    })();
    vm.save_cleanup();
    r
}

/// Seeds of `stream` and `analyze`.
pub fn full_seeds() -> Vec<Vec<u8>> {
    seeds(ALL)
}

/// Seeds of `ram`.
pub fn ram_seeds() -> Vec<Vec<u8>> {
    seeds(Sections {
        ram: true,
        block: false,
        devices: false,
    })
}

/// Seeds of `block`.
pub fn block_seeds() -> Vec<Vec<u8>> {
    seeds(Sections {
        ram: false,
        block: true,
        devices: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_load_whole_and_fill_ram_and_disk() {
        let seeds = full_seeds();
        let (refused, whole) = seeds.split_last().expect("seeds");
        for seed in whole {
            let report = try_load(seed, ALL).expect("a seed loads");
            assert!(report.records > 0);
        }
        assert!(matches!(
            try_load(refused, ALL),
            Err(savevm::Error::ConfigurationMissing { .. })
        ));
        let d = Memory::destination();
        let mut back = [0u8; 9];
        d.disk.read_at(&mut back, (1 << 20) + 5 * 512).unwrap();
        assert_eq!(&back, b"disk data");
        let mut back = [0u8; 10];
        d.ram.blocks()[1].read_bytes(4096 * 4, &mut back);
        assert_eq!(&back, b"guest data");
    }
}
