//! `cargo xtask`: the project's automation (the cargo-xtask convention).
//!
//! - `cargo xtask ci`: what CI runs: format check, clippy with warnings as errors, the
//!   documentation without warnings, the public API against the last release, the whole
//!   test suite, the end-to-end migrations, a migration driven by qemu.qmp, and, when
//!   QEMU is installed, the interop and QMP conformance runs.
//! - `cargo xtask guest`: assembles `vmm/guest/guest.S` into the `guest.bin` vmm embeds
//!   (`--check`: only verify that the committed bytes match the source).
//! - `cargo xtask migrate-test [--quick]`: migrations between real vmm processes over every
//!   transport and workload, with and without a disk, verified, in a table.
//! - `cargo xtask bench`: ours beside QEMU on the same guest, with plots.
//! - `cargo xtask interop`: QEMU's migrations (multifd, zstd, TLS with its own
//!   tls-creds-x509) loaded by our destination, checked against QEMU's memory; QEMU's
//!   tls-authz checked against the certificate names vmm writes.
//! - `cargo xtask qmp-conformance`: one script of QMP exchanges against vmm and, when
//!   installed, QEMU 7.2, side by side; fails on a difference docs/qmp.md does not list.
//! - `cargo xtask semver`: the released crates' public API against the last release.
//! - `cargo xtask fuzz [--seconds N] [TARGET...]`: coverage-guided fuzzing of every parser
//!   of untrusted input (libFuzzer, stable toolchain).

mod bench;
mod certs;
mod check;
mod cmd;
mod e2e;
mod faults;
mod fuzz;
mod handover;
mod interop;
mod interop_postcopy;
mod interop_postcopy_to_qemu;
mod live_update;
mod memwatch;
mod migrate_test;
mod ping_pong;
mod plot;
mod qmp_conformance;
mod run;
mod semver;
mod stats;

use cmd::{build_release_vmm, build_vmm, cargo, root, run, target_dir};

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project automation: CI, end-to-end migration tests, benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format check, clippy -D warnings, cargo doc, cargo test --workspace, end to end.
    Ci,
    /// Assemble vmm/guest/guest.S into vmm/guest/guest.bin (GNU as and ld).
    Guest {
        /// Only check that guest.bin matches guest.S.
        #[arg(long)]
        check: bool,
    },
    /// Migrate between vmm processes over every transport and workload, verified.
    MigrateTest {
        /// A few representative cases (what CI runs).
        #[arg(long)]
        quick: bool,
        /// Only the cases whose name contains one of these (e.g. "fault", "tcp dirty").
        #[arg(long)]
        only: Vec<String>,
    },
    /// Our migration beside QEMU's on the same guest: a table, JSON and plots.
    Bench {
        /// Rounds per scenario and downtime limit (interleaved, ours then QEMU).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Where report.md, results.json and the plots go.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[command(flatten)]
        qemu: QemuArgs,
        /// Run ours only.
        #[arg(long)]
        no_qemu: bool,
        /// Only these scenarios (repeat, or separate with commas): idle, fill, dirty128,
        /// dirty256, converge, postcopy, postcopy-preempt, converge512, fill-2g, fill-4g, fill-8g, fill-mfd2,
        /// fill-tls, fill-tls-mfd2, fill-mfd4, fill-zstd, fill-1g, fill-1g-zstd.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The vmm binary to measure (default: this workspace's release build), e.g. an
        /// older build for an A/B run.
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// An extra argument for both of our vmm processes, for A/B runs (e.g.
        /// --vmm-arg=--dirty-log-protect=classic); repeatable.
        #[arg(long, allow_hyphen_values = true)]
        vmm_arg: Vec<String>,
        /// An extra argument for QEMU's destination; repeatable.
        #[arg(long, allow_hyphen_values = true)]
        qemu_dst_arg: Vec<String>,
        /// Start QEMU's destination without -mem-prealloc, so it allocates its RAM as
        /// the stream arrives (QEMU's own default; the bench's before 2026-12-07, see
        /// README "Like with like"). By default it allocates first, as ours does; with
        /// --vmm-arg=--no-prealloc neither does.
        #[arg(long)]
        qemu_dst_lazy: bool,
        /// An earlier results.json (e.g. docs/perf/results.json, where the README's
        /// figures come from): run its scenarios and say which of its figures fall
        /// outside this run's intervals.
        #[arg(long)]
        check: Option<PathBuf>,
    },
    /// Live update on one host: memfd RAM handed over (x-ignore-shared over a unix
    /// socket) against a normal migration of the same guest, per guest size.
    LiveUpdate {
        /// Guest sizes in GiB (the source allocates all of it).
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4, 16])]
        sizes: Vec<u64>,
        /// Rounds per size (hand-over and copy alternating).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Where the table goes.
        #[arg(long, default_value = "target/bench/live-update.md")]
        out: PathBuf,
    },
    /// QEMU's migrations (multifd plain and zstd; TLS with 0 and 2 channels; post-copy)
    /// loaded by our destination, checked page by page against QEMU's memory, and QEMU's
    /// TLS destination's authz against the names vmm writes. Needs qemu-system-x86_64.
    Interop {
        #[command(flatten)]
        qemu: QemuArgs,
        /// Only the runs whose name contains this (e.g. `postcopy-to-qemu`, `preempt`,
        /// `tls`); `--only list` prints the names.
        #[arg(long)]
        only: Option<String>,
        /// Runs each chosen case this many times (a flaky case, repeated).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// One script of QMP exchanges against two vmm processes and, when installed, two
    /// QEMU 7.2 processes: reply shapes and events side by side; fails on a difference
    /// docs/qmp.md does not list.
    QmpConformance {
        #[command(flatten)]
        qemu: QemuArgs,
        /// Run vmm's side only.
        #[arg(long)]
        no_qemu: bool,
    },
    /// Coverage-guided fuzzing (libFuzzer) of every parser of untrusted input.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (stream, tls, ram, block, analyze, multifd, qmp, uri); all by default.
        targets: Vec<String>,
    },
    /// The released crates' public API against the last release (cargo-semver-checks;
    /// the release is [workspace.metadata.release] in Cargo.toml).
    Semver,
}

