//! `VcpuState`: everything KVM holds for one x86 vCPU, read and loaded with the ioctls
//! kvm-ioctls wraps.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result, ioctl};

/// MSRs worth migrating for a guest that runs in long mode without paravirtual
/// features (the ones KVM supports are kept: [`supported_msrs`]).
pub const MSR_CANDIDATES: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x6e0,       // IA32_TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// One vCPU's architectural state.
#[derive(Default)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: kvm_fpu,
    /// Extended state (None where KVM has no XSAVE).
    pub xsave: Option<Box<kvm_xsave>>,
    /// Extended control registers (None where KVM has none).
    pub xcrs: Option<kvm_xcrs>,
    /// Model-specific registers (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// Running, halted, ...
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("cr0", &format_args!("{:#x}", self.sregs.cr0))
            .field("msrs", &self.msrs.len())
            .finish()
    }
}

fn msr_buf(entries: &[(u32, u64)]) -> Result<Msrs> {
    let e: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&e).map_err(|e| Error::MsrList(format!("{e:?}")))
}

/// The MSRs of [`MSR_CANDIDATES`] this vCPU can read.
pub fn supported_msrs(fd: &VcpuFd) -> Vec<u32> {
    MSR_CANDIDATES
        .iter()
        .copied()
        .filter(|&i| {
            msr_buf(&[(i, 0)])
                .ok()
                .and_then(|mut m| fd.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

impl VcpuState {
    /// Reads the state of a stopped vCPU (with no I/O pending), its MSRs `msr_indices`.
    ///
    /// # Errors
    /// A failed ioctl, named.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self> {
        let mut m = msr_buf(&msr_indices.iter().map(|&i| (i, 0)).collect::<Vec<_>>())?;
        let n = ioctl("KVM_GET_MSRS", fd.get_msrs(&mut m))?;
        if n != msr_indices.len() {
            return Err(Error::Msrs {
                verb: "read",
                done: n,
                asked: msr_indices.len(),
            });
        }
        Ok(VcpuState {
            regs: ioctl("KVM_GET_REGS", fd.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", fd.get_sregs())?,
            fpu: ioctl("KVM_GET_FPU", fd.get_fpu())?,
            xsave: fd.get_xsave().ok().map(Box::new),
            xcrs: fd.get_xcrs().ok(),
            msrs: m.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            lapic: ioctl("KVM_GET_LAPIC", fd.get_lapic())?,
            events: ioctl("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
            mp_state: ioctl("KVM_GET_MP_STATE", fd.get_mp_state())?,
            debugregs: ioctl("KVM_GET_DEBUGREGS", fd.get_debug_regs())?,
        })
    }

    /// Loads the state into a vCPU that is not running, in QEMU's order.
    ///
    /// # Errors
    /// A failed ioctl, named.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        ioctl("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        match &self.xsave {
            // SAFETY: `kvm_xsave` is the fixed 4 KiB layout KVM_SET_XSAVE reads; no extra
            // (dynamically enabled) components are in use.
            Some(x) => ioctl("KVM_SET_XSAVE", unsafe { fd.set_xsave(x) })?,
            None => ioctl("KVM_SET_FPU", fd.set_fpu(&self.fpu))?,
        }
        if let Some(x) = &self.xcrs {
            ioctl("KVM_SET_XCRS", fd.set_xcrs(x))?;
        }
        ioctl("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        let m = msr_buf(&self.msrs)?;
        let n = ioctl("KVM_SET_MSRS", fd.set_msrs(&m))?;
        if n != self.msrs.len() {
            return Err(Error::Msrs {
                verb: "took",
                done: n,
                asked: self.msrs.len(),
            });
        }
        ioctl("KVM_SET_MP_STATE", fd.set_mp_state(self.mp_state))?;
        ioctl("KVM_SET_LAPIC", fd.set_lapic(&self.lapic))?;
        ioctl("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.events))?;
        ioctl("KVM_SET_DEBUGREGS", fd.set_debug_regs(&self.debugregs))?;
        Ok(())
    }
}
