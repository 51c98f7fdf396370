//! vmm: a small KVM VMM that live-migrates its running guest to another vmm process.
//!
//! `vmm` alone runs the demo; `vmm run` runs a VM (a source, or a destination with
//! `--incoming`); `vmm analyze FILE` prints a migration stream as text.

mod bus;
mod cpus;
mod demo;
mod disk;
mod events;
mod global_state;
mod guest;
mod kvm;
mod machine;
mod memory;
mod migration;
mod monitor;
mod progress;
mod run_state;
mod serial;
mod serial_section;
mod session;
mod soft;
mod throttle;
mod units;
mod vcpu;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use qemu_file::MigrationUri;
use ram_list::MultifdCompression;
use serde_json::json;
use vmm::settings::Settings;

use crate::events::EventLog;
use crate::guest::{GuestParams, Workload};
use crate::machine::{Accel, Machine, MachineConfig};
use crate::memory::MemoryBackend;
use crate::session::Session;
use vmm::spec::{DriveSpec, parse_size};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A small KVM VMM that live-migrates its running guest to another vmm process",
    long_about = "A small KVM VMM that live-migrates its running guest to another vmm process.\n\n\
        Run `vmm` with no arguments for the demo: a destination and a source process, a guest that keeps \
        rewriting 64 MiB, a live migration over a unix socket, and what happened.\n\n\
        Examples:\n  \
        vmm run --incoming tcp:127.0.0.1:4444          # a destination, waiting\n  \
        vmm run --migrate-to tcp:127.0.0.1:4444        # a source, migrating as soon as its guest runs\n  \
        vmm run --qmp unix:/tmp/vmm.qmp                # drive it with QMP: migrate, query-migrate, ...\n  \
        vmm run --migrate-to file:/tmp/snap            # save to a file; restore with --incoming file:/tmp/snap\n  \
        vmm analyze /tmp/snap                          # the stream, annotated"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM: a source (migrate it with --migrate-to or over QMP), or with --incoming a
    /// destination that waits for a stream.
    Run(Box<RunArgs>),
    /// Print a migration stream file (ours or QEMU's) as annotated text.
    Analyze {
        /// The stream file (e.g. written by `migrate file:PATH`).
        file: PathBuf,
    },
    /// The built-in demo (the default): migrate a dirtying guest between two vmm
    /// processes over a unix socket and show what happened.
    Demo(demo::DemoArgs),
    /// Write the built-in guest, with its parameters, as a raw disk image that QEMU boots
    /// too (for side-by-side runs).
    Image(ImageArgs),
}

