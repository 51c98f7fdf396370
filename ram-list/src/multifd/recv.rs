//! The destination's multifd channels (QEMU 7.2's `multifd_recv_*`): one thread per
//! connection checks its opening message, then reads packets and writes their pages
//! straight into guest memory (or decompresses them there).
//!
//! Rounds: a channel that read a SYNC packet waits until the main stream reached the RAM
//! EOS record of that round ([`MultifdReceiver::sync`], QEMU's `multifd_recv_sync_main`),
//! which itself waits for every channel's SYNC. So when the loader reads past an EOS,
//! every page the source sent before it is in memory, and no page of the next round is
//! written before the main stream's records of this one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use qemu_file::{QemuFile, ShutdownHandle, Transport};

use super::zstd::{COMPRESSED_SOCKET_BUFFER, ZstdRecv};
use super::{MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_ZSTD};
use crate::format::TARGET_PAGE_SIZE;
use crate::multifd::{ChannelInit, MULTIFD_FLAG_SYNC, PACKET_HEADER_LEN, PacketHeader, RecvTarget};
use crate::{Error, RamBlock, Result};

const PAGE: usize = TARGET_PAGE_SIZE as usize;

struct Shared {
    // Lock: the rounds' state; `cond` wakes the main loader and the channels.
    state: Mutex<State>,
    cond: Condvar,
    /// Bytes the channels read.
    read: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Channels that read this round's SYNC and wait.
    synced: usize,
    /// Rounds the main stream released.
    released: u64,
    /// Channels whose thread ended (no more SYNC can come from them).
    ended: usize,
    /// Channel numbers seen in opening messages.
    ids: Vec<bool>,
    /// The first channel error, kept for whoever asks.
    error: Option<Arc<Error>>,
    /// The load is over: channels stop, and their errors no longer matter.
    finishing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The destination's multifd channels, shared by the loader (rounds) and its owner
/// (errors, the end).
pub struct MultifdReceiver {
    shared: Arc<Shared>,
    channels: usize,
    // Lock: joined once, by `finish` or drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
    shutdowns: Vec<ShutdownHandle>,
}

impl std::fmt::Debug for MultifdReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultifdReceiver")
            .field("channels", &self.channels)
            .finish()
    }
}

