//! The `"serial"` section: the UART's state in the stream.

use std::io;
use std::sync::Arc;

use savevm::{DeviceHandler, FieldReader, FieldWriter, SectionError, SectionInfo};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use crate::bus::Bus;
use crate::serial::{Console, NoInterrupt, new_uart};

/// The `"serial"` section: the UART's registers and receive FIFO.
pub struct SerialSection {
    bus: Arc<Bus>,
}

impl SerialSection {
    /// The section for the UART on `bus`. It is saved and loaded under the VM lock, so it
    /// takes only the devices' own lock.
    pub fn new(bus: Arc<Bus>) -> Self {
        SerialSection { bus }
    }

    /// How it registers.
    pub fn info() -> SectionInfo {
        SectionInfo::new("serial", 0, 1)
    }
}

impl DeviceHandler for SerialSection {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        let s = self.bus.devices().uart.state();
        w.u8("divisor_low", s.baud_divisor_low);
        w.u8("divisor_high", s.baud_divisor_high);
        w.u8("ier", s.interrupt_enable);
        w.u8("iir", s.interrupt_identification);
        w.u8("lcr", s.line_control);
        w.u8("lsr", s.line_status);
        w.u8("mcr", s.modem_control);
        w.u8("msr", s.modem_status);
        w.u8("scr", s.scratch);
        w.u8("rx_len", s.in_buffer.len() as u8);
        w.buffer("rx_fifo", &s.in_buffer);
        Ok(())
    }

    fn load(&mut self, r: &mut FieldReader<'_>, _version: u32) -> Result<(), SectionError> {
        let mut s = SerialState {
            baud_divisor_low: r.u8("divisor_low")?,
            baud_divisor_high: r.u8("divisor_high")?,
            interrupt_enable: r.u8("ier")?,
            interrupt_identification: r.u8("iir")?,
            line_control: r.u8("lcr")?,
            line_status: r.u8("lsr")?,
            modem_control: r.u8("mcr")?,
            modem_status: r.u8("msr")?,
            scratch: r.u8("scr")?,
            in_buffer: Vec::new(),
        };
        let len = r.u8("rx_len")? as usize;
        s.in_buffer = r.buffer("rx_fifo", len)?;
        let mut dev = self.bus.devices();
        // Rebuild the UART around the same output.
        let placeholder = new_uart(Box::new(io::sink()), Arc::new(Console::default()));
        let old = std::mem::replace(&mut dev.uart, placeholder);
        let out = old.into_writer();
        dev.uart = Serial::from_state(&s, NoInterrupt, NoEvents, out)
            .map_err(|e| format!("the serial state does not fit a 16550: {e:?}"))?;
        Ok(())
    }
}
