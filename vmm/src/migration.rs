//! Migrating a `Machine`: the sections it is made of, the outgoing migration thread and
//! the incoming load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use block_migration::{BlockMigration, BlockStats};
use qemu_file::{Listener, MigrationUri, QemuFile, TlsCreds, connect};
use ram_list::{
    MultifdCompression, MultifdReceiver, MultifdSender, PostcopyIncoming, RamSection, RamStats,
    RecvTarget,
};
use savevm::{MigrationControl, MigrationInfo, SaveVm, return_path, run_migration};
use serde_json::json;

use crate::events::unix_us;
use crate::global_state::GlobalStateSection;
use crate::machine::{Machine, RunState};
use crate::serial_section::SerialSection;
use vmm::settings::{RamSettings, Settings};

/// The machine type in the stream: both sides must run the same accelerator.
pub fn machine_type(m: &Machine) -> String {
    format!("vmm-{}", m.cpus.name())
}

/// The sections of `m`, in stream order: the disks copied by block migration (if any),
/// RAM, the vCPUs and in-kernel devices, the UART. `postcopy`: the `postcopy-ram`
/// capability, with a destination's post-copy state (a source's is unused).
///
/// # Errors
/// A duplicate registration (a bug).
pub fn sections(
    m: &Machine,
    ram_stats: Arc<RamStats>,
    disk_stats: Arc<BlockStats>,
    fresh_memory: bool,
    multifd: Multifd,
    ignore_shared: bool,
    postcopy: Option<Arc<PostcopyIncoming>>,
) -> Result<SaveVm> {
    let mut s = SaveVm::new(machine_type(m));
    let mut block = BlockMigration::new(m.disks.clone(), disk_stats);
    if !block.is_empty() {
        for name in &m.created_disks {
            block.allow_resize(name);
        }
        s.register_live(BlockMigration::info(), Box::new(block))?;
    }
    let mut ram = RamSection::new(m.ram.list.clone(), ram_stats);
    if fresh_memory {
        // A destination's memory is untouched: zero pages it never wrote need no work.
        ram = ram.with_fresh_memory();
    }
    // x-ignore-shared: memfd RAM goes by its descriptor, over a unix socket.
    ram = ram.with_ignore_shared(ignore_shared);
    if let Some(p) = postcopy {
        ram = ram.with_postcopy(p);
    }
    ram = match multifd {
        Multifd::Off => ram,
        Multifd::Send(channels) => ram.with_multifd(channels),
        Multifd::Receive(channels) => ram.with_multifd_receiver(channels),
    };
    s.register_live(RamSection::info(), Box::new(ram))?;
    s.register_device(
        GlobalStateSection::info(),
        Box::new(GlobalStateSection(m.global_state.clone())),
    )?;
    m.cpus.register_sections(&mut s)?;
    s.register_device(
        SerialSection::info(),
        Box::new(SerialSection::new(m.bus.clone())),
    )?;
    Ok(s)
}

/// The RAM section's multifd channels, if the migration has them.
#[derive(Debug)]
pub enum Multifd {
    /// Everything on the main stream.
    Off,
    /// A source's channels.
    Send(MultifdSender),
    /// A destination's channels.
    Receive(Arc<MultifdReceiver>),
}

/// This VM's UUID in multifd's opening messages: QEMU's default (no `-uuid`), all zero.
const VM_UUID: [u8; 16] = [0; 16];

/// Refuses multifd on a URI that cannot carry several connections (as QEMU does).
fn check_multifd_uri(uri: &MigrationUri) -> Result<()> {
    if !matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
        bail!(
            "multifd needs a tcp: or unix: URI (it opens several connections), not {}: turn the multifd capability off",
            uri.scheme()
        );
    }
    Ok(())
}

/// Connects a source's `ram.multifd_channels` channels after its main stream.
fn connect_channels(
    uri: &MigrationUri,
    params: &RamSettings,
    ctl: &MigrationControl,
    tls: Option<&Tls>,
) -> Result<Multifd> {
    if !params.multifd {
        return Ok(Multifd::Off);
    }
    check_multifd_uri(uri)?;
    let mut channels = Vec::new();
    for i in 0..params.multifd_channels {
        // Each channel proves who it talks to, as the main stream did.
        let t = match tls {
            Some(t) => qemu_file::connect_tls(uri, &t.creds, t.hostname.as_deref()),
            None => connect(uri),
        }
        .with_context(|| format!("opening multifd channel {i}"))?;
        if let Some(h) = t.shutdown_handle() {
            ctl.add_shutdown_handle(h);
        }
        channels.push(t);
    }
    let sender = MultifdSender::start(
        channels,
        VM_UUID,
        params.multifd_compression,
        params.multifd_zstd_level,
    )?;
    Ok(Multifd::Send(sender))
}