/// Which QEMU to run beside vmm.
#[derive(clap::Args)]
struct QemuArgs {
    /// The QEMU binary (default: qemu-system-x86_64 from the PATH, if installed).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Install QEMU with apt-get if it is missing.
    #[arg(long)]
    install_qemu: bool,
}

impl QemuArgs {
    /// The QEMU to use, or None (with a note) if there is none.
    fn find(self) -> Result<Option<PathBuf>> {
        find_qemu(self.qemu, self.install_qemu)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Ci => ci(),
        Cmd::Guest { check } => guest(check),
        Cmd::Semver => semver::check(),
        Cmd::Fuzz { seconds, targets } => fuzz::run_fuzz(seconds.max(1), &targets),
        Cmd::MigrateTest { quick, only } => migrate_test::run(build_vmm()?, quick, &only),
        Cmd::QmpConformance { qemu, no_qemu } => {
            let qemu = if no_qemu { None } else { qemu.find()? };
            qmp_conformance::run(build_vmm()?, qemu, &root().join("docs/qmp.md"))
        }
        Cmd::LiveUpdate { sizes, rounds, out } => {
            let out = if out.is_absolute() {
                out
            } else {
                root().join(out)
            };
            live_update::run(build_release_vmm()?, &sizes, rounds.max(1), &out)
        }
        Cmd::Interop { qemu, only, rounds } => {
            let Some(qemu) = qemu.find()? else {
                bail!("interop needs qemu-system-x86_64 (--install-qemu installs it)");
            };
            interop_all(&qemu, &build_release_vmm()?, only.as_deref(), rounds)
        }
        Cmd::Bench {
            rounds,
            out,
            qemu,
            no_qemu,
            only,
            vmm,
            vmm_arg,
            mut qemu_dst_arg,
            qemu_dst_lazy,
            check,
        } => {
            // Like with like: ours allocates guest RAM before it listens unless told
            // otherwise (--vmm-arg=--no-prealloc), and so does QEMU's destination.
            let lazy = qemu_dst_lazy || vmm_arg.iter().any(|a| a == "--no-prealloc");
            if !lazy && !qemu_dst_arg.iter().any(|a| a == "-mem-prealloc") {
                qemu_dst_arg.insert(0, "-mem-prealloc".into());
            }
            let qemu = if no_qemu { None } else { qemu.find()? };
            let vmm = match vmm {
                Some(v) => v,
                None => build_release_vmm()?,
            };
            let out = if out.is_absolute() {
                out
            } else {
                root().join(out)
            };
            bench::run(
                vmm,
                &bench::Options {
                    rounds: rounds.max(1),
                    out,
                    qemu,
                    only,
                    vmm_args: vmm_arg,
                    qemu_dst_args: qemu_dst_arg,
                    check: check.map(|c| if c.is_absolute() { c } else { root().join(c) }),
                },
            )
        }
    }
}

