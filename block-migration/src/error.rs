//! The error type of disks and the block section.

use std::io;
use std::path::PathBuf;

/// What went wrong with a disk image or the block section.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image could not be opened or created.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image.
    #[error(
        "disk image {path} is in use by another process (it holds the lock): stop it or use another image"
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// Reading, writing or flushing the image failed.
    #[error("{op} disk {name_shown} at byte {offset}", name_shown = qemu_file::shown(.name))]
    Io {
        /// `reading`, `writing`, `flushing`, `resizing`.
        op: &'static str,
        /// The disk.
        name: String,
        /// Where.
        offset: u64,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A disk name that the stream cannot carry.
    #[error("disk name {name_shown} must be 1 to 255 bytes", name_shown = qemu_file::shown(.name))]
    BadName {
        /// The name.
        name: String,
    },
    /// The stream names a disk this side does not migrate.
    #[error(
        "the stream carries disk {name_shown}, which this destination does not have: \
         add --drive file=PATH,id={name} (with create=on to create the image)"
    , name_shown = qemu_file::shown(.name))]
    UnknownDisk {
        /// The name.
        name: String,
    },
    /// This side migrates a disk the stream does not carry.
    #[error(
        "this destination expects disk {name_shown}, which the stream does not carry: the source has other disks"
    , name_shown = qemu_file::shown(.name))]
    MissingDisk {
        /// The name.
        name: String,
    },
    /// The stream's disk has another size than ours.
    #[error(
        "destination disk {name_shown} is {local} bytes, the stream's is {stream} bytes: \
         give the destination an image of the same size, or create=on"
    , name_shown = qemu_file::shown(.name))]
    SizeMismatch {
        /// The disk.
        name: String,
        /// Our size.
        local: u64,
        /// The stream's size.
        stream: u64,
    },
    /// A record of the block section that is out of place.
    #[error("block record at stream byte {at}: {reason}")]
    BadRecord {
        /// Stream offset.
        at: u64,
        /// What is wrong.
        reason: String,
    },
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] qemu_file::Error),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
