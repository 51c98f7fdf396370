//! QEMU's Machine Protocol as vmm speaks it: one JSON command per line in, typed
//! [`Request`]s out, every malformed command turned into QMP's error reply. Nothing here
//! touches a VM; the monitor carries requests out.
//!
//! ```
//! use vmm::qmp::{Request, parse};
//!
//! let c = parse(br#"{"execute": "migrate", "arguments": {"uri": "unix:/tmp/m"}, "id": 7}"#);
//! assert!(matches!(c.request, Ok(Request::Migrate(_))));
//! assert_eq!(c.id, Some(serde_json::json!(7)));
//!
//! let c = parse(br#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": -1}}"#);
//! assert_eq!(c.request.unwrap_err().class, "GenericError");
//! ```

use std::time::Duration;

use qemu_file::MigrationUri;
use savevm::MultifdCompression;
use serde_json::{Value, json};

/// Largest command accepted, in bytes (a QMP command is small; this bounds a hostile one).
pub const MAX_COMMAND: usize = 64 * 1024;

/// Largest `downtime-limit` QEMU accepts, in milliseconds.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// A command the monitor can carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `qmp_capabilities`: ends capabilities negotiation.
    Capabilities,
    /// `query-status`.
    QueryStatus,
    /// `stop`: pause the vCPUs.
    Stop,
    /// `cont`: resume them.
    Cont,
    /// `quit`: end the process once the reply is written.
    Quit,
    /// `migrate`, with its parsed URI.
    Migrate(MigrationUri),
    /// `migrate-incoming`: receive the guest on this URI (a VM started with
    /// `--incoming defer`, or whose guest was migrated away).
    MigrateIncoming(MigrationUri),
    /// `migrate_cancel`.
    MigrateCancel,
    /// `query-migrate`.
    QueryMigrate,
    /// `migrate-set-parameters`: every parameter checked before any is applied.
    SetParameters(Vec<Parameter>),
    /// `query-migrate-parameters`.
    QueryParameters,
    /// `migrate-set-capabilities`: every capability checked before any is applied.
    SetCapabilities(Vec<(Capability, bool)>),
    /// `query-migrate-capabilities`.
    QueryCapabilities,
    /// `x-query-guest`: the built-in guest's counters.
    QueryGuest,
}

/// A migration parameter with a checked value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parameter {
    /// `downtime-limit`, at most [`MAX_DOWNTIME_LIMIT_MS`].
    DowntimeLimit(Duration),
    /// `max-bandwidth` in bytes per second, 0 unlimited.
    MaxBandwidth(u64),
    /// `cpu-throttle-initial`, percent, 1 to 99.
    CpuThrottleInitial(u8),
    /// `cpu-throttle-increment`, percent, 1 to 99.
    CpuThrottleIncrement(u8),
    /// `max-cpu-throttle`, percent, 1 to 99.
    MaxCpuThrottle(u8),
    /// `throttle-trigger-threshold`, percent, 1 to 100.
    ThrottleTriggerThreshold(u8),
    /// `x-stall-timeout`: how long a migration may make no progress before it fails as
    /// unable to converge, at least [`MIN_STALL_TIMEOUT_MS`].
    StallTimeout(Duration),
    /// `multifd-channels`, 1 to 255.
    MultifdChannels(u8),
    /// `multifd-compression`: `none` or `zstd`.
    MultifdCompression(MultifdCompression),
    /// `multifd-zstd-level`, 0 to 20.
    MultifdZstdLevel(u8),
}

/// The shortest `x-stall-timeout` accepted, in milliseconds.
pub const MIN_STALL_TIMEOUT_MS: u64 = 1000;

/// A migration capability vmm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `events`: MIGRATION events (always on).
    Events,
    /// `return-path`: the destination acknowledges the load.
    ReturnPath,
    /// `auto-converge`: throttle vCPUs that dirty memory faster than it is sent.
    AutoConverge,
    /// `multifd`: RAM pages over `multifd-channels` extra connections.
    Multifd,
}

