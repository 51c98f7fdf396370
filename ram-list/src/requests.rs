//! Pages a post-copy destination asked for (its return path's `REQ_PAGES`), served
//! before the background pass over dirty pages: QEMU's `ram_save_queue_pages` and
//! `unqueue_page`.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, Result};

/// The queue of requested pages, shared by whoever reads the return path (pushes) and
/// the migration thread (its RAM section takes them).
#[derive(Debug, Default)]
pub struct PageRequests {
    // Lock: pushed by the return-path reader, popped by the RAM section while it sends.
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    /// (block, offset, bytes left), oldest first.
    items: VecDeque<(String, u64, u64)>,
    /// The block of the last request (a request may leave it out).
    last_block: Option<String>,
}

impl PageRequests {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `len` bytes at `start` of `block` (None: the block of the previous
    /// request), whole target pages.
    ///
    /// # Errors
    /// [`Error::BadPageRequest`]: no block named and none before, a range not made of
    /// whole pages, or an empty one. Whether it lies inside its block is checked when it
    /// is served.
    pub fn push(&self, block: Option<&str>, start: u64, len: u64) -> Result<()> {
        let bad = |reason: &str| Error::BadPageRequest {
            reason: reason.to_string(),
        };
        if start % TARGET_PAGE_SIZE != 0 || len % TARGET_PAGE_SIZE != 0 || len == 0 {
            return Err(bad("a request must be whole pages"));
        }
        let mut q = self.lock();
        let block = match block {
            Some(b) => b.to_string(),
            None => q
                .last_block
                .clone()
                .ok_or_else(|| bad("the first request must name its block"))?,
        };
        q.last_block = Some(block.clone());
        q.items.push_back((block, start, len));
        Ok(())
    }

    /// Forgets every request (a resumed post-copy: the destination asks again).
    pub fn clear(&self) {
        let mut q = self.lock();
        q.items.clear();
        q.last_block = None;
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// The next requested page: its block and offset.
    pub(crate) fn pop(&self) -> Option<(String, u64)> {
        let mut q = self.lock();
        let (block, start, len) = q.items.front_mut()?;
        let page = (block.clone(), *start);
        *start += TARGET_PAGE_SIZE;
        *len -= TARGET_PAGE_SIZE;
        if *len == 0 {
            q.items.pop_front();
        }
        Some(page)
    }
}

impl savevm::return_path::PageRequestSink for PageRequests {
    fn push(&self, block: Option<&str>, start: u64, len: u64) -> std::result::Result<(), String> {
        PageRequests::push(self, block, start, len).map_err(|e| e.to_string())
    }

    fn waiting(&self) -> bool {
        !self.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_come_out_page_by_page_in_order() {
        let r = PageRequests::new();
        assert!(r.push(None, 0, 4096).is_err(), "no block yet");
        r.push(Some("pc.ram"), 0x3000, 0x2000).unwrap();
        r.push(None, 0x9000, 0x1000).unwrap();
        r.push(Some("vga"), 0, 0x1000).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| r.pop()).collect();
        assert_eq!(
            got,
            [
                ("pc.ram".to_string(), 0x3000),
                ("pc.ram".to_string(), 0x4000),
                ("pc.ram".to_string(), 0x9000),
                ("vga".to_string(), 0),
            ]
        );
        assert!(r.is_empty());
        assert!(r.push(None, 0x100, 0x1000).is_err(), "not page aligned");
        assert!(r.push(None, 0x1000, 0).is_err(), "empty");
    }
}
