//! QEMU's Machine Protocol as vmm speaks it: a JSON stream in ([`json`](mod@json)), each message
//! checked against the one table of commands ([`schema`]) and turned into a typed
//! [`Request`], every malformed one into QMP's error reply with QEMU's class and words.
//! Nothing here touches a VM; the monitor carries requests out.
//!
//! ```
//! use vmm::qmp::{Request, Target, parse};
//!
//! let c = &parse(br#"{"execute": "migrate", "arguments": {"uri": "unix:/tmp/m"}, "id": 7}"#)[0];
//! assert!(matches!(c.request, Ok(Request::Migrate(Target::Uri(_)))));
//! assert_eq!(c.id, Some(serde_json::json!(7)));
//!
//! let c = &parse(br#"{"execute": "stop", "arguments": {"bogus": 1}}"#)[0];
//! assert_eq!(c.request.as_ref().unwrap_err().desc, "Parameter 'bogus' is unexpected");
//! ```

mod error;
pub mod hmp;
pub mod json;
pub mod migration;
pub mod schema;

use qemu_file::MigrationUri;
use serde_json::Value;

pub use error::QmpError;
pub(crate) use error::bounded;
pub use migration::{Capability, MAX_DOWNTIME_LIMIT_MS, MIN_STALL_TIMEOUT_MS, Parameter};

use json::{JsonStreamer, Message};

/// Largest message accepted, in bytes (a QMP command is small; this bounds a hostile one).
pub const MAX_COMMAND: usize = 64 * 1024;

/// A command the monitor can carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `qmp_capabilities`: ends capabilities negotiation; `oob` if the client asked for
    /// out-of-band execution (which vmm does not offer).
    Capabilities {
        /// `enable` held `oob`.
        oob: bool,
    },
    /// `query-version`.
    QueryVersion,
    /// `query-commands`.
    QueryCommands,
    /// `query-qmp-schema`.
    QuerySchema,
    /// `query-name`.
    QueryName,
    /// `query-kvm`.
    QueryKvm,
    /// `query-target`.
    QueryTarget,
    /// `query-cpus-fast`.
    QueryCpusFast,
    /// `query-status`.
    QueryStatus,
    /// `stop`: pause the vCPUs.
    Stop,
    /// `cont`: resume them.
    Cont,
    /// `quit`: end the process once the reply is written.
    Quit,
    /// `migrate`.
    Migrate(Target),
    /// `migrate-incoming`: receive the guest here (a VM started with `--incoming defer`,
    /// or whose guest was migrated away).
    MigrateIncoming(Target),
    /// `migrate_cancel`.
    MigrateCancel,
    /// `migrate-continue`: leave `pre-switchover`; the state the client expects.
    MigrateContinue(String),
    /// `migrate-start-postcopy`: switch the running migration to post-copy.
    MigrateStartPostcopy,
    /// `migrate` with `resume: true`: a paused post-copy goes on over a new connection.
    MigrateResume(Target),
    /// `migrate-recover`: a destination whose post-copy is paused listens for the resume.
    MigrateRecover(Target),
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
    /// `getfd`: keep the descriptor that came with the message under this name.
    GetFd(String),
    /// `closefd`: close a descriptor kept by `getfd`.
    CloseFd(String),
    /// `object-add` of TLS credentials or an authorization list.
    ObjectAdd(crate::object::ObjectSpec),
    /// `object-del`.
    ObjectDel(String),
    /// `human-monitor-command`: an HMP command line.
    Hmp(String),
    /// `x-query-guest`: the built-in guest's counters.
    QueryGuest,
}

/// Where `migrate` and `migrate-incoming` go: a URI, or `fd:NAME` for a descriptor passed
/// earlier with `getfd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A URI (`fd:N` with a number is an inherited descriptor).
    Uri(MigrationUri),
    /// `fd:NAME`.
    NamedFd(String),
}

/// One message of QMP input: the command's `id` (echoed in the reply) and the request or
/// why it is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The client's `id`, any JSON value.
    pub id: Option<Value>,
    /// The request, or the error to reply with.
    pub request: Result<Request, QmpError>,
}

/// Reads every message in `input` (a whole stream: tests and fuzzing; the monitor feeds
/// its own [`JsonStreamer`]). Never panics.
pub fn parse(input: &[u8]) -> Vec<Command> {
    let mut s = JsonStreamer::new(MAX_COMMAND);
    let mut out = Vec::new();
    s.feed(input, &mut out);
    // The end of input ends a number or keyword still being read.
    s.feed(b"\n", &mut out);
    out.into_iter().map(command).collect()
}

/// The command in one message of the stream, checked as QEMU checks it.
pub fn command(msg: Message) -> Command {
    let value = match msg {
        Message::Value(v) => v,
        Message::Error(e) => {
            return Command {
                id: None,
                request: Err(QmpError::generic(e)),
            };
        }
    };
    let Value::Object(map) = &value else {
        return Command {
            id: None,
            request: Err(QmpError::generic("QMP input must be a JSON object")),
        };
    };
    let id = map.get("id").cloned();
    let request = envelope(map).and_then(|(name, args)| request(name, args));
    Command { id, request }
}

