//! The `Transport` seam: where the bytes of a `QemuFile` go to or come from.

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, ChildStdout};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A byte channel under a [`QemuFile`](crate::QemuFile): a socket, a pipe to a child, a file
/// or an in-memory pipe.
///
/// Reads and writes are blocking. A transport that can be interrupted from another thread
/// (to cancel a migration whose write is stuck on a full socket) returns a
/// [`ShutdownHandle`].
pub trait Transport: Send + fmt::Debug {
    /// Reads some bytes; `Ok(0)` means the peer closed the stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Reads some bytes into `bufs` in order (one `readv` where the transport has it).
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read(b),
            None => Ok(0),
        }
    }

    /// Writes some of `bufs` (one `writev` where the transport has it) and returns how much.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// A handle that makes blocked and later reads and writes fail, callable from any thread.
    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        None
    }

    /// Ends the outgoing direction once everything is written: waits for an exec child,
    /// syncs a file, half-closes a socket so the reader sees the end.
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// A short description for messages, e.g. `tcp:127.0.0.1:4444`.
    fn describe(&self) -> String;

    /// A probe, callable from any thread, of the bytes written to a socket that its peer
    /// has not acknowledged yet (`TIOCOUTQ`); `None` where there is no such queue.
    fn unsent_probe(&self) -> Option<UnsentProbe> {
        None
    }

    /// Makes a read that waits `timeout` without a byte fail (`TimedOut`), on a socket;
    /// `None` waits for ever. Elsewhere (files, pipes) a no-op.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }

    /// Bounds the kernel's receive buffer of a socket to about `bytes` (no-op elsewhere):
    /// for compressed data, where a full buffer holds far more work for the reader than
    /// its size says.
    fn limit_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let _ = bytes;
        Ok(())
    }

    /// Writes some of `data` with `fds` attached (SCM_RIGHTS); the peer receives them
    /// with these bytes. Only a unix socket in the clear can; elsewhere `Unsupported`.
    fn write_with_fds(&mut self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        let _ = (data, fds);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{} cannot pass file descriptors: only a unix: socket without TLS can",
                self.describe()
            ),
        ))
    }

    /// The descriptors the peer passed with the bytes read so far, oldest first; they are
    /// the caller's from now on.
    fn take_received_fds(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }

    /// The user id of the peer process, where the transport can say (a unix socket).
    fn peer_uid(&self) -> Option<u32> {
        None
    }

    /// A second handle on the same connection, for another thread (QEMU's
    /// `qemu_file_get_return_path`): one thread reads while another writes. A socket in
    /// the clear can; elsewhere `Unsupported`.
    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{} cannot be read and written by two threads at once (a tcp: or unix: socket \
                 without TLS can)",
                self.describe()
            ),
        ))
    }
}

/// Sets SO_RCVBUF of the socket `fd`.
pub(crate) fn set_receive_buffer(fd: impl AsFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `v` is a c_int that outlives the call, its size is passed, and the
    // descriptor is an open socket borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads how many bytes a socket's send queue holds that the peer has not acknowledged.
#[derive(Clone)]
pub struct UnsentProbe(Arc<OwnedFd>);

impl UnsentProbe {
    /// A probe of the socket behind `fd` (a duplicate is kept).
    pub fn for_socket(fd: impl AsFd) -> Option<Self> {
        Some(UnsentProbe(Arc::new(fd.as_fd().try_clone_to_owned().ok()?)))
    }

    /// The bytes not yet acknowledged (0 if the socket cannot say).
    pub fn unsent(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points to `n`;
        // the descriptor is open (owned by the probe).
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        if r == 0 { n.max(0) as usize } else { 0 }
    }
}

impl fmt::Debug for UnsentProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnsentProbe")
    }
}

/// Interrupts a transport from another thread (QEMU's `qemu_file_shutdown`).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<dyn Fn() + Send + Sync>);

