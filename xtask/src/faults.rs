//! Fault injection between real vmm processes: the stream goes through a [`FaultProxy`]
//! that stalls it at a byte offset chosen to land in one phase (setup, iteration,
//! completion with the guest paused, the disk's bulk copy); the case checks the source is
//! there (`query-migrate`), then injects the fault: the connection cut, the destination
//! killed, the source cancelling, or the source killed.
//!
//! Every time the source must run on (resumed if it had stopped), its guest going on
//! without finding a stale page or disk block (the guest checks every page and block it
//! rewrites against what it wrote the pass before), the destination must exit non-zero
//! without running the guest, and a new migration of the same source must then succeed
//! with equal RAM and disk hashes. A killed source leaves only the last check: the
//! destination exits non-zero without running the guest.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use vmm_harness::proxy::{Fault, FaultProxy};
use vmm_harness::{Qmp, Vmm, scratch};

use crate::e2e::{MEMORY, Measured, destination, disk_image_of, event, last_lines, qmp_source};

/// Where in the migration the fault lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Inside the setup sections (the destination has the header and part of the RAM
    /// block list).
    Setup,
    /// During the iterations, the guest running.
    Iterate,
    /// During the completion, the guest paused.
    Complete,
    /// During the disk's bulk copy.
    DiskBulk,
}

/// The fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The connection is cut.
    Cut,
    /// The destination is killed (SIGKILL).
    KillDestination,
    /// The source cancels (`migrate_cancel`).
    Cancel,
    /// The source is killed (SIGKILL).
    KillSource,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Iterate => "iteration",
            Phase::Complete => "completion",
            Phase::DiskBulk => "disk bulk",
        }
    }
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Cut => "connection cut",
            Action::KillDestination => "destination killed",
            Action::Cancel => "source cancels",
            Action::KillSource => "source killed",
        }
    }
}

const DISK_SIZE: u64 = 128 << 20;

/// Runs one fault case.
pub fn run(phase: Phase, action: Action) -> Result<Measured> {
    let dir = scratch(&format!(
        "fault-{}-{}",
        phase.name().replace(' ', "-"),
        action.name().replace(' ', "-")
    ));
    let (src_img, dst_img) = (dir.join("src.img"), dir.join("dst.img"));
    let disk = phase == Phase::DiskBulk;
    let mut src_extra: Vec<String> = Vec::new();
    let mut dst_extra: Vec<String> = Vec::new();
    if disk {
        disk_image_of(&src_img, DISK_SIZE)?;
        src_extra.extend([
            "--drive".into(),
            format!("file={},id=disk0", src_img.display()),
        ]);
        dst_extra.extend([
            "--drive".into(),
            format!("file={},id=disk0,create=on", dst_img.display()),
        ]);
    }
    // Completion: a limit no guest misses, so the completion starts at the first check
    // and sends the whole first pass with the guest paused. Otherwise a limit so short
    // that the source keeps iterating (the retry raises it).
    let limit = if phase == Phase::Complete {
        "2000000"
    } else {
        "1"
    };
    src_extra.extend(["--downtime-limit".into(), limit.into()]);
    let workload = if disk { "disk" } else { "dirty" };
    let (mut src, mut q) = qmp_source(&dir, workload, &refs(&src_extra));
    let (mut d1, uri) = destination(&dir, "dest1", MEMORY, &refs(&dst_extra));
    let at = match phase {
        Phase::Setup => 40,
        Phase::Iterate => 16 << 20,
        // The switchover waits for a first bandwidth figure (10 ms, up to ~30 MB at
        // loopback speed): past that, and well inside the 64 MiB the guest wrote.
        Phase::Complete => 40 << 20,
        Phase::DiskBulk => 32 << 20,
    };
    let proxy = FaultProxy::start(
        &dir.join("proxy.sock"),
        uri.trim_start_matches("tcp:"),
        at,
        Fault::Stall,
    )?;
    q.cmd("migrate", json!({"uri": proxy.uri()}));
    if !proxy.wait_fired(Duration::from_secs(60)) {
        bail!(
            "the stream never reached byte {at}: {}",
            q.cmd("query-migrate", json!({}))
        );
    }
    // The source writes on into the socket buffers, then blocks: it is where the
    // destination stopped receiving.
    std::thread::sleep(Duration::from_millis(100));
    let m = q.cmd("query-migrate", json!({}));
    check_phase(phase, &m)?;

    let stalled_at = proxy.forwarded();
    let t = Instant::now();
    match action {
        Action::Cut => proxy.cut(),
        Action::KillDestination => {
            let _ = d1.child.kill();
        }
        Action::Cancel => {
            q.cmd("migrate_cancel", json!({}));
            // The destination learns only when the link does.
            q.wait_status("cancelled");
            proxy.cut();
        }
        Action::KillSource => {
            let _ = src.child.kill();
            let _ = src.child.wait();
            proxy.cut();
        }
    }
    destination_refused(&mut d1)?;
    if action == Action::KillSource {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(Measured {
            bytes: Some(stalled_at),
            ..Measured::default()
        });
    }

    // The source runs on, intact.
    let end = wait_terminal(&mut q)?;
    let expect = if action == Action::Cancel {
        "cancelled"
    } else {
        "failed"
    };
    if end["status"] != expect {
        bail!(
            "the migration ended {} rather than {expect}: {end}",
            end["status"]
        );
    }
    let recovered_ms = t.elapsed().as_secs_f64() * 1e3;
    if q.cmd("query-status", json!({}))["status"] != "running" {
        bail!("the source does not run after the fault: {end}");
    }
    let g = q.cmd("x-query-guest", json!({}));
    let pass = g["pass"].as_u64().unwrap_or(0);
    q.wait_guest_pass(pass + 2);
    let g = q.cmd("x-query-guest", json!({}));
    if g["mismatches"] != 0 {
        bail!("the guest found stale pages or disk blocks after the fault: {g}");
    }
    drop(proxy);

    // A new migration of the same source succeeds.
    if disk {
        let _ = std::fs::remove_file(&dst_img);
    }
    migrate_again(&dir, &mut src, &mut q, &dst_extra, disk)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        total_ms: Some(recovered_ms),
        downtime_ms: None,
        bytes: Some(stalled_at),
    })
}

