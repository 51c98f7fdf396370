//! `Session`: one vmm process's VM and what steers it: the migration parameters, the
//! current outgoing migration, and the request to quit. The CLI and the monitor share it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use block_migration::BlockStatsSnapshot;
use qemu_file::MigrationUri;
use savevm::{MigrationInfo, MigrationParams, MigrationStatus};
use serde_json::{Value, json};

use crate::machine::Machine;
use crate::migration::{IncomingListener, Outgoing, ms};

type Listener = Box<dyn Fn(&str, Value) + Send + Sync>;

/// A vmm process's VM and its controls.
pub struct Session {
    /// The VM.
    pub machine: Arc<Machine>,
    /// Whether migrations hash RAM at the switchover.
    pub verify: bool,
    // Lock: the parameters for the next (and the running) migration; set by the CLI and
    // `migrate-set-parameters`.
    params: Mutex<MigrationParams>,
    /// The `return-path` capability: await the destination's answer on sockets.
    return_path: std::sync::atomic::AtomicBool,
    // Lock: the current or last outgoing migration; set by `migrate`, read by queries.
    outgoing: Mutex<Option<Arc<Outgoing>>>,
    // Lock: whether an incoming migration (`migrate-incoming`) waits or loads; held while
    // one is being set up.
    incoming: Mutex<bool>,
    // Lock: set once to the process's exit code; `quit_cond` wakes the main thread.
    quit: Mutex<Option<i32>>,
    quit_cond: Condvar,
    // Lock: event listeners (the monitor's clients), called with the event name and data.
    listeners: Mutex<Vec<Listener>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// A session around `machine`.
    pub fn new(machine: Arc<Machine>, params: MigrationParams, verify: bool) -> Arc<Self> {
        Arc::new(Session {
            machine,
            verify,
            params: Mutex::new(params),
            return_path: std::sync::atomic::AtomicBool::new(true),
            outgoing: Mutex::new(None),
            incoming: Mutex::new(false),
            quit: Mutex::new(None),
            quit_cond: Condvar::new(),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// Adds an event listener (QMP events).
    pub fn listen(&self, f: impl Fn(&str, Value) + Send + Sync + 'static) {
        lock(&self.listeners).push(Box::new(f));
    }

    /// Sends an event to every listener and the event log.
    pub fn broadcast(&self, name: &str, data: Value) {
        for l in lock(&self.listeners).iter() {
            l(name, data.clone());
        }
    }

    /// The migration parameters.
    pub fn params(&self) -> MigrationParams {
        lock(&self.params).clone()
    }

    /// Changes the parameters, for the next migration and the running one.
    pub fn set_params(&self, p: MigrationParams) {
        *lock(&self.params) = p.clone();
        if let Some(o) = lock(&self.outgoing).as_ref() {
            if !o.finished() {
                o.ctl.set_params(MigrationParams {
                    return_path: o.ctl.params().return_path,
                    ..p
                });
            }
        }
    }

    /// Whether an outgoing migration is running.
    pub fn migration_running(&self) -> bool {
        lock(&self.outgoing).as_ref().is_some_and(|o| !o.finished())
    }

    /// The `return-path` capability.
    pub fn return_path(&self) -> bool {
        self.return_path.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets the `return-path` capability for the next migration.
    pub fn set_return_path(&self, on: bool) {
        self.return_path
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts migrating to `uri`.
    ///
    /// # Errors
    /// A migration is already running, the VM was migrated away, or it is still being
    /// loaded from a stream.
    pub fn migrate(self: &Arc<Self>, uri: MigrationUri) -> Result<()> {
        let mut out = lock(&self.outgoing);
        if out.as_ref().is_some_and(|o| !o.finished()) {
            bail!("There's a migration process in progress");
        }
        match self.machine.run_state() {
            crate::machine::RunState::PostMigrate => bail!("the guest was already migrated away"),
            crate::machine::RunState::InMigrate => {
                bail!("the guest is still being loaded from a migration stream")
            }
            _ => {}
        }
        let me = Arc::downgrade(self);
        let events = self.machine.events.clone();
        let o = Outgoing::start(
            self.machine.clone(),
            uri.clone(),
            self.params(),
            self.return_path(),
            self.verify,
            move |info: &MigrationInfo| {
                events.emit(
                    "migration",
                    json!({"status": info.status.as_str(), "error": info.error}),
                );
                if let Some(s) = me.upgrade() {
                    s.broadcast("MIGRATION", json!({"status": info.status.as_str()}));
                }
            },
        )?;
        self.machine
            .events
            .emit("migrate", json!({"uri": uri.to_string()}));
        *out = Some(Arc::new(o));
        Ok(())
    }

    /// Receives the guest from a stream on `uri` (`migrate-incoming`), in the background:
    /// the VM must have been started with `--incoming defer`, or its guest migrated away
    /// (a VM can so take back a guest it gave). Returns the bound address. The guest runs
    /// here once the stream loaded whole; a failed load leaves the VM as it was.
    ///
    /// # Errors
    /// Another incoming migration waits, the guest runs here, or `uri` cannot be bound.
    pub fn migrate_incoming(self: &Arc<Self>, uri: MigrationUri) -> Result<MigrationUri> {
        let mut busy = lock(&self.incoming);
        if *busy {
            bail!("an incoming migration is already waiting or loading");
        }
        let listener = IncomingListener::bind(&self.machine, &uri)?;
        let local = listener.local_uri();
        let me = self.clone();
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || {
                me.broadcast("MIGRATION", json!({"status": "active"}));
                let r = listener.load(&me.machine, me.verify, &me.params());
                match &r {
                    Ok(rep) => eprintln!(
                        "vmm: loaded {} in {:.1} ms; the guest runs here now",
                        crate::progress::bytes(rep.bytes),
                        rep.load_time.as_secs_f64() * 1e3
                    ),
                    Err(e) => eprintln!("vmm: {e:#}"),
                }
                let status = if r.is_ok() { "completed" } else { "failed" };
                me.broadcast("MIGRATION", json!({"status": status}));
                if r.is_ok() {
                    me.broadcast("RESUME", Value::Null);
                }
                *lock(&me.incoming) = false;
            })?;
        *busy = true;
        Ok(local)
    }

    /// Cancels the running migration, if any.
    pub fn cancel(&self) {
        if let Some(o) = lock(&self.outgoing).as_ref() {
            o.ctl.cancel();
        }
    }

    /// The current migration's info and RAM counters (`query-migrate`).
    pub fn query_migrate(&self) -> Value {
        let out = lock(&self.outgoing);
        let Some(o) = out.as_ref() else {
            return json!({});
        };
        query_migrate_json(
            &o.ctl.info(),
            &o.ram.snapshot(),
            &o.disk.snapshot(),
            &self.params(),
        )
    }

    /// Waits for the running migration to end and returns its info (None if none ran).
    pub fn wait_migration(&self) -> Option<Result<MigrationInfo>> {
        // Join without holding the lock, so queries go on meanwhile.
        let o = lock(&self.outgoing).clone();
        o.map(|o| o.join())
    }

    /// A snapshot of the running migration for the progress display.
    pub fn progress(
        &self,
    ) -> Option<(
        MigrationInfo,
        ram_list::RamStatsSnapshot,
        BlockStatsSnapshot,
    )> {
        lock(&self.outgoing)
            .as_ref()
            .map(|o| (o.ctl.info(), o.ram.snapshot(), o.disk.snapshot()))
    }

    /// Asks the process to end with `code`.
    pub fn request_quit(&self, code: i32) {
        lock(&self.quit).get_or_insert(code);
        self.quit_cond.notify_all();
    }

    /// Waits up to `timeout` for a quit request; returns its exit code.
    pub fn wait_quit(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.quit);
        while q.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = self
                .quit_cond
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *q
    }
}

/// `query-migrate`'s answer, with QEMU's names, plus our completion breakdown.
pub fn query_migrate_json(
    info: &MigrationInfo,
    ram: &ram_list::RamStatsSnapshot,
    disk: &BlockStatsSnapshot,
    params: &MigrationParams,
) -> Value {
    let mut v = json!({
        "status": info.status.as_str(),
        "total-time": info.total_time.as_millis() as u64,
        "setup-time": info.setup_time.as_millis() as u64,
        "expected-downtime": info.expected_downtime.as_millis() as u64,
        "downtime-limit": params.downtime_limit.as_millis() as u64,
        "ram": {
            "transferred": info.transferred,
            "remaining": ram.remaining,
            "total": ram.total,
            "duplicate": ram.duplicate,
            "normal": ram.normal,
            "normal-bytes": ram.normal_bytes,
            "dirty-pages-rate": ram.dirty_pages_rate,
            "mbps": info.bandwidth * 8.0 / 1e6,
            "dirty-sync-count": ram.dirty_sync_count,
            "pages-per-second": ram.pages_per_second,
            "page-size": 4096,
        },
    });
    let o = v.as_object_mut().expect("an object");
    if info.cpu_throttle_percentage > 0 {
        o.insert(
            "cpu-throttle-percentage".into(),
            json!(info.cpu_throttle_percentage),
        );
    }
    if disk.total > 0 {
        o.insert(
            "disk".into(),
            json!({"transferred": disk.transferred, "remaining": disk.remaining, "total": disk.total,
                   "x-zero-chunks": disk.zero_chunks, "x-bulk-percent": disk.bulk_percent}),
        );
    }
    if let Some(d) = info.downtime {
        o.insert("downtime".into(), json!(d.as_millis() as u64));
    }
    if let Some(c) = info.completion {
        o.insert(
            "x-completion-breakdown".into(),
            json!({
                "stop-vcpus-ms": ms(c.stop_vcpus),
                "flush-disks-ms": ms(c.flush_disks),
                "final-sync-ms": ms(c.final_sync),
                "send-ram-ms": ms(c.send_ram),
                "send-devices-ms": ms(c.send_devices),
                "wait-destination-ms": ms(c.wait_destination),
                "total-ms": ms(c.total),
            }),
        );
    }
    if let Some(e) = &info.error {
        o.insert("error-desc".into(), json!(e));
    }
    if info.status == MigrationStatus::None {
        // `migrate` has returned but its thread has not begun: QEMU says setup here.
        o.insert("status".into(), json!(MigrationStatus::Setup.as_str()));
    }
    v
}
