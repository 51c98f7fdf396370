//! The two drivers: ours (vmm over QMP, its event log) and QEMU's (QMP, its events),
//! the same steps on the same guest, each run filling a [`Run`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vmm_harness::{Qmp, Vmm};

use super::postcopy::{Watch, our_fault_waits, qemu_fault_waits, qemu_trace_args, work_rate};
use super::scenarios::{Scenario, TIMEOUT, ready_bytes};
use crate::certs::TestPki;
use crate::memwatch::MemWatch;
use crate::run::Run;

/// vmm's arguments for TLS in a TLS scenario: the `tls-creds-x509` object for
/// `endpoint` (QEMU's syntax) and the `tls-creds` naming it.
pub(super) fn tls_args(s: &Scenario, dir: &Path, endpoint: &str) -> Vec<String> {
    if !s.tls {
        return Vec::new();
    }
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
        dir.display()
    );
    vec![
        "--object".into(),
        object,
        "--tls-creds".into(),
        "tls0".into(),
    ]
}

pub(super) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// For QEMU: the same object added over QMP and named by `tls-creds`.
pub(super) fn qemu_tls(q: &mut Qmp, s: &Scenario, dir: &Path, endpoint: &str) {
    if s.tls {
        q.cmd(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": endpoint,
                   "dir": dir.display().to_string(), "verify-peer": true}),
        );
        q.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    }
}

/// The multifd capability and parameters of `s`, for a source or a destination.
pub(super) fn multifd_setup(q: &mut Qmp, s: &Scenario) {
    if s.multifd == 0 {
        return;
    }
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    let compression = if s.zstd { "zstd" } else { "none" };
    q.cmd(
        "migrate-set-parameters",
        json!({"multifd-channels": s.multifd, "multifd-compression": compression}),
    );
}

/// Polls query-migrate every 50 ms until it ends; fills the run's series and result.
/// A post-copy run's `watch` sees each answer (and asks for the switch).
pub(super) fn follow(
    q: &mut Qmp,
    run: &mut Run,
    timeout: Duration,
    mut watch: Option<&mut Watch>,
) -> Value {
    let t0 = Instant::now();
    loop {
        let mut m = q.cmd("query-migrate", json!({}));
        // QEMU 7.2 shows "completed" a moment before it sets the totals (its status
        // changes in migration_completion, total-time and downtime only after, in
        // migration_calculate_complete): an answer in between reads 0 ms for both.
        let settle = Instant::now();
        while m["status"] == "completed"
            && m["total-time"].as_f64().unwrap_or(0.0) == 0.0
            && settle.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(5));
            m = q.cmd("query-migrate", json!({}));
        }
        if let Some(w) = watch.as_deref_mut() {
            w.poll(q, &m);
        }
        let t = t0.elapsed().as_secs_f64() * 1e3;
        let remaining = m["ram"]["remaining"].as_u64().unwrap_or(0);
        let rate = m["ram"]["dirty-pages-rate"].as_u64().unwrap_or(0);
        run.series.push((t, remaining, rate));
        match m["status"].as_str() {
            Some("completed") => {
                run.total_ms = m["total-time"].as_f64().unwrap_or(0.0);
                run.completed = run.total_ms > 0.0;
                if !run.completed {
                    run.error = Some("completed, but query-migrate gave no total-time".into());
                }
                run.bytes = m["ram"]["transferred"].as_u64().unwrap_or(0);
                return m;
            }
            Some("failed") | Some("cancelled") | Some("postcopy-paused") => {
                run.error = Some(format!("migration {}: {}", m["status"], m["error-desc"]));
                return m;
            }
            _ => {}
        }
        if let Some(p) = m["cpu-throttle-percentage"].as_u64() {
            run.throttle = run.throttle.max(p);
        }
        if t0.elapsed() > timeout {
            let _ = q.try_cmd("migrate_cancel", json!({}));
            run.error = Some(format!("did not converge in {} s", timeout.as_secs()));
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where our pause went: the source's completion phases and what it predicted at the
/// switch (its `switchover` event without the timestamps), and how long the destination
/// took from ready to running.
fn our_detail(switchover: Option<Value>, resumed: Option<Value>) -> Value {
    let mut d = switchover.unwrap_or(Value::Null);
    if let Some(o) = d.as_object_mut() {
        o.retain(|k, _| k != "event" && !k.ends_with("_us"));
    }
    if let Some(r) = resumed
        && let (Some(ready), Some(run)) = (r["ready_at_us"].as_u64(), r["resumed_at_us"].as_u64())
    {
        d["destination_start_ms"] = json!((run as f64 - ready as f64) / 1e3);
    }
    d
}

/// The post-copy capabilities of a scenario, for either side of either VMM.
fn postcopy_caps(s: &Scenario) -> Value {
    json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                            {"capability": "postcopy-preempt", "state": s.preempt}]})
}

