//! The VM-wide state KVM keeps in the kernel when the VMM asked for an in-kernel
//! irqchip and PIT: the two 8259 PICs and the IOAPIC (`"kvm-pic"` instances 0 and 1,
//! `"kvm-ioapic"`), the i8254 (`"kvm-pit"`) and the clock (`"kvmclock"`).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use savevm::VmState;

use crate::Raw;
use crate::error::{Result, ioctl};

/// The sections of the in-kernel interrupt controllers: (idstr, instance, KVM chip id).
pub const IRQCHIPS: [(&str, u32, u32); 3] = [
    ("kvm-pic", 0, KVM_IRQCHIP_PIC_MASTER),
    ("kvm-pic", 1, KVM_IRQCHIP_PIC_SLAVE),
    ("kvm-ioapic", 0, KVM_IRQCHIP_IOAPIC),
];

/// One in-kernel interrupt controller.
#[derive(VmState, Default, Debug)]
#[vmstate(name = "kvm-irqchip")]
pub struct Irqchip {
    /// `kvm_irqchip` (its `chip_id` says which).
    pub irqchip: Raw<kvm_irqchip>,
}

impl Irqchip {
    /// Reads chip `chip_id`.
    ///
    /// # Errors
    /// KVM_GET_IRQCHIP failed.
    pub fn save(vm: &VmFd, chip_id: u32) -> Result<Self> {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        ioctl("KVM_GET_IRQCHIP", vm.get_irqchip(&mut c))?;
        Ok(Irqchip { irqchip: Raw(c) })
    }

    /// Loads it into the chip it names.
    ///
    /// # Errors
    /// KVM_SET_IRQCHIP failed.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(&self.irqchip.0))
    }
}

/// The in-kernel i8254.
#[derive(VmState, Default, Debug)]
#[vmstate(name = "kvm-pit")]
pub struct Pit {
    /// `kvm_pit_state2`.
    pub pit: Raw<kvm_pit_state2>,
}

impl Pit {
    /// Reads it.
    ///
    /// # Errors
    /// KVM_GET_PIT2 failed.
    pub fn save(vm: &VmFd) -> Result<Self> {
        Ok(Pit {
            pit: Raw(ioctl("KVM_GET_PIT2", vm.get_pit2())?),
        })
    }

    /// Loads it.
    ///
    /// # Errors
    /// KVM_SET_PIT2 failed.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        ioctl("KVM_SET_PIT2", vm.set_pit2(&self.pit.0))
    }
}

/// The VM's clock.
#[derive(VmState, Default, Debug, Clone, Copy, PartialEq, Eq)]
#[vmstate(name = "kvmclock")]
pub struct Clock {
    /// Nanoseconds.
    pub clock: u64,
    /// KVM's flags when it was read.
    pub flags: u32,
}

impl Clock {
    /// Reads it.
    ///
    /// # Errors
    /// KVM_GET_CLOCK failed.
    pub fn save(vm: &VmFd) -> Result<Self> {
        let c = ioctl("KVM_GET_CLOCK", vm.get_clock())?;
        Ok(Clock {
            clock: c.clock,
            flags: c.flags,
        })
    }

    /// Sets the clock (the flags it was read with do not go back in).
    ///
    /// # Errors
    /// KVM_SET_CLOCK failed.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        let c = kvm_clock_data {
            clock: self.clock,
            ..Default::default()
        };
        ioctl("KVM_SET_CLOCK", vm.set_clock(&c))
    }
}
