//! A fault-injecting proxy between a migration source and its destination: it forwards
//! the stream (and the destination's answers) until a set number of stream bytes, then
//! cuts the connection or stalls it, so a test can fail a migration at a chosen point of
//! the stream and then act (kill a process, cancel) while the source is blocked there.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What happens once `at` stream bytes were forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Both connections are shut down: the source's write and the destination's read fail.
    Cut,
    /// Nothing more is forwarded in either direction; the source blocks once the socket
    /// buffers are full, the destination waits.
    Stall,
    /// The stream's last `n` bytes are held back: when the source has sent everything
    /// (and half-closed), both connections are cut, so the source wrote its last byte
    /// and the destination never got it.
    HoldTail(usize),
    /// The whole stream goes through; the destination's answer does not: held `delay`,
    /// then both connections are cut (a zero delay cuts as the answer arrives).
    CutAnswer(Duration),
    /// The whole stream goes through; the destination's answer is dropped and the
    /// connections stay open.
    DropAnswer,
}

/// The proxy: a unix socket the source connects to, a TCP connection to the destination.
#[derive(Debug)]
pub struct FaultProxy {
    path: PathBuf,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Stream bytes forwarded to the destination.
    forwarded: AtomicU64,
    /// Bytes forwarded to the destination on the further connections.
    forwarded_further: AtomicU64,
    /// Set when the fault happened; `fired_cond` is notified.
    fired: Mutex<bool>,
    fired_cond: Condvar,
    /// Set once either side closed or failed.
    closed: AtomicBool,
    /// Both connections, once accepted (to shut them down).
    conns: Mutex<Vec<Conn>>,
}

#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Shared {
    fn fire(&self) {
        *self.fired.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.fired_cond.notify_all();
    }

    fn cut(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            c.shutdown();
        }
    }
}