impl MultifdReceiver {
    /// Starts one thread per connection. A channel's failure is recorded and `on_error`
    /// (the main stream's interrupter) is called, so the loader stops at once.
    ///
    /// # Errors
    /// [`Error::MultifdSetup`]: no channels, more than 255, or a thread cannot start.
    pub fn start(
        channels: Vec<Box<dyn Transport>>,
        target: RecvTarget,
        on_error: Option<ShutdownHandle>,
    ) -> Result<Self> {
        let n = channels.len();
        if n == 0 || n > 255 {
            return Err(Error::MultifdSetup {
                reason: format!("{n} channels; 1 to 255 are possible"),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ids: vec![false; n],
                ..State::default()
            }),
            cond: Condvar::new(),
            read: AtomicU64::new(0),
        });
        if target.compressed {
            for t in &channels {
                t.limit_receive_buffer(COMPRESSED_SOCKET_BUFFER)
                    .map_err(|e| Error::MultifdSetup {
                        reason: format!("cannot size a channel's receive buffer: {e}"),
                    })?;
            }
        }
        let shutdowns = channels
            .iter()
            .filter_map(|t| t.shutdown_handle())
            .collect();
        let receiver = MultifdReceiver {
            shared: shared.clone(),
            channels: n,
            threads: Mutex::new(Vec::new()),
            shutdowns,
        };
        for (pos, t) in channels.into_iter().enumerate() {
            let (shared, target, on_error) = (shared.clone(), target.clone(), on_error.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("multifd-recv-{pos}"))
                .spawn(move || {
                    let mut id = pos as u8;
                    let r = run_channel(t, &target, &shared, n, &mut id);
                    let mut st = shared.lock();
                    st.ended += 1;
                    if let Err(e) = r {
                        if !st.finishing && st.error.is_none() {
                            st.error = Some(Arc::new(Error::Channel {
                                channel: id,
                                source: Box::new(e),
                            }));
                            if let Some(h) = &on_error {
                                h.shutdown();
                            }
                        }
                    }
                    drop(st);
                    shared.cond.notify_all();
                });
            match spawned {
                Ok(h) => receiver
                    .threads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(h),
                Err(e) => {
                    return Err(Error::MultifdSetup {
                        reason: format!("cannot start a channel thread: {e}"),
                    });
                }
            }
        }
        Ok(receiver)
    }

    /// At a RAM EOS record: waits until every channel read its SYNC packet of this round,
    /// then lets them go on.
    ///
    /// # Errors
    /// A channel failed, or ended before its SYNC.
    pub fn sync(&self) -> Result<()> {
        let mut st = self.shared.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(shared_error(e));
            }
            if st.synced == self.channels {
                break;
            }
            // Channels that ended cannot sync; once every other one synced (or ended),
            // the round can never complete. (Until then, one still running may yet
            // report the error that explains it.)
            if st.ended > 0 && st.synced + st.ended >= self.channels {
                return Err(Error::MultifdSetup {
                    reason: format!(
                        "the source closed {} of {} channels before the end of the stream's round (its migration failed, or it has more channels than this side's multifd-channels)",
                        st.ended, self.channels
                    ),
                });
            }
            st = self.shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.synced = 0;
        st.released += 1;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Bytes the channels read so far.
    pub fn bytes_read(&self) -> u64 {
        self.shared.read.load(Ordering::Relaxed)
    }

    /// Fails the load from outside (e.g. the source opened a connection too many): the
    /// next sync returns `e`, and the main stream is interrupted by the caller.
    pub fn fail(&self, e: Error) {
        let mut st = self.shared.lock();
        if st.error.is_none() {
            st.error = Some(Arc::new(e));
        }
        drop(st);
        self.shared.cond.notify_all();
    }

    /// The first channel error, if one failed.
    pub fn error(&self) -> Option<Error> {
        self.shared.lock().error.as_ref().map(shared_error)
    }

    /// Ends the channels once the load is over (or failed): their connections are shut
    /// down and their threads joined; errors from here on are not recorded.
    pub fn finish(&self) {
        {
            let mut st = self.shared.lock();
            st.finishing = true;
        }
        self.shared.cond.notify_all();
        for h in &self.shutdowns {
            h.shutdown();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for MultifdReceiver {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Errors are not `Clone`; a shared one is repeated by its message chain.
fn shared_error(e: &Arc<Error>) -> Error {
    match &**e {
        Error::Channel { channel, source } => Error::Channel {
            channel: *channel,
            source: Box::new(Error::Again(savevm::error_chain(source))),
        },
        other => Error::Again(savevm::error_chain(other)),
    }
}

fn run_channel(
    transport: Box<dyn Transport>,
    target: &RecvTarget,
    shared: &Shared,
    channels: usize,
    id_out: &mut u8,
) -> Result<()> {
    let mut f = QemuFile::new(transport);
    let init = ChannelInit::read_from(&mut f, channels.min(255) as u8)?;
    if init.uuid != target.uuid {
        return Err(Error::BadMultifd {
            at: 8,
            reason: format!(
                "the source's UUID {} is not this VM's {}",
                hex(&init.uuid),
                hex(&target.uuid)
            ),
        });
    }
    {
        let mut st = shared.lock();
        if std::mem::replace(&mut st.ids[init.id as usize], true) {
            return Err(Error::BadMultifd {
                at: 24,
                reason: format!("channel {} opened twice", init.id),
            });
        }
    }
    *id_out = init.id;
    let mut zstd: Option<ZstdRecv> = None;
    let mut block: Option<Arc<RamBlock>> = None;
    let mut round = 0u64;
    loop {
        if shared.lock().finishing {
            return Ok(());
        }
        // Exactly the header, so that the pages after it are read straight into guest
        // memory, not through the stream's buffer.
        let at = f.bytes_read();
        let mut raw = [0u8; PACKET_HEADER_LEN];
        match f.get_buffers(&mut [&mut raw[..]]) {
            Ok(()) => {}
            // The source closed the channel between packets.
            Err(qemu_file::Error::UnexpectedEof { .. }) if f.bytes_read() == at => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let h = PacketHeader::parse(&raw, at)?;
        shared
            .read
            .fetch_add(f.bytes_read() - at, Ordering::Relaxed);
        if !h.offsets.is_empty() {
            let b = match &block {
                Some(b) if b.idstr() == h.ramblock => b.clone(),
                _ => {
                    let b = target
                        .list
                        .find(&h.ramblock)
                        .ok_or_else(|| Error::UnknownBlock {
                            idstr: h.ramblock.clone(),
                        })?;
                    block = Some(b.clone());
                    b
                }
            };
            let data = f.bytes_read();
            load_pages(&mut f, &h, &b, &mut zstd, at)?;
            shared
                .read
                .fetch_add(f.bytes_read() - data, Ordering::Relaxed);
            if target.fresh {
                for &o in &h.offsets {
                    b.bitmap.set((o / TARGET_PAGE_SIZE) as usize);
                }
            }
            target.stats.add_pages(0, h.offsets.len() as u64);
        }
        if h.flags & MULTIFD_FLAG_SYNC != 0 {
            let mut st = shared.lock();
            st.synced += 1;
            shared.cond.notify_all();
            while st.released <= round && !st.finishing {
                st = shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            round += 1;
        }
    }
}

fn load_pages(
    f: &mut QemuFile,
    h: &PacketHeader,
    block: &RamBlock,
    zstd: &mut Option<ZstdRecv>,
    at: u64,
) -> Result<()> {
    if let Some(&o) = h.offsets.iter().find(|&&o| o >= block.used_length()) {
        return Err(Error::BadMultifd {
            at,
            reason: format!(
                "page offset {o:#x} is past the end of block {:?} ({} bytes)",
                block.idstr(),
                block.used_length()
            ),
        });
    }
    // Runs of consecutive pages, each read as one piece: (first offset, pages).
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &o in &h.offsets {
        match runs.last_mut() {
            Some((start, n)) if *start + (*n * PAGE) as u64 == o => *n += 1,
            _ => runs.push((o, 1)),
        }
    }
    let run = |&(o, n): &(u64, usize)| {
        // SAFETY: every offset is page aligned and none is in the packet twice (checked
        // by `PacketHeader::parse`), and each is below `used_length` (checked above), so
        // the runs are disjoint and each lies inside the block's mapped backing, which
        // `block` keeps alive. The destination VM does not run during a load and guest
        // memory is never borrowed elsewhere; only a source that sends one page in two
        // packets of a round makes two channels write it at once, which garbles that
        // guest page (the source's to give) and nothing of ours.
        unsafe {
            std::slice::from_raw_parts_mut(
                block.page_ptr((o / TARGET_PAGE_SIZE) as usize),
                n * PAGE,
            )
        }
    };
    match h.flags & MULTIFD_FLAG_COMPRESSION_MASK {
        0 => {
            let expected = h.offsets.len() * PAGE;
            if h.next_packet_size as usize != expected {
                return Err(Error::BadMultifd {
                    at,
                    reason: format!(
                        "{} bytes of data for {} uncompressed pages",
                        h.next_packet_size,
                        h.offsets.len()
                    ),
                });
            }
            let mut pieces: Vec<&mut [u8]> = runs.iter().map(run).collect();
            f.get_buffers(&mut pieces)?;
        }
        MULTIFD_FLAG_ZSTD => {
            if zstd.is_none() {
                *zstd = Some(ZstdRecv::new()?);
            }
            let z = zstd.as_mut().expect("set above");
            let len = h.next_packet_size as usize;
            f.get_buffer(z.input(len)?)?;
            let mut pieces: Vec<&mut [u8]> = runs.iter().map(run).collect();
            z.decompress(len, &mut pieces)?;
        }
        c => unreachable!("read_from refuses compression {c:#x}"),
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
