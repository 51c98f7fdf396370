//! Post-copy preempt (QEMU 7.2's `postcopy-preempt`): a second connection, opened with
//! the main stream, that carries only the pages a post-copy destination asked for, so
//! that a vCPU waiting for one never waits behind the background pass. It holds bare RAM
//! records (a page or a zero page, the block named on the first record and whenever it
//! changes, as on the main stream, but no section header) and ends with one EOS.
//!
//! The source sends a request's pages from the thread that read it on the return path
//! (QEMU 8.0's way: the migration thread may be blocked in a write of the background
//! pass); each page goes once, on whichever connection clears its dirty bit first. The
//! destination reads the connection on a thread of its own from LISTEN on, placing each
//! page as the main stream's loader does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qemu_file::{KeepAlive, QemuFile};
use savevm::return_path::PageRequestSink;

use crate::format::{
    RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO,
    RecordHeader, TARGET_PAGE_SIZE,
};
use crate::{Error, PageRequests, PostcopyRam, RamBlock, RamStats, Result};

/// A post-copy source's page requests, as one return path's reader serves them: queued
/// for the migration thread, or sent at once on the preempt connection. One per
/// connection: the block of the last request and of the last record sent are that
/// connection's.
pub(crate) struct RequestServer {
    queue: Arc<PageRequests>,
    blocks: Vec<Arc<RamBlock>>,
    stats: Arc<RamStats>,
    // Lock: taken by the return path's reader for each request it sends (the caller
    // holds the channel, so it is never contended): the block of the last request (a
    // request may leave it out) and the index of the block of the last record sent.
    sent: Mutex<(Option<String>, Option<usize>)>,
}

impl RequestServer {
    pub(crate) fn new(
        queue: Arc<PageRequests>,
        blocks: Vec<Arc<RamBlock>>,
        stats: Arc<RamStats>,
    ) -> Self {
        RequestServer {
            queue,
            blocks,
            stats,
            sent: Mutex::new((None, None)),
        }
    }
}

impl PageRequestSink for RequestServer {
    fn push(&self, block: Option<&str>, start: u64, len: u64) -> std::result::Result<(), String> {
        self.queue
            .push(block, start, len)
            .map_err(|e| e.to_string())
    }

    fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    fn send_now(
        &self,
        block: Option<&str>,
        start: u64,
        len: u64,
        channel: &mut QemuFile,
    ) -> std::result::Result<(), String> {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let name = match block {
            Some(b) => b.to_string(),
            None => sent
                .0
                .clone()
                .ok_or("the first request must name its block")?,
        };
        let Some(bi) = self.blocks.iter().position(|b| b.idstr() == name) else {
            return Err(format!("no block {name:?} is migrated"));
        };
        sent.0 = Some(name);
        let b = &self.blocks[bi];
        let end = start.checked_add(len).filter(|&e| e <= b.used_length());
        if start % TARGET_PAGE_SIZE != 0 || len % TARGET_PAGE_SIZE != 0 || len == 0 || end.is_none()
        {
            return Err(format!(
                "a request for {len:#x} bytes at {start:#x} of block {:?} ({} bytes): not whole pages inside it",
                b.idstr(),
                b.used_length()
            ));
        }
        let first = (start / TARGET_PAGE_SIZE) as usize;
        let (mut zero, mut normal) = (0, 0);
        for page in first..first + (len / TARGET_PAGE_SIZE) as usize {
            // Whoever clears the bit sends the page: this thread or the background pass,
            // never both (a QEMU destination fails on a page placed twice).
            if !b.bitmap.test_and_clear(page) {
                continue;
            }
            let idstr = (sent.1 != Some(bi)).then(|| b.idstr());
            sent.1 = Some(bi);
            let offset = page as u64 * TARGET_PAGE_SIZE;
            if b.is_zero_page(page) {
                RecordHeader::write_page(channel, offset, RAM_SAVE_FLAG_ZERO, idstr);
                channel.put_u8(0);
                zero += 1;
            } else {
                RecordHeader::write_page(channel, offset, RAM_SAVE_FLAG_PAGE, idstr);
                let owner: KeepAlive = b.clone();
                // SAFETY: the page lies inside the block (checked above), which `owner`
                // keeps mapped until the bytes are written.
                unsafe {
                    channel.put_buffer_external(b.page_ptr(page), TARGET_PAGE_SIZE as usize, &owner)
                };
                normal += 1;
            }
        }
        self.stats.add_pages(zero, normal);
        Ok(())
    }

    fn end_channel(&self, channel: &mut QemuFile) {
        channel.put_be64(RAM_SAVE_FLAG_EOS);
    }
}