/// The command's name and arguments, the message's members checked.
fn envelope(map: &serde_json::Map<String, Value>) -> Result<(&str, &Value), QmpError> {
    for (k, v) in map {
        match k.as_str() {
            "execute" if !v.is_string() => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ));
            }
            "arguments" if !v.is_object() => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ));
            }
            "execute" | "arguments" | "id" => {}
            "exec-oob" => {
                return Err(QmpError::generic(
                    "QMP input member 'exec-oob' is unexpected: out-of-band execution is not offered",
                ));
            }
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{}' is unexpected",
                    bounded(other)
                )));
            }
        }
    }
    let name = map
        .get("execute")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((name, map.get("arguments").unwrap_or(&Value::Null)))
}

fn request(name: &str, args: &Value) -> Result<Request, QmpError> {
    let Some(def) = schema::command(name) else {
        return Err(QmpError {
            class: "CommandNotFound",
            desc: format!("The command {} has not been found", bounded(name)),
        });
    };
    schema::check_arguments(def, args).map_err(QmpError::generic)?;
    let s = |k: &str| args[k].as_str().unwrap_or_default().to_string();
    Ok(match name {
        "qmp_capabilities" => Request::Capabilities {
            oob: args["enable"]
                .as_array()
                .is_some_and(|l| l.iter().any(|c| c == "oob")),
        },
        "query-version" => Request::QueryVersion,
        "query-commands" => Request::QueryCommands,
        "query-qmp-schema" => Request::QuerySchema,
        "query-name" => Request::QueryName,
        "query-kvm" => Request::QueryKvm,
        "query-target" => Request::QueryTarget,
        "query-cpus-fast" => Request::QueryCpusFast,
        "query-status" => Request::QueryStatus,
        "stop" => Request::Stop,
        "cont" => Request::Cont,
        "quit" => Request::Quit,
        "migrate" => {
            for (flag, why) in [
                (
                    "blk",
                    "disks are copied as each --drive's migrate= says, not all by 'blk'",
                ),
                ("inc", "disks are copied whole; 'inc' is not supported"),
            ] {
                if args[flag] == true {
                    return Err(QmpError::generic(format!(
                        "Parameter '{flag}' cannot be true here: {why}"
                    )));
                }
            }
            match args["resume"] == true {
                true => Request::MigrateResume(target(&s("uri"))?),
                false => Request::Migrate(target(&s("uri"))?),
            }
        }
        "migrate-recover" => Request::MigrateRecover(target(&s("uri"))?),
        "migrate-incoming" => Request::MigrateIncoming(target(&s("uri"))?),
        "migrate_cancel" => Request::MigrateCancel,
        "migrate-continue" => Request::MigrateContinue(s("state")),
        "migrate-start-postcopy" => Request::MigrateStartPostcopy,
        "query-migrate" => Request::QueryMigrate,
        "migrate-set-parameters" => Request::SetParameters(migration::parameters(args)?),
        "query-migrate-parameters" => Request::QueryParameters,
        "migrate-set-capabilities" => Request::SetCapabilities(migration::capabilities(args)?),
        "query-migrate-capabilities" => Request::QueryCapabilities,
        "getfd" => Request::GetFd(fd_name(&s("fdname"))?),
        "closefd" => Request::CloseFd(s("fdname")),
        "object-add" => {
            Request::ObjectAdd(crate::object::from_qmp(args).map_err(QmpError::generic)?)
        }
        "object-del" => Request::ObjectDel(s("id")),
        "human-monitor-command" => Request::Hmp(s("command-line")),
        "x-query-guest" => Request::QueryGuest,
        other => {
            // Declared in the schema but not here: a bug, reported rather than hidden.
            return Err(QmpError::generic(format!(
                "The command {other} is declared but not implemented"
            )));
        }
    })
}

fn target(uri: &str) -> Result<Target, QmpError> {
    if let Some(name) = uri.strip_prefix("fd:") {
        if !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()) {
            return Ok(Target::NamedFd(fd_name(name)?));
        }
    }
    MigrationUri::parse(uri)
        .map(Target::Uri)
        .map_err(QmpError::generic)
}

