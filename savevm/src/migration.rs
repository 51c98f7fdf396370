//! The migration thread (QEMU's `migration_thread`, Juan Quintela's 2012 design).
//!
//! One thread per outgoing migration runs [`run_migration`]: setup, then iterations in
//! which the VM lock is held only to ask how much is pending and to collect the next chunk
//! (queued by reference on the [`QemuFile`]); the lock is released before the blocking
//! write. Every 100 ms window the bandwidth is measured and the threshold recomputed as
//! bandwidth × what the downtime limit leaves after the completion's other costs
//! ([`crate::switchover`]); when the pending bytes, exact after a dirty sync, fit under
//! it, the thread stops the vCPUs and completes, timing each step. Cancel and failure at
//! any point leave the source running with nothing lost.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use qemu_file::{QemuFile, ShutdownHandle};

use crate::control::lock;
use crate::{CompletionTimes, MigrationControl, MigrationInfo, MigrationStatus, VmControl};

use crate::convergence::{Convergence, Verdict};
use crate::format::{MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, write_command};
use crate::switchover::{Approach, Switchover};
use crate::{Error, Result, SaveVm, SectionError, postcopy, postcopy_source, return_path};

/// The length of a bandwidth measurement window.
pub const WINDOW: Duration = Duration::from_millis(100);
/// How long the thread sends before it trusts a provisional bandwidth figure.
const PROVISIONAL: Duration = Duration::from_millis(10);

/// Runs an outgoing migration to its end, in the calling thread (the migration thread).
///
/// `savevm` holds the VM's sections, `f` the outgoing stream. On success the status is
/// `completed` and the VM stays stopped (the caller hands over or quits). On failure or
/// cancel the sections' tracking is cleaned up, a stopped VM is resumed, and the status is
/// `failed` or `cancelled`; the error is returned.
///
/// # Errors
/// [`Error::Cancelled`], the stream's error, a section's error, or the VM's.
pub fn run_migration<V: VmControl + ?Sized>(
    savevm: &mut SaveVm,
    f: &mut QemuFile,
    vm: &V,
    ctl: &MigrationControl,
) -> Result<MigrationInfo> {
    let t0 = Instant::now();
    if let Some(h) = f.shutdown_handle() {
        lock(&ctl.shutdown).push(h);
    }
    ctl.set_status(MigrationStatus::Setup, |i| {
        *i = MigrationInfo {
            status: i.status,
            started: Some(t0),
            ..MigrationInfo::default()
        };
    });
    let mut stopped = false;
    // Should the thread panic, the guard still resumes a VM it stopped and ends the
    // migration as failed, so the source is not left paused with a migration "running".
    let mut guard = PanicGuard {
        vm,
        ctl,
        stopped: &mut stopped,
        armed: true,
    };
    let result = if ctl.cancelled() {
        Err(Error::Cancelled)
    } else {
        migrate(savevm, f, guard.vm, ctl, t0, guard.stopped)
    };
    guard.armed = false;
    drop(guard);
    // A preempt connection post-copy never used (or a resume's, not taken) closes.
    drop(ctl.take_preempt_channel());
    let result = match result {
        Err(Error::Stream(qemu_file::Error::Write { .. })) if ctl.params().return_path => {
            refused_why(f).map_or(result, Err)
        }
        r => r,
    };
    // The source runs unthrottled again whatever happened (a completed migration's VM
    // stays stopped, and runs at full speed should it be resumed).
    let unthrottle = match ctl.info().cpu_throttle_percentage {
        0 => Ok(()),
        _ => vm.set_throttle(0),
    };
    ctl.update(|i| i.cpu_throttle_percentage = 0);
    let result = match (result, unthrottle) {
        (Ok(()), Err(e)) => Err(Error::Vm {
            op: "stop throttling its vCPUs",
            source: e,
        }),
        (r, _) => r,
    };
    savevm.save_cleanup();
    lock(&ctl.shutdown).clear();
    match result {
        Ok(()) => {
            vm.handed_over();
            ctl.set_status(MigrationStatus::Completed, |i| {
                i.total_time = t0.elapsed();
                // (A resumed post-copy counted its connections' bytes as it went.)
                i.transferred = i.transferred.max(f.bytes_written());
                i.remaining = 0;
            });
            Ok(ctl.info())
        }
        Err(e) => {
            let e = match e {
                Error::OutcomeUnknown { .. } => e,
                _ if ctl.cancelled() => Error::Cancelled,
                e => e,
            };
            let unknown = matches!(e, Error::OutcomeUnknown { .. });
            let paused = matches!(e, Error::PostcopyInterrupted { .. });
            let mut resume_error = None;
            if unknown || paused {
                // The guest may run at the destination: this copy stays stopped, as one
                // migrated away (only the operator's `cont` takes it back).
                vm.handed_over();
            } else if stopped {
                if let Err(re) = vm.resume_vcpus() {
                    resume_error = Some(re.to_string());
                }
            }
            let status = if matches!(e, Error::Cancelled) {
                MigrationStatus::Cancelled
            } else if paused {
                MigrationStatus::PostcopyPaused
            } else {
                MigrationStatus::Failed
            };
            ctl.set_status(status, |i| {
                i.total_time = t0.elapsed();
                i.transferred = i.transferred.max(f.bytes_written());
                i.outcome_unknown = unknown;
                let msg = crate::error_chain(&e);
                i.error = Some(match &resume_error {
                    Some(re) => format!("{msg}; resuming the VM failed too: {re}"),
                    None => msg,
                });
            });
            Err(e)
        }
    }
}

