//! The `"cpu"` section: a [`VcpuState`] as described fields, declared once. Registers
//! one by one (a dump or QEMU's analyzer shows `rip`, `cr3`...), the rest as the
//! kernel's structures; XSAVE and XCRs are subsections, present where KVM has them.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use savevm::{FieldError, FieldReader, FieldWriter, VmState};

use crate::Raw;
use crate::vcpu::VcpuState;

/// Most MSRs a `"cpu"` section carries, on both sides.
pub const MAX_MSRS: usize = 256;

/// Declares a struct of `u64` registers copied from and to a kernel structure.
macro_rules! registers {
    ($(#[$doc:meta])* $name:ident, $vmsd:literal, $kvm:ty, [$($r:ident),* $(,)?]) => {
        $(#[$doc])*
        #[derive(VmState, Default, Debug, Clone, PartialEq, Eq)]
        #[vmstate(name = $vmsd)]
        pub struct $name {
            $(
                #[allow(missing_docs)]
                pub $r: u64,
            )*
        }

        impl From<&$kvm> for $name {
            fn from(k: &$kvm) -> Self {
                $name { $($r: k.$r),* }
            }
        }

        impl $name {
            /// Copies the registers into `k`.
            pub fn apply(&self, k: &mut $kvm) {
                $(k.$r = self.$r;)*
            }
        }
    };
}

registers!(
    /// The general registers (`kvm_regs`).
    Regs,
    "kvm_regs",
    kvm_regs,
    [
        rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip,
        rflags,
    ]
);

registers!(
    /// The control registers of `kvm_sregs`, readable on their own.
    ControlRegs,
    "control_regs",
    kvm_sregs,
    [cr0, cr2, cr3, cr4, cr8, efer, apic_base]
);

/// The legacy FPU/SSE state (`kvm_fpu`), field by field.
#[derive(VmState, Default, Debug, Clone, PartialEq, Eq)]
#[vmstate(name = "kvm_fpu")]
pub struct Fpu {
    #[allow(missing_docs)]
    pub fcw: u16,
    #[allow(missing_docs)]
    pub fsw: u16,
    #[allow(missing_docs)]
    pub ftwx: u8,
    #[allow(missing_docs)]
    pub fop: u16,
    #[allow(missing_docs)]
    pub fip: u64,
    #[allow(missing_docs)]
    pub fdp: u64,
    #[allow(missing_docs)]
    pub mxcsr: u32,
    /// The x87 registers, 16 bytes each.
    pub fpr: [[u8; 16]; 8],
    /// The SSE registers.
    pub xmm: [[u8; 16]; 16],
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            fop: f.last_opcode,
            fip: f.last_ip,
            fdp: f.last_dp,
            mxcsr: f.mxcsr,
            fpr: f.fpr,
            xmm: f.xmm,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.fop,
            last_ip: f.fip,
            last_dp: f.fdp,
            mxcsr: f.mxcsr,
            fpr: f.fpr,
            xmm: f.xmm,
            ..Default::default()
        }
    }
}

/// One model-specific register.
#[derive(VmState, Default, Debug, Clone, Copy, PartialEq, Eq)]
#[vmstate(name = "msr")]
pub struct Msr {
    /// Its number.
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// The XSAVE area (subsection `cpu/xsave`).
#[derive(VmState, Default, Debug)]
#[vmstate(name = "xsave")]
pub struct Xsave {
    /// `kvm_xsave` as the kernel lays it out.
    pub region: Raw<kvm_xsave>,
}

/// The extended control registers (subsection `cpu/xcrs`).
#[derive(VmState, Default, Debug)]
#[vmstate(name = "xcrs")]
pub struct Xcrs {
    /// `kvm_xcrs` as the kernel lays it out.
    pub xcrs: Raw<kvm_xcrs>,
}

/// The `"cpu"` section's fields. Version 2 (version 1 wrote the MSRs as one buffer and
/// XSAVE/XCRs behind flags).
#[derive(VmState, Default, Debug)]
#[vmstate(name = "cpu", version = 2)]
pub struct CpuFields {
    /// General registers.
    pub regs: Regs,
    /// Control registers (also inside `sregs`; these win on load).
    pub control: ControlRegs,
    /// Segment registers, descriptor tables, interrupt bitmap.
    pub sregs: Raw<kvm_sregs>,
    /// x87 and SSE.
    pub fpu: Fpu,
    /// Model-specific registers.
    #[vmstate(max_len = MAX_MSRS)]
    pub msrs: Vec<Msr>,
    /// The local APIC's registers.
    pub lapic: Raw<kvm_lapic_state>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: Raw<kvm_vcpu_events>,
    /// KVM's multiprocessing state.
    pub mp_state: u32,
    /// Debug registers.
    pub debugregs: Raw<kvm_debugregs>,
    /// Extended state, where KVM has XSAVE.
    #[vmstate(subsection)]
    pub xsave: Option<Xsave>,
    /// Extended control registers, where KVM has them.
    #[vmstate(subsection)]
    pub xcrs: Option<Xcrs>,
}

impl From<&VcpuState> for CpuFields {
    fn from(s: &VcpuState) -> Self {
        CpuFields {
            regs: Regs::from(&s.regs),
            control: ControlRegs::from(&s.sregs),
            sregs: Raw(s.sregs),
            fpu: Fpu::from(&s.fpu),
            msrs: s
                .msrs
                .iter()
                .map(|&(index, value)| Msr { index, value })
                .collect(),
            lapic: Raw(s.lapic),
            vcpu_events: Raw(s.events),
            mp_state: s.mp_state.mp_state,
            debugregs: Raw(s.debugregs),
            xsave: s.xsave.as_ref().map(|x| Xsave {
                region: Raw(kvm_xsave {
                    region: x.region,
                    ..Default::default()
                }),
            }),
            xcrs: s.xcrs.map(|x| Xcrs { xcrs: Raw(x) }),
        }
    }
}

impl From<CpuFields> for VcpuState {
    fn from(f: CpuFields) -> Self {
        let mut regs = kvm_regs::default();
        f.regs.apply(&mut regs);
        let mut sregs = f.sregs.0;
        f.control.apply(&mut sregs);
        VcpuState {
            regs,
            sregs,
            fpu: kvm_fpu::from(&f.fpu),
            xsave: f.xsave.map(|x| Box::new(x.region.0)),
            xcrs: f.xcrs.map(|x| x.xcrs.0),
            msrs: f.msrs.iter().map(|m| (m.index, m.value)).collect(),
            lapic: f.lapic.0,
            events: f.vcpu_events.0,
            mp_state: kvm_mp_state {
                mp_state: f.mp_state,
            },
            debugregs: f.debugregs.0,
        }
    }
}

impl VcpuState {
    /// Writes the state as the `"cpu"` section's fields ([`CpuFields`]).
    pub fn write_fields(&self, w: &mut FieldWriter<'_>) {
        w.state(&CpuFields::from(self));
    }

    /// Reads what [`VcpuState::write_fields`] wrote at section version `version`.
    ///
    /// # Errors
    /// A truncated stream, a version outside this side's, too many MSRs.
    pub fn read_fields(r: &mut FieldReader<'_>, version: u32) -> Result<Self, FieldError> {
        let mut f = CpuFields::default();
        r.state(&mut f, version)?;
        Ok(f.into())
    }
}