/// A refused command: QMP's error class and a readable description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound`, ...
    pub class: &'static str,
    /// What was wrong.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl std::fmt::Display) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.to_string(),
        }
    }

    /// The reply object, `{"error": {"class", "desc"}}`.
    pub fn to_reply(&self) -> Value {
        json!({"error": {"class": self.class, "desc": self.desc}})
    }
}

/// One parsed input line: the command's `id` (echoed in the reply) and the request or why
/// it is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The client's `id`, any JSON value.
    pub id: Option<Value>,
    /// The request, or the error to reply with.
    pub request: Result<Request, QmpError>,
}

/// Parses one line of QMP input. Never panics; anything not understood is a [`QmpError`].
pub fn parse(line: &[u8]) -> Command {
    if line.len() > MAX_COMMAND {
        return Command {
            id: None,
            request: Err(QmpError::generic(format!(
                "command longer than {MAX_COMMAND} bytes"
            ))),
        };
    }
    let cmd: Value = match serde_json::from_slice(line) {
        Ok(c) => c,
        Err(e) => {
            return Command {
                id: None,
                request: Err(QmpError::generic(format!("JSON parse error: {e}"))),
            };
        }
    };
    let id = cmd.get("id").cloned();
    let request = match cmd.get("execute").and_then(Value::as_str) {
        None => Err(QmpError::generic("Expected 'execute' in QMP input")),
        Some(name) => request(name, cmd.get("arguments").unwrap_or(&Value::Null)),
    };
    Command { id, request }
}

fn request(name: &str, args: &Value) -> Result<Request, QmpError> {
    if !(args.is_null() || args.is_object()) {
        return Err(QmpError::generic(
            "QMP input member 'arguments' must be an object",
        ));
    }
    Ok(match name {
        "qmp_capabilities" => Request::Capabilities,
        "query-status" => Request::QueryStatus,
        "stop" => Request::Stop,
        "cont" => Request::Cont,
        "quit" => Request::Quit,
        "migrate" => Request::Migrate(uri(args)?),
        "migrate-incoming" => Request::MigrateIncoming(uri(args)?),
        "migrate_cancel" => Request::MigrateCancel,
        "query-migrate" => Request::QueryMigrate,
        "migrate-set-parameters" => Request::SetParameters(parameters(args)?),
        "query-migrate-parameters" => Request::QueryParameters,
        "migrate-set-capabilities" => Request::SetCapabilities(capabilities(args)?),
        "query-migrate-capabilities" => Request::QueryCapabilities,
        "x-query-guest" => Request::QueryGuest,
        other => {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {} has not been found", bounded(other)),
            });
        }
    })
}

fn uri(args: &Value) -> Result<MigrationUri, QmpError> {
    let uri = args
        .get("uri")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
    MigrationUri::parse(uri).map_err(QmpError::generic)
}