/// Our migration: vmm source and destination, driven over QMP like QEMU.
#[allow(clippy::too_many_arguments)]
pub(super) fn ours(
    s: &Scenario,
    limit: u64,
    round: usize,
    dir: &Path,
    watch: bool,
    extra: &[String],
    pki: &TestPki,
) -> Run {
    let mut run = Run::new("ours", s.slug, limit, round);
    let mem = format!("{}M", s.memory_mib);
    let rate = s.rate.to_string();
    let mut guest = vec![
        "--memory",
        mem.as_str(),
        "--workload",
        s.workload,
        "--range-size",
        s.range,
        "--rate",
        rate.as_str(),
    ];
    guest.extend(extra.iter().map(String::as_str));
    let channels = s.multifd.to_string();
    let mut multifd = vec![];
    if s.multifd > 0 {
        multifd.extend(["--multifd-channels", channels.as_str()]);
        if s.zstd {
            multifd.extend(["--multifd-compression", "zstd"]);
        }
    }
    let server = tls_args(s, &pki.server, "server");
    let client = tls_args(s, &pki.client, "client");
    let mut dst = Vmm::start(
        dir,
        "ours-dst",
        &[
            &guest[..],
            &multifd[..],
            &strs(&server)[..],
            &["--incoming", "tcp:127.0.0.1:0", "--exit-after", "0.5"],
            match (s.postcopy, s.preempt) {
                (true, true) => &["--postcopy", "--postcopy-preempt"][..],
                (true, false) => &["--postcopy"][..],
                _ => &[],
            },
        ]
        .concat(),
    );
    let uri = dst.listening_uri();
    let qmp = dir.join("ours.qmp");
    let qarg = format!("unix:{}", qmp.display());
    let mut src = Vmm::start(
        dir,
        "ours-src",
        &[&guest[..], &strs(&client)[..], &["--qmp", qarg.as_str()]].concat(),
    );
    let mut q = Qmp::connect(&qmp);
    let t = Instant::now();
    while q.cmd("x-query-guest", json!({}))["serial-bytes"]
        .as_u64()
        .unwrap_or(0)
        < ready_bytes(s)
    {
        if t.elapsed() > TIMEOUT {
            run.error = Some("the guest did not report progress".into());
            return run;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    q.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": limit, "max-bandwidth": s.bandwidth}),
    );
    q.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": s.auto_converge}]}),
    );
    multifd_setup(&mut q, s);
    let mut pc = s.postcopy.then(|| {
        q.cmd("migrate-set-capabilities", postcopy_caps(s));
        let before = work_rate(&dir.join("ours-src-serial.txt"), Duration::from_secs(1));
        let w = Watch::new(
            s,
            dir.join("ours-src-serial.txt"),
            dir.join("ours-dst-serial.txt"),
        );
        (w, before)
    });
    let w = watch.then(|| {
        MemWatch::start(
            vec![src.child.id(), dst.child.id()],
            s.memory_mib << 20,
            SAMPLE,
        )
    });
    q.cmd("migrate", json!({"uri": uri}));
    let end = follow(&mut q, &mut run, s.timeout, pc.as_mut().map(|(w, _)| w));
    run.mem = w.map(|w| peaks(&w.stop()));
    let _ = q.try_cmd("quit", json!({}));
    let _ = src.wait();
    let _ = dst.wait();
    if run.completed {
        let stop = src
            .event("switchover")
            .and_then(|e| e["stopped_at_us"].as_u64());
        let resume = dst
            .event("incoming-resumed")
            .and_then(|e| e["resumed_at_us"].as_u64());
        match (stop, resume) {
            (Some(a), Some(b)) => run.downtime_ms = (b as f64 - a as f64) / 1e3,
            _ => run.error = Some("no stop/resume timestamps".into()),
        }
        run.detail = our_detail(src.event("switchover"), dst.event("incoming-resumed"));
    }
    if let Some((w, before)) = pc {
        let faults = our_fault_waits(dst.event("postcopy-faults"));
        run.postcopy = Some(w.finish(&end, before, faults));
    }
    run
}

