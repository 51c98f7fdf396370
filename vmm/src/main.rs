//! vmm: a small KVM VMM that live-migrates its running guest to another vmm process.
//!
//! `vmm` alone runs the demo; `vmm run` runs a VM (a source, or a destination with
//! `--incoming`); `vmm analyze FILE` prints a migration stream as text.

mod bus;
mod cli;
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use qemu_file::MigrationUri;
use ram_list::MultifdCompression;
use serde_json::json;
use vmm::settings::Settings;

use crate::cli::{Cli, Command, Compression, ImageArgs, Incoming, Progress, RunArgs};
use crate::events::EventLog;
use crate::guest::{GuestParams, Workload};
use crate::machine::{Machine, MachineConfig};
use crate::session::Session;

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
    p.postcopy = a.postcopy;
    p.postcopy_auto = a.x_postcopy_auto;
    p.postcopy_preempt = a.postcopy_preempt;
    p.max_postcopy_bandwidth = a.max_postcopy_bandwidth;
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
            && !migration::postcopy_paused(&machine)
        {
            // The stream did not load: nothing runs here (the source keeps its guest).
            break 1;
        }
        // Counted once the guest runs here for good (a post-copy destination runs it
        // before its load has ended).
        if running_since.is_none()
            && machine.run_state() == machine::RunState::Running
            && !session.incoming_running()
        {
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
    if migration::postcopy_paused(&machine) {
        // Post-copy was interrupted: the vCPUs wait in the kernel for pages that did not
        // come, and no pause reaches them there. They end with the process (its exit
        // wakes them), not one by one; nothing of the guest is read.
        events.emit(
            "exit",
            json!({"reason": "quit", "postcopy_paused": true, "serial_tail": machine.console.tail()}),
        );
        eprintln!(
            "vmm: the guest waited for pages of an interrupted post-copy; it ends with this process"
        );
        drop(_monitor);
        std::process::exit(code);
    }
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
