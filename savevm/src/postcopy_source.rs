//! The migration thread after the switch to post-copy (QEMU's `postcopy_start` and the
//! iterations that follow it): the guest stops here, its devices go to the destination
//! in one package that ends with RUN, and the rest of RAM follows while the guest runs
//! there, the pages it asks for first. docs/postcopy.md has the exchange.
//!
//! Until the package may have reached the destination, a failure resumes the guest here
//! as any failed migration does. From then on neither side alone has the whole guest: a
//! failure leaves this side stopped with its whole copy, in `postcopy-paused`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use qemu_file::{MemBuffer, QemuFile};

use crate::control::lock;
use crate::format::{MIG_CMD_PING, write_command};
use crate::return_path::{Message, PageRequestSink, read_message};
use crate::{
    CompletionTimes, Error, MigrationControl, MigrationParams, MigrationStatus, Result, SaveVm,
    SectionError, VmControl, postcopy,
};

/// What the destination says on the return path during post-copy, as the reader thread
/// saw it.
#[derive(Debug, Default)]
struct Heard {
    /// The destination's final status (SHUT).
    shut: Option<u32>,
    /// A vmm destination's reason for a failure.
    reason: Option<String>,
    /// The return path failed (the connection, or a request this side cannot serve).
    error: Option<String>,
    /// Page requests queued so far (counted after each is queued).
    requests: u64,
    /// A resume: the destination's received bitmaps, and its acknowledgement.
    bitmaps: Vec<(String, Vec<u8>)>,
    resume_ack: bool,
    /// The PONGs heard and not yet taken by the migration thread, in the order heard
    /// (the destination answers a PING once it has loaded everything before it). All of
    /// them, not the last: QEMU answers the switch package's PING 3 from its main thread
    /// while its listen thread already answers the PINGs after the package, so PONG 3
    /// may come after theirs (seen in CI: kept as "the last PONG", it hid them, and the
    /// background pass waited for room until the stall timeout).
    pongs: Vec<u32>,
}

/// The return path's reader and what it heard.
struct Listener {
    // Lock: written by the reader thread, read by the migration thread; `changed` is
    // signalled at each change.
    heard: Mutex<Heard>,
    changed: Condvar,
    /// Bytes the reader thread wrote on the preempt connection.
    preempt_bytes: AtomicU64,
}

/// The preempt connection (`postcopy-preempt`), written by the return path's reader
/// (the pages asked for) and by the migration thread (its end).
type Preempt = Arc<Mutex<QemuFile>>;

impl Listener {
    fn set(&self, f: impl FnOnce(&mut Heard)) {
        f(&mut lock(&self.heard));
        self.changed.notify_all();
    }

    /// The reader thread: page requests to the sections' queues (or, with a preempt
    /// connection, their pages sent on it at once), until SHUT or an error.
    fn read(
        &self,
        mut rp: QemuFile,
        sinks: &[Arc<dyn PageRequestSink>],
        preempt: Option<&Preempt>,
        ctl: &MigrationControl,
    ) {
        loop {
            match read_message(&mut rp) {
                Ok(Message::ReqPages { block, start, len }) => {
                    ctl.update(|i| i.postcopy_requests += 1);
                    let r = match (sinks.first(), preempt) {
                        (None, _) => Err("no section here serves page requests".into()),
                        (Some(s), Some(p)) => self.send_now(&**s, p, block.as_deref(), start, len),
                        (Some(s), None) => s.push(block.as_deref(), start, len.into()),
                    };
                    if let Err(e) = r {
                        self.set(|h| {
                            h.error = Some(format!("the destination's page request: {e}"))
                        });
                        return;
                    }
                    if preempt.is_none() {
                        self.set(|h| h.requests += 1);
                    }
                }
                Ok(Message::Pong(v)) => self.set(|h| h.pongs.push(v)),
                Ok(Message::RecvBitmap { block, bitmap }) => {
                    self.set(|h| h.bitmaps.push((block, bitmap)));
                }
                Ok(Message::ResumeAck) => self.set(|h| h.resume_ack = true),
                Ok(Message::Reason(r)) => self.set(|h| h.reason = Some(r)),
                Ok(Message::Shut(status)) => {
                    self.set(|h| h.shut = Some(status));
                    return;
                }
                Err(e) => {
                    self.set(|h| h.error = Some(crate::error_chain(&e)));
                    return;
                }
            }
        }
    }

