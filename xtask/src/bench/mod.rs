//! `cargo xtask bench`: our migration beside QEMU's on the same guest, on the same
//! machine, in the same run, and beside the machine's physical limits.
//!
//! For a 1 GiB guest: idle; fill 1 GiB; dirty 128 MiB as fast as the guest can; dirty
//! 256 MiB at 50,000 pages/s; each at downtime-limit 300 ms and 30 ms, bandwidth
//! unlimited, over tcp 127.0.0.1. Rounds interleave ours and QEMU's. Both are driven the
//! same way over QMP, migrate once the guest printed its first progress letter, and are
//! sampled every 50 ms for the curves. Real downtime is the destination's resume minus the
//! source's stop, from wall-clock timestamps both sides log (our event logs; QEMU's STOP
//! and RESUME events). References measured in the same run: memcpy of 1 GiB and a plain
//! loopback TCP copy of 1 GiB. Both destinations allocate their guest RAM before the
//! stream arrives (ours by default, QEMU's with `-mem-prealloc`, unless told otherwise):
//! the host's zeroing of fresh memory would otherwise be what is measured.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::run::Run;
use drivers::{ours, qemu};
use references::{Beside, References};
use report::describe;
use scenarios::{SCENARIOS, Scenario};

mod drivers;
mod postcopy;
mod references;
mod report;
mod scenarios;

pub(crate) use drivers::{Qemu, guest_image, qemu_start};

/// Options of the bench.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds per scenario and limit.
    pub rounds: usize,
    /// Where the report goes.
    pub out: PathBuf,
    /// The QEMU binary, if any.
    pub qemu: Option<PathBuf>,
    /// Only these scenarios (slugs); all if empty.
    pub only: Vec<String>,
    /// Extra arguments for our vmm processes.
    pub vmm_args: Vec<String>,
    /// Extra arguments for QEMU's destination.
    pub qemu_dst_args: Vec<String>,
    /// An earlier results.json whose figures this run checks (and whose scenarios it
    /// runs, unless `only` names others).
    pub check: Option<PathBuf>,
}

/// Runs the bench and writes report.md, results.json and the plots into `opts.out`.
///
/// # Errors
/// The output cannot be written, or vmm cannot be run.
pub fn run(vmm: PathBuf, opts: &Options) -> Result<()> {
    let old: Option<Value> = match &opts.check {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a bench's results.json", p.display()))?,
        ),
        None => None,
    };
    let mut opts = opts.clone();
    if let (Some(old), true) = (&old, opts.only.is_empty()) {
        opts.only = crate::check::scenarios(old);
    }
    let opts = &opts;
    if let Some(o) = opts
        .only
        .iter()
        .find(|o| !SCENARIOS.iter().any(|s| s.slug == o.as_str()))
    {
        let known: Vec<&str> = SCENARIOS.iter().map(|s| s.slug).collect();
        anyhow::bail!("no scenario {o:?}; there are: {}", known.join(", "));
    }
    vmm_harness::set_vmm(&vmm);
    std::fs::create_dir_all(&opts.out)?;
    let work = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let pki = crate::certs::make(&work.join("pki"))?;
    let tsc_khz = {
        let out = Command::new(&vmm)
            .args(["image", "-o"])
            .arg(work.join("probe.img"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split("TSC ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let qemu_version = opts.qemu.as_ref().and_then(|q| {
        Command::new(q).arg("--version").output().ok().map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
    });
    // Extra destination arguments change what is compared: the report says so.
    let qemu_version = qemu_version.map(|v| match opts.qemu_dst_args.is_empty() {
        true => v,
        false => format!("{v}, destination with {}", opts.qemu_dst_args.join(" ")),
    });
    eprintln!(
        "bench: {} rounds, QEMU: {}",
        opts.rounds,
        qemu_version
            .as_deref()
            .unwrap_or("not installed (ours only)")
    );
    eprintln!("bench: references: memcpy and loopback TCP of 1 GiB");
    let before = References::measure()?;
    eprintln!(
        "bench: memcpy {:.2} GB/s, loopback TCP {:.2} GB/s; between 1 GiB buffers, by \
         connections: {}",
        before.memcpy / 1e9,
        before.tcp / 1e9,
        before.streams_text()
    );

    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.iter().any(|o| o == s.slug))
        .collect();
    let mut runs: Vec<Run> = Vec::new();
    // The timed rounds, then one memory round per scenario (sampling /proc/PID/smaps
    // costs CPU, so those runs' times are not reported).
    let mut plan: Vec<(&Scenario, u64, usize, bool)> = Vec::new();
    for s in &scenarios {
        for &limit in s.limits {
            plan.extend((0..opts.rounds).map(|round| (*s, limit, round, false)));
        }
    }
    plan.extend(
        scenarios
            .iter()
            .map(|s| (*s, s.limits[0], opts.rounds, true)),
    );
    let mut mem_runs: Vec<Run> = Vec::new();
    for (s, limit, round, watch) in plan {
        let dir = work.join(format!("{}-{limit}-{round}", s.slug));
        std::fs::create_dir_all(&dir)?;
        // A run that breaks (a process gone, a QMP error) is a failed run; the bench
        // goes on.
        let guarded = |side: &'static str, f: &dyn Fn() -> Run| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
                let mut r = Run::new(side, s.slug, limit, round);
                r.error = Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|m| m.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                );
                r
            })
        };
        let into = if watch { &mut mem_runs } else { &mut runs };
        let what = if watch { "memory" } else { "limit" };
        // Each side's throughput round is followed by the loopback copies it is
        // compared with.
        let beside = |r: &mut Run| {
            if !watch && s.is_throughput() {
                r.loopback = Beside::measure(usize::from(s.multifd.max(1)))
                    .map_err(|e| eprintln!("bench: no loopback reference for this round: {e:#}"))
                    .ok()
                    .map(|b| (b.tcp, b.buffers, b.connections));
            }
        };
        let mut r = guarded("ours", &|| {
            ours(s, limit, round, &dir, watch, &opts.vmm_args, &pki)
        });
        beside(&mut r);
        eprintln!("  ours {:<28} {what} {limit:>3}: {}", s.name, describe(&r));
        into.push(r);
        if let Some(q) = &opts.qemu {
            let mut r = guarded("qemu", &|| {
                qemu(
                    q,
                    s,
                    (limit, round),
                    &dir,
                    tsc_khz,
                    watch,
                    &pki,
                    &opts.qemu_dst_args,
                )
            });
            beside(&mut r);
            eprintln!("  qemu {:<28} {what} {limit:>3}: {}", s.name, describe(&r));
            into.push(r);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&work);
    // The references again: a machine that changed under the run shows here.
    let after = References::measure()?;
    eprintln!(
        "bench: after the scenarios, memcpy {:.2} GB/s, loopback TCP {:.2} GB/s",
        after.memcpy / 1e9,
        after.tcp / 1e9
    );

    report::write(report::Measured {
        rounds: opts.rounds,
        out: &opts.out,
        check: old.zip(opts.check.as_deref()),
        scenarios,
        runs,
        mem_runs,
        before,
        after,
        qemu_version,
    })?;
    eprintln!("bench: wrote {}", opts.out.display());
    Ok(())
}
