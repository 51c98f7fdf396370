//! The QMP monitor: QEMU's Machine Protocol (JSON over a unix socket), so existing QMP
//! clients can drive vmm: greeting, `qmp_capabilities`, commands, events.
//!
//! Commands: `qmp_capabilities`, `query-status`, `stop`, `cont`, `quit`, `migrate`,
//! `migrate-incoming`,
//! `migrate_cancel`, `query-migrate`, `migrate-set-parameters`,
//! `query-migrate-parameters`, `migrate-set-capabilities`, `query-migrate-capabilities`,
//! `x-query-guest` (the built-in guest's pass and stale-page counters, the vCPU throttle). Events:
//! `MIGRATION`, `STOP`, `RESUME`, `SHUTDOWN`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::session::Session;
use vmm::qmp::{self, Capability, MAX_COMMAND, Parameter, QmpError, Request};

/// Starts the monitor on the unix socket `path` (mode 0600).
///
/// # Errors
/// The socket cannot be created.
pub fn start(path: &Path, session: Arc<Session>) -> Result<()> {
    if let Ok(m) = fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            fs::remove_file(path)?;
        } else {
            bail!("{} exists and is not a socket", path.display());
        }
    }
    let listener =
        qemu_file::bind_private(path).with_context(|| format!("QMP socket {}", path.display()))?;
    let clients: Arc<Mutex<Vec<Client>>> = Arc::new(Mutex::new(Vec::new()));
    let c = clients.clone();
    session.listen(move |name, data| {
        let ev = event(name, data).to_string();
        // Never block the thread that sends the event (it may be the migration thread):
        // a client that does not keep up is disconnected.
        c.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|cl| match cl.tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(_) => {
                    let _ = cl.sock.shutdown(std::net::Shutdown::Both);
                    false
                }
            });
    });
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, cl) = (session.clone(), clients.clone());
                let _ = std::thread::Builder::new()
                    .name("qmp-client".into())
                    .spawn(move || serve(conn, s, cl));
            }
            let _ = fs::remove_file(path);
        })?;
    Ok(())
}

/// A client that receives events: its outgoing queue and its socket.
struct Client {
    tx: SyncSender<String>,
    sock: UnixStream,
}

/// Queued after the reply to `quit`: the writer then ends the process (no JSON line starts
/// with a NUL byte).
const QUIT_AFTER_REPLY: &str = "\0quit";

/// Messages a client may have waiting before it is considered stuck.
const CLIENT_QUEUE: usize = 256;

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

fn serve(conn: UnixStream, session: Arc<Session>, clients: Arc<Mutex<Vec<Client>>>) {
    let (Ok(mut w), Ok(sock)) = (conn.try_clone(), conn.try_clone()) else {
        return;
    };
    // Replies and events leave through one queue, written by the client's own thread.
    // `quit` is carried out by that thread once its reply is written.
    let (tx, rx) = sync_channel::<String>(CLIENT_QUEUE);
    let s2 = session.clone();
    let writer = std::thread::Builder::new()
        .name("qmp-writer".into())
        .spawn(move || {
            for line in rx {
                if line == QUIT_AFTER_REPLY {
                    let _ = w.flush();
                    s2.request_quit(0);
                    break;
                }
                if writeln!(w, "{line}").is_err() {
                    break;
                }
            }
        });
    if writer.is_err() {
        return;
    }
    let send = |v: Value| tx.send(v.to_string()).is_ok();
    let greeting = json!({"QMP": {
        "version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "vmm"},
        "capabilities": [],
    }});
    if !send(greeting) {
        return;
    }
    let mut reader = BufReader::new(conn);
    let mut negotiated = false;
    let mut line = Vec::new();
    loop {
        // One command per line, as QMP clients send them; a longer line is refused and
        // ends the connection.
        line.clear();
        match (&mut reader)
            .take(MAX_COMMAND as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let too_long = line.len() > MAX_COMMAND;
        let cmd = qmp::parse(&line);
        let quit = negotiated && cmd.request == Ok(Request::Quit);
        let result = match (cmd.request, negotiated) {
            (Ok(Request::Capabilities), false) => {
                negotiated = true;
                if let Ok(sock) = sock.try_clone() {
                    clients
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Client {
                            tx: tx.clone(),
                            sock,
                        });
                }
                Ok(json!({}))
            }
            (Ok(_), false) => Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            }),
            (Ok(request), true) => execute(&session, request),
            (Err(e), _) => Err(e),
        };
        let mut reply = match result {
            Ok(v) => json!({"return": v}),
            Err(e) => e.to_reply(),
        };
        if let Some(id) = cmd.id {
            reply["id"] = id;
        }
        if !send(reply) || too_long {
            break;
        }
        if quit {
            let _ = tx.send(QUIT_AFTER_REPLY.to_string());
        }
    }
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e)
}

