//! What the benches send: 1 GiB of 4 KiB pages, each behind an 8-byte header as RAM
//! records are, queued by reference from a source buffer and flushed every 1 MiB.

use std::sync::Arc;

use qemu_file::{KeepAlive, QemuFile};

/// A page.
pub const PAGE: usize = 4096;
/// What one run sends, in page bytes.
pub const TOTAL: usize = 1 << 30;

/// Sends [`TOTAL`] bytes of pages from `mem` (round and round) through `f`, then
/// finishes it.
pub fn send_pages(f: &mut QemuFile, mem: &Arc<Vec<u8>>) {
    let owner: KeepAlive = mem.clone();
    f.set_chunk_budget(1 << 20);
    for i in 0..TOTAL / PAGE {
        let off = (i * PAGE) % mem.len();
        f.put_be64((off as u64) | 0x08);
        // SAFETY: `mem` outlives the file and is kept alive by `owner`.
        unsafe { f.put_buffer_external(mem.as_ptr().add(off), PAGE, &owner) };
        if f.budget_exhausted() {
            f.flush().unwrap();
        }
    }
    f.finish().unwrap();
}
