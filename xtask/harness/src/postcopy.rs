//! Post-copy between two vmm processes, as vmm's tests and `cargo xtask migrate-test`
//! both run it: a guest that never converges in pre-copy switched after a whole pass,
//! and each failure after the switch with the outcome it must have.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proxy::{Fault, FaultProxy};
use crate::{Qmp, Vmm, scratch};

/// The built-in dirty workload over 512 MiB: at 50 MB/s a pass takes ten seconds while
/// the guest rewrites the range many times over; pre-copy never converges.
pub const GUEST: &[&str] = &[
    "--memory",
    "768M",
    "--workload",
    "dirty",
    "--range-size",
    "512M",
];

/// A smaller guest for the cases that only need post-copy running for a while.
pub const SMALL: &[&str] = &[
    "--memory",
    "256M",
    "--workload",
    "dirty",
    "--range-size",
    "128M",
];

/// The arguments a destination needs for `postcopy-preempt` (a source gets the
/// capability over QMP).
fn preempt_arg(on: bool) -> &'static [&'static str] {
    match on {
        true => &["--postcopy-preempt"],
        false => &[],
    }
}

/// A source with QMP and the postcopy-ram capability (and `postcopy-preempt`).
fn source(dir: &Path, guest: &[&str], extra: &[&str], preempt: bool) -> (Vmm, Qmp) {
    let qmp = dir.join("source-qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let src = Vmm::start(
        dir,
        "source",
        &[&["--qmp", qmp_arg.as_str(), "--verify"], extra, guest].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": preempt}]}),
    );
    (src, q)
}

/// A destination with QMP and the capability, on a free TCP port; returns its URI.
fn destination(dir: &Path, guest: &[&str], extra: &[&str]) -> (Vmm, Qmp, String) {
    let qmp = dir.join("destination-qmp.sock");
    let qmp_arg = format!("unix:{}", qmp.display());
    let mut d = Vmm::start(
        dir,
        "destination",
        &[
            &[
                "--incoming",
                "tcp:127.0.0.1:0",
                "--postcopy",
                "--qmp",
                qmp_arg.as_str(),
            ],
            extra,
            guest,
        ]
        .concat(),
    );
    let uri = d.listening_uri();
    (d, Qmp::connect(&qmp), uri)
}

