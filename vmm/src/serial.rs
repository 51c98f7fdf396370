//! The 16550 UART at 0x3f8 (vm-superio) and its output sink (its migration section is
//! `serial_section.rs`).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
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
