//! The error type of the RAM list and the RAM section.

/// What went wrong with RAM blocks or the RAM section.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A block name that the stream cannot carry.
    #[error("RAM block name {idstr_shown} is {len} bytes; names must be 1 to 127 bytes", idstr_shown = qemu_file::shown(.idstr))]
    BadName {
        /// The name.
        idstr: String,
        /// Its length.
        len: usize,
    },
    /// Two blocks with one name.
    #[error("a RAM block named {idstr_shown} already exists", idstr_shown = qemu_file::shown(.idstr))]
    DuplicateBlock {
        /// The name.
        idstr: String,
    },
    /// A size that is not a whole number of target pages, or larger than the backing.
    #[error("RAM block {idstr_shown}: {reason}", idstr_shown = qemu_file::shown(.idstr))]
    BadSize {
        /// The block.
        idstr: String,
        /// What is wrong.
        reason: String,
    },
    /// No block of that name here.
    #[error(
        "no RAM block named {idstr_shown} on this side: the source and destination VMs have different memory devices"
    , idstr_shown = qemu_file::shown(.idstr))]
    UnknownBlock {
        /// The name.
        idstr: String,
    },
    /// The stream's block has another size than ours.
    #[error(
        "destination RAM block {idstr_shown} is {local} bytes ({}), the stream has {stream} bytes ({}): \
         start the destination with the same memory size as the source",
        human(*local), human(*stream)
    , idstr_shown = qemu_file::shown(.idstr))]
    SizeMismatch {
        /// The block.
        idstr: String,
        /// Our size.
        local: u64,
        /// The stream's size.
        stream: u64,
    },
    /// The stream's block list does not add up, or leaves one of our blocks out.
    #[error("the stream's RAM block list is inconsistent: {reason}")]
    BadBlockList {
        /// What is wrong.
        reason: String,
    },
    /// A page record outside its block, or before the block list.
    /// Post-copy's RAM cannot do what was asked.
    #[error("post-copy: {reason}")]
    Postcopy {
        /// What failed.
        reason: String,
    },
    /// A post-copy page request that cannot be served.
    #[error("a page request: {reason}")]
    BadPageRequest {
        /// What is wrong with it.
        reason: String,
    },
    #[error("RAM page record at stream byte {at}: {reason}")]
    BadPage {
        /// Stream offset of the record.
        at: u64,
        /// What is wrong.
        reason: String,
    },
    /// A multifd channel's opening message or packet header that cannot be right.
    #[error("multifd channel data at byte {at}: {reason}")]
    BadMultifd {
        /// Offset in the channel's stream.
        at: u64,
        /// What is wrong.
        reason: String,
    },
    /// zstd failed on a multifd packet, or its data does not fit the packet's pages.
    #[error("multifd compression: {reason}")]
    Compression {
        /// What is wrong.
        reason: String,
    },
    /// Multifd channels that cannot be set up as asked.
    #[error("multifd: {reason}")]
    MultifdSetup {
        /// What is wrong.
        reason: String,
    },
    /// A multifd channel failed; the migration (or load) fails with it.
    #[error("multifd channel {channel}")]
    Channel {
        /// The channel's number (its position among the connections where it has not
        /// said its number yet).
        channel: u8,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// An error reported once more (a multifd channel's, to each who asks), as text.
    #[error("{0}")]
    Again(String),
    /// A record with flags this loader does not know.
    #[error(
        "Unknown combination of migration flags: {flags:#x} (the RAM record at stream byte {at})"
    )]
    UnknownFlags {
        /// Stream offset of the record.
        at: u64,
        /// The flags.
        flags: u64,
    },
    /// The section's version is not 4.
    #[error("RAM section version {0} is not supported (only version 4)")]
    Version(u32),
    /// Blocks were added, removed or resized while a migration ran.
    #[error(
        "the RAM block list changed during the migration (version {at_setup} at setup, now {now}): \
         a memory device was added, removed or resized; the migration is abandoned, retry it"
    )]
    ListChanged {
        /// List version when the migration started.
        at_setup: u64,
        /// List version now.
        now: u64,
    },
    /// The dirty log of a block failed.
    #[error("dirty log of RAM block {idstr_shown}", idstr_shown = qemu_file::shown(.idstr))]
    DirtyLog {
        /// The block.
        idstr: String,
        /// The source's error.
        #[source]
        source: dirty_bitmap::Error,
    },
    /// Shared memory that cannot be handed over (`x-ignore-shared`).
    #[error("handing over the memory of RAM block {idstr_shown}: {reason}", idstr_shown = qemu_file::shown(.idstr))]
    HandOver {
        /// The block.
        idstr: String,
        /// What is wrong.
        reason: String,
    },
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] qemu_file::Error),
}

fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB && bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
