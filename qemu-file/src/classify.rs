//! Telling a destination's connections apart: the main stream opens with "QEVM", a
//! multifd channel with [`MULTIFD_MAGIC`]. Each accepted connection is read up to its
//! first four bytes (through TLS first, when the destination has credentials) on a
//! thread of its own, so one slow handshake does not hold the others.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::transport::{ShutdownHandle, TcpTransport, UnixTransport, UnsentProbe};
use crate::{Error, Result, TlsCreds, Transport};

/// The first word of a main migration stream ("QEVM").
pub(crate) const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;

/// The first word of a multifd channel (QEMU's `MULTIFD_MAGIC`, whose framing ram-list
/// reads).
pub(crate) const MULTIFD_MAGIC: u32 = 0x1122_3344;

/// A connection told apart: its first word, and the transport that still yields it.
type Classified = Result<(u32, Box<dyn Transport>)>;

/// The accepted connections that are not told apart yet: a listener's shutdown ends
/// them too, and so does one after it.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<Mutex<InFlightState>>);

#[derive(Debug, Default)]
struct InFlightState {
    shut: bool,
    handles: Vec<ShutdownHandle>,
}

impl InFlight {
    /// Adds a connection's handle; false (and the connection shut) after a shutdown.
    fn register(&self, h: ShutdownHandle) -> bool {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if s.shut {
            h.shutdown();
            return false;
        }
        s.handles.push(h);
        true
    }

    /// Ends every connection registered, and any registered later.
    pub(crate) fn shutdown(&self) {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        s.shut = true;
        for h in s.handles.drain(..) {
            h.shutdown();
        }
    }

    /// Forgets the connections: they were all handed out.
    pub(crate) fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handles
            .clear();
    }
}

/// A listening socket (a duplicate of the listener's) that connections are taken from.
pub(crate) enum Incoming {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted socket and how it is shown.
enum Conn {
    Tcp(std::net::TcpStream, String),
    Unix(std::os::unix::net::UnixStream, String),
}

impl Conn {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s, _) => s.as_fd(),
            Conn::Unix(s, _) => s.as_fd(),
        }
    }

    /// Completes TLS (when `tls`) and reads up to the first word.
    fn classify(self, tls: Option<&TlsCreds>) -> Classified {
        let Some(creds) = tls else {
            let text = match &self {
                Conn::Tcp(_, t) | Conn::Unix(_, t) => t.clone(),
            };
            let magic = peek_magic(self.fd()).map_err(|e| Error::open("read from", &text, e))?;
            let t: Box<dyn Transport> = match self {
                Conn::Tcp(s, text) => Box::new(TcpTransport::new(s, text)),
                Conn::Unix(s, text) => Box::new(UnixTransport::new(s, text)),
            };
            return Ok((magic, t));
        };
        let mut t = match self {
            Conn::Tcp(s, text) => crate::tls::accept_tcp(creds, s, text)?,
            Conn::Unix(s, text) => crate::tls::accept_unix(creds, s, text)?,
        };
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            match t.read(&mut head[got..]) {
                Ok(0) => {
                    return Err(Error::open(
                        "read from",
                        t.describe(),
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection before its first 4 bytes",
                        ),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::open("read from", t.describe(), e)),
            }
        }
        Ok((
            u32::from_be_bytes(head),
            Box::new(Prefixed {
                head,
                taken: 0,
                inner: t,
            }),
        ))
    }
}

impl Incoming {
    fn accept(&self, text: &str) -> Result<Conn> {
        let open = |e| Error::open("accept on", text, e);
        Ok(match self {
            Incoming::Tcp(l) => {
                let (s, peer) = l.accept().map_err(open)?;
                Conn::Tcp(s, format!("{text} (from {peer})"))
            }
            Incoming::Unix(l) => Conn::Unix(l.accept().map_err(open)?.0, text.to_string()),
        })
    }

    /// Accepts `n` connections on a thread and classifies each on a thread of its own;
    /// the results arrive in the order the classifications end.
    pub(crate) fn accept_classified(
        self,
        n: usize,
        tls: Option<TlsCreds>,
        text: String,
        in_flight: InFlight,
    ) -> Receiver<Classified> {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for _ in 0..n {
                let conn = match self.accept(&text) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let Some(h) = ShutdownHandle::for_socket(conn.fd()) else {
                    continue;
                };
                if !in_flight.register(h) {
                    return;
                }
                let (tx, tls) = (tx.clone(), tls.clone());
                thread::spawn(move || {
                    let _ = tx.send(conn.classify(tls.as_ref()));
                });
            }
        });
        rx
    }
}

/// Waits for the first four bytes of a connection without consuming them.
fn peek_magic(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut b = [0u8; 4];
    loop {
        // SAFETY: `b` is a writable buffer of 4 bytes that outlives the call, and `fd` is
        // an open socket borrowed for the call.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                b.as_mut_ptr().cast(),
                b.len(),
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        match n {
            4 => return Ok(u32::from_be_bytes(b)),
            n if n >= 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection before its first 4 bytes",
                ));
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A transport whose first four bytes were read to tell it apart (a TLS session cannot be
/// peeked at): they are handed out again first.
#[derive(Debug)]
struct Prefixed {
    head: [u8; 4],
    taken: usize,
    inner: Box<dyn Transport>,
}

impl Transport for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.taken < self.head.len() {
            let n = buf.len().min(self.head.len() - self.taken);
            buf[..n].copy_from_slice(&self.head[self.taken..self.taken + n]);
            self.taken += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if self.taken < self.head.len() {
            return match bufs.iter_mut().find(|b| !b.is_empty()) {
                Some(b) => self.read(b),
                None => Ok(0),
            };
        }
        self.inner.read_vectored(bufs)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.inner.write_vectored(bufs)
    }

    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        self.inner.shutdown_handle()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.inner.finish()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn unsent_probe(&self) -> Option<UnsentProbe> {
        self.inner.unsent_probe()
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn limit_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        self.inner.limit_receive_buffer(bytes)
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        // The head was read from the socket: a second handle starts after it, which is
        // right once this one handed it out (the caller moves what it buffered).
        if self.taken < self.head.len() {
            return Err(io::Error::other(
                "the connection's first bytes are not read yet",
            ));
        }
        self.inner.try_clone()
    }
}
