//! What a user types on the command line: `--drive` specs and sizes. Parsed here, in the
//! library, so the parsers are fuzzed with the rest of the untrusted input.

use std::path::PathBuf;
use std::str::FromStr;

/// `--drive file=PATH,id=NAME[,migrate=on|off][,create=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// The raw image.
    pub path: PathBuf,
    /// The disk's name, also in the stream.
    pub id: String,
    /// Copied by block migration (on, the default) or shared storage (off).
    pub migrate: bool,
    /// Create the image if missing (a destination sizes it from the stream).
    pub create: bool,
}

impl FromStr for DriveSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut path, mut id, mut migrate, mut create) = (None, None, true, false);
        let onoff = |k: &str, v: &str| match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(format!("{k} takes on or off, not {v:?}")),
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value in --drive, got {part:?}"))?;
            match k {
                "file" => path = Some(PathBuf::from(v)),
                "id" => id = Some(v.to_string()),
                "migrate" => migrate = onoff(k, v)?,
                "create" => create = onoff(k, v)?,
                other => {
                    return Err(format!(
                        "unknown --drive option {other:?} (file, id, migrate, create)"
                    ));
                }
            }
        }
        let path = path.ok_or("--drive needs file=PATH")?;
        let id = id.ok_or("--drive needs id=NAME")?;
        if id.is_empty() || id.len() > 255 {
            return Err("the drive id must be 1 to 255 bytes".into());
        }
        Ok(DriveSpec {
            path,
            id,
            migrate,
            create,
        })
    }
}

/// Parses 4096, 64K, 256M, 1G, 1GiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 64K, 256M, 1G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn drive_options_parse_and_refuse_with_reasons() {
        assert_eq!(
            "file=/tmp/a.img,id=disk0".parse::<DriveSpec>().unwrap(),
            DriveSpec {
                path: "/tmp/a.img".into(),
                id: "disk0".into(),
                migrate: true,
                create: false
            }
        );
        let d: DriveSpec = "id=d,file=x,migrate=off,create=on".parse().unwrap();
        assert!(!d.migrate && d.create);
        for bad in [
            "file=x",
            "id=d",
            "file=x,id=d,migrate=maybe",
            "file=x,id=d,cache=none",
            "file",
        ] {
            assert!(bad.parse::<DriveSpec>().is_err(), "{bad}");
        }
    }
}
