//! A small HMP (QEMU's human monitor) behind `human-monitor-command`: the commands people
//! and `qmp-shell -H` use around a migration, each carried out as its QMP counterpart and
//! its answer printed as QEMU 7.2 prints it (lines end with `\n` here; the monitor sends
//! `\r\n`, as QEMU does).
//!
//! ```
//! use serde_json::json;
//! use vmm::qmp::hmp::{Command, parse, print};
//!
//! let Ok(Command::Request(r)) = parse("info status") else { panic!() };
//! let text = print(&r, &json!({"status": "postmigrate", "running": false}));
//! assert_eq!(text, "VM status: paused (postmigrate)\n");
//! ```

use serde_json::Value;

use super::{Request, Target};
use qemu_file::MigrationUri;

/// An HMP command line, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// One that is a QMP request, printed from its answer.
    Request(Request),
    /// `help`.
    Help,
}

/// The commands, as `help` lists them.
const HELP: &[(&str, &str)] = &[
    ("cont|c", "resume emulation"),
    ("help|? [cmd]", "show the help"),
    (
        "info status|migrate|migrate_parameters|migrate_capabilities",
        "show the VM's or the migration's state",
    ),
    ("migrate [-d] uri", "migrate to URI"),
    ("migrate_cancel", "cancel the current VM migration"),
    (
        "migrate_start_postcopy",
        "switch the migration to post-copy (postcopy-ram on)",
    ),
    (
        "migrate_incoming uri",
        "continue an incoming migration from an -incoming defer",
    ),
    (
        "migrate_set_parameter parameter value",
        "set a migration parameter (integers, on/off, or none/zstd)",
    ),
    (
        "migrate_set_capability capability state",
        "enable or disable a migration capability",
    ),
    ("quit|q", "quit the emulator"),
    ("stop|s", "stop emulation"),
];

/// Parses an HMP command line.
///
/// # Errors
/// An unknown command or wrong arguments, with QEMU's wording.
pub fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&cmd, rest)) = words.split_first() else {
        return Err("empty command line".into());
    };
    let arity = |n: usize| {
        if rest.len() == n {
            Ok(())
        } else {
            Err(format!("{cmd}: expects {n} argument(s)"))
        }
    };
    let r = match cmd {
        "help" | "?" => return Ok(Command::Help),
        "info" => match rest {
            ["status"] => Request::QueryStatus,
            ["migrate"] => Request::QueryMigrate,
            ["migrate_parameters"] => Request::QueryParameters,
            ["migrate_capabilities"] => Request::QueryCapabilities,
            ["version"] => Request::QueryVersion,
            ["name"] => Request::QueryName,
            ["kvm"] => Request::QueryKvm,
            [] => return Ok(Command::Help),
            _ => {
                return Err(format!(
                    "unknown command: '{}'",
                    super::bounded(&words.join(" "))
                ));
            }
        },
        "stop" | "s" => {
            arity(0)?;
            Request::Stop
        }
        "cont" | "c" => {
            arity(0)?;
            Request::Cont
        }
        "quit" | "q" => {
            arity(0)?;
            Request::Quit
        }
        "migrate_cancel" => {
            arity(0)?;
            Request::MigrateCancel
        }
        "migrate_start_postcopy" => {
            arity(0)?;
            Request::MigrateStartPostcopy
        }
        "migrate" => {
            let uri = match rest {
                ["-d", uri] | [uri] => uri,
                _ => return Err("migrate: expects [-d] uri".into()),
            };
            Request::Migrate(uri_target(uri)?)
        }
        "migrate_incoming" => {
            arity(1)?;
            Request::MigrateIncoming(uri_target(rest[0])?)
        }
        "migrate_set_parameter" => {
            arity(2)?;
            let (name, value) = (rest[0], rest[1]);
            let v = match (value.parse::<u64>(), value) {
                (Ok(n), _) => serde_json::json!(n),
                (_, "on") => serde_json::json!(true),
                (_, "off") => serde_json::json!(false),
                _ => serde_json::json!(value),
            };
            let args = serde_json::json!({ name: v });
            super::schema::check_arguments(
                super::schema::command("migrate-set-parameters").ok_or("no schema")?,
                &args,
            )?;
            Request::SetParameters(super::migration::parameters(&args).map_err(|e| e.desc)?)
        }
        "migrate_set_capability" => {
            arity(2)?;
            let state = match rest[1] {
                "on" | "true" => true,
                "off" | "false" => false,
                _ => return Err("migrate_set_capability: state is on or off".into()),
            };
            let args =
                serde_json::json!({"capabilities": [{"capability": rest[0], "state": state}]});
            super::schema::check_arguments(
                super::schema::command("migrate-set-capabilities").ok_or("no schema")?,
                &args,
            )?;
            Request::SetCapabilities(super::migration::capabilities(&args).map_err(|e| e.desc)?)
        }
        other => return Err(format!("unknown command: '{}'", super::bounded(other))),
    };
    Ok(Command::Request(r))
}