    /// A request's pages, on the preempt connection at once (whichever was not sent yet).
    fn send_now(
        &self,
        sink: &dyn PageRequestSink,
        preempt: &Preempt,
        block: Option<&str>,
        start: u64,
        len: u32,
    ) -> std::result::Result<(), String> {
        let mut p = lock(preempt);
        let before = p.bytes_written();
        sink.send_now(block, start, len.into(), &mut p)?;
        p.flush()
            .map_err(|e| format!("the preempt connection: {e}"))?;
        self.preempt_bytes
            .fetch_add(p.bytes_written() - before, Ordering::Relaxed);
        Ok(())
    }

    /// A failure of the return path, if any (a SHUT with a failure counts).
    fn failure(&self) -> Option<Error> {
        let h = lock(&self.heard);
        if let Some(status) = h.shut.filter(|s| *s != 0) {
            return Some(Error::DestinationFailed {
                status,
                reason: h.reason.clone(),
            });
        }
        h.error.clone().map(|e| Error::Postcopy {
            reason: format!("the return path: {e}"),
        })
    }

    /// Waits until `deadline` unless a request is queued (`requested`) or comes, a PONG
    /// is there to take, or the return path ends.
    fn wait_request(&self, deadline: Instant, requested: impl Fn() -> bool) {
        let h = lock(&self.heard);
        // Counted before the queue is looked at: a request queued after the look is
        // counted after it, and ends the wait.
        let seen = h.requests;
        if requested() {
            return;
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .changed
            .wait_timeout_while(h, timeout, |h| {
                h.requests == seen && h.pongs.is_empty() && h.shut.is_none() && h.error.is_none()
            })
            .unwrap_or_else(|p| p.into_inner());
    }

    /// The PONGs heard since the last call, oldest first.
    fn take_pongs(&self) -> Vec<u32> {
        std::mem::take(&mut lock(&self.heard).pongs)
    }

    /// Waits at most `timeout` until `done` holds of what was heard, or the return path
    /// ended.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&Heard) -> bool) -> Result<()> {
        let h = lock(&self.heard);
        let (h, _) = self
            .changed
            .wait_timeout_while(h, timeout, |h| {
                !done(h) && h.shut.is_none() && h.error.is_none()
            })
            .unwrap_or_else(|p| p.into_inner());
        if done(&h) {
            return Ok(());
        }
        drop(h);
        Err(self.failure().unwrap_or_else(|| Error::Postcopy {
            reason: format!("no answer in {} ms", timeout.as_millis()),
        }))
    }

    /// Waits at most `timeout` for SHUT.
    fn wait_shut(&self, timeout: Duration) -> Result<()> {
        let h = lock(&self.heard);
        let (h, _) = self
            .changed
            .wait_timeout_while(h, timeout, |h| h.shut.is_none() && h.error.is_none())
            .unwrap_or_else(|p| p.into_inner());
        match (h.shut, &h.error) {
            (Some(0), _) => Ok(()),
            (Some(status), _) => Err(Error::DestinationFailed {
                status,
                reason: h.reason.clone(),
            }),
            (None, Some(e)) => Err(Error::Postcopy {
                reason: format!("the return path: {e}"),
            }),
            (None, None) => Err(Error::Postcopy {
                reason: format!("no answer in {} ms", timeout.as_millis()),
            }),
        }
    }
}

/// The target page size post-copy is advised with (every block has 4 KiB pages).
pub(crate) const ADVISE: postcopy::Advise = postcopy::Advise {
    page_size_summary: crate::TARGET_PAGE_SIZE,
    target_page_size: crate::TARGET_PAGE_SIZE,
};

/// Chunks after the switch are small: a requested page waits behind at most one.
const POSTCOPY_CHUNK: usize = 64 << 10;

/// After the switch, the background pass leaves at most this much of the stream not
/// loaded yet by the destination (and one chunk more): a requested page queues behind
/// all of it. On the `postcopy` bench scenario (3 runs each, fault wait p50 and p99):
/// 512 KiB 44–162 and 257–410 µs, 128 KiB 58–91 and 171–362 µs, 64 KiB 8–33 and
/// 101–104 µs, the post-copy phase no longer (the destination's placing sets its pace).
const POSTCOPY_IN_FLIGHT: u64 = 64 << 10;

/// With a preempt connection, chunks of the background pass may be larger: no requested
/// page waits behind them.
const POSTCOPY_CHUNK_PREEMPT: usize = 128 << 10;