fn parameters(args: &Value) -> Result<Vec<Parameter>, QmpError> {
    let mut out = Vec::new();
    for (k, v) in args.as_object().into_iter().flatten() {
        if k == "multifd-compression" {
            out.push(Parameter::MultifdCompression(
                match v.as_str() {
                    Some("none") => MultifdCompression::None,
                    Some("zstd") => MultifdCompression::Zstd,
                    Some("zlib") => {
                        return Err(QmpError::generic(
                            "Parameter 'multifd-compression': zlib is not supported here; use none or zstd",
                        ));
                    }
                    _ => {
                        return Err(QmpError::generic(
                            "Parameter 'multifd-compression' expects none or zstd",
                        ));
                    }
                },
            ));
            continue;
        }
        let n = v.as_u64().ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{}' expects a non-negative number",
                bounded(k)
            ))
        })?;
        out.push(match k.as_str() {
            "downtime-limit" if n > MAX_DOWNTIME_LIMIT_MS => {
                return Err(QmpError::generic(format!(
                    "Parameter 'downtime-limit' expects a value in range [0, {MAX_DOWNTIME_LIMIT_MS}] ms"
                )));
            }
            "downtime-limit" => Parameter::DowntimeLimit(Duration::from_millis(n)),
            "max-bandwidth" => Parameter::MaxBandwidth(n),
            "cpu-throttle-initial" => Parameter::CpuThrottleInitial(in_range(k, n, 99)?),
            "cpu-throttle-increment" => Parameter::CpuThrottleIncrement(in_range(k, n, 99)?),
            "max-cpu-throttle" => Parameter::MaxCpuThrottle(in_range(k, n, 99)?),
            "throttle-trigger-threshold" => {
                Parameter::ThrottleTriggerThreshold(in_range(k, n, 100)?)
            }
            "x-stall-timeout" if n < MIN_STALL_TIMEOUT_MS => {
                return Err(QmpError::generic(format!(
                    "Parameter 'x-stall-timeout' expects at least {MIN_STALL_TIMEOUT_MS} ms"
                )));
            }
            "x-stall-timeout" => Parameter::StallTimeout(Duration::from_millis(n)),
            "multifd-channels" => Parameter::MultifdChannels(in_range(k, n, 255)?),
            "multifd-zstd-level" if n > 20 => {
                return Err(QmpError::generic(
                    "Parameter 'multifd-zstd-level' expects an integer in the range of 0 to 20",
                ));
            }
            "multifd-zstd-level" => Parameter::MultifdZstdLevel(n as u8),
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is not supported",
                    bounded(other)
                )));
            }
        });
    }
    Ok(out)
}

/// An integer parameter in 1..=`max` (a percentage, a channel count), with QEMU's error
/// otherwise.
fn in_range(name: &str, n: u64, max: u8) -> Result<u8, QmpError> {
    match u8::try_from(n) {
        Ok(p) if (1..=max).contains(&p) => Ok(p),
        _ => Err(QmpError::generic(format!(
            "Parameter '{name}' expects an integer in the range of 1 to {max}"
        ))),
    }
}

fn capabilities(args: &Value) -> Result<Vec<(Capability, bool)>, QmpError> {
    let list = args
        .get("capabilities")
        .and_then(Value::as_array)
        .ok_or_else(|| QmpError::generic("Parameter 'capabilities' is missing"))?;
    let mut out = Vec::new();
    for c in list {
        let name = c.get("capability").and_then(Value::as_str);
        let state = c.get("state").and_then(Value::as_bool);
        let (Some(name), Some(state)) = (name, state) else {
            return Err(QmpError::generic(
                "Each capability needs 'capability' (a string) and 'state' (a boolean)",
            ));
        };
        out.push(match (name, state) {
            ("events", true) => (Capability::Events, true),
            ("events", false) => {
                return Err(QmpError::generic(
                    "Capability 'events' cannot be turned off in vmm",
                ));
            }
            ("return-path", on) => (Capability::ReturnPath, on),
            ("auto-converge", on) => (Capability::AutoConverge, on),
            ("multifd", on) => (Capability::Multifd, on),
            (other, _) => {
                return Err(QmpError::generic(format!(
                    "Capability '{}' is not supported",
                    bounded(other)
                )));
            }
        });
    }
    Ok(out)
}

