//! The return path: the destination tells the source whether it loaded the stream
//! (QEMU's `MIG_RP_MSG_SHUT` on the reverse direction of the migration socket).
//!
//! ```text
//! be16 type = 1 (MIG_RP_MSG_SHUT) | be16 len = 4 | be32 status (0: loaded, else failed)
//! ```
//!
//! Before a failure's SHUT, a destination may say why in vmm's own message
//! [`MIG_RP_MSG_X_REASON`] (`be16 type | be16 len | len bytes of text`), but only to a
//! source it knows is vmm (the stream's machine type): QEMU 7.2's types end at 6 and a
//! QEMU source would refuse it.
//!
//! What the source does with the answer, or without one, is ARCHITECTURE.md's "The
//! hand-over". The forward stream is unchanged, so QEMU tools still read it.
//!
//! Post-copy adds the destination's page requests (`REQ_PAGES`, `REQ_PAGES_ID` when the
//! block changes), and for recovery its received bitmaps and the resume's
//! acknowledgement; [`read_message`] reads any of them, as QEMU's
//! `source_return_path_thread` does.

use std::sync::Mutex;

use qemu_file::QemuFile;

use crate::{Error, Result};

/// QEMU's return-path message type "shut": the destination is done, with a status.
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// The answer to a PING (`be32` value).
pub const MIG_RP_MSG_PONG: u16 = 2;

/// A page request naming its block: `be64 start | be32 len | u8 n | name[n]`.
pub const MIG_RP_MSG_REQ_PAGES_ID: u16 = 3;
/// A page request in the block of the last one: `be64 start | be32 len`.
pub const MIG_RP_MSG_REQ_PAGES: u16 = 4;
/// The pages of a block the destination has: `u8 n | name[n]`, then outside the
/// message `be64 size | size bytes of little-endian bitmap | be64` [`RECV_BITMAP_ENDING`].
pub const MIG_RP_MSG_RECV_BITMAP: u16 = 5;
/// The destination resumed a paused post-copy: `be32` [`RESUME_ACK_VALUE`].
pub const MIG_RP_MSG_RESUME_ACK: u16 = 6;
/// The end mark of a received bitmap.
pub const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;
/// The only value a resume's acknowledgement carries.
pub const RESUME_ACK_VALUE: u32 = 1;
/// The longest message a source takes (QEMU's return-path buffer).
pub const MAX_MESSAGE: u16 = 512;
/// The largest received bitmap read: 256 GiB of 4 KiB pages.
pub const MAX_RECV_BITMAP: usize = 8 << 20;

/// vmm's return-path message: why the load failed, as text (vmm sources only).
pub const MIG_RP_MSG_X_REASON: u16 = 0x7f01;

/// The longest reason sent or read, in bytes.
pub const MAX_REASON: usize = 1024;

/// Sends a failed load's verdict, preceded by its reason for a vmm source (`reason`).
///
/// # Errors
/// The stream failed (the source is gone).
pub fn send_load_failure(f: &mut QemuFile, reason: Option<&str>) -> Result<()> {
    f.clear_error();
    if let Some(r) = reason {
        let mut end = r.len().min(MAX_REASON);
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        f.put_be16(MIG_RP_MSG_X_REASON);
        f.put_be16(end as u16);
        f.put_buffer(&r.as_bytes()[..end]);
    }
    put_shut(f, 1);
    Ok(f.flush()?)
}

fn put_shut(f: &mut QemuFile, status: u32) {
    f.put_be16(MIG_RP_MSG_SHUT);
    f.put_be16(4);
    f.put_be32(status);
}

/// Sends the destination's verdict (`ok`: the whole stream loaded) and flushes. A failed
/// load leaves the stream's sticky error behind; it is cleared so the answer still goes.
///
/// # Errors
/// The stream failed (the source is gone).
pub fn send_load_result(f: &mut QemuFile, ok: bool) -> Result<()> {
    if !ok {
        f.clear_error();
    }
    put_shut(f, u32::from(!ok));
    Ok(f.flush()?)
}

/// Answers a source's PING (QEMU's `migrate_send_rp_pong`).
///
/// # Errors
/// The stream cannot be written (it has no reverse direction).
pub fn send_pong(f: &mut QemuFile, value: u32) -> Result<()> {
    f.put_be16(MIG_RP_MSG_PONG);
    f.put_be16(4);
    f.put_be32(value);
    Ok(f.flush()?)
}