/// With a preempt connection a requested page never queues behind the background pass,
/// but one the pass sent already (its bit cleared, so it does not go again) arrives only
/// once the destination loaded everything before it. On the `postcopy-preempt` bench
/// scenario (3 single runs each, ours only, median post-copy phase and fault wait p99):
/// 64 MiB 531 ms and 311 µs, 4 MiB 589 ms and 139 µs, 1 MiB 575 ms and 114 µs.
const POSTCOPY_IN_FLIGHT_PREEMPT: u64 = 1 << 20;

fn vm_error(op: &'static str) -> impl FnOnce(SectionError) -> Error {
    move |source| Error::Vm { op, source }
}

/// After the package may have gone out, any failure leaves both sides paused.
fn interrupted(e: Error) -> Error {
    match e {
        Error::PostcopyInterrupted { .. } => e,
        other => Error::PostcopyInterrupted {
            reason: crate::error_chain(&other),
        },
    }
}

/// One connection's return path: its reader thread and what it heard.
struct Link<'scope> {
    listener: std::sync::Arc<Listener>,
    thread: Option<std::thread::ScopedJoinHandle<'scope, ()>>,
    shut: Option<qemu_file::ShutdownHandle>,
    /// The preempt connection, if the migration has one.
    preempt: Option<Preempt>,
    preempt_shut: Option<qemu_file::ShutdownHandle>,
}

impl<'scope> Link<'scope> {
    /// Starts reading `f`'s return path on a thread of its own; with `preempt`, the
    /// pages asked for go on it.
    fn open<'env>(
        s: &'scope std::thread::Scope<'scope, 'env>,
        f: &mut QemuFile,
        sinks: Vec<std::sync::Arc<dyn PageRequestSink>>,
        preempt: Option<QemuFile>,
        ctl: &'env MigrationControl,
    ) -> Result<Self> {
        let preempt_shut = preempt.as_ref().and_then(|p| p.shutdown_handle());
        let preempt = preempt.map(|p| Arc::new(Mutex::new(p)));
        let reader = f.split_reader().map_err(|e| Error::Postcopy {
            reason: format!("the return path cannot be read by a thread of its own: {e}"),
        })?;
        let shut = reader.shutdown_handle();
        let listener = std::sync::Arc::new(Listener {
            heard: Mutex::new(Heard::default()),
            changed: Condvar::new(),
            preempt_bytes: AtomicU64::new(0),
        });
        let l = listener.clone();
        let p = preempt.clone();
        let thread = std::thread::Builder::new()
            .name("return-path".into())
            .spawn_scoped(s, move || {
                // A vCPU at the destination waits for each request this thread reads.
                crate::priority::serve_waiting_guest();
                l.read(reader, &sinks, p.as_ref(), ctl)
            })
            .map_err(|e| Error::Postcopy {
                reason: format!("no thread for the return path: {e}"),
            })?;
        Ok(Link {
            listener,
            thread: Some(thread),
            shut,
            preempt,
            preempt_shut,
        })
    }

    /// Ends the reader (it ended by itself at SHUT when all went well), and the
    /// preempt connection (shut down, unless all went well).
    fn close(&mut self) {
        if let Some(t) = self.thread.take() {
            if !t.is_finished() {
                if let Some(h) = &self.shut {
                    h.shutdown();
                }
                if let Some(h) = &self.preempt_shut {
                    h.shutdown();
                }
            }
            let _ = t.join();
        }
        self.preempt = None;
    }
}

