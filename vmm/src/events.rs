//! A JSON-lines log of what a vmm process did, with wall-clock timestamps, for scripts and
//! tests (`--log-json FILE`): migrations, stop and resume times, RAM hashes.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Microseconds since the Unix epoch.
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Where events go (nowhere without `--log-json`).
#[derive(Debug, Default)]
pub struct EventLog {
    // Lock: any thread appends one whole line under it.
    file: Mutex<Option<File>>,
}

impl EventLog {
    /// A log writing to `path` (created or truncated), or a log that drops everything.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let file = match path {
            Some(p) => Some(File::create(p).with_context(|| format!("creating {}", p.display()))?),
            None => None,
        };
        Ok(EventLog {
            file: Mutex::new(file),
        })
    }

    /// Appends `{"event": name, "ts_us": now, ...fields}`.
    pub fn emit(&self, name: &str, fields: Value) {
        self.emit_at(name, SystemTime::now(), fields);
    }

    /// Appends an event that happened at `at`.
    pub fn emit_at(&self, name: &str, at: SystemTime, fields: Value) {
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = g.as_mut() else { return };
        let mut obj = json!({"event": name, "ts_us": unix_us(at)});
        if let (Some(o), Value::Object(extra)) = (obj.as_object_mut(), fields) {
            o.extend(extra);
        }
        let _ = writeln!(f, "{obj}");
        let _ = f.flush();
    }
}
