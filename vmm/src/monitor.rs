//! The QMP monitor: QEMU's Machine Protocol on a unix socket, as QEMU 7.2 speaks it, so
//! stock clients (qemu.qmp, qmp-shell, libvirt, the `qapi` crate) drive vmm: the greeting,
//! `qmp_capabilities`, a JSON stream of commands in, replies and events out, each ended
//! by `\r\n`. The commands are those of [`vmm::qmp::schema::COMMANDS`]; docs/qmp.md lists
//! them with every difference from QEMU.
//!
//! Each client has a reader (this module's `serve`) and a writer thread fed by one
//! queue, so replies and events keep their order and no sender ever blocks on a slow
//! client: one whose queue is full is disconnected. A client that goes is forgotten at
//! once, its threads and descriptors with it.

use std::collections::HashMap;
use std::fs;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use qemu_file::MigrationUri;
use serde_json::{Value, json};

use crate::machine::RunState;
use crate::session::Session;
use vmm::qmp::json::JsonStreamer;
use vmm::qmp::{self, Capability, MAX_COMMAND, QmpError, Request, Target, hmp, schema};

/// The QEMU version whose QMP vmm speaks (greeting, `query-version`): clients pick their
/// dialect from it. `package` says it is vmm.
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// Messages a client may have waiting before it is considered stuck.
const CLIENT_QUEUE: usize = 256;

/// Descriptors a client may send ahead of its `getfd` commands.
const MAX_PENDING_FDS: usize = 8;

/// Descriptors `getfd` may keep at once.
const MAX_NAMED_FDS: usize = 64;

/// The monitor of one vmm process.
pub struct Monitor {
    session: Arc<Session>,
    path: PathBuf,
    // Lock: the clients that completed negotiation (they receive events); each is removed
    // by its reader when it goes, or by a broadcast that finds it stuck.
    clients: Mutex<Vec<Client>>,
    // Lock: descriptors kept by `getfd`, by name; taken by `migrate fd:NAME`,
    // `migrate-incoming fd:NAME` and `closefd`. They outlive the client that sent them,
    // as in QEMU.
    fds: Mutex<HashMap<String, OwnedFd>>,
    next_client: AtomicU64,
    // Lock: when a client's bytes last arrived; `close` lets a client finish writing
    // what it was sending (the newline after a `quit`) before the process exits.
    last_input: Mutex<Instant>,
}

/// What goes out to a client, in order.
enum Out {
    /// A reply or an event.
    Line(String),
    /// Everything before is written: tell the sender.
    Flushed(SyncSender<()>),
}

