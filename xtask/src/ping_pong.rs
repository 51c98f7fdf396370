//! Ping-pong: one guest migrated back and forth between the same two vmm processes,
//! each taking it back with `migrate-incoming` once it gave it away. The guest rewrites
//! its memory range and its disk every pass, checking both against the pass before; every
//! switchover is verified by RAM and disk hashes on both sides; and the processes' open
//! descriptors and resident memory must stay flat across the rounds.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use vmm_harness::{Qmp, Vmm, scratch};

use crate::e2e::{MEMORY, Measured, disk_image_of};

const DISK_SIZE: u64 = 32 << 20;

/// A process's descriptors and resident memory after a round.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    fds: usize,
    rss_kib: u64,
}

fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Footprint { fds, rss_kib }
}

struct Side {
    vmm: Vmm,
    q: Qmp,
}

fn start(dir: &Path, name: &str, image: &Path, incoming: bool) -> Side {
    let qmp = dir.join(format!("{name}.qmp"));
    let qmp_arg = format!("unix:{}", qmp.display());
    let drive = format!(
        "file={},id=disk0{}",
        image.display(),
        if incoming { ",create=on" } else { "" }
    );
    let mut args = vec![
        "--memory",
        MEMORY,
        "--workload",
        "mixed",
        "--range-size",
        "32M",
        "--drive",
        &drive,
        "--qmp",
        &qmp_arg,
        "--verify",
    ];
    if incoming {
        args.extend(["--incoming", "defer"]);
    }
    let vmm = Vmm::start(dir, name, &args);
    let q = Qmp::connect(&qmp);
    Side { vmm, q }
}

/// The `what` events (`ram-hash`, `disk-hash`) of `side` on `v`, in order.
fn hashes(v: &Vmm, what: &str, side: &str) -> Vec<Value> {
    v.events()
        .into_iter()
        .filter(|e| e["event"] == what && e["side"] == side)
        .map(|e| e["hash"].clone())
        .collect()
}

/// Runs `rounds` migrations, alternating direction.
pub fn run(rounds: usize) -> Result<Measured> {
    let dir = scratch(&format!("ping-pong-{rounds}"));
    let (a_img, b_img) = (dir.join("a.img"), dir.join("b.img"));
    disk_image_of(&a_img, DISK_SIZE)?;
    let mut sides = [
        start(&dir, "a", &a_img, false),
        start(&dir, "b", &b_img, true),
    ];
    sides[0].q.wait_guest_pass(1);
    let mut prints: Vec<[Footprint; 2]> = Vec::new();
    let mut total_ms = 0.0;
    let mut bytes = 0;
    let t = Instant::now();
    for round in 0..rounds {
        let (from, to) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        let r = sides[to]
            .q
            .cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
        let uri = r["uri"].as_str().unwrap_or_default().to_string();
        sides[from].q.cmd("migrate", json!({"uri": uri}));
        let m = sides[from].q.wait_status("completed");
        total_ms += m["total-time"].as_f64().unwrap_or(0.0);
        bytes += m["ram"]["transferred"].as_u64().unwrap_or(0);
        // The receiving side runs the guest (once it answered the source it hashes with
        // --verify, then starts), which goes on and finds nothing stale.
        wait_running(&mut sides[to].q, round)?;
        let g = sides[to].q.cmd("x-query-guest", json!({}));
        let pass = g["pass"].as_u64().unwrap_or(0);
        sides[to].q.wait_guest_pass(pass + 1);
        let g = sides[to].q.cmd("x-query-guest", json!({}));
        if g["mismatches"] != 0 {
            bail!("round {round}: the guest found stale pages or blocks: {g}");
        }
        if sides[from].q.cmd("query-status", json!({}))["status"] != "postmigrate" {
            bail!("round {round}: the giving side is not postmigrate");
        }
        // This round's hashes: the giver's latest as a source, the taker's as a
        // destination (each side logs one per migration it took part in).
        for what in ["ram-hash", "disk-hash"] {
            let a = hashes(&sides[from].vmm, what, "source");
            let b = hashes(&sides[to].vmm, what, "destination");
            match (a.last(), b.last()) {
                (Some(x), Some(y)) if x == y => {}
                (x, y) => bail!("round {round}: {what} differs: {x:?} vs {y:?}"),
            }
        }
        prints.push([
            footprint(sides[0].vmm.child.id()),
            footprint(sides[1].vmm.child.id()),
        ]);
    }
    check_counts(&sides, rounds)?;
    check_flat(&prints)?;
    for s in &mut sides {
        let _ = s.q.try_cmd("quit", json!({}));
        if !s.vmm.wait().success() {
            bail!("{} did not quit cleanly", s.vmm.name);
        }
    }
    let (first, last) = (prints[prints.len().min(2) - 1], prints[prints.len() - 1]);
    eprintln!(
        "ping-pong: {rounds} round trips in {:.1?}; fds a {}→{}, b {}→{}; RSS a {}→{} MiB, b {}→{} MiB",
        t.elapsed(),
        first[0].fds,
        last[0].fds,
        first[1].fds,
        last[1].fds,
        first[0].rss_kib >> 10,
        last[0].rss_kib >> 10,
        first[1].rss_kib >> 10,
        last[1].rss_kib >> 10
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        total_ms: Some(total_ms),
        downtime_ms: None,
        bytes: Some(bytes),
    })
}

fn wait_running(q: &mut Qmp, round: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let st = q.cmd("query-status", json!({}));
        if st["status"] == "running" {
            return Ok(());
        }
        if t.elapsed() > std::time::Duration::from_secs(30) {
            bail!("round {round}: the receiving side does not run: {st}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Each side logged one hash pair per migration it gave and took.
fn check_counts(sides: &[Side; 2], rounds: usize) -> Result<()> {
    let gave = [rounds.div_ceil(2), rounds / 2];
    for (i, s) in sides.iter().enumerate() {
        let took = rounds - gave[i];
        let (src, dst) = (
            hashes(&s.vmm, "ram-hash", "source").len(),
            hashes(&s.vmm, "ram-hash", "destination").len(),
        );
        if src != gave[i] || dst != took {
            bail!(
                "{} logged {src} source and {dst} destination hashes for {} given and {took} taken",
                s.vmm.name,
                gave[i]
            );
        }
    }
    Ok(())
}

/// Descriptors equal and resident memory within 16 MiB, from the second round (both
/// sides have then played both roles) to the last.
fn check_flat(prints: &[[Footprint; 2]]) -> Result<()> {
    let Some(base) = prints.get(1) else {
        return Ok(());
    };
    for (round, p) in prints.iter().enumerate().skip(2) {
        for side in 0..2 {
            // Compare with the same role: the same parity of round.
            let b = if round % 2 == 1 {
                base[side]
            } else {
                prints[2][side]
            };
            if p[side].fds > b.fds {
                bail!(
                    "round {round}: side {side} has {} open descriptors, {} before: a leak",
                    p[side].fds,
                    b.fds
                );
            }
            if p[side].rss_kib > b.rss_kib + (16 << 10) {
                bail!(
                    "round {round}: side {side} grew to {} MiB resident from {} MiB",
                    p[side].rss_kib >> 10,
                    b.rss_kib >> 10
                );
            }
        }
    }
    Ok(())
}
