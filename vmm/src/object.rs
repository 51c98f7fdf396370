//! Objects as QEMU's `-object` and QMP `object-add` declare them: x509 credentials
//! (`tls-creds-x509`, which `tls-creds` names) and authorization lists (`authz-simple`,
//! `authz-list`, `authz-listfile`, which `tls-authz` names).
//!
//! As in QEMU, the command line is read into the same shape as `object-add`'s arguments
//! (`rules.0.match=...` becomes `"rules": [{"match": ...}]`, `,,` is a comma inside a
//! value) and both are read by one function, so they accept the same objects.

use std::path::PathBuf;
use std::str::FromStr;

use qemu_file::{Authz, AuthzFormat, AuthzPolicy, AuthzRule};
use serde_json::{Map, Value};

/// An object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectSpec {
    /// `tls-creds-x509`.
    TlsCreds(TlsCredsSpec),
    /// `authz-simple`, `authz-list` or `authz-listfile`.
    Authz(AuthzSpec),
}

impl ObjectSpec {
    /// The object's id.
    pub fn id(&self) -> &str {
        match self {
            ObjectSpec::TlsCreds(t) => &t.id,
            ObjectSpec::Authz(a) => &a.id,
        }
    }
}

/// `tls-creds-x509,id=ID,dir=DIR[,endpoint=client|server][,verify-peer=on|off]`
/// (`endpoint` defaults to client and `verify-peer` to on, as in QEMU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredsSpec {
    /// The object's id, which the `tls-creds` parameter names.
    pub id: String,
    /// The directory with QEMU's file names.
    pub dir: PathBuf,
    /// A destination's (`server`) or a source's (`client`).
    pub server: bool,
    /// Whether the peer must present a certificate signed by the CA.
    pub verify_peer: bool,
}

/// An authorization object: the distinguished names a destination lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzSpec {
    /// The object's id, which the `tls-authz` parameter names.
    pub id: String,
    /// Where its rules are.
    pub source: AuthzSource,
}

/// Where an authorization object's rules are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzSource {
    /// Given with the object (`authz-simple`'s identity, `authz-list`'s rules).
    Rules(Authz),
    /// `authz-listfile`: a JSON file `{"policy": ..., "rules": [...]}`, read again at
    /// every incoming migration (QEMU's `refresh=on`, without a watch).
    File(PathBuf),
}

impl AuthzSpec {
    /// The rules in force now.
    ///
    /// # Errors
    /// An `authz-listfile` that cannot be read or parsed.
    pub fn load(&self) -> Result<Authz, String> {
        match &self.source {
            AuthzSource::Rules(a) => Ok(a.clone()),
            AuthzSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("authz-listfile '{}': {}: {e}", self.id, path.display())
                })?;
                let v: Value = serde_json::from_str(&text).map_err(|e| {
                    format!("authz-listfile '{}': {}: {e}", self.id, path.display())
                })?;
                let o = v.as_object().ok_or_else(|| {
                    format!(
                        "authz-listfile '{}': {} holds no JSON object",
                        self.id,
                        path.display()
                    )
                })?;
                list(&self.id, o)
            }
        }
    }
}

/// QEMU's `-object` syntax: `TYPE,key=value,...` with `,,` for a comma in a value and
/// dotted keys for nested members.
impl FromStr for ObjectSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = split_options(s).into_iter();
        let ty = parts.next().filter(|t| !t.contains('=')).ok_or_else(|| {
            "--object needs a type first (tls-creds-x509, authz-simple, authz-list, authz-listfile)"
                .to_string()
        })?;
        let mut root = Map::new();
        root.insert("qom-type".into(), Value::String(ty));
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value in --object, got {part:?}"))?;
            insert_dotted(&mut root, k, v)?;
        }
        from_qmp(&Value::Object(root))
    }
}

/// Splits QEMU option text at commas, `,,` standing for a comma.
fn split_options(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                out.last_mut().unwrap_or(&mut String::new()).push(',');
            }
            ',' => out.push(String::new()),
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    out
}