/// The QEMU to compare with: the given one, the one on the PATH, or (with `install`) the
/// one apt-get installs; None with a note when there is none.
fn find_qemu(given: Option<PathBuf>, install: bool) -> Result<Option<PathBuf>> {
    if given.is_some() {
        return Ok(given);
    }
    let found = || {
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !found() && install {
        let mut apt = Command::new("apt-get");
        apt.args(["install", "-y", "qemu-system-x86"]);
        run("apt-get install -y qemu-system-x86", apt)?;
    }
    if found() {
        Ok(Some(PathBuf::from("qemu-system-x86_64")))
    } else {
        eprintln!(
            "==> NOTE: qemu-system-x86_64 is not installed: measuring ours only \
             (--install-qemu installs it with apt-get)"
        );
        Ok(None)
    }
}

fn ci() -> Result<()> {
    let t = std::time::Instant::now();
    note_free_disk();
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run("cargo fmt --check", fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    run("cargo clippy -D warnings", clippy)?;
    // The crates' documentation is their front page for other VMMs: no broken link.
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps", "--quiet"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run("cargo doc (warnings denied)", doc)?;
    semver::ci_step()?;
    if Command::new("as").arg("--version").output().is_ok() {
        guest(true)?;
    } else {
        eprintln!("==> SKIPPED the guest.bin check: GNU as is not installed");
    }
    let mut test = cargo();
    test.args(["test", "--workspace", "--all-features"])
        .env("INSTA_UPDATE", "no");
    run("cargo test --workspace", test)?;
    // ram-list without its C dependency (zstd), as a VMM that does not want it builds it.
    let mut bare = cargo();
    bare.args(["test", "-p", "ram-list", "--no-default-features", "--lib"]);
    run("cargo test -p ram-list --no-default-features", bare)?;
    // The examples a VMM team would start from: built by the tests, run here.
    for example in ["snapshot", "live_migration", "tcp_migration"] {
        let mut ex = cargo();
        ex.args(["run", "--quiet", "-p", "ram-list", "--example", example]);
        run(&format!("example {example}"), ex)?;
    }
    outside_vmm()?;
    eprintln!("==> cargo xtask migrate-test --quick");
    let vmm = build_vmm()?;
    migrate_test::run(vmm.clone(), true, &[])?;
    qemu_qmp(&vmm)?;
    let qemu = find_qemu(None, false)?;
    if let Some(q) = &qemu {
        eprintln!("==> cargo xtask interop");
        note_free_disk();
        interop_all(q, &vmm, None, 1)?;
    }
    eprintln!("==> cargo xtask qmp-conformance");
    qmp_conformance::run(vmm, qemu, &root().join("docs/qmp.md"))?;
    eprintln!("==> ci passed in {:.0?}", t.elapsed());
    Ok(())
}

/// The VMM outside the workspace (examples/outside-vmm, its own workspace and lock
/// file): formatted, free of clippy warnings, and run, as its users would build it.
fn outside_vmm() -> Result<()> {
    let manifest = root().join("examples/outside-vmm/Cargo.toml");
    let target = target_dir().join("outside-vmm");
    let mut fmt = cargo();
    fmt.args(["fmt", "--manifest-path"])
        .arg(&manifest)
        .args(["--", "--check"]);
    run("outside-vmm: cargo fmt --check", fmt)?;
    let mut clippy = cargo();
    clippy
        .args(["clippy", "--quiet", "--manifest-path"])
        .arg(&manifest);
    clippy
        .args(["--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", &target);
    run("outside-vmm: cargo clippy -D warnings", clippy)?;
    let mut example = cargo();
    example
        .args(["run", "--quiet", "--manifest-path"])
        .arg(&manifest);
    example.env("CARGO_TARGET_DIR", &target);
    run(
        "outside-vmm: snapshot, migration between threads, over TCP",
        example,
    )
}

/// Every interop run with QEMU 7.2: its multifd source (plain, zstd) and its TLS source
/// (0 and 2 channels) into our destination, its TLS destination's authz against the
/// names vmm writes, its post-copy source into our post-copy destination, and our
/// post-copy source into its post-copy destination, each with and without
/// `postcopy-preempt`, in the clear and over TLS. `vmm` writes the guest's disk image.
fn interop_all(qemu: &Path, vmm: &Path, only: Option<&str>, rounds: usize) -> Result<()> {
    vmm_harness::set_vmm(vmm);
    let work = std::env::temp_dir().join(format!("vmm-interop-{}", std::process::id()));
    let all = || -> Result<()> {
        let pki = certs::make(&work.join("pki"))?;
        let (work, pki) = (work.as_path(), &pki);
        type Case<'a> = (String, Box<dyn Fn() -> Result<()> + 'a>);
        let mut cases: Vec<Case<'_>> = Vec::new();
        for (channels, zstd, tls) in [
            (2, false, None),
            (3, true, None),
            (0, false, Some(pki)),
            (2, false, Some(pki)),
        ] {
            let name = format!(
                "multifd-{channels}{}{}",
                if zstd { "-zstd" } else { "" },
                if tls.is_some() { "-tls" } else { "" }
            );
            let run = move || interop::run(qemu, work, channels, zstd, tls);
            cases.push((name, Box::new(run)));
        }
        let authz = || interop::authz_names_match_qemus(qemu, work, pki);
        cases.push(("tls-authz-names".into(), Box::new(authz)));
        for tls in [None, Some(pki)] {
            for preempt in [false, true] {
                let tail = format!(
                    "{}{}",
                    if preempt { "-preempt" } else { "" },
                    if tls.is_some() { "-tls" } else { "" }
                );
                let from = move || interop_postcopy::run(qemu, work, tls, preempt);
                cases.push((format!("postcopy-from-qemu{tail}"), Box::new(from)));
                let to = move || interop_postcopy_to_qemu::run(qemu, work, tls, preempt);
                cases.push((format!("postcopy-to-qemu{tail}"), Box::new(to)));
            }
        }
        if only == Some("list") {
            cases.iter().for_each(|(name, _)| println!("{name}"));
            return Ok(());
        }
        cases.retain(|(name, _)| only.is_none_or(|o| name.contains(o)));
        if cases.is_empty() {
            bail!("no interop run is named like {only:?} (`--only list` names them)");
        }
        for round in 1..=rounds {
            for (name, run) in &cases {
                if rounds > 1 {
                    eprintln!("interop: round {round}/{rounds}: {name}");
                }
                run().with_context(|| format!("interop run {name}"))?;
            }
        }
        Ok(())
    };
    let done = all();
    let _ = std::fs::remove_dir_all(&work);
    done
}

/// Prints the free space where the build and the tests write (a full disk shows up
/// as odd failures far from its cause: QEMU's `pmemsave` said only "An IO error").
fn note_free_disk() {
    for dir in [target_dir(), std::env::temp_dir()] {
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a live struct, both outliving it.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            let free = st.f_bavail as f64 * st.f_frsize as f64 / f64::from(1u32 << 30);
            eprintln!("==> {:.1} GiB free under {}", free, dir.display());
        }
    }
}

/// A migration driven by QEMU's own Python QMP client (xtask/qmp/qemu_qmp_migration.py),
/// with the interpreter `VMM_QMP_PYTHON` names (.ci/run makes a virtual environment with
/// qemu.qmp) or, failing that, `python3` if it has qemu.qmp. Under CI it must run.
fn qemu_qmp(vmm: &Path) -> Result<()> {
    let python = std::env::var("VMM_QMP_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        if std::env::var_os("CI").is_some() {
            bail!("{python} has no qemu.qmp: .ci/run installs it into a virtual environment");
        }
        eprintln!(
            "==> SKIPPED the qemu.qmp migration: {python} has no qemu.qmp (pip install qemu.qmp, \
             or set VMM_QMP_PYTHON)"
        );
        return Ok(());
    }
    let mut c = Command::new(&python);
    c.arg(root().join("xtask/qmp/qemu_qmp_migration.py"))
        .arg(vmm);
    run("a migration driven by qemu.qmp", c)
}

