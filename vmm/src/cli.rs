//! vmm's command line: `vmm` (the demo), `vmm run`, `vmm image`, `vmm analyze`, and how
//! their values parse.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use qemu_file::MigrationUri;

use crate::guest::Workload;
use crate::machine::Accel;
use crate::memory::MemoryBackend;
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
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    Demo(crate::demo::DemoArgs),
    /// Write the built-in guest, with its parameters, as a raw disk image that QEMU boots
    /// too (for side-by-side runs).
    Image(ImageArgs),
}

#[derive(Args, Clone, Debug)]
pub(crate) struct ImageArgs {
    /// The workload.
    #[arg(long, value_enum, default_value_t = Workload::Dirty)]
    pub(crate) workload: Workload,
    /// Start of the workload's memory range.
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub(crate) range_start: u64,
    /// Size of the workload's memory range.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub(crate) range_size: u64,
    /// Pages per second (dirty); 0: as fast as the guest can.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u32,
    /// The guest TSC frequency in kHz for pacing; "auto" asks KVM.
    #[arg(long, default_value = "auto")]
    pub(crate) tsc_khz: String,
    /// Pad the image to this size (QEMU's q35 needs at least one 16x63 cylinder).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub(crate) pad: u64,
    /// The image file to write.
    #[arg(short, long)]
    pub(crate) output: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub(crate) struct RunArgs {
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
    #[arg(long, value_enum, default_value_t = crate::kvm::DirtyProtect::Auto)]
    pub dirty_log_protect: crate::kvm::DirtyProtect,
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
    /// postcopy-ram: the migration may switch to post-copy (QMP migrate-start-postcopy,
    /// or --x-postcopy-auto): the guest then runs at the destination at once and the
    /// pages it lacks follow on demand. Set it on both sides.
    #[arg(long)]
    pub postcopy: bool,
    /// x-postcopy-auto: switch to post-copy by itself where pre-copy would throttle the
    /// guest or give up.
    #[arg(long, requires = "postcopy")]
    pub x_postcopy_auto: bool,
    /// postcopy-preempt: once post-copy runs, the pages the destination asks for go on
    /// a second connection of their own (opened with the main stream), never behind the
    /// background pass. Set it on both sides; not with multifd.
    #[arg(long, requires = "postcopy", conflicts_with = "multifd_channels")]
    pub postcopy_preempt: bool,
    /// max-postcopy-bandwidth in bytes per second (K, M, G suffixes): paces post-copy's
    /// background pass; requested pages go at once. 0 is unlimited.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub max_postcopy_bandwidth: u64,
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
pub(crate) enum Compression {
    /// Pages as they are.
    None,
    /// zstd, one stream per channel.
    Zstd,
}

/// When to draw the progress line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Progress {
    /// When stderr is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// `--incoming`: a URI, or `defer` (QEMU's: the address comes later over QMP).
#[derive(Debug, Clone)]
pub(crate) enum Incoming {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