/// A client-supplied name as echoed in an error: at most 64 characters.
fn bounded(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Request, QmpError> {
        parse(s.as_bytes()).request
    }

    #[test]
    fn multifd_capability_and_parameters_parse_with_qemu_names() {
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4,"multifd-compression":"zstd","multifd-zstd-level":3}}"#
            ),
            Ok(Request::SetParameters(vec![
                Parameter::MultifdChannels(4),
                Parameter::MultifdCompression(MultifdCompression::Zstd),
                Parameter::MultifdZstdLevel(3)
            ]))
        );
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"multifd","state":true}]}}"#
            ),
            Ok(Request::SetCapabilities(vec![(Capability::Multifd, true)]))
        );
        for (args, needle) in [
            (r#"{"multifd-channels":0}"#, "range of 1 to 255"),
            (r#"{"multifd-channels":256}"#, "range of 1 to 255"),
            (r#"{"multifd-zstd-level":21}"#, "0 to 20"),
            (r#"{"multifd-compression":"zlib"}"#, "zlib is not supported"),
            (r#"{"multifd-compression":7}"#, "expects none or zstd"),
        ] {
            let line = format!(r#"{{"execute":"migrate-set-parameters","arguments":{args}}}"#);
            let e = req(&line).unwrap_err();
            assert!(e.desc.contains(needle), "{args}: {}", e.desc);
        }
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!(
            req(r#"{"execute":"qmp_capabilities"}"#),
            Ok(Request::Capabilities)
        );
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":30,"max-bandwidth":0}}"#
            ),
            Ok(Request::SetParameters(vec![
                Parameter::DowntimeLimit(Duration::from_millis(30)),
                Parameter::MaxBandwidth(0)
            ]))
        );
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":false}]}}"#
            ),
            Ok(Request::SetCapabilities(vec![(
                Capability::ReturnPath,
                false
            )]))
        );
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-parameters","arguments":{"cpu-throttle-initial":30,"cpu-throttle-increment":5,"max-cpu-throttle":99,"throttle-trigger-threshold":100,"x-stall-timeout":1000}}"#
            ),
            Ok(Request::SetParameters(vec![
                Parameter::CpuThrottleIncrement(5),
                Parameter::CpuThrottleInitial(30),
                Parameter::MaxCpuThrottle(99),
                Parameter::ThrottleTriggerThreshold(100),
                Parameter::StallTimeout(Duration::from_secs(1)),
            ]))
        );
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#
            ),
            Ok(Request::SetCapabilities(vec![(
                Capability::AutoConverge,
                true
            )]))
        );
        let c = parse(br#"{"execute":"query-migrate","id":{"a":[1]}}"#);
        assert_eq!(c.id, Some(json!({"a": [1]})));
    }

    #[test]
    fn bad_commands_are_refused_with_qmp_errors() {
        let long = format!(r#"{{"execute":"{}"}}"#, "x".repeat(10_000));
        for (line, class, needle) in [
            ("{", "GenericError", "JSON parse error"),
            ("[1]", "GenericError", "Expected 'execute'"),
            (r#"{"execute":"nope"}"#, "CommandNotFound", "nope"),
            (
                r#"{"execute":"migrate"}"#,
                "GenericError",
                "'uri' is missing",
            ),
            (
                r#"{"execute":"migrate","arguments":{"uri":"ftp:x"}}"#,
                "GenericError",
                "ftp",
            ),
            (
                r#"{"execute":"stop","arguments":[1]}"#,
                "GenericError",
                "must be an object",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":2000001}}"#,
                "GenericError",
                "range",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"cpu-throttle-initial":0}}"#,
                "GenericError",
                "'cpu-throttle-initial' expects an integer in the range of 1 to 99",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"max-cpu-throttle":100}}"#,
                "GenericError",
                "range of 1 to 99",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"throttle-trigger-threshold":300}}"#,
                "GenericError",
                "range of 1 to 100",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"x-stall-timeout":999}}"#,
                "GenericError",
                "at least 1000 ms",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"x-foo":1}}"#,
                "GenericError",
                "not supported",
            ),
            (
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":false}]}}"#,
                "GenericError",
                "cannot be turned off",
            ),
            (
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path"}]}}"#,
                "GenericError",
                "'state'",
            ),
            (long.as_str(), "CommandNotFound", "..."),
        ] {
            let e = req(line).unwrap_err();
            assert_eq!(e.class, class, "{line}");
            assert!(e.desc.contains(needle), "{line}: {}", e.desc);
            assert!(e.desc.len() < 400, "an error echoes at most a bounded name");
        }
        let huge = vec![b' '; MAX_COMMAND + 1];
        assert!(parse(&huge).request.unwrap_err().desc.contains("longer"));
    }
}