/// Assembles the built-in guest with binutils (on every Debian machine with gcc).
fn guest(check: bool) -> Result<()> {
    let dir = root().join("vmm/guest");
    let tmp = std::env::temp_dir().join(format!("xtask-guest-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let obj = tmp.join("guest.o");
    let bin = tmp.join("guest.bin");
    let mut asm = Command::new("as");
    asm.args(["--64", "-o"]).arg(&obj).arg(dir.join("guest.S"));
    run("as guest.S", asm)?;
    let mut ld = Command::new("ld");
    ld.args([
        "-m",
        "elf_x86_64",
        "-Ttext=0x7c00",
        "--oformat",
        "binary",
        "-e",
        "start",
        "-o",
    ])
    .arg(&bin)
    .arg(&obj);
    run("ld guest.o", ld)?;
    let new = std::fs::read(&bin)?;
    std::fs::remove_dir_all(&tmp)?;
    if new.len() % 512 != 0 || new.len() < 512 || new[510..512] != [0x55, 0xaa] {
        bail!(
            "the guest must assemble to whole sectors starting with a boot sector; got {} bytes",
            new.len()
        );
    }
    let path = dir.join("guest.bin");
    let old = std::fs::read(&path).unwrap_or_default();
    if check {
        if old != new {
            bail!("vmm/guest/guest.bin does not match guest.S: run `cargo xtask guest`");
        }
        eprintln!("==> guest.bin matches guest.S");
    } else if old != new {
        std::fs::write(&path, &new)?;
        eprintln!("==> wrote {}", path.display());
    } else {
        eprintln!("==> guest.bin is up to date");
    }
    Ok(())
}
