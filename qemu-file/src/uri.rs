//! QEMU-style migration URIs, parsed in one place.

use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Error, Result};

/// Where a migration stream goes or comes from, written as QEMU writes it.
///
/// | URI | outgoing | incoming |
/// |---|---|---|
/// | `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6) | connect | listen, accept one |
/// | `unix:PATH` | connect | listen, accept one |
/// | `fd:N` | write to inherited descriptor N | read from it |
/// | `exec:COMMAND` | `sh -c COMMAND`, stream on its stdin | stream from its stdout |
/// | `file:PATH` | create or truncate, write | read |
///
/// `exec:` runs the command with the rights of the user who typed it; never build one from
/// data received from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A TCP endpoint; `host` is a name, an IPv4 address or a bare IPv6 address.
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port; 0 when listening picks a free one.
        port: u16,
    },
    /// A unix domain socket path.
    Unix(PathBuf),
    /// An inherited open file descriptor.
    Fd(RawFd),
    /// A shell command.
    Exec(String),
    /// A file.
    File(PathBuf),
}

impl MigrationUri {
    /// Parses a URI such as `tcp:127.0.0.1:4444` or `unix:/run/mig.sock`.
    ///
    /// # Errors
    /// [`Error::InvalidUri`] with what is expected when the scheme or its argument is wrong.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = uri.split_once(':').ok_or_else(|| {
            bad("expected SCHEME:ARGUMENT with scheme tcp, unix, fd, exec or file")
        })?;
        match scheme {
            "tcp" => {
                let (host, port) = split_host_port(rest)
                    .ok_or_else(|| bad("expected tcp:HOST:PORT, or tcp:[IPV6]:PORT"))?;
                let port = port
                    .parse::<u16>()
                    .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
                if host.is_empty() {
                    return Err(bad(
                        "the host is empty; use 127.0.0.1 or [::1] for this machine",
                    ));
                }
                if !valid_host(host) {
                    return Err(bad(
                        "the host must be a name (letters, digits, '-', '.', '_'), an IPv4 address or a bracketed IPv6 address",
                    ));
                }
                Ok(MigrationUri::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            "unix" if !rest.is_empty() => Ok(MigrationUri::Unix(PathBuf::from(rest))),
            "unix" => Err(bad("expected unix:PATH")),
            "fd" => {
                let fd = rest
                    .parse::<RawFd>()
                    .ok()
                    .filter(|fd| *fd >= 0)
                    .ok_or_else(|| bad("expected fd:N with N a descriptor number"))?;
                Ok(MigrationUri::Fd(fd))
            }
            "exec" if !rest.trim().is_empty() => Ok(MigrationUri::Exec(rest.to_string())),
            "exec" => Err(bad("expected exec:COMMAND")),
            "file" if !rest.is_empty() => Ok(MigrationUri::File(PathBuf::from(rest))),
            "file" => Err(bad("expected file:PATH")),
            _ => Err(bad("unknown scheme: use tcp, unix, fd, exec or file")),
        }
    }

    /// The scheme name (`tcp`, `unix`, `fd`, `exec`, `file`).
    pub fn scheme(&self) -> &'static str {
        match self {
            MigrationUri::Tcp { .. } => "tcp",
            MigrationUri::Unix(_) => "unix",
            MigrationUri::Fd(_) => "fd",
            MigrationUri::Exec(_) => "exec",
            MigrationUri::File(_) => "file",
        }
    }
}

/// Splits `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        Some((host, port))
    } else {
        let (host, port) = s.rsplit_once(':')?;
        // A bare IPv6 address must be bracketed, or its colons would be ambiguous.
        if host.contains(':') {
            return None;
        }
        Some((host, port))
    }
}

/// A host name, an IPv4 address, or (with colons) what was inside the brackets of an IPv6
/// address, with an optional `%zone`.
fn valid_host(host: &str) -> bool {
    if host.contains(':') {
        let (addr, zone) = host.split_once('%').unwrap_or((host, ""));
        addr.chars()
            .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            && zone
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    } else {
        host.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    }
}

impl FromStr for MigrationUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        MigrationUri::parse(s)
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::Fd(n) => write!(f, "fd:{n}"),
            MigrationUri::Exec(c) => write!(f, "exec:{c}"),
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            MigrationUri::parse("tcp:127.0.0.1:4444").unwrap(),
            MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:0").unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        assert_eq!(
            MigrationUri::parse("tcp:localhost:1").unwrap(),
            MigrationUri::Tcp {
                host: "localhost".into(),
                port: 1
            }
        );
        assert_eq!(
            MigrationUri::parse("unix:/tmp/a b.sock").unwrap(),
            MigrationUri::Unix("/tmp/a b.sock".into())
        );
        assert_eq!(MigrationUri::parse("fd:7").unwrap(), MigrationUri::Fd(7));
        assert_eq!(
            MigrationUri::parse("exec:cat > /tmp/x").unwrap(),
            MigrationUri::Exec("cat > /tmp/x".into())
        );
        assert_eq!(
            MigrationUri::parse("file:/tmp/snap").unwrap(),
            MigrationUri::File("/tmp/snap".into())
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:5",
            "tcp:[fe80::1%eth0]:5",
            "tcp:my-host.example_1:7",
            "unix:/x",
            "fd:3",
            "exec:cat",
            "file:/y",
        ] {
            assert_eq!(MigrationUri::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_malformed_uris_with_a_reason() {
        for s in [
            "",
            "tcp",
            "tcp:",
            "tcp:host",
            "tcp::4444",
            "tcp:1.2.3.4:99999",
            "tcp:::1:4",
            "tcp:[::1]4",
            "tcp:[[\0\0]:4",
            "tcp:a b:1",
            "tcp:x/y:1",
            "unix:",
            "fd:",
            "fd:-1",
            "fd:x",
            "exec:",
            "exec:  ",
            "file:",
            "http://x",
            "rdma:1.2.3.4:5",
        ] {
            match MigrationUri::parse(s) {
                Err(Error::InvalidUri { uri, reason }) => {
                    assert_eq!(uri, s);
                    assert!(!reason.is_empty());
                }
                other => panic!("{s:?} gave {other:?}"),
            }
        }
    }
}
