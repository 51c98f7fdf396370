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

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use qemu_file::{QemuFile, ShutdownHandle};

use crate::convergence::{Convergence, Verdict};
use crate::format::{MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, write_command};
use crate::switchover::{Approach, Switchover};
use crate::{Error, Result, SaveVm, SectionError, return_path};

/// What the migration thread needs from the VM.
pub trait VmControl: Send + Sync {
    /// The VM lock's guard (QEMU's big lock): device emulation and the monitor take it.
    type Guard<'a>
    where
        Self: 'a;

    /// Takes the VM lock.
    fn lock(&self) -> Self::Guard<'_>;

    /// Stops every vCPU and returns once all of them are out of KVM_RUN with their pending
    /// I/O completed. Called without the VM lock held, so a vCPU finishing an exit can
    /// take it.
    ///
    /// # Errors
    /// When a vCPU cannot be stopped; the migration fails and the VM is resumed.
    fn stop_vcpus(&self) -> std::result::Result<(), SectionError>;

    /// Lets the vCPUs run again (after a failed or cancelled migration).
    ///
    /// # Errors
    /// When a vCPU cannot be resumed.
    fn resume_vcpus(&self) -> std::result::Result<(), SectionError>;

    /// Flushes the VM's disks to stable storage (the vCPUs are stopped).
    ///
    /// # Errors
    /// When a flush fails; the migration fails and the VM is resumed.
    fn flush_disks(&self) -> std::result::Result<(), SectionError> {
        Ok(())
    }

    /// Writes the disks' data to stable storage while the guest runs (no VM lock held),
    /// so the flush of the completion finds little left; called when the switchover is
    /// near, and timed.
    ///
    /// # Errors
    /// When a sync fails; the migration fails and the VM runs on.
    fn sync_disks(&self) -> std::result::Result<(), SectionError> {
        Ok(())
    }

    /// The migration completed: the guest now belongs to the destination. Called before
    /// the status turns `completed`, so that whoever sees that status also sees the VM
    /// in its after-migration state (QEMU's `postmigrate`).
    fn handed_over(&self) {}

    /// Throttles every vCPU to run only `100 - percent` percent of the time (0 ends the
    /// throttle), for `auto-converge`. Called without the VM lock held.
    ///
    /// # Errors
    /// When the VM cannot throttle its vCPUs (the default): the migration fails, the VM
    /// runs on.
    fn set_throttle(&self, percent: u8) -> std::result::Result<(), SectionError> {
        match percent {
            0 => Ok(()),
            _ => Err("this VM cannot throttle its vCPUs (auto-converge)".into()),
        }
    }
}

