//! Opening transports from URIs: `connect` for the outgoing side, `Listener` for the incoming.

use std::fs::{self, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::classify::{InFlight, Incoming, MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC};
use crate::transport::{ExecTransport, FdTransport, ShutdownHandle, TcpTransport, UnixTransport};
use crate::{Error, MigrationUri, Result, Transport, bind_private};

/// Opens the outgoing side of a migration: connects, spawns `sh -c`, opens the descriptor or
/// creates the file.
///
/// # Errors
/// [`Error::Open`] naming the URI when the peer is not listening, the command cannot be
/// started, the descriptor is not open or the file cannot be created.
pub fn connect(uri: &MigrationUri) -> Result<Box<dyn Transport>> {
    let text = uri.to_string();
    Ok(match uri {
        MigrationUri::Tcp { host, port } => {
            let addrs = resolve(host, *port).map_err(|e| Error::open("resolve", &text, e))?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect(a) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let stream = stream.ok_or_else(|| Error::open("connect to", &text, last))?;
            Box::new(TcpTransport::new(stream, text))
        }
        MigrationUri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| Error::open("connect to", &text, e))?;
            Box::new(UnixTransport::new(s, text))
        }
        MigrationUri::Fd(fd) => Box::new(FdTransport::new(take_fd(*fd, &text)?, text, false)),
        MigrationUri::Exec(cmd) => {
            // Its own process group, so a cancel kills whatever the command started too.
            let child = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::piped())
                .process_group(0)
                .spawn()
                .map_err(|e| Error::open("start", &text, e))?;
            Box::new(ExecTransport::new(child, text))
        }
        MigrationUri::File(path) => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| Error::open("create", &text, e))?;
            Box::new(FdTransport::new(OwnedFd::from(f), text, true))
        }
    })
}

fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the host has no address",
        ));
    }
    Ok(addrs)
}

/// Takes ownership of an inherited descriptor after checking that it is open and that no
/// earlier `fd:N` took it: once used (and closed), the number may belong to another file.
fn take_fd(fd: RawFd, uri: &str) -> Result<OwnedFd> {
    static TAKEN: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    if taken.contains(&fd) {
        return Err(Error::open(
            "use",
            uri,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "this descriptor was already used by an earlier migration; pass a new one",
            ),
        ));
    }
    // SAFETY: F_GETFD only queries the descriptor table; it reads no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::open("use", uri, io::Error::last_os_error()));
    }
    taken.push(fd);
    // SAFETY: the descriptor is open (checked above), no earlier `fd:` took it, and the
    // user handed it to the migration by naming it in the URI, so from here on the
    // migration owns and closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The incoming side of a migration, bound before the source starts: one connection is
/// accepted and then the listener is closed (a destination takes exactly one stream).
#[derive(Debug)]
pub struct Listener {
    uri: MigrationUri,
    kind: ListenerKind,
    /// Connections accepted and not yet told apart, which a shutdown also ends.
    in_flight: InFlight,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener, UnixSocketFile),
    Ready(Box<dyn Transport>),
}