/// `a.b.c=v` into nested objects (a list's indices stay keys; [`list`] orders them).
fn insert_dotted(root: &mut Map<String, Value>, key: &str, value: &str) -> Result<(), String> {
    let mut cur = root;
    let mut segs = key.split('.').peekable();
    while let Some(seg) = segs.next() {
        if seg.is_empty() {
            return Err(format!("--object: empty part in the key {key:?}"));
        }
        if segs.peek().is_none() {
            if cur
                .insert(seg.to_string(), Value::String(value.into()))
                .is_some()
            {
                return Err(format!("--object: {key} given twice"));
            }
            return Ok(());
        }
        let next = cur
            .entry(seg.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = next
            .as_object_mut()
            .ok_or_else(|| format!("--object: {key} sets a member inside a value"))?;
    }
    Ok(())
}

/// An object from `object-add`'s arguments (or the command line read into that shape).
///
/// # Errors
/// An unknown type, a missing, unexpected or ill-typed member, in QEMU's words where it
/// has them.
pub fn from_qmp(args: &Value) -> Result<ObjectSpec, String> {
    let o = args.as_object().ok_or("object-add takes an object")?;
    let ty = text(o, "qom-type")?.ok_or("Parameter 'qom-type' is missing")?;
    let id = text(o, "id")?.ok_or("Parameter 'id' is missing")?;
    if id.is_empty() || id.len() > 64 || id.starts_with(|c: char| !c.is_ascii_alphabetic()) {
        return Err("an object id is 1 to 64 bytes starting with a letter".into());
    }
    let allowed: &[&str] = match ty.as_str() {
        "tls-creds-x509" => &["dir", "endpoint", "verify-peer"],
        "authz-simple" => &["identity"],
        "authz-list" => &["policy", "rules"],
        "authz-listfile" => &["filename", "refresh"],
        other => {
            return Err(format!(
                "object type '{other}' is not supported by vmm (tls-creds-x509, authz-simple, authz-list and authz-listfile are)"
            ));
        }
    };
    if let Some(k) = o
        .keys()
        .find(|k| !["qom-type", "id"].contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(format!("Property '{ty}.{k}' not found"));
    }
    let spec = match ty.as_str() {
        "tls-creds-x509" => ObjectSpec::TlsCreds(TlsCredsSpec {
            dir: PathBuf::from(text(o, "dir")?.ok_or("tls-creds-x509 needs dir=DIR")?),
            server: match text(o, "endpoint")?.as_deref() {
                None | Some("client") => false,
                Some("server") => true,
                Some(v) => return Err(format!("endpoint does not take {v:?} (client, server)")),
            },
            verify_peer: flag(o, "verify-peer")?.unwrap_or(true),
            id,
        }),
        "authz-simple" => ObjectSpec::Authz(AuthzSpec {
            source: AuthzSource::Rules(Authz::simple(
                &id,
                &text(o, "identity")?.ok_or("authz-simple needs identity=NAME")?,
            )),
            id,
        }),
        "authz-list" => ObjectSpec::Authz(AuthzSpec {
            source: AuthzSource::Rules(list(&id, o)?),
            id,
        }),
        _ => {
            // authz-listfile: QEMU reads the file at once too, so a bad one is refused now.
            let spec = AuthzSpec {
                source: AuthzSource::File(PathBuf::from(
                    text(o, "filename")?.ok_or("authz-listfile needs filename=PATH")?,
                )),
                id,
            };
            flag(o, "refresh")?;
            spec.load()?;
            ObjectSpec::Authz(spec)
        }
    };
    Ok(spec)
}

/// An `authz-list`'s `policy` and `rules` (a list, or an object of indices from the
/// command line).
fn list(id: &str, o: &Map<String, Value>) -> Result<Authz, String> {
    let policy = match text(o, "policy")?.as_deref() {
        None | Some("deny") => AuthzPolicy::Deny,
        Some("allow") => AuthzPolicy::Allow,
        Some(v) => return Err(format!("policy does not take {v:?} (deny, allow)")),
    };
    let rules: Vec<&Value> = match o.get("rules") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(Value::Object(m)) => {
            let mut indexed = m
                .iter()
                .map(|(k, v)| {
                    k.parse::<usize>()
                        .map(|i| (i, v))
                        .map_err(|_| format!("rules.{k}: a rule's index is a number"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            indexed.sort_by_key(|(i, _)| *i);
            if indexed.iter().enumerate().any(|(n, (i, _))| n != *i) {
                return Err("rules.N: the indices must run 0, 1, 2... without a gap".into());
            }
            indexed.into_iter().map(|(_, v)| v).collect()
        }
        Some(_) => return Err("rules is a list of {match, policy, format}".into()),
    };
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r
                .as_object()
                .ok_or_else(|| format!("rules[{i}] is not an object"))?;
            if let Some(k) = r
                .keys()
                .find(|k| !["match", "policy", "format"].contains(&k.as_str()))
            {
                return Err(format!("Parameter 'rules[{i}].{k}' is unexpected"));
            }
            Ok(AuthzRule {
                pattern: text(r, "match")?
                    .ok_or_else(|| format!("Parameter 'rules[{i}].match' is missing"))?,
                policy: match text(r, "policy")?.as_deref() {
                    Some("allow") => AuthzPolicy::Allow,
                    Some("deny") => AuthzPolicy::Deny,
                    None => return Err(format!("Parameter 'rules[{i}].policy' is missing")),
                    Some(v) => return Err(format!("rules[{i}].policy does not take {v:?}")),
                },
                format: match text(r, "format")?.as_deref() {
                    None | Some("exact") => AuthzFormat::Exact,
                    Some("glob") => AuthzFormat::Glob,
                    Some(v) => {
                        return Err(format!(
                            "rules[{i}].format does not take {v:?} (exact, glob)"
                        ));
                    }
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Authz {
        id: id.to_string(),
        rules,
        policy,
    })
}

fn text(o: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match o.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!(
            "Invalid parameter type for '{name}', expected: string"
        )),
    }
}

/// A boolean: JSON's, or the command line's on/off, yes/no, true/false.
fn flag(o: &Map<String, Value>, name: &str) -> Result<Option<bool>, String> {
    match o.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.as_str() {
            "on" | "yes" | "true" => Ok(Some(true)),
            "off" | "no" | "false" => Ok(Some(false)),
            v => Err(format!("{name} does not take {v:?} (on, off)")),
        },
        Some(_) => Err(format!(
            "Invalid parameter type for '{name}', expected: boolean"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn authz(s: &str) -> Authz {
        match s.parse::<ObjectSpec>().unwrap() {
            ObjectSpec::Authz(a) => a.load().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tls_creds_objects_parse_with_qemus_syntax() {
        let t: ObjectSpec =
            "tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server,verify-peer=on"
                .parse()
                .unwrap();
        assert_eq!(
            t,
            ObjectSpec::TlsCreds(TlsCredsSpec {
                id: "tls0".into(),
                dir: "/etc/pki/qemu".into(),
                server: true,
                verify_peer: true
            })
        );
        let t: ObjectSpec = "tls-creds-x509,id=c,dir=d,,with,,commas".parse().unwrap();
        assert!(
            matches!(t, ObjectSpec::TlsCreds(TlsCredsSpec { server: false, verify_peer: true, ref dir, .. }) if dir.to_str() == Some("d,with,commas"))
        );
        for (bad, why) in [
            ("tls-creds-psk,id=a,dir=d", "not supported"),
            ("tls-creds-x509,dir=d", "'id' is missing"),
            ("tls-creds-x509,id=a", "needs dir"),
            ("tls-creds-x509,id=a,dir=d,endpoint=both", "endpoint"),
            (
                "tls-creds-x509,id=a,dir=d,sanity=yes",
                "'tls-creds-x509.sanity' not found",
            ),
            ("tls-creds-x509,id=0a,dir=d", "starting with a letter"),
            ("id=a,dir=d", "needs a type"),
            ("tls-creds-x509,id=a,dir=d,dir=e", "given twice"),
        ] {
            let e = bad.parse::<ObjectSpec>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn authz_objects_from_the_command_line_and_from_qmp_agree() {
        let simple = authz("authz-simple,id=a0,identity=CN=src.example,,O=Example");
        assert_eq!(simple, Authz::simple("a0", "CN=src.example,O=Example"));

        let cli = authz(
            "authz-list,id=a1,policy=allow,rules.1.match=CN=*,,O=Example,rules.1.policy=allow,\
             rules.1.format=glob,rules.0.match=CN=mallory,,O=Example,rules.0.policy=deny",
        );
        let qmp = match from_qmp(
            &json!({"qom-type": "authz-list", "id": "a1", "policy": "allow",
            "rules": [{"match": "CN=mallory,O=Example", "policy": "deny"},
                      {"match": "CN=*,O=Example", "policy": "allow", "format": "glob"}]}),
        )
        .unwrap()
        {
            ObjectSpec::Authz(a) => a.load().unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(cli, qmp);
        assert_eq!(cli.policy, AuthzPolicy::Allow);
        assert_eq!(cli.rules[0].pattern, "CN=mallory,O=Example");
        assert_eq!(cli.rules[1].format, AuthzFormat::Glob);
        assert!(!cli.is_allowed("CN=mallory,O=Example"));

        let empty = authz("authz-list,id=a2");
        assert!(empty.rules.is_empty() && empty.policy == AuthzPolicy::Deny);

        for (bad, why) in [
            (
                "authz-list,id=a,rules.0.match=x",
                "'rules[0].policy' is missing",
            ),
            (
                "authz-list,id=a,rules.1.match=x,rules.1.policy=allow",
                "without a gap",
            ),
            (
                "authz-list,id=a,rules.0.match=x,rules.0.policy=maybe",
                "does not take",
            ),
            (
                "authz-list,id=a,rules.0.policy=allow",
                "'rules[0].match' is missing",
            ),
            ("authz-list,id=a,policy=perhaps", "policy does not take"),
            ("authz-simple,id=a", "needs identity"),
            (
                "authz-simple,id=a,identity=x,policy=allow",
                "'authz-simple.policy' not found",
            ),
            (
                "authz-listfile,id=a,filename=/nonexistent/authz.json",
                "/nonexistent/authz.json",
            ),
        ] {
            let e = bad.parse::<ObjectSpec>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn an_authz_listfile_is_read_again_each_time() {
        let path = std::env::temp_dir().join(format!("vmm-authz-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"rules": [{"match": "CN=a", "policy": "allow"}]}"#,
        )
        .unwrap();
        let spec = match format!("authz-listfile,id=f,filename={},refresh=on", path.display())
            .parse::<ObjectSpec>()
            .unwrap()
        {
            ObjectSpec::Authz(a) => a,
            other => panic!("{other:?}"),
        };
        assert!(spec.load().unwrap().is_allowed("CN=a"));
        std::fs::write(&path, r#"{"policy": "deny", "rules": []}"#).unwrap();
        assert!(!spec.load().unwrap().is_allowed("CN=a"));
        std::fs::write(&path, "not json").unwrap();
        assert!(spec.load().unwrap_err().contains("authz-listfile 'f'"));
        std::fs::remove_file(path).unwrap();
    }
}