/// A QEMU process killed on drop.
pub(crate) struct Qemu(pub(crate) Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes the built-in guest with its parameters as a disk image QEMU boots
/// (`vmm image`); `tsc_khz` None asks KVM.
pub(crate) fn guest_image(
    dir: &Path,
    workload: &str,
    range: &str,
    rate: u32,
    tsc_khz: Option<u64>,
) -> Result<PathBuf> {
    let image = dir.join("guest.img");
    let tsc = tsc_khz.map_or("auto".to_string(), |t| t.to_string());
    let st = Command::new(vmm_harness::vmm())
        .args(["image", "--workload", workload, "--range-size", range])
        .args(["--rate", &rate.to_string(), "--tsc-khz", &tsc, "-o"])
        .arg(&image)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("vmm image failed");
    }
    Ok(image)
}

pub(crate) fn qemu_start(
    bin: &Path,
    dir: &Path,
    name: &str,
    image: &Path,
    memory_mib: u64,
    extra: &[String],
) -> Result<(Qemu, Qmp)> {
    let qmp = dir.join(format!("{name}.qmp"));
    let child = Command::new(bin)
        .args([
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-machine",
            "pc",
            "-nodefaults",
        ])
        .args([
            "-vga",
            "none",
            "-display",
            "none",
            "-m",
            &memory_mib.to_string(),
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", image.display()))
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{name}-serial.txt")).display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            dir.join(format!("{name}-stderr.txt")),
        )?))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let q = Qmp::connect(&qmp);
    Ok((Qemu(child), q))
}

pub(super) fn event_us(e: &Value) -> u64 {
    e["timestamp"]["seconds"].as_u64().unwrap_or(0) * 1_000_000
        + e["timestamp"]["microseconds"].as_u64().unwrap_or(0)
}

/// QEMU's migration of the same guest image with the same parameters.
#[allow(clippy::too_many_arguments)]
pub(super) fn qemu(
    bin: &Path,
    s: &Scenario,
    (limit, round): (u64, usize),
    dir: &Path,
    tsc_khz: u64,
    watch: bool,
    pki: &TestPki,
    dst_extra: &[String],
) -> Run {
    let mut run = Run::new("qemu", s.slug, limit, round);
    if let Err(e) = qemu_inner(bin, s, dir, tsc_khz, watch, pki, dst_extra, &mut run) {
        run.error = Some(format!("{e:#}"));
        run.completed = false;
    }
    run
}