/// A negotiated client: its id, its outgoing queue and its socket.
struct Client {
    id: u64,
    tx: SyncSender<Out>,
    sock: UnixStream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A QMP event with QEMU's timestamp.
fn event(name: &str, data: Value) -> Value {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let mut v = json!({
        "event": name,
        "timestamp": {"seconds": t.as_secs(), "microseconds": t.subsec_micros()},
    });
    if !data.is_null() {
        v["data"] = data;
    }
    v
}

impl Monitor {
    /// Starts the monitor on the unix socket `path` (mode 0600).
    ///
    /// # Errors
    /// The socket cannot be created, or `path` is something else than a socket.
    pub fn start(path: &Path, session: Arc<Session>) -> Result<Arc<Monitor>> {
        if let Ok(m) = fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                fs::remove_file(path)?;
            } else {
                bail!("{} exists and is not a socket", path.display());
            }
        }
        let listener = qemu_file::bind_private(path)
            .with_context(|| format!("QMP socket {}", path.display()))?;
        let mon = Arc::new(Monitor {
            session: session.clone(),
            path: path.to_path_buf(),
            clients: Mutex::new(Vec::new()),
            fds: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            last_input: Mutex::new(Instant::now()),
        });
        let weak = Arc::downgrade(&mon);
        session.listen(move |name, data| {
            if let Some(m) = weak.upgrade() {
                m.broadcast(name, data);
            }
        });
        let m = mon.clone();
        std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let m = m.clone();
                    let _ = std::thread::Builder::new()
                        .name("qmp-client".into())
                        .spawn(move || m.serve(conn));
                }
            })?;
        Ok(mon)
    }

    /// Sends an event to every negotiated client. Never blocks the caller (it may be the
    /// migration thread): a client that does not keep up is disconnected.
    fn broadcast(&self, name: &str, data: Value) {
        let ev = event(name, data).to_string();
        lock(&self.clients).retain(|cl| match cl.tx.try_send(Out::Line(ev.clone())) {
            Ok(()) => true,
            Err(_) => {
                let _ = cl.sock.shutdown(std::net::Shutdown::Both);
                false
            }
        });
    }

    /// Waits up to `timeout` until what was queued for every client is written (the
    /// last replies and events before the process exits), then removes the socket file.
    pub fn close(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let acks: Vec<_> = lock(&self.clients)
            .iter()
            .filter_map(|cl| {
                let (tx, rx) = sync_channel(1);
                cl.tx.try_send(Out::Flushed(tx)).ok().map(|_| rx)
            })
            .collect();
        for rx in acks {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = rx.recv_timeout(left);
        }
        // A client may still be writing the end of its last command (a client that
        // writes `{...}` and its newline apart, as the qapi crate does: a process gone in
        // between makes its write fail with EPIPE). Wait until clients are quiet for
        // INPUT_QUIET, at most INPUT_GRACE.
        let grace = Instant::now() + INPUT_GRACE;
        while lock(&self.last_input).elapsed() < INPUT_QUIET && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = fs::remove_file(&self.path);
    }

    fn serve(self: Arc<Self>, conn: UnixStream) {
        let Ok(w) = conn.try_clone() else {
            return;
        };
        let (tx, rx) = sync_channel::<Out>(CLIENT_QUEUE);
        if std::thread::Builder::new()
            .name("qmp-writer".into())
            .spawn(move || write_out(w, rx))
            .is_err()
        {
            return;
        }
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (major, minor, micro) = QEMU_VERSION;
        let greeting = json!({"QMP": {
            "version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                        "package": concat!("vmm-", env!("CARGO_PKG_VERSION"))},
            "capabilities": [],
        }});
        let mut client = ClientState {
            tx: tx.clone(),
            negotiated: false,
            quit: false,
            pending_fds: Vec::new(),
        };
        if client.send(greeting).is_ok() {
            self.read_loop(&conn, id, &mut client);
        }
        // Gone: forget it now (its queue and socket with it), not at the next event.
        lock(&self.clients).retain(|c| c.id != id);
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }

    fn read_loop(&self, conn: &UnixStream, id: u64, client: &mut ClientState) {
        let mut streamer = JsonStreamer::new(MAX_COMMAND);
        let mut buf = vec![0u8; 16 * 1024];
        let mut messages = Vec::new();
        loop {
            let n = match receive(conn, &mut buf, &mut client.pending_fds) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            *lock(&self.last_input) = Instant::now();
            streamer.feed(&buf[..n], &mut messages);
            for msg in messages.drain(..) {
                let cmd = qmp::command(msg);
                let result = match cmd.request {
                    Ok(Request::Capabilities { oob }) if !client.negotiated => {
                        if oob {
                            Err(QmpError::generic("Capability 'oob' not available"))
                        } else {
                            client.negotiated = true;
                            if let Ok(sock) = conn.try_clone() {
                                lock(&self.clients).push(Client {
                                    id,
                                    tx: client.tx.clone(),
                                    sock,
                                });
                            }
                            Ok(json!({}))
                        }
                    }
                    Ok(_) if !client.negotiated => Err(QmpError {
                        class: "CommandNotFound",
                        desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                    }),
                    Ok(Request::Capabilities { .. }) => Err(QmpError {
                        class: "CommandNotFound",
                        desc: "Capabilities negotiation is already complete, command ignored"
                            .into(),
                    }),
                    Ok(request) => self.execute(request, client),
                    Err(e) => Err(e),
                };
                let mut reply = match result {
                    Ok(v) => json!({"return": v}),
                    Err(e) => e.to_reply(),
                };
                if let Some(id) = cmd.id {
                    reply["id"] = id;
                }
                if client.send(reply).is_err() {
                    return;
                }
                if client.quit {
                    self.session.request_quit(0, "host-qmp-quit");
                }
            }
        }
    }

    fn execute(&self, request: Request, client: &mut ClientState) -> Result<Value, QmpError> {
        let session = &self.session;
        let m = &session.machine;
        match request {
            Request::QueryVersion => {
                let (major, minor, micro) = QEMU_VERSION;
                Ok(json!({"qemu": {"major": major, "minor": minor, "micro": micro},
                          "package": concat!("vmm-", env!("CARGO_PKG_VERSION"))}))
            }
            Request::QueryCommands => Ok(schema::query_commands()),
            Request::QuerySchema => Ok(schema::query_qmp_schema()),
            Request::QueryName => Ok(json!({})),
            Request::QueryKvm => {
                let kvm = m.cpus.name() == "kvm";
                Ok(json!({"enabled": kvm, "present": kvm || crate::kvm::available()}))
            }
            Request::QueryTarget => Ok(json!({"arch": "x86_64"})),
            Request::QueryCpusFast => Ok(Value::Array(
                m.cpus
                    .thread_ids()
                    .into_iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        json!({"cpu-index": i, "qom-path": format!("/machine/unattached/device[{i}]"),
                               "thread-id": tid, "target": "x86_64",
                               "props": {"core-id": 0, "thread-id": 0, "socket-id": i}})
                    })
                    .collect(),
            )),
            Request::QueryStatus => Ok(status_json(m.run_state())),
            Request::Stop => m.stop().map(|_| json!({})).map_err(generic),
            Request::Cont => m.start().map(|_| json!({})).map_err(generic),
            // SHUTDOWN goes out before the reply, as in QEMU; the process is told to end
            // once the reply is queued (`read_loop`), and its main thread waits for the
            // queues to drain.
            Request::Quit => {
                session.announce_shutdown("host-qmp-quit");
                client.quit = true;
                Ok(json!({}))
            }
            Request::Migrate(t) => {
                let uri = self.resolve(t)?;
                session.migrate(uri).map_err(generic)?;
                Ok(json!({}))
            }
            // QEMU answers {}; the bound address is added (a tcp port 0 is chosen here).
            Request::MigrateIncoming(t) => {
                let uri = self.resolve(t)?;
                let local = session.migrate_incoming(uri).map_err(generic)?;
                Ok(json!({"uri": local.to_string()}))
            }
            Request::MigrateCancel => {
                session.cancel();
                Ok(json!({}))
            }
            Request::MigrateContinue(state) => {
                session.migrate_continue(&state).map_err(generic)?;
                Ok(json!({}))
            }
            Request::MigrateResume(t) => {
                let uri = self.resolve(t)?;
                session.migrate_resume(uri).map_err(generic)?;
                Ok(json!({}))
            }
            // QEMU answers {}; the bound address is added, as for migrate-incoming.
            Request::MigrateRecover(t) => {
                let uri = self.resolve(t)?;
                let local = session.migrate_recover(uri).map_err(generic)?;
                Ok(json!({"uri": local.to_string()}))
            }
            Request::MigrateStartPostcopy => {
                session.start_postcopy().map_err(generic)?;
                Ok(json!({}))
            }
            Request::QueryMigrate => Ok(session.query_migrate()),
            Request::SetParameters(list) => {
                let mut p = session.params();
                for param in list {
                    match param {
                        qmp::Parameter::TlsCreds(c) => session.set_tls(|t| t.creds = c),
                        qmp::Parameter::TlsHostname(h) => session.set_tls(|t| t.hostname = h),
                        qmp::Parameter::TlsAuthz(a) => session.set_tls(|t| t.authz = a),
                        other => other.apply(&mut p),
                    }
                }
                session.set_params(p);
                Ok(json!({}))
            }
            Request::QueryParameters => Ok(qmp::migration::query_parameters(
                &session.params(),
                &session.tls_params(),
            )),
            Request::ObjectAdd(spec) => {
                session.add_object(&spec).map_err(generic)?;
                Ok(json!({}))
            }
            Request::ObjectDel(id) => {
                session.del_object(&id).map_err(generic)?;
                Ok(json!({}))
            }
            Request::SetCapabilities(list) => {
                if session.migration_running() {
                    return Err(generic("There's a migration process in progress"));
                }
                // As QEMU, the combination is checked whole before any of it applies.
                let after = |c: Capability| {
                    list.iter()
                        .rev()
                        .find(|(x, _)| *x == c)
                        .map_or_else(|| session.capability(c), |(_, on)| *on)
                };
                if after(Capability::PostcopyPreempt) {
                    if !after(Capability::PostcopyRam) {
                        return Err(generic("Postcopy preempt requires postcopy-ram"));
                    }
                    if after(Capability::Multifd) {
                        // QEMU 7.2 accepts it and then takes the preempt connection for a
                        // multifd channel; 8.0 refuses it too.
                        return Err(generic(
                            "Postcopy preempt is not compatible with multifd: turn one off",
                        ));
                    }
                }
                for (cap, on) in list {
                    session.set_capability(cap, on);
                }
                Ok(json!({}))
            }
            Request::QueryCapabilities => Ok(qmp::migration::query_capabilities(|c: Capability| {
                session.capability(c)
            })),
            Request::GetFd(name) => {
                let fd = client.pending_fds.pop().ok_or_else(|| {
                    generic("No file descriptor supplied via SCM_RIGHTS")
                })?;
                let mut fds = lock(&self.fds);
                if fds.len() >= MAX_NAMED_FDS && !fds.contains_key(&name) {
                    return Err(generic(format!(
                        "At most {MAX_NAMED_FDS} descriptors may be kept; closefd some first"
                    )));
                }
                // Replacing a name closes the descriptor it had, as in QEMU.
                fds.insert(name, fd);
                Ok(json!({}))
            }
            Request::CloseFd(name) => match lock(&self.fds).remove(&name) {
                Some(_) => Ok(json!({})),
                None => Err(generic(format!(
                    "File descriptor named '{}' not found",
                    qmp_name(&name)
                ))),
            },
            Request::Hmp(line) => self.hmp(&line, client).map(Value::String),
            Request::QueryGuest => {
                if m.run_state() == RunState::InMigrate {
                    // Guest memory is being written by the load: nothing to read yet.
                    return Ok(
                        json!({"pass": 0, "mismatches": 0, "serial-bytes": 0, "accel": m.cpus.name(),
                                     "loading": true}),
                    );
                }
                if crate::migration::postcopy_paused(m) {
                    // Its pages may never come: reading them would wait for ever.
                    return Ok(json!({"accel": m.cpus.name(), "postcopy-paused": true}));
                }
                let (pass, mismatches) = m.guest_status();
                Ok(
                    json!({"pass": pass, "mismatches": mismatches, "serial-bytes": m.console.bytes(),
                          "accel": m.cpus.name(), "cpu-throttle": m.cpus.throttle()}),
                )
            }
            // Handled by the reader (negotiation is per client).
            Request::Capabilities { .. } => Err(generic("qmp_capabilities is handled per client")),
        }
    }

    /// `fd:NAME` becomes the descriptor `getfd` kept under NAME (taken out of the table,
    /// as QEMU does: the migration owns it now).
    fn resolve(&self, t: Target) -> Result<MigrationUri, QmpError> {
        match t {
            Target::Uri(u) => Ok(u),
            Target::NamedFd(name) => match lock(&self.fds).remove(&name) {
                Some(fd) => Ok(MigrationUri::Fd(fd.into_raw_fd())),
                None => Err(QmpError::generic(format!(
                    "File descriptor named '{}' has not been found",
                    qmp_name(&name)
                ))),
            },
        }
    }

    /// `human-monitor-command`: the HMP commands people and qmp-shell -H use, each the
    /// same as its QMP counterpart, printed as QEMU prints it. As in QEMU, what goes wrong
    /// is text in a successful reply, not a QMP error.
    fn hmp(&self, line: &str, client: &mut ClientState) -> Result<String, QmpError> {
        let text = match hmp::parse(line) {
            Ok(hmp::Command::Request(r)) => match self.execute(r.clone(), client) {
                Ok(v) => hmp::print(&r, &v),
                Err(e) => format!("Error: {}\n", e.desc),
            },
            Ok(hmp::Command::Help) => hmp::help(),
            Err(e) => format!("{e}\n"),
        };
        Ok(text.replace('\n', "\r\n"))
    }
}