/// A name for `getfd`: as QEMU, it must not start with a digit (`fd:3` is descriptor 3).
fn fd_name(name: &str) -> Result<String, QmpError> {
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) || name.len() > 64 {
        return Err(QmpError::generic(
            "Parameter 'fdname' expects a name not starting with a digit, at most 64 bytes",
        ));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn req(s: &str) -> Result<Request, QmpError> {
        let mut c = parse(s.as_bytes());
        assert_eq!(c.len(), 1, "{s}");
        c.remove(0).request
    }

    #[test]
    fn multifd_capability_and_parameters_parse_with_qemu_names() {
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4,"multifd-compression":"zstd","multifd-zstd-level":3}}"#
            ),
            Ok(Request::SetParameters(vec![
                Parameter::MultifdChannels(4),
                Parameter::MultifdCompression(ram_list::MultifdCompression::Zstd),
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
            (r#"{"multifd-channels":256}"#, "expects uint8"),
            (r#"{"multifd-zstd-level":21}"#, "0 to 20"),
            (r#"{"multifd-compression":"zlib"}"#, "zlib is not supported"),
            (r#"{"multifd-compression":7}"#, "expected: string"),
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
            Ok(Request::Capabilities { oob: false })
        );
        assert_eq!(
            req(
                r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":30,"max-bandwidth":0}}"#
            ),
            Ok(Request::SetParameters(vec![
                Parameter::MaxBandwidth(0),
                Parameter::DowntimeLimit(Duration::from_millis(30)),
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
                Parameter::ThrottleTriggerThreshold(100),
                Parameter::CpuThrottleInitial(30),
                Parameter::CpuThrottleIncrement(5),
                Parameter::MaxCpuThrottle(99),
                Parameter::StallTimeout(Duration::from_secs(1)),
            ]))
        );
        assert_eq!(
            req(r#"{"execute":"migrate","arguments":{"uri":"fd:mig","detach":true}}"#),
            Ok(Request::Migrate(Target::NamedFd("mig".into())))
        );
        assert_eq!(
            req(r#"{"execute":"migrate","arguments":{"uri":"fd:3"}}"#),
            Ok(Request::Migrate(Target::Uri(MigrationUri::Fd(3))))
        );
        assert_eq!(
            req(
                r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}"#
            ),
            Ok(Request::Hmp("info status".into()))
        );
        let c = &parse(br#"{"execute":"query-migrate","id":{"a":[1]}}"#)[0];
        assert_eq!(c.id, Some(json!({"a": [1]})));
    }

    #[test]
    fn several_messages_in_one_read_each_get_their_answer() {
        let c = parse(
            b"{\"execute\":\"stop\",\"id\":1}{\"execute\":\"cont\",\"id\":2}\r\n{\n  \"execute\": \"quit\"\n}",
        );
        let got: Vec<_> = c
            .iter()
            .map(|c| (c.id.clone(), c.request.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(json!(1)), Ok(Request::Stop)),
                (Some(json!(2)), Ok(Request::Cont)),
                (None, Ok(Request::Quit)),
            ]
        );
    }

    #[test]
    fn bad_commands_are_refused_with_qmp_errors() {
        let long = format!(r#"{{"execute":"{}"}}"#, "x".repeat(10_000));
        for (line, class, needle) in [
            ("{]", "GenericError", "JSON parse error"),
            ("[1]", "GenericError", "must be a JSON object"),
            ("{}", "GenericError", "lacks member 'execute'"),
            (
                r#"{"execute":1}"#,
                "GenericError",
                "'execute' must be a string",
            ),
            (
                r#"{"execute":"stop","bogus":1}"#,
                "GenericError",
                "member 'bogus' is unexpected",
            ),
            (r#"{"execute":"nope"}"#, "CommandNotFound", "nope"),
            (
                r#"{"execute":"migrate"}"#,
                "GenericError",
                "'uri' is missing",
            ),
            (
                r#"{"execute":"migrate","arguments":{"uri":5}}"#,
                "GenericError",
                "Invalid parameter type for 'uri', expected: string",
            ),
            (
                r#"{"execute":"migrate","arguments":{"uri":"unix:/x","blk":true}}"#,
                "GenericError",
                "'blk' cannot be true",
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
                r#"{"execute":"stop","arguments":{"bogus":1}}"#,
                "GenericError",
                "Parameter 'bogus' is unexpected",
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
                "uint8",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"x-stall-timeout":999}}"#,
                "GenericError",
                "at least 1000 ms",
            ),
            (
                r#"{"execute":"migrate-set-parameters","arguments":{"x-foo":1}}"#,
                "GenericError",
                "Parameter 'x-foo' is unexpected",
            ),
            (
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"compress","state":true}]}}"#,
                "GenericError",
                "zstd",
            ),
            (
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path"}]}}"#,
                "GenericError",
                "'capabilities[0].state' is missing",
            ),
            (
                r#"{"execute":"getfd","arguments":{"fdname":"3x"}}"#,
                "GenericError",
                "not starting with a digit",
            ),
            (long.as_str(), "CommandNotFound", "..."),
        ] {
            let e = req(line).unwrap_err();
            assert_eq!(e.class, class, "{line}");
            assert!(e.desc.contains(needle), "{line}: {}", e.desc);
            assert!(e.desc.len() < 400, "an error echoes at most a bounded name");
        }
        let huge = format!(
            r#"{{"execute":"stop","arguments":{{"s":"{}"}}}}"#,
            "y".repeat(MAX_COMMAND)
        );
        let e = req(&huge).unwrap_err();
        assert!(e.desc.contains("longer than"), "{}", e.desc);
    }
}
