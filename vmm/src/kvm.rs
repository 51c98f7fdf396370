//! The KVM backend: a VM with an in-kernel irqchip and PIT, guest RAM in memory slots 0
//! and 1 (below and above the 4 GiB hole), vCPU threads, and the migration sections of
//! everything KVM holds (their state is savevm-kvm's).

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use dirty_bitmap::{DirtyLogSource, KvmDirtyLog, MergedLog, VmmWriteLog};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use savevm::{DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo};
use vm_memory::GuestMemoryRegion as _;
use vm_memory::bitmap::AtomicBitmap;

use crate::bus::Bus;
use crate::cpus::Cpus;
use crate::guest::LOAD_ADDR;
use crate::memory::{GuestRam, MemoryBackend, RamSlot};
use crate::throttle::Throttle;
use crate::vcpu::Vcpu;
use savevm_kvm::{Clock, CpuFields, IRQCHIPS, Irqchip, Pit, VcpuState, supported_msrs};

/// Where KVM puts the real-mode TSS on Intel (three pages below the BIOS area).
const TSS_ADDR: usize = 0xfffb_d000;

/// An open KVM VM, before its RAM and vCPUs exist.
pub struct KvmVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    /// Whether the dirty log uses manual protect (`KVM_CLEAR_DIRTY_LOG`).
    manual_protect: bool,
}

/// How KVM's dirty log re-protects pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DirtyProtect {
    /// Manual protect where KVM offers it, else classic.
    #[default]
    Auto,
    /// `KVM_CLEAR_DIRTY_LOG` in 64 MiB chunks just before pages are sent; logging starts
    /// with nothing write-protected (refused where KVM lacks it).
    Manual,
    /// Every `KVM_GET_DIRTY_LOG` write-protects all the pages it reports.
    Classic,
}

impl KvmVm {
    /// Opens /dev/kvm and creates a VM with an in-kernel irqchip and PIT.
    ///
    /// # Errors
    /// No /dev/kvm, or a failing ioctl.
    pub fn new(protect: DirtyProtect) -> Result<Self> {
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let supported = KvmDirtyLog::manual_protect_supported(&vm);
        let manual_protect = match protect {
            DirtyProtect::Classic => false,
            DirtyProtect::Auto => supported,
            DirtyProtect::Manual if !supported => anyhow::bail!(
                "--dirty-log-protect manual: this KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with initially-set bitmaps"
            ),
            DirtyProtect::Manual => true,
        };
        if manual_protect {
            KvmDirtyLog::enable_manual_protect(&vm)?;
        }
        vm.set_tss_address(TSS_ADDR).context("KVM_SET_TSS_ADDR")?;
        vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        vm.create_pit2(kvm_pit_config::default())
            .context("KVM_CREATE_PIT2")?;
        Ok(KvmVm {
            kvm,
            vm: Arc::new(vm),
            manual_protect,
        })
    }

    /// Registers the RAM slots as KVM memory slots 0, 1... and returns the block's dirty
    /// log: KVM's log of guest writes in each merged with vm-memory's log of the VMM's
    /// own writes.
    ///
    /// # Errors
    /// KVM refuses the slot.
    pub fn map_ram(&self, slots: &[RamSlot]) -> Result<Box<dyn DirtyLogSource>> {
        let mut logs: Vec<Box<dyn DirtyLogSource>> = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            let mmap: &vm_memory::MmapRegion<AtomicBitmap> = &s.region;
            let slot = kvm_userspace_memory_region {
                slot: i as u32,
                flags: 0,
                guest_phys_addr: s.region.start_addr().0,
                memory_size: mmap.size() as u64,
                userspace_addr: mmap.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes, kept alive by
            // the machine (its `GuestRam`) for as long as the VM exists.
            unsafe { self.vm.set_user_memory_region(slot) }
                .context("KVM_SET_USER_MEMORY_REGION")?;
            let log = KvmDirtyLog::new(self.vm.clone(), slot).at_page(s.first_page);
            let log = if self.manual_protect {
                log.manual_protect()
            } else {
                log
            };
            logs.push(Box::new(log));
            logs.push(Box::new(
                VmmWriteLog::new(s.region.clone()).at_page(s.first_page),
            ));
        }
        Ok(Box::new(MergedLog(logs)))
    }