struct PanicGuard<'a, V: VmControl + ?Sized> {
    vm: &'a V,
    ctl: &'a MigrationControl,
    stopped: &'a mut bool,
    armed: bool,
}

impl<V: VmControl + ?Sized> Drop for PanicGuard<'_, V> {
    fn drop(&mut self) {
        if self.armed {
            if *self.stopped {
                let _ = self.vm.resume_vcpus();
            }
            if self.ctl.info().cpu_throttle_percentage > 0 {
                let _ = self.vm.set_throttle(0);
            }
            self.ctl.set_status(MigrationStatus::Failed, |i| {
                i.error = Some("the migration thread panicked; the VM was resumed".into());
            });
        }
    }
}

/// After a failed write on a stream with a return path: the destination may have refused
/// the stream and closed it, and its answer (read for at most a second) says so, which
/// is a better reason than a broken pipe.
fn refused_why(f: &mut QemuFile) -> Option<Error> {
    f.clear_error();
    f.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    match return_path::wait_load_result(f) {
        Err(e @ Error::DestinationFailed { .. }) => Some(e),
        _ => None,
    }
}

/// Sends QEMU's OPEN_RETURN_PATH and a PING, and waits at most `timeout` for the PONG.
fn acknowledged_setup(f: &mut QemuFile, timeout: Duration) -> Result<()> {
    write_command(f, MIG_CMD_OPEN_RETURN_PATH, &[]);
    ping_pong(f, SETUP_PING, timeout)
}

/// The setup's PING; [`CAUGHT_UP_PING`] before the switchover (the post-copy switch's
/// are 2, 3 and 4, as QEMU's).
const SETUP_PING: u32 = 1;
const CAUGHT_UP_PING: u32 = 5;

/// Before the guest stops: sends a PING after everything so far and waits at most
/// `timeout` for its PONG, which the destination (ours or QEMU) sends once it has
/// loaded everything before it.
fn wait_caught_up(f: &mut QemuFile, timeout: Duration) -> Result<()> {
    ping_pong(f, CAUGHT_UP_PING, timeout)
}

fn ping_pong(f: &mut QemuFile, value: u32, timeout: Duration) -> Result<()> {
    write_command(f, MIG_CMD_PING, &value.to_be_bytes());
    f.flush()?;
    f.set_read_timeout(Some(timeout))?;
    let r = return_path::wait_pong(f, value);
    f.set_read_timeout(None)?;
    r
}

/// Waits for the destination's answer at most `timeout` (the stall timeout): a
/// destination that loaded answers at once, so silence that long is a lost answer.
fn wait_answer(f: &mut QemuFile, ctl: &MigrationControl, timeout: Duration) -> Result<()> {
    let done = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
    let handles: Vec<ShutdownHandle> = lock(&ctl.shutdown).clone();
    let d = done.clone();
    let watchdog = std::thread::Builder::new()
        .name("answer-timeout".into())
        .spawn(move || {
            let (m, c) = &*d;
            let g = lock(m);
            let (g, r) = c
                .wait_timeout_while(g, timeout, |done| !*done)
                .unwrap_or_else(|p| p.into_inner());
            drop(g);
            if r.timed_out() {
                for h in &handles {
                    h.shutdown();
                }
            }
            r.timed_out()
        })
        .map_err(|e| Error::OutcomeUnknown {
            reason: format!("no thread to time the answer: {e}"),
        })?;
    let r = return_path::wait_load_result(f);
    *lock(&done.0) = true;
    done.1.notify_all();
    let timed_out = watchdog.join().unwrap_or(false);
    match r {
        Err(_) if timed_out => Err(Error::OutcomeUnknown {
            reason: format!("no answer in {} ms", timeout.as_millis()),
        }),
        r => r,
    }
}