/// The switch and the post-copy phase, to the destination's SHUT. `stopped` is set once
/// the vCPUs are asked to stop. A connection that fails after the switch pauses both
/// sides: this one waits, stopped and whole, for [`MigrationControl::resume_postcopy`]'s
/// new connection (or a cancel, which gives up), asks the destination which pages it
/// has, and sends the rest (QEMU's post-copy recovery).
pub(crate) fn run_postcopy<V: VmControl + ?Sized>(
    savevm: &mut SaveVm,
    f: &mut QemuFile,
    vm: &V,
    ctl: &MigrationControl,
    params: &MigrationParams,
    stopped: &mut bool,
) -> Result<()> {
    let preempt_channel = || -> Result<Option<QemuFile>> {
        match (params.postcopy_preempt, ctl.take_preempt_channel()) {
            (false, _) => Ok(None),
            (true, Some(p)) => Ok(Some(p)),
            (true, None) => Err(Error::Postcopy {
                reason: "postcopy-preempt is on, but no preempt connection was opened".into(),
            }),
        }
    };
    std::thread::scope(|s| {
        let mut link = Link::open(s, f, savevm.page_request_sinks(), preempt_channel()?, ctl)?;
        let mut r = switch(savevm, f, vm, ctl, stopped, &link.listener);
        if matches!(r, Err(ref e) if !matches!(e, Error::PostcopyInterrupted { .. })) {
            // Before the package could go out: a failed migration, the guest resumes.
            link.close();
            return r;
        }
        loop {
            // (A switch cut while its package went out pauses at once.)
            if r.is_ok() {
                r = send_rest(savevm, f, vm, ctl, params, &link);
            }
            link.close();
            let mut e = match std::mem::replace(&mut r, Ok(())) {
                Ok(()) => return Ok(()),
                Err(e) => interrupted(e),
            };
            // Paused until a new connection resumes it, or a cancel gives up.
            loop {
                ctl.set_status(MigrationStatus::PostcopyPaused, |i| {
                    i.error = Some(crate::error_chain(&e));
                });
                let Some(new) = ctl.wait_resume() else {
                    return Err(e);
                };
                *f = new;
                if let Some(h) = f.shutdown_handle() {
                    lock(&ctl.shutdown).push(h);
                }
                let resumed = preempt_channel()
                    .and_then(|p| Link::open(s, f, savevm.page_request_sinks(), p, ctl))
                    .and_then(|l| {
                        link = l;
                        resume(savevm, f, params, &link.listener)
                    });
                match resumed {
                    Ok(()) => break,
                    Err(again) => {
                        link.close();
                        e = interrupted(again);
                    }
                }
            }
            ctl.set_status(MigrationStatus::PostcopyActive, |_| {});
        }
    })
}

/// A resume's handshake on the new connection: RECV_BITMAP for every block, each
/// answered with what arrived there, which this side then sends again; then
/// POSTCOPY_RESUME, answered by RESUME_ACK.
fn resume(
    savevm: &mut SaveVm,
    f: &mut QemuFile,
    params: &MigrationParams,
    listener: &Listener,
) -> Result<()> {
    let blocks = savevm.postcopy_blocks();
    for b in &blocks {
        postcopy::write_recv_bitmap(f, b);
    }
    f.flush()?;
    let n = blocks.len();
    listener.wait_for(params.stall_timeout, |h| h.bitmaps.len() >= n)?;
    let bitmaps = std::mem::take(&mut lock(&listener.heard).bitmaps);
    savevm.postcopy_resume(&bitmaps)?;
    postcopy::write_resume(f);
    f.flush()?;
    listener.wait_for(params.stall_timeout, |h| h.resume_ack)
}

/// The switch, to the package sent: stop the guest, end what cannot go on, the
/// discards, PING 2, PACKAGED, PING 4.
fn switch<V: VmControl + ?Sized>(
    savevm: &mut SaveVm,
    f: &mut QemuFile,
    vm: &V,
    ctl: &MigrationControl,
    stopped: &mut bool,
    listener: &Listener,
) -> Result<()> {
    let t_stop = Instant::now();
    let stopped_at = SystemTime::now();
    ctl.set_status(MigrationStatus::PostcopyActive, |i| {
        i.stopped_at = Some(stopped_at);
        i.postcopy_started = Some(t_stop);
    });
    let mut times = CompletionTimes::default();
    let bytes_at_stop = f.bytes_written();
    *stopped = true;
    vm.stop_vcpus().map_err(vm_error("stop its vCPUs"))?;
    times.stop_vcpus = t_stop.elapsed();
    {
        let _g = vm.lock();
        let t = Instant::now();
        vm.flush_disks().map_err(vm_error("flush its disks"))?;
        times.flush_disks = t.elapsed();
        let t = Instant::now();
        savevm.pending_exact()?;
        times.final_sync = t.elapsed();
        let t = Instant::now();
        f.rate_limiter().set_max_bytes_per_sec(0);
        savevm.save_postcopy_switch(f)?;
        write_command(f, MIG_CMD_PING, &2u32.to_be_bytes());
        times.send_ram = t.elapsed();

        let t = Instant::now();
        let package = MemBuffer::new();
        let mut p = package.file();
        postcopy::write_listen(&mut p);
        savevm.save_device_records(&mut p)?;
        write_command(&mut p, MIG_CMD_PING, &3u32.to_be_bytes());
        postcopy::write_run(&mut p);
        p.flush()?;
        if let Some(e) = listener.failure() {
            return Err(e);
        }
        // The point of no return: once the package may be out, the destination may run
        // the guest, and this side must not.
        if !ctl.commit() {
            return Err(Error::Cancelled);
        }
        postcopy::write_packaged(f, &package.contents());
        write_command(f, MIG_CMD_PING, &4u32.to_be_bytes());
        f.flush().map_err(|e| interrupted(e.into()))?;
        times.send_devices = t.elapsed();
    }
    times.total = t_stop.elapsed();
    let bytes_at_run = f.bytes_written();
    ctl.update(|i| {
        // The pause as this side sees it: until the package went out.
        i.downtime = Some(times.total);
        i.completion = Some(times);
        i.downtime_bytes = bytes_at_run - bytes_at_stop;
        i.transferred = bytes_at_run;
    });
    Ok(())
}

