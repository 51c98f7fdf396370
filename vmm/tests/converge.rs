//! A guest that dirties memory faster than the link carries: auto-converge throttles its
//! vCPUs until the migration completes, and a migration that still cannot converge ends
//! with the reason, the source running on unthrottled.

mod common;

use std::time::{Duration, Instant};

use common::{Qmp, Vmm, scratch};
use serde_json::{Value, json};

/// 20,000 pages/s (80 MB/s) over 32 MiB, sent at 20 MB/s: every round finds the whole
/// range dirty again, so nothing converges unthrottled (paced, so that a throttled guest
/// dirties proportionally less under KVM and the software backend alike).
const GUEST: &[&str] = &[
    "--memory",
    "128M",
    "--workload",
    "dirty",
    "--range-size",
    "32M",
    "--rate",
    "20000",
];

fn source(dir: &std::path::Path) -> (Vmm, Qmp) {
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let src = Vmm::start(
        dir,
        "source",
        &[
            &[
                "--qmp",
                qmp_arg.as_str(),
                "--max-bandwidth",
                "20M",
                "--verify",
            ],
            GUEST,
        ]
        .concat(),
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    );
    (src, q)
}

fn destination(dir: &std::path::Path, name: &str) -> (Vmm, String) {
    common::verified_destination(dir, name, &[], GUEST)
}

/// Polls query-migrate (and the guest's throttle) until the migration ends; returns the
/// last answer and the highest throttle the guest's vCPUs were under.
fn follow(q: &mut Qmp) -> (Value, u64) {
    let t = Instant::now();
    let mut throttle = 0;
    loop {
        // The guest first: while a migration runs its throttle only rises, so the
        // backend's figure read first is at most what query-migrate reports next.
        let g = q.cmd("x-query-guest", json!({}));
        let m = q.cmd("query-migrate", json!({}));
        if ["completed", "failed", "cancelled"].contains(&m["status"].as_str().unwrap()) {
            return (m, throttle);
        }
        throttle = throttle.max(g["cpu-throttle"].as_u64().unwrap());
        if let Some(p) = m["cpu-throttle-percentage"].as_u64() {
            assert_eq!(p, g["cpu-throttle"].as_u64().unwrap().max(p), "{m} {g}");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "still {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link_and_the_migration_completes() {
    common::init();
    let dir = scratch("autoconverge");
    let (mut src, mut q) = source(&dir);
    let (mut dst, uri) = destination(&dir, "destination");
    q.cmd("migrate", json!({"uri": uri}));
    // Capabilities are fixed while a migration runs (as in QEMU).
    let e = q
        .try_cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "auto-converge", "state": false}]}),
        )
        .unwrap_err();
    assert_eq!(e["desc"], "There's a migration process in progress", "{e}");
    let (m, throttle) = follow(&mut q);
    assert_eq!(m["status"], "completed", "{m}");
    // A guest at its full 80 MB/s needs 1 - 10/80 = 75% to fall under half of the
    // link's 20 MB/s; one slowed by a busy host needs less, but always more than the
    // first step (cpu-throttle-initial, 20%): the throttle must have been raised.
    assert!(throttle > 20, "throttled only {throttle}%: {m}");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(dst.wait().success(), "{}", dst.stderr());
    same_guest(&src, &dst);
}

/// RAM equal at the switchover, and the guest going on at the destination without a
/// stale page.
fn same_guest(src: &Vmm, dst: &Vmm) {
    let sh = src
        .events()
        .into_iter()
        .find(|e| e["event"] == "ram-hash")
        .expect("source hash");
    let dh = dst.event("ram-hash").expect("destination hash");
    assert_eq!(sh["hash"], dh["hash"], "RAM differs at the switchover");
    let exit = dst.event("exit").expect("destination exit event");
    assert!(exit["pass"].as_u64() > dh["pass"].as_u64(), "{exit} {dh}");
    assert_eq!(exit["mismatches"], 0, "the guest found stale pages");
}

#[test]
fn a_migration_that_cannot_converge_fails_with_why_and_the_source_runs_on_unthrottled() {
    common::init();
    let dir = scratch("noconverge");
    let (mut src, mut q) = source(&dir);
    // 50% leaves 40 MB/s of dirtying against 20 MB/s sent: it can never converge.
    q.cmd(
        "migrate-set-parameters",
        json!({"max-cpu-throttle": 50, "x-stall-timeout": 2000}),
    );
    let (mut dst, uri) = destination(&dir, "dest1");
    q.cmd("migrate", json!({"uri": uri}));
    let (m, throttle) = follow(&mut q);
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(throttle, 50, "{m}");
    let why = m["error-desc"].as_str().unwrap();
    assert!(why.contains("cannot converge"), "{why}");
    assert!(
        why.contains("throttled by 50% (max-cpu-throttle 50%)"),
        "{why}"
    );
    assert!(m.get("cpu-throttle-percentage").is_none(), "{m}");
    assert!(
        !dst.wait().success(),
        "the destination ran a half-sent guest"
    );

    // The source runs on, unthrottled, its memory intact.
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let g = q.cmd("x-query-guest", json!({}));
    assert_eq!(g["cpu-throttle"], 0, "{g}");
    let pass = g["pass"].as_u64().unwrap();
    q.wait_guest_pass(pass + 2);
    assert_eq!(q.cmd("x-query-guest", json!({}))["mismatches"], 0);

    // With the throttle allowed to go further, the same source migrates.
    // (and the default stall timeout: 2 s can pass without progress on a loaded machine)
    q.cmd(
        "migrate-set-parameters",
        json!({"max-cpu-throttle": 99, "x-stall-timeout": 30000}),
    );
    let (mut dst, uri) = destination(&dir, "destination");
    q.cmd("migrate", json!({"uri": uri}));
    let (m, _) = follow(&mut q);
    assert_eq!(m["status"], "completed", "{m}");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success());
    assert!(dst.wait().success(), "{}", dst.stderr());
    same_guest(&src, &dst);
}
