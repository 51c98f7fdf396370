//! The VM lock and the device models behind it: what a vCPU reaches through port I/O.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::disk::BlockDevice;
use crate::serial::{COM1, Uart};

/// The devices the vCPUs reach through port I/O.
pub struct Devices {
    /// COM1.
    pub uart: Uart,
    /// The disks' doorbells.
    pub block: BlockDevice,
}

/// The VM lock and the device models behind it.
pub struct Bus {
    /// The VM lock (QEMU's big lock): a vCPU thread takes it to emulate an access, the
    /// migration thread to ask for pending bytes, to collect a chunk and through the
    /// completion, the monitor to act on the VM. Lock order: `vm_lock`, then `devices`.
    pub vm_lock: Mutex<()>,
    /// Lock: the device models; taken after `vm_lock` (a device section saving under the
    /// held VM lock takes only this one).
    pub devices: Mutex<Devices>,
}

impl Bus {
    /// A bus with these devices.
    pub fn new(devices: Devices) -> Arc<Self> {
        Arc::new(Bus {
            vm_lock: Mutex::new(()),
            devices: Mutex::new(devices),
        })
    }

    /// The device models (the caller holds the VM lock, or needs no consistency with it).
    pub fn devices(&self) -> MutexGuard<'_, Devices> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guest `out`, under the VM lock.
    pub fn io_out(&self, port: u16, data: &[u8]) {
        let _vm = self.vm_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.devices().io_out(port, data);
    }

    /// A guest `in`, under the VM lock.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let _vm = self.vm_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.devices().io_in(port, data);
    }
}

impl Devices {
    /// A guest `out`.
    pub fn io_out(&mut self, port: u16, data: &[u8]) {
        if (COM1..COM1 + 8).contains(&port) && data.len() == 1 {
            // The UART's only error is a failing interrupt trigger, and ours cannot fail.
            let _ = self.uart.write((port - COM1) as u8, data[0]);
        } else if let (Some(i), Ok(addr)) = (self.block.disk_at(port), <[u8; 4]>::try_from(data)) {
            self.block.request(i, u64::from(u32::from_le_bytes(addr)));
        }
    }

    /// A guest `in`: the UART, or 0xff for ports nobody decodes.
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        if (COM1..COM1 + 8).contains(&port) && data.len() == 1 {
            data[0] = self.uart.read((port - COM1) as u8);
        } else {
            data.fill(0xff);
        }
    }
}