/// Asks for `len` bytes at `start` of block `block` (None: the block of the last
/// request), as QEMU's `migrate_send_rp_message_req_pages`.
///
/// # Errors
/// The stream cannot be written.
pub fn send_req_pages(f: &mut QemuFile, block: Option<&str>, start: u64, len: u32) -> Result<()> {
    match block {
        Some(name) => {
            debug_assert!(!name.is_empty() && name.len() < 256);
            f.put_be16(MIG_RP_MSG_REQ_PAGES_ID);
            f.put_be16(13 + name.len() as u16);
            f.put_be64(start);
            f.put_be32(len);
            f.put_counted_string(name);
        }
        None => {
            f.put_be16(MIG_RP_MSG_REQ_PAGES);
            f.put_be16(12);
            f.put_be64(start);
            f.put_be32(len);
        }
    }
    Ok(f.flush()?)
}

/// Sends which pages of block `block` this side has: `received` is the bitmap as
/// little-endian bytes (page i is bit i % 8 of byte i / 8), padded here to whole
/// 64-bit words.
///
/// # Errors
/// The stream cannot be written.
pub fn send_recv_bitmap(f: &mut QemuFile, block: &str, received: &[u8]) -> Result<()> {
    f.put_be16(MIG_RP_MSG_RECV_BITMAP);
    f.put_be16(1 + block.len() as u16);
    f.put_counted_string(block);
    let size = received.len().next_multiple_of(8);
    f.put_be64(size as u64);
    f.put_buffer(received);
    f.put_buffer(&vec![0; size - received.len()]);
    f.put_be64(RECV_BITMAP_ENDING);
    Ok(f.flush()?)
}

/// Acknowledges a resume.
///
/// # Errors
/// The stream cannot be written.
pub fn send_resume_ack(f: &mut QemuFile) -> Result<()> {
    f.put_be16(MIG_RP_MSG_RESUME_ACK);
    f.put_be16(4);
    f.put_be32(RESUME_ACK_VALUE);
    Ok(f.flush()?)
}

/// A destination's return path shared by threads once post-copy listens: the loader
/// (PONGs, the final SHUT) and the fault thread (page requests) write whole messages
/// under one lock, on a second handle of the connection the loader reads
/// ([`QemuFile::return_path`]).
#[derive(Debug)]
pub struct ReturnPath {
    // Lock: held for the whole of one message, by whichever thread writes it.
    inner: Mutex<Writer>,
}

#[derive(Debug)]
struct Writer {
    f: QemuFile,
    /// The block of the last page request (the next request for it leaves the name out).
    last_block: Option<String>,
}