#[derive(Args, Clone, Debug)]
struct ImageArgs {
    /// The workload.
    #[arg(long, value_enum, default_value_t = Workload::Dirty)]
    workload: Workload,
    /// Start of the workload's memory range.
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    range_start: u64,
    /// Size of the workload's memory range.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    range_size: u64,
    /// Pages per second (dirty); 0: as fast as the guest can.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// The guest TSC frequency in kHz for pacing; "auto" asks KVM.
    #[arg(long, default_value = "auto")]
    tsc_khz: String,
    /// Pad the image to this size (QEMU's q35 needs at least one 16x63 cylinder).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pad: u64,
    /// The image file to write.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Guest memory (K, M, G suffixes).
    #[arg(short, long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Where guest RAM lives: anonymous (private) memory, or a memfd mapped shared,
    /// which --x-ignore-shared hands over to a destination over a unix: socket instead
    /// of copying it (a live update of the VMM on one host).
    #[arg(long, value_enum, default_value_t = MemoryBackend::Anonymous)]
    pub memory_backend: MemoryBackend,
    /// vCPUs (KVM only; the software backend has one).
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Accelerator: KVM, or the software backend (the workload on a host thread).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// The built-in guest's workload.
    #[arg(long, value_enum, default_value_t = Workload::Dirty)]
    pub workload: Workload,
    /// Start of the workload's memory range (at least 1M).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub range_start: u64,
    /// Size of the workload's memory range.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub range_size: u64,
    /// Dirty workload: pages per second (0: as fast as the guest can).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Boot another 512-byte boot sector (same entry: 0x7c00, real mode, CS=0).
    #[arg(long)]
    pub guest_image: Option<PathBuf>,
    /// Where the guest's serial output goes: stdout, none, or a file.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// A disk: file=PATH,id=NAME[,migrate=on|off][,create=on]. migrate=off is shared
    /// storage (flushed at the switchover, not copied); create=on creates a destination's
    /// image with the size the stream gives. The built-in guest's disk workload writes the
    /// first disk. Repeatable.
    #[arg(long = "drive")]
    pub drives: Vec<DriveSpec>,
    /// QMP monitor socket, unix:PATH (mode 0600; removed at exit).
    #[arg(long)]
    pub qmp: Option<String>,
    /// An object, as QEMU's -object: tls-creds-x509,id=ID,dir=DIR[,endpoint=client|server]
    /// [,verify-peer=on|off] (QEMU's file names in DIR); authz-simple,id=ID,identity=DN;
    /// authz-list,id=ID[,policy=deny|allow],rules.0.match=DN,rules.0.policy=allow
    /// [,rules.0.format=exact|glob]...; authz-listfile,id=ID,filename=FILE (`,,` is a
    /// comma in a value; see docs/tls.md). Repeatable.
    #[arg(long = "object")]
    pub objects: Vec<vmm::object::ObjectSpec>,
    /// tls-creds: migrate over TLS with this object's credentials (a destination takes
    /// only a TLS peer whose certificate its CA signed).
    #[arg(long)]
    pub tls_creds: Option<String>,
    /// tls-hostname: the name the destination's certificate must be valid for (default:
    /// the URI's host).
    #[arg(long)]
    pub tls_hostname: Option<String>,
    /// tls-authz: a destination lets in only a source whose certificate's distinguished
    /// name this authz object allows.
    #[arg(long)]
    pub tls_authz: Option<String>,
    /// Hold the guest until QMP's `cont` (QEMU's -S): a source starts in `prelaunch`, a
    /// destination stays `paused` once loaded.
    #[arg(short = 'S', long)]
    pub paused: bool,
    /// Turn the `events` migration capability on from the start (MIGRATION and
    /// MIGRATION_PASS events, as QEMU's -global migration.x-events=on): for a destination
    /// started with --incoming URI, which has no moment to set it over QMP.
    #[arg(long)]
    pub migration_events: bool,
    /// Be a destination: wait for a migration stream on this URI (tcp:HOST:PORT,
    /// unix:PATH, fd:N, exec:CMD, file:PATH) and run the guest only after a complete load;
    /// `defer`: wait for QMP's migrate-incoming to say where.
    #[arg(long, value_parser = parse_incoming)]
    pub incoming: Option<Incoming>,
    /// A destination allocates all guest RAM while it waits, so the stream loads at memory
    /// speed; this turns that off (RAM is then allocated as pages arrive).
    #[arg(long)]
    pub no_prealloc: bool,
    /// Allocate all guest RAM at start, on a source too (QEMU's -mem-prealloc); a memfd
    /// destination allocates nothing otherwise (a hand-over replaces its memory).
    #[arg(long, conflicts_with = "no_prealloc")]
    pub mem_prealloc: bool,
    /// How KVM's dirty log re-protects written pages: auto (manual where KVM offers it),
    /// manual (KVM_CLEAR_DIRTY_LOG per 64 MiB chunk just before its pages are sent),
    /// classic (each KVM_GET_DIRTY_LOG re-protects everything it reports).
    #[arg(long, value_enum, default_value_t = kvm::DirtyProtect::Auto)]
    pub dirty_log_protect: kvm::DirtyProtect,
    /// Migrate to this URI as soon as the guest runs; exit once it completed.
    #[arg(long, value_parser = parse_uri)]
    pub migrate_to: Option<MigrationUri>,
    /// downtime-limit in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// x-incoming-timeout in milliseconds: a destination's load fails when its stream
    /// brings no byte for this long (a stalled or vanished source).
    #[arg(long, default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub incoming_timeout: u64,
    /// max-bandwidth in bytes per second (K, M, G suffixes); 0 is unlimited.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub max_bandwidth: u64,
    /// x-ignore-shared: RAM in shared memory (--memory-backend memfd) is not copied but
    /// handed over, its descriptor passed over the unix: socket to a process of the same
    /// user (QEMU's capability; set it on both sides).
    #[arg(long)]
    pub x_ignore_shared: bool,
    /// Switch over at the first moment the pending bytes fit the downtime limit, as QEMU
    /// does, instead of sending further rounds while they shorten the pause (for A/B
    /// measurements).
    #[arg(long)]
    pub x_first_fit_switchover: bool,
    /// auto-converge: throttle the vCPUs while the guest dirties memory faster than it
    /// can be sent (QEMU's capability, with its defaults: 20%, +10%, up to 99%).
    #[arg(long)]
    pub auto_converge: bool,
    /// multifd: RAM pages travel over this many extra connections besides the main
    /// stream (tcp: and unix: only); a destination must be given the same number.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    pub multifd_channels: Option<u8>,
    /// multifd-compression: how each packet of pages is compressed.
    #[arg(long, value_enum, default_value_t = Compression::None, requires = "multifd_channels")]
    pub multifd_compression: Compression,
    /// multifd-zstd-level, 0 to 20.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=20))]
    pub multifd_zstd_level: u8,
    /// Hash guest RAM at the switchover on both sides (source after the final sync,
    /// destination after the load) and log it.
    #[arg(long)]
    pub verify: bool,
    /// Append JSON-lines events (migration states, stop and resume times, hashes) to FILE.
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    /// Stop and exit this many seconds after the guest starts running here.
    #[arg(long)]
    pub exit_after: Option<f64>,
    /// The live progress line: auto (on a terminal), always, never.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

/// `--multifd-compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// Pages as they are.
    None,
    /// zstd, one stream per channel.
    Zstd,
}