    /// Creates `count` vCPUs set up to enter a boot sector (real mode, CS=0, IP=0x7c00)
    /// and starts their threads, parked.
    ///
    /// # Errors
    /// A failing ioctl.
    pub fn into_backend(self, count: usize, bus: Arc<Bus>) -> Result<KvmBackend> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let mut vcpus = Vec::new();
        let mut tsc_khz = 0;
        let mut msrs = Arc::new(Vec::new());
        for i in 0..count {
            let fd = self.vm.create_vcpu(i as u64).context("KVM_CREATE_VCPU")?;
            // Passing the supported CPUID lets long mode be used on real hardware too.
            fd.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
            let mut sregs = fd.get_sregs().context("KVM_GET_SREGS")?;
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            fd.set_sregs(&sregs).context("KVM_SET_SREGS")?;
            let mut regs = fd.get_regs().context("KVM_GET_REGS")?;
            regs.rip = LOAD_ADDR;
            regs.rsp = LOAD_ADDR;
            regs.rflags = 2;
            regs.rdx = 0x80; // boot drive, as a BIOS passes it
            fd.set_regs(&regs).context("KVM_SET_REGS")?;
            if i == 0 {
                tsc_khz = fd.get_tsc_khz().unwrap_or(0);
                msrs = Arc::new(supported_msrs(&fd));
            }
            vcpus.push(Vcpu::spawn(i, fd, bus.clone(), msrs.clone())?);
        }
        let naps: Vec<_> = vcpus.iter().map(Vcpu::shared).collect();
        let throttle = Throttle::new(move |d| {
            for v in &naps {
                v.nap(d);
            }
        })
        .context("starting the vCPU throttle thread")?;
        Ok(KvmBackend {
            throttle,
            vm: self.vm,
            vcpus: Arc::new(vcpus),
            tsc_khz,
            pending: Arc::new(Mutex::new(Pending::default())),
        })
    }
}

/// Loaded, not yet applied state (the destination applies it after the whole stream).
#[derive(Default)]
struct Pending {
    chips: Vec<Irqchip>,
    pit: Option<Pit>,
    clock: Option<Clock>,
    cpus: Vec<(usize, VcpuState)>,
}

/// The KVM backend of a running machine.
pub struct KvmBackend {
    /// Declared first: its thread ends before the vCPUs do.
    throttle: Throttle,
    vm: Arc<VmFd>,
    vcpus: Arc<Vec<Vcpu>>,
    tsc_khz: u32,
    // Lock: filled by the loading thread's device sections, drained by `apply_loaded`.
    pending: Arc<Mutex<Pending>>,
}

impl KvmBackend {
    /// The guest TSC frequency (for the guest's pacing).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }
}