/// How far the destination has loaded the stream after the switch. Each iteration ends
/// with a PING, which a destination (this one or QEMU) answers with a PONG once it has
/// loaded everything before it. What the socket says is in flight counts only what has
/// not reached the destination's kernel, not what waits there for its loading thread;
/// and a receive buffer shrunk on a live connection drops segments, for which the
/// sender waits out TCP's retransmission timeout (200 ms, measured).
struct Pings {
    /// The PINGs not answered yet: (value, stream position after it), oldest first.
    out: VecDeque<(u32, u64)>,
    next: u32,
    /// The stream position the destination has loaded up to, at least.
    loaded: u64,
}

/// Our PINGs' values start here, apart from the switch's (2, 3 and 4, as QEMU's).
const FIRST_PING: u32 = 0x100;

impl Pings {
    fn new(at: u64) -> Self {
        Pings {
            out: VecDeque::new(),
            next: FIRST_PING,
            loaded: at,
        }
    }

    fn send(&mut self, f: &mut QemuFile) {
        write_command(f, MIG_CMD_PING, &self.next.to_be_bytes());
        self.out.push_back((self.next, f.bytes_written()));
        self.next = self.next.checked_add(1).unwrap_or(FIRST_PING);
    }

    /// PONGs heard: everything before each one's PING is loaded. Others' PONGs (the
    /// switch's) and repeats change nothing.
    fn heard(&mut self, pongs: &[u32]) {
        for v in pongs {
            if let Some(i) = self.out.iter().position(|(x, _)| x == v) {
                self.loaded = self.out[i].1;
                self.out.drain(..=i);
            }
        }
    }

    /// Stream bytes written and not known to be loaded.
    fn in_flight(&self, written: u64) -> u64 {
        written.saturating_sub(self.loaded)
    }
}