/// Migration parameters, with QEMU's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationParams {
    /// `downtime-limit`: the longest pause the switchover may cause (default 300 ms).
    pub downtime_limit: Duration,
    /// `max-bandwidth` in bytes per second; 0 is unlimited (the default).
    pub max_bandwidth: u64,
    /// Bytes collected per hold of the VM lock before they are written (default 2 MiB).
    pub chunk_bytes: usize,
    /// Whether the destination answers on the reverse direction of the stream, and the
    /// source keeps its VM until it says it loaded everything (sockets; not exec or file).
    pub return_path: bool,
    /// The `auto-converge` capability: throttle vCPUs that dirty memory faster than it
    /// can be sent (see [`crate::convergence`]).
    pub auto_converge: bool,
    /// `cpu-throttle-initial`: the first throttle, percent (default 20).
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`: added at each further step, percent (default 10).
    pub cpu_throttle_increment: u8,
    /// `max-cpu-throttle`: the most the vCPUs are throttled, percent (default 99).
    pub max_cpu_throttle: u8,
    /// `throttle-trigger-threshold`: the dirtied bytes of a period, as a percentage of
    /// those sent, above which the guest counts as dirtying too fast (default 50).
    pub throttle_trigger_threshold: u8,
    /// `x-stall-timeout`: how long the pending bytes may stay without dropping (and no
    /// throttle rise) before the migration fails as unable to converge (default 30 s).
    pub stall_timeout: Duration,
    /// The `multifd` capability: RAM pages travel over `multifd_channels` extra
    /// connections besides the main stream (tcp and unix only).
    pub multifd: bool,
    /// `multifd-channels`: how many (default 2, as QEMU).
    pub multifd_channels: u8,
    /// `multifd-compression`: how each batch of pages is compressed (default none).
    pub multifd_compression: MultifdCompression,
    /// `multifd-zstd-level`: zstd's level, 0 to 20 (default 1).
    pub multifd_zstd_level: u8,
    /// `x-incoming-timeout`: how long a destination's read of the stream may wait without
    /// a byte before the load fails (default 120 s: a link that moves at all delivers
    /// something far more often; a source held in `pre-switchover` longer needs more).
    pub incoming_timeout: Duration,
    /// The `pause-before-switchover` capability: once the guest is stopped for the
    /// switchover, wait in `pre-switchover` for [`MigrationControl::continue_switchover`]
    /// (an orchestrator's moment to move what the VMM does not, e.g. network ports).
    pub pause_before_switchover: bool,
    /// The `x-ignore-shared` capability (set on both sides): RAM in shared memory is
    /// handed over instead of copied (a local migration over a unix socket).
    pub ignore_shared: bool,
    /// Once the pending bytes fit the limit, send further rounds while they shorten the
    /// pause ([`crate::switchover::Approach`]; default on). Off: switch over at the first
    /// moment that fits, as QEMU does.
    pub approach: bool,
}

/// `multifd-compression`: QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MultifdCompression {
    /// `none`: pages as they are.
    #[default]
    None,
    /// `zstd`: each channel one zstd stream, flushed at the end of every packet.
    Zstd,
}

impl MultifdCompression {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MultifdCompression::None => "none",
            MultifdCompression::Zstd => "zstd",
        }
    }
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: 0,
            chunk_bytes: 2 << 20,
            return_path: false,
            auto_converge: false,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            throttle_trigger_threshold: 50,
            stall_timeout: Duration::from_secs(30),
            multifd: false,
            multifd_channels: 2,
            multifd_compression: MultifdCompression::None,
            multifd_zstd_level: 1,
            incoming_timeout: Duration::from_secs(120),
            pause_before_switchover: false,
            ignore_shared: false,
            approach: true,
        }
    }
}

/// The state of a migration, with QEMU's names (`query-migrate`'s `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationStatus {
    /// No migration has started.
    #[default]
    None,
    /// Writing the header and the START sections.
    Setup,
    /// Iterating while the guest runs.
    Active,
    /// The guest is stopped and the rest is being sent.
    Device,
    /// Everything was sent (and, with a return path, loaded by the destination).
    Completed,
    /// The migration failed; the source runs on.
    Failed,
    /// A cancel was requested and is being carried out.
    Cancelling,
    /// The migration was cancelled; the source runs on.
    Cancelled,
    /// The guest is stopped for the switchover and the migration waits for
    /// `migrate-continue` (the `pause-before-switchover` capability).
    PreSwitchover,
}

impl MigrationStatus {
    /// QEMU's name, as in `query-migrate` and MIGRATION events.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Device => "device",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::PreSwitchover => "pre-switchover",
        }
    }

    /// Whether the migration has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long each step of the completion phase took: the guest is paused through all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompletionTimes {
    /// Until every vCPU was out of KVM_RUN.
    pub stop_vcpus: Duration,
    /// Flushing the disks.
    pub flush_disks: Duration,
    /// The final dirty sync.
    pub final_sync: Duration,
    /// Sending what the live sections (RAM, disks) still had, and writing it out.
    pub send_ram: Duration,
    /// Saving and sending the devices, EOF and the description.
    pub send_devices: Duration,
    /// Waiting for the destination to say it loaded everything (return path).
    pub wait_destination: Duration,
    /// From the stop request to the end of the above: the source's view of the downtime.
    pub total: Duration,
}