fn uri_target(uri: &str) -> Result<Target, String> {
    if let Some(name) = uri.strip_prefix("fd:") {
        if !name.starts_with(|c: char| c.is_ascii_digit()) {
            return Ok(Target::NamedFd(name.to_string()));
        }
    }
    MigrationUri::parse(uri)
        .map(Target::Uri)
        .map_err(|e| e.to_string())
}

/// `help`'s text.
pub fn help() -> String {
    HELP.iter().map(|(c, h)| format!("{c} -- {h}\n")).collect()
}

/// What HMP prints for `request`, given the QMP answer `v`.
pub fn print(request: &Request, v: &Value) -> String {
    match request {
        Request::QueryStatus => {
            let st = v["status"].as_str().unwrap_or("unknown");
            if v["running"] == true {
                "VM status: running\n".into()
            } else if st == "paused" {
                "VM status: paused\n".into()
            } else {
                format!("VM status: paused ({st})\n")
            }
        }
        Request::QueryMigrate => migrate(v),
        Request::QueryCapabilities => v
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let on = if c["state"] == true { "on" } else { "off" };
                format!("{}: {on}\n", c["capability"].as_str().unwrap_or("?"))
            })
            .collect(),
        Request::QueryParameters => parameters(v),
        Request::QueryVersion => format!(
            "{}.{}.{}{}\n",
            v["qemu"]["major"],
            v["qemu"]["minor"],
            v["qemu"]["micro"],
            v["package"].as_str().unwrap_or_default()
        ),
        Request::QueryName => match v["name"].as_str() {
            Some(n) => format!("{n}\n"),
            None => String::new(),
        },
        Request::QueryKvm => format!(
            "kvm support: {}\n",
            if v["enabled"] == true {
                "enabled"
            } else {
                "disabled"
            }
        ),
        // Commands that act print nothing, as in QEMU.
        _ => String::new(),
    }
}

/// The stream's fixed properties, as QEMU's `info migrate` opens with its globals: what
/// vmm's streams always do.
const GLOBALS: &str = "globals:\nstore-global-state: off\nonly-migratable: off\n\
    send-configuration: on\nsend-section-footer: on\ndecompress-error-check: on\n\
    clear-bitmap-shift: 14\n";

fn migrate(v: &Value) -> String {
    let mut out = GLOBALS.to_string();
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    let Some(status) = v["status"].as_str() else {
        return out;
    };
    out += &format!("Migration status: {status}");
    match v["error-desc"].as_str() {
        Some(e) if status == "failed" => out += &format!(" ({e})\n"),
        _ => out += "\n",
    }
    out += &format!("total time: {} ms\n", u(&v["total-time"]));
    if let Some(d) = v["expected-downtime"].as_u64() {
        out += &format!("expected downtime: {d} ms\n");
    }
    if let Some(d) = v["downtime"].as_u64() {
        out += &format!("downtime: {d} ms\n");
    }
    if let Some(d) = v["setup-time"].as_u64() {
        out += &format!("setup: {d} ms\n");
    }
    let ram = &v["ram"];
    if ram.is_object() {
        out += &format!("transferred ram: {} kbytes\n", u(&ram["transferred"]) >> 10);
        out += &format!(
            "throughput: {:.2} mbps\n",
            ram["mbps"].as_f64().unwrap_or(0.0)
        );
        out += &format!("remaining ram: {} kbytes\n", u(&ram["remaining"]) >> 10);
        out += &format!("total ram: {} kbytes\n", u(&ram["total"]) >> 10);
        out += &format!("duplicate: {} pages\n", u(&ram["duplicate"]));
        out += &format!("skipped: {} pages\n", u(&ram["skipped"]));
        out += &format!("normal: {} pages\n", u(&ram["normal"]));
        out += &format!("normal bytes: {} kbytes\n", u(&ram["normal-bytes"]) >> 10);
        out += &format!("dirty sync count: {}\n", u(&ram["dirty-sync-count"]));
        out += &format!("page size: {} kbytes\n", u(&ram["page-size"]) >> 10);
        out += &format!("multifd bytes: {} kbytes\n", u(&ram["multifd-bytes"]) >> 10);
        out += &format!("pages-per-second: {}\n", u(&ram["pages-per-second"]));
        if let Some(r) = ram["dirty-pages-rate"].as_u64().filter(|r| *r > 0) {
            out += &format!("dirty pages rate: {r} pages\n");
        }
        for (key, label) in [
            ("precopy-bytes", "precopy ram"),
            ("downtime-bytes", "downtime ram"),
            ("postcopy-bytes", "postcopy ram"),
        ] {
            if let Some(b) = ram[key].as_u64().filter(|b| *b > 0) {
                out += &format!("{label}: {} kbytes\n", b >> 10);
            }
        }
    }
    let disk = &v["disk"];
    if disk.is_object() {
        out += &format!(
            "transferred disk: {} kbytes\n",
            u(&disk["transferred"]) >> 10
        );
        out += &format!("remaining disk: {} kbytes\n", u(&disk["remaining"]) >> 10);
        out += &format!("total disk: {} kbytes\n", u(&disk["total"]) >> 10);
    }
    if let Some(t) = v["cpu-throttle-percentage"].as_u64() {
        out += &format!("cpu throttle percentage: {t}\n");
    }
    out
}

