//! File descriptors carried with the stream (SCM_RIGHTS on a unix socket): how a local
//! hand-over gives the destination the guest's memory itself instead of a copy of it.
//!
//! The descriptors travel with bytes of the stream: the sender attaches them to a write
//! ([`QemuFile::put_buffer_with_fds`](crate::QemuFile::put_buffer_with_fds)), and the
//! receiver has them once it has read those bytes
//! ([`QemuFile::take_received_fds`](crate::QemuFile::take_received_fds)). The kernel never
//! merges a write that carries descriptors with later ones into one read, so a reader
//! that parsed the bytes has the descriptors too. The stream's bytes are unchanged: a
//! reader that ignores descriptors sees QEMU's format.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, getsockopt, recvmsg, sendmsg, sockopt,
};

/// Most descriptors a peer may pass over one stream; more fail the read (a peer cannot
/// fill this process's descriptor table).
pub const MAX_RECEIVED_FDS: usize = 16;

/// Most descriptors one message carries (Linux's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Reads into `bufs` from `sock`, appending the descriptors that came with the bytes to
/// `fds` (close-on-exec).
///
/// # Errors
/// The socket's, or `InvalidData` when the peer passed more than [`MAX_RECEIVED_FDS`].
pub(crate) fn recv_with_fds(
    sock: &UnixStream,
    bufs: &mut [IoSliceMut<'_>],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    // Room for the most one message can carry (the kernel's SCM_MAX_FD), so none is
    // ever truncated: every descriptor received is owned, and closed if refused.
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (n, truncated, raw) = {
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            bufs,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut raw: Vec<RawFd> = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(r) = c {
                raw.extend(r);
            }
        }
        (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC), raw)
    };
    for r in raw {
        // SAFETY: the kernel installed `r` in this process's table for this call alone;
        // nothing else owns it.
        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
    }
    if truncated || fds.len() > MAX_RECEIVED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer passed more than {MAX_RECEIVED_FDS} file descriptors"),
        ));
    }
    Ok(n)
}

/// Writes some of `data` to `sock` with `fds` attached; returns how many bytes went (at
/// least one for a non-empty `data`: the descriptors went with them).
///
/// # Errors
/// The socket's; `InvalidInput` for empty `data` (a stream socket carries descriptors
/// only with bytes).
pub(crate) fn send_with_fds(
    sock: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors go only with bytes of the stream",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(data)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// The user id of the process at the other end of `sock` (SO_PEERCRED: who connected or
/// accepted, as of then).
pub(crate) fn peer_uid(sock: &UnixStream) -> Option<u32> {
    getsockopt(sock, sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}