impl ShutdownHandle {
    /// Wraps the action that interrupts the transport.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        ShutdownHandle(Arc::new(f))
    }

    /// Shuts the transport down: blocked and later reads and writes fail or see the end.
    pub fn shutdown(&self) {
        (self.0)()
    }

    /// A handle that shuts down the socket behind `fd` (a duplicate is kept, so the handle
    /// stays valid after the transport is dropped). Not a socket: the handle does nothing.
    pub fn for_socket(fd: impl AsFd) -> Option<Self> {
        let dup = fd.as_fd().try_clone_to_owned().ok()?;
        Some(ShutdownHandle::new(move || {
            // SAFETY: `dup` is an open descriptor owned by this closure; shutdown(2) does not
            // touch memory and fails harmlessly with ENOTSOCK on a non-socket.
            unsafe { libc::shutdown(dup.as_raw_fd(), libc::SHUT_RDWR) };
        }))
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

/// A connected stream socket, TCP or unix: what [`SocketTransport`] (and TLS) run on.
pub trait StreamSocket: Read + Write + AsFd + Send + fmt::Debug {
    /// Shuts down one or both directions.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// SO_RCVTIMEO.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Reads into `bufs`, keeping descriptors that came with the bytes in `fds` (a unix
    /// socket; others have none).
    fn read_keeping_fds(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        fds: &mut Vec<OwnedFd>,
    ) -> io::Result<usize> {
        let _ = fds;
        self.read_vectored(bufs)
    }
    /// A unix socket's [`Transport::write_with_fds`]; `None` for a socket that cannot.
    fn write_with_fds(&mut self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Option<io::Result<usize>> {
        let _ = (data, fds);
        None
    }
    /// The user id of the peer process (a unix socket).
    fn peer_uid(&self) -> Option<u32> {
        None
    }
    /// Another descriptor for the same socket.
    fn duplicate(&self) -> io::Result<Self>
    where
        Self: Sized;
}

impl StreamSocket for TcpStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl StreamSocket for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn read_keeping_fds(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        fds: &mut Vec<OwnedFd>,
    ) -> io::Result<usize> {
        crate::fd_passing::recv_with_fds(self, bufs, fds)
    }
    fn write_with_fds(&mut self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Option<io::Result<usize>> {
        Some(crate::fd_passing::send_with_fds(self, data, fds))
    }
    fn peer_uid(&self) -> Option<u32> {
        crate::fd_passing::peer_uid(self)
    }
}

/// A stream socket connection in the clear: `tcp:HOST:PORT` ([`TcpTransport`]) or
/// `unix:PATH` ([`UnixTransport`]).
#[derive(Debug)]
pub struct SocketTransport<S> {
    stream: S,
    uri: String,
    read_timeout: Option<Duration>,
    /// Descriptors the peer passed, not yet taken.
    received: Vec<OwnedFd>,
}

/// A TCP connection (`tcp:HOST:PORT`).
pub type TcpTransport = SocketTransport<TcpStream>;

/// A unix domain socket connection (`unix:PATH`).
pub type UnixTransport = SocketTransport<UnixStream>;

impl SocketTransport<TcpStream> {
    /// Wraps a connected stream. Nagle is turned off: the last small writes of a migration
    /// must not wait for the peer's delayed acknowledgement while the VM is stopped.
    pub fn new(stream: TcpStream, uri: String) -> Self {
        let _ = stream.set_nodelay(true);
        SocketTransport {
            stream,
            uri,
            read_timeout: None,
            received: Vec::new(),
        }
    }
}

impl SocketTransport<UnixStream> {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream, uri: String) -> Self {
        SocketTransport {
            stream,
            uri,
            read_timeout: None,
            received: Vec::new(),
        }
    }
}

impl<S: StreamSocket + 'static> Transport for SocketTransport<S> {
    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(SocketTransport {
            stream: self.stream.duplicate()?,
            uri: self.uri.clone(),
            read_timeout: None,
            received: Vec::new(),
        }))
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        timed(
            self.stream.read_keeping_fds(bufs, &mut self.received),
            self.read_timeout,
        )
    }
    fn write_with_fds(&mut self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        match self.stream.write_with_fds(data, fds) {
            Some(r) => r,
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} cannot pass file descriptors: only a unix: socket can",
                    self.uri
                ),
            )),
        }
    }
    fn take_received_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.received)
    }
    fn peer_uid(&self) -> Option<u32> {
        self.stream.peer_uid()
    }
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.read_timeout = timeout;
        Ok(())
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (self.stream.write_vectored(bufs)).map_err(|e| tls_alert_in_reply(&self.stream, e))
    }
    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        ShutdownHandle::for_socket(&self.stream)
    }
    fn finish(&mut self) -> io::Result<()> {
        half_close(self.stream.shutdown(Shutdown::Write))
    }
    fn limit_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        set_receive_buffer(&self.stream, bytes)
    }
    fn unsent_probe(&self) -> Option<UnsentProbe> {
        UnsentProbe::for_socket(&self.stream)
    }
    fn describe(&self) -> String {
        self.uri.clone()
    }
}