/// A client's per-connection state (QEMU's monitor session).
struct ClientState {
    tx: SyncSender<Out>,
    negotiated: bool,
    /// `quit` was executed: the process ends once its reply is queued.
    quit: bool,
    /// Descriptors received with messages, for the next `getfd`.
    pending_fds: Vec<OwnedFd>,
}

impl ClientState {
    /// Queues a reply. Err if the client is gone or stuck (its queue full).
    fn send(&self, v: Value) -> Result<(), ()> {
        match self.tx.try_send(Out::Line(v.to_string())) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(()),
        }
    }
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e)
}

/// `query-status`' answer.
pub fn status_json(st: RunState) -> Value {
    json!({"status": st.as_str(), "running": st == RunState::Running, "singlestep": false})
}

fn qmp_name(s: &str) -> String {
    s.chars().take(64).collect()
}

/// At exit, how long clients must have sent nothing before the process goes.
const INPUT_QUIET: Duration = Duration::from_millis(20);
/// At exit, the most the process waits for clients to go quiet.
const INPUT_GRACE: Duration = Duration::from_millis(200);

/// How long a write to a client may block (its socket buffer full) before the client,
/// which stopped reading, is disconnected.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer thread: each message then `\r\n`, as QEMU ends them. A client that does not
/// read for [`CLIENT_WRITE_TIMEOUT`] while something waits for it is disconnected.
fn write_out(mut w: UnixStream, rx: Receiver<Out>) {
    let _ = w.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    for out in rx {
        match out {
            Out::Line(line) => {
                let mut bytes = line.into_bytes();
                bytes.extend_from_slice(b"\r\n");
                if w.write_all(&bytes).is_err() {
                    break;
                }
            }
            Out::Flushed(ack) => {
                let _ = ack.try_send(());
            }
        }
    }
    let _ = w.shutdown(std::net::Shutdown::Both);
}

/// Reads what the client sent, keeping the descriptors that came with it (SCM_RIGHTS)
/// for `getfd`; beyond [`MAX_PENDING_FDS`] the oldest are closed.
fn receive(conn: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_PENDING_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let n = msg.bytes;
    for c in msg.cmsgs().into_iter().flatten() {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received {
                // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if fds.len() > MAX_PENDING_FDS {
        let extra = fds.len() - MAX_PENDING_FDS;
        fds.drain(..extra);
    }
    Ok(n)
}
