//! Migration streams into a destination, and `vmm analyze` of a stream file.
//!
//! The destination is shaped like a vmm's, small so the fuzzer reaches real offsets: two
//! RAM blocks, a disk whose last chunk is partial, and the vmm's device sections (the
//! `"cpu"` state and the KVM devices' raw structures) parsed by the vmm's own code.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use block_migration::{BlockMigration, BlockWalker, Disk, DiskOptions};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use qemu_file::{MemBuffer, QemuFile};
use ram_list::{RamBlock, RamList, RamSection, RamWalker};
use savevm::{
    DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo, error_chain,
};
use vm_memory::MmapRegion;
use vmm::cpu_state::{VcpuState, read_struct};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::MAX_ERROR_LEN;
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
        let mut dev = |name: &str, id: u32, h: Box<dyn DeviceHandler>| {
            vm.register_device(SectionInfo::new(name, id, 1), h)
                .expect("register device");
        };
        dev("kvm-pic", 0, Box::new(Raw::<kvm_irqchip>::new("irqchip")));
        dev("kvm-pic", 1, Box::new(Raw::<kvm_irqchip>::new("irqchip")));
        dev(
            "kvm-ioapic",
            0,
            Box::new(Raw::<kvm_irqchip>::new("irqchip")),
        );
        dev("kvm-pit", 0, Box::new(Raw::<kvm_pit_state2>::new("pit")));
        dev("kvmclock", 0, Box::new(Clock));
        dev("cpu", 0, Box::new(Cpu));
    }
    vm
}

/// A KVM structure carried as its raw bytes (the vmm's irqchip and PIT sections).
struct Raw<T> {
    field: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<T> Raw<T> {
    fn new(field: &'static str) -> Self {
        Raw {
            field,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: FromBytes + IntoBytes + Immutable + Default + Send> DeviceHandler for Raw<T> {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.buffer(self.field, T::default().as_bytes());
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, _version: u32) -> Result<(), SectionError> {
        read_struct::<T>(r, self.field)?;
        Ok(())
    }
}

/// The vmm's `"kvmclock"` fields.
struct Clock;

impl DeviceHandler for Clock {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.u64("clock", 123_456_789);
        w.u32("flags", 0);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, _version: u32) -> Result<(), SectionError> {
        r.u64("clock")?;
        r.u32("flags")?;
        Ok(())
    }
}

/// The vmm's `"cpu"` section, parsed by the vmm's [`VcpuState::read_fields`].
struct Cpu;

impl DeviceHandler for Cpu {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let st = VcpuState {
            regs: kvm_regs {
                rip: 0x40_0000,
                rflags: 2,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            xsave: Some(Box::new(kvm_xsave::default())),
            xcrs: Some(kvm_xcrs::default()),
            msrs: vec![(0x10, 77), (0xc000_0080, 0x500)],
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
        };
        st.write_fields(w);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, _version: u32) -> Result<(), SectionError> {
        VcpuState::read_fields(r)?;
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
        let msg = error_chain(&e);
        assert!(
            msg.len() <= MAX_ERROR_LEN,
            "an error of {} bytes: {msg:.2000}",
            msg.len()
        );
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
            let msg = error_chain(&e);
            assert!(
                msg.len() <= MAX_ERROR_LEN,
                "an error of {} bytes",
                msg.len()
            );
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