/// Connects a post-copy source's preempt connection (`postcopy-preempt`), after its
/// main stream: QEMU 7.2's destination tells the two apart by their order. Nothing goes
/// on it before post-copy runs.
fn connect_preempt(uri: &MigrationUri, ctl: &MigrationControl, tls: Option<&Tls>) -> Result<()> {
    if !ctl.params().postcopy_preempt {
        return Ok(());
    }
    // It proves who it talks to, as the main stream did.
    let t = match tls {
        Some(t) => qemu_file::connect_tls(uri, &t.creds, t.hostname.as_deref()),
        None => connect(uri),
    }
    .context("opening the post-copy preempt connection")?;
    if let Some(h) = t.shutdown_handle() {
        ctl.add_shutdown_handle(h);
    }
    ctl.set_preempt_channel(QemuFile::new(t));
    Ok(())
}

/// How long a destination waits for the preempt connection once the main stream came
/// (a source opens it right after).
const PREEMPT_ACCEPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts a destination's connections in the order QEMU 7.2 opens them: the main
/// stream, then (`preempt`) post-copy's preempt connection.
fn accept_with_preempt(
    listener: Listener,
    preempt: bool,
    tls: Option<&TlsCreds>,
) -> Result<(Box<dyn qemu_file::Transport>, Option<QemuFile>)> {
    let mut accepted =
        listener.accept_in_order(1 + usize::from(preempt), tls, PREEMPT_ACCEPT_TIMEOUT)?;
    let second = (accepted.len() > 1).then(|| QemuFile::new(accepted.remove(1)));
    Ok((accepted.remove(0), second))
}

/// Refuses post-copy where it cannot run: the destination's page requests need a
/// return path read by a thread of its own.
fn check_postcopy(uri: &MigrationUri, ram: &RamSettings) -> Result<()> {
    if !has_return_path(uri) {
        bail!(
            "postcopy-ram needs a tcp: or unix: URI (the destination asks for pages on the \
             return path), not {}",
            uri.scheme()
        );
    }
    if ram.ignore_shared {
        bail!("x-ignore-shared and postcopy-ram do not go together (as in QEMU): turn one off");
    }
    Ok(())
}

/// Refuses post-copy preempt without post-copy, or with multifd (QEMU 7.2 would take
/// its connection for a multifd channel).
fn check_preempt(params: &savevm::MigrationParams, ram: &RamSettings) -> Result<()> {
    if params.postcopy_preempt && !params.postcopy {
        bail!("Postcopy preempt requires postcopy-ram");
    }
    if params.postcopy_preempt && ram.multifd {
        bail!("Postcopy preempt is not compatible with multifd: turn one off");
    }
    Ok(())
}

/// TLS for a migration's connection: the credentials (a `tls-creds-x509` object) and, for
/// a source, the host name the destination's certificate must be valid for (None: the
/// URI's host).
#[derive(Debug, Clone)]
pub struct Tls {
    /// The credentials.
    pub creds: qemu_file::TlsCreds,
    /// `tls-hostname`.
    pub hostname: Option<String>,
}

/// Whether the transport has a reverse direction for the destination's answer.
pub fn has_return_path(uri: &MigrationUri) -> bool {
    matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_))
}

/// An outgoing migration in progress.
pub struct Outgoing {
    /// Progress, parameters, cancel.
    pub ctl: Arc<MigrationControl>,
    /// The RAM section's counters.
    pub ram: Arc<RamStats>,
    /// The block section's counters.
    pub disk: Arc<BlockStats>,
    // Lock: taken by whoever waits for the end (the thread is joined once).
    thread: Mutex<Option<JoinHandle<Result<MigrationInfo>>>>,
}

