//! The QMP monitor: QEMU's Machine Protocol (JSON over a unix socket), so existing QMP
//! clients can drive vmm: greeting, `qmp_capabilities`, commands, events.
//!
//! Commands: `qmp_capabilities`, `query-status`, `stop`, `cont`, `quit`, `migrate`,
//! `migrate_cancel`, `query-migrate`, `migrate-set-parameters`,
//! `query-migrate-parameters`, `migrate-set-capabilities`, `query-migrate-capabilities`,
//! `x-query-guest` (the built-in guest's pass and stale-page counters). Events:
//! `MIGRATION`, `STOP`, `RESUME`, `SHUTDOWN`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use qemu_file::MigrationUri;
use serde_json::{Value, json};

use crate::session::Session;

/// Largest command accepted, in bytes (a QMP command is small; this bounds a hostile one).
const MAX_COMMAND: usize = 64 * 1024;

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
        UnixListener::bind(path).with_context(|| format!("QMP socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
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

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
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
        // One command per line, as QMP clients send them; a longer line is refused.
        line.clear();
        match (&mut reader)
            .take(MAX_COMMAND as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.len() > MAX_COMMAND {
            send(error(
                "GenericError",
                format!("command longer than {MAX_COMMAND} bytes"),
            ));
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let cmd: Value = match serde_json::from_slice(&line) {
            Ok(c) => c,
            Err(e) => {
                send(error("GenericError", format!("JSON parse error: {e}")));
                continue;
            }
        };
        let id = cmd.get("id").cloned();
        let mut reply = match (cmd.get("execute").and_then(Value::as_str), negotiated) {
            (None, _) => error("GenericError", "Expected 'execute' in QMP input"),
            (Some("qmp_capabilities"), false) => {
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
                json!({"return": {}})
            }
            (Some(_), false) => error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ),
            (Some(name), true) => {
                let args = cmd.get("arguments").cloned().unwrap_or(json!({}));
                match execute(&session, name, &args) {
                    Ok(v) => json!({"return": v}),
                    Err((class, desc)) => error(class, desc),
                }
            }
        };
        if let Some(id) = id {
            reply["id"] = id;
        }
        if !send(reply) {
            break;
        }
        if cmd.get("execute").and_then(Value::as_str) == Some("quit") && negotiated {
            let _ = tx.send(QUIT_AFTER_REPLY.to_string());
        }
    }
}

type CmdResult = std::result::Result<Value, (&'static str, String)>;

fn generic(e: impl std::fmt::Display) -> (&'static str, String) {
    ("GenericError", e.to_string())
}

fn execute(session: &Arc<Session>, name: &str, args: &Value) -> CmdResult {
    let m = &session.machine;
    match name {
        "query-status" => {
            let st = m.run_state();
            Ok(
                json!({"status": st.as_str(), "running": st == crate::machine::RunState::Running, "singlestep": false}),
            )
        }
        "stop" => {
            m.stop().map_err(generic)?;
            session.broadcast("STOP", Value::Null);
            Ok(json!({}))
        }
        "cont" => {
            m.start().map_err(generic)?;
            session.broadcast("RESUME", Value::Null);
            Ok(json!({}))
        }
        "quit" => {
            session.broadcast(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            );
            Ok(json!({}))
        }
        "migrate" => {
            let uri = args
                .get("uri")
                .and_then(Value::as_str)
                .ok_or_else(|| generic("Parameter 'uri' is missing"))?;
            let uri = MigrationUri::parse(uri).map_err(generic)?;
            session.migrate(uri).map_err(generic)?;
            Ok(json!({}))
        }
        "migrate_cancel" => {
            session.cancel();
            Ok(json!({}))
        }
        "query-migrate" => Ok(session.query_migrate()),
        "migrate-set-parameters" => {
            let mut p = session.params();
            for (k, v) in args.as_object().into_iter().flatten() {
                let n = v.as_u64().ok_or_else(|| {
                    generic(format!("Parameter '{k}' expects a non-negative number"))
                })?;
                match k.as_str() {
                    "downtime-limit" => {
                        if n > 2_000_000 {
                            return Err(generic(
                                "Parameter 'downtime-limit' expects a value in range [0, 2000000] ms",
                            ));
                        }
                        p.downtime_limit = Duration::from_millis(n);
                    }
                    "max-bandwidth" => p.max_bandwidth = n,
                    other => return Err(generic(format!("Parameter '{other}' is not supported"))),
                }
            }
            session.set_params(p);
            Ok(json!({}))
        }
        "query-migrate-parameters" => {
            let p = session.params();
            Ok(
                json!({"downtime-limit": p.downtime_limit.as_millis() as u64, "max-bandwidth": p.max_bandwidth}),
            )
        }
        "migrate-set-capabilities" => {
            for c in args
                .get("capabilities")
                .and_then(Value::as_array)
                .ok_or_else(|| generic("Parameter 'capabilities' is missing"))?
            {
                let name = c.get("capability").and_then(Value::as_str).unwrap_or("");
                let state = c.get("state").and_then(Value::as_bool).unwrap_or(false);
                match (name, state) {
                    // MIGRATION events are always sent.
                    ("events", true) => {}
                    ("events", false) => {
                        return Err(generic("Capability 'events' cannot be turned off in vmm"));
                    }
                    // Off: the source does not wait for the destination's answer (for a
                    // destination that never sends one).
                    ("return-path", on) => session.set_return_path(on),
                    (other, _) => {
                        return Err(generic(format!("Capability '{other}' is not supported")));
                    }
                }
            }
            Ok(json!({}))
        }
        "query-migrate-capabilities" => Ok(json!([
            {"capability": "events", "state": true},
            {"capability": "return-path", "state": session.return_path()},
        ])),
        "x-query-guest" => {
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
                      "accel": m.cpus.name()}),
            )
        }
        other => Err((
            "CommandNotFound",
            format!("The command {other} has not been found"),
        )),
    }
}