/// A snapshot of a migration (`query-migrate`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MigrationInfo {
    /// Where it stands.
    pub status: MigrationStatus,
    /// Since the start (or the whole migration once ended); while it runs, as of the
    /// last chunk written (`started` gives it to the moment).
    pub total_time: Duration,
    /// When the migration started.
    pub started: Option<Instant>,
    /// Header and START sections.
    pub setup_time: Duration,
    /// The source's measured downtime, once completed.
    pub downtime: Option<Duration>,
    /// Pending bytes / bandwidth at the last window.
    pub expected_downtime: Duration,
    /// Stream bytes produced so far (multifd channels' included).
    pub transferred: u64,
    /// The part of `transferred` the multifd channels carried.
    pub multifd_bytes: u64,
    /// The part of `transferred` sent with the guest stopped, once completed.
    pub downtime_bytes: u64,
    /// Bytes the live sections still have to send (last estimate).
    pub remaining: u64,
    /// Bandwidth of the last 100 ms window, bytes per second.
    pub bandwidth: f64,
    /// Threshold of the last window: bandwidth × downtime limit, bytes.
    pub threshold: u64,
    /// Chunks collected and written.
    pub iterations: u64,
    /// Exact pending figures asked for (each one a dirty sync).
    pub dirty_syncs: u64,
    /// Wall-clock time the source asked its vCPUs to stop (to compute the real downtime
    /// against the destination's resume time).
    pub stopped_at: Option<SystemTime>,
    /// The completion breakdown, once the completion phase ran.
    pub completion: Option<CompletionTimes>,
    /// How much the vCPUs are throttled (auto-converge), percent.
    pub cpu_throttle_percentage: u8,
    /// The most they were throttled in this migration, percent.
    pub cpu_throttle_peak: u8,
    /// What went wrong, for `failed` and `cancelled`.
    pub error: Option<String>,
    /// The switchover waited in `pre-switchover` (the `device` status then follows it).
    pub paused_before_switchover: bool,
    /// Failed after the whole stream went out, without the destination's answer: the
    /// guest may run there, and this source stays stopped.
    pub outcome_unknown: bool,
}

type Observer = Box<dyn Fn(&MigrationInfo) + Send + Sync>;
type PassObserver = Box<dyn Fn(u64) + Send + Sync>;

/// The handle through which others see and steer a running migration: the monitor reads
/// [`MigrationControl::info`], changes parameters and cancels; the migration thread
/// publishes its progress here.
pub struct MigrationControl {
    // Lock: written by the migration thread (each window and at each status change), read
    // by anyone; `wake` is signalled on cancel and at the end.
    info: Mutex<MigrationInfo>,
    wake: Condvar,
    // Lock: written by the monitor (migrate-set-parameters); read by the migration thread
    // at the start of each window.
    params: Mutex<MigrationParams>,
    cancel: AtomicBool,
    /// Set once the whole stream is written: from then on the destination may run the
    /// guest, so a cancel must not make the source run it too.
    committed: AtomicBool,
    // Lock: the streams' interrupters: the main stream's, set by the migration thread
    // while it owns it, and any other connection's (multifd channels), added by whoever
    // opened it; all taken by `cancel` to interrupt blocked writes, cleared at the end.
    shutdown: Mutex<Vec<ShutdownHandle>>,
    // Lock: set before the migration starts; called (without other locks held) on every
    // status change.
    observer: Mutex<Option<Observer>>,
    // Lock: set before the migration starts; called (without other locks held) with the
    // count after every dirty sync (QEMU's MIGRATION_PASS).
    pass_observer: Mutex<Option<PassObserver>>,
    /// Set by `continue_switchover`, read by the thread waiting in `pre-switchover`.
    continued: AtomicBool,
}