#[allow(clippy::too_many_arguments)]
pub(super) fn qemu_inner(
    bin: &Path,
    s: &Scenario,
    dir: &Path,
    tsc_khz: u64,
    watch: bool,
    pki: &TestPki,
    dst_extra: &[String],
    run: &mut Run,
) -> Result<()> {
    let image = guest_image(dir, s.workload, s.range, s.rate, Some(tsc_khz))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let trace = dir.join("qemu-dst-trace.log");
    let _ = std::fs::remove_file(&trace);
    let mut dst_args = vec!["-incoming".to_string(), "defer".to_string()];
    if s.postcopy {
        dst_args.extend(qemu_trace_args(&trace));
    }
    dst_args.extend(dst_extra.iter().cloned());
    let (dst, mut dq) = qemu_start(bin, dir, "qemu-dst", &image, s.memory_mib, &dst_args)?;
    // Capabilities are set before the destination listens.
    multifd_setup(&mut dq, s);
    let postcopy_on = postcopy_caps(s);
    if s.postcopy {
        dq.cmd("migrate-set-capabilities", postcopy_on.clone());
        dq.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-blocktime", "state": true}]}),
        );
    }
    qemu_tls(&mut dq, s, &pki.server, "server");
    dq.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    let (src, mut sq) = qemu_start(bin, dir, "qemu-src", &image, s.memory_mib, &[])?;
    let serial = dir.join("qemu-src-serial.txt");
    let t = Instant::now();
    while std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) < ready_bytes(s) {
        if t.elapsed() > TIMEOUT {
            bail!("the guest printed nothing under QEMU");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // QEMU's default max-bandwidth is 128 MiB/s: raise it where ours is unlimited.
    let bandwidth = match s.bandwidth {
        0 => 10_000_000_000u64,
        b => b,
    };
    sq.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": limit_of(run), "max-bandwidth": bandwidth}),
    );
    sq.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": s.auto_converge}]}),
    );
    multifd_setup(&mut sq, s);
    qemu_tls(&mut sq, s, &pki.client, "client");
    let mut pc = s.postcopy.then(|| {
        sq.cmd("migrate-set-capabilities", postcopy_on.clone());
        let before = work_rate(&serial, Duration::from_secs(1));
        let w = Watch::new(s, serial.clone(), dir.join("qemu-dst-serial.txt"));
        (w, before)
    });
    let w =
        watch.then(|| MemWatch::start(vec![src.0.id(), dst.0.id()], s.memory_mib << 20, SAMPLE));
    sq.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let end = follow(&mut sq, run, s.timeout, pc.as_mut().map(|(w, _)| w));
    run.mem = w.map(|w| peaks(&w.stop()));
    if run.completed {
        // The destination's RESUME event; poll so its events are read.
        let t = Instant::now();
        while dq.cmd("query-status", json!({}))["status"] != "running" && t.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stop = sq
            .events
            .iter()
            .find(|e| e["event"] == "STOP")
            .map(event_us);
        let resume = dq
            .events
            .iter()
            .find(|e| e["event"] == "RESUME")
            .map(event_us);
        match (stop, resume) {
            (Some(a), Some(b)) => run.downtime_ms = (b as f64 - a as f64) / 1e3,
            _ => bail!("no STOP/RESUME events"),
        }
        run.detail = json!({"downtime_reported_ms": end["downtime"],
                            "setup_ms": end["setup-time"],
                            "dirty_sync_count": end["ram"]["dirty-sync-count"]});
    }
    // A post-copy destination reports its vCPUs' blocktime once it completed.
    let mut dst_info = Value::Null;
    if run.completed && s.postcopy {
        let t = Instant::now();
        loop {
            dst_info = dq.cmd("query-migrate", json!({}));
            if dst_info["status"] != "postcopy-active" || t.elapsed() > TIMEOUT {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = sq.try_cmd("quit", json!({}));
    let _ = dq.try_cmd("quit", json!({}));
    if let Some((w, before)) = pc {
        // The trace is complete once the destination has gone.
        drop(dst);
        run.postcopy = Some(w.finish(&end, before, qemu_fault_waits(&trace, &dst_info)));
    }
    Ok(())
}

/// How often a memory run samples the processes.
pub(super) const SAMPLE: Duration = Duration::from_millis(20);

pub(super) fn peaks(p: &[u64]) -> (u64, u64) {
    (
        p.first().copied().unwrap_or(0),
        p.get(1).copied().unwrap_or(0),
    )
}

pub(super) fn limit_of(run: &Run) -> u64 {
    run.limit
}
