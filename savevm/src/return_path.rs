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

use qemu_file::QemuFile;

use crate::{Error, Result};

/// QEMU's return-path message type "shut": the destination is done, with a status.
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// The answer to a PING (`be32` value).
pub const MIG_RP_MSG_PONG: u16 = 2;

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