/// When to draw the progress line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// When stderr is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// `--incoming`: a URI, or `defer` (QEMU's: the address comes later over QMP).
#[derive(Debug, Clone)]
pub enum Incoming {
    /// Listen on this URI now.
    Uri(MigrationUri),
    /// Wait for `migrate-incoming`.
    Defer,
}

fn parse_incoming(s: &str) -> Result<Incoming, String> {
    if s == "defer" {
        Ok(Incoming::Defer)
    } else {
        parse_uri(s).map(Incoming::Uri)
    }
}

fn parse_uri(s: &str) -> Result<MigrationUri, String> {
    MigrationUri::parse(s).map_err(|e| e.to_string())
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Keeps freed memory at the top of the heap instead of giving it back to the kernel at
/// once: a TLS stream allocates and frees a 16 KiB record buffer per record (rustls), and
/// with glibc's default trim threshold each burst was faulted in again (measured: a
/// third of TLS throughput, `cargo bench -p qemu-file --bench tls`).
fn keep_heap_top() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

fn main() {
    keep_heap_top();
    let cli = Cli::parse();
    let code = match cli.command {
        None => demo::run(&demo::DemoArgs::default()),
        Some(Command::Demo(a)) => demo::run(&a),
        Some(Command::Run(a)) => run(&a),
        Some(Command::Analyze { file }) => analyze(&file),
        Some(Command::Image(a)) => image(&a),
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("vmm: {e:#}");
            std::process::exit(1);
        }
    }
}

fn analyze(file: &std::path::Path) -> Result<i32> {
    let mut ram = ram_list::RamWalker::default();
    let mut block = block_migration::BlockWalker::default();
    // Line by line to stdout: a dump is larger than its stream, and is never held whole.
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    savevm::dump_stream_to(file, &mut [&mut ram, &mut block], &mut out)
        .with_context(|| format!("reading {}", file.display()))?;
    out.flush()?;
    Ok(0)
}

fn image(a: &ImageArgs) -> Result<i32> {
    let tsc_khz = match a.tsc_khz.as_str() {
        "auto" => {
            kvm::tsc_khz().context("asking KVM for the TSC frequency (or give --tsc-khz N)")?
        }
        n => n
            .parse()
            .context("--tsc-khz takes a number of kHz or auto")?,
    };
    let p = GuestParams {
        workload: a.workload,
        range_start: a.range_start,
        range_size: a.range_size,
        rate: a.rate,
        tsc_khz,
        disk_blocks: 0,
    };
    let mut img = guest::IMAGE.to_vec();
    p.patch(&mut img)?;
    img.resize(img.len().max(a.pad as usize), 0);
    std::fs::write(&a.output, &img).with_context(|| format!("writing {}", a.output.display()))?;
    println!("{} (TSC {tsc_khz} kHz)", a.output.display());
    Ok(0)
}

