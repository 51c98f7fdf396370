//! `Session`: one vmm process's VM and what steers it: the migration parameters, the
//! current outgoing migration, and the request to quit. The CLI and the monitor share it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use block_migration::BlockStatsSnapshot;
use qemu_file::MigrationUri;
use savevm::{MigrationInfo, MigrationParams, MigrationStatus};
use serde_json::{Value, json};
use vmm::settings::Settings;

use crate::machine::{Machine, RunState};
use crate::migration::{Abort, IncomingListener, Outgoing, PostcopyLinks, Recovery, Tls, ms};
use vmm::object::{AuthzSpec, ObjectSpec};
use vmm::qmp::Capability;
use vmm::qmp::migration::TlsParams;

type Listener = Box<dyn Fn(&str, Value) + Send + Sync>;

/// An incoming migration: its state for `query-migrate`, and how to abort it.
struct Incoming {
    status: MigrationStatus,
    /// Where it listens (QEMU's `socket-address`).
    local: MigrationUri,
    error: Option<String>,
    abort: Arc<Abort>,
    /// Where `migrate-recover` hands a paused post-copy its listener.
    recovery: Arc<Recovery>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A vmm process's VM and its controls.
pub struct Session {
    /// The VM.
    pub machine: Arc<Machine>,
    /// Whether migrations hash RAM at the switchover.
    pub verify: bool,
    // Lock: the parameters for the next (and the running) migration; set by the CLI and
    // `migrate-set-parameters`.
    params: Mutex<Settings>,
    /// The `return-path` capability: await the destination's answer on sockets.
    return_path: AtomicBool,
    /// The `events` capability: MIGRATION and MIGRATION_PASS events (off by default, as
    /// in QEMU).
    events: AtomicBool,
    /// The `postcopy-blocktime` capability: a destination's `query-migrate` says how long
    /// the guest waited for pages.
    postcopy_blocktime: AtomicBool,
    // Lock: the current or last outgoing migration; set by `migrate`, read by queries.
    outgoing: Mutex<Option<Arc<Outgoing>>>,
    // Lock: the current or last incoming migration; set by `migrate_incoming` while one
    // is being set up, updated by its thread.
    incoming: Mutex<Option<Incoming>>,
    /// Whether the last migration to start was incoming (`query-migrate` shows it).
    last_incoming: AtomicBool,
    // Lock: set once to the process's exit code; `quit_cond` wakes the main thread.
    quit: Mutex<Option<i32>>,
    quit_cond: Condvar,
    /// SHUTDOWN was sent.
    shutdown_announced: AtomicBool,
    // Lock: event listeners (the monitor's clients), called with the event name and data.
    listeners: Mutex<Vec<Listener>>,
    // Lock: the objects by id (`--object`, `object-add`); read when a migration starts.
    objects: Mutex<std::collections::HashMap<String, Object>>,
    // Lock: the tls-creds, tls-hostname and tls-authz parameters; set by the CLI and
    // `migrate-set-parameters`, read when a migration starts.
    tls: Mutex<TlsParams>,
}

/// An object the session holds.
enum Object {
    /// `tls-creds-x509`, its files loaded when it was added.
    Creds(qemu_file::TlsCreds),
    /// An authorization list (a listfile is read again at each incoming migration).
    Authz(AuthzSpec),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// A session around `machine`. Its listeners hear STOP and RESUME whenever the guest
    /// stops or starts running, whoever caused it.
    pub fn new(machine: Arc<Machine>, params: Settings, verify: bool) -> Arc<Self> {
        let s = Arc::new(Session {
            machine,
            verify,
            params: Mutex::new(params),
            return_path: AtomicBool::new(true),
            events: AtomicBool::new(false),
            postcopy_blocktime: AtomicBool::new(false),
            outgoing: Mutex::new(None),
            incoming: Mutex::new(None),
            last_incoming: AtomicBool::new(false),
            quit: Mutex::new(None),
            quit_cond: Condvar::new(),
            shutdown_announced: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            objects: Mutex::new(std::collections::HashMap::new()),
            tls: Mutex::new(TlsParams::default()),
        });
        let me = Arc::downgrade(&s);
        s.machine.on_run_change(move |_, new| {
            if let Some(s) = me.upgrade() {
                let name = if new == RunState::Running {
                    "RESUME"
                } else {
                    "STOP"
                };
                s.broadcast(name, Value::Null);
            }
        });
        s
    }

