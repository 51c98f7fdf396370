//! The one table of what vmm's QMP offers: every command with its argument and return
//! types, every event with its data. Arguments are checked against it (QEMU's
//! input-visitor errors: an unexpected, missing or wrongly typed member is refused,
//! named with its path), and `query-commands` and `query-qmp-schema` are generated from
//! it, so what is advertised is what exists.
//!
//! ```
//! use serde_json::json;
//! use vmm::qmp::schema::{check_arguments, command};
//!
//! let stop = command("stop").unwrap();
//! let e = check_arguments(stop, &json!({"bogus": 1})).unwrap_err();
//! assert_eq!(e, "Parameter 'bogus' is unexpected");
//! ```

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// A QAPI type, as far as vmm's commands need them.
#[derive(Debug, Clone, Copy)]
pub enum Type {
    /// `str`.
    Str,
    /// A signed integer (`int`).
    Int,
    /// An unsigned integer of at most `bits` bits (`uint8` ... `uint64`, `size`).
    Uint(u32),
    /// `bool`.
    Bool,
    /// `number` (a double; integers are accepted too).
    Number,
    /// `any`.
    Any,
    /// An enumeration.
    Enum(&'static EnumDef),
    /// `[T]`.
    Array(&'static Type),
    /// A structure.
    Object(&'static ObjectDef),
}

/// An enumeration type and its values.
#[derive(Debug)]
pub struct EnumDef {
    /// QAPI's name (shown in errors; masked in the schema, as QEMU does).
    pub name: &'static str,
    /// The values.
    pub values: &'static [&'static str],
}

/// A structure type and its members.
#[derive(Debug)]
pub struct ObjectDef {
    /// QAPI's name.
    pub name: &'static str,
    /// The members, in order.
    pub members: &'static [Member],
}

/// A member of a structure (or an argument of a command).
#[derive(Debug)]
pub struct Member {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: Type,
    /// Whether it may be left out.
    pub optional: bool,
}

/// A command.
#[derive(Debug)]
pub struct CommandDef {
    /// Its name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static ObjectDef,
    /// What it returns (`{}` for most that act).
    pub ret: Type,
}

/// An event.
#[derive(Debug)]
pub struct EventDef {
    /// Its name.
    pub name: &'static str,
    /// Its data.
    pub data: &'static ObjectDef,
}

const fn m(name: &'static str, ty: Type) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

const fn opt(name: &'static str, ty: Type) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// A structure type declared where it is used.
macro_rules! obj {
    ($name:expr, &[$($member:expr),* $(,)?] $(,)?) => {
        Type::Object(&ObjectDef { name: $name, members: &[$($member),*] })
    };
}

static EMPTY: ObjectDef = ObjectDef {
    name: "",
    members: &[],
};

/// A command's arguments (or an event's data): a structure without a name.
macro_rules! args {
    (&[$($member:expr),* $(,)?] $(,)?) => {
        &ObjectDef { name: "", members: &[$($member),*] }
    };
}

/// QEMU 7.2's migration states.
pub static MIGRATION_STATUS: EnumDef = EnumDef {
    name: "MigrationStatus",
    values: &[
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "completed",
        "failed",
        "colo",
        "pre-switchover",
        "device",
        "wait-unplug",
    ],
};

/// QEMU 7.2's run states.
pub static RUN_STATE: EnumDef = EnumDef {
    name: "RunState",
    values: &[
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    ],
};

/// QEMU 7.2's migration capabilities, every one of them (those vmm lacks are refused
/// when turned on, accepted when turned off).
pub static MIGRATION_CAPABILITY: EnumDef = EnumDef {
    name: "MigrationCapability",
    values: &[
        "xbzrle",
        "rdma-pin-all",
        "auto-converge",
        "zero-blocks",
        "compress",
        "events",
        "postcopy-ram",
        "x-colo",
        "release-ram",
        "block",
        "return-path",
        "pause-before-switchover",
        "multifd",
        "dirty-bitmaps",
        "postcopy-blocktime",
        "late-block-activate",
        "x-ignore-shared",
        "validate-uuid",
        "background-snapshot",
        "zero-copy-send",
        "postcopy-preempt",
    ],
};

static MULTIFD_COMPRESSION: EnumDef = EnumDef {
    name: "MultiFDCompression",
    values: &["none", "zlib", "zstd"],
};

static TLS_ENDPOINT: EnumDef = EnumDef {
    name: "QCryptoTLSCredsEndpoint",
    values: &["client", "server"],
};

static AUTHZ_POLICY: EnumDef = EnumDef {
    name: "QAuthZListPolicy",
    values: &["deny", "allow"],
};

static AUTHZ_FORMAT: EnumDef = EnumDef {
    name: "QAuthZListFormat",
    values: &["exact", "glob"],
};

static QMP_CAPABILITY: EnumDef = EnumDef {
    name: "QMPCapability",
    values: &["oob"],
};

static SHUTDOWN_CAUSE: EnumDef = EnumDef {
    name: "ShutdownCause",
    values: &[
        "none",
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
        "subsystem-reset",
        "snapshot-load",
    ],
};

static CPU_S390_STATE: EnumDef = EnumDef {
    name: "CpuS390State",
    values: &[
        "uninitialized",
        "stopped",
        "check-stop",
        "operating",
        "load",
    ],
};

/// QEMU 7.2's migration parameters: every member of `migrate-set-parameters` (and of
/// `query-migrate-parameters`' answer), vmm's own `x-stall-timeout`,
/// `x-incoming-timeout` and `x-postcopy-auto` at the end.
pub static MIGRATION_PARAMETERS: ObjectDef = ObjectDef {
    name: "MigrateSetParameters",
    members: &[
        opt("announce-initial", Type::Uint(64)),
        opt("announce-max", Type::Uint(64)),
        opt("announce-rounds", Type::Uint(64)),
        opt("announce-step", Type::Uint(64)),
        opt("compress-level", Type::Uint(8)),
        opt("compress-threads", Type::Uint(8)),
        opt("compress-wait-thread", Type::Bool),
        opt("decompress-threads", Type::Uint(8)),
        opt("throttle-trigger-threshold", Type::Uint(8)),
        opt("cpu-throttle-initial", Type::Uint(8)),
        opt("cpu-throttle-increment", Type::Uint(8)),
        opt("cpu-throttle-tailslow", Type::Bool),
        opt("tls-creds", Type::Str),
        opt("tls-hostname", Type::Str),
        opt("tls-authz", Type::Str),
        opt("max-bandwidth", Type::Uint(64)),
        opt("downtime-limit", Type::Uint(64)),
        opt("x-checkpoint-delay", Type::Uint(32)),
        opt("block-incremental", Type::Bool),
        opt("multifd-channels", Type::Uint(8)),
        opt("xbzrle-cache-size", Type::Uint(64)),
        opt("max-postcopy-bandwidth", Type::Uint(64)),
        opt("max-cpu-throttle", Type::Uint(8)),
        opt("multifd-compression", Type::Enum(&MULTIFD_COMPRESSION)),
        opt("multifd-zlib-level", Type::Uint(8)),
        opt("multifd-zstd-level", Type::Uint(8)),
        opt(
            "block-bitmap-mapping",
            Type::Array(&obj!(
                "BitmapMigrationNodeAlias",
                &[
                    m("node-name", Type::Str),
                    m("alias", Type::Str),
                    opt(
                        "bitmaps",
                        Type::Array(&obj!(
                            "BitmapMigrationBitmapAlias",
                            &[m("name", Type::Str), m("alias", Type::Str)],
                        )),
                    ),
                ],
            )),
        ),
        opt("x-stall-timeout", Type::Uint(64)),
        opt("x-incoming-timeout", Type::Uint(64)),
        opt("x-postcopy-auto", Type::Bool),
    ],
};

static MIGRATION_STATS: ObjectDef = ObjectDef {
    name: "MigrationStats",
    members: &[
        m("transferred", Type::Int),
        m("remaining", Type::Int),
        m("total", Type::Int),
        m("duplicate", Type::Int),
        m("skipped", Type::Int),
        m("normal", Type::Int),
        m("normal-bytes", Type::Int),
        m("dirty-pages-rate", Type::Int),
        m("mbps", Type::Number),
        m("dirty-sync-count", Type::Int),
        m("postcopy-requests", Type::Int),
        m("page-size", Type::Int),
        m("multifd-bytes", Type::Uint(64)),
        m("pages-per-second", Type::Uint(64)),
        m("precopy-bytes", Type::Uint(64)),
        m("downtime-bytes", Type::Uint(64)),
        m("postcopy-bytes", Type::Uint(64)),
        m("dirty-sync-missed-zero-copy", Type::Uint(64)),
    ],
};

static MIGRATION_INFO: ObjectDef = ObjectDef {
    name: "MigrationInfo",
    members: &[
        opt("status", Type::Enum(&MIGRATION_STATUS)),
        opt("ram", Type::Object(&MIGRATION_STATS)),
        opt(
            "disk",
            obj!(
                "MigrationStats",
                &[
                    m("transferred", Type::Int),
                    m("remaining", Type::Int),
                    m("total", Type::Int),
                ],
            ),
        ),
        opt("total-time", Type::Int),
        opt("expected-downtime", Type::Int),
        opt("downtime", Type::Int),
        opt("setup-time", Type::Int),
        opt("cpu-throttle-percentage", Type::Int),
        opt("error-desc", Type::Str),
        opt("x-completion-breakdown", Type::Any),
    ],
};

static STATUS_INFO: ObjectDef = ObjectDef {
    name: "StatusInfo",
    members: &[
        m("running", Type::Bool),
        m("singlestep", Type::Bool),
        m("status", Type::Enum(&RUN_STATE)),
    ],
};

static VERSION_INFO: ObjectDef = ObjectDef {
    name: "VersionInfo",
    members: &[
        m(
            "qemu",
            obj!(
                "VersionTriple",
                &[
                    m("major", Type::Int),
                    m("minor", Type::Int),
                    m("micro", Type::Int),
                ],
            ),
        ),
        m("package", Type::Str),
    ],
};

static CAPABILITY_STATUS: ObjectDef = ObjectDef {
    name: "MigrationCapabilityStatus",
    members: &[
        m("capability", Type::Enum(&MIGRATION_CAPABILITY)),
        m("state", Type::Bool),
    ],
};

static CPU_INFO_FAST: ObjectDef = ObjectDef {
    name: "CpuInfoFast",
    members: &[
        m("cpu-index", Type::Int),
        m("qom-path", Type::Str),
        m("thread-id", Type::Int),
        opt(
            "props",
            obj!(
                "CpuInstanceProperties",
                &[
                    opt("node-id", Type::Int),
                    opt("socket-id", Type::Int),
                    opt("die-id", Type::Int),
                    opt("cluster-id", Type::Int),
                    opt("core-id", Type::Int),
                    opt("thread-id", Type::Int),
                ],
            ),
        ),
        m("target", Type::Str),
        opt("cpu-state", Type::Enum(&CPU_S390_STATE)),
    ],
};

/// Every command, in the order `query-commands` lists them.
pub static COMMANDS: &[CommandDef] = &[
    CommandDef {
        name: "qmp_capabilities",
        args: args!(&[opt("enable", Type::Array(&Type::Enum(&QMP_CAPABILITY)))]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "query-version",
        args: &EMPTY,
        ret: Type::Object(&VERSION_INFO),
    },
    CommandDef {
        name: "query-commands",
        args: &EMPTY,
        ret: Type::Array(&obj!("CommandInfo", &[m("name", Type::Str)])),
    },
    CommandDef {
        name: "query-qmp-schema",
        args: &EMPTY,
        ret: Type::Array(&Type::Any),
    },
    CommandDef {
        name: "query-name",
        args: &EMPTY,
        ret: obj!("NameInfo", &[opt("name", Type::Str)]),
    },
    CommandDef {
        name: "query-kvm",
        args: &EMPTY,
        ret: obj!(
            "KvmInfo",
            &[m("enabled", Type::Bool), m("present", Type::Bool)],
        ),
    },
    CommandDef {
        name: "query-target",
        args: &EMPTY,
        ret: obj!("TargetInfo", &[m("arch", Type::Str)]),
    },
    CommandDef {
        name: "query-cpus-fast",
        args: &EMPTY,
        ret: Type::Array(&Type::Object(&CPU_INFO_FAST)),
    },
    CommandDef {
        name: "query-status",
        args: &EMPTY,
        ret: Type::Object(&STATUS_INFO),
    },
    CommandDef {
        name: "stop",
        args: &EMPTY,
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "cont",
        args: &EMPTY,
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "quit",
        args: &EMPTY,
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "migrate",
        args: args!(&[
            m("uri", Type::Str),
            opt("blk", Type::Bool),
            opt("inc", Type::Bool),
            opt("detach", Type::Bool),
            opt("resume", Type::Bool),
        ]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "migrate-incoming",
        args: args!(&[m("uri", Type::Str)]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "migrate_cancel",
        args: &EMPTY,
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "migrate-recover",
        args: args!(&[m("uri", Type::Str)]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "migrate-start-postcopy",
        args: &EMPTY,
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "migrate-continue",
        args: args!(&[m("state", Type::Enum(&MIGRATION_STATUS))]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "query-migrate",
        args: &EMPTY,
        ret: Type::Object(&MIGRATION_INFO),
    },
    CommandDef {
        name: "migrate-set-parameters",
        args: &MIGRATION_PARAMETERS,
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "query-migrate-parameters",
        args: &EMPTY,
        ret: Type::Object(&MIGRATION_PARAMETERS),
    },
    CommandDef {
        name: "migrate-set-capabilities",
        args: args!(&[m(
            "capabilities",
            Type::Array(&Type::Object(&CAPABILITY_STATUS)),
        )]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "query-migrate-capabilities",
        args: &EMPTY,
        ret: Type::Array(&Type::Object(&CAPABILITY_STATUS)),
    },
    CommandDef {
        name: "getfd",
        args: args!(&[m("fdname", Type::Str)]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "closefd",
        args: args!(&[m("fdname", Type::Str)]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "object-add",
        // QEMU's is a union on qom-type; here the members of vmm's types together
        // (tls-creds-x509; authz-simple, authz-list, authz-listfile), each type's own
        // checked by the object's reader.
        args: args!(&[
            m("qom-type", Type::Str),
            m("id", Type::Str),
            opt("dir", Type::Str),
            opt("endpoint", Type::Enum(&TLS_ENDPOINT)),
            opt("verify-peer", Type::Bool),
            opt("identity", Type::Str),
            opt("policy", Type::Enum(&AUTHZ_POLICY)),
            opt(
                "rules",
                Type::Array(&obj!(
                    "QAuthZListRule",
                    &[
                        m("match", Type::Str),
                        m("policy", Type::Enum(&AUTHZ_POLICY)),
                        opt("format", Type::Enum(&AUTHZ_FORMAT)),
                    ],
                )),
            ),
            opt("filename", Type::Str),
            opt("refresh", Type::Bool),
        ]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "object-del",
        args: args!(&[m("id", Type::Str)]),
        ret: Type::Object(&EMPTY),
    },
    CommandDef {
        name: "human-monitor-command",
        args: args!(&[m("command-line", Type::Str), opt("cpu-index", Type::Int)]),
        ret: Type::Str,
    },
    CommandDef {
        name: "x-query-guest",
        args: &EMPTY,
        ret: Type::Any,
    },
];

/// Every event vmm emits.
pub static EVENTS: &[EventDef] = &[
    EventDef {
        name: "MIGRATION",
        data: args!(&[m("status", Type::Enum(&MIGRATION_STATUS))]),
    },
    EventDef {
        name: "MIGRATION_PASS",
        data: args!(&[m("pass", Type::Int)]),
    },
    EventDef {
        name: "STOP",
        data: &EMPTY,
    },
    EventDef {
        name: "RESUME",
        data: &EMPTY,
    },
    EventDef {
        name: "SHUTDOWN",
        data: args!(&[
            m("guest", Type::Bool),
            m("reason", Type::Enum(&SHUTDOWN_CAUSE)),
        ]),
    },
];

/// The command called `name`.
pub fn command(name: &str) -> Option<&'static CommandDef> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Checks a command's `arguments` (an object, or absent as `null`) against its
/// declaration, with QEMU's messages.
///
/// # Errors
/// The first member that is unexpected, missing or of the wrong type.
pub fn check_arguments(cmd: &CommandDef, args: &Value) -> Result<(), String> {
    let empty = Map::new();
    let map = match args {
        Value::Null => &empty,
        Value::Object(m) => m,
        _ => return Err("QMP input member 'arguments' must be an object".into()),
    };
    check_members(cmd.args, map, "")
}

fn check_members(def: &ObjectDef, map: &Map<String, Value>, path: &str) -> Result<(), String> {
    for member in def.members {
        match map.get(member.name) {
            Some(v) => check_value(&member.ty, v, &join(path, member.name))?,
            None if member.optional => {}
            None => {
                return Err(format!(
                    "Parameter '{}' is missing",
                    join(path, member.name)
                ));
            }
        }
    }
    if let Some(k) = map
        .keys()
        .find(|k| !def.members.iter().any(|m| m.name == k.as_str()))
    {
        return Err(format!(
            "Parameter '{}' is unexpected",
            join(path, &super::error::bounded(k))
        ));
    }
    Ok(())
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn check_value(ty: &Type, v: &Value, path: &str) -> Result<(), String> {
    let wrong = |expected: &str| {
        Err(format!(
            "Invalid parameter type for '{path}', expected: {expected}"
        ))
    };
    match ty {
        Type::Any => Ok(()),
        Type::Str if v.is_string() => Ok(()),
        Type::Str => wrong("string"),
        Type::Bool if v.is_boolean() => Ok(()),
        Type::Bool => wrong("boolean"),
        Type::Number if v.is_number() => Ok(()),
        Type::Number => wrong("number"),
        Type::Int if v.is_i64() => Ok(()),
        Type::Int if v.is_number() => Err(format!("Parameter '{path}' expects int64")),
        Type::Int => wrong("integer"),
        Type::Uint(bits) => match v.as_u64() {
            Some(n) if *bits >= 64 || n < 1 << bits => Ok(()),
            _ if v.is_number() => Err(format!("Parameter '{path}' expects uint{bits}")),
            _ => wrong("integer"),
        },
        Type::Enum(e) => match v.as_str() {
            Some(s) if e.values.contains(&s) => Ok(()),
            Some(s) => Err(format!(
                "Parameter '{path}' does not accept value '{}'",
                super::error::bounded(s)
            )),
            None => wrong("string"),
        },
        Type::Array(elem) => match v.as_array() {
            Some(list) => list
                .iter()
                .enumerate()
                .try_for_each(|(i, x)| check_value(elem, x, &format!("{path}[{i}]"))),
            None => wrong("array"),
        },
        Type::Object(def) => match v.as_object() {
            Some(map) => check_members(def, map, path),
            None => wrong("object"),
        },
    }
}

/// `query-commands`' answer.
pub fn query_commands() -> Value {
    Value::Array(COMMANDS.iter().map(|c| json!({"name": c.name})).collect())
}

/// `query-qmp-schema`'s answer: QEMU's SchemaInfo list, with type names masked as
/// numbers as QEMU masks them (clients must look them up, never rely on them).
pub fn query_qmp_schema() -> Value {
    let mut s = SchemaBuilder::default();
    let mut out = Vec::new();
    for c in COMMANDS {
        let arg = s.object_name(c.args);
        let ret = s.name(&c.ret);
        out.push(
            json!({"name": c.name, "meta-type": "command", "arg-type": arg, "ret-type": ret,
                        "allow-oob": false}),
        );
    }
    for e in EVENTS {
        let arg = s.object_name(e.data);
        out.push(json!({"name": e.name, "meta-type": "event", "arg-type": arg}));
    }
    out.extend(s.types.into_values());
    Value::Array(out)
}

/// Collects the types the commands and events use, each once, with its masked name.
#[derive(Default)]
struct SchemaBuilder {
    /// Type entries by their name.
    types: BTreeMap<String, Value>,
    /// Masked names already given, by the type's identity.
    masked: Vec<(usize, String)>,
}

impl SchemaBuilder {
    fn mask(&mut self, id: usize) -> (String, bool) {
        if let Some((_, n)) = self.masked.iter().find(|(i, _)| *i == id) {
            return (n.clone(), false);
        }
        let n = self.masked.len().to_string();
        self.masked.push((id, n.clone()));
        (n, true)
    }

    fn builtin(&mut self, name: &str, json_type: &str) -> String {
        self.types.entry(name.to_string()).or_insert_with(
            || json!({"name": name, "meta-type": "builtin", "json-type": json_type}),
        );
        name.to_string()
    }

    fn name(&mut self, ty: &Type) -> String {
        match ty {
            Type::Str => self.builtin("str", "string"),
            Type::Int | Type::Uint(_) => self.builtin("int", "int"),
            Type::Bool => self.builtin("bool", "boolean"),
            Type::Number => self.builtin("number", "number"),
            Type::Any => self.builtin("any", "value"),
            Type::Enum(e) => {
                let (n, new) = self.mask(*e as *const EnumDef as usize);
                if new {
                    let members: Vec<Value> = e.values.iter().map(|v| json!({"name": v})).collect();
                    self.types.insert(
                        n.clone(),
                        json!({"name": n, "meta-type": "enum", "values": e.values, "members": members}),
                    );
                }
                n
            }
            Type::Array(elem) => {
                let e = self.name(elem);
                let n = format!("[{e}]");
                self.types
                    .entry(n.clone())
                    .or_insert_with(|| json!({"name": n, "meta-type": "array", "element-type": e}));
                n
            }
            Type::Object(def) => self.object_name(def),
        }
    }

    fn object_name(&mut self, def: &ObjectDef) -> String {
        let (n, new) = self.mask(def as *const ObjectDef as usize);
        if new {
            let members: Vec<Value> = def
                .members
                .iter()
                .map(|m| {
                    let ty = self.name(&m.ty);
                    if m.optional {
                        json!({"name": m.name, "type": ty, "default": null})
                    } else {
                        json!({"name": m.name, "type": ty})
                    }
                })
                .collect();
            self.types.insert(
                n.clone(),
                json!({"name": n, "meta-type": "object", "members": members}),
            );
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, args: Value) -> Result<(), String> {
        check_arguments(command(name).unwrap(), &args)
    }

    #[test]
    fn arguments_are_checked_with_qemus_messages() {
        assert_eq!(check("stop", json!(null)), Ok(()));
        assert_eq!(check("stop", json!({})), Ok(()));
        assert_eq!(
            check("stop", json!({"bogus": 1})),
            Err("Parameter 'bogus' is unexpected".into())
        );
        assert_eq!(
            check("migrate", json!({})),
            Err("Parameter 'uri' is missing".into())
        );
        assert_eq!(
            check("migrate", json!({"uri": 5})),
            Err("Invalid parameter type for 'uri', expected: string".into())
        );
        assert_eq!(
            check("migrate", json!({"uri": "unix:/x", "resume": true})),
            Ok(())
        );
        assert_eq!(
            check("migrate-set-parameters", json!({"downtime-limit": -1})),
            Err("Parameter 'downtime-limit' expects uint64".into())
        );
        assert_eq!(
            check("migrate-set-parameters", json!({"multifd-channels": 256})),
            Err("Parameter 'multifd-channels' expects uint8".into())
        );
        assert_eq!(
            check("migrate-set-parameters", json!({"downtime-limit": "x"})),
            Err("Invalid parameter type for 'downtime-limit', expected: integer".into())
        );
        assert_eq!(
            check(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "events", "state": true}, {"capability": "nope", "state": true}]})
            ),
            Err("Parameter 'capabilities[1].capability' does not accept value 'nope'".into())
        );
        assert_eq!(
            check(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "events"}]})
            ),
            Err("Parameter 'capabilities[0].state' is missing".into())
        );
        assert_eq!(
            check("qmp_capabilities", json!({"enable": ["oob"]})),
            Ok(())
        );
    }

    #[test]
    fn the_schema_describes_every_command_and_its_types() {
        let schema = query_qmp_schema();
        let list = schema.as_array().unwrap();
        let by_name = |n: &str| list.iter().find(|e| e["name"] == n).cloned();
        for c in COMMANDS {
            let e = by_name(c.name).unwrap();
            assert_eq!(e["meta-type"], "command");
            let arg = by_name(e["arg-type"].as_str().unwrap()).unwrap();
            assert_eq!(arg["meta-type"], "object");
            assert!(
                by_name(e["ret-type"].as_str().unwrap()).is_some(),
                "{}",
                c.name
            );
        }
        // migrate's arguments, as libvirt probes them.
        let migrate = by_name("migrate").unwrap();
        let arg = by_name(migrate["arg-type"].as_str().unwrap()).unwrap();
        assert_eq!(arg["members"][0], json!({"name": "uri", "type": "str"}));
        assert_eq!(
            arg["members"][4],
            json!({"name": "resume", "type": "bool", "default": null})
        );
        // Every type named anywhere is defined once.
        let mut names: Vec<&str> = list.iter().map(|e| e["name"].as_str().unwrap()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
        assert_eq!(query_commands().as_array().unwrap().len(), COMMANDS.len());
    }
}
