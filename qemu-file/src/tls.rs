//! TLS on a migration connection, set up as QEMU's `tls-creds-x509` object sets it up: a
//! directory with QEMU's file names (`ca-cert.pem`; `server-cert.pem` and
//! `server-key.pem` for a destination; `client-cert.pem` and `client-key.pem` for a
//! source), an endpoint, and whether the peer's certificate is verified. TLS 1.3 and 1.2
//! through rustls (ring), no OpenSSL.
//!
//! The handshake completes before a transport is handed out, so nothing of a stream is
//! read from a peer that has not proven who it is; a refusal says which check failed
//! (unknown CA, expired, wrong host name, no certificate, not authorized by
//! [`TlsCreds::with_authz`], a peer without TLS).
//!
//! Throughput: a write of many slices (headers and guest pages) becomes records of up
//! to 16 KiB in one go, and reads take 256 KiB from the socket at a time. rustls copies
//! each record into a buffer of its own before sealing it; with glibc, keep the heap top
//! (`mallopt(M_TRIM_THRESHOLD, 64 MiB)`, as vmm does) or those buffers are faulted in
//! again at every burst. `cargo bench -p qemu-file --bench tls` measures TLS against
//! the clear stream.
//!
//! ```no_run
//! use qemu_file::{Listener, MigrationUri, QemuFile, TlsCreds, TlsEndpoint, connect_tls};
//! use std::path::Path;
//!
//! let server = TlsCreds::load(Path::new("/etc/pki/qemu"), TlsEndpoint::Server, true)?;
//! let l = Listener::bind(&MigrationUri::parse("tcp:0.0.0.0:4444")?)?;
//! let stream = QemuFile::new(l.accept_tls(&server)?);
//!
//! let client = TlsCreds::load(Path::new("/etc/pki/qemu"), TlsEndpoint::Client, true)?;
//! let out = connect_tls(&MigrationUri::parse("tcp:dest.example:4444")?, &client, None)?;
//! # Ok::<(), qemu_file::Error>(())
//! ```

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, ServerConnection, SignatureScheme, StreamOwned,
};

use crate::authz::Authz;
use crate::dn::subject_name;
use crate::transport::{ShutdownHandle, StreamSocket, Transport, UnsentProbe};
use crate::{Error, MigrationUri, Result};

/// Which side of the handshake credentials are for (QEMU's `endpoint=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// A destination: it listens.
    Server,
    /// A source: it connects.
    Client,
}

/// x509 credentials for one side, loaded from a QEMU-style directory.
#[derive(Clone)]
pub struct TlsCreds {
    dir: PathBuf,
    verify_peer: bool,
    handshake_timeout: Duration,
    roots: Arc<RootCertStore>,
    authz: Option<Arc<Authz>>,
    config: Config,
}

#[derive(Clone)]
enum Config {
    Server(Arc<ServerConfig>),
    Client(Arc<ClientConfig>),
}

impl fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCreds")
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint())
            .field("authz", &self.authz.as_ref().map(|a| &a.id))
            .finish()
    }
}

fn tls_error(peer: &str, reason: impl Into<String>) -> Error {
    Error::Tls {
        peer: peer.to_string(),
        reason: reason.into(),
    }
}