impl fmt::Debug for MigrationControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationControl")
            .field("info", &self.info())
            .field("params", &self.params())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MigrationControl {
    /// A control for a migration with `params`.
    pub fn new(params: MigrationParams) -> Self {
        MigrationControl {
            info: Mutex::new(MigrationInfo::default()),
            wake: Condvar::new(),
            params: Mutex::new(params),
            cancel: AtomicBool::new(false),
            committed: AtomicBool::new(false),
            shutdown: Mutex::new(Vec::new()),
            observer: Mutex::new(None),
            pass_observer: Mutex::new(None),
            continued: AtomicBool::new(false),
        }
    }

    /// A snapshot of the migration's progress.
    pub fn info(&self) -> MigrationInfo {
        lock(&self.info).clone()
    }

    /// The current parameters.
    pub fn params(&self) -> MigrationParams {
        lock(&self.params).clone()
    }

    /// Changes the parameters; a running migration applies them at its next window.
    pub fn set_params(&self, params: MigrationParams) {
        *lock(&self.params) = params;
    }

    /// Calls `f` with the new info at every status change (MIGRATION events).
    pub fn set_observer(&self, f: impl Fn(&MigrationInfo) + Send + Sync + 'static) {
        *lock(&self.observer) = Some(Box::new(f));
    }

    /// Calls `f` with the dirty-sync count after every sync of the dirty log (each pass
    /// over RAM: QEMU's MIGRATION_PASS event).
    pub fn set_pass_observer(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        *lock(&self.pass_observer) = Some(Box::new(f));
    }

    fn passed(&self, syncs: u64) {
        if let Some(o) = lock(&self.pass_observer).as_ref() {
            o(syncs);
        }
    }

    /// Lets a migration waiting in `pre-switchover` go on (`migrate-continue`); `state`
    /// is the state the caller believes it is in, as QEMU checks it.
    ///
    /// # Errors
    /// The migration is not in `state`, or `state` is not `pre-switchover`.
    pub fn continue_switchover(&self, state: &str) -> std::result::Result<(), String> {
        let info = lock(&self.info);
        if info.status.as_str() != state || info.status != MigrationStatus::PreSwitchover {
            return Err(format!(
                "Migration not in expected state: {}",
                info.status.as_str()
            ));
        }
        self.continued.store(true, Ordering::SeqCst);
        drop(info);
        self.wake.notify_all();
        Ok(())
    }

    /// Waits in `pre-switchover` for `continue_switchover`, or a cancel.
    fn wait_continue(&self) -> Result<()> {
        let mut info = lock(&self.info);
        while !self.continued.load(Ordering::SeqCst) {
            if self.cancelled() {
                return Err(Error::Cancelled);
            }
            info = self.wake.wait(info).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Requests a cancel: the thread stops at once, even inside a blocked write, and the
    /// source VM runs on. Returns false, doing nothing, once the migration ended or the
    /// whole stream was written (the destination may already be running the guest).
    pub fn cancel(&self) -> bool {
        // The flag first, then the check: `commit` does the reverse, so one of the two
        // always sees the other.
        self.cancel.store(true, Ordering::SeqCst);
        if self.committed.load(Ordering::SeqCst) {
            self.cancel.store(false, Ordering::SeqCst);
            return false;
        }
        let snapshot = {
            let mut info = lock(&self.info);
            if info.status.is_terminal() {
                return false;
            }
            // Announced once, as QEMU does (a second cancel changes nothing).
            let announce = !matches!(
                info.status,
                MigrationStatus::None | MigrationStatus::Cancelling
            );
            if info.status != MigrationStatus::None {
                info.status = MigrationStatus::Cancelling;
            }
            announce.then(|| info.clone())
        };
        for h in lock(&self.shutdown).iter() {
            h.shutdown();
        }
        self.wake.notify_all();
        if let (Some(info), Some(o)) = (snapshot, lock(&self.observer).as_ref()) {
            o(&info);
        }
        true
    }

    /// Registers another connection of this migration (a multifd channel), so that a
    /// cancel interrupts its blocked writes too; forgotten when the migration ends. A
    /// cancel that already happened shuts it down at once.
    pub fn add_shutdown_handle(&self, h: ShutdownHandle) {
        if self.cancelled() {
            h.shutdown();
        }
        lock(&self.shutdown).push(h);
    }

    /// Passes the point of no return; false if a cancel came first.
    fn commit(&self) -> bool {
        self.committed.store(true, Ordering::SeqCst);
        if self.cancel.load(Ordering::SeqCst) {
            self.committed.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Marks a migration that could not even start (e.g. the destination refused the
    /// connection) as failed, so that observers and `query-migrate` see why.
    pub fn fail_to_start(&self, error: String) {
        self.set_status(MigrationStatus::Failed, |i| i.error = Some(error));
    }

    /// Blocks until the migration has ended and returns its final info.
    pub fn wait(&self) -> MigrationInfo {
        let mut info = lock(&self.info);
        while !info.status.is_terminal() {
            info = self.wake.wait(info).unwrap_or_else(|p| p.into_inner());
        }
        info.clone()
    }

    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut lock(&self.info));
    }

    fn set_status(&self, status: MigrationStatus, f: impl FnOnce(&mut MigrationInfo)) {
        let snapshot = {
            let mut info = lock(&self.info);
            // A cancel in flight keeps showing as such until the thread reaches an end.
            if info.status != MigrationStatus::Cancelling || status.is_terminal() {
                info.status = status;
            }
            f(&mut info);
            info.clone()
        };
        self.wake.notify_all();
        if let Some(o) = lock(&self.observer).as_ref() {
            o(&snapshot);
        }
    }

    /// Sleeps until `deadline` or a cancel.
    fn sleep_until(&self, deadline: Instant) {
        let mut info = lock(&self.info);
        while !self.cancelled() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            info = self
                .wake
                .wait_timeout(info, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

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
                i.transferred = f.bytes_written();
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
            let mut resume_error = None;
            if unknown {
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
            } else {
                MigrationStatus::Failed
            };
            ctl.set_status(status, |i| {
                i.total_time = t0.elapsed();
                i.transferred = f.bytes_written();
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
    const SETUP_PING: u32 = 1;
    write_command(f, MIG_CMD_OPEN_RETURN_PATH, &[]);
    write_command(f, MIG_CMD_PING, &SETUP_PING.to_be_bytes());
    f.flush()?;
    f.set_read_timeout(Some(timeout))?;
    let r = return_path::wait_pong(f, SETUP_PING);
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

    {
        let _g = vm.lock();
        savevm.save_header(f);
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
    let mut written_at_sync = f.bytes_written();
    let mut iterations = 0u64;
    let mut syncs = 0u64;
    loop {
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
        if (pending <= approach.sync_point(threshold) || convergence.due(Instant::now()))
            && !savevm.completion_blocked()
        {
            let before = pending;
            let sent = f.bytes_written() - written_at_sync;
            pending = savevm.pending_exact()?;
            written_at_sync = f.bytes_written();
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
                ctl.update(|i| {
                    i.remaining = pending;
                    i.dirty_syncs = syncs;
                    i.iterations = iterations;
                    i.bandwidth = prediction.bandwidth();
                    i.threshold = threshold;
                    i.expected_downtime = prediction.expected(pending);
                });
                break;
            }
        }
        savevm.save_iterate(f)?;
        drop(guard);
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
        }
        // The blocking write, with the VM lock released.
        f.flush()?;
        // Every chunk, so no counter of `query-migrate` lags the RAM section's.
        ctl.update(|i| {
            i.total_time = t0.elapsed();
            i.transferred = f.bytes_written();
            i.multifd_bytes = f.bytes_elsewhere();
        });
        if f.rate_limiter().exceeded() {
            let end = f.rate_limiter().window_end();
            ctl.sleep_until(end);
        }
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
        i.multifd_bytes = f.bytes_elsewhere();
        i.downtime = Some(times.total);
        i.completion = Some(times);
        i.dirty_syncs = syncs + 1;
        i.iterations = iterations;
    });
    Ok(())
}