fn run(a: &RunArgs) -> Result<i32> {
    // First, so no state (building the VM included) ignores Ctrl-C or SIGTERM.
    install_signal_handlers();
    if a.incoming.is_some() && a.migrate_to.is_some() {
        bail!(
            "--incoming and --migrate-to cannot be combined: start a destination, then migrate to it"
        );
    }
    let events = Arc::new(EventLog::open(a.log_json.as_deref())?);
    let image = match &a.guest_image {
        Some(p) => {
            std::fs::read(p).with_context(|| format!("reading the guest image {}", p.display()))?
        }
        None => guest::IMAGE.to_vec(),
    };
    let params = guest::has_params(&image).then_some(GuestParams {
        workload: a.workload,
        range_start: a.range_start,
        range_size: a.range_size,
        rate: a.rate,
        tsc_khz: 0,
        disk_blocks: 0,
    });
    let serial: Box<dyn Write + Send> = match a.serial.as_str() {
        "stdout" => Box::new(std::io::stdout()),
        "none" => Box::new(std::io::sink()),
        path => {
            Box::new(std::fs::File::create(path).with_context(|| format!("serial output {path}"))?)
        }
    };
    let machine = Machine::new(
        MachineConfig {
            memory: a.memory,
            memory_backend: a.memory_backend,
            vcpus: a.vcpus,
            accel: a.accel,
            image,
            params,
            incoming: a.incoming.is_some(),
            serial,
            drives: a.drives.clone(),
            paused: a.paused,
            verify: a.verify,
            prealloc: !a.no_prealloc,
            mem_prealloc: a.mem_prealloc,
            dirty_protect: a.dirty_log_protect,
        },
        events.clone(),
    )?;
    events.emit(
        "started",
        json!({"pid": std::process::id(), "memory": a.memory, "accel": machine.cpus.name(),
               "tsc_khz": machine.params.map(|p| p.tsc_khz),
               "workload": params.map(|p| p.workload), "range_size": a.range_size, "rate": a.rate}),
    );
    let mut migration_params = Settings::default();
    let p = &mut migration_params.migration;
    p.downtime_limit = Duration::from_millis(a.downtime_limit);
    p.max_bandwidth = a.max_bandwidth;
    p.auto_converge = a.auto_converge;
    p.approach = !a.x_first_fit_switchover;
    p.incoming_timeout = Duration::from_millis(a.incoming_timeout);
    let ram = &mut migration_params.ram;
    ram.ignore_shared = a.x_ignore_shared;
    ram.multifd = a.multifd_channels.is_some();
    ram.multifd_channels = a.multifd_channels.unwrap_or(ram.multifd_channels);
    ram.multifd_compression = match a.multifd_compression {
        Compression::None => MultifdCompression::None,
        Compression::Zstd => MultifdCompression::Zstd,
    };
    ram.multifd_zstd_level = a.multifd_zstd_level;
    let session = Session::new(machine.clone(), migration_params.clone(), a.verify);
    // Dropped last, however run() ends: the last replies and events go out, and the
    // socket file goes.
    let _monitor = match &a.qmp {
        Some(q) => {
            let path = q
                .strip_prefix("unix:")
                .with_context(|| format!("--qmp takes unix:PATH, not {q:?}"))?;
            Some(MonitorGuard(monitor::Monitor::start(
                std::path::Path::new(path),
                session.clone(),
            )?))
        }
        None => None,
    };
    if a.migration_events {
        session.set_capability(vmm::qmp::Capability::Events, true);
    }
    for o in &a.objects {
        session
            .add_object(o)
            .with_context(|| format!("--object id={}", o.id()))?;
    }
    session.set_tls(|t| {
        let given = [
            (&mut t.creds, &a.tls_creds),
            (&mut t.hostname, &a.tls_hostname),
            (&mut t.authz, &a.tls_authz),
        ];
        for (param, arg) in given {
            if let Some(v) = arg {
                param.clone_from(v);
            }
        }
    });

    match &a.incoming {
        Some(Incoming::Uri(uri)) => {
            if let Err(e) = session.migrate_incoming(uri.clone()) {
                eprintln!("vmm: {e:#}");
                return Ok(1);
            }
        }
        Some(Incoming::Defer) if a.qmp.is_none() => {
            bail!("--incoming defer waits for QMP's migrate-incoming: give --qmp too")
        }
        Some(Incoming::Defer) => eprintln!("vmm: waiting for migrate-incoming over QMP"),
        None if a.paused => eprintln!("vmm: the guest is held (prelaunch) until QMP's cont"),
        None => machine.start()?,
    }

    if let Some(uri) = &a.migrate_to {
        if let Some(code) = migrate_to(a, &session, uri)? {
            return Ok(code);
        }
    }

    let mut running_since = None;
    let code = loop {
        if let Some(code) = session.wait_quit(Duration::from_millis(100)) {
            break code;
        }
        if SIGNALLED.load(Ordering::SeqCst) {
            session.request_quit(0, "host-signal");
            continue;
        }
        if matches!(a.incoming, Some(Incoming::Uri(_)))
            && running_since.is_none()
            && !session.incoming_running()
            && !session.wait_incoming()
        {
            // The stream did not load: nothing runs here (the source keeps its guest).
            break 1;
        }
        if running_since.is_none() && machine.run_state() == machine::RunState::Running {
            running_since = Some(Instant::now());
        }
        if let (Some(s), Some(t)) = (a.exit_after, running_since) {
            if t.elapsed() >= Duration::from_secs_f64(s) {
                session.request_quit(0, "host-qmp-quit");
            }
        }
    };
    // A migration still running is cancelled, an incoming one aborted (its source keeps
    // the guest); a finished one may still be logging (the verify hash): wait for the
    // threads either way.
    session.cancel();
    session.abort_incoming();
    session.wait_incoming();
    let _ = session.wait_migration();
    machine.shutdown()?;
    let (pass, mismatches) = machine.guest_status();
    if let Some(f) = machine.cpus.fault() {
        eprintln!("vmm: the guest crashed: {f}");
    }
    events.emit(
        "exit",
        json!({"reason": "quit", "pass": pass, "mismatches": mismatches, "serial_tail": machine.console.tail(),
               "fault": machine.cpus.fault()}),
    );
    Ok(code)
}