/// After the switch: the rest of RAM, to the destination's SHUT, on the connection of
/// the switch or of a resume (the counters go on from where the last one left them).
fn send_rest<V: VmControl + ?Sized>(
    savevm: &mut SaveVm,
    f: &mut QemuFile,
    vm: &V,
    ctl: &MigrationControl,
    params: &MigrationParams,
    link: &Link<'_>,
) -> Result<()> {
    let listener = &*link.listener;
    let info = ctl.info();
    let (carried, carried_pc, start) = (info.transferred, info.postcopy_bytes, f.bytes_written());
    let carried_preempt = info.postcopy_preempt_bytes;
    let count = |i: &mut crate::MigrationInfo, f: &QemuFile| {
        let preempt = listener.preempt_bytes.load(Ordering::Relaxed);
        let sent = f.bytes_written() - start + preempt;
        i.transferred = carried + sent;
        i.postcopy_bytes = carried_pc + sent;
        i.postcopy_preempt_bytes = carried_preempt + preempt;
    };
    // The rest of RAM, requested pages first. The limit paces the background pass
    // only: a requested page goes at once (the guest waits for it), as in QEMU. With a
    // preempt connection they go there, never behind the background pass, which then
    // needs neither small chunks nor a tight bound.
    let (chunk, in_flight) = match link.preempt {
        Some(_) => (POSTCOPY_CHUNK_PREEMPT, POSTCOPY_IN_FLIGHT_PREEMPT),
        None => (POSTCOPY_CHUNK, POSTCOPY_IN_FLIGHT),
    };
    f.set_chunk_budget(chunk);
    let mut pace = qemu_file::RateLimiter::new(params.max_postcopy_bandwidth);
    let mut pings = Pings::new(f.bytes_written());
    let sinks = savevm.page_request_sinks();
    let requested = || sinks.iter().any(|s| s.waiting());
    loop {
        if let Some(e) = listener.failure() {
            return Err(interrupted(e));
        }
        // A request goes at once, whatever is in flight; the background waits for room
        // and for its pace.
        let waiting_since = Instant::now();
        loop {
            pings.heard(&listener.take_pongs());
            if requested() {
                break;
            }
            let room = pings.in_flight(f.bytes_written()) <= in_flight;
            if room && !pace.exceeded() {
                break;
            }
            if let Some(e) = listener.failure() {
                return Err(interrupted(e));
            }
            if !room && waiting_since.elapsed() > params.stall_timeout {
                return Err(interrupted(Error::Postcopy {
                    reason: format!(
                        "the destination loaded nothing in {} ms",
                        params.stall_timeout.as_millis()
                    ),
                }));
            }
            let until = if room {
                pace.window_end()
            } else {
                Instant::now() + Duration::from_millis(100)
            };
            listener.wait_request(until, requested);
        }
        let before = f.bytes_written();
        let done = {
            let _g = vm.lock();
            savevm.save_iterate(f).map_err(interrupted)?
        };
        pings.send(f);
        f.flush().map_err(|e| interrupted(e.into()))?;
        let remaining = savevm.pending_estimate();
        ctl.update(|i| {
            count(i, f);
            i.remaining = remaining;
        });
        pace.consume(f.bytes_written() - before);
        if done && remaining == 0 {
            break;
        }
    }
    if let (Some(p), Some(sink)) = (&link.preempt, sinks.first()) {
        // Every page went: the preempt connection ends (its EOS), before the main one.
        let mut p = lock(p);
        sink.end_channel(&mut p);
        p.flush().map_err(|e| interrupted(e.into()))?;
    }
    savevm.save_complete_postcopy(f).map_err(interrupted)?;
    f.flush().map_err(|e| interrupted(e.into()))?;
    listener
        .wait_shut(params.stall_timeout)
        .map_err(interrupted)?;
    if let Some(p) = &link.preempt {
        let _ = lock(p).finish();
    }
    // The end of the stream only after SHUT: over TLS it is a close_notify record, which
    // QEMU, done at EOF, never reads, and a socket closed with it unread is reset (its
    // SHUT lost with it, measured). Once SHUT came, nothing depends on it.
    let _ = f.finish();
    ctl.update(|i| count(i, f));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pongs_move_what_is_known_loaded() {
        let buf = MemBuffer::new();
        let mut f = buf.file();
        let mut p = Pings::new(f.bytes_written());
        f.put_buffer(&[0; 1000]);
        p.send(&mut f);
        let first = f.bytes_written();
        f.put_buffer(&[0; 500]);
        p.send(&mut f);
        let written = f.bytes_written();
        assert_eq!(p.in_flight(written), written);
        // The switch's PONG 4, and nothing yet: no change.
        p.heard(&[4]);
        p.heard(&[]);
        assert_eq!(p.in_flight(written), written);
        p.heard(&[FIRST_PING]);
        assert_eq!(p.in_flight(written), written - first);
        // Heard again (no newer PONG): the same.
        p.heard(&[FIRST_PING]);
        assert_eq!(p.in_flight(written), written - first);
        p.heard(&[FIRST_PING + 1]);
        assert_eq!(p.in_flight(written), 0);
        assert!(p.out.is_empty());
        // Each PING is QEMU's command: 9 bytes with its value.
        assert_eq!(written, 1000 + 9 + 500 + 9);
    }

    #[test]
    fn a_late_switch_pong_hides_none_of_ours() {
        // QEMU's main thread answers the package's PING 3 after its listen thread
        // answered ours (CI, QEMU 7.2 with postcopy-preempt): 3 comes last.
        let buf = MemBuffer::new();
        let mut f = buf.file();
        let mut p = Pings::new(f.bytes_written());
        for _ in 0..3 {
            f.put_buffer(&[0; 100]);
            p.send(&mut f);
        }
        let written = f.bytes_written();
        p.heard(&[4, FIRST_PING, FIRST_PING + 1, FIRST_PING + 2, 3]);
        assert_eq!(p.in_flight(written), 0);
        assert!(p.out.is_empty());
    }
}