impl Cpus for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn thread_ids(&self) -> Vec<i32> {
        self.vcpus.iter().map(|v| v.thread_id()).collect()
    }

    fn resume(&self) {
        for v in self.vcpus.iter() {
            v.resume();
        }
    }

    fn pause(&self) -> Result<()> {
        for v in self.vcpus.iter() {
            v.request_pause();
        }
        for v in self.vcpus.iter() {
            v.wait_parked();
        }
        Ok(())
    }

    fn fault(&self) -> Option<String> {
        self.vcpus.iter().find_map(|v| v.fault())
    }

    fn set_throttle(&self, percent: u8) {
        self.throttle.set(percent);
    }

    fn throttle(&self) -> u8 {
        self.throttle.percent()
    }

    fn register_sections(&self, savevm: &mut SaveVm) -> Result<()> {
        for (name, instance, chip) in IRQCHIPS {
            savevm.register_device(
                SectionInfo::for_state::<Irqchip>(name, instance),
                Box::new(ChipSection {
                    vm: self.vm.clone(),
                    pending: self.pending.clone(),
                    chip,
                }),
            )?;
        }
        savevm.register_device(
            SectionInfo::for_state::<Pit>("kvm-pit", 0),
            Box::new(PitSection {
                vm: self.vm.clone(),
                pending: self.pending.clone(),
            }),
        )?;
        savevm.register_device(
            SectionInfo::for_state::<Clock>("kvmclock", 0),
            Box::new(ClockSection {
                vm: self.vm.clone(),
                pending: self.pending.clone(),
            }),
        )?;
        for i in 0..self.vcpus.len() {
            savevm.register_device(
                SectionInfo::for_state::<CpuFields>("cpu", i as u32),
                Box::new(CpuSection {
                    vcpus: self.vcpus.clone(),
                    index: i,
                    pending: self.pending.clone(),
                }),
            )?;
        }
        Ok(())
    }

    fn apply_loaded(&self) -> Result<()> {
        let p = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(pit) = p.pit {
            pit.restore(&self.vm)?;
        }
        for chip in &p.chips {
            chip.restore(&self.vm)?;
        }
        if let Some(clock) = p.clock {
            clock.restore(&self.vm)?;
        }
        for (i, st) in p.cpus {
            self.vcpus[i].load_state(st)?;
        }
        Ok(())
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|p| p.into_inner())
}

/// `"kvm-pic"` (instances 0, 1) and `"kvm-ioapic"`: the in-kernel interrupt controllers.
struct ChipSection {
    vm: Arc<VmFd>,
    pending: Arc<Mutex<Pending>>,
    chip: u32,
}

impl DeviceHandler for ChipSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.state(&Irqchip::save(&self.vm, self.chip)?);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let mut c = Irqchip::default();
        r.state(&mut c, version)?;
        if c.irqchip.0.chip_id != self.chip {
            return Err(format!(
                "the stream's chip {} is not chip {}",
                c.irqchip.0.chip_id, self.chip
            )
            .into());
        }
        lock(&self.pending).chips.push(c);
        Ok(())
    }
}

/// `"kvm-pit"`: the in-kernel i8254.
struct PitSection {
    vm: Arc<VmFd>,
    pending: Arc<Mutex<Pending>>,
}

impl DeviceHandler for PitSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.state(&Pit::save(&self.vm)?);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let mut p = Pit::default();
        r.state(&mut p, version)?;
        lock(&self.pending).pit = Some(p);
        Ok(())
    }
}

/// `"kvmclock"`: the VM's clock.
struct ClockSection {
    vm: Arc<VmFd>,
    pending: Arc<Mutex<Pending>>,
}

impl DeviceHandler for ClockSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.state(&Clock::save(&self.vm)?);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let mut c = Clock::default();
        r.state(&mut c, version)?;
        lock(&self.pending).clock = Some(c);
        Ok(())
    }
}

/// `"cpu"` instance N: one vCPU's state (saved by its own thread).
struct CpuSection {
    vcpus: Arc<Vec<Vcpu>>,
    index: usize,
    pending: Arc<Mutex<Pending>>,
}

impl DeviceHandler for CpuSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let st = self.vcpus[self.index]
            .save_state()
            .map_err(|e| format!("{e:#}"))?;
        st.write_fields(w);
        Ok(())
    }
    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let st = VcpuState::read_fields(r, version)?;
        lock(&self.pending).cpus.push((self.index, st));
        Ok(())
    }
}

/// The TSC frequency a KVM vCPU runs with here, in kHz.
///
/// # Errors
/// No KVM, or it does not say.
pub fn tsc_khz() -> Result<u32> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    vcpu.get_tsc_khz().context("KVM_GET_TSC_KHZ")
}

/// Checks whether KVM is usable here.
pub fn available() -> bool {
    Kvm::new().is_ok()
}

/// Builds guest RAM for a KVM VM.
///
/// # Errors
/// As [`GuestRam::new`] and [`KvmVm::map_ram`].
pub fn ram(vm: &KvmVm, size: u64, backend: MemoryBackend, prefault: bool) -> Result<GuestRam> {
    GuestRam::new(size, backend, prefault, |slots| vm.map_ram(slots))
}