/// A post-copy destination's preempt connection, read on a thread of its own until
/// its EOS: each page placed in `ram` and counted in `stats` and `pages`. `stop` set
/// ends it between records (its connection is shut down to end a blocked read).
///
/// # Errors
/// A broken connection, or a record that is not a page (or EOS), of a block or offset
/// `ram` lacks.
pub(crate) fn receive(
    f: &mut QemuFile,
    ram: &PostcopyRam,
    stats: &RamStats,
    pages: &AtomicU64,
    stop: &AtomicBool,
) -> Result<()> {
    let mut block: Option<String> = None;
    let mut page = vec![0u8; TARGET_PAGE_SIZE as usize];
    while !stop.load(Ordering::Relaxed) {
        let at = f.bytes_read();
        let h = RecordHeader::read_from(f)?;
        let kind = h.flags & !RAM_SAVE_FLAG_CONTINUE;
        match kind {
            RAM_SAVE_FLAG_EOS if h.flags == kind => return Ok(()),
            RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE => {}
            _ => return Err(Error::UnknownFlags { at, flags: h.flags }),
        }
        if let Some(name) = h.idstr {
            block = Some(name);
        }
        let name = block.as_deref().ok_or_else(|| Error::BadPage {
            at,
            reason: "CONTINUE with no previous block on the preempt channel".into(),
        })?;
        if kind == RAM_SAVE_FLAG_ZERO {
            let fill = f.get_u8()?;
            if fill != 0 {
                return Err(Error::BadPage {
                    at,
                    reason: format!("a zero page has fill byte {fill:#04x}, not 0"),
                });
            }
            ram.place_preempt(name, h.offset, None)?;
            stats.add_pages(1, 0);
            pages.fetch_add(1, Ordering::Relaxed);
        } else {
            f.get_buffer(&mut page)?;
            ram.place_preempt(name, h.offset, Some(&page))?;
            stats.add_pages(0, 1);
            pages.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;
    use vm_memory::MmapRegion;

    fn block(name: &str, pages: usize) -> Arc<RamBlock> {
        let host = Arc::new(MmapRegion::<()>::new(pages * 4096).unwrap());
        Arc::new(RamBlock::new(name, host, Box::new(())).unwrap())
    }

    #[test]
    fn requested_pages_go_once_as_bare_records_naming_each_block_change() {
        let (a, b) = (block("pc.ram", 8), block("vga", 2));
        a.write_bytes(3 * 4096, &[7; 4096]);
        for x in [&a, &b] {
            x.bitmap.set_range(0..x.used_pages());
        }
        // Page 4 went with the background pass already.
        a.bitmap.test_and_clear(4);
        let stats = Arc::new(RamStats::default());
        let s = RequestServer::new(Arc::default(), vec![a.clone(), b.clone()], stats.clone());
        let buf = MemBuffer::new();
        let mut f = buf.file();
        s.send_now(Some("pc.ram"), 3 * 4096, 2 * 4096, &mut f)
            .unwrap();
        // Asked again: nothing more goes.
        s.send_now(None, 3 * 4096, 4096, &mut f).unwrap();
        s.send_now(Some("vga"), 4096, 4096, &mut f).unwrap();
        s.end_channel(&mut f);
        f.flush().unwrap();
        let mut want = Vec::new();
        want.extend(((3 * 4096) | RAM_SAVE_FLAG_PAGE).to_be_bytes());
        want.extend([6]);
        want.extend(b"pc.ram");
        want.extend([7; 4096]);
        want.extend((4096 | RAM_SAVE_FLAG_ZERO).to_be_bytes());
        want.extend([3]);
        want.extend(b"vga");
        want.push(0);
        want.extend(RAM_SAVE_FLAG_EOS.to_be_bytes());
        assert_eq!(buf.contents(), want);
        assert!(!a.bitmap.test(3) && a.bitmap.test(2) && !b.bitmap.test(1));
        let st = stats.snapshot();
        assert_eq!((st.normal, st.duplicate), (1, 1));
    }

    #[test]
    fn requests_it_cannot_serve_are_refused_in_words() {
        let s = RequestServer::new(Arc::default(), vec![block("pc.ram", 4)], Arc::default());
        let buf = MemBuffer::new();
        let mut f = buf.file();
        let e = s.send_now(None, 0, 4096, &mut f).unwrap_err();
        assert!(e.contains("name its block"), "{e}");
        let e = s.send_now(Some("rom"), 0, 4096, &mut f).unwrap_err();
        assert!(e.contains("no block \"rom\""), "{e}");
        let e = s
            .send_now(Some("pc.ram"), 4 * 4096, 4096, &mut f)
            .unwrap_err();
        assert!(e.contains("inside it"), "{e}");
        let e = s.send_now(Some("pc.ram"), 100, 4096, &mut f).unwrap_err();
        assert!(e.contains("whole pages"), "{e}");
    }
}