impl Outgoing {
    /// Starts the migration thread. The observer sees every status change.
    /// `return_path`: whether the destination's answer is awaited where the transport
    /// can carry one (the `return-path` capability).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        machine: Arc<Machine>,
        uri: MigrationUri,
        settings: Settings,
        return_path: bool,
        verify: bool,
        tls: Option<Tls>,
        observer: impl Fn(&MigrationInfo) + Send + Sync + 'static,
    ) -> Result<Self> {
        let (mut params, ram_settings) = (settings.migration, settings.ram);
        params.return_path = return_path && has_return_path(&uri);
        check_preempt(&params, &ram_settings)?;
        if params.postcopy {
            check_postcopy(&uri, &ram_settings)?;
            // As QEMU: post-copy opens the return path whatever `return-path` says.
            params.return_path = true;
        }
        let ctl = Arc::new(MigrationControl::new(params));
        ctl.set_observer(observer);
        let ram = Arc::new(RamStats::default());
        let disk = Arc::new(BlockStats::default());
        let (c, r, d) = (ctl.clone(), ram.clone(), disk.clone());
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let result = migrate(machine, uri, &c, &ram_settings, r, d, verify, tls);
                if let Err(e) = &result {
                    // An error before the migration thread proper ran (no connection, no
                    // sections) still ends the migration.
                    let status = c.info().status;
                    if !status.is_terminal() && status != savevm::MigrationStatus::PostcopyPaused {
                        c.fail_to_start(format!("{e:#}"));
                    }
                }
                result
            })?;
        Ok(Outgoing {
            ctl,
            ram,
            disk,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits for the end and returns the final info.
    ///
    /// # Errors
    /// The migration failed or was cancelled.
    pub fn join(&self) -> Result<MigrationInfo> {
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        match t {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the migration thread panicked"))?,
            None => Ok(self.ctl.info()),
        }
    }

    /// Whether it has ended.
    pub fn finished(&self) -> bool {
        self.ctl.info().status.is_terminal()
    }
}

#[allow(clippy::too_many_arguments)]
fn migrate(
    machine: Arc<Machine>,
    uri: MigrationUri,
    ctl: &MigrationControl,
    params: &RamSettings,
    ram: Arc<RamStats>,
    disk: Arc<BlockStats>,
    verify: bool,
    tls: Option<Tls>,
) -> Result<MigrationInfo> {
    let events = machine.events.clone();
    if params.multifd {
        check_multifd_uri(&uri)?;
    }
    // The main stream first (QEMU 7.2's destination takes the first connection as it).
    let transport = match &tls {
        Some(t) => qemu_file::connect_tls(&uri, &t.creds, t.hostname.as_deref())?,
        None => connect(&uri)?,
    };
    let mut f = QemuFile::new(transport);
    connect_preempt(&uri, ctl, tls.as_ref())?;
    let multifd = connect_channels(&uri, params, ctl, tls.as_ref())?;
    let postcopy = ctl.params().postcopy.then(Arc::default);
    let mut savevm = sections(
        &machine,
        ram,
        disk,
        false,
        multifd,
        params.ignore_shared,
        postcopy,
    )?;
    machine.set_gives_memory(params.ignore_shared);
    // On success the guest runs at the destination (or lives in the file), never again
    // here: run_migration marks the machine post-migrate before it reports completion.
    let info = match run_migration(&mut savevm, &mut f, &*machine, ctl) {
        Ok(info) => info,
        Err(e) => {
            // The guest may run at the destination: its state at the switchover is the
            // one to compare with.
            if verify && matches!(e, savevm::Error::OutcomeUnknown { .. }) {
                emit_hash(&machine, "source");
            }
            return Err(e.into());
        }
    };
    if let Some(at) = info.stopped_at {
        let c = info.completion.unwrap_or_default();
        events.emit_at(
            "switchover",
            at,
            json!({
                "stopped_at_us": unix_us(at),
                "downtime_ms": ms(c.total),
                "stop_vcpus_ms": ms(c.stop_vcpus),
                "flush_disks_ms": ms(c.flush_disks),
                "final_sync_ms": ms(c.final_sync),
                "send_ram_ms": ms(c.send_ram),
                "send_devices_ms": ms(c.send_devices),
                "wait_destination_ms": ms(c.wait_destination),
                "total_time_ms": ms(info.total_time),
                "transferred": info.transferred,
                "dirty_syncs": info.dirty_syncs,
                "iterations": info.iterations,
                "bandwidth_bps": info.bandwidth,
                "threshold": info.threshold,
                "downtime_bytes": info.downtime_bytes,
                "expected_downtime_ms": ms(info.expected_downtime),
                "postcopy": info.postcopy_started.is_some(),
                "postcopy_requests": info.postcopy_requests,
                "postcopy_bytes": info.postcopy_bytes,
                "postcopy_preempt_bytes": info.postcopy_preempt_bytes,
            }),
        );
    }
    if verify {
        emit_hash(&machine, "source");
    }
    Ok(info)
}

/// Milliseconds as a float.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn emit_hash(machine: &Machine, side: &str) {
    let t = Instant::now();
    // A source whose memory may be shared with a destination that runs by now hashed it
    // at the switchover.
    let (hash, (pass, mismatches)) = match machine.switchover_hash() {
        Some(at_switchover) if side == "source" => at_switchover,
        _ => (machine.ram.hash(), machine.guest_status()),
    };
    machine.events.emit(
        "ram-hash",
        json!({"side": side, "hash": format!("{hash:016x}"), "pass": pass, "mismatches": mismatches,
               "hash_ms": ms(t.elapsed())}),
    );
    eprintln!(
        "vmm: {side} RAM hash at the switchover: {hash:016x} (guest pass {pass}, stale pages {mismatches})"
    );
    for d in &machine.disks {
        // A shared disk was hashed at the switchover, before the destination could write it.
        let hash = match machine.shared_hash(d.name()) {
            Some(h) if side == "source" => Ok(h),
            _ => crate::disk::hash(d),
        };
        match hash {
            Ok(h) => {
                machine.events.emit(
                    "disk-hash",
                    json!({"side": side, "disk": d.name(), "hash": format!("{h:016x}"),
                           "migrated": d.migrates()}),
                );
                eprintln!(
                    "vmm: {side} disk {:?} hash at the switchover: {h:016x}",
                    d.name()
                );
            }
            Err(e) => eprintln!("vmm: cannot hash disk {:?}: {e:#}", d.name()),
        }
    }
}

