//! The return path: the destination tells the source whether it loaded the stream
//! (QEMU's `MIG_RP_MSG_SHUT` on the reverse direction of the migration socket).
//!
//! ```text
//! be16 type = 1 (MIG_RP_MSG_SHUT) | be16 len = 4 | be32 status (0: loaded, else failed)
//! ```
//!
//! The source keeps its VM until the destination says it loaded everything; if the
//! destination reports a failure or the connection ends without an answer, the source
//! resumes. The forward stream is unchanged, so QEMU tools still read it.

use qemu_file::QemuFile;

use crate::{Error, Result};

/// QEMU's return-path message type "shut": the destination is done, with a status.
pub const MIG_RP_MSG_SHUT: u16 = 1;

/// Sends the destination's verdict (`ok`: the whole stream loaded) and flushes. A failed
/// load leaves the stream's sticky error behind; it is cleared so the answer still goes.
///
/// # Errors
/// The stream failed (the source is gone).
pub fn send_load_result(f: &mut QemuFile, ok: bool) -> Result<()> {
    if !ok {
        f.clear_error();
    }
    f.put_be16(MIG_RP_MSG_SHUT);
    f.put_be16(4);
    f.put_be32(u32::from(!ok));
    Ok(f.flush()?)
}

/// Waits for the destination's verdict.
///
/// # Errors
/// [`Error::DestinationFailed`] when it reports a failure; a stream error when the
/// connection ends without an answer or the answer is malformed.
pub fn wait_load_result(f: &mut QemuFile) -> Result<()> {
    let ty = f.get_be16()?;
    let len = f.get_be16()?;
    if ty != MIG_RP_MSG_SHUT || len != 4 {
        return Err(Error::BadReturnPath { ty, len });
    }
    match f.get_be32()? {
        0 => Ok(()),
        status => Err(Error::DestinationFailed { status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    #[test]
    fn golden_bytes() {
        for (ok, golden) in [
            (true, [0, 1, 0, 4, 0, 0, 0, 0]),
            (false, [0, 1, 0, 4, 0, 0, 0, 1]),
        ] {
            let b = MemBuffer::new();
            send_load_result(&mut QemuFile::new(Box::new(b.clone())), ok).unwrap();
            assert_eq!(b.contents(), golden);
            let r = wait_load_result(&mut QemuFile::new(Box::new(MemBuffer::from_bytes(golden))));
            assert_eq!(r.is_ok(), ok);
            for cut in 0..golden.len() {
                let r = wait_load_result(&mut QemuFile::new(Box::new(MemBuffer::from_bytes(
                    &golden[..cut],
                ))));
                assert!(matches!(r, Err(Error::Stream(_))), "{cut}: {r:?}");
            }
        }
        let r = wait_load_result(&mut QemuFile::new(Box::new(MemBuffer::from_bytes([
            0, 9, 0, 4, 0, 0, 0, 0,
        ]))));
        assert!(matches!(r, Err(Error::BadReturnPath { ty: 9, len: 4 })));
    }
}