impl FaultProxy {
    /// Listens on the unix socket `path` and, once the source connects, connects to the
    /// destination at `dest` (`HOST:PORT`); applies `fault` after `at` stream bytes.
    pub fn start(path: &Path, dest: &str, at: u64, fault: Fault) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let dest = dest.to_string();
        std::thread::spawn(move || {
            // The main stream: the faults apply to it.
            let Ok((src, _)) = listener.accept() else {
                return;
            };
            let Some((src, dst, src2, dst2)) = connect_pair(src, &dest, &sh) else {
                return;
            };
            let back = sh.clone();
            // The destination's answers (the return path), until the fault.
            std::thread::spawn(move || answers(dst2, src2, &back, fault));
            let main = sh.clone();
            std::thread::spawn(move || forward(src, dst, &main, at, fault));
            // Further connections of the migration (post-copy's preempt one), connected
            // in the order they come, forwarded as they are, cut with the main one.
            accept_more(&listener, &dest, &sh);
        });
        Ok(FaultProxy {
            path: path.to_path_buf(),
            shared,
        })
    }

    /// `unix:PATH`, for the source's `migrate`.
    pub fn uri(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// Waits until the fault happened; false on timeout.
    pub fn wait_fired(&self, timeout: Duration) -> bool {
        let t = Instant::now();
        let mut fired = self.shared.fired.lock().unwrap_or_else(|p| p.into_inner());
        while !*fired {
            let Some(left) = timeout.checked_sub(t.elapsed()) else {
                return false;
            };
            fired = self
                .shared
                .fired_cond
                .wait_timeout(fired, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Stream bytes forwarded so far (the main stream's).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Bytes forwarded to the destination so far on every connection.
    pub fn forwarded_all(&self) -> u64 {
        self.forwarded() + self.shared.forwarded_further.load(Ordering::SeqCst)
    }

    /// Shuts both connections down (a cut after a stall).
    pub fn cut(&self) {
        self.shared.cut();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.cut();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Destination to source: the return path. Its messages (be16 type, be16 length, body)
/// go through as they come, but its answer, the load's verdict (`MIG_RP_MSG_SHUT`, with
/// the reason that may precede it), meets `CutAnswer` or `DropAnswer`; the PONGs before
/// it (the setup's, the one the source waits for before it stops the guest) and
/// post-copy's requests are not the answer. After a `Stall` nothing goes through. (The
/// answer faults read the messages in the clear: not for a migration over TLS.)
fn answers(mut from: TcpStream, mut to: UnixStream, sh: &Shared, fault: Fault) {
    const SHUT: u16 = 1;
    const REASON: u16 = 0x7f01;
    let answer_faults = matches!(fault, Fault::CutAnswer(_) | Fault::DropAnswer);
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if *sh.fired.lock().unwrap_or_else(|p| p.into_inner()) {
            // Stalled or answered: hold the rest back (and keep reading, so an EOF
            // still shows).
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        // Forward the whole messages before the answer; stop at the answer. Other
        // faults forward the bytes as they come (they may be TLS records).
        let mut through = if answer_faults { 0 } else { pending.len() };
        let mut answer = false;
        while pending.len() - through >= 4 {
            let ty = u16::from_be_bytes([pending[through], pending[through + 1]]);
            let len = u16::from_be_bytes([pending[through + 2], pending[through + 3]]);
            if ty == SHUT || ty == REASON {
                answer = true;
                break;
            }
            let end = through + 4 + usize::from(len);
            if pending.len() < end {
                break;
            }
            through = end;
        }
        if to.write_all(&pending[..through]).is_err() {
            break;
        }
        pending.drain(..through);
        if answer {
            sh.fire();
            match fault {
                Fault::CutAnswer(delay) => {
                    std::thread::sleep(delay);
                    sh.cut();
                    return;
                }
                // Dropped: the connections stay open, nothing more goes through.
                _ => continue,
            }
        }
    }
    // The destination went away (its kernel closes the connection, whatever the link):
    // so does the source's connection.
    sh.cut();
}

/// Connects the source's connection `src` to `dest`, both registered to be cut; returns
/// each twice (one handle per direction), or None (`src` shut down) if that fails.
fn connect_pair(
    src: UnixStream,
    dest: &str,
    sh: &Shared,
) -> Option<(UnixStream, TcpStream, UnixStream, TcpStream)> {
    let Ok(dst) = TcpStream::connect(dest) else {
        let _ = src.shutdown(Shutdown::Both);
        return None;
    };
    let (src2, dst2, src3, dst3) = (
        src.try_clone().ok()?,
        dst.try_clone().ok()?,
        src.try_clone().ok()?,
        dst.try_clone().ok()?,
    );
    sh.conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend([Conn::Unix(src3), Conn::Tcp(dst3)]);
    Some((src, dst, src2, dst2))
}

/// Accepts the migration's further connections until the proxy is cut or dropped,
/// each connected to `dest` and forwarded both ways untouched.
fn accept_more(listener: &UnixListener, dest: &str, sh: &Arc<Shared>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !sh.closed.load(Ordering::SeqCst) {
        let src = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => return,
        };
        if src.set_nonblocking(false).is_err() {
            continue;
        }
        let Some((src, dst, src2, dst2)) = connect_pair(src, dest, sh) else {
            continue;
        };
        if sh.closed.load(Ordering::SeqCst) {
            sh.cut();
        }
        let counted = sh.clone();
        std::thread::spawn(move || copy(src, dst, Some(&counted.forwarded_further)));
        std::thread::spawn(move || copy(dst2, src2, None));
    }
}

/// Copies until either side ends, counting into `count`.
fn copy(mut from: impl Read, mut to: impl Write, count: Option<&AtomicU64>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
        if let Some(c) = count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

/// Source to destination, all but the last `tail` bytes: when the source ends its
/// stream, both connections are cut. Bytes held while the source sent nothing for
/// [`TAIL_IDLE`] go through: the source is waiting for an answer to them (the PING it
/// sends before it stops the guest), so they were not the stream's end.
fn hold_tail(mut src: UnixStream, mut dst: TcpStream, sh: &Shared, tail: usize) {
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    if src.set_read_timeout(Some(TAIL_IDLE)).is_err() {
        sh.cut();
        return;
    }
    loop {
        let keep = match src.read(&mut buf) {
            Ok(0) => {
                sh.fire();
                sh.cut();
                return;
            }
            Ok(n) => {
                held.extend_from_slice(&buf[..n]);
                tail
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 0,
            Err(_) => {
                sh.fire();
                sh.cut();
                return;
            }
        };
        if held.len() > keep {
            let out = held.len() - keep;
            if dst.write_all(&held[..out]).is_err() {
                sh.cut();
                return;
            }
            held.drain(..out);
            sh.forwarded.fetch_add(out as u64, Ordering::SeqCst);
        }
    }
}

/// How long the source may be silent before [`hold_tail`] lets the held bytes go.
const TAIL_IDLE: Duration = Duration::from_millis(200);

/// Source to destination: exactly `at` bytes, then the fault.
fn forward(mut src: UnixStream, mut dst: TcpStream, sh: &Shared, at: u64, fault: Fault) {
    if let Fault::HoldTail(n) = fault {
        return hold_tail(src, dst, sh, n);
    }
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let done = sh.forwarded.load(Ordering::SeqCst);
        let room = at.saturating_sub(done).min(buf.len() as u64) as usize;
        if room == 0 {
            sh.fire();
            match fault {
                // Stop reading: the source's writes block once the buffers are full.
                Fault::Stall => {}
                _ => sh.cut(),
            }
            return;
        }
        let n = match src.read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // The source ended its stream: so does the destination's, whose answer
                // may still come back.
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if dst.write_all(&buf[..n]).is_err() {
            sh.cut();
            return;
        }
        sh.forwarded.fetch_add(n as u64, Ordering::SeqCst);
    }
}