fn check_cancel(ctl: &MigrationControl) -> Result<()> {
    if ctl.cancelled() {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

fn vm_error(op: &'static str) -> impl FnOnce(SectionError) -> Error {
    move |source| Error::Vm { op, source }
}

fn migrate<V: VmControl + ?Sized>(
    savevm: &mut SaveVm,
    f: &mut QemuFile,
    vm: &V,
    ctl: &MigrationControl,
    t0: Instant,
    stopped: &mut bool,
) -> Result<()> {
    // The parameters as asked for, and as applied.
    let mut asked = ctl.params();
    let mut params = asked.clone();
    // A chunk smaller than a page would never let a section send anything.
    params.chunk_bytes = params.chunk_bytes.max(64 << 10);
    f.set_chunk_budget(params.chunk_bytes);
    f.set_auto_flush(params.chunk_bytes.saturating_mul(4).max(1 << 20));
    f.rate_limiter().set_max_bytes_per_sec(params.max_bandwidth);

    if params.postcopy {
        if !params.return_path {
            return Err(Error::Postcopy {
                reason: "it needs a return path (a tcp: or unix: URI), for the destination's \
                         page requests"
                    .into(),
            });
        }
        if !savevm.postcopy_capable() {
            return Err(Error::Postcopy {
                reason: "no section of this VM can go on after the switch".into(),
            });
        }
    }
    {
        let _g = vm.lock();
        savevm.save_header(f);
        if params.postcopy {
            // As QEMU: the destination opens its return path and checks, before any
            // section, that it can take post-copy.
            write_command(f, MIG_CMD_OPEN_RETURN_PATH, &[]);
            postcopy::write_advise(f, Some(postcopy_source::ADVISE));
        }
        savevm.save_setup(f)?;
    }
    f.flush()?;
    check_cancel(ctl)?;
    if params.return_path && savevm.setup_needs_acknowledgement() {
        // Work the destination does on the setup (mapping handed-over memory) is done
        // before the guest stops, not in the pause.
        acknowledged_setup(f, params.stall_timeout)?;
        check_cancel(ctl)?;
    }
    // The setup's sync is the first pass, as QEMU counts them.
    ctl.passed(1);
    let setup_time = t0.elapsed();
    ctl.set_status(MigrationStatus::Active, |i| {
        i.setup_time = setup_time;
        i.transferred = f.bytes_written();
    });

    let mut window_start = Instant::now();
    let mut window_bytes = f.bytes_written();
    let (iter_start, iter_bytes) = (window_start, window_bytes);
    let mut prediction = Switchover::default();
    let mut convergence = Convergence::new(iter_start, iter_bytes);
    let mut threshold: u64 = 0;
    // Once the pending bytes fit: rounds that shorten the pause.
    let mut approach = Approach::default();
    // The pending bytes the last exact sync found (at first: everything). Measured in
    // state, not stream bytes: a round of zero pages is cheap on the wire yet sends
    // much, and counting it in wire bytes made it look like a round that sent nothing.
    let mut pending_at_sync = savevm.pending_estimate();
    // The destination answered a PING sent after everything so far, and nothing was
    // sent since (see the switch below).
    let mut caught_up = false;
    let mut iterations = 0u64;
    let mut syncs = 0u64;
    // `x-postcopy-auto`: the convergence watch asked for a throttle or gave up.
    let mut auto_postcopy = false;
    let postcopy_now = loop {
        check_cancel(ctl)?;
        let now = Instant::now();
        let elapsed = now - window_start;
        if elapsed >= WINDOW {
            let sent = f.bytes_written() - window_bytes;
            let overall = (f.bytes_written() - iter_bytes) as f64
                / iter_start.elapsed().as_secs_f64().max(1e-6);
            prediction.window(sent as f64 / elapsed.as_secs_f64(), overall);
            let new_params = ctl.params();
            if new_params != asked {
                convergence.new_chance(now);
                asked = new_params.clone();
                params = new_params;
                params.chunk_bytes = params.chunk_bytes.max(64 << 10);
            }
            f.rate_limiter().set_max_bytes_per_sec(params.max_bandwidth);
            threshold = prediction.threshold(params.downtime_limit);
            let remaining = savevm.pending_estimate();
            ctl.update(|i| {
                i.total_time = t0.elapsed();
                i.transferred = f.bytes_written();
                i.remaining = remaining;
                i.bandwidth = prediction.bandwidth();
                i.threshold = threshold;
                i.expected_downtime = prediction.expected(remaining);
                i.iterations = iterations;
                i.dirty_syncs = syncs;
            });
            window_start = now;
            window_bytes = f.bytes_written();
        } else if !prediction.measured() && elapsed >= PROVISIONAL {
            // Until the first window closes, the rate so far stands in for the bandwidth:
            // with a threshold of 0, a guest that writes at all would make the thread sync
            // and resend in a tight loop for the whole first window.
            let sent = f.bytes_written() - window_bytes;
            prediction.provisional(sent as f64 / elapsed.as_secs_f64());
            threshold = prediction.threshold(params.downtime_limit);
        }

        // Near the switchover, the disks are synced while the guest runs: the flush in
        // the downtime is then short, and this one's duration predicts it.
        if prediction.wants_sync(savevm.pending_estimate(), threshold) {
            let t = Instant::now();
            vm.sync_disks().map_err(vm_error("sync its disks"))?;
            prediction.synced(t.elapsed());
            threshold = prediction.threshold(params.downtime_limit);
        }

        // Slow reads (disk chunks) happen here, outside the VM lock.
        savevm.prepare_iterate(params.chunk_bytes)?;
        let guard = vm.lock();
        let mut pending = savevm.pending_estimate();
        let mut verdict = Verdict::Continue;
        // Also once a period, so the convergence watch sees the guest's dirty rate while
        // a long round is still being sent.
        if (caught_up
            || pending <= approach.sync_point(threshold)
            || convergence.due(Instant::now()))
            && !savevm.completion_blocked()
        {
            let before = pending;
            // What the rounds since the last sync sent (cleared from what was pending).
            let sent = pending_at_sync.saturating_sub(before);
            pending = savevm.pending_exact()?;
            pending_at_sync = pending;
            syncs += 1;
            ctl.passed(syncs + 1);
            verdict = convergence.synced(
                Instant::now(),
                f.bytes_written(),
                pending.saturating_sub(before),
                pending,
                threshold,
                &params,
            );
            if pending <= threshold
                && (!params.approach
                    || approach.switch_now(
                        pending,
                        sent,
                        pending.saturating_sub(before),
                        prediction
                            .expected(pending)
                            .saturating_sub(prediction.overhead()),
                        params.downtime_limit,
                    ))
            {
                drop(guard);
                // What waits in the sockets and in the destination's loader would be
                // loaded inside the pause: with the guest still running, the destination
                // first answers a PING sent after it all, then a sync looks again at
                // what the guest dirtied meanwhile (README, "Like with like": a
                // destination that allocates as it loads fell up to 95 ms behind).
                if params.return_path && !caught_up {
                    wait_caught_up(f, params.stall_timeout)?;
                    caught_up = true;
                    continue;
                }
                ctl.update(|i| {
                    i.remaining = pending;
                    i.dirty_syncs = syncs;
                    i.iterations = iterations;
                    i.bandwidth = prediction.bandwidth();
                    i.threshold = threshold;
                    i.expected_downtime = prediction.expected(pending);
                });
                break false;
            }
        }
        // Post-copy, once asked for, when what cannot go post-copy fits the limit.
        if params.postcopy
            && (auto_postcopy || ctl.postcopy_requested())
            && !savevm.completion_blocked()
            && savevm.pending_precopy_only() <= threshold
        {
            drop(guard);
            ctl.update(|i| {
                i.remaining = savevm.pending_estimate();
                i.dirty_syncs = syncs;
                i.iterations = iterations;
            });
            break true;
        }
        if params.postcopy && params.postcopy_auto && verdict != Verdict::Continue {
            // Switching at the next iteration serves better than slowing the guest.
            auto_postcopy = true;
            verdict = Verdict::Continue;
        }
        savevm.save_iterate(f)?;
        drop(guard);
        caught_up = false;
        iterations += 1;
        match verdict {
            Verdict::Continue => {}
            Verdict::Throttle(percent) => {
                // Published first, so `query-migrate` never shows less than the vCPUs
                // are under (and a failed throttle is still lifted at the end).
                ctl.update(|i| {
                    i.cpu_throttle_percentage = percent;
                    i.cpu_throttle_peak = i.cpu_throttle_peak.max(percent);
                });
                vm.set_throttle(percent)
                    .map_err(vm_error("throttle its vCPUs"))?;
            }
            Verdict::CannotConverge(why) => return Err(Error::CannotConverge(why)),
            // Handled above: only with post-copy on.
            Verdict::Postcopy => {}
        }
        // The blocking write, with the VM lock released.
        f.flush()?;
        // Every chunk, so no counter of `query-migrate` lags the RAM section's.
        ctl.update(|i| {
            i.total_time = t0.elapsed();
            i.transferred = f.bytes_written();
            i.bytes_elsewhere = f.bytes_elsewhere();
        });
        if f.rate_limiter().exceeded() {
            let end = f.rate_limiter().window_end();
            ctl.sleep_until(end);
        }
    };
    if postcopy_now {
        return postcopy_source::run_postcopy(savevm, f, vm, ctl, &params, stopped);
    }

    // Completion: the guest is paused from here to the end.
    let t_stop = Instant::now();
    let stopped_at = Some(SystemTime::now());
    if params.pause_before_switchover {
        ctl.update(|i| i.stopped_at = stopped_at);
    } else {
        ctl.set_status(MigrationStatus::Device, |i| i.stopped_at = stopped_at);
    }
    let mut times = CompletionTimes::default();
    let bytes_at_stop = f.bytes_written();
    *stopped = true;
    vm.stop_vcpus().map_err(vm_error("stop its vCPUs"))?;
    times.stop_vcpus = t_stop.elapsed();
    if params.pause_before_switchover {
        // As QEMU: the guest is stopped while the orchestrator does its part.
        ctl.set_status(MigrationStatus::PreSwitchover, |i| {
            i.paused_before_switchover = true
        });
        ctl.wait_continue()?;
        ctl.set_status(MigrationStatus::Device, |_| {});
    }
    {
        let _g = vm.lock();
        let t = Instant::now();
        vm.flush_disks().map_err(vm_error("flush its disks"))?;
        times.flush_disks = t.elapsed();

        let t = Instant::now();
        savevm.pending_exact()?;
        times.final_sync = t.elapsed();
        ctl.passed(syncs + 2);

        let t = Instant::now();
        // The last chunks of a completion are not rate limited: the guest is waiting.
        f.rate_limiter().set_max_bytes_per_sec(0);
        savevm.save_complete(f)?;
        f.flush()?;
        times.send_ram = t.elapsed();

        let t = Instant::now();
        // The stream's tail (the devices, EOF, the description) stays queued until the
        // hand-over below: its last byte is what lets a destination complete its load.
        f.set_auto_flush(usize::MAX);
        savevm.save_devices(f)?;
        // The hand-over (ARCHITECTURE.md, "The hand-over"): a cancel no longer applies
        // once the last byte may go out...
        if !ctl.commit() {
            return Err(Error::Cancelled);
        }
        // ...and whether it went out decides who owns the guest. A failed write did not
        // write the last byte, so the destination cannot complete and the source resumes;
        // once it is written, only the destination's answer tells.
        f.flush()?;
        times.send_devices = t.elapsed();
    }
    let unknown = |e: Error| match e {
        Error::DestinationFailed { .. } => e,
        other => Error::OutcomeUnknown {
            reason: crate::error_chain(&other),
        },
    };
    f.finish().map_err(|e| unknown(e.into()))?;
    if params.return_path {
        let t = Instant::now();
        wait_answer(f, ctl, params.stall_timeout).map_err(unknown)?;
        times.wait_destination = t.elapsed();
    }
    times.total = t_stop.elapsed();
    ctl.update(|i| {
        i.downtime_bytes = f.bytes_written() - bytes_at_stop;
        i.bytes_elsewhere = f.bytes_elsewhere();
        i.downtime = Some(times.total);
        i.completion = Some(times);
        i.dirty_syncs = syncs + 1;
        i.iterations = iterations;
    });
    Ok(())
}
