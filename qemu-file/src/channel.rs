//! Opening transports from URIs: `connect` for the outgoing side, `Listener` for the incoming.

use std::fs::{self, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
            let child = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::piped())
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
        match &self.kind {
            ListenerKind::Tcp(l) => ShutdownHandle::for_socket(l),
            ListenerKind::Unix(l, _) => ShutdownHandle::for_socket(l),
            ListenerKind::Ready(t) => t.shutdown_handle(),
        }
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
