//! The `"serial"` section: the UART's state in the stream.

use std::io;
use std::sync::Arc;

use savevm::{DeviceHandler, FieldReader, FieldWriter, SectionError, SectionInfo, VmState};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use crate::bus::Bus;
use crate::serial::{Console, NoInterrupt, new_uart};

/// The `"serial"` section: the UART's registers and receive FIFO.
pub struct SerialSection {
    bus: Arc<Bus>,
}

/// The 16550's state in the stream, declared once: registers, then the receive FIFO
/// with its length field. Version 2: version 1 had a one-byte FIFO length.
#[derive(VmState, Default, Debug, PartialEq)]
#[vmstate(name = "serial", version = 2)]
struct UartState {
    divisor_low: u8,
    divisor_high: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    rx_fifo: Vec<u8>,
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            rx_fifo: s.in_buffer.clone(),
        }
    }
}

impl From<UartState> for SerialState {
    fn from(s: UartState) -> Self {
        SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.rx_fifo,
        }
    }
}

impl SerialSection {
    /// The section for the UART on `bus`. It is saved and loaded under the VM lock, so it
    /// takes only the devices' own lock.
    pub fn new(bus: Arc<Bus>) -> Self {
        SerialSection { bus }
    }

    /// How it registers.
    pub fn info() -> SectionInfo {
        SectionInfo::for_state::<UartState>("serial", 0)
    }
}

impl DeviceHandler for SerialSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.state(&UartState::from(&self.bus.devices().uart.state()));
        Ok(())
    }

    fn load(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), SectionError> {
        let mut s = UartState::default();
        r.state(&mut s, version)?;
        let mut dev = self.bus.devices();
        // Rebuild the UART around the same output.
        let placeholder = new_uart(Box::new(io::sink()), Arc::new(Console::default()));
        let old = std::mem::replace(&mut dev.uart, placeholder);
        let out = old.into_writer();
        dev.uart = Serial::from_state(&s.into(), NoInterrupt, NoEvents, out)
            .map_err(|e| format!("the serial state does not fit a 16550: {e:?}"))?;
        Ok(())
    }
}