    /// Adds an object: TLS credentials (loaded now) or an authorization list.
    ///
    /// # Errors
    /// The id is taken, or the credentials do not load (which file, and why).
    pub fn add_object(&self, spec: &ObjectSpec) -> Result<()> {
        let mut objects = lock(&self.objects);
        if objects.contains_key(spec.id()) {
            bail!(
                "attempt to add duplicate property '{}' to object",
                spec.id()
            );
        }
        let object = match spec {
            ObjectSpec::TlsCreds(t) => {
                let endpoint = if t.server {
                    qemu_file::TlsEndpoint::Server
                } else {
                    qemu_file::TlsEndpoint::Client
                };
                Object::Creds(qemu_file::TlsCreds::load(&t.dir, endpoint, t.verify_peer)?)
            }
            ObjectSpec::Authz(a) => Object::Authz(a.clone()),
        };
        objects.insert(spec.id().to_string(), object);
        Ok(())
    }

    /// Removes an object.
    ///
    /// # Errors
    /// No object has that id, or the `tls-creds` or `tls-authz` parameter names it.
    pub fn del_object(&self, id: &str) -> Result<()> {
        let t = self.tls_params();
        for (name, value) in [("tls-creds", &t.creds), ("tls-authz", &t.authz)] {
            if value == id {
                bail!("object '{id}' is in use by the {name} parameter");
            }
        }
        match lock(&self.objects).remove(id) {
            Some(_) => Ok(()),
            None => bail!("object '{id}' not found"),
        }
    }

    /// The TLS parameters.
    pub fn tls_params(&self) -> TlsParams {
        lock(&self.tls).clone()
    }

    /// Changes the TLS parameters.
    pub fn set_tls(&self, change: impl FnOnce(&mut TlsParams)) {
        change(&mut lock(&self.tls));
    }

    /// The TLS a migration of this VM uses now, as an endpoint of `endpoint`; for a
    /// destination with `tls-authz`, credentials that let in only the names it allows.
    ///
    /// # Errors
    /// `tls-creds` names no credentials object, or one for the other endpoint;
    /// `tls-authz` names no authorization object, its file does not read, or it is set
    /// on a destination without TLS or without verify-peer.
    fn tls(&self, endpoint: qemu_file::TlsEndpoint) -> Result<Option<Tls>> {
        let server = endpoint == qemu_file::TlsEndpoint::Server;
        let t = self.tls_params();
        if t.creds.is_empty() {
            if server && !t.authz.is_empty() {
                bail!(
                    "tls-authz '{}' is set but tls-creds is not: without TLS there is no certificate to authorize",
                    t.authz
                );
            }
            return Ok(None);
        }
        let objects = lock(&self.objects);
        let Some(Object::Creds(creds)) = objects.get(&t.creds) else {
            bail!(
                "tls-creds names '{}', which is no tls-creds-x509 object",
                t.creds
            );
        };
        if creds.endpoint() != endpoint {
            let (theirs, ours) = if server {
                ("client", "server")
            } else {
                ("server", "client")
            };
            bail!(
                "tls-creds '{}' is for endpoint={theirs}: this side needs endpoint={ours}",
                t.creds
            );
        }
        // A source has no use for tls-authz (QEMU ignores it there too).
        let creds = if server && !t.authz.is_empty() {
            let Some(Object::Authz(spec)) = objects.get(&t.authz) else {
                bail!("tls-authz names '{}', which is no authz object", t.authz);
            };
            creds.with_authz(spec.load().map_err(anyhow::Error::msg)?)?
        } else {
            creds.clone()
        };
        Ok(Some(Tls {
            creds,
            hostname: (!t.hostname.is_empty()).then_some(t.hostname),
        }))
    }

    /// Sends a MIGRATION event, if the `events` capability is on.
    fn migration_event(&self, status: MigrationStatus) {
        if self.events.load(Ordering::SeqCst) {
            self.broadcast("MIGRATION", json!({"status": status.as_str()}));
        }
    }

    /// Whether a capability is on.
    pub fn capability(&self, c: Capability) -> bool {
        match c {
            Capability::Events => self.events.load(Ordering::SeqCst),
            Capability::ReturnPath => self.return_path(),
            Capability::AutoConverge => self.params().migration.auto_converge,
            Capability::Multifd => self.params().ram.multifd,
            Capability::PauseBeforeSwitchover => self.params().migration.pause_before_switchover,
            Capability::IgnoreShared => self.params().ram.ignore_shared,
            Capability::PostcopyRam => self.params().migration.postcopy,
            Capability::PostcopyBlocktime => self.postcopy_blocktime.load(Ordering::SeqCst),
            Capability::PostcopyPreempt => self.params().migration.postcopy_preempt,
        }
    }