/// Polls the source's query-migrate until the migration ends (two minutes at most).
fn follow(q: &mut Qmp) -> Value {
    let t = Instant::now();
    loop {
        let m = q.cmd("query-migrate", json!({}));
        let s = m["status"].as_str().unwrap_or_default().to_string();
        if ["completed", "failed", "cancelled", "postcopy-paused"].contains(&s.as_str()) {
            return m;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "still {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a post-copy migration measured (the source's `query-migrate` at its end).
#[derive(Debug, Clone, Copy, Default)]
pub struct Switched {
    /// `total-time`, ms.
    pub total_ms: f64,
    /// Stream bytes.
    pub bytes: u64,
    /// Pages the destination asked for.
    pub requests: u64,
}

/// The arguments that make a migration go over TLS: credentials of one CA for each
/// side (written under `dir`), the source checking the destination's certificate for
/// 127.0.0.1 whatever the URI.
#[derive(Debug, Clone)]
pub struct TlsArgs {
    /// The source's.
    pub src: Vec<String>,
    /// The destination's.
    pub dst: Vec<String>,
}

impl TlsArgs {
    /// New credentials under `dir`.
    pub fn new(dir: &Path) -> Self {
        let ca = crate::test_ca::TestCa::new("post-copy CA");
        let (server, client) = ca.write_pair(&dir.join("pki")).expect("credentials");
        let object = |d: &Path, endpoint: &str| {
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
                d.display()
            )
        };
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        TlsArgs {
            src: args(&[
                "--object",
                &object(&client, "client"),
                "--tls-creds",
                "tls0",
                "--tls-hostname",
                "127.0.0.1",
            ]),
            dst: args(&[
                "--object",
                &object(&server, "server"),
                "--tls-creds",
                "tls0",
            ]),
        }
    }
}

impl TlsArgs {
    /// New credentials under `dir` if `on`; otherwise no arguments (in the clear).
    fn when(on: bool, dir: &Path) -> Self {
        match on {
            true => TlsArgs::new(dir),
            false => TlsArgs {
                src: Vec::new(),
                dst: Vec::new(),
            },
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Migrates a guest that never converges under a 50 MB/s cap: `migrate-start-postcopy`
/// after a whole pass over its range (`range` bytes), as orchestrators do; checks RAM
/// equal at the switch and the guest going on at the destination without a stale page.
/// `extra` goes to both sides. Panics on a broken expectation.
pub fn migrate_in_postcopy(name: &str, guest: &[&str], range: u64, extra: &[&str]) -> Switched {
    migrate_in_postcopy_with(name, guest, range, extra, false, false)
}

/// As [`migrate_in_postcopy`] over TLS.
pub fn migrate_in_postcopy_over_tls(name: &str, guest: &[&str], range: u64) -> Switched {
    migrate_in_postcopy_with(name, guest, range, &[], true, false)
}

/// As [`migrate_in_postcopy`] with `postcopy-preempt` on both sides (over TLS with
/// `tls`): the pages asked for come on a second connection.
pub fn migrate_in_postcopy_preempt(name: &str, guest: &[&str], range: u64, tls: bool) -> Switched {
    migrate_in_postcopy_with(name, guest, range, &[], tls, true)
}

fn migrate_in_postcopy_with(
    name: &str,
    guest: &[&str],
    range: u64,
    extra: &[&str],
    tls: bool,
    preempt: bool,
) -> Switched {
    let dir = scratch(name);
    let tls = TlsArgs::when(tls, &dir);
    let (src_tls, dst_tls) = (strs(&tls.src), strs(&tls.dst));
    let (src_extra, dst_extra) = (
        [extra, &src_tls].concat(),
        [extra, &dst_tls, preempt_arg(preempt)].concat(),
    );
    let (src_extra, dst_extra) = (&src_extra[..], &dst_extra[..]);
    let cap = ["--max-bandwidth", "50M"];
    let (mut src, mut q) = source(&dir, guest, &[&cap[..], src_extra].concat(), preempt);
    let (mut dst, mut dq, uri) = destination(
        &dir,
        guest,
        &[&["--verify", "--exit-after", "1"][..], dst_extra].concat(),
    );
    q.cmd("migrate", json!({"uri": uri}));
    // After a whole pass over the workload's range, as orchestrators do.
    let t = Instant::now();
    let before = loop {
        let m = q.cmd("query-migrate", json!({}));
        if m["ram"]["normal-bytes"].as_u64().unwrap_or(0) >= range {
            break m;
        }
        assert!(
            ["setup", "active"].contains(&m["status"].as_str().unwrap()),
            "{m}"
        );
        assert!(t.elapsed() < Duration::from_secs(90), "no first pass: {m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // It does not converge: after a whole pass, most of the range is dirty again.
    assert!(
        before["ram"]["remaining"].as_u64().unwrap() > range / 2,
        "{before}"
    );
    q.cmd("migrate-start-postcopy", json!({}));
    let m = follow(&mut q);
    assert_eq!(m["status"], "completed", "{m}");
    assert!(m["ram"]["postcopy-bytes"].as_u64().unwrap() > 0, "{m}");
    let _ = dq.try_cmd("query-migrate", json!({}));
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success(), "{}", src.stderr());
    assert!(dst.wait().success(), "{}", dst.stderr());
    same_guest(&src, &dst);
    let sw = src.event("switchover").expect("switchover event");
    assert_eq!(sw["postcopy"], true, "{sw}");
    let faults = dst.event("postcopy-faults").expect("the faults' waits");
    assert!(faults["resolved"].as_u64() >= Some(1), "{faults}");
    let counted: u64 = faults["histogram_us"]
        .as_array()
        .map(|h| h.iter().filter_map(|b| b[1].as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(Some(counted), faults["resolved"].as_u64(), "{faults}");
    // With preempt the pages asked for came on their own connection, and only then.
    let on_preempt = faults["preempt_pages"].as_u64().unwrap_or(0);
    assert_eq!(preempt, on_preempt > 0, "{faults}");
    // Every resolved wait is counted once, by the connection its page came on (a page
    // comes on the preempt connection only once a fault asked for it).
    let by = |c: &str| faults[c]["resolved"].as_u64().unwrap_or(0);
    assert_eq!(
        Some(by("on_preempt") + by("on_stream")),
        faults["resolved"].as_u64(),
        "{faults}"
    );
    assert_eq!(preempt, by("on_preempt") > 0, "{faults}");
    // One vCPU (the default), its blocktime counted on its own.
    assert_eq!(
        faults["vcpu_blocktime_ms"].as_array().map(Vec::len),
        Some(1),
        "{faults}"
    );
    Switched {
        total_ms: m["total-time"].as_f64().unwrap_or_default(),
        bytes: m["ram"]["transferred"].as_u64().unwrap_or_default(),
        requests: m["ram"]["postcopy-requests"].as_u64().unwrap_or_default(),
    }
}

/// RAM equal at the switch (the destination hashed it at RUN, each page it read
/// waiting for its arrival), and the guest going on at the destination without a stale
/// page.
fn same_guest(src: &Vmm, dst: &Vmm) {
    let sh = src.event("ram-hash").expect("source hash");
    let dh = dst.event("ram-hash").expect("destination hash");
    assert_eq!(sh["hash"], dh["hash"], "RAM differs at the switch");
    assert_eq!(sh["pass"], dh["pass"]);
    let exit = dst.event("exit").expect("destination exit event");
    assert!(exit["pass"].as_u64() > dh["pass"].as_u64(), "{exit} {dh}");
    assert_eq!(exit["mismatches"], 0, "the guest found stale pages");
}

/// A post-copy running through a proxy that can cut it.
struct Switching {
    src: Vmm,
    q: Qmp,
    dst: Vmm,
    dq: Qmp,
    proxy: FaultProxy,
}

/// At most this much of the stream after the switch before a failure `after` it.
const POSTCOPY_LEFT_AT_FAILURE: u64 = 16 << 20;

/// Migrates the small guest through a proxy, switched at once, post-copy's background
/// paced at 20 MB/s so that it lasts; returns `after` the destination says
/// postcopy-active (or sooner, once 16 MiB of post-copy went through). `src_extra` goes
/// to the source, `dst_extra` to the destination.
fn switch_through_proxy(
    dir: &Path,
    src_extra: &[&str],
    dst_extra: &[&str],
    after: Duration,
    preempt: bool,
) -> Switching {
    let (src, mut q) = source(
        dir,
        SMALL,
        &[&["--max-postcopy-bandwidth", "20M"][..], src_extra].concat(),
        preempt,
    );
    let (dst, mut dq, uri) = destination(dir, SMALL, &[dst_extra, preempt_arg(preempt)].concat());
    let proxy = FaultProxy::start(
        &dir.join("proxy.sock"),
        uri.trim_start_matches("tcp:"),
        u64::MAX,
        Fault::Cut,
    )
    .unwrap();
    q.cmd("migrate", json!({"uri": proxy.uri()}));
    q.cmd("migrate-start-postcopy", json!({}));
    dq.wait_status("postcopy-active");
    // The destination's hash at RUN reads every page, each a request served at once,
    // unpaced: with fast requests that alone may bring the whole guest within `after`.
    // The failure comes while post-copy runs whatever the speed: at `after`, or once
    // 16 MiB more went through on any connection, whichever is first (what is left is
    // 128 MiB of pages).
    let (t, from) = (Instant::now(), proxy.forwarded_all());
    while t.elapsed() < after && proxy.forwarded_all() < from + POSTCOPY_LEFT_AT_FAILURE {
        std::thread::sleep(Duration::from_millis(1));
    }
    Switching {
        src,
        q,
        dst,
        dq,
        proxy,
    }
}

/// What goes wrong after the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection is cut (a proxy between the two).
    Cut,
    /// The source process is killed.
    KillSource,
    /// The destination process is killed.
    KillDestination,
}

impl Failure {
    /// For tables.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Cut => "connection cut",
            Failure::KillSource => "source killed",
            Failure::KillDestination => "destination killed",
        }
    }
}

/// Switches at once, paces post-copy's background pass at 20 MB/s so that it lasts,
/// and fails it `after` the destination reported postcopy-active; checks the outcome:
/// a destination that lost its source waits for its pages in `postcopy-paused` (and
/// ends on `quit`), a source that lost its destination keeps its whole copy in
/// `postcopy-paused`, which `cont` runs. Panics on a broken expectation.
pub fn fail_after_switch(failure: Failure, after: Duration) {
    let dir = scratch(&format!("postcopy-{failure:?}-{}", after.as_millis()));
    let Switching {
        mut src,
        mut q,
        mut dst,
        mut dq,
        proxy,
    } = switch_through_proxy(&dir, &[], &[], after, false);
    match failure {
        Failure::Cut => proxy.cut(),
        Failure::KillSource => {
            let _ = src.child.kill();
        }
        Failure::KillDestination => {
            let _ = dst.child.kill();
        }
    }

    if !matches!(failure, Failure::KillSource) {
        // The source keeps its whole copy, stopped: the guest may run at the destination.
        let m = follow(&mut q);
        assert_eq!(m["status"], "postcopy-paused", "{m}");
        let why = m["error-desc"].as_str().unwrap_or_default();
        assert!(why.contains("interrupted after the switch"), "{why}");
        // Paused, it waits for a resume: the guest must not run here meanwhile.
        assert!(q.try_cmd("cont", json!({})).is_err());
    }
    if !matches!(failure, Failure::KillDestination) {
        // The destination's guest waits for the pages it lacks.
        let m = dq.wait_status("postcopy-paused");
        assert!(m["error-desc"].is_string(), "{m}");
        let t = Instant::now();
        loop {
            let m = dq.cmd("query-migrate", json!({}));
            if m["x-postcopy-faults"]["waiting"].as_u64() > Some(0) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the guest never waited for a page: {m}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let g = dq.cmd("x-query-guest", json!({}));
        assert_eq!(g["postcopy-paused"], true, "{g}");
        // It ends when told to, without reading what did not come.
        let _ = dq.try_cmd("quit", json!({}));
        let t = Instant::now();
        while dst.child.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the destination hangs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(dst.event("exit").unwrap()["postcopy_paused"], true);
    }
    if matches!(failure, Failure::KillDestination) {
        // The operator's call: give the post-copy up, and the source runs its guest
        // again, all of it intact.
        q.cmd("migrate_cancel", json!({}));
        let t = Instant::now();
        while q.cmd("query-status", json!({}))["status"] != "postmigrate" {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "still waiting to resume"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q.cmd("cont", json!({}));
        assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
        let pass = q.cmd("x-query-guest", json!({}))["pass"].as_u64().unwrap();
        q.wait_guest_pass(pass + 2);
        assert_eq!(q.cmd("x-query-guest", json!({}))["mismatches"], 0);
    }
    if !matches!(failure, Failure::KillSource) {
        let _ = q.try_cmd("quit", json!({}));
        src.wait();
    }
}

/// Cuts the connection `after` the switch, then resumes over a new one: the destination
/// listens with `migrate-recover`, the source connects with `migrate` and `resume: true`;
/// the migration completes with RAM equal at the switch (both sides hash it; the
/// destination's hash waited through the pause for pages) and the guest going on at the
/// destination without a stale page. With `tls`, every connection goes over TLS, the
/// new one too; with `preempt` (`postcopy-preempt`), the second connection is cut and
/// opened again with the main one. Panics on a broken expectation.
pub fn recover_after_cut(after: Duration, tls: bool, preempt: bool) -> Switched {
    let tag = format!(
        "{}{}",
        if tls { "-tls" } else { "" },
        if preempt { "-preempt" } else { "" }
    );
    let dir = scratch(&format!("postcopy-recover{tag}-{}", after.as_millis()));
    let tls = TlsArgs::when(tls, &dir);
    let (src_tls, dst_tls) = (strs(&tls.src), strs(&tls.dst));
    let Switching {
        mut src,
        mut q,
        mut dst,
        mut dq,
        proxy,
    } = switch_through_proxy(
        &dir,
        &src_tls,
        &[&["--verify", "--exit-after", "1"][..], &dst_tls].concat(),
        after,
        preempt,
    );
    proxy.cut();
    let m = follow(&mut q);
    assert_eq!(m["status"], "postcopy-paused", "{m}");
    dq.wait_status("postcopy-paused");
    // Not before the destination listens again.
    let e = q
        .try_cmd(
            "migrate",
            json!({"uri": "unix:/nonexistent", "resume": true}),
        )
        .unwrap_err();
    assert!(e["desc"].is_string(), "{e}");
    let r = dq.cmd("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let again = r["uri"].as_str().expect("the bound address").to_string();
    let e = dq
        .try_cmd("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap_err();
    assert!(
        e["desc"]
            .as_str()
            .unwrap_or_default()
            .contains("triggered already"),
        "{e}"
    );
    q.cmd("migrate", json!({"uri": again, "resume": true}));
    let m = follow(&mut q);
    assert_eq!(m["status"], "completed", "{m}");
    let _ = q.try_cmd("quit", json!({}));
    assert!(src.wait().success(), "{}", src.stderr());
    assert!(dst.wait().success(), "{}", dst.stderr());
    drop(dq);
    same_guest(&src, &dst);
    for name in ["postcopy-paused", "postcopy-recover", "postcopy-resumed"] {
        assert!(dst.event(name).is_some(), "no {name} event");
    }
    Switched {
        total_ms: m["total-time"].as_f64().unwrap_or_default(),
        bytes: m["ram"]["transferred"].as_u64().unwrap_or_default(),
        requests: m["ram"]["postcopy-requests"].as_u64().unwrap_or_default(),
    }
}
