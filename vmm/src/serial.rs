//! The 16550 UART at 0x3f8 (vm-superio), its output sink and its migration section.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use savevm::{DeviceHandler, FieldReader, FieldWriter, SectionError, SectionInfo};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// First port of COM1.
pub const COM1: u16 = 0x3f8;

/// The guest uses no interrupts: the UART's interrupt line goes nowhere.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// What the guest printed: a byte count, the recent tail, and waiters for progress.
#[derive(Debug, Default)]
pub struct Console {
    // Lock: written by the vCPU thread that performs the guest's `out`; read by anyone.
    state: Mutex<ConsoleState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct ConsoleState {
    bytes: u64,
    tail: VecDeque<u8>,
}

impl Console {
    fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, data: &[u8]) {
        let mut st = self.lock();
        st.bytes += data.len() as u64;
        for &b in data {
            if st.tail.len() == 64 {
                st.tail.pop_front();
            }
            st.tail.push_back(b);
        }
        drop(st);
        self.cond.notify_all();
    }

    /// Bytes the guest has printed (in this process).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The last bytes printed, as text.
    pub fn tail(&self) -> String {
        String::from_utf8_lossy(self.lock().tail.make_contiguous()).into_owned()
    }

    /// Waits until the guest has printed at least `n` bytes; false on timeout.
    pub fn wait_for_bytes(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.bytes < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// The UART's output: the user's sink (a file, stdout or nothing) plus the [`Console`].
pub struct SerialOut {
    sink: Box<dyn Write + Send>,
    console: Arc<Console>,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.console.record(buf);
        // A sink that fails (closed stdout) must not stop the guest.
        let _ = self.sink.write_all(buf);
        let _ = self.sink.flush();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART.
pub type Uart = Serial<NoInterrupt, NoEvents, SerialOut>;

/// Builds a UART writing to `sink` and recording into `console`.
pub fn new_uart(sink: Box<dyn Write + Send>, console: Arc<Console>) -> Uart {
    Serial::new(NoInterrupt, SerialOut { sink, console })
}

/// The `"serial"` section: the UART's registers and receive FIFO.
pub struct SerialSection {
    bus: Arc<crate::machine::Bus>,
}

impl SerialSection {
    /// The section for the UART on `bus`. It is saved and loaded under the VM lock, so it
    /// takes only the devices' own lock.
    pub fn new(bus: Arc<crate::machine::Bus>) -> Self {
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
