//! `cargo xtask live-update`: moving a guest between two vmm processes on one host with
//! its memfd RAM handed over (x-ignore-shared over a unix socket), against a normal
//! migration of the same guest over the same socket, for several guest sizes.
//!
//! Every page of the source's memfd is allocated before the migration (`--mem-prealloc`),
//! so a hand-over moves a guest whose memory is all there. The guest rewrites 256 MiB at
//! 20k pages/s and checks each page against the pass before: `mismatches` must stay 0.
//! Rounds alternate hand-over and copy, so both meet the same machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vmm_harness::{Qmp, Vmm};

use crate::stats::{median, range, ratio_interval};

/// One migration: real downtime (source stopped → destination running), total time,
/// stream bytes.
#[derive(Debug, Clone, Copy)]
struct Sample {
    downtime_ms: f64,
    total_ms: f64,
    bytes: u64,
}

const GUEST: &[&str] = &[
    "--memory-backend",
    "memfd",
    "--workload",
    "dirty",
    "--range-size",
    "256M",
    "--rate",
    "20000",
];

/// Runs `rounds` rounds for each size in GiB; writes the report to `out` and prints it.
pub fn run(vmm: PathBuf, sizes: &[u64], rounds: usize, out: &Path) -> Result<()> {
    vmm_harness::set_vmm(&vmm);
    let work = std::env::temp_dir().join(format!("vmm-live-update-{}", std::process::id()));
    let mut report = String::from(
        "| guest | hand-over: real downtime ms | total ms | stream | copy: real downtime ms | total ms | stream | total, copy / hand-over |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for &gib in sizes {
        let (mut handed, mut copied) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for hand_over in [true, false] {
                let dir = work.join(format!("{gib}g-{round}-{hand_over}"));
                std::fs::create_dir_all(&dir)?;
                let s = migrate(&dir, gib, hand_over)
                    .with_context(|| format!("{gib} GiB, round {round}, hand-over {hand_over}"))?;
                eprintln!(
                    "  {gib} GiB {}: real downtime {:.2} ms, total {:.1} ms, {} bytes",
                    if hand_over { "hand-over" } else { "copy" },
                    s.downtime_ms,
                    s.total_ms,
                    s.bytes
                );
                if hand_over { &mut handed } else { &mut copied }.push(s);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let col = |v: &[Sample], f: fn(&Sample) -> f64| -> Vec<f64> { v.iter().map(f).collect() };
        let cell = |v: Vec<f64>| -> String {
            match (median(&v), range(&v)) {
                (Some(m), Some((lo, hi))) => format!("{m:.2} ({lo:.2}–{hi:.2})"),
                _ => "–".into(),
            }
        };
        let bytes = |v: &[Sample]| human(median(&col(v, |s| s.bytes as f64)).unwrap_or(0.0));
        let ratio = match (
            median(&col(&copied, |s| s.total_ms)),
            median(&col(&handed, |s| s.total_ms)),
            ratio_interval(&col(&copied, |s| s.total_ms), &col(&handed, |s| s.total_ms)),
        ) {
            (Some(a), Some(b), Some((lo, hi))) => format!("{:.0}× ({lo:.0}–{hi:.0})", a / b),
            _ => "–".into(),
        };
        writeln!(
            report,
            "| {gib} GiB | {} | {} | {} | {} | {} | {} | {ratio} |",
            cell(col(&handed, |s| s.downtime_ms)),
            cell(col(&handed, |s| s.total_ms)),
            bytes(&handed),
            cell(col(&copied, |s| s.downtime_ms)),
            cell(col(&copied, |s| s.total_ms)),
            bytes(&copied),
        )?;
    }
    let _ = std::fs::remove_dir_all(&work);
    let text = format!(
        "Live update on one host: {rounds} rounds per size, hand-over and copy alternating; \
         median (min–max); the ratio's 90% bootstrap interval in brackets.\n\n{report}"
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, &text)?;
    println!("{text}");
    println!("written to {}", out.display());
    Ok(())
}

/// One migration of a `gib` GiB guest between two fresh processes.
fn migrate(dir: &Path, gib: u64, hand_over: bool) -> Result<Sample> {
    let mem = format!("{gib}G");
    let sock = format!("unix:{}", dir.join("m.sock").display());
    let qmp = dir.join("src.qmp");
    let qarg = format!("unix:{}", qmp.display());
    let mut guest = vec!["--memory", mem.as_str()];
    guest.extend_from_slice(GUEST);
    let capability: &[&str] = if hand_over {
        &["--x-ignore-shared"]
    } else {
        &[]
    };
    let mut dst = Vmm::start(
        dir,
        "dst",
        &[
            &guest[..],
            capability,
            &["--incoming", sock.as_str(), "--exit-after", "0.5"],
        ]
        .concat(),
    );
    dst.listening_uri();
    let mut src = Vmm::start(
        dir,
        "src",
        &[&guest[..], &["--mem-prealloc", "--qmp", qarg.as_str()]].concat(),
    );
    // The source allocates all of the guest's memory before it opens its monitor: on
    // hosts that back fresh memory slowly, 16 GiB took over 30 s (2026-12-07).
    let allocating = Duration::from_secs(60 + 15 * gib);
    let mut q = Qmp::connect_within(&qmp, allocating).with_context(|| {
        format!(
            "the {gib} GiB source's monitor did not open within {} s: {}",
            allocating.as_secs(),
            src.stderr()
        )
    })?;
    q.wait_guest_pass(2);
    if hand_over {
        q.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        );
    }
    q.cmd("migrate", json!({"uri": sock}));
    let m = wait_end(&mut q)?;
    let _ = q.try_cmd("quit", json!({}));
    let _ = src.wait();
    let ok = dst.wait().success();
    if m["status"] != "completed" || !ok {
        bail!(
            "the migration did not complete: {m}; destination: {}",
            dst.stderr()
        );
    }
    let exit = dst
        .event("exit")
        .context("no exit event at the destination")?;
    if exit["mismatches"] != 0 {
        bail!("the guest found stale pages at the destination: {exit}");
    }
    let sw = src.event("switchover").context("no switchover event")?;
    let stop = sw["stopped_at_us"].as_u64().context("stopped_at_us")?;
    let resumed = dst
        .event("incoming-resumed")
        .and_then(|e| e["resumed_at_us"].as_u64())
        .context("no incoming-resumed event")?;
    Ok(Sample {
        downtime_ms: (resumed as f64 - stop as f64) / 1e3,
        total_ms: sw["total_time_ms"].as_f64().unwrap_or(0.0),
        bytes: sw["transferred"].as_u64().unwrap_or(0),
    })
}

fn wait_end(q: &mut Qmp) -> Result<Value> {
    let t = std::time::Instant::now();
    loop {
        let m = q.cmd("query-migrate", json!({}));
        if matches!(
            m["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return Ok(m);
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("no end in 300 s: {m}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn human(bytes: f64) -> String {
    match bytes {
        b if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        b if b >= (1 << 20) as f64 => format!("{:.0} MiB", b / (1 << 20) as f64),
        b => format!("{:.0} KiB", b / 1024.0),
    }
}