/// How long a handshake waits for the peer's next message, unless set otherwise: a
/// migration's handshake takes milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// ring (it builds with the C compiler alone), whose key exchanges are classical: QEMU
/// 7.2's GnuTLS peers negotiate those too.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsCreds {
    /// Loads the credentials in `dir` for `endpoint`. A server with `verify_peer` asks
    /// its client for a certificate signed by `ca-cert.pem`; a client always checks the
    /// server's (a source that would send guest memory to anyone is not offered).
    ///
    /// # Errors
    /// A file is missing or not PEM, a key does not match, or `verify_peer` is off on a
    /// client.
    pub fn load(dir: &Path, endpoint: TlsEndpoint, verify_peer: bool) -> Result<Self> {
        let what = dir.display().to_string();
        let mut roots = RootCertStore::empty();
        for c in certs(dir, "ca-cert.pem")? {
            roots
                .add(c)
                .map_err(|e| tls_error(&what, format!("ca-cert.pem: {e}")))?;
        }
        let roots = Arc::new(roots);
        let bad = |e: rustls::Error| tls_error(&what, e.to_string());
        let config = match endpoint {
            TlsEndpoint::Server => Config::Server(server_config(dir, &roots, verify_peer, None)?),
            TlsEndpoint::Client => {
                if !verify_peer {
                    return Err(tls_error(
                        &what,
                        "verify-peer=off on a client would send guest memory to any destination: not offered",
                    ));
                }
                let b = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(bad)?
                    .with_root_certificates(roots.clone());
                let c = if dir.join("client-cert.pem").exists() {
                    b.with_client_auth_cert(
                        certs(dir, "client-cert.pem")?,
                        key(dir, "client-key.pem")?,
                    )
                    .map_err(bad)?
                } else {
                    b.with_no_client_auth()
                };
                Config::Client(Arc::new(c))
            }
        };
        Ok(TlsCreds {
            dir: dir.to_path_buf(),
            verify_peer,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            roots,
            authz: None,
            config,
        })
    }

    /// The same server credentials, letting in only a source whose certificate's
    /// distinguished name `authz` allows (the `tls-authz` parameter). The check is part
    /// of the handshake: a refused source gets an `access_denied` alert.
    ///
    /// # Errors
    /// The credentials are a client's, or `verify-peer` is off (there would be no
    /// certificate to check), or the server files no longer load.
    pub fn with_authz(&self, authz: Authz) -> Result<Self> {
        let what = self.dir.display().to_string();
        if self.endpoint() != TlsEndpoint::Server {
            return Err(tls_error(
                &what,
                "tls-authz checks the source's certificate: it needs a destination's credentials (endpoint=server)",
            ));
        }
        if !self.verify_peer {
            return Err(tls_error(
                &what,
                format!(
                    "tls-authz '{}' needs verify-peer=on: without it the source presents no certificate to authorize",
                    authz.id
                ),
            ));
        }
        let authz = Arc::new(authz);
        let config = server_config(&self.dir, &self.roots, true, Some(authz.clone()))?;
        Ok(TlsCreds {
            authz: Some(authz),
            config: Config::Server(config),
            ..self.clone()
        })
    }

    /// How long a handshake with these credentials waits for the peer's next message
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`] unless set): a peer that connects and says nothing
    /// (a port scan, a client holding the one connection a destination takes) is refused
    /// after it rather than waited for.
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// The side these credentials are for.
    pub fn endpoint(&self) -> TlsEndpoint {
        match self.config {
            Config::Server(_) => TlsEndpoint::Server,
            Config::Client(_) => TlsEndpoint::Client,
        }
    }
}

fn server_config(
    dir: &Path,
    roots: &Arc<RootCertStore>,
    verify_peer: bool,
    authz: Option<Arc<Authz>>,
) -> Result<Arc<ServerConfig>> {
    let what = dir.display().to_string();
    let bad = |e: rustls::Error| tls_error(&what, e.to_string());
    let b = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad)?;
    let b = if verify_peer {
        let ca = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| tls_error(&what, e.to_string()))?;
        match authz {
            Some(authz) => b.with_client_cert_verifier(Arc::new(AuthzVerifier { ca, authz })),
            None => b.with_client_cert_verifier(ca),
        }
    } else {
        b.with_no_client_auth()
    };
    let mut c = b
        .with_single_cert(certs(dir, "server-cert.pem")?, key(dir, "server-key.pem")?)
        .map_err(bad)?;
    // No session tickets: a migration connection is never resumed, and a ticket the
    // source never reads would make its close reset the connection (RST) under data the
    // destination has not read yet.
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

thread_local! {
    /// The name the last authorization check on this thread refused. The check runs
    /// inside the handshake, on the thread that drives it, which reads this to say whom
    /// it refused (rustls carries only the alert).
    static REFUSED: std::cell::RefCell<Option<(String, String)>> = const { std::cell::RefCell::new(None) };
}

/// Checks a source's certificate against the CA, then its name against `tls-authz`.
#[derive(Debug)]
struct AuthzVerifier {
    ca: Arc<dyn ClientCertVerifier>,
    authz: Arc<Authz>,
}

impl ClientCertVerifier for AuthzVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.ca.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self.ca.verify_client_cert(end_entity, intermediates, now)?;
        let name = subject_name(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(io::Error::other(format!("its subject does not parse: {e}"))),
            )))
        })?;
        if self.authz.is_allowed(&name) {
            return Ok(verified);
        }
        REFUSED.with(|r| *r.borrow_mut() = Some((name, self.authz.id.clone())));
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.ca.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.ca.supported_verify_schemes()
    }
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let path = dir.join(name);
    let shown = path.display().to_string();
    let list: Vec<_> = CertificateDer::pem_file_iter(&path)
        .map_err(|e| tls_error(&shown, e.to_string()))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_error(&shown, e.to_string()))?;
    if list.is_empty() {
        return Err(tls_error(&shown, "no certificate in the file"));
    }
    Ok(list)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>> {
    let path = dir.join(name);
    let shown = path.display().to_string();
    PrivateKeyDer::from_pem_file(&path).map_err(|e| tls_error(&shown, e.to_string()))
}

/// The socket under a TLS session.
type Socket = Box<dyn StreamSocket>;

/// The socket as TLS sees it: reads come from a large buffer filled by one `read` at a
/// time (rustls asks for 4 KiB at most: without it, a syscall per 4 KiB), writes go
/// straight through.
#[derive(Debug)]
struct Wire {
    sock: Socket,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// How much one read from the socket may bring.
const WIRE_READ: usize = 256 << 10;

impl Wire {
    fn new(sock: Socket) -> Self {
        Wire {
            sock,
            buf: vec![0u8; WIRE_READ].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// What was read from the socket and not yet handed to TLS.
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl Read for Wire {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                return self.sock.read(out);
            }
            self.end = self.sock.read(&mut self.buf)?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.sock.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Session {
    Client(StreamOwned<ClientConnection, Wire>),
    Server(StreamOwned<ServerConnection, Wire>),
}

/// A migration stream over TLS. [`Transport::try_clone`] gives a second handle on the
/// same session, for a post-copy return path (one thread reads while another writes).
pub struct TlsTransport {
    shared: Arc<Shared>,
    uri: String,
    read_timeout: Option<Duration>,
}

/// The session the handles of one connection share.
struct Shared {
    // Lock: every use of the session, by each handle's thread. With one handle a read
    // may wait for the socket under it; once there are two (`split`), it is held only
    // while rustls works, never while waiting for the socket.
    session: Mutex<Session>,
    /// A second handle exists: the socket does not block, and each handle waits for it
    /// with poll(2), outside the lock.
    split: AtomicBool,
    /// The socket, for poll(2), shutdown(2) and socket options from any thread.
    fd: OwnedFd,
}

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTransport")
            .field("uri", &self.uri)
            .finish()
    }
}

impl TlsTransport {
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.shared
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn split(&self) -> bool {
        self.shared.split.load(Ordering::Acquire)
    }

    /// A read of a shared session: what rustls has, else a wait for the socket.
    fn read_split(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        loop {
            let ready = match &mut *self.session() {
                Session::Client(s) => read_now(&mut s.conn, &mut s.sock, buf),
                Session::Server(s) => read_now(&mut s.conn, &mut s.sock, buf),
            };
            if let Some(r) = ready {
                return r;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO)
                || !wait_for(self.shared.fd.as_fd(), libc::POLLIN, left)?
            {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    /// A write on a shared session: encrypted under the lock, sent as the socket takes it.
    fn write_split(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = match &mut *self.session() {
            Session::Client(s) => s.conn.writer().write_vectored(bufs)?,
            Session::Server(s) => s.conn.writer().write_vectored(bufs)?,
        };
        self.flush_split()?;
        Ok(n)
    }

    /// Sends what the shared session has encrypted, waiting for the socket as needed.
    fn flush_split(&mut self) -> io::Result<()> {
        loop {
            let sent = match &mut *self.session() {
                Session::Client(s) => write_now(&mut s.conn, &mut s.sock),
                Session::Server(s) => write_now(&mut s.conn, &mut s.sock),
            }?;
            if sent {
                return Ok(());
            }
            wait_for(self.shared.fd.as_fd(), libc::POLLOUT, None)?;
        }
    }
}

/// Without waiting: plaintext if the session has some, else the ciphertext the socket
/// has, processed. None: nothing yet, the socket must be waited for.
fn read_now<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    wire: &mut Wire,
    buf: &mut [u8],
) -> Option<io::Result<usize>> {
    loop {
        match conn.reader().read(buf) {
            Ok(n) => return Some(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // A close without close_notify, as QEMU 7.2 ends its TLS streams.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Some(Ok(0)),
            Err(e) => return Some(Err(explain(e))),
        }
        match conn.read_tls(wire) {
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    return Some(Err(explain(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
                // What the session must answer (an alert, a key update) goes if it can;
                // the writer sends the rest.
                let _ = write_now(conn, wire);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Sends what the session has encrypted, as far as the socket takes it without waiting;
/// whether all went.
fn write_now<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    wire: &mut Wire,
) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(wire) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Waits until `fd` is ready for `events` (or in error, or shut down) or `timeout`
/// passed; whether it is ready.
fn wait_for(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let ms = timeout.map_or(-1, |t| {
        t.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
    });
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd, alive for the call; the descriptor is borrowed.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes the socket `fd` non-blocking.
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL on a borrowed open descriptor touches no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why a handshake failed, in words an operator can act on.
fn handshake_error(peer: &str, side: TlsEndpoint, waited: Duration, e: io::Error) -> Error {
    let them = match side {
        TlsEndpoint::Client => "the destination's certificate",
        TlsEndpoint::Server => "the source's certificate",
    };
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("{them} is not signed by our CA (ca-cert.pem)")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("{them} has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("{them} is not valid yet")
            }
            CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. } => {
                format!("{them} is not valid for the host name asked for (tls-hostname)")
            }
            CertificateError::ApplicationVerificationFailure => match REFUSED.with(|r| r.take()) {
                Some((name, id)) => {
                    format!("{them} ({name}) is not authorized by tls-authz '{id}'")
                }
                None => format!("{them} is not authorized (tls-authz)"),
            },
            other => format!("{them} was refused: {other:?}"),
        },
        Some(rustls::Error::NoCertificatesPresented) => {
            "the source presented no certificate (verify-peer asks for one)".to_string()
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "the peer does not speak TLS (a plaintext migration stream?)".to_string()
        }
        Some(rustls::Error::AlertReceived(a)) => refused_by_peer(*a),
        Some(other) => other.to_string(),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the handshake (it does not speak TLS, or refused us)"
                .to_string()
        }
        None if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) =>
        {
            format!("the peer said nothing for {waited:?} during the handshake")
        }
        None => e.to_string(),
    };
    tls_error(peer, reason)
}

/// What the peer's alert says of us: the peer checked our certificate and refused it.
fn refused_by_peer(a: AlertDescription) -> String {
    let why = match a {
        AlertDescription::UnknownCA | AlertDescription::DecryptError => {
            "our certificate is not signed by its CA"
        }
        AlertDescription::CertificateExpired => "our certificate has expired or is not valid yet",
        AlertDescription::AccessDenied => {
            "our certificate's name is not authorized by its tls-authz"
        }
        AlertDescription::CertificateRequired => {
            "it asks for a certificate (verify-peer) and we have none (client-cert.pem)"
        }
        AlertDescription::BadCertificate | AlertDescription::UnsupportedCertificate => {
            "our certificate is not one it accepts (not for the host name it asked for, or not for this purpose)"
        }
        AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion => {
            "no TLS version or cipher in common"
        }
        _ => "",
    };
    match why {
        "" => format!("the peer refused us ({a:?})"),
        why => format!("the peer refused us: {why} ({a:?})"),
    }
}

/// Rewrites an error of a session that rustls reports as a received alert into what the
/// alert means.
fn explain(e: io::Error) -> io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => {
            io::Error::new(io::ErrorKind::ConnectionRefused, refused_by_peer(*a))
        }
        _ => e,
    }
}

/// After a failed write: an alert the peer sent before it closed (in TLS 1.3 a server
/// refuses a client's certificate after the client finished its handshake, so the
/// client first learns of it here). Reads only what has already arrived.
fn alert_in_flight<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    wire: &Wire,
) -> Option<io::Error> {
    struct NoWait<'a>(BorrowedFd<'a>);
    impl Read for NoWait<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // SAFETY: `buf` is writable for its length during the call, and the
            // descriptor is an open socket borrowed for the call.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
    }
    let mut r = io::Read::chain(wire.pending(), NoWait(wire.sock.as_fd()));
    for _ in 0..64 {
        match conn.read_tls(&mut r) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                if let Err(rustls::Error::AlertReceived(a)) = conn.process_new_packets() {
                    return Some(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        refused_by_peer(a),
                    ));
                }
            }
        }
    }
    None
}

/// Encrypts all of `bufs` (records of up to 16 KiB across the slices; rustls's
/// `StreamOwned` would take the first slice only) and writes the records out.
fn send<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    wire: &mut Wire,
    bufs: &[IoSlice<'_>],
) -> io::Result<usize> {
    let n = conn.writer().write_vectored(bufs)?;
    while conn.wants_write() {
        match conn.write_tls(wire) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn handshake<C, S>(conn: &mut C, wire: &mut Wire) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    while conn.is_handshaking() {
        conn.complete_io(wire)?;
    }
    // The last flight (the server's session tickets, a client's finished) goes out now.
    while conn.wants_write() {
        conn.complete_io(wire)?;
    }
    // Then records as large as a write brings: every write is sent whole before it
    // returns, so nothing piles up, and a write of many pages is encrypted in one go
    // rather than 64 KiB per call.
    conn.set_buffer_limit(None);
    Ok(())
}

fn wrap(creds: &TlsCreds, sock: Socket, host: Option<&str>, uri: String) -> Result<TlsTransport> {
    sock.set_read_timeout(Some(creds.handshake_timeout))
        .map_err(|e| Error::open("set a handshake timeout on", &uri, e))?;
    let mut sock = Wire::new(sock);
    let session = match &creds.config {
        Config::Client(c) => {
            let host = host.ok_or_else(|| {
                tls_error(
                    &uri,
                    "no host name to check the destination's certificate against: set tls-hostname",
                )
            })?;
            let name = ServerName::try_from(host.to_string())
                .map_err(|_| tls_error(&uri, format!("{host:?} is not a host name")))?;
            let mut conn = ClientConnection::new(c.clone(), name)
                .map_err(|e| tls_error(&uri, e.to_string()))?;
            handshake(&mut conn, &mut sock).map_err(|e| {
                handshake_error(&uri, TlsEndpoint::Client, creds.handshake_timeout, e)
            })?;
            Session::Client(StreamOwned::new(conn, sock))
        }
        Config::Server(c) => {
            let mut conn =
                ServerConnection::new(c.clone()).map_err(|e| tls_error(&uri, e.to_string()))?;
            handshake(&mut conn, &mut sock).map_err(|e| {
                handshake_error(&uri, TlsEndpoint::Server, creds.handshake_timeout, e)
            })?;
            Session::Server(StreamOwned::new(conn, sock))
        }
    };
    let sock = match &session {
        Session::Client(s) => &s.sock.sock,
        Session::Server(s) => &s.sock.sock,
    };
    // From here on reads wait as long as the transport's user says.
    sock.set_read_timeout(None)
        .map_err(|e| Error::open("clear the handshake timeout on", &uri, e))?;
    let fd = sock
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::open("duplicate the descriptor of", &uri, e))?;
    Ok(TlsTransport {
        shared: Arc::new(Shared {
            session: Mutex::new(session),
            split: AtomicBool::new(false),
            fd,
        }),
        uri,
        read_timeout: None,
    })
}

/// Connects to `uri` (`tcp:` or `unix:`) and completes a TLS handshake as a client,
/// checking the destination's certificate against `hostname`, or the URI's host.
///
/// # Errors
/// The connection fails, or the handshake: [`Error::Tls`] says which check.
pub fn connect_tls(
    uri: &MigrationUri,
    creds: &TlsCreds,
    hostname: Option<&str>,
) -> Result<Box<dyn Transport>> {
    let text = uri.to_string();
    let (sock, host) = match uri {
        MigrationUri::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .map_err(|e| Error::open("connect to", &text, e))?;
            let _ = s.set_nodelay(true);
            (Box::new(s) as Socket, Some(host.as_str()))
        }
        MigrationUri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| Error::open("connect to", &text, e))?;
            (Box::new(s) as Socket, None)
        }
        other => {
            return Err(tls_error(
                &text,
                format!("TLS needs a tcp: or unix: URI, not {}", other.scheme()),
            ));
        }
    };
    if creds.endpoint() != TlsEndpoint::Client {
        return Err(tls_error(
            &text,
            "these credentials are a server's (endpoint=server)",
        ));
    }
    Ok(Box::new(wrap(creds, sock, hostname.or(host), text)?))
}

/// Completes a server's TLS handshake on an accepted socket.
pub(crate) fn accept_tcp(
    creds: &TlsCreds,
    s: TcpStream,
    uri: String,
) -> Result<Box<dyn Transport>> {
    let _ = s.set_nodelay(true);
    server(creds, Box::new(s), uri)
}

/// As [`accept_tcp`], on a unix socket.
pub(crate) fn accept_unix(
    creds: &TlsCreds,
    s: UnixStream,
    uri: String,
) -> Result<Box<dyn Transport>> {
    server(creds, Box::new(s), uri)
}

fn server(creds: &TlsCreds, sock: Socket, uri: String) -> Result<Box<dyn Transport>> {
    if creds.endpoint() != TlsEndpoint::Server {
        return Err(tls_error(
            &uri,
            "these credentials are a client's (endpoint=client)",
        ));
    }
    Ok(Box::new(wrap(creds, sock, None, uri)?))
}

impl Transport for TlsTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.split() {
            let r = self.read_split(buf);
            return crate::transport::timed(r, self.read_timeout);
        }
        let r = match &mut *self.session() {
            Session::Client(s) => s.read(buf),
            Session::Server(s) => s.read(buf),
        };
        let r = match r {
            // A close without close_notify, as QEMU 7.2 ends its TLS streams: an end
            // like any other. A stream cut short is still found, by its own framing
            // (a record cut in the middle, no EOF section, no answer on the return path).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            r => r.map_err(explain),
        };
        crate::transport::timed(r, self.read_timeout)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.split() {
            return self.write_split(bufs).map_err(explain);
        }
        // rustls encrypts into records of its own (the one copy TLS costs here); every
        // write is sent whole before returning.
        match &mut *self.session() {
            Session::Client(s) => send(&mut s.conn, &mut s.sock, bufs)
                .map_err(|e| alert_in_flight(&mut s.conn, &s.sock).unwrap_or(explain(e))),
            Session::Server(s) => send(&mut s.conn, &mut s.sock, bufs)
                .map_err(|e| alert_in_flight(&mut s.conn, &s.sock).unwrap_or(explain(e))),
        }
    }

    fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        ShutdownHandle::for_socket(self.shared.fd.as_fd())
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.split() {
            match &mut *self.session() {
                Session::Client(s) => s.conn.send_close_notify(),
                Session::Server(s) => s.conn.send_close_notify(),
            }
            self.flush_split()?;
        } else {
            match &mut *self.session() {
                Session::Client(s) => {
                    s.conn.send_close_notify();
                    s.flush()?;
                }
                Session::Server(s) => {
                    s.conn.send_close_notify();
                    s.flush()?;
                }
            }
        }
        // SAFETY: shutdown(2) on the borrowed open socket touches no memory.
        let r = unsafe { libc::shutdown(self.shared.fd.as_raw_fd(), libc::SHUT_WR) };
        match (r, io::Error::last_os_error()) {
            (0, _) => Ok(()),
            (_, e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            (_, e) => Err(e),
        }
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.split() {
            match &*self.session() {
                Session::Client(s) => s.sock.sock.set_read_timeout(timeout)?,
                Session::Server(s) => s.sock.sock.set_read_timeout(timeout)?,
            }
        }
        self.read_timeout = timeout;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (TLS)", self.uri)
    }

    fn unsent_probe(&self) -> Option<UnsentProbe> {
        UnsentProbe::for_socket(self.shared.fd.as_fd())
    }

    fn limit_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        crate::transport::set_receive_buffer(self.shared.fd.as_fd(), bytes)
    }

    /// A second handle on the session: from now on neither handle waits for the socket
    /// while it holds the session, so one thread may read while another writes.
    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        if !self.shared.split.swap(true, Ordering::AcqRel) {
            set_nonblocking(self.shared.fd.as_fd())?;
        }
        Ok(Box::new(TlsTransport {
            shared: self.shared.clone(),
            uri: self.uri.clone(),
            read_timeout: None,
        }))
    }
}
