//! In-memory transports for tests: a growable buffer and a bounded duplex pipe.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{ShutdownHandle, Transport};

/// A growable in-memory stream: writes append, reads consume from the front.
///
/// Clones share the same bytes, so a test can keep one clone to look at what a
/// [`QemuFile`](crate::QemuFile) wrote through the other.
#[derive(Debug, Clone, Default)]
pub struct MemBuffer {
    // Lock: this mutex guards the bytes and the read position; held only for one copy.
    inner: Arc<Mutex<(Vec<u8>, usize)>>,
}

impl MemBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer to read `bytes` from.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        MemBuffer {
            inner: Arc::new(Mutex::new((bytes.into(), 0))),
        }
    }

    /// Everything written so far (including what has been read).
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.inner).0.clone()
    }

    /// A [`QemuFile`](crate::QemuFile) writing into (and reading from) this buffer; the
    /// buffer keeps what it wrote for [`MemBuffer::contents`].
    pub fn file(&self) -> crate::QemuFile {
        crate::QemuFile::new(Box::new(self.clone()))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Transport for MemBuffer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = lock(&self.inner);
        let (data, pos) = &mut *g;
        let n = buf.len().min(data.len() - *pos);
        buf[..n].copy_from_slice(&data[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut g = lock(&self.inner);
        let mut n = 0;
        for b in bufs {
            g.0.extend_from_slice(b);
            n += b.len();
        }
        Ok(n)
    }
    fn describe(&self) -> String {
        "memory buffer".to_string()
    }
}

impl crate::QemuFile {
    /// A stream that reads `bytes` (a saved stream in memory, e.g. to load a snapshot
    /// or in tests).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        crate::QemuFile::new(Box::new(MemBuffer::from_bytes(bytes)))
    }
}

/// One direction of a [`mem_channel`].
#[derive(Debug)]
struct Pipe {
    // Lock: guards the queued bytes and the flags; writers wait on `cond` for space, readers
    // for data.
    state: Mutex<PipeState>,
    cond: Condvar,
    capacity: usize,
}

#[derive(Debug, Default)]
struct PipeState {
    bytes: VecDeque<u8>,
    writer_gone: bool,
    reader_gone: bool,
    shut_down: bool,
}

impl Pipe {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Pipe {
            state: Mutex::new(PipeState::default()),
            cond: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn update(&self, f: impl FnOnce(&mut PipeState)) {
        f(&mut lock(&self.state));
        self.cond.notify_all();
    }
}

/// One end of an in-memory duplex pipe, with a bounded buffer in each direction so that a
/// writer blocks when the reader stalls, as on a socket.
#[derive(Debug)]
pub struct MemTransport {
    rx: Arc<Pipe>,
    tx: Arc<Pipe>,
    name: &'static str,
}

/// A connected pair of in-memory transports; each direction buffers up to `capacity` bytes.
pub fn mem_channel(capacity: usize) -> (MemTransport, MemTransport) {
    let a = Pipe::new(capacity);
    let b = Pipe::new(capacity);
    (
        MemTransport {
            rx: Arc::clone(&a),
            tx: Arc::clone(&b),
            name: "memory pipe (end A)",
        },
        MemTransport {
            rx: b,
            tx: a,
            name: "memory pipe (end B)",
        },
    )
}

impl Transport for MemTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = lock(&self.rx.state);
        loop {
            if st.shut_down {
                return Ok(0);
            }
            if !st.bytes.is_empty() {
                let n = buf.len().min(st.bytes.len());
                for (d, s) in buf.iter_mut().zip(st.bytes.drain(..n)) {
                    *d = s;
                }
                drop(st);
                self.rx.cond.notify_all();
                return Ok(n);
            }
            if st.writer_gone {
                return Ok(0);
            }
            st = self.rx.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let mut st = lock(&self.tx.state);
        loop {
            if st.shut_down || st.reader_gone || st.writer_gone {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "memory pipe closed",
                ));
            }
            let space = self.tx.capacity.saturating_sub(st.bytes.len());
            if space > 0 {
                let mut left = space.min(total);
                let n = left;
                for b in bufs {
                    let take = left.min(b.len());
                    st.bytes.extend(&b[..take]);
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
                drop(st);
                self.tx.cond.notify_all();
                return Ok(n);
            }
            st = self.tx.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        let (rx, tx) = (Arc::clone(&self.rx), Arc::clone(&self.tx));
        Some(ShutdownHandle::new(move || {
            rx.update(|s| s.shut_down = true);
            tx.update(|s| s.shut_down = true);
        }))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tx.update(|s| s.writer_gone = true);
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.to_string()
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        self.tx.update(|s| s.writer_gone = true);
        self.rx.update(|s| s.reader_gone = true);
    }
}