/// Watches `listener` during a multifd load: a further connection fails the load (and
/// interrupts the main stream). Returns the handle that ends the watch, and its thread.
fn watch_extra(
    listener: Listener,
    receiver: Arc<MultifdReceiver>,
    main: Option<qemu_file::ShutdownHandle>,
) -> (qemu_file::ShutdownHandle, JoinHandle<()>) {
    let stop = listener
        .shutdown_handle()
        .unwrap_or_else(|| qemu_file::ShutdownHandle::new(|| {}));
    let t = std::thread::spawn(move || {
        if listener.accept().is_ok() {
            receiver.fail(ram_list::Error::MultifdSetup {
                reason: "the source opened more connections than the main stream and this side's multifd-channels: its multifd-channels is higher".into(),
            });
            if let Some(h) = main {
                h.shutdown();
            }
        }
    });
    (stop, t)
}

/// Aborts an incoming migration from another thread (a signal, `quit`): a blocked
/// accept or read returns at once, and a load that completed meanwhile is not
/// acknowledged, so the source keeps its guest.
#[derive(Default)]
pub struct Abort {
    aborted: AtomicBool,
    // Lock: what interrupts the current wait (the listener's, then the stream's); set by
    // the incoming thread, used by `abort`.
    handle: Mutex<Option<qemu_file::ShutdownHandle>>,
}

