//! The built-in demo (`vmm` with no arguments): a destination and a source process, a
//! guest that keeps rewriting 64 MiB, a live migration over a unix socket, and a report of
//! what happened, read from both processes' event logs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

/// Options of the demo.
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Range the guest rewrites.
    #[arg(long, default_value = "64M")]
    pub range_size: String,
    /// Transport: unix or tcp (127.0.0.1).
    #[arg(long, default_value = "unix")]
    pub transport: String,
    /// Seconds the guest runs at the destination before the demo ends.
    #[arg(long, default_value_t = 2.0)]
    pub run_after: f64,
    /// Accelerator (auto, kvm, soft).
    #[arg(long, default_value = "auto")]
    pub accel: String,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            memory: "256M".into(),
            range_size: "64M".into(),
            transport: "unix".into(),
            run_after: 2.0,
            accel: "auto".into(),
        }
    }
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn find<'a>(ev: &'a [Value], name: &str) -> Option<&'a Value> {
    ev.iter().find(|e| e["event"] == name)
}

fn find_side<'a>(ev: &'a [Value], name: &str, side: &str) -> Option<&'a Value> {
    ev.iter().find(|e| e["event"] == name && e["side"] == side)
}

fn wait_for(path: &Path, event: &str, child: &mut Child, timeout: Duration) -> Result<Value> {
    let t = Instant::now();
    loop {
        if let Some(e) = find(&events(path), event) {
            return Ok(e.clone());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the destination exited ({status}) before it was ready");
        }
        if t.elapsed() > timeout {
            bail!("the destination was not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the demo; returns the exit code.
///
/// # Errors
/// A process could not be started or the report could not be read.
pub fn run(a: &DemoArgs) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the vmm binary")?;
    let dir: PathBuf = std::env::temp_dir().join(format!("vmm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (listen, target) = match a.transport.as_str() {
        "unix" => {
            let u = format!("unix:{}", dir.join("migration.sock").display());
            (u.clone(), u)
        }
        "tcp" => ("tcp:127.0.0.1:0".to_string(), String::new()),
        other => bail!("the demo runs over unix or tcp, not {other}"),
    };
    let (src_log, dst_log) = (dir.join("source.jsonl"), dir.join("destination.jsonl"));
    let (src_serial, dst_serial) = (
        dir.join("source-serial.txt"),
        dir.join("destination-serial.txt"),
    );
    println!(
        "vmm demo: live-migrating a guest that keeps rewriting {} of its {} of RAM",
        a.range_size, a.memory
    );
    println!("  files in {}", dir.display());
    let common = |c: &mut Command| {
        c.args([
            "run",
            "--memory",
            &a.memory,
            "--range-size",
            &a.range_size,
            "--accel",
            &a.accel,
            "--verify",
        ]);
    };
    let mut dst = Command::new(&exe);
    common(&mut dst);
    dst.args([
        "--incoming",
        &listen,
        "--exit-after",
        &a.run_after.to_string(),
        "--progress",
        "never",
    ])
    .arg("--serial")
    .arg(&dst_serial)
    .arg("--log-json")
    .arg(&dst_log)
    .stdout(Stdio::null());
    let mut dst = dst.spawn().context("starting the destination")?;
    let ready = match wait_for(&dst_log, "listening", &mut dst, Duration::from_secs(30)) {
        Ok(r) => r,
        Err(e) => {
            let _ = dst.kill();
            return Err(e);
        }
    };
    let target = if target.is_empty() {
        ready["uri"].as_str().unwrap_or_default().to_string()
    } else {
        target
    };
    println!("1. destination (pid {}) is waiting on {target}", dst.id());
    let mut src = Command::new(&exe);
    common(&mut src);
    src.args(["--migrate-to", &target, "--progress", "always"])
        .arg("--serial")
        .arg(&src_serial)
        .arg("--log-json")
        .arg(&src_log)
        .stdout(Stdio::null());
    let mut src = src.spawn().context("starting the source")?;
    println!(
        "2. source (pid {}) boots the guest and migrates as soon as it prints; its report:\n",
        src.id()
    );
    let src_status = src.wait()?;
    let dst_status = dst.wait()?;
    println!();
    let se = events(&src_log);
    let de = events(&dst_log);
    let mut ok = src_status.success() && dst_status.success();
    println!("3. what happened");
    println!(
        "   processes: source exited {}, destination exited {}",
        src_status.code().unwrap_or(-1),
        dst_status.code().unwrap_or(-1)
    );
    let stopped = find(&se, "switchover").and_then(|e| e["stopped_at_us"].as_u64());
    // With --verify the destination hashes RAM before running the guest; the downtime
    // is counted to the moment it was ready to run, as without --verify.
    let resumed = find(&de, "incoming-resumed").and_then(|e| e["ready_at_us"].as_u64());
    if let (Some(s), Some(r)) = (stopped, resumed) {
        let sw = find(&se, "switchover").expect("present");
        println!(
            "   real downtime: {:.2} ms from the source stopping its vCPUs to the destination ready to run them \
             (the source measured {:.2} ms up to the destination's answer)",
            (r as f64 - s as f64) / 1e3,
            sw["downtime_ms"].as_f64().unwrap_or(0.0)
        );
    } else {
        ok = false;
        println!("   the migration did not complete (see the logs)");
    }
    let (sh, dh) = (
        find_side(&se, "ram-hash", "source"),
        find_side(&de, "ram-hash", "destination"),
    );
    if let (Some(sh), Some(dh)) = (sh, dh) {
        let same = sh["hash"] == dh["hash"];
        ok &= same;
        println!(
            "   RAM at the switchover: source {} / destination {}: {}",
            sh["hash"].as_str().unwrap_or("?"),
            dh["hash"].as_str().unwrap_or("?"),
            if same { "identical" } else { "DIFFERENT" }
        );
        let pass = sh["pass"].as_u64().unwrap_or(0);
        let exit = find(&de, "exit");
        let after = exit.and_then(|e| e["pass"].as_u64()).unwrap_or(0);
        let stale = exit
            .and_then(|e| e["mismatches"].as_u64())
            .unwrap_or(u64::MAX);
        ok &= after > pass && stale == 0;
        println!(
            "   guest: pass {pass} at the switchover, pass {after} after {} s at the destination; stale pages found: {stale}",
            a.run_after
        );
        let tail = exit.and_then(|e| e["serial_tail"].as_str()).unwrap_or("");
        println!("   destination serial (last bytes): {tail}");
    } else {
        ok = false;
    }
    println!(
        "   event logs: {} and {}",
        src_log.display(),
        dst_log.display()
    );
    println!("\n{}", if ok { "demo passed" } else { "demo FAILED" });
    Ok(if ok { 0 } else { 1 })
}
