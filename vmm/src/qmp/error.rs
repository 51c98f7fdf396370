//! `QmpError`: a refused command as QMP reports it, and how a client's words are echoed
//! in one.

use serde_json::{Value, json};

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

/// A client-supplied name as echoed in an error: at most 64 characters.
pub(crate) fn bounded(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}