/// After a failed write of a plaintext stream: whether the peer answered with a TLS alert
/// record (`0x15 0x03`), i.e. it is a destination that takes only TLS. Looks only at what
/// has arrived, without consuming it.
fn tls_alert_in_reply(fd: impl AsFd, e: io::Error) -> io::Error {
    let mut b = [0u8; 2];
    // SAFETY: `b` is writable for its 2 bytes during the call, and the descriptor is an
    // open socket borrowed for the call.
    let n = unsafe {
        libc::recv(
            fd.as_fd().as_raw_fd(),
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 2 && b == [0x15, 0x03] {
        return io::Error::new(
            e.kind(),
            format!(
                "{e}: the destination answered with a TLS alert, so it takes only TLS: set tls-creds"
            ),
        );
    }
    e
}

/// A read that timed out (SO_RCVTIMEO gives EAGAIN), said as such.
pub(crate) fn timed(r: io::Result<usize>, timeout: Option<Duration>) -> io::Result<usize> {
    match (r, timeout) {
        (Err(e), Some(t))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no data for {:.1} s: the peer stalled (the timeout is a parameter)",
                    t.as_secs_f64()
                ),
            ))
        }
        (r, _) => r,
    }
}

/// A peer that already closed its side is not an error at the end of a stream.
fn half_close(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Any open file descriptor: a regular file (`file:PATH`) or an inherited descriptor (`fd:N`)
/// that may be a socket or a pipe.
#[derive(Debug)]
pub struct FdTransport {
    file: File,
    uri: String,
    sync_on_finish: bool,
}

impl FdTransport {
    /// Wraps a descriptor. `sync_on_finish` makes [`Transport::finish`] wait until the data
    /// is on stable storage (for snapshots to `file:`).
    pub fn new(fd: OwnedFd, uri: String, sync_on_finish: bool) -> Self {
        FdTransport {
            file: File::from(fd),
            uri,
            sync_on_finish,
        }
    }
}

impl Transport for FdTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.file.write_vectored(bufs)
    }
    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        ShutdownHandle::for_socket(&self.file)
    }
    fn finish(&mut self) -> io::Result<()> {
        if self.sync_on_finish {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }
    fn describe(&self) -> String {
        self.uri.clone()
    }
}

/// A child process run by `sh -c` (`exec:COMMAND`): the stream goes to its stdin (outgoing)
/// or comes from its stdout (incoming).
#[derive(Debug)]
pub struct ExecTransport {
    child: Arc<Mutex<Option<Child>>>,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    uri: String,
}

impl ExecTransport {
    /// Wraps a spawned child; its piped stdin and stdout become the two directions.
    pub fn new(mut child: Child, uri: String) -> Self {
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        ExecTransport {
            child: Arc::new(Mutex::new(Some(child))),
            stdin,
            stdout,
            uri,
        }
    }
}

impl Transport for ExecTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stdout {
            Some(out) => out.read(buf),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the command's stdout is not a migration stream (outgoing exec)",
            )),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.stdin {
            Some(inp) => inp.write_vectored(bufs),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the command's stdin does not take a migration stream (incoming exec)",
            )),
        }
    }
    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        let child = Arc::clone(&self.child);
        Some(ShutdownHandle::new(move || {
            // The child is killed only while it has not been reaped, so the pid cannot have
            // been reused by another process.
            if let Some(c) = child.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                kill_group(c);
            }
        }))
    }
    fn finish(&mut self) -> io::Result<()> {
        // Closing stdin tells the command the stream has ended; then its exit status says
        // whether it took everything. The child stays in the mutex while we wait, so a
        // cancel (the shutdown handle) can still kill a command that hangs.
        drop(self.stdin.take());
        loop {
            let mut g = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = g.as_mut() else { return Ok(()) };
            if let Some(status) = c.try_wait()? {
                g.take();
                if !status.success() {
                    return Err(io::Error::other(format!(
                        "command of {} exited with {status}",
                        self.uri
                    )));
                }
                return Ok(());
            }
            drop(g);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    fn describe(&self) -> String {
        self.uri.clone()
    }
}

/// Kills an exec command and everything it started: it leads its own process group (the
/// pipes may be held by a grandchild, `sh -c 'sleep 30'` say, which killing `sh` alone
/// would leave running and the stream blocked).
fn kill_group(c: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(c.id()) {
        // SAFETY: kill has no memory-safety preconditions; the group is the child's own
        // (spawned with process_group(0)), and the child is not reaped yet, so its id is
        // not reused.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = c.kill();
}

impl Drop for ExecTransport {
    fn drop(&mut self) {
        drop(self.stdin.take());
        drop(self.stdout.take());
        // Reap the child so no zombie is left; a child that still runs after its stream is
        // gone has nothing left to do.
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if let Ok(None) = c.try_wait() {
                kill_group(&mut c);
            }
            let _ = c.wait();
        }
    }
}