impl ReturnPath {
    /// The return path over `f` (a second handle on the stream's connection).
    pub fn new(f: QemuFile) -> Self {
        ReturnPath {
            inner: Mutex::new(Writer {
                f,
                last_block: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a PING.
    ///
    /// # Errors
    /// The connection's.
    pub fn pong(&self, value: u32) -> Result<()> {
        send_pong(&mut self.lock().f, value)
    }

    /// Asks for `len` bytes at `start` of block `block`, naming the block only when it
    /// differs from the last request's (as QEMU's `migrate_send_rp_req_pages`).
    ///
    /// # Errors
    /// The connection's.
    pub fn request_pages(&self, block: &str, start: u64, len: u32) -> Result<()> {
        let mut w = self.lock();
        let same = w.last_block.as_deref() == Some(block);
        let r = send_req_pages(&mut w.f, (!same).then_some(block), start, len);
        if r.is_ok() && !same {
            w.last_block = Some(block.to_string());
        }
        r
    }

    /// Writes on `f` from now on (post-copy resumed over a new connection); the next
    /// page request names its block.
    pub fn replace(&self, f: QemuFile) {
        let mut w = self.lock();
        w.f = f;
        w.last_block = None;
    }

    /// Which pages of `block` arrived (`received`: little-endian bytes of the bitmap),
    /// answering the source's RECV_BITMAP.
    ///
    /// # Errors
    /// The connection's.
    pub fn recv_bitmap(&self, block: &str, received: &[u8]) -> Result<()> {
        send_recv_bitmap(&mut self.lock().f, block, received)
    }

    /// RESUME_ACK: the destination resumes.
    ///
    /// # Errors
    /// The connection's.
    pub fn resume_ack(&self) -> Result<()> {
        send_resume_ack(&mut self.lock().f)
    }

    /// The destination's verdict at the end (SHUT).
    ///
    /// # Errors
    /// The connection's.
    pub fn load_result(&self, ok: bool) -> Result<()> {
        send_load_result(&mut self.lock().f, ok)
    }

    /// A failed load's reason (to a vmm source) and SHUT.
    ///
    /// # Errors
    /// The connection's.
    pub fn load_failure(&self, reason: Option<&str>) -> Result<()> {
        send_load_failure(&mut self.lock().f, reason)
    }
}

/// Where a source's section takes the destination's page requests (RAM's queue, served
/// before its background pass): the return path's reader pushes each one.
pub trait PageRequestSink: Send + Sync {
    /// Queues `len` bytes at `start` of `block` (None: the block of the last request).
    ///
    /// # Errors
    /// A request this side cannot serve, in words (the migration fails).
    fn push(&self, block: Option<&str>, start: u64, len: u64) -> std::result::Result<(), String>;

    /// Whether requests wait to be served (they go out whatever the bandwidth limit,
    /// as QEMU's `postcopy_has_request`).
    fn waiting(&self) -> bool;

    /// Post-copy preempt: writes the pages of `len` bytes at `start` of `block` (None:
    /// the block of the last request) on `channel`, the preempt connection, at once, as
    /// bare RAM records, leaving out those already sent; the caller flushes. A sink
    /// serves one connection: its idea of the last block is that connection's.
    ///
    /// # Errors
    /// A request this side cannot serve, in words (the migration fails).
    fn send_now(
        &self,
        block: Option<&str>,
        start: u64,
        len: u64,
        channel: &mut QemuFile,
    ) -> std::result::Result<(), String> {
        let _ = (block, start, len, channel);
        Err("this section cannot send pages on a preempt channel".into())
    }

    /// Post-copy preempt: writes the preempt connection's last record, once every page
    /// went out (QEMU's EOS).
    fn end_channel(&self, channel: &mut QemuFile) {
        let _ = channel;
    }
}

/// One message of the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The destination is done: 0 loaded, else failed.
    Shut(u32),
    /// The answer to a PING.
    Pong(u32),
    /// A page request: `len` bytes at `start` of `block` (None: the last request's).
    ReqPages {
        /// The block, when the request names one.
        block: Option<String>,
        /// The offset in the block.
        start: u64,
        /// How many bytes.
        len: u32,
    },
    /// The pages of `block` the destination has, as little-endian bytes.
    RecvBitmap {
        /// The block.
        block: String,
        /// The bitmap (a multiple of 8 bytes).
        bitmap: Vec<u8>,
    },
    /// The destination resumed.
    ResumeAck,
    /// Why the load failed (vmm destinations).
    Reason(String),
}

/// Reads the next message, refusing what QEMU's source refuses: unknown types, lengths
/// other than the type's, anything over [`MAX_MESSAGE`] (vmm's reason: over
/// [`MAX_REASON`]).
///
/// # Errors
/// [`Error::BadReturnPath`], or the stream's.
pub fn read_message(f: &mut QemuFile) -> Result<Message> {
    let ty = f.get_be16()?;
    let len = f.get_be16()?;
    let bad = || Error::BadReturnPath { ty, len };
    let fixed = match ty {
        MIG_RP_MSG_SHUT | MIG_RP_MSG_PONG | MIG_RP_MSG_RESUME_ACK => Some(4),
        MIG_RP_MSG_REQ_PAGES => Some(12),
        MIG_RP_MSG_REQ_PAGES_ID | MIG_RP_MSG_RECV_BITMAP | MIG_RP_MSG_X_REASON => None,
        _ => return Err(bad()),
    };
    // QEMU's types fit its 512-byte buffer; vmm's reason has its own bound.
    let max = if ty == MIG_RP_MSG_X_REASON {
        MAX_REASON as u16
    } else {
        MAX_MESSAGE
    };
    if fixed.is_some_and(|n| n != len) || len > max {
        return Err(bad());
    }
    Ok(match ty {
        MIG_RP_MSG_SHUT => Message::Shut(f.get_be32()?),
        MIG_RP_MSG_PONG => Message::Pong(f.get_be32()?),
        MIG_RP_MSG_RESUME_ACK => match f.get_be32()? {
            RESUME_ACK_VALUE => Message::ResumeAck,
            _ => return Err(bad()),
        },
        MIG_RP_MSG_REQ_PAGES => Message::ReqPages {
            block: None,
            start: f.get_be64()?,
            len: f.get_be32()?,
        },
        MIG_RP_MSG_REQ_PAGES_ID => {
            if len < 14 {
                return Err(bad());
            }
            let (start, n) = (f.get_be64()?, f.get_be32()?);
            let name = f.get_counted_string("RAM block name")?;
            if usize::from(len) != 13 + name.len() {
                return Err(bad());
            }
            Message::ReqPages {
                block: Some(name),
                start,
                len: n,
            }
        }
        MIG_RP_MSG_RECV_BITMAP => {
            let name = f.get_counted_string("RAM block name")?;
            if name.is_empty() || usize::from(len) != 1 + name.len() {
                return Err(bad());
            }
            let size = f.get_be64()?;
            if size % 8 != 0 {
                return Err(bad());
            }
            let bitmap = f.get_bytes(size, MAX_RECV_BITMAP, "received bitmap")?;
            if f.get_be64()? != RECV_BITMAP_ENDING {
                return Err(bad());
            }
            Message::RecvBitmap {
                block: name,
                bitmap,
            }
        }
        _ => {
            let text = f.get_bytes(len.into(), MAX_REASON, "the destination's reason")?;
            Message::Reason(String::from_utf8_lossy(&text).into_owned())
        }
    })
}

/// Waits for the PONG that answers the PING `value`: the destination has loaded
/// everything before that PING.
///
/// # Errors
/// [`Error::DestinationFailed`] when it reports a failure instead; a stream error when the
/// connection ends or the answer is malformed.
pub fn wait_pong(f: &mut QemuFile, value: u32) -> Result<()> {
    let mut reason = None;
    loop {
        let ty = f.get_be16()?;
        let len = f.get_be16()?;
        match ty {
            MIG_RP_MSG_PONG if len == 4 => {
                if f.get_be32()? == value {
                    return Ok(());
                }
            }
            MIG_RP_MSG_X_REASON if usize::from(len) <= MAX_REASON && reason.is_none() => {
                let text = f.get_bytes(len.into(), MAX_REASON, "the destination's reason")?;
                reason = Some(String::from_utf8_lossy(&text).into_owned());
            }
            MIG_RP_MSG_SHUT if len == 4 => {
                let status = f.get_be32()?;
                return Err(Error::DestinationFailed {
                    status: status.max(1),
                    reason,
                });
            }
            _ => return Err(Error::BadReturnPath { ty, len }),
        }
    }
}

/// Waits for the destination's verdict.
///
/// # Errors
/// [`Error::DestinationFailed`] when it reports a failure; a stream error when the
/// connection ends without an answer or the answer is malformed.
pub fn wait_load_result(f: &mut QemuFile) -> Result<()> {
    let mut reason = None;
    loop {
        let ty = f.get_be16()?;
        let len = f.get_be16()?;
        match ty {
            MIG_RP_MSG_X_REASON if usize::from(len) <= MAX_REASON && reason.is_none() => {
                let text = f.get_bytes(len.into(), MAX_REASON, "the destination's reason")?;
                reason = Some(String::from_utf8_lossy(&text).into_owned());
            }
            MIG_RP_MSG_SHUT if len == 4 => {
                return match f.get_be32()? {
                    0 => Ok(()),
                    status => Err(Error::DestinationFailed { status, reason }),
                };
            }
            _ => return Err(Error::BadReturnPath { ty, len }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    #[test]
    fn post_copy_messages_golden_bytes_and_read_back() {
        let b = MemBuffer::new();
        let mut f = b.file();
        send_req_pages(&mut f, Some("pc.ram"), 0x5000, 0x1000).unwrap();
        send_req_pages(&mut f, None, 0x9000, 0x1000).unwrap();
        send_recv_bitmap(&mut f, "pc.ram", &[0b101]).unwrap();
        send_resume_ack(&mut f).unwrap();
        #[rustfmt::skip]
        let golden: &[u8] = &[
            0, 3, 0, 19, 0, 0, 0, 0, 0, 0, 0x50, 0, 0, 0, 0x10, 0,
            6, b'p', b'c', b'.', b'r', b'a', b'm',
            0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0x90, 0, 0, 0, 0x10, 0,
            0, 5, 0, 7, 6, b'p', b'c', b'.', b'r', b'a', b'm',
            0, 0, 0, 0, 0, 0, 0, 8, 0b101, 0, 0, 0, 0, 0, 0, 0,
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
            0, 6, 0, 4, 0, 0, 0, 1,
        ];
        assert_eq!(b.contents(), golden);
        let mut f = QemuFile::from_bytes(golden.to_vec());
        assert_eq!(
            read_message(&mut f).unwrap(),
            Message::ReqPages {
                block: Some("pc.ram".into()),
                start: 0x5000,
                len: 0x1000
            }
        );
        assert_eq!(
            read_message(&mut f).unwrap(),
            Message::ReqPages {
                block: None,
                start: 0x9000,
                len: 0x1000
            }
        );
        assert_eq!(
            read_message(&mut f).unwrap(),
            Message::RecvBitmap {
                block: "pc.ram".into(),
                bitmap: vec![0b101, 0, 0, 0, 0, 0, 0, 0]
            }
        );
        assert_eq!(read_message(&mut f).unwrap(), Message::ResumeAck);
        // vmm's reason may be longer than QEMU's messages.
        let long = [&[0x7f, 1, 3, 0][..], &[b'x'; 768]].concat();
        assert_eq!(
            read_message(&mut QemuFile::from_bytes(long)).unwrap(),
            Message::Reason("x".repeat(768))
        );
    }

    #[test]
    fn misshapen_messages_are_refused() {
        for bad in [
            &[0, 7, 0, 0][..],                                           // an unknown type
            &[0, 4, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],             // REQ_PAGES of 11 bytes
            &[0, 3, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'a'], // name too short
            &[0, 6, 0, 4, 0, 0, 0, 2],                                   // a resume ack of 2
            &[0x7f, 1, 2, 1],                                            // over 512 bytes
        ] {
            assert!(
                read_message(&mut QemuFile::from_bytes(bad.to_vec())).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pong_golden_bytes_and_a_failure_instead() {
        let b = MemBuffer::new();
        send_pong(&mut b.file(), 7).unwrap();
        assert_eq!(b.contents(), [0, 2, 0, 4, 0, 0, 0, 7]);
        // An older PONG is skipped; the one asked for ends the wait.
        let two = [&[0, 2, 0, 4, 0, 0, 0, 6][..], &b.contents()].concat();
        wait_pong(&mut QemuFile::from_bytes(two), 7).unwrap();
        let failed = QemuFile::from_bytes(vec![0x7f, 1, 0, 2, b'n', b'o', 0, 1, 0, 4, 0, 0, 0, 1]);
        match wait_pong(&mut { failed }, 7) {
            Err(Error::DestinationFailed { reason, .. }) => {
                assert_eq!(reason.as_deref(), Some("no"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn golden_bytes() {
        for (ok, golden) in [
            (true, [0, 1, 0, 4, 0, 0, 0, 0]),
            (false, [0, 1, 0, 4, 0, 0, 0, 1]),
        ] {
            let b = MemBuffer::new();
            send_load_result(&mut b.file(), ok).unwrap();
            assert_eq!(b.contents(), golden);
            let r = wait_load_result(&mut QemuFile::from_bytes(golden));
            assert_eq!(r.is_ok(), ok);
            for cut in 0..golden.len() {
                let r = wait_load_result(&mut QemuFile::from_bytes(&golden[..cut]));
                assert!(matches!(r, Err(Error::Stream(_))), "{cut}: {r:?}");
            }
        }
        let r = wait_load_result(&mut QemuFile::from_bytes([0, 9, 0, 4, 0, 0, 0, 0]));
        assert!(matches!(r, Err(Error::BadReturnPath { ty: 9, len: 4 })));
    }

    #[test]
    fn a_reason_precedes_the_failure() {
        let b = MemBuffer::new();
        send_load_failure(&mut b.file(), Some("too small")).unwrap();
        assert_eq!(
            b.contents(),
            [
                &[0x7f, 0x01, 0, 9][..],
                b"too small",
                &[0, 1, 0, 4, 0, 0, 0, 1]
            ]
            .concat()
        );
        let r = wait_load_result(&mut QemuFile::from_bytes(b.contents()));
        assert!(
            matches!(&r, Err(Error::DestinationFailed { status: 1, reason: Some(t) }) if t == "too small"),
            "{r:?}"
        );
        assert!(r.unwrap_err().to_string().contains("too small"));
        // A reason too long, or a second one, is not a return path this side knows.
        let long = [&[0x7f, 0x01, 0x10, 0][..], &[b'x'; 4096]].concat();
        let r = wait_load_result(&mut QemuFile::from_bytes(long));
        assert!(matches!(r, Err(Error::BadReturnPath { .. })));
    }
}
