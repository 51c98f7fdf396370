//! Snapshot and restore of a VM as another VMM would have it: a rust-vmm `GuestMemoryMmap`
//! of two regions (below and above the 4 GiB hole) and a device of its own. The file is
//! QEMU's stream format, which QEMU's `scripts/analyze-migration.py` reads.
//!
//! ```text
//! cargo run -p ram-list --example snapshot
//! ```

use std::sync::{Arc, Mutex};

use qemu_file::{MigrationUri, QemuFile, connect};
use ram_list::{RamList, RamSection, RamStats};
use savevm::{SaveVm, SectionInfo, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The VMM's own device, its state declared once: written, read and described (QEMU's
/// analyzer names `ticks`, `armed` and each of `history`) from this declaration.
#[derive(Debug, Default, Clone, PartialEq, VmState)]
#[vmstate(name = "timer")]
struct Timer {
    ticks: u64,
    armed: bool,
    history: Vec<u32>,
}

/// A VM: its memory, its device, and the sections that save and load them.
fn vm() -> (GuestMemoryMmap, Arc<Mutex<Timer>>, SaveVm) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 64 << 20),
        (GuestAddress(4 << 30), 16 << 20),
    ])
    .expect("mapping guest memory");
    // One RAM block per region ("ram0", "ram1"); a stopped VM needs no dirty log.
    let list = RamList::from_guest_memory(&mem, |_, _| Box::new(())).expect("RAM blocks");
    let timer = Arc::new(Mutex::new(Timer::default()));
    let mut savevm = SaveVm::new("example-vmm");
    savevm
        .register_live(
            RamSection::info(),
            Box::new(RamSection::new(
                Arc::new(list),
                Arc::new(RamStats::default()),
            )),
        )
        .expect("one RAM section");
    savevm
        // A device behind a mutex is a section as it is.
        .register_device(
            SectionInfo::for_state::<Timer>("timer", 0),
            Box::new(timer.clone()),
        )
        .expect("one timer");
    (mem, timer, savevm)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("snapshot-example-{}", std::process::id()));

    let (mem, timer, mut savevm) = vm();
    mem.write_slice(b"below the hole", GuestAddress(0x10_0000))?;
    mem.write_slice(b"above the hole", GuestAddress((4 << 30) + 0x2000))?;
    *timer.lock().unwrap() = Timer {
        ticks: 42,
        armed: true,
        history: vec![7, 11, 13],
    };
    savevm.save_snapshot(&mut QemuFile::new(connect(&MigrationUri::File(
        path.clone(),
    ))?))?;
    println!(
        "saved {} bytes to {}",
        std::fs::metadata(&path)?.len(),
        path.display()
    );

    let (mem2, timer2, mut restored) = vm();
    let report = restored.load(&mut QemuFile::from_bytes(std::fs::read(&path)?))?;
    std::fs::remove_file(&path)?;
    let mut below = [0u8; 14];
    let mut above = [0u8; 14];
    mem2.read_slice(&mut below, GuestAddress(0x10_0000))?;
    mem2.read_slice(&mut above, GuestAddress((4 << 30) + 0x2000))?;
    assert_eq!(&below, b"below the hole");
    assert_eq!(&above, b"above the hole");
    assert_eq!(
        *timer2.lock().unwrap(),
        Timer {
            ticks: 42,
            armed: true,
            history: vec![7, 11, 13],
        }
    );
    println!(
        "restored {} bytes: memory and timer as saved ({:?})",
        report.bytes,
        timer2.lock().unwrap()
    );
    Ok(())
}