/// `info migrate_parameters`' lines, in QEMU 7.2's order (which leaves out
/// `multifd-zlib-level` and `multifd-zstd-level`); vmm's own after them.
const PARAMETER_ORDER: &[&str] = &[
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
    "compress-level",
    "compress-threads",
    "compress-wait-thread",
    "decompress-threads",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
    "max-cpu-throttle",
    "tls-creds",
    "tls-hostname",
    "max-bandwidth",
    "downtime-limit",
    "x-checkpoint-delay",
    "block-incremental",
    "multifd-channels",
    "multifd-compression",
    "xbzrle-cache-size",
    "max-postcopy-bandwidth",
    "tls-authz",
    "x-stall-timeout",
    "x-incoming-timeout",
    "x-postcopy-auto",
];

fn parameters(v: &Value) -> String {
    let mut out = String::new();
    for &name in PARAMETER_ORDER {
        let Some(x) = v.get(name) else {
            continue;
        };
        let unit = match name {
            "announce-initial" | "announce-max" | "announce-step" | "downtime-limit"
            | "x-checkpoint-delay" | "x-stall-timeout" | "x-incoming-timeout" => " ms",
            "max-bandwidth" => " bytes/second",
            "xbzrle-cache-size" => " bytes",
            _ => "",
        };
        let shown = match x {
            // Strings are quoted, enumerations not.
            Value::String(s) if name.starts_with("tls-") => format!("'{s}'"),
            Value::String(s) => s.clone(),
            Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
            other => other.to_string(),
        };
        out += &format!("{name}: {shown}{unit}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_parse_into_their_qmp_requests() {
        assert_eq!(
            parse("info migrate"),
            Ok(Command::Request(Request::QueryMigrate))
        );
        assert_eq!(parse("  stop "), Ok(Command::Request(Request::Stop)));
        assert_eq!(
            parse("migrate -d unix:/tmp/m"),
            Ok(Command::Request(Request::Migrate(Target::Uri(
                MigrationUri::Unix("/tmp/m".into())
            ))))
        );
        assert!(matches!(
            parse("migrate_set_parameter downtime-limit 30"),
            Ok(Command::Request(Request::SetParameters(p))) if p.len() == 1
        ));
        assert!(
            parse("migrate_set_capability compress on")
                .unwrap_err()
                .contains("zstd")
        );
        assert_eq!(
            parse("info bogus").unwrap_err(),
            "unknown command: 'info bogus'"
        );
        assert!(parse("bogus").unwrap_err().contains("unknown command"));
        assert!(parse("").is_err());
    }

    #[test]
    fn answers_print_as_qemu_prints_them() {
        let st = |v| print(&Request::QueryStatus, &v);
        assert_eq!(
            st(json!({"status": "running", "running": true})),
            "VM status: running\n"
        );
        assert_eq!(
            st(json!({"status": "paused", "running": false})),
            "VM status: paused\n"
        );
        let m = print(
            &Request::QueryMigrate,
            &json!({"status": "completed", "total-time": 120, "downtime": 9, "setup-time": 1,
                    "ram": {"transferred": 4096_u64 * 1024, "mbps": 812.5, "remaining": 0,
                            "total": 1 << 28, "duplicate": 10, "skipped": 0, "normal": 1024,
                            "normal-bytes": 4 << 20, "dirty-sync-count": 3, "page-size": 4096,
                            "multifd-bytes": 0, "pages-per-second": 5000, "precopy-bytes": 4 << 20}}),
        );
        assert!(
            m.starts_with("globals:\n")
                && m.contains(
                    "\nMigration status: completed\ntotal time: 120 ms\ndowntime: 9 ms\n"
                ),
            "{m}"
        );
        assert!(
            m.contains("transferred ram: 4096 kbytes\nthroughput: 812.50 mbps\n"),
            "{m}"
        );
        assert!(m.contains("precopy ram: 4096 kbytes\n"), "{m}");
        let caps = print(
            &Request::QueryCapabilities,
            &json!([{"capability": "xbzrle", "state": false}, {"capability": "events", "state": true}]),
        );
        assert_eq!(caps, "xbzrle: off\nevents: on\n");
        let p = print(
            &Request::QueryParameters,
            &json!({"downtime-limit": 300, "tls-creds": ""}),
        );
        assert_eq!(p, "tls-creds: ''\ndowntime-limit: 300 ms\n");
        let v = print(
            &Request::QueryVersion,
            &json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "vmm-0.1.0"}),
        );
        assert_eq!(v, "7.2.0vmm-0.1.0\n");
    }
}
