//! A post-copy destination's RAM: every block registered with userfaultfd, so that a
//! thread touching a page that has not arrived waits for it, a vCPU inside `KVM_RUN`
//! included; pages dropped by the source's discards fault again; each fault becomes a
//! request (QEMU's fault thread and `postcopy_request_page`), and each page that arrives,
//! asked for or not, is placed atomically and marked received.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use dirty_bitmap::DirtyBitmap;

use crate::format::TARGET_PAGE_SIZE;
use crate::{Error, Placed, RamBlock, RamList, Result, Userfault};

/// The blocks of a destination during post-copy, and what arrived of them.
#[derive(Debug)]
pub struct PostcopyRam {
    uffd: Arc<Userfault>,
    /// Each block with its received pages (set by [`PostcopyRam::place`]).
    blocks: Vec<(Arc<RamBlock>, DirtyBitmap)>,
    /// Tells the fault thread to end.
    stop: Arc<AtomicBool>,
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Postcopy {
        reason: format!("{what}: {e}"),
    }
}

impl PostcopyRam {
    /// Registers every block of `list` with a new userfaultfd (QEMU's
    /// `postcopy_ram_incoming_setup`, at LISTEN): pages already in place (loaded before
    /// the switch) stay; the others make whoever touches them wait.
    ///
    /// # Errors
    /// No userfaultfd here, or a block's memory cannot be registered.
    pub fn register(list: &RamList) -> Result<Self> {
        let uffd = Arc::new(Userfault::new().map_err(|e| io_error("userfaultfd", e))?);
        let mut blocks = Vec::new();
        for b in list.blocks() {
            uffd.register(b.page_ptr(0), b.used_length() as usize)
                .map_err(|e| io_error(&format!("block {:?}", b.idstr()), e))?;
            let received = DirtyBitmap::new(b.used_pages());
            blocks.push((b, received));
        }
        Ok(PostcopyRam {
            uffd,
            blocks,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    fn block(&self, name: &str) -> Result<&(Arc<RamBlock>, DirtyBitmap)> {
        self.blocks
            .iter()
            .find(|(b, _)| b.idstr() == name)
            .ok_or_else(|| Error::UnknownBlock {
                idstr: name.to_string(),
            })
    }

    fn page_of(&self, name: &str, offset: u64) -> Result<(&Arc<RamBlock>, &DirtyBitmap, usize)> {
        let (b, received) = self.block(name)?;
        if offset % TARGET_PAGE_SIZE != 0 || offset >= b.used_length() {
            return Err(Error::Postcopy {
                reason: format!(
                    "offset {offset:#x} is not a page of block {name:?} ({} bytes)",
                    b.used_length()
                ),
            });
        }
        Ok((b, received, (offset / TARGET_PAGE_SIZE) as usize))
    }

    /// Drops `len` bytes at `start` of block `name` (a source's discard: pages dirtied
    /// after they were sent, or never sent): they fault again until placed. Private
    /// memory is dropped with `MADV_DONTNEED`, shared memory with `MADV_REMOVE` (which
    /// frees its pages in the file too).
    ///
    /// # Errors
    /// An unknown block, a range outside it or not of whole pages, or the kernel's.
    pub fn discard(&self, name: &str, start: u64, len: u64) -> Result<()> {
        let (b, received, first) = self.page_of(name, start)?;
        if len % TARGET_PAGE_SIZE != 0 || start + len > b.used_length() {
            return Err(Error::Postcopy {
                reason: format!("a discard of {len:#x} bytes at {start:#x} of {name:?}"),
            });
        }
        let advice = if b.host().unpopulated_is_zero() {
            libc::MADV_DONTNEED
        } else {
            libc::MADV_REMOVE
        };
        // SAFETY: the range lies inside the block's mapping (checked above); dropping
        // its pages is what the source asked for, and nothing of the guest runs yet.
        let r = unsafe { libc::madvise(b.page_ptr(first).cast(), len as usize, advice) };
        if r != 0 {
            return Err(io_error("madvise", std::io::Error::last_os_error()));
        }
        for p in first..first + (len / TARGET_PAGE_SIZE) as usize {
            received.test_and_clear(p);
        }
        Ok(())
    }

    /// Places page `offset` of block `name`: `data` (one page), or zeros (None). A page
    /// that is there already is left as it was ([`Placed::Already`]).
    ///
    /// # Errors
    /// An unknown block or offset, a short page, or the kernel's.
    pub fn place(&self, name: &str, offset: u64, data: Option<&[u8]>) -> Result<Placed> {
        let (b, received, page) = self.page_of(name, offset)?;
        let dst = b.page_ptr(page);
        let placed = match data {
            Some(d) if d.len() == TARGET_PAGE_SIZE as usize => self.uffd.copy(dst, d),
            Some(d) => {
                return Err(Error::Postcopy {
                    reason: format!("a page of {} bytes", d.len()),
                });
            }
            None => self.uffd.zero(dst, TARGET_PAGE_SIZE as usize),
        }
        .map_err(|e| io_error("placing a page", e))?;
        received.set(page);
        Ok(placed)
    }

    /// Whether page `offset` of block `name` was placed (since the last discard of it).
    pub fn is_received(&self, name: &str, offset: u64) -> bool {
        self.page_of(name, offset)
            .is_ok_and(|(_, received, page)| received.test(page))
    }

    /// Starts the fault thread: each fault on a page not placed yet calls `request` with
    /// the block's name and the page's offset (the caller asks the source for it), once
    /// per fault event; a fault on a page placed meanwhile is dropped. It ends at
    /// [`PostcopyRam::stop_faults`] or on the descriptor's error.
    pub fn start_faults(
        self: &Arc<Self>,
        mut request: impl FnMut(&str, u64) + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                while !me.stop.load(Ordering::SeqCst) {
                    let fault = match me.uffd.read_event(Some(Duration::from_millis(100))) {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(_) => return,
                    };
                    if let Some((b, received, page)) = me.locate(fault.address) {
                        if !received.test(page) {
                            request(b.idstr(), page as u64 * TARGET_PAGE_SIZE);
                        }
                    }
                }
            })
    }

    /// The block and page of host address `addr`.
    fn locate(&self, addr: u64) -> Option<(&Arc<RamBlock>, &DirtyBitmap, usize)> {
        self.blocks.iter().find_map(|(b, received)| {
            let start = b.page_ptr(0) as u64;
            (addr >= start && addr < start + b.used_length())
                .then(|| (b, received, ((addr - start) / TARGET_PAGE_SIZE) as usize))
        })
    }

    /// Ends the fault thread (it notices within 100 ms).
    pub fn stop_faults(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Ends the registration of every block (post-copy is over: everything arrived).
    ///
    /// # Errors
    /// The kernel's.
    pub fn unregister(&self) -> Result<()> {
        for (b, _) in &self.blocks {
            self.uffd
                .unregister(b.page_ptr(0), b.used_length() as usize)
                .map_err(|e| io_error("unregistering", e))?;
        }
        Ok(())
    }
}