/// Removes the socket path when the listener goes away.
#[derive(Debug)]
struct UnixSocketFile(PathBuf);

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds the incoming side: listens on tcp or unix (socket mode 0600), or opens the
    /// descriptor, the file or the command's stdout at once.
    ///
    /// # Errors
    /// [`Error::Open`] naming the URI: address in use, a non-socket file in the way of a unix
    /// path, a missing file, a command that cannot start.
    pub fn bind(uri: &MigrationUri) -> Result<Listener> {
        let text = uri.to_string();
        let kind = match uri {
            MigrationUri::Tcp { host, port } => {
                let addrs = resolve(host, *port).map_err(|e| Error::open("resolve", &text, e))?;
                let l = TcpListener::bind(&addrs[..])
                    .map_err(|e| Error::open("listen on", &text, e))?;
                ListenerKind::Tcp(l)
            }
            MigrationUri::Unix(path) => {
                remove_stale_socket(path).map_err(|e| Error::open("listen on", &text, e))?;
                let l = bind_private(path).map_err(|e| Error::open("listen on", &text, e))?;
                let file = UnixSocketFile(path.clone());
                ListenerKind::Unix(l, file)
            }
            MigrationUri::Fd(fd) => ListenerKind::Ready(Box::new(FdTransport::new(
                take_fd(*fd, &text)?,
                text,
                false,
            ))),
            MigrationUri::Exec(cmd) => {
                let child = Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .process_group(0)
                    .spawn()
                    .map_err(|e| Error::open("start", &text, e))?;
                ListenerKind::Ready(Box::new(ExecTransport::new(child, text)))
            }
            MigrationUri::File(path) => {
                let f = fs::File::open(path).map_err(|e| Error::open("open", &text, e))?;
                ListenerKind::Ready(Box::new(FdTransport::new(OwnedFd::from(f), text, false)))
            }
        };
        Ok(Listener {
            uri: uri.clone(),
            kind,
            in_flight: InFlight::default(),
        })
    }

    /// The URI a source should use, with the port the system picked for `tcp:HOST:0`.
    pub fn local_uri(&self) -> MigrationUri {
        match (&self.kind, &self.uri) {
            (ListenerKind::Tcp(l), MigrationUri::Tcp { host, .. }) => match l.local_addr() {
                Ok(a) => MigrationUri::Tcp {
                    host: host.clone(),
                    port: a.port(),
                },
                Err(_) => self.uri.clone(),
            },
            _ => self.uri.clone(),
        }
    }

    /// A handle that makes a blocked [`Listener::accept`] return an error (to give up
    /// waiting for a source).
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        let own = match &self.kind {
            ListenerKind::Tcp(l) => ShutdownHandle::for_socket(l),
            ListenerKind::Unix(l, _) => ShutdownHandle::for_socket(l),
            ListenerKind::Ready(t) => t.shutdown_handle(),
        }?;
        let in_flight = self.in_flight.clone();
        Some(ShutdownHandle::new(move || {
            own.shutdown();
            in_flight.shutdown();
        }))
    }

    /// Waits for the one incoming stream and stops listening.
    ///
    /// # Errors
    /// [`Error::Open`] when accepting fails or the listener was shut down.
    pub fn accept(self) -> Result<Box<dyn Transport>> {
        let text = self.uri.to_string();
        match self.kind {
            ListenerKind::Tcp(l) => {
                let (s, peer) = l.accept().map_err(|e| Error::open("accept on", &text, e))?;
                Ok(Box::new(TcpTransport::new(
                    s,
                    format!("{text} (from {peer})"),
                )))
            }
            ListenerKind::Unix(l, _file) => {
                let (s, _) = l.accept().map_err(|e| Error::open("accept on", &text, e))?;
                Ok(Box::new(UnixTransport::new(s, text)))
            }
            ListenerKind::Ready(t) => Ok(t),
        }
    }

    /// Waits for the one incoming stream, completes a TLS handshake with it as a server
    /// (`creds`), and stops listening: nothing of the stream is read before the peer has
    /// proven who it is.
    ///
    /// # Errors
    /// [`Error::Open`] as [`Listener::accept`], a URI other than `tcp:` or `unix:`, or
    /// [`Error::Tls`] naming the check that failed.
    pub fn accept_tls(self, creds: &crate::TlsCreds) -> Result<Box<dyn Transport>> {
        let text = self.uri.to_string();
        match self.kind {
            ListenerKind::Tcp(l) => {
                let (s, peer) = l.accept().map_err(|e| Error::open("accept on", &text, e))?;
                crate::tls::accept_tcp(creds, s, format!("{text} (from {peer})"))
            }
            ListenerKind::Unix(l, _file) => {
                let (s, _) = l.accept().map_err(|e| Error::open("accept on", &text, e))?;
                crate::tls::accept_unix(creds, s, text)
            }
            ListenerKind::Ready(_) => Err(Error::Tls {
                peer: text,
                reason: "TLS needs a tcp: or unix: URI".into(),
            }),
        }
    }

    /// Waits for `count` connections (`tcp:` and `unix:` only) and stops listening,
    /// telling them apart by the order in which they come, each over TLS with `tls` (a
    /// server's credentials), its handshake complete before the next is accepted. QEMU
    /// 7.2's post-copy preempt works so: the main stream, then a connection that opens
    /// with nothing of its own. A connection after the first that does not come within
    /// `then` is an error (a source that does not open as many).
    ///
    /// # Errors
    /// As [`Listener::accept`] and [`Listener::accept_tls`]; a URI other than `tcp:` or
    /// `unix:`; a connection that does not come in time.
    pub fn accept_in_order(
        self,
        count: usize,
        tls: Option<&crate::TlsCreds>,
        then: std::time::Duration,
    ) -> Result<Vec<Box<dyn Transport>>> {
        let text = self.uri.to_string();
        let mut out: Vec<Box<dyn Transport>> = Vec::with_capacity(count);
        for i in 0..count {
            if i > 0 {
                let fd = match &self.kind {
                    ListenerKind::Tcp(l) => l.as_raw_fd(),
                    ListenerKind::Unix(l, _) => l.as_raw_fd(),
                    ListenerKind::Ready(_) => -1,
                };
                if fd >= 0 && !readable_within(fd, then) {
                    return Err(Error::open(
                        "accept on",
                        &text,
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "{i} connection(s) came and connection {} did not within {} ms: \
                                 does the source open as many (postcopy-preempt on both sides)?",
                                i + 1,
                                then.as_millis()
                            ),
                        ),
                    ));
                }
            }
            let t: Box<dyn Transport> = match &self.kind {
                ListenerKind::Tcp(l) => {
                    let (s, peer) = l.accept().map_err(|e| Error::open("accept on", &text, e))?;
                    let name = format!("{text} (from {peer})");
                    match tls {
                        Some(c) => crate::tls::accept_tcp(c, s, name)?,
                        None => Box::new(TcpTransport::new(s, name)),
                    }
                }
                ListenerKind::Unix(l, _) => {
                    let (s, _) = l.accept().map_err(|e| Error::open("accept on", &text, e))?;
                    match tls {
                        Some(c) => crate::tls::accept_unix(c, s, text.clone())?,
                        None => Box::new(UnixTransport::new(s, text.clone())),
                    }
                }
                ListenerKind::Ready(_) => {
                    return Err(Error::open(
                        "accept on",
                        &text,
                        io::Error::other(format!("{count} connections need a tcp: or unix: URI")),
                    ));
                }
            };
            out.push(t);
        }
        Ok(out)
    }

    /// Waits for a main stream and `channels` multifd channels (`tcp:` and `unix:` only),
    /// in any order: a connection whose first bytes are "QEVM" is the main stream, any
    /// other a channel (its opening message is checked by whoever reads it). With 0
    /// channels this is [`Listener::accept`]; with channels, the listener is given back,
    /// still listening, so that a connection too many (a source with more channels) can
    /// be noticed.
    ///
    /// # Errors
    /// [`Error::Open`]: accepting fails or the listener was shut down, a connection closes
    /// before its first 4 bytes, two main streams or none, or a URI that cannot carry
    /// several connections.
    pub fn accept_with_channels(self, channels: usize) -> Result<Accepted> {
        self.accept_connections(channels, None)
    }

    /// As [`Listener::accept_with_channels`], each connection over TLS (`creds`, a
    /// server's): every handshake completes before a byte of what the connection carries
    /// is read, and the connections are told apart by their first decrypted bytes. The
    /// handshakes run side by side, as a source may open its channels before its main
    /// stream has sent a byte.
    ///
    /// # Errors
    /// As [`Listener::accept_with_channels`], and [`Error::Tls`] naming the check that
    /// failed on any of the connections.
    pub fn accept_tls_with_channels(
        self,
        channels: usize,
        creds: &crate::TlsCreds,
    ) -> Result<Accepted> {
        self.accept_connections(channels, Some(creds))
    }

    fn accept_connections(
        self,
        channels: usize,
        tls: Option<&crate::TlsCreds>,
    ) -> Result<Accepted> {
        if channels == 0 {
            let main = match tls {
                Some(c) => self.accept_tls(c)?,
                None => self.accept()?,
            };
            return Ok(Accepted {
                main,
                channels: Vec::new(),
                listener: None,
            });
        }
        let text = self.uri.to_string();
        let refuse = |why: String| Error::open("accept on", &text, io::Error::other(why));
        let sockets = match &self.kind {
            ListenerKind::Tcp(l) => l.try_clone().map(Incoming::Tcp),
            ListenerKind::Unix(l, _) => l.try_clone().map(Incoming::Unix),
            ListenerKind::Ready(_) => {
                return Err(refuse(format!(
                    "multifd needs a tcp: or unix: URI, where {channels} more connections can be accepted"
                )));
            }
        }
        .map_err(|e: io::Error| Error::open("accept on", &text, e))?;
        let results = sockets.accept_classified(
            channels + 1,
            tls.cloned(),
            text.clone(),
            self.in_flight.clone(),
        );
        let mut main = None;
        let mut extra = Vec::new();
        let classified = (|| {
            for _ in 0..=channels {
                let (magic, t) = results
                    .recv()
                    .map_err(|_| refuse("the accepting thread ended early".into()))??;
                if magic == MULTIFD_MAGIC {
                    extra.push(t);
                } else if magic != QEMU_VM_FILE_MAGIC {
                    // Neither kind: a stray client, not a channel with a bad header.
                    let tls_hint = if magic >> 16 == 0x1603 {
                        ": it opens a TLS handshake, so the source uses TLS (tls-creds) and this side does not"
                    } else {
                        ""
                    };
                    return Err(refuse(format!(
                        "a connection opened with {magic:#010x}, neither a migration stream \
                         (\"QEVM\") nor a multifd channel ({MULTIFD_MAGIC:#010x}){tls_hint}"
                    )));
                } else if main.is_none() {
                    main = Some(t);
                } else {
                    return Err(refuse(
                        "two connections both opened a main migration stream".into(),
                    ));
                }
            }
            Ok(())
        })();
        if let Err(e) = classified {
            // The accepting thread and the handshakes still running end with us.
            if let Some(h) = self.shutdown_handle() {
                h.shutdown();
            }
            return Err(e);
        }
        self.in_flight.clear();
        let main = main.ok_or_else(|| {
            refuse(format!(
                "all {} connections were multifd channels; none opened the main stream (is the source set up for {channels} channels?)",
                channels + 1
            ))
        })?;
        Ok(Accepted {
            main,
            channels: extra,
            listener: Some(self),
        })
    }
}

/// A migration's extra connections (multifd channels).
pub type Channels = Vec<Box<dyn Transport>>;

/// What [`Listener::accept_with_channels`] accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The main stream.
    pub main: Box<dyn Transport>,
    /// The channels, in the order they were told apart (any: each names itself in its
    /// opening message).
    pub channels: Channels,
    /// The listener, still bound, when channels were accepted.
    pub listener: Option<Listener>,
}

/// A socket left by a process that died is in the way of bind; anything else at the path is
/// the user's and is not removed.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is at that path",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a listening socket has a connection to accept within `timeout` (or was shut
/// down: the accept then says so).
fn readable_within(fd: RawFd, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, valid for the call; the descriptor is the listener's, open.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return r != 0;
        }
    }
}
