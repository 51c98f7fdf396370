//! `cargo xtask fuzz`: builds the libFuzzer runner (xtask/fuzz/libfuzzer) with coverage
//! instrumentation on the stable toolchain, seeds each target's corpus with its golden
//! inputs, runs every target for a while and reports executions, coverage growth and
//! crashes. A crashing input is copied to `xtask/fuzz/regressions/<target>/`, where
//! `cargo test` replays it from then on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, root, run};

/// SanitizerCoverage as cargo-fuzz sets it up, minus the sanitizer (which needs nightly):
/// libFuzzer gets edge counters, PC tables and comparison operands.
const COVERAGE_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
];

/// What one target's run gave.
struct Outcome {
    name: &'static str,
    seconds: f64,
    execs: u64,
    new_units: u64,
    corpus: usize,
    crash: Option<PathBuf>,
}

/// Runs `targets` (all when empty) for `seconds` each.
pub fn run_fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let selected: Vec<&fuzz_targets::Target> = if targets.is_empty() {
        fuzz_targets::TARGETS.iter().collect()
    } else {
        targets
            .iter()
            .map(|n| {
                fuzz_targets::target(n).with_context(|| {
                    let all: Vec<_> = fuzz_targets::TARGETS.iter().map(|t| t.name).collect();
                    format!("no fuzz target {n:?} (targets: {})", all.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let runner = build_runner()?;
    let base = root().join("target/fuzz");
    let mut outcomes = Vec::new();
    for t in selected {
        eprintln!("==> fuzz {} for {seconds} s: {}", t.name, t.about);
        outcomes.push(fuzz_one(&runner, &base, t, seconds)?);
    }
    println!();
    println!("| target | seconds | executions | exec/s | new coverage units | corpus | crash |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for o in &outcomes {
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} |",
            o.name,
            o.seconds,
            o.execs,
            o.execs as f64 / o.seconds.max(0.001),
            o.new_units,
            o.corpus,
            o.crash
                .as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        );
    }
    let crashed: Vec<_> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} target(s) crashed; the inputs are in xtask/fuzz/regressions/ (cargo test replays them)",
            crashed.len()
        );
    }
    Ok(())
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")
}

fn build_runner() -> Result<PathBuf> {
    let triple = host_triple()?;
    let mut c = cargo();
    // An explicit --target keeps the instrumentation off build scripts and proc macros.
    c.args(["build", "--release", "--manifest-path"])
        .arg(root().join("xtask/fuzz/libfuzzer/Cargo.toml"))
        .args(["--target", &triple, "--target-dir"])
        .arg(root().join("target/fuzz"))
        .env("RUSTFLAGS", COVERAGE_FLAGS.join(" "));
    run("build the instrumented fuzz runner", c)?;
    Ok(root().join(format!("target/fuzz/{triple}/release/fuzz")))
}

fn fuzz_one(
    runner: &Path,
    base: &Path,
    t: &'static fuzz_targets::Target,
    seconds: u64,
) -> Result<Outcome> {
    let corpus = base.join("corpus").join(t.name);
    let artifacts = base.join("artifacts").join(t.name);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    for (i, s) in (t.seeds)().iter().enumerate() {
        std::fs::write(corpus.join(format!("seed-{i}")), s)?;
    }
    let started = Instant::now();
    let out = Command::new(runner)
        .env("FUZZ_TARGET", t.name)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-rss_limit_mb=1024")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .output()
        .with_context(|| format!("running {}", runner.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stat = |key: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let crash = if out.status.success() {
        None
    } else {
        let written = stderr
            .lines()
            .find_map(|l| l.split("Test unit written to ").nth(1))
            .map(|p| PathBuf::from(p.trim()));
        let Some(artifact) = written else {
            let tail: Vec<_> = stderr.lines().rev().take(30).collect();
            bail!(
                "the {} runner failed without an artifact ({}):\n{}",
                t.name,
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        };
        let keep = root().join("xtask/fuzz/regressions").join(t.name);
        std::fs::create_dir_all(&keep)?;
        let name = artifact
            .file_name()
            .map_or_else(|| "crash".into(), |n| n.to_os_string());
        std::fs::copy(&artifact, keep.join(&name))?;
        let report: Vec<_> = stderr
            .lines()
            .skip_while(|l| !l.contains("panicked") && !l.contains("==ERROR"))
            .take(20)
            .collect();
        eprintln!("{}", report.join("\n"));
        Some(keep.join(name))
    };
    Ok(Outcome {
        name: t.name,
        seconds: started.elapsed().as_secs_f64(),
        execs: stat("stat::number_of_executed_units:").unwrap_or(0),
        new_units: stat("stat::new_units_added:").unwrap_or(0),
        corpus: std::fs::read_dir(&corpus).map_or(0, |d| d.count()),
        crash,
    })
}