    /// Turns a capability on or off, for the next migration.
    pub fn set_capability(&self, c: Capability, on: bool) {
        let mut p = self.params();
        match c {
            Capability::Events => return self.events.store(on, Ordering::SeqCst),
            // Off: the source does not wait for the destination's answer (for a
            // destination that never sends one).
            Capability::ReturnPath => return self.set_return_path(on),
            Capability::AutoConverge => p.migration.auto_converge = on,
            Capability::Multifd => p.ram.multifd = on,
            Capability::PauseBeforeSwitchover => p.migration.pause_before_switchover = on,
            Capability::IgnoreShared => p.ram.ignore_shared = on,
            Capability::PostcopyRam => p.migration.postcopy = on,
            Capability::PostcopyBlocktime => {
                return self.postcopy_blocktime.store(on, Ordering::SeqCst);
            }
            Capability::PostcopyPreempt => p.migration.postcopy_preempt = on,
        }
        self.set_params(p);
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

    /// The migration settings.
    pub fn params(&self) -> Settings {
        lock(&self.params).clone()
    }

    /// Changes the settings, for the next migration and the running one (whose RAM
    /// settings, fixed at its start, stay).
    pub fn set_params(&self, p: Settings) {
        *lock(&self.params) = p.clone();
        if let Some(o) = lock(&self.outgoing).as_ref() {
            if !o.finished() {
                let mut running = p.migration;
                running.return_path = o.ctl.params().return_path;
                o.ctl.set_params(running);
            }
        }
    }

    /// Whether an outgoing migration is running.
    pub fn migration_running(&self) -> bool {
        lock(&self.outgoing).as_ref().is_some_and(|o| !o.finished())
    }

    /// The `return-path` capability.
    pub fn return_path(&self) -> bool {
        self.return_path.load(Ordering::SeqCst)
    }

    /// Sets the `return-path` capability for the next migration.
    pub fn set_return_path(&self, on: bool) {
        self.return_path.store(on, Ordering::SeqCst);
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
        // Each status QMP shows is announced once (QEMU's `device` only follows
        // `pre-switchover`; without the pause the switchover shows as `active`).
        let announced = Mutex::new(MigrationStatus::None);
        let tls = self.tls(qemu_file::TlsEndpoint::Client)?;
        let o = Outgoing::start(
            self.machine.clone(),
            uri.clone(),
            self.params(),
            self.return_path(),
            self.verify,
            tls,
            move |info: &MigrationInfo| {
                events.emit(
                    "migration",
                    json!({"status": info.status.as_str(), "error": info.error}),
                );
                let status = qmp_status(info);
                let mut last = lock(&announced);
                if *last != status {
                    *last = status;
                    drop(last);
                    if let Some(s) = me.upgrade() {
                        s.migration_event(status);
                    }
                }
            },
        )?;
        let me = Arc::downgrade(self);
        o.ctl.set_pass_observer(move |pass| {
            if let Some(s) = me.upgrade() {
                if s.events.load(Ordering::SeqCst) {
                    s.broadcast("MIGRATION_PASS", json!({"pass": pass}));
                }
            }
        });
        self.machine
            .events
            .emit("migrate", json!({"uri": uri.to_string()}));
        *out = Some(Arc::new(o));
        self.last_incoming.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// `migrate-continue`: lets a migration waiting in `pre-switchover` go on.
    ///
    /// # Errors
    /// No migration is in `state`.
    pub fn migrate_continue(&self, state: &str) -> Result<()> {
        let out = lock(&self.outgoing);
        let Some(o) = out.as_ref() else {
            bail!("Migration not in expected state: none");
        };
        o.ctl.continue_switchover(state).map_err(anyhow::Error::msg)
    }

    /// `migrate-start-postcopy`: the running migration switches to post-copy as soon as
    /// it can.
    ///
    /// # Errors
    /// QEMU's: the capability is off, or no migration was started.
    pub fn start_postcopy(&self) -> Result<()> {
        if !self.params().migration.postcopy {
            bail!("Enable postcopy with migrate_set_capability before the start of migration");
        }
        let out = lock(&self.outgoing);
        let Some(o) = out.as_ref() else {
            bail!("Postcopy must be started after migration has been started");
        };
        o.ctl.start_postcopy().map_err(anyhow::Error::msg)
    }

    /// `migrate` with `resume: true`: a paused post-copy goes on over a new connection to
    /// `uri` (where the destination's `migrate-recover` listens).
    ///
    /// # Errors
    /// QEMU's when no post-copy is paused; the TLS parameters; the connection (over TLS,
    /// its handshake).
    pub fn migrate_resume(&self, uri: MigrationUri) -> Result<()> {
        let out = lock(&self.outgoing);
        let Some(o) = out.as_ref() else {
            bail!("Cannot resume if there is no paused migration");
        };
        if o.ctl.info().status != MigrationStatus::PostcopyPaused {
            bail!("Cannot resume if there is no paused migration");
        }
        let tls = self.tls(qemu_file::TlsEndpoint::Client)?;
        let open = || match &tls {
            Some(t) => qemu_file::connect_tls(&uri, &t.creds, t.hostname.as_deref()),
            None => qemu_file::connect(&uri),
        };
        let f = qemu_file::QemuFile::new(open()?);
        if o.ctl.params().postcopy_preempt {
            // After the main stream, as at the start: the destination goes by the order.
            let p = anyhow::Context::context(open(), "opening the post-copy preempt connection")?;
            if let Some(h) = p.shutdown_handle() {
                o.ctl.add_shutdown_handle(h);
            }
            o.ctl.set_preempt_channel(qemu_file::QemuFile::new(p));
        }
        o.ctl.resume_postcopy(f).map_err(anyhow::Error::msg)?;
        self.machine
            .events
            .emit("migrate-resume", json!({"uri": uri.to_string()}));
        Ok(())
    }

    /// `migrate-recover`: a destination whose post-copy is paused listens on `uri` for
    /// the source's resume. Returns the bound address.
    ///
    /// Over TLS (`tls-creds` set, as for `migrate-incoming`) the source's new connection
    /// completes its handshake before a byte of it is read.
    ///
    /// # Errors
    /// QEMU's when no post-copy is paused here, or one recovery waits already; the TLS
    /// parameters; `uri` cannot be bound.
    pub fn migrate_recover(&self, uri: MigrationUri) -> Result<MigrationUri> {
        let slot = lock(&self.incoming);
        let Some(i) = slot
            .as_ref()
            .filter(|i| i.status == MigrationStatus::PostcopyPaused)
        else {
            bail!("Migrate recover can only be run when postcopy is paused.");
        };
        let tls = self.tls(qemu_file::TlsEndpoint::Server)?.map(|t| t.creds);
        let l = qemu_file::Listener::bind(&uri)?;
        let local = l.local_uri();
        i.recovery.offer(l, tls)?;
        self.machine
            .events
            .emit("migrate-recover", json!({"uri": local.to_string()}));
        Ok(local)
    }

    /// Receives the guest from a stream on `uri` (`migrate-incoming`, and `--incoming`),
    /// in the background: the VM must have been started with `--incoming`, or its guest
    /// migrated away (a VM can so take back a guest it gave). Returns the bound address.
    /// The guest runs here once the stream loaded whole (unless held); a failed load
    /// leaves the VM as it was. MIGRATION events: `setup` at once, `active` when the
    /// source connects, then `completed` or `failed`, as on a QEMU destination.
    ///
    /// # Errors
    /// Another incoming migration waits, the guest runs here, or `uri` cannot be bound.
    pub fn migrate_incoming(self: &Arc<Self>, uri: MigrationUri) -> Result<MigrationUri> {
        let mut slot = lock(&self.incoming);
        if slot.as_ref().is_some_and(|i| !i.status.is_terminal()) {
            bail!("an incoming migration is already waiting or loading");
        }
        let tls = self.tls(qemu_file::TlsEndpoint::Server)?;
        let listener = IncomingListener::bind(&self.machine, &uri)?;
        let local = listener.local_uri();
        let abort = Arc::new(Abort::default());
        let recovery = Arc::new(Recovery::default());
        let me = self.clone();
        let (a, rec) = (abort.clone(), recovery.clone());
        *slot = Some(Incoming {
            status: MigrationStatus::Setup,
            local: local.clone(),
            error: None,
            abort,
            recovery,
            thread: None,
        });
        self.last_incoming.store(true, Ordering::SeqCst);
        self.migration_event(MigrationStatus::Setup);
        let thread = std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || {
                let on_connect = || me.incoming_status(MigrationStatus::Active, None);
                let weak = Arc::downgrade(&me);
                let links = PostcopyLinks {
                    status: Box::new(move |status, error| {
                        if let Some(s) = weak.upgrade() {
                            s.incoming_status(status, error);
                        }
                    }),
                    recovery: rec,
                };
                let r = listener.load(
                    &me.machine,
                    me.verify,
                    &me.params(),
                    tls.as_ref(),
                    &a,
                    on_connect,
                    links,
                );
                match &r {
                    Ok(rep) => eprintln!(
                        "vmm: loaded {} in {:.1} ms; the guest {} here now",
                        crate::units::bytes(rep.bytes),
                        rep.load_time.as_secs_f64() * 1e3,
                        if me.machine.run_state() == RunState::Running {
                            "runs"
                        } else {
                            "is held paused"
                        }
                    ),
                    Err(e) => eprintln!("vmm: {e:#}"),
                }
                match r {
                    Ok(_) => me.incoming_status(MigrationStatus::Completed, None),
                    Err(e) if crate::migration::postcopy_paused(&me.machine) => {
                        me.incoming_status(MigrationStatus::PostcopyPaused, Some(format!("{e:#}")))
                    }
                    Err(e) => me.incoming_status(MigrationStatus::Failed, Some(format!("{e:#}"))),
                }
            })?;
        if let Some(i) = slot.as_mut() {
            i.thread = Some(thread);
        }
        Ok(local)
    }

    fn incoming_status(&self, status: MigrationStatus, error: Option<String>) {
        if let Some(i) = lock(&self.incoming).as_mut() {
            i.status = status;
            if status.is_terminal() || status.in_postcopy() {
                i.error = error;
            }
        }
        self.migration_event(status);
    }

    /// Whether an incoming migration waits or loads.
    pub fn incoming_running(&self) -> bool {
        lock(&self.incoming)
            .as_ref()
            .is_some_and(|i| !i.status.is_terminal())
    }

    /// Waits for the incoming migration to end; true if it loaded (the guest is here).
    pub fn wait_incoming(&self) -> bool {
        let t = lock(&self.incoming).as_mut().and_then(|i| i.thread.take());
        if let Some(t) = t {
            let _ = t.join();
        }
        lock(&self.incoming)
            .as_ref()
            .is_some_and(|i| i.status == MigrationStatus::Completed)
    }

    /// Aborts an incoming migration that waits or loads: the source is never told it
    /// loaded, so its guest runs on there.
    pub fn abort_incoming(&self) {
        if let Some(i) = lock(&self.incoming).as_ref() {
            i.abort.abort();
        }
    }

    /// Cancels the running migration, if any.
    pub fn cancel(&self) {
        if let Some(o) = lock(&self.outgoing).as_ref() {
            o.ctl.cancel();
        }
    }

    /// The current or last migration's info and counters (`query-migrate`), on a source
    /// or a destination.
    pub fn query_migrate(&self) -> Value {
        if self.last_incoming.load(Ordering::SeqCst) {
            if let Some(i) = lock(&self.incoming).as_ref() {
                // As a QEMU destination: where it listens while it waits (no status yet)
                // and loads, the status once a source connected.
                let mut v = json!({});
                if i.status != MigrationStatus::Setup {
                    v["status"] = json!(i.status.as_str());
                }
                if !i.status.is_terminal() {
                    if let Some(a) = socket_address(&i.local) {
                        v["socket-address"] = json!([a]);
                    }
                }
                if let Some(e) = &i.error {
                    v["error-desc"] = json!(e);
                }
                if let Some(p) = self.machine.postcopy_incoming() {
                    let info = p.info();
                    if info.listening {
                        let w = &info.waits;
                        if self.postcopy_blocktime.load(Ordering::SeqCst) {
                            // QEMU's: the time all vCPUs waited at once, and each one's.
                            v["postcopy-blocktime"] = json!(w.vcpus.total_ms);
                            v["postcopy-vcpu-blocktime"] = json!(w.vcpus.per_vcpu_ms);
                        }
                        v["x-postcopy-faults"] = json!({
                            "requests": w.requests, "resolved": w.resolved,
                            "waiting": w.waiting, "p50-us": w.p50_us, "p99-us": w.p99_us,
                            "max-us": w.max_us, "total-us": w.total_us,
                        });
                    }
                }
                return v;
            }
        }
        let out = lock(&self.outgoing);
        let Some(o) = out.as_ref() else {
            return json!({});
        };
        query_migrate_json(
            &o.ctl.info(),
            &o.ram.snapshot(),
            &o.disk.snapshot(),
            &self.params().migration,
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

    /// Emits SHUTDOWN with `reason` (`host-qmp-quit`, `host-signal`), once: the process
    /// is about to end, and QEMU says so before anything else.
    pub fn announce_shutdown(&self, reason: &'static str) {
        if !self.shutdown_announced.swap(true, Ordering::SeqCst) {
            self.broadcast("SHUTDOWN", json!({"guest": false, "reason": reason}));
        }
    }

    /// Asks the process to end with `code` (announcing it first, see
    /// [`Session::announce_shutdown`]).
    pub fn request_quit(&self, code: i32, reason: &'static str) {
        self.announce_shutdown(reason);
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

/// QEMU's `SocketAddress` for a listening URI (none for files and commands).
fn socket_address(uri: &MigrationUri) -> Option<Value> {
    Some(match uri {
        MigrationUri::Tcp { host, port } => {
            let mut a = json!({"type": "inet", "host": host, "port": port.to_string()});
            match host.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => a["ipv4"] = json!(true),
                Ok(std::net::IpAddr::V6(_)) => a["ipv6"] = json!(true),
                Err(_) => {}
            }
            a
        }
        MigrationUri::Unix(p) => json!({"type": "unix", "path": p.display().to_string()}),
        MigrationUri::Fd(n) => json!({"type": "fd", "str": n.to_string()}),
        MigrationUri::Exec(_) | MigrationUri::File(_) => return None,
    })
}

/// The status QMP shows, as QEMU 7.2 does: the switchover is `device` only after a
/// `pre-switchover` pause, `active` otherwise.
fn qmp_status(info: &MigrationInfo) -> MigrationStatus {
    match info.status {
        MigrationStatus::Device if !info.paused_before_switchover => MigrationStatus::Active,
        s => s,
    }
}

/// `query-migrate`'s answer, with QEMU's names, plus our completion breakdown.
pub fn query_migrate_json(
    info: &MigrationInfo,
    ram: &ram_list::RamStatsSnapshot,
    disk: &BlockStatsSnapshot,
    params: &MigrationParams,
) -> Value {
    let total_time = match info.started {
        Some(t0) if !info.status.is_terminal() => t0.elapsed(),
        _ => info.total_time,
    };
    // The stream's bytes before the switchover are precopy, after it downtime bytes (the
    // completion's share is known once completed). All RAM travels pre-copy; with
    // multifd the pages' share is on the channels.
    let downtime_bytes = info.downtime_bytes;
    let mut v = json!({
        "status": qmp_status(info).as_str(),
        "total-time": total_time.as_millis() as u64,
        "setup-time": info.setup_time.as_millis() as u64,
        "expected-downtime": info.expected_downtime.as_millis() as u64,
        "downtime-limit": params.downtime_limit.as_millis() as u64,
        "ram": {
            "transferred": info.transferred,
            "remaining": ram.remaining,
            "total": ram.total,
            "duplicate": ram.duplicate,
            "skipped": 0,
            "normal": ram.normal,
            "normal-bytes": ram.normal_bytes,
            "dirty-pages-rate": ram.dirty_pages_rate,
            "mbps": info.bandwidth * 8.0 / 1e6,
            "dirty-sync-count": ram.dirty_sync_count,
            "postcopy-requests": info.postcopy_requests,
            "page-size": 4096,
            "multifd-bytes": info.bytes_elsewhere,
            "pages-per-second": ram.pages_per_second,
            "precopy-bytes": info
                .transferred
                .saturating_sub(downtime_bytes)
                .saturating_sub(info.postcopy_bytes),
            "downtime-bytes": downtime_bytes,
            "postcopy-bytes": info.postcopy_bytes,
            "dirty-sync-missed-zero-copy": 0,
        },
    });
    let o = v.as_object_mut().expect("an object");
    if info.status == MigrationStatus::Device {
        // The guest is stopped and the rest goes out (QEMU shows no more than `active`).
        o.insert("x-switchover".into(), json!(true));
    }
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
    if info.outcome_unknown {
        // The whole stream went out and no answer came: the guest may run at the
        // destination (the source is postmigrate; `cont` is the operator's call).
        o.insert("x-outcome".into(), json!("unknown"));
    }
    if info.status == MigrationStatus::None {
        // `migrate` has returned but its thread has not begun: QEMU says setup here.
        o.insert("status".into(), json!(MigrationStatus::Setup.as_str()));
    }
    v
}
