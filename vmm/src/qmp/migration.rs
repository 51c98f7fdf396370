//! The migration parameters and capabilities as QMP names them: every one QEMU 7.2 has is
//! listed, those vmm implements are checked and carried out, the others are accepted only
//! at QEMU's default value (a capability only turned off), so an orchestrator that sets
//! its usual defaults works, and one that asks for what is missing learns why.

use std::time::Duration;

use ram_list::MultifdCompression;

use crate::settings::Settings;
use serde_json::{Map, Value, json};

use super::error::QmpError;
use super::schema::{MIGRATION_CAPABILITY, MIGRATION_PARAMETERS};

/// Largest `downtime-limit` QEMU accepts, in milliseconds.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// The shortest `x-stall-timeout` accepted, in milliseconds.
pub const MIN_STALL_TIMEOUT_MS: u64 = 1000;

/// A migration parameter vmm implements, with a checked value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parameter {
    /// `tls-creds`: the id of a `tls-creds-x509` object, or empty for no TLS.
    TlsCreds(String),
    /// `tls-hostname`: the name a source checks the destination's certificate against
    /// (empty: the URI's host).
    TlsHostname(String),
    /// `tls-authz`: the id of the authorization object a destination checks a source's
    /// certificate name against (empty: any certificate its CA signed).
    TlsAuthz(String),
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
    /// `x-incoming-timeout`: how long a destination's read may wait for a byte, at least
    /// [`MIN_STALL_TIMEOUT_MS`].
    IncomingTimeout(Duration),
    /// `multifd-channels`, 1 to 255.
    MultifdChannels(u8),
    /// `multifd-compression`: `none` or `zstd`.
    MultifdCompression(MultifdCompression),
    /// `multifd-zstd-level`, 0 to 20.
    MultifdZstdLevel(u8),
    /// `max-postcopy-bandwidth` in bytes per second, 0 unlimited: paces post-copy's
    /// background pass (requested pages go at once).
    MaxPostcopyBandwidth(u64),
    /// `x-postcopy-auto`: with postcopy-ram, switch to post-copy by itself where
    /// pre-copy would throttle the guest or give up.
    PostcopyAuto(bool),
}

impl Parameter {
    /// Sets this parameter in `s` (the TLS ones are the session's, which holds the
    /// objects they name).
    pub fn apply(self, s: &mut Settings) {
        let (p, ram) = (&mut s.migration, &mut s.ram);
        match self {
            Parameter::TlsCreds(_) | Parameter::TlsHostname(_) | Parameter::TlsAuthz(_) => {}
            Parameter::DowntimeLimit(d) => p.downtime_limit = d,
            Parameter::MaxBandwidth(n) => p.max_bandwidth = n,
            Parameter::CpuThrottleInitial(n) => p.cpu_throttle_initial = n,
            Parameter::CpuThrottleIncrement(n) => p.cpu_throttle_increment = n,
            Parameter::MaxCpuThrottle(n) => p.max_cpu_throttle = n,
            Parameter::ThrottleTriggerThreshold(n) => p.throttle_trigger_threshold = n,
            Parameter::StallTimeout(d) => p.stall_timeout = d,
            Parameter::IncomingTimeout(d) => p.incoming_timeout = d,
            Parameter::MultifdChannels(n) => ram.multifd_channels = n,
            Parameter::MultifdCompression(c) => ram.multifd_compression = c,
            Parameter::MultifdZstdLevel(n) => ram.multifd_zstd_level = n,
            Parameter::MaxPostcopyBandwidth(n) => p.max_postcopy_bandwidth = n,
            Parameter::PostcopyAuto(on) => p.postcopy_auto = on,
        }
    }
}