fn execute(session: &Arc<Session>, request: Request) -> Result<Value, QmpError> {
    let m = &session.machine;
    match request {
        Request::QueryStatus => {
            let st = m.run_state();
            Ok(
                json!({"status": st.as_str(), "running": st == crate::machine::RunState::Running, "singlestep": false}),
            )
        }
        Request::Stop => {
            m.stop().map_err(generic)?;
            session.broadcast("STOP", Value::Null);
            Ok(json!({}))
        }
        Request::Cont => {
            m.start().map_err(generic)?;
            session.broadcast("RESUME", Value::Null);
            Ok(json!({}))
        }
        Request::Quit => {
            session.broadcast(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            );
            Ok(json!({}))
        }
        Request::Migrate(uri) => {
            session.migrate(uri).map_err(generic)?;
            Ok(json!({}))
        }
        // QEMU answers {}; the bound address is added (a tcp port 0 is chosen here).
        Request::MigrateIncoming(uri) => {
            let local = session.migrate_incoming(uri).map_err(generic)?;
            Ok(json!({"uri": local.to_string()}))
        }
        Request::MigrateCancel => {
            session.cancel();
            Ok(json!({}))
        }
        Request::QueryMigrate => Ok(session.query_migrate()),
        Request::SetParameters(list) => {
            let mut p = session.params();
            for param in list {
                match param {
                    Parameter::DowntimeLimit(d) => p.downtime_limit = d,
                    Parameter::MaxBandwidth(n) => p.max_bandwidth = n,
                    Parameter::CpuThrottleInitial(n) => p.cpu_throttle_initial = n,
                    Parameter::CpuThrottleIncrement(n) => p.cpu_throttle_increment = n,
                    Parameter::MaxCpuThrottle(n) => p.max_cpu_throttle = n,
                    Parameter::ThrottleTriggerThreshold(n) => p.throttle_trigger_threshold = n,
                    Parameter::StallTimeout(d) => p.stall_timeout = d,
                    Parameter::MultifdChannels(n) => p.multifd_channels = n,
                    Parameter::MultifdCompression(c) => p.multifd_compression = c,
                    Parameter::MultifdZstdLevel(n) => p.multifd_zstd_level = n,
                }
            }
            session.set_params(p);
            Ok(json!({}))
        }
        Request::QueryParameters => {
            let p = session.params();
            Ok(json!({
                "downtime-limit": p.downtime_limit.as_millis() as u64,
                "max-bandwidth": p.max_bandwidth,
                "cpu-throttle-initial": p.cpu_throttle_initial,
                "cpu-throttle-increment": p.cpu_throttle_increment,
                "max-cpu-throttle": p.max_cpu_throttle,
                "throttle-trigger-threshold": p.throttle_trigger_threshold,
                "x-stall-timeout": p.stall_timeout.as_millis() as u64,
                "multifd-channels": p.multifd_channels,
                "multifd-compression": p.multifd_compression.as_str(),
                "multifd-zstd-level": p.multifd_zstd_level,
            }))
        }
        Request::SetCapabilities(list) => {
            if session.migration_running() {
                return Err(generic("There's a migration process in progress"));
            }
            for (cap, on) in list {
                match cap {
                    // MIGRATION events are always sent (the parser refuses turning them off).
                    Capability::Events => {}
                    // Off: the source does not wait for the destination's answer (for a
                    // destination that never sends one).
                    Capability::ReturnPath => session.set_return_path(on),
                    Capability::AutoConverge => {
                        let mut p = session.params();
                        p.auto_converge = on;
                        session.set_params(p);
                    }
                    Capability::Multifd => {
                        let mut p = session.params();
                        p.multifd = on;
                        session.set_params(p);
                    }
                }
            }
            Ok(json!({}))
        }
        Request::QueryCapabilities => Ok(json!([
            {"capability": "events", "state": true},
            {"capability": "return-path", "state": session.return_path()},
            {"capability": "auto-converge", "state": session.params().auto_converge},
            {"capability": "multifd", "state": session.params().multifd},
        ])),
        Request::QueryGuest => {
            if m.run_state() == crate::machine::RunState::InMigrate {
                // Guest memory is being written by the load: nothing to read yet.
                return Ok(
                    json!({"pass": 0, "mismatches": 0, "serial-bytes": 0, "accel": m.cpus.name(),
                                 "loading": true}),
                );
            }
            let (pass, mismatches) = m.guest_status();
            Ok(
                json!({"pass": pass, "mismatches": mismatches, "serial-bytes": m.console.bytes(),
                      "accel": m.cpus.name(), "cpu-throttle": m.cpus.throttle()}),
            )
        }
        // Handled by the connection (negotiation is per client).
        Request::Capabilities => Err(QmpError {
            class: "CommandNotFound",
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
    }
}
