//! `VcpuState`: everything KVM holds for one x86 vCPU, saved and restored with the
//! ioctls kvm-ioctls wraps, and its `"cpu"` migration section.

use anyhow::{Context, Result};
use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use savevm::{FieldError, FieldReader, FieldWriter};
use zerocopy::{FromBytes, IntoBytes};

/// MSRs worth migrating for our guests (the ones KVM supports are kept).
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
    Msrs::from_entries(&e).map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))
}

/// The candidate MSRs this vCPU can read.
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
    /// Reads the state of a stopped vCPU (with no I/O pending).
    ///
    /// # Errors
    /// A failed ioctl, named.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self> {
        let mut m = msr_buf(&msr_indices.iter().map(|&i| (i, 0)).collect::<Vec<_>>())?;
        let n = fd.get_msrs(&mut m).context("KVM_GET_MSRS")?;
        anyhow::ensure!(
            n == msr_indices.len(),
            "KVM read {n} of {} MSRs",
            msr_indices.len()
        );
        Ok(VcpuState {
            regs: fd.get_regs().context("KVM_GET_REGS")?,
            sregs: fd.get_sregs().context("KVM_GET_SREGS")?,
            fpu: fd.get_fpu().context("KVM_GET_FPU")?,
            xsave: fd.get_xsave().ok().map(Box::new),
            xcrs: fd.get_xcrs().ok(),
            msrs: m.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            lapic: fd.get_lapic().context("KVM_GET_LAPIC")?,
            events: fd.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
            mp_state: fd.get_mp_state().context("KVM_GET_MP_STATE")?,
            debugregs: fd.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
        })
    }

    /// Loads the state into a vCPU that is not running, in QEMU's order.
    ///
    /// # Errors
    /// A failed ioctl, named.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        fd.set_regs(&self.regs).context("KVM_SET_REGS")?;
        match &self.xsave {
            // SAFETY: `kvm_xsave` is the fixed 4 KiB layout KVM_SET_XSAVE reads; no extra
            // (dynamically enabled) components are in use by this VMM.
            Some(x) => unsafe { fd.set_xsave(x) }.context("KVM_SET_XSAVE")?,
            None => fd.set_fpu(&self.fpu).context("KVM_SET_FPU")?,
        }
        if let Some(x) = &self.xcrs {
            fd.set_xcrs(x).context("KVM_SET_XCRS")?;
        }
        fd.set_sregs(&self.sregs).context("KVM_SET_SREGS")?;
        let m = msr_buf(&self.msrs)?;
        let n = fd.set_msrs(&m).context("KVM_SET_MSRS")?;
        anyhow::ensure!(
            n == self.msrs.len(),
            "KVM took {n} of {} MSRs",
            self.msrs.len()
        );
        fd.set_mp_state(self.mp_state).context("KVM_SET_MP_STATE")?;
        fd.set_lapic(&self.lapic).context("KVM_SET_LAPIC")?;
        fd.set_vcpu_events(&self.events)
            .context("KVM_SET_VCPU_EVENTS")?;
        fd.set_debug_regs(&self.debugregs)
            .context("KVM_SET_DEBUGREGS")?;
        Ok(())
    }

    /// Writes the state as described fields: registers one by one (readable in dumps),
    /// the rest as the kernel's structures.
    pub fn write_fields(&self, w: &mut FieldWriter<'_>) {
        let r = &self.regs;
        for (name, v) in [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rsp", r.rsp),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
            ("rip", r.rip),
            ("rflags", r.rflags),
        ] {
            w.u64(name, v);
        }
        let s = &self.sregs;
        for (name, v) in [
            ("cr0", s.cr0),
            ("cr2", s.cr2),
            ("cr3", s.cr3),
            ("cr4", s.cr4),
            ("cr8", s.cr8),
            ("efer", s.efer),
            ("apic_base", s.apic_base),
        ] {
            w.u64(name, v);
        }
        w.buffer("sregs", s.as_bytes());
        let f = &self.fpu;
        w.u16("fcw", f.fcw);
        w.u16("fsw", f.fsw);
        w.u8("ftwx", f.ftwx);
        w.u16("fop", f.last_opcode);
        w.u64("fip", f.last_ip);
        w.u64("fdp", f.last_dp);
        w.u32("mxcsr", f.mxcsr);
        w.buffer("fpr", f.fpr.as_flattened());
        w.buffer("xmm", f.xmm.as_flattened());
        w.bool("has_xsave", self.xsave.is_some());
        if let Some(x) = &self.xsave {
            w.buffer("xsave", x.region.as_bytes());
        }
        w.bool("has_xcrs", self.xcrs.is_some());
        if let Some(x) = &self.xcrs {
            w.buffer("xcrs", x.as_bytes());
        }
        w.u32("msr_count", self.msrs.len() as u32);
        let mut msrs = Vec::with_capacity(self.msrs.len() * 12);
        for (i, v) in &self.msrs {
            msrs.extend_from_slice(&i.to_be_bytes());
            msrs.extend_from_slice(&v.to_be_bytes());
        }
        w.buffer("msrs", &msrs);
        w.buffer("lapic", self.lapic.as_bytes());
        w.buffer("vcpu_events", self.events.as_bytes());
        w.u32("mp_state", self.mp_state.mp_state);
        w.buffer("debugregs", self.debugregs.as_bytes());
    }

    /// Reads what [`VcpuState::write_fields`] wrote.
    ///
    /// # Errors
    /// A truncated stream or an impossible value.
    pub fn read_fields(r: &mut FieldReader<'_>) -> Result<Self, FieldError> {
        let mut regs = kvm_regs::default();
        for v in [
            &mut regs.rax,
            &mut regs.rbx,
            &mut regs.rcx,
            &mut regs.rdx,
            &mut regs.rsi,
            &mut regs.rdi,
            &mut regs.rsp,
            &mut regs.rbp,
            &mut regs.r8,
            &mut regs.r9,
            &mut regs.r10,
            &mut regs.r11,
            &mut regs.r12,
            &mut regs.r13,
            &mut regs.r14,
            &mut regs.r15,
            &mut regs.rip,
            &mut regs.rflags,
        ] {
            *v = r.u64("register")?;
        }
        let mut cregs = [0u64; 7];
        for c in &mut cregs {
            *c = r.u64("control register")?;
        }
        let mut sregs = read_struct::<kvm_sregs>(r, "sregs")?;
        [
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.cr8,
            sregs.efer,
            sregs.apic_base,
        ] = cregs;
        let mut fpu = kvm_fpu {
            fcw: r.u16("fcw")?,
            fsw: r.u16("fsw")?,
            ftwx: r.u8("ftwx")?,
            last_opcode: r.u16("fop")?,
            last_ip: r.u64("fip")?,
            last_dp: r.u64("fdp")?,
            mxcsr: r.u32("mxcsr")?,
            ..Default::default()
        };
        r.buffer_into("fpr", fpu.fpr.as_flattened_mut())?;
        r.buffer_into("xmm", fpu.xmm.as_flattened_mut())?;
        let xsave = if r.bool("has_xsave")? {
            let mut x = Box::new(kvm_xsave::default());
            r.buffer_into("xsave", x.region.as_mut_bytes())?;
            Some(x)
        } else {
            None
        };
        let xcrs = if r.bool("has_xcrs")? {
            Some(read_struct::<kvm_xcrs>(r, "xcrs")?)
        } else {
            None
        };
        let count = r.u32("msr_count")? as usize;
        if count > 256 {
            return Err(FieldError::Invalid {
                field: "msr_count".into(),
                reason: format!("{count} MSRs; at most 256 are accepted"),
            });
        }
        let raw = r.buffer("msrs", count * 12)?;
        let msrs = raw
            .chunks_exact(12)
            .map(|c| {
                (
                    u32::from_be_bytes(c[..4].try_into().expect("4 bytes")),
                    u64::from_be_bytes(c[4..].try_into().expect("8 bytes")),
                )
            })
            .collect();
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs,
            lapic: read_struct(r, "lapic")?,
            events: read_struct(r, "vcpu_events")?,
            mp_state: kvm_mp_state {
                mp_state: r.u32("mp_state")?,
            },
            debugregs: read_struct(r, "debugregs")?,
        })
    }
}

/// Reads a kernel structure written as its raw bytes.
pub fn read_struct<T: FromBytes + IntoBytes + Default>(
    r: &mut FieldReader<'_>,
    name: &str,
) -> Result<T, FieldError> {
    let mut v = T::default();
    r.buffer_into(name, v.as_mut_bytes())?;
    Ok(v)
}
