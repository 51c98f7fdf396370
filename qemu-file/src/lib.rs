//! The byte stream of a live migration: [`QemuFile`], a buffered big-endian stream over a
//! [`Transport`] (QEMU's `qemu-file.c` and `migration/{tcp,unix,fd,exec,file}.c`).
//!
//! Transports are opened from QEMU-style URIs ([`MigrationUri`]): [`connect`] opens the
//! outgoing side, a [`Listener`] binds the incoming side and accepts exactly one stream.
//! Page payloads are queued by reference and written with vectored writes, so a guest page
//! goes to the socket without an intermediate copy. The first error is sticky; reads are
//! bounded so a hostile length never becomes a huge allocation; a [`RateLimiter`] applies
//! QEMU's `max-bandwidth` per 100 ms window.
//!
//! ```
//! use qemu_file::{QemuFile, mem_channel};
//!
//! let (a, b) = mem_channel(1 << 16);
//! let mut out = QemuFile::new(Box::new(a));
//! out.put_be32(0x5145_564d); // "QEVM"
//! out.put_counted_string("pc.ram");
//! out.flush()?;
//!
//! let mut inp = QemuFile::new(Box::new(b));
//! assert_eq!(inp.get_be32()?, 0x5145_564d);
//! assert_eq!(inp.get_counted_string("block name")?, "pc.ram");
//! # Ok::<(), qemu_file::Error>(())
//! ```
//!
//! Whole VMs built on the crates: ram-list's `examples/` (a snapshot, a live migration
//! between threads with a VMM's own `VmControl`, the same over TCP) and the repository's
//! `examples/outside-vmm/`, a VMM outside the workspace doing all three in 150 lines.

mod authz;
mod channel;
mod classify;
mod dn;
mod error;
mod fd_passing;
mod memory;
mod private_socket;
mod qemu_file;
mod rate_limit;
mod shown;
mod streaming;
mod tls;
mod transport;
mod uri;

pub use authz::{Authz, AuthzFormat, AuthzPolicy, AuthzRule};
pub use channel::{Accepted, Channels, Listener, connect};
pub use dn::subject_name;
pub use error::{Error, Result};
pub use fd_passing::MAX_RECEIVED_FDS;
pub use memory::{MemBuffer, MemTransport, mem_channel};
pub use private_socket::bind_private;
pub use qemu_file::{KeepAlive, QemuFile};
pub use rate_limit::RateLimiter;
pub use shown::{SHOWN_CHARS, shown};
pub use streaming::{copy_streaming, store_fence};
pub use tls::{DEFAULT_HANDSHAKE_TIMEOUT, TlsCreds, TlsEndpoint, TlsTransport, connect_tls};
pub use transport::{
    ExecTransport, FdTransport, ShutdownHandle, SocketTransport, StreamSocket, TcpTransport,
    Transport, UnixTransport, UnsentProbe,
};
pub use uri::MigrationUri;