impl Abort {
    /// Aborts: interrupts whatever the incoming thread waits for now or later.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// Whether it was aborted.
    pub fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// What interrupts the thread's wait from now on; an abort that came first takes
    /// effect at once.
    fn set(&self, h: Option<qemu_file::ShutdownHandle>) {
        let mut slot = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        *slot = h;
        if self.aborted() {
            if let Some(h) = slot.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// What an incoming migration did.
#[derive(Debug)]
pub struct IncomingReport {
    /// Stream bytes.
    pub bytes: u64,
    /// From the connection to the end of the load.
    pub load_time: std::time::Duration,
}

/// A destination's listening socket (or file, or command), bound and announced.
pub struct IncomingListener {
    listener: Listener,
    uri: MigrationUri,
    previous: RunState,
}

impl IncomingListener {
    /// Marks `machine` as a destination and listens on `uri`; the `listening` event gives
    /// the bound address (a TCP port 0 is chosen by the system).
    ///
    /// # Errors
    /// The guest runs here, or the address cannot be bound.
    pub fn bind(machine: &Machine, uri: &MigrationUri) -> Result<Self> {
        let previous = machine.set_incoming()?;
        let listener = match Listener::bind(uri) {
            Ok(l) => l,
            Err(e) => {
                machine.incoming_failed(previous);
                return Err(e.into());
            }
        };
        let local = listener.local_uri();
        machine
            .events
            .emit("listening", json!({"uri": local.to_string()}));
        Ok(IncomingListener {
            listener,
            uri: uri.clone(),
            previous,
        })
    }

    /// The bound address.
    pub fn local_uri(&self) -> MigrationUri {
        self.listener.local_uri()
    }

    /// Waits for the stream, loads it into `machine`, and resumes the guest only after a
    /// complete load. With a return path the source learns the outcome first; if it
    /// cannot be told, the guest does not run here. On failure the machine goes back to
    /// the state it had before [`IncomingListener::bind`].
    ///
    /// # Errors
    /// Any load error; the guest has not run.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        self,
        machine: &Arc<Machine>,
        verify: bool,
        params: &Settings,
        tls: Option<&Tls>,
        abort: &Arc<Abort>,
        on_connect: impl FnOnce(),
        postcopy: PostcopyLinks,
    ) -> Result<IncomingReport> {
        let previous = self.previous;
        let r = load_incoming(
            machine, self, verify, params, tls, abort, on_connect, postcopy,
        );
        if r.is_err() && postcopy_paused(machine) {
            // The guest ran here and lacks pages: it stays, waiting for them (never
            // reading them as zeros), and so does this side's state.
            return r;
        }
        if r.is_err() {
            if let Some(m) = &machine.ram.memfd {
                // It may have taken the source's memory: it must not share it any more.
                if let Err(e) = m.detach() {
                    eprintln!("vmm: cannot let go of the source's memory: {e}");
                }
            }
            machine.incoming_failed(previous);
        }
        r
    }
}

/// Whether a destination's guest runs after post-copy's switch and still lacks pages.
pub fn postcopy_paused(machine: &Machine) -> bool {
    machine
        .postcopy_incoming()
        .is_some_and(|p| p.waiting_for_pages())
}

/// The thread that starts a post-copy destination's guest at RUN.
type RunThread = Arc<Mutex<Option<JoinHandle<Result<()>>>>>;

/// A post-copy destination's ties to its session: its statuses, and where
/// `migrate-recover` puts the listener of a resume.
pub struct PostcopyLinks {
    /// Called with each post-copy status (and the error of a pause).
    pub status: Box<dyn Fn(savevm::MigrationStatus, Option<String>) + Send + Sync>,
    /// Where a paused load waits for `migrate-recover`.
    pub recovery: Arc<Recovery>,
}

/// A paused post-copy destination's way back: the listener `migrate-recover` binds,
/// taken by the paused load.
#[derive(Default)]
pub struct Recovery {
    // Lock: the listener with the TLS credentials its connection must pass (None: in
    // the clear), set by `migrate-recover` and taken by the incoming thread (`offered`
    // wakes it), and whether that thread is accepting on one.
    listener: Mutex<(Option<Offered>, bool)>,
    offered: std::sync::Condvar,
}

/// A recovery's listener and the TLS credentials its connection must pass (None: in the
/// clear).
type Offered = (Listener, Option<TlsCreds>);

impl Recovery {
    /// Hands `l` to the paused load, with the TLS credentials the source's connection
    /// must pass (None: in the clear).
    ///
    /// # Errors
    /// QEMU's, when a listener waits already or is being accepted on.
    pub fn offer(&self, l: Listener, tls: Option<TlsCreds>) -> Result<()> {
        let mut slot = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        if slot.0.is_some() || slot.1 {
            bail!("Migrate recovery is triggered already");
        }
        slot.0 = Some((l, tls));
        self.offered.notify_all();
        Ok(())
    }

    /// The accept on the last listener ended (the source connected, or it failed).
    fn accepted(&self) {
        self.listener.lock().unwrap_or_else(|p| p.into_inner()).1 = false;
    }

    /// Waits for a listener (and its TLS credentials); None once `abort` says so.
    fn wait(&self, abort: &Abort) -> Option<Offered> {
        let mut slot = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if abort.aborted() {
                return None;
            }
            if let Some(l) = slot.0.take() {
                slot.1 = true;
                return Some(l);
            }
            slot = self
                .offered
                .wait_timeout(slot, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// What a post-copy destination does at RUN, at a break and at a resume.
struct DestinationHooks {
    machine: Arc<Machine>,
    verify: bool,
    run_thread: RunThread,
    links: PostcopyLinks,
    abort: Arc<Abort>,
    incoming_timeout: std::time::Duration,
    /// `postcopy-preempt`: a resume comes with a second connection too.
    preempt: bool,
}

impl savevm::PostcopyHooks for DestinationHooks {
    /// The vCPU state is applied and the vCPUs started on a thread of their own (both
    /// may touch guest memory, whose pages the loading thread alone brings in);
    /// `--verify` first hashes every page, each read of one not there yet waiting for it.
    fn run(&mut self) -> std::result::Result<(), savevm::SectionError> {
        (self.links.status)(savevm::MigrationStatus::PostcopyActive, None);
        self.machine.events.emit("postcopy-run", json!({}));
        let (m, verify) = (self.machine.clone(), self.verify);
        let (started_tx, started) = std::sync::mpsc::channel();
        let t = std::thread::Builder::new()
            .name("postcopy-run".into())
            .spawn(move || -> Result<()> {
                if verify {
                    emit_hash(&m, "destination");
                }
                m.cpus
                    .apply_loaded()
                    .context("applying the vCPU state")?;
                let ready_at = SystemTime::now();
                let r = m.start_after_load();
                let _ = started_tx.send(());
                r?;
                let resumed_at = SystemTime::now();
                if m.run_state() == RunState::Running {
                    m.events.emit_at(
                        "incoming-resumed",
                        resumed_at,
                        json!({"resumed_at_us": unix_us(resumed_at), "ready_at_us": unix_us(ready_at),
                               "postcopy": true}),
                    );
                } else {
                    m.events
                        .emit("incoming-held", json!({"ready_at_us": unix_us(ready_at)}));
                }
                Ok(())
            })?;
        *self.run_thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        // The guest starts sooner with a core to itself (the pages stream in on this
        // thread, and the source's on the other): wait a little for it, no longer than a
        // start takes, in case it waits for a page only this thread can bring.
        if !verify {
            let _ = started.recv_timeout(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits, paused, for `migrate-recover`'s listener and the source's new connection.
    fn paused(&mut self, why: &savevm::Error) -> Option<QemuFile> {
        let why = savevm::error_chain(why);
        eprintln!(
            "vmm: post-copy paused ({why}): the guest waits for its pages; migrate-recover \
             listens for the source's resume"
        );
        self.machine
            .events
            .emit("postcopy-paused", json!({"error": why}));
        (self.links.status)(savevm::MigrationStatus::PostcopyPaused, Some(why));
        let incoming = self.machine.postcopy_incoming();
        // The preempt connection went with the main one: a resume opens both again.
        if let Some(e) = incoming.as_ref().and_then(|p| p.stop_preempt()) {
            eprintln!("vmm: the post-copy preempt connection: {e}");
        }
        loop {
            let (listener, tls) = self.links.recovery.wait(&self.abort)?;
            self.abort.set(listener.shutdown_handle());
            // Over TLS the source proves who it is before a byte of the resume is read.
            let accepted = accept_with_preempt(listener, self.preempt, tls.as_ref());
            self.links.recovery.accepted();
            if self.abort.aborted() {
                return None;
            }
            let (transport, preempt) = match accepted {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("vmm: migrate-recover: {e:#}");
                    continue;
                }
            };
            let mut f = QemuFile::new(transport);
            self.abort.set(f.shutdown_handle());
            if f.set_read_timeout(Some(self.incoming_timeout)).is_err() {
                continue;
            }
            if let (Some(p), Some(incoming)) = (preempt, &incoming) {
                if let Err(e) = incoming.set_preempt_channel(p, f.shutdown_handle()) {
                    eprintln!("vmm: migrate-recover: {e}");
                    continue;
                }
            }
            self.machine.events.emit("postcopy-recover", json!({}));
            (self.links.status)(savevm::MigrationStatus::PostcopyRecover, None);
            return Some(f);
        }
    }

    fn resumed(&mut self) {
        self.machine.events.emit("postcopy-resumed", json!({}));
        (self.links.status)(savevm::MigrationStatus::PostcopyActive, None);
    }
}

#[allow(clippy::too_many_arguments)]
fn load_incoming(
    machine: &Arc<Machine>,
    incoming: IncomingListener,
    verify: bool,
    settings: &Settings,
    tls: Option<&Tls>,
    abort: &Arc<Abort>,
    on_connect: impl FnOnce(),
    links: PostcopyLinks,
) -> Result<IncomingReport> {
    let (params, ram) = (&settings.migration, &settings.ram);
    let events = &machine.events;
    let uri = &incoming.uri;
    eprintln!(
        "vmm: waiting for a migration stream on {}",
        incoming.local_uri()
    );
    let channels = if ram.multifd {
        check_multifd_uri(uri)?;
        usize::from(ram.multifd_channels)
    } else {
        0
    };
    abort.set(incoming.listener.shutdown_handle());
    // With TLS every connection proves who it is before a byte of it is read.
    let with_preempt = params.postcopy && params.postcopy_preempt && channels == 0;
    let accepted = match (tls, with_preempt) {
        (tls, true) => accept_with_preempt(incoming.listener, true, tls.map(|t| &t.creds))
            .map(|(main, p)| (main, Vec::new(), None, p)),
        (Some(t), false) => incoming
            .listener
            .accept_tls_with_channels(channels, &t.creds)
            .map(|a| (a.main, a.channels, a.listener, None))
            .map_err(anyhow::Error::from),
        (None, false) => incoming
            .listener
            .accept_with_channels(channels)
            .map(|a| (a.main, a.channels, a.listener, None))
            .map_err(anyhow::Error::from),
    };
    if abort.aborted() {
        bail!("the incoming migration was aborted before the source connected");
    }
    let (transport, channels, extra_listener, preempt) = accepted?;
    let t0 = Instant::now();
    events.emit("incoming-connected", json!({"channels": channels.len()}));
    on_connect();
    let mut f = QemuFile::new(transport);
    abort.set(f.shutdown_handle());
    // A source that stalls or vanishes without closing must not hold this side for ever.
    f.set_read_timeout(Some(params.incoming_timeout))?;
    let fresh = machine.take_fresh_memory();
    let stats = Arc::new(RamStats::default());
    let receiver = match channels.is_empty() {
        true => None,
        false => {
            let mut target = RecvTarget::new(machine.ram.list.clone(), stats.clone(), VM_UUID);
            target.fresh = fresh;
            target.compressed = ram.multifd_compression != MultifdCompression::None;
            Some(Arc::new(MultifdReceiver::start(
                channels,
                target,
                f.shutdown_handle(),
            )?))
        }
    };
    let multifd = match &receiver {
        Some(r) => Multifd::Receive(r.clone()),
        None => Multifd::Off,
    };
    // A connection beyond the channels: the source has more than this side expects, and
    // pages sent over the one never read would be missing.
    let watch = match (&receiver, extra_listener) {
        (Some(r), Some(l)) => Some(watch_extra(l, r.clone(), f.shutdown_handle())),
        _ => None,
    };
    let postcopy = match params.postcopy {
        true => Some(machine.new_postcopy_incoming()?),
        false => None,
    };
    if let (Some(p), Some(incoming)) = (preempt, &postcopy) {
        // Read from LISTEN on; unused (and dropped with the load) if the source never
        // switches.
        incoming.set_preempt_channel(p, f.shutdown_handle())?;
    }
    let mut savevm = sections(
        machine,
        stats,
        Arc::default(),
        fresh,
        multifd,
        ram.ignore_shared,
        postcopy.clone(),
    )?;
    let run_thread = RunThread::default();
    if postcopy.is_some() {
        savevm.set_postcopy_hooks(Box::new(DestinationHooks {
            machine: machine.clone(),
            verify,
            run_thread: run_thread.clone(),
            links,
            abort: abort.clone(),
            incoming_timeout: params.incoming_timeout,
            preempt: with_preempt,
        }));
    }
    let answer = has_return_path(uri);
    let loaded = savevm.load(&mut f);
    // The guest started at RUN: after a complete load its thread has applied its state
    // (every page it could wait for came). After a failed one it may wait for pages
    // that never come: it is left to them.
    let started = run_thread
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(|t| match loaded.is_ok() {
            true => t
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the thread starting the guest panicked"))),
            false => Ok(()),
        });
    // A channel's failure stops the main stream too: its error is the one to report.
    if let Some((stop, t)) = watch {
        stop.shutdown();
        let _ = t.join();
    }
    let channel_error = receiver.as_ref().and_then(|r| {
        r.finish();
        r.error()
    });
    let channel_bytes = receiver.as_ref().map_or(0, |r| r.bytes_read());
    let loaded = match (loaded, channel_error) {
        (Err(_), Some(e)) => Err(anyhow::Error::from(e)),
        (r, _) => r.map_err(anyhow::Error::from),
    };
    let loaded = loaded.and_then(|r| match &started {
        // Post-copy: applied and started at RUN.
        Some(Ok(())) => Ok(r),
        Some(Err(e)) => Err(anyhow!("starting the guest at post-copy's RUN: {e:#}")),
        None => machine
            .cpus
            .apply_loaded()
            .map(|_| r)
            .context("applying the vCPU state"),
    });
    // Told to stop while loading: the source must not hear that it loaded.
    // (After post-copy's RUN the guest is here whatever happens: the source is told.)
    let loaded = loaded.and_then(|r| match abort.aborted() && !r.postcopy {
        true => Err(anyhow!(
            "the incoming migration was aborted (this process is ending)"
        )),
        false => Ok(r),
    });
    // With an answer to give, the load is complete only with the stream's last byte (the
    // end of its description): the source owns the guest until that byte left it, and a
    // stream cut before it must not run here.
    let loaded = loaded.and_then(|r| match (answer, &r.description) {
        // After post-copy no description follows, as in QEMU.
        (true, None) if !r.postcopy => Err(anyhow!(
            "the stream ended before its VM description: the source did not finish sending it"
        )),
        _ => Ok(r),
    });
    let report = match loaded {
        Ok(r) => r,
        Err(e) => {
            if answer {
                // The reason goes only to a source the stream showed to be vmm (its
                // configuration named our machine type): a QEMU source would refuse it.
                let from_vmm = !matches!(
                    e.downcast_ref::<savevm::Error>(),
                    Some(
                        savevm::Error::BadMagic { .. }
                            | savevm::Error::UnsupportedVersion { .. }
                            | savevm::Error::ConfigurationMissing { .. }
                            | savevm::Error::MachineMismatch { .. }
                    )
                );
                let reason = format!("{e:#}");
                let _ = match postcopy.is_some() {
                    // Post-copy may share the return path with the fault thread.
                    true => f.return_path().map_err(savevm::Error::from).and_then(|w| {
                        return_path::ReturnPath::new(w).load_failure(from_vmm.then_some(&*reason))
                    }),
                    false => return_path::send_load_failure(&mut f, from_vmm.then_some(&*reason)),
                };
            }
            events.emit("incoming-failed", json!({"error": format!("{e:#}")}));
            if postcopy_paused(machine) {
                events.emit("postcopy-paused", json!({"error": format!("{e:#}")}));
                return Err(e.context(
                    "post-copy was interrupted: the guest runs here and waits for the pages it \
                     lacks (it never reads them as zeros); the source keeps its whole copy, stopped",
                ));
            }
            return Err(e.context("the incoming migration failed; the guest was not started"));
        }
    };
    if let (Some(p), false) = (&postcopy, report.postcopy) {
        // The source completed without switching: its preempt connection goes unused.
        p.stop_preempt();
    }
    let load_time = t0.elapsed();
    let loaded_at = SystemTime::now();
    events.emit_at(
        "loaded",
        loaded_at,
        json!({"bytes": report.bytes + channel_bytes, "load_ms": ms(load_time),
               "postcopy": report.postcopy}),
    );
    if report.postcopy {
        // The guest runs here since RUN; every page has arrived.
        if let Some(rp) = &report.return_path {
            if let Err(e) = rp.load_result(true) {
                eprintln!("vmm: post-copy completed, but the source could not be told ({e})");
            }
        }
        if let Some(p) = &postcopy {
            let w = p.info().waits;
            let by = p.fault_waits_by_connection().map(|c| {
                json!({"resolved": c.count, "p50_us": c.p50_us, "p99_us": c.p99_us,
                       "max_us": c.max_us})
            });
            events.emit(
                "postcopy-faults",
                json!({"requests": w.requests, "resolved": w.resolved, "total_us": w.total_us,
                       "p50_us": w.p50_us, "p99_us": w.p99_us, "max_us": w.max_us,
                       "histogram_us": w.histogram,
                       "blocktime_ms": w.vcpus.total_ms, "vcpu_blocktime_ms": w.vcpus.per_vcpu_ms,
                       "preempt_pages": p.info().preempt_pages,
                       "on_preempt": by[0], "on_stream": by[1]}),
            );
        }
        return Ok(IncomingReport {
            bytes: report.bytes + channel_bytes,
            load_time,
        });
    }
    if answer {
        if let Err(e) = return_path::send_load_result(&mut f, true) {
            // The source cannot know it loaded here: it keeps its copy stopped (outcome
            // unknown), and this one is held too, whole, with its disks locked below,
            // until the operator's `cont` says which side runs the guest.
            eprintln!(
                "vmm: the stream loaded, but the source could not be told ({e}): the guest is held \
                 paused here; `cont` runs it, if the source does not"
            );
            events.emit("incoming-unconfirmed", json!({"error": e.to_string()}));
            machine.hold_after_load();
        }
    }
    // The guest could run from here; with --verify it waits for the hash of its memory.
    let ready_at = SystemTime::now();
    if verify {
        emit_hash(machine, "destination");
    }
    machine.start_after_load()?;
    let resumed_at = SystemTime::now();
    if machine.run_state() == RunState::Running {
        events.emit_at(
            "incoming-resumed",
            resumed_at,
            json!({"resumed_at_us": unix_us(resumed_at), "ready_at_us": unix_us(ready_at)}),
        );
    } else {
        // Held (`-S`, or a `stop` while incoming): it runs when `cont` says so.
        events.emit("incoming-held", json!({"ready_at_us": unix_us(ready_at)}));
    }
    Ok(IncomingReport {
        bytes: report.bytes + channel_bytes,
        load_time,
    })
}