/// Closes the monitor when `run` ends.
struct MonitorGuard(Arc<monitor::Monitor>);

impl Drop for MonitorGuard {
    fn drop(&mut self) {
        // Long enough for the last replies on a loaded machine (500 ms lost a quit's
        // reply under the parallel test suite); a client that stopped reading is left
        // behind after that.
        self.0.close(Duration::from_secs(2));
    }
}

/// Whether the process was told to end (a signal, or QMP's quit).
fn ending(session: &Session) -> bool {
    SIGNALLED.load(Ordering::SeqCst) || session.wait_quit(Duration::ZERO).is_some()
}

/// `--migrate-to`: migrates once the guest shows progress. Some(exit code) when the
/// process is done (migrated); None when the guest runs on here (the migration failed or
/// was cancelled by a signal, which then ends the process in the main loop).
fn migrate_to(a: &RunArgs, session: &Arc<Session>, uri: &MigrationUri) -> Result<Option<i32>> {
    let machine = &session.machine;
    // Ready: the built-in guest's first progress letter (after "S", the end of its first
    // pass or its fill); another image's first byte.
    let ready = match machine.params {
        Some(p) if p.workload != Workload::Idle => 2,
        _ => 1,
    };
    let t = Instant::now();
    while !machine
        .console
        .wait_for_bytes(ready, Duration::from_millis(100))
    {
        if ending(session) {
            return Ok(None);
        }
        if t.elapsed() >= Duration::from_secs(60) {
            eprintln!("vmm: the guest did not report progress in 60 s; migrating anyway");
            break;
        }
    }
    session.migrate(uri.clone())?;
    let show = match a.progress {
        Progress::Always => true,
        Progress::Never => false,
        Progress::Auto => std::io::stderr().is_terminal(),
    };
    let bar = show.then(|| progress::live(session.clone()));
    // A signal cancels the migration (the guest runs on here) instead of waiting for it.
    while session.migration_running() {
        if ending(session) {
            session.cancel();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = session.wait_migration().expect("a migration was started");
    if let Some(b) = bar {
        let _ = b.join();
    }
    if let Some((info, ram, disk)) = session.progress() {
        eprint!(
            "{}",
            progress::summary(
                &uri.to_string(),
                &info,
                &ram,
                &disk,
                &session.params().migration
            )
        );
    }
    match result {
        Ok(_) => {
            let (pass, mismatches) = machine.guest_status();
            machine.events.emit(
                "exit",
                json!({"reason": "migrated", "pass": pass, "mismatches": mismatches}),
            );
            Ok(Some(0))
        }
        Err(e) => {
            eprintln!("vmm: the migration failed ({e:#}); the guest keeps running here");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