/// The parameters vmm does not implement, at QEMU 7.2's defaults (what
/// `query-migrate-parameters` shows, and the only value `migrate-set-parameters` takes).
fn unimplemented_defaults() -> Map<String, Value> {
    let v = json!({
        "announce-initial": 50,
        "announce-max": 550,
        "announce-rounds": 5,
        "announce-step": 100,
        "compress-level": 1,
        "compress-threads": 8,
        "compress-wait-thread": true,
        "decompress-threads": 2,
        "cpu-throttle-tailslow": false,
        "x-checkpoint-delay": 20000,
        "block-incremental": false,
        "xbzrle-cache-size": 67108864,
        "multifd-zlib-level": 1,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Why an unimplemented parameter cannot take another value.
fn missing_feature(name: &str) -> &'static str {
    match name {
        n if n.starts_with("announce-") => "vmm has no network devices to announce",
        n if n.starts_with("compress-") || n == "decompress-threads" => {
            "the compress capability is not built; use multifd-compression zstd"
        }
        "x-checkpoint-delay" => "COLO is not built",
        "block-incremental" | "block-bitmap-mapping" => {
            "disks are copied whole, as each --drive's migrate= says"
        }
        "xbzrle-cache-size" => "xbzrle is not built",
        "multifd-zlib-level" => "multifd-compression zlib is not built; use zstd",
        "cpu-throttle-tailslow" => "auto-converge throttles as QEMU does without tailslow",
        _ => "vmm does not implement it",
    }
}

/// `migrate-set-parameters`' arguments (already checked against the schema) as the
/// parameters to change; every one is checked before any is applied.
///
/// # Errors
/// A value out of range, or a parameter vmm lacks set to other than its default.
pub fn parameters(args: &Value) -> Result<Vec<Parameter>, QmpError> {
    let defaults = unimplemented_defaults();
    let mut out = Vec::new();
    let Some(map) = args.as_object() else {
        return Ok(out);
    };
    // In the schema's order, so a reply names the same first culprit every time.
    for member in MIGRATION_PARAMETERS.members {
        let (k, Some(v)) = (member.name, map.get(member.name)) else {
            continue;
        };
        if let Some(d) = defaults.get(k) {
            if v != d {
                return Err(QmpError::generic(format!(
                    "Parameter '{k}' can only be {d} here: {}",
                    missing_feature(k)
                )));
            }
            continue;
        }
        if k == "block-bitmap-mapping" {
            if v.as_array().is_some_and(|a| !a.is_empty()) {
                return Err(QmpError::generic(format!(
                    "Parameter '{k}' can only be empty here: {}",
                    missing_feature(k)
                )));
            }
            continue;
        }
        if k.starts_with("tls-") {
            let v = v.as_str().unwrap_or_default().to_string();
            out.push(match k {
                "tls-creds" => Parameter::TlsCreds(v),
                "tls-hostname" => Parameter::TlsHostname(v),
                _ => Parameter::TlsAuthz(v),
            });
            continue;
        }
        if k == "x-postcopy-auto" {
            out.push(Parameter::PostcopyAuto(v.as_bool().unwrap_or(false)));
            continue;
        }
        if k == "multifd-compression" {
            out.push(Parameter::MultifdCompression(match v.as_str() {
                Some("none") => MultifdCompression::None,
                Some("zstd") => MultifdCompression::Zstd,
                _ => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'multifd-compression': zlib is not supported here: {}",
                        missing_feature("multifd-zlib-level")
                    )));
                }
            }));
            continue;
        }
        // The schema has checked that the rest are unsigned integers.
        let n = v.as_u64().unwrap_or(u64::MAX);
        out.push(match k {
            "downtime-limit" if n > MAX_DOWNTIME_LIMIT_MS => {
                return Err(QmpError::generic(format!(
                    "Parameter 'downtime-limit' expects a value in range [0, {MAX_DOWNTIME_LIMIT_MS}] ms"
                )));
            }
            "downtime-limit" => Parameter::DowntimeLimit(Duration::from_millis(n)),
            "max-bandwidth" => Parameter::MaxBandwidth(n),
            "max-postcopy-bandwidth" => Parameter::MaxPostcopyBandwidth(n),
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
            "x-incoming-timeout" if n < MIN_STALL_TIMEOUT_MS => {
                return Err(QmpError::generic(format!(
                    "Parameter 'x-incoming-timeout' expects at least {MIN_STALL_TIMEOUT_MS} ms"
                )));
            }
            "x-incoming-timeout" => Parameter::IncomingTimeout(Duration::from_millis(n)),
            "multifd-channels" => Parameter::MultifdChannels(in_range(k, n, 255)?),
            "multifd-zstd-level" if n > 20 => {
                return Err(QmpError::generic(
                    "Parameter 'multifd-zstd-level' expects an integer in the range of 0 to 20",
                ));
            }
            "multifd-zstd-level" => Parameter::MultifdZstdLevel(n as u8),
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter '{other}' is not supported"
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

/// The session's TLS parameters, as `query-migrate-parameters` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `tls-creds`.
    pub creds: String,
    /// `tls-hostname`.
    pub hostname: String,
    /// `tls-authz`.
    pub authz: String,
}

/// `query-migrate-parameters`' answer: every QEMU 7.2 parameter, in QEMU's order.
pub fn query_parameters(s: &Settings, tls: &TlsParams) -> Value {
    let (p, ram) = (&s.migration, &s.ram);
    let defaults = unimplemented_defaults();
    let ours = json!({
        "tls-creds": tls.creds,
        "tls-hostname": tls.hostname,
        "tls-authz": tls.authz,
        "downtime-limit": p.downtime_limit.as_millis() as u64,
        "max-bandwidth": p.max_bandwidth,
        "cpu-throttle-initial": p.cpu_throttle_initial,
        "cpu-throttle-increment": p.cpu_throttle_increment,
        "max-cpu-throttle": p.max_cpu_throttle,
        "throttle-trigger-threshold": p.throttle_trigger_threshold,
        "x-stall-timeout": p.stall_timeout.as_millis() as u64,
        "x-incoming-timeout": p.incoming_timeout.as_millis() as u64,
        "multifd-channels": ram.multifd_channels,
        "multifd-compression": ram.multifd_compression.as_str(),
        "multifd-zstd-level": ram.multifd_zstd_level,
        "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
        "x-postcopy-auto": p.postcopy_auto,
    });
    let mut out = Map::new();
    for member in MIGRATION_PARAMETERS.members {
        let v = defaults.get(member.name).or_else(|| ours.get(member.name));
        if let Some(v) = v {
            out.insert(member.name.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

/// A migration capability vmm implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `events`: MIGRATION and MIGRATION_PASS events.
    Events,
    /// `return-path`: the destination acknowledges the load.
    ReturnPath,
    /// `auto-converge`: throttle vCPUs that dirty memory faster than it is sent.
    AutoConverge,
    /// `multifd`: RAM pages over `multifd-channels` extra connections.
    Multifd,
    /// `pause-before-switchover`: wait in `pre-switchover` for `migrate-continue`.
    PauseBeforeSwitchover,
    /// `x-ignore-shared`: RAM in shared memory (`--memory-backend memfd`) is handed over
    /// with its descriptor, not copied.
    IgnoreShared,
    /// `postcopy-ram`: the migration may switch to post-copy (`migrate-start-postcopy`).
    PostcopyRam,
    /// `postcopy-blocktime`: a destination reports how long the guest waited for pages.
    PostcopyBlocktime,
    /// `postcopy-preempt`: the pages a post-copy destination asks for go on a second
    /// connection of their own.
    PostcopyPreempt,
}

impl Capability {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Events => "events",
            Capability::ReturnPath => "return-path",
            Capability::AutoConverge => "auto-converge",
            Capability::Multifd => "multifd",
            Capability::PauseBeforeSwitchover => "pause-before-switchover",
            Capability::IgnoreShared => "x-ignore-shared",
            Capability::PostcopyRam => "postcopy-ram",
            Capability::PostcopyBlocktime => "postcopy-blocktime",
            Capability::PostcopyPreempt => "postcopy-preempt",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Capability::Events,
            Capability::ReturnPath,
            Capability::AutoConverge,
            Capability::Multifd,
            Capability::PauseBeforeSwitchover,
            Capability::IgnoreShared,
            Capability::PostcopyRam,
            Capability::PostcopyBlocktime,
            Capability::PostcopyPreempt,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }
}

/// `migrate-set-capabilities`' arguments (already checked against the schema): the
/// capabilities vmm implements with their new states. A capability vmm lacks may be
/// turned off (it is), not on.
///
/// # Errors
/// A capability vmm lacks turned on.
pub fn capabilities(args: &Value) -> Result<Vec<(Capability, bool)>, QmpError> {
    let mut out = Vec::new();
    for c in args["capabilities"].as_array().into_iter().flatten() {
        let (Some(name), Some(state)) = (c["capability"].as_str(), c["state"].as_bool()) else {
            return Err(QmpError::generic(
                "Each capability needs 'capability' (a string) and 'state' (a boolean)",
            ));
        };
        match Capability::from_name(name) {
            Some(cap) => out.push((cap, state)),
            None if !state => {}
            None => {
                return Err(QmpError::generic(format!(
                    "Capability '{}' is not supported by vmm: {}",
                    super::error::bounded(name),
                    missing_capability(name)
                )));
            }
        }
    }
    Ok(out)
}

fn missing_capability(name: &str) -> &'static str {
    match name {
        "block" => "disks are copied as each --drive's migrate= says",
        "compress" => "use multifd with multifd-compression zstd",
        "x-colo" => "COLO is not built",
        "zero-copy-send" => "multifd sends pages from guest memory with writev already",
        _ => "not built",
    }
}

/// `query-migrate-capabilities`' answer: every QEMU 7.2 capability, in QEMU's order, with
/// `state(cap)` for those vmm implements and false for the rest.
pub fn query_capabilities(state: impl Fn(Capability) -> bool) -> Value {
    Value::Array(
        MIGRATION_CAPABILITY
            .values
            .iter()
            .map(|name| {
                let on = Capability::from_name(name).is_some_and(&state);
                json!({"capability": name, "state": on})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_parameters_take_only_their_default() {
        assert_eq!(
            parameters(&json!({"announce-rounds": 5, "block-bitmap-mapping": []})),
            Ok(vec![])
        );
        assert_eq!(
            parameters(&json!({"tls-creds": "tls0", "tls-hostname": "", "tls-authz": "auth0"})),
            Ok(vec![
                Parameter::TlsCreds("tls0".into()),
                Parameter::TlsHostname(String::new()),
                Parameter::TlsAuthz("auth0".into())
            ])
        );
        let e = parameters(&json!({"compress-threads": 2})).unwrap_err();
        assert!(e.desc.contains("zstd"), "{}", e.desc);
        // Every parameter QEMU has is listed, with vmm's values where it has them.
        let q = query_parameters(&Settings::default(), &TlsParams::default());
        for m in MIGRATION_PARAMETERS.members {
            if m.name != "block-bitmap-mapping" {
                assert!(q.get(m.name).is_some(), "{}", m.name);
            }
        }
        assert_eq!(q["downtime-limit"], 300);
        // What is listed can be set back as it is.
        let all = q.clone();
        assert!(parameters(&all).is_ok());
    }

    #[test]
    fn capabilities_vmm_lacks_may_be_turned_off_only() {
        assert_eq!(
            capabilities(&json!({"capabilities": [
                {"capability": "compress", "state": false},
                {"capability": "events", "state": false},
                {"capability": "pause-before-switchover", "state": true}]})),
            Ok(vec![
                (Capability::Events, false),
                (Capability::PauseBeforeSwitchover, true)
            ])
        );
        let e = capabilities(&json!({"capabilities": [{"capability": "compress", "state": true}]}))
            .unwrap_err();
        assert!(e.desc.contains("zstd"), "{}", e.desc);
        let q = query_capabilities(|c| c == Capability::Events);
        assert_eq!(
            q.as_array().unwrap().len(),
            MIGRATION_CAPABILITY.values.len()
        );
        assert_eq!(q[5], json!({"capability": "events", "state": true}));
    }
}