/// After a failed migration: migrates the source (driven by `q`) to a fresh destination
/// (`dst_extra` its disk options) and checks it whole: RAM (and disk) hashes equal at the
/// switchover, the guest going on at the destination without a stale page or block.
/// Returns the final `query-migrate`.
pub fn migrate_again(
    dir: &std::path::Path,
    src: &mut Vmm,
    q: &mut Qmp,
    dst_extra: &[String],
    disk: bool,
) -> Result<Value> {
    let mut extra = dst_extra.to_vec();
    extra.extend(["--verify".into(), "--exit-after".into(), "1".into()]);
    let (mut d2, uri) = destination(dir, "retry", MEMORY, &refs(&extra));
    q.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 300, "max-bandwidth": 0}),
    );
    q.cmd("migrate", json!({"uri": uri}));
    let m = q.wait_status("completed");
    let _ = q.try_cmd("quit", json!({}));
    if !src.wait().success() || !d2.wait().success() {
        bail!("the retry failed: {}", last_lines(&d2.stderr()));
    }
    for what in ["ram-hash", "disk-hash"] {
        let (a, b) = (
            event(src, what, Some("source")),
            event(&d2, what, Some("destination")),
        );
        if (what == "ram-hash" || disk)
            && (a.is_none() || a.as_ref().map(|h| &h["hash"]) != b.as_ref().map(|h| &h["hash"]))
        {
            bail!("{what} differs after the retry: {a:?} vs {b:?}");
        }
    }
    let exit = d2
        .event("exit")
        .ok_or_else(|| anyhow::anyhow!("the retry's destination logged no exit"))?;
    if exit["mismatches"] != 0 || exit["fault"].is_string() {
        bail!("the guest went wrong after the retry: {exit}");
    }
    Ok(m)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The source is in `phase` (as far as it can tell: it wrote a little past the stall).
fn check_phase(phase: Phase, m: &Value) -> Result<()> {
    let status = m["status"].as_str().unwrap_or_default();
    let ok = match phase {
        Phase::Setup => matches!(status, "setup" | "active"),
        Phase::Iterate => status == "active",
        Phase::Complete => m["x-switchover"] == true,
        Phase::DiskBulk => {
            status == "active" && m["disk"]["x-bulk-percent"].as_f64().unwrap_or(100.0) < 100.0
        }
    };
    if !ok {
        bail!("the fault did not land in the {} phase: {m}", phase.name());
    }
    Ok(())
}

/// The destination exits non-zero and never ran the guest.
fn destination_refused(d: &mut Vmm) -> Result<()> {
    if d.wait().success() {
        bail!("the destination exited successfully after a failed migration");
    }
    if d.event("incoming-resumed").is_some() {
        bail!("the destination ran the guest of a failed migration");
    }
    Ok(())
}

/// Polls until the migration has ended (failed or cancelled).
fn wait_terminal(q: &mut Qmp) -> Result<Value> {
    let t = Instant::now();
    loop {
        let m = q.cmd("query-migrate", json!({}));
        if matches!(
            m["status"].as_str(),
            Some("failed" | "cancelled" | "completed")
        ) {
            return Ok(m);
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the migration did not end after the fault: {m}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
