//! The error type of the stream layer.

use std::io;
use std::sync::Arc;

/// A failure of the migration stream: transport I/O, a truncated or hostile stream, or a bad URI.
///
/// Errors are cheap to clone so that the first one can be kept ("sticky", as QEMU's
/// `last_error`) and handed out again at every later check.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Writing to the transport failed (peer gone, disk full, shut down by a cancel).
    #[error("writing the migration stream to {transport} failed")]
    Write {
        /// What was written to, e.g. `unix:/tmp/mig.sock`.
        transport: String,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// Reading from the transport failed.
    #[error("reading the migration stream from {transport} failed at byte {offset}")]
    Read {
        /// What was read from.
        transport: String,
        /// Stream position of the failed read.
        offset: u64,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// TLS could not be set up with the peer (or the credentials could not be loaded):
    /// which check failed, in words.
    #[error("TLS with {peer}: {reason}")]
    Tls {
        /// The peer's URI, or the credentials' file.
        peer: String,
        /// What failed.
        reason: String,
    },
    /// The stream ended in the middle of a record.
    #[error(
        "the migration stream ended at byte {offset} in the middle of a record: \
         the source stopped sending (cancelled, failed or killed) or the file is truncated"
    )]
    UnexpectedEof {
        /// Stream position where the data ran out.
        offset: u64,
    },
    /// A length read from the stream is larger than the reader allows.
    #[error(
        "{what} at byte {offset} claims {len} bytes, more than the limit of {limit}: \
         the stream is corrupt or not a migration stream"
    )]
    LengthTooLarge {
        /// What the length was for.
        what: &'static str,
        /// The length the stream claims.
        len: u64,
        /// The largest length accepted.
        limit: u64,
        /// Stream position of the length.
        offset: u64,
    },
    /// A string read from the stream is not UTF-8.
    #[error("{what} at byte {offset} is not valid UTF-8: the stream is corrupt")]
    InvalidUtf8 {
        /// What the string was.
        what: &'static str,
        /// Stream position of the string.
        offset: u64,
    },
    /// A migration URI could not be parsed.
    #[error("invalid migration URI {uri_shown}: {reason}", uri_shown = crate::shown(.uri))]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it and what is expected.
        reason: String,
    },
    /// Opening a transport (connect, listen, accept, spawn, open) failed.
    #[error("cannot {op} {uri}")]
    Open {
        /// The operation, e.g. `connect to`.
        op: &'static str,
        /// The URI being opened.
        uri: String,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The stream direction is not supported by this transport (e.g. reading an outgoing exec).
    #[error("{transport} cannot be {direction}")]
    Unsupported {
        /// The transport.
        transport: String,
        /// `read from` or `written to`.
        direction: &'static str,
    },
}

impl Error {
    /// Builds an [`Error::Open`] from an I/O error.
    pub(crate) fn open(op: &'static str, uri: impl Into<String>, source: io::Error) -> Self {
        Error::Open {
            op,
            uri: uri.into(),
            source: Arc::new(source),
        }
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
