//! The error type of the stream format, the registry, the loader and the migration thread.

use crate::SectionError;

/// What went wrong with a migration stream or a migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The byte stream failed: I/O, truncation, an oversized length.
    #[error(transparent)]
    Stream(#[from] qemu_file::Error),
    /// The stream does not start with "QEVM".
    #[error(
        "not a migration stream: the first bytes are {found:#010x}, expected 0x5145564d (\"QEVM\"){}",
        if found >> 16 == 0x1603 { ": they open a TLS handshake, so the source uses TLS (tls-creds) and this side does not" } else { "" }
    )]
    BadMagic {
        /// The four bytes found, big-endian.
        found: u32,
    },
    /// The stream's version is not 3.
    #[error(
        "migration stream version {found} is not supported: only version 3 (QEMU 2.x and later) is"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The source's machine type differs from the destination's.
    #[error(
        "the stream is for machine type {stream_shown} but this VM is {local_shown}: start the destination with the same machine"
    , stream_shown = qemu_file::shown(.stream), local_shown = qemu_file::shown(.local))]
    MachineMismatch {
        /// Machine type in the stream.
        stream: String,
        /// Machine type here.
        local: String,
    },
    /// The stream does not open with its configuration section (the machine type), so
    /// nothing says it is for this machine (QEMU: "Configuration section missing").
    #[error(
        "Configuration section missing: the stream opens with section type {found:#04x} at byte {offset}, \
         not the machine type"
    )]
    ConfigurationMissing {
        /// The byte found instead.
        found: u8,
        /// Where.
        offset: u64,
    },
    /// A record starts with a byte that is no known section type.
    #[error(
        "unknown section type {found:#04x} at byte {offset}: the stream is corrupt or from a newer QEMU"
    )]
    UnknownSectionType {
        /// The byte.
        found: u8,
        /// Its position.
        offset: u64,
    },
    /// A START or FULL record names a section this side has not registered.
    #[error("the stream has section {idstr_shown} instance {instance_id}, which this VM does not have", idstr_shown = qemu_file::shown(.idstr))]
    UnknownSection {
        /// The name.
        idstr: String,
        /// The instance.
        instance_id: u32,
    },
    /// A PART or END record refers to a section id that no START opened.
    #[error("section id {section_id} at byte {offset} was never started: the stream is corrupt")]
    UnknownSectionId {
        /// The id.
        section_id: u32,
        /// Position of the record.
        offset: u64,
    },
    /// A START or FULL record reuses a section id or opens a section twice.
    #[error("section {idstr_shown} (id {section_id}) appears twice: the stream is corrupt", idstr_shown = qemu_file::shown(.idstr))]
    DuplicateSection {
        /// The name.
        idstr: String,
        /// The id.
        section_id: u32,
    },
    /// A live section arrived as FULL, a device section as START/PART/END, or the END of a
    /// section came twice.
    #[error("section {idstr_shown} arrived as a {found} record, which it cannot be", idstr_shown = qemu_file::shown(.idstr))]
    WrongRecordKind {
        /// The name.
        idstr: String,
        /// The record kind (`START`, `FULL`, ...).
        found: &'static str,
    },
    /// The section's version is outside what this side can load.
    #[error(
        "section {idstr_shown} has version {version} in the stream; this side loads versions {min} to {max}: \
         migrate between compatible builds"
    , idstr_shown = qemu_file::shown(.idstr))]
    VersionOutOfRange {
        /// The name.
        idstr: String,
        /// Version in the stream.
        version: u32,
        /// Oldest accepted.
        min: u32,
        /// Newest accepted.
        max: u32,
    },
    /// After a section's payload the footer was missing or named another section.
    #[error(
        "section {idstr_shown} (id {section_id}) does not end with its footer at byte {offset} \
         (found byte {found_byte:#04x}{}): the sender and this loader disagree on its layout",
        found_id.map(|i| format!(", section id {i}")).unwrap_or_default()
    , idstr_shown = qemu_file::shown(.idstr))]
    FooterMismatch {
        /// The section.
        idstr: String,
        /// Its id.
        section_id: u32,
        /// The byte found where 0x7e was expected.
        found_byte: u8,
        /// The id found in the footer, if the byte was 0x7e.
        found_id: Option<u32>,
        /// Position of the footer.
        offset: u64,
    },
    /// The stream ended without a section this side has, or without a live section's END.
    #[error(
        "the stream ended without {}section {idstr_shown} instance {instance_id}: \
         the source and destination VMs are not configured alike, or the source stopped early",
        if *started { "the end of " } else { "" }
    , idstr_shown = qemu_file::shown(.idstr))]
    MissingSection {
        /// The section.
        idstr: String,
        /// Its instance.
        instance_id: u32,
        /// Whether it was started but not ended.
        started: bool,
    },
    /// A QEMU_VM_COMMAND record (postcopy, colo): not supported.
    #[error(
        "the stream uses QEMU_VM_COMMAND {command:#06x} at byte {offset}, which this loader does not support (postcopy is not implemented)"
    )]
    UnsupportedCommand {
        /// The command number.
        command: u16,
        /// Its position.
        offset: u64,
    },
    /// A QEMU_VM_COMMAND whose payload is not what its command carries.
    #[error("QEMU_VM_COMMAND {command}: {reason}")]
    BadCommand {
        /// The command number.
        command: u16,
        /// What is wrong.
        reason: String,
    },
    /// A section handler failed.
    #[error("section {idstr_shown} instance {instance_id}: {op} failed", idstr_shown = qemu_file::shown(.idstr))]
    Section {
        /// The section.
        idstr: String,
        /// Its instance.
        instance_id: u32,
        /// What it was doing: `setup`, `iterate`, `pending`, `complete`, `load`, `save`.
        op: &'static str,
        /// The handler's error.
        #[source]
        source: SectionError,
    },
    /// Registering a second section with the same idstr and instance.
    #[error("section {idstr_shown} instance {instance_id} is already registered", idstr_shown = qemu_file::shown(.idstr))]
    DuplicateRegistration {
        /// The name.
        idstr: String,
        /// The instance.
        instance_id: u32,
    },
    /// An idstr too long for the stream.
    #[error("section idstr {idstr_shown} is {len} bytes; at most 127 fit the stream", idstr_shown = qemu_file::shown(.idstr))]
    IdTooLong {
        /// The name.
        idstr: String,
        /// Its length.
        len: usize,
    },
    /// The VM (stop, resume, flush) failed during a migration.
    #[error("the VM could not {op}")]
    Vm {
        /// `stop its vCPUs`, `resume`, `flush its disks`.
        op: &'static str,
        /// The VM's error.
        #[source]
        source: SectionError,
    },
    /// The migration was cancelled.
    #[error("the migration was cancelled")]
    Cancelled,
    /// The guest dirties memory faster than it can be sent, and nothing more helps: why,
    /// with the rates.
    #[error("{0}")]
    CannotConverge(String),
    /// The destination reported that it could not load the stream.
    #[error(
        "the destination refused the stream: {}; the source VM keeps running",
        refusal(.status, .reason)
    )]
    DestinationFailed {
        /// The destination's status code.
        status: u32,
        /// Why, if it said (a vmm destination does).
        reason: Option<String>,
    },
    /// The whole stream went out but the destination's answer did not come back (the
    /// connection was cut, or it stayed silent past the timeout): the destination may be
    /// running the guest, so the source must not resume it by itself.
    #[error(
        "the whole stream was sent but the destination's answer was lost ({reason}): it may be running \
         the guest, so this source stays stopped; `cont` takes the guest back here once its disks can be \
         locked, if the destination does not run it"
    )]
    OutcomeUnknown {
        /// What happened instead of the answer.
        reason: String,
    },
    /// The destination's answer is not a return-path message this side knows.
    #[error(
        "the destination answered with return-path message {ty} of {len} bytes, not the expected status"
    )]
    BadReturnPath {
        /// Message type.
        ty: u16,
        /// Message length.
        len: u16,
    },
    /// Post-copy cannot run as asked (before anything was switched).
    #[error("post-copy: {reason}")]
    Postcopy {
        /// Why.
        reason: String,
    },
    /// Post-copy was interrupted after the switch: the guest is at the destination,
    /// which waits for its pages; the source keeps its whole copy, stopped.
    #[error(
        "post-copy was interrupted after the switch: {reason}; the guest is at the destination, \
         paused until its missing pages can come, and this source keeps its whole copy, stopped \
         (`cont` runs it here should the destination be gone)"
    )]
    PostcopyInterrupted {
        /// What happened.
        reason: String,
    },
    /// The JSON VM description trailer is malformed.
    #[error("the VM description trailer is malformed: {reason}")]
    BadDescription {
        /// What is wrong.
        reason: String,
    },
}

fn refusal(status: &u32, reason: &Option<String>) -> String {
    match reason {
        // At most MAX_REASON bytes from the peer; no control character reaches a terminal.
        Some(r) => r
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
        None => format!("it reported status {status}; its log says why"),
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error and its causes on one line, `outer: cause: root cause`: errors here keep their
/// cause in `source()` rather than in their own message.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
