//! `MigrationControl`: the handle through which the monitor sees and steers a running
//! migration, and the migration thread publishes its progress.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use qemu_file::{QemuFile, ShutdownHandle};

use crate::{Error, MigrationInfo, MigrationParams, MigrationStatus, Result};

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
    pub(crate) shutdown: Mutex<Vec<ShutdownHandle>>,
    // Lock: set before the migration starts; called (without other locks held) on every
    // status change.
    observer: Mutex<Option<Observer>>,
    // Lock: set before the migration starts; called (without other locks held) with the
    // count after every dirty sync (QEMU's MIGRATION_PASS).
    pass_observer: Mutex<Option<PassObserver>>,
    /// Set by `continue_switchover`, read by the thread waiting in `pre-switchover`.
    continued: AtomicBool,
    /// Set by `start_postcopy`, read by the migration thread at each iteration.
    start_postcopy: AtomicBool,
    // Lock: a new connection for a paused post-copy, put by `resume_postcopy` and taken
    // by the migration thread, which waits for it on `wake` (with `info` held).
    resume_with: Mutex<Option<QemuFile>>,
    // Lock: the preempt connection (`postcopy-preempt`), put by the VMM before the
    // migration and before each resume, taken by the migration thread at the switch and
    // at each resume.
    preempt: Mutex<Option<QemuFile>>,
    /// Set by a cancel while post-copy is paused: the migration thread stops waiting.
    give_up: AtomicBool,
}

impl fmt::Debug for MigrationControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationControl")
            .field("info", &self.info())
            .field("params", &self.params())
            .finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
            start_postcopy: AtomicBool::new(false),
            resume_with: Mutex::new(None),
            preempt: Mutex::new(None),
            give_up: AtomicBool::new(false),
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

    pub(crate) fn passed(&self, syncs: u64) {
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
    pub(crate) fn wait_continue(&self) -> Result<()> {
        let mut info = lock(&self.info);
        while !self.continued.load(Ordering::SeqCst) {
            if self.cancelled() {
                return Err(Error::Cancelled);
            }
            info = self.wake.wait(info).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Asks the migration to switch to post-copy as soon as it can (QMP
    /// `migrate-start-postcopy`): once what cannot go post-copy (a disk's bulk copy)
    /// is sent. A migration that already ended is not an error, as in QEMU (the two
    /// race).
    ///
    /// A control exists for a migration that was asked for, so it may be called before
    /// its thread ran (the switch then comes at its first iteration).
    ///
    /// # Errors
    /// QEMU's message when the `postcopy-ram` capability is off.
    pub fn start_postcopy(&self) -> std::result::Result<(), String> {
        if !self.params().postcopy {
            return Err(
                "Enable postcopy with migrate_set_capability before the start of migration".into(),
            );
        }
        self.start_postcopy.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Resumes a paused post-copy over `f`, a new connection to the destination (QMP
    /// `migrate` with `resume: true`; the destination was told `migrate-recover`).
    ///
    /// # Errors
    /// QEMU's message when no post-copy is paused.
    pub fn resume_postcopy(&self, f: QemuFile) -> std::result::Result<(), String> {
        let mut info = lock(&self.info);
        if info.status != MigrationStatus::PostcopyPaused || self.give_up.load(Ordering::SeqCst) {
            return Err("Cannot resume if there is no paused migration".into());
        }
        // As QEMU: the status changes before `migrate` returns, and before the thread
        // can take the connection.
        info.status = MigrationStatus::PostcopyRecover;
        info.error = None;
        let snapshot = info.clone();
        *lock(&self.resume_with) = Some(f);
        drop(info);
        self.wake.notify_all();
        if let Some(o) = lock(&self.observer).as_ref() {
            o(&snapshot);
        }
        Ok(())
    }

    /// Post-copy preempt: `f` is the second connection to the destination, for the
    /// pages it asks for once post-copy runs. Give it before the migration starts, and
    /// a new one before each [`MigrationControl::resume_postcopy`].
    pub fn set_preempt_channel(&self, f: QemuFile) {
        *lock(&self.preempt) = Some(f);
    }

    /// The preempt connection given last, once.
    pub(crate) fn take_preempt_channel(&self) -> Option<QemuFile> {
        lock(&self.preempt).take()
    }

    /// Waits, paused, for `resume_postcopy`'s connection; None once a cancel gave up.
    pub(crate) fn wait_resume(&self) -> Option<QemuFile> {
        let mut info = lock(&self.info);
        loop {
            if self.give_up.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(f) = lock(&self.resume_with).take() {
                return Some(f);
            }
            info = self.wake.wait(info).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether post-copy was asked for.
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.start_postcopy.load(Ordering::SeqCst)
    }

    /// Requests a cancel: the thread stops at once, even inside a blocked write, and the
    /// source VM runs on. Returns false, doing nothing, once the migration ended or the
    /// whole stream was written (the destination may already be running the guest).
    pub fn cancel(&self) -> bool {
        {
            let info = lock(&self.info);
            if info.status == MigrationStatus::PostcopyPaused {
                // The guest is at the destination: nothing runs here again by itself.
                // The migration thread stops waiting for a resume and ends, paused.
                self.give_up.store(true, Ordering::SeqCst);
                drop(info);
                self.wake.notify_all();
                return true;
            }
        }
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
    pub(crate) fn commit(&self) -> bool {
        self.committed.store(true, Ordering::SeqCst);
        if self.cancel.load(Ordering::SeqCst) {
            self.committed.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn cancelled(&self) -> bool {
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

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut lock(&self.info));
    }

    pub(crate) fn set_status(&self, status: MigrationStatus, f: impl FnOnce(&mut MigrationInfo)) {
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
    pub(crate) fn sleep_until(&self, deadline: Instant) {
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
