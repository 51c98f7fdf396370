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
//! loopback TCP copy of 1 GiB.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vmm_harness::{Qmp, Vmm};

use crate::certs::TestPki;
use crate::memwatch::MemWatch;
use crate::plot;
use crate::run::Run;
use crate::stats;

/// A workload to migrate.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name in the report.
    pub name: &'static str,
    /// A short name for files.
    pub slug: &'static str,
    workload: &'static str,
    range: &'static str,
    rate: u32,
    /// max-bandwidth for both sides, bytes/s (0: unlimited).
    bandwidth: u64,
    /// The auto-converge capability on both sides.
    auto_converge: bool,
    /// The downtime limits it runs at.
    limits: &'static [u64],
    /// How long a migration may take before it counts as not converging.
    timeout: Duration,
    /// multifd channels on both sides (0: one stream).
    multifd: u8,
    /// zstd per multifd packet on both sides.
    zstd: bool,
    /// TLS on every connection (x509 both ways, as QEMU's tls-creds-x509 sets it up).
    tls: bool,
    /// Guest RAM, MiB.
    memory_mib: u64,
}

/// What scenarios share unless they say otherwise: the fill of 1 GiB, no cap, one
/// stream, both limits.
const BASE: Scenario = Scenario {
    name: "",
    slug: "",
    workload: "fill",
    range: "1020M",
    rate: 0,
    bandwidth: 0,
    auto_converge: false,
    limits: LIMITS,
    timeout: TIMEOUT,
    multifd: 0,
    zstd: false,
    tls: false,
    memory_mib: 1024,
};

/// A fill of 1 GiB with multifd, at `bandwidth` (0: unlimited).
const fn multifd_fill(
    name: &'static str,
    slug: &'static str,
    bandwidth: u64,
    multifd: u8,
    zstd: bool,
) -> Scenario {
    Scenario {
        name,
        slug,
        bandwidth,
        // Uncapped, both limits, as the one-stream fill (at 30 ms all of it goes live);
        // capped, the limit makes no difference to 8 s of copying.
        limits: if bandwidth == 0 { LIMITS } else { &[300] },
        multifd,
        zstd,
        ..BASE
    }
}

/// A fill of a `gib` GiB guest, all of it but the guest's first 4 MiB, at 300 ms.
const fn scaled_fill(name: &'static str, slug: &'static str, gib: u64) -> Scenario {
    Scenario {
        name,
        slug,
        range: match gib {
            2 => "2044M",
            4 => "4092M",
            _ => "8188M",
        },
        memory_mib: gib * 1024,
        limits: &[300],
        timeout: Duration::from_secs(120),
        ..BASE
    }
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "idle 1 GiB",
        slug: "idle",
        workload: "idle",
        range: "64M",
        ..BASE
    },
    Scenario {
        name: "fill 1 GiB",
        slug: "fill",
        ..BASE
    },
    Scenario {
        name: "dirty 128 MiB, full speed",
        slug: "dirty128",
        workload: "dirty",
        range: "128M",
        ..BASE
    },
    Scenario {
        name: "dirty 256 MiB, 50k pages/s",
        slug: "dirty256",
        workload: "dirty",
        range: "256M",
        rate: 50_000,
        ..BASE
    },
    // Dirtying faster than a 50 MB/s link carries: neither side converges without
    // throttling the guest.
    Scenario {
        name: "dirty 128 MiB, 50 MB/s, auto-converge",
        slug: "converge",
        workload: "dirty",
        range: "128M",
        bandwidth: 50_000_000,
        auto_converge: true,
        limits: &[300],
        timeout: Duration::from_secs(240),
        ..BASE
    },
    // Scaling: the fill of 1 GiB above, then of 2, 4 and 8 GiB guests (RAM beyond 3 GiB
    // is at 4 GiB and above, on both sides).
    scaled_fill("fill 2 GiB", "fill-2g", 2),
    scaled_fill("fill 4 GiB", "fill-4g", 4),
    scaled_fill("fill 8 GiB", "fill-8g", 8),
    multifd_fill("fill 1 GiB, multifd 2", "fill-mfd2", 0, 2, false),
    // TLS 1.3 with certificates on both sides; ours (rustls) beside QEMU's (GnuTLS).
    Scenario {
        name: "fill 1 GiB, TLS",
        slug: "fill-tls",
        tls: true,
        ..BASE
    },
    Scenario {
        name: "fill 1 GiB, TLS, multifd 2",
        slug: "fill-tls-mfd2",
        tls: true,
        multifd: 2,
        ..BASE
    },
    multifd_fill("fill 1 GiB, multifd 4", "fill-mfd4", 0, 4, false),
    multifd_fill("fill 1 GiB, multifd 2 + zstd", "fill-zstd", 0, 2, true),
    // A 1 Gbit/s link (max-bandwidth 125 MB/s), without and with compression.
    multifd_fill("fill 1 GiB, 1 Gbit/s, multifd 2", "fill-1g", GBIT, 2, false),
    multifd_fill(
        "fill 1 GiB, 1 Gbit/s, multifd 2 + zstd",
        "fill-1g-zstd",
        GBIT,
        2,
        true,
    ),
];

/// 1 Gbit/s in bytes per second.
const GBIT: u64 = 125_000_000;

/// vmm's arguments for TLS in a TLS scenario: the `tls-creds-x509` object for
/// `endpoint` (QEMU's syntax) and the `tls-creds` naming it.
fn tls_args(s: &Scenario, dir: &Path, endpoint: &str) -> Vec<String> {
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

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// For QEMU: the same object added over QMP and named by `tls-creds`.
fn qemu_tls(q: &mut Qmp, s: &Scenario, dir: &Path, endpoint: &str) {
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
fn multifd_setup(q: &mut Qmp, s: &Scenario) {
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

const LIMITS: &[u64] = &[300, 30];
const TIMEOUT: Duration = Duration::from_secs(60);

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
    /// An earlier results.json whose figures this run checks (and whose scenarios it
    /// runs, unless `only` names others).
    pub check: Option<PathBuf>,
}

/// Polls query-migrate every 50 ms until it ends; fills the run's series and result.
fn follow(q: &mut Qmp, run: &mut Run, timeout: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        let m = q.cmd("query-migrate", json!({}));
        let t = t0.elapsed().as_secs_f64() * 1e3;
        let remaining = m["ram"]["remaining"].as_u64().unwrap_or(0);
        let rate = m["ram"]["dirty-pages-rate"].as_u64().unwrap_or(0);
        run.series.push((t, remaining, rate));
        match m["status"].as_str() {
            Some("completed") => {
                run.completed = true;
                run.total_ms = m["total-time"].as_f64().unwrap_or(0.0);
                run.bytes = m["ram"]["transferred"].as_u64().unwrap_or(0);
                return m;
            }
            Some("failed") | Some("cancelled") => {
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

fn ready_bytes(s: &Scenario) -> u64 {
    if s.workload == "idle" { 1 } else { 2 }
}

/// Our migration: vmm source and destination, driven over QMP like QEMU.
#[allow(clippy::too_many_arguments)]
fn ours(
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
    let w = watch.then(|| {
        MemWatch::start(
            vec![src.child.id(), dst.child.id()],
            s.memory_mib << 20,
            SAMPLE,
        )
    });
    q.cmd("migrate", json!({"uri": uri}));
    follow(&mut q, &mut run, s.timeout);
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

fn event_us(e: &Value) -> u64 {
    e["timestamp"]["seconds"].as_u64().unwrap_or(0) * 1_000_000
        + e["timestamp"]["microseconds"].as_u64().unwrap_or(0)
}

/// QEMU's migration of the same guest image with the same parameters.
#[allow(clippy::too_many_arguments)]
fn qemu(
    bin: &Path,
    s: &Scenario,
    limit: u64,
    round: usize,
    dir: &Path,
    tsc_khz: u64,
    watch: bool,
    pki: &TestPki,
) -> Run {
    let mut run = Run::new("qemu", s.slug, limit, round);
    if let Err(e) = qemu_inner(bin, s, dir, tsc_khz, watch, pki, &mut run) {
        run.error = Some(format!("{e:#}"));
        run.completed = false;
    }
    run
}

fn qemu_inner(
    bin: &Path,
    s: &Scenario,
    dir: &Path,
    tsc_khz: u64,
    watch: bool,
    pki: &TestPki,
    run: &mut Run,
) -> Result<()> {
    let image = guest_image(dir, s.workload, s.range, s.rate, Some(tsc_khz))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (dst, mut dq) = qemu_start(
        bin,
        dir,
        "qemu-dst",
        &image,
        s.memory_mib,
        &["-incoming".into(), "defer".into()],
    )?;
    // Capabilities are set before the destination listens.
    multifd_setup(&mut dq, s);
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
    let w =
        watch.then(|| MemWatch::start(vec![src.0.id(), dst.0.id()], s.memory_mib << 20, SAMPLE));
    sq.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    follow(&mut sq, run, s.timeout);
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
    }
    let _ = sq.try_cmd("quit", json!({}));
    let _ = dq.try_cmd("quit", json!({}));
    Ok(())
}

/// How far each row's figures can be trusted: the range of every round, and a 90%
/// bootstrap interval of the ratio of medians (ours / QEMU).
fn spread_table(scenarios: &[&Scenario], runs: &[Run]) -> String {
    let mut md = String::from(
        "\nSpread of the rounds above (min–max of the completed rounds; ratio: 90% bootstrap \
         interval of median ours / median QEMU):\n\n\
         | scenario | limit ms | total ms ours | QEMU | ratio 90% | real downtime ms ours | QEMU | ratio 90% | throughput MB/s ours | QEMU | ratio 90% |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let span = |v: &[f64], digits: usize| match stats::range(v) {
        Some((a, b)) => format!("{a:.digits$}–{b:.digits$}"),
        None => "-".into(),
    };
    let interval = |a: &[f64], b: &[f64]| match stats::ratio_interval(a, b) {
        Some((lo, hi)) => format!("{lo:.2}–{hi:.2}"),
        None => "-".into(),
    };
    for s in scenarios {
        for &limit in s.limits {
            let pick = |side: &str, f: &dyn Fn(&Run) -> f64| -> Vec<f64> {
                runs.iter()
                    .filter(|r| {
                        r.side == side && r.scenario == s.slug && r.limit == limit && r.completed
                    })
                    .map(f)
                    .collect()
            };
            let tput = |r: &Run| r.bytes as f64 / (r.total_ms / 1e3).max(1e-9) / 1e6;
            let (ot, qt) = (pick("ours", &|r| r.total_ms), pick("qemu", &|r| r.total_ms));
            let (od, qd) = (
                pick("ours", &|r| r.downtime_ms),
                pick("qemu", &|r| r.downtime_ms),
            );
            let (op, qp) = (pick("ours", &tput), pick("qemu", &tput));
            md += &format!(
                "| {} | {limit} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.name,
                span(&ot, 0),
                span(&qt, 0),
                interval(&ot, &qt),
                span(&od, 1),
                span(&qd, 1),
                interval(&od, &qd),
                span(&op, 0),
                span(&qp, 0),
                interval(&op, &qp),
            );
        }
    }
    md
}

/// Guest RAM of every scenario, bytes.
const MIB: f64 = (1u64 << 20) as f64;
/// How often a memory run samples the processes.
const SAMPLE: Duration = Duration::from_millis(20);

fn peaks(p: &[u64]) -> (u64, u64) {
    (
        p.first().copied().unwrap_or(0),
        p.get(1).copied().unwrap_or(0),
    )
}

fn limit_of(run: &Run) -> u64 {
    run.limit
}

/// memcpy of 1 GiB, best of three, bytes per second.
fn memcpy() -> f64 {
    let src = vec![0x5au8; 1 << 30];
    let mut dst = vec![0u8; 1 << 30];
    dst.copy_from_slice(&src);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            (1u64 << 30) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// A plain copy of 1 GiB over loopback TCP, best of three, bytes per second.
fn loopback_tcp() -> Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(n),
                    k => n += k as u64,
                }
            }
        });
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0xa5u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..1024 {
            s.write_all(&buf)?;
        }
        drop(s);
        let n = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        anyhow::ensure!(n == 1 << 30, "short copy");
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// 1 GiB copied over `streams` loopback TCP connections at once, from one 1 GiB buffer
/// into another (touched beforehand), 512 KiB at a time: what several connections can
/// carry between buffers the size of a guest on this machine. Best of three, bytes/s.
fn loopback_tcp_streams(streams: usize) -> Result<f64> {
    const TOTAL: usize = 1 << 30;
    const PIECE: usize = 512 << 10;
    let per = TOTAL / streams;
    let mut best: f64 = 0.0;
    let mut src = vec![0xa5u8; TOTAL];
    let mut dst = vec![0x5au8; TOTAL];
    for _ in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let conns: Vec<(TcpStream, TcpStream)> = (0..streams)
            .map(|_| -> Result<_> {
                let c = TcpStream::connect(addr)?;
                Ok((c, l.accept()?.0))
            })
            .collect::<Result<_>>()?;
        let t = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let mut hs = Vec::new();
            for ((mut w, mut r), (from, to)) in conns
                .into_iter()
                .zip(src.chunks_mut(per).zip(dst.chunks_mut(per)))
            {
                let from: &[u8] = from;
                hs.push(scope.spawn(move || -> std::io::Result<()> {
                    for p in from.chunks(PIECE) {
                        w.write_all(p)?;
                    }
                    Ok(())
                }));
                hs.push(scope.spawn(move || -> std::io::Result<()> {
                    for p in to.chunks_mut(PIECE) {
                        r.read_exact(p)?;
                    }
                    Ok(())
                }));
            }
            for h in hs {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a copy thread panicked"))??;
            }
            Ok(())
        })?;
        best = best.max(TOTAL as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn median(v: Vec<f64>) -> Option<f64> {
    stats::median(&v)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
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
    eprintln!(
        "bench: {} rounds, QEMU: {}",
        opts.rounds,
        qemu_version
            .as_deref()
            .unwrap_or("not installed (ours only)")
    );
    eprintln!("bench: references: memcpy and loopback TCP of 1 GiB");
    let mc = memcpy();
    let tcp = loopback_tcp()?;
    eprintln!(
        "bench: memcpy {:.2} GB/s, loopback TCP {:.2} GB/s",
        mc / 1e9,
        tcp / 1e9
    );
    let streams: Vec<(usize, f64)> = [1, 2, 4]
        .into_iter()
        .map(|n| loopback_tcp_streams(n).map(|b| (n, b)))
        .collect::<Result<_>>()?;
    let streams_text = streams
        .iter()
        .map(|(n, b)| format!("{n}: {:.2} GB/s", b / 1e9))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("bench: loopback TCP between 1 GiB buffers, by connections: {streams_text}");

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
        let r = guarded("ours", &|| {
            ours(s, limit, round, &dir, watch, &opts.vmm_args, &pki)
        });
        eprintln!("  ours {:<28} {what} {limit:>3}: {}", s.name, describe(&r));
        into.push(r);
        if let Some(q) = &opts.qemu {
            let r = guarded("qemu", &|| {
                qemu(q, s, limit, round, &dir, tsc_khz, watch, &pki)
            });
            eprintln!("  qemu {:<28} {what} {limit:>3}: {}", s.name, describe(&r));
            into.push(r);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&work);
    // The references again: a machine that changed under the run shows here.
    let (mc_after, tcp_after) = (memcpy(), loopback_tcp()?);
    let streams_after: Vec<(usize, f64)> = [1, 2, 4]
        .into_iter()
        .map(|n| loopback_tcp_streams(n).map(|b| (n, b)))
        .collect::<Result<_>>()?;
    eprintln!(
        "bench: after the scenarios, memcpy {:.2} GB/s, loopback TCP {:.2} GB/s",
        mc_after / 1e9,
        tcp_after / 1e9
    );

    // The report.
    let mut md = String::new();
    md += &format!(
        "Guest: the built-in guest, 1 GiB, KVM (kvm-pvm) on {}; {} rounds per row, medians; \
         tcp 127.0.0.1, bandwidth unlimited (QEMU's raised to 10 GB/s) unless the \
         scenario names a cap. {}\n\n",
        host(),
        opts.rounds,
        qemu_version
            .as_deref()
            .map_or("QEMU not run.".into(), |v| format!(
                "QEMU: {v}, -cpu host,-arch-capabilities."
            ))
    );
    md += "| scenario | limit ms | total ms ours | total ms QEMU | ratio | real downtime ms ours | QEMU | ratio | MB sent ours | QEMU | ratio | throughput MB/s ours | QEMU | ratio |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    let mut best_fill_tput = None;
    // Ours, uncompressed fills without a cap: (scenario, limit, median MB/s).
    let mut fill_tput: Vec<(&Scenario, u64, f64)> = Vec::new();
    for s in &scenarios {
        for &limit in s.limits {
            let pick = |side: &str, f: &dyn Fn(&Run) -> f64| {
                median(
                    runs.iter()
                        .filter(|r| {
                            r.side == side
                                && r.scenario == s.slug
                                && r.limit == limit
                                && r.completed
                        })
                        .map(f)
                        .collect(),
                )
            };
            let fails = |side: &str| {
                runs.iter()
                    .filter(|r| {
                        r.side == side && r.scenario == s.slug && r.limit == limit && !r.completed
                    })
                    .count()
            };
            let tput = |r: &Run| r.bytes as f64 / (r.total_ms / 1e3).max(1e-9) / 1e6;
            let (ot, qt) = (pick("ours", &|r| r.total_ms), pick("qemu", &|r| r.total_ms));
            let (od, qd) = (
                pick("ours", &|r| r.downtime_ms),
                pick("qemu", &|r| r.downtime_ms),
            );
            let (ob, qb) = (
                pick("ours", &|r| r.bytes as f64 / 1e6),
                pick("qemu", &|r| r.bytes as f64 / 1e6),
            );
            let (op, qp) = (pick("ours", &tput), pick("qemu", &tput));
            if s.slug == "fill" && limit == 300 {
                best_fill_tput = op;
            }
            if s.bandwidth == 0 && s.workload == "fill" && !s.zstd {
                if let Some(p) = op {
                    fill_tput.push((s, limit, p));
                }
            }
            let note = |side: &str| match fails(side) {
                0 => String::new(),
                n => format!(" ({n} not completed)"),
            };
            md += &format!(
                "| {}{} | {limit} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.name,
                note("ours"),
                fmt(ot, 0),
                fmt(qt, 0),
                note("qemu"),
                ratio(ot, qt),
                fmt(od, 1),
                fmt(qd, 1),
                ratio(od, qd),
                fmt(ob, 0),
                fmt(qb, 0),
                ratio(ob, qb),
                fmt(op, 0),
                fmt(qp, 0),
                ratio(op, qp)
            );
        }
    }
    md += &spread_table(&scenarios, &runs);
    md += "\nReal downtime against the limit (completed runs within it, and the worst):\n\n";
    md += "| scenario | limit ms | ours within | ours max ms | QEMU within | QEMU max ms |\n";
    md += "|---|---:|---:|---:|---:|---:|\n";
    for s in &scenarios {
        for &limit in s.limits {
            let side = |side: &str| {
                let d: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.side == side && r.scenario == s.slug && r.limit == limit)
                    .map(|r| {
                        if r.completed {
                            r.downtime_ms
                        } else {
                            f64::INFINITY
                        }
                    })
                    .collect();
                let within = d.iter().filter(|&&x| x <= limit as f64).count();
                let max = d
                    .iter()
                    .copied()
                    .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
                if d.is_empty() {
                    ("-".to_string(), "-".to_string())
                } else {
                    (format!("{within}/{}", d.len()), fmt(max, 1))
                }
            };
            let (ow, om) = side("ours");
            let (qw, qm) = side("qemu");
            md += &format!("| {} | {limit} | {ow} | {om} | {qw} | {qm} |\n", s.name);
        }
    }
    md += &format!(
        "\nMemory beyond guest RAM, peak while migrating (MiB; resident outside the guest \
         RAM mapping, sampled every {} ms; the target is the dirty bitmaps, {} KiB \
         each per GiB of guest, + 64 MiB):\n\n",
        SAMPLE.as_millis(),
        (1u64 << 30) / 4096 / 8 / 1024
    );
    md += "| scenario | ours source | ours destination | QEMU source | QEMU destination |\n";
    md += "|---|---:|---:|---:|---:|\n";
    for s in &scenarios {
        let mem = |side: &str| {
            mem_runs
                .iter()
                .find(|r| r.side == side && r.scenario == s.slug)
                .and_then(|r| r.mem)
                .map(|(a, b)| (Some(a as f64 / MIB), Some(b as f64 / MIB)))
                .unwrap_or((None, None))
        };
        let (os, od) = mem("ours");
        let (qs, qd) = mem("qemu");
        md += &format!(
            "| {} | {} | {} | {} | {} |\n",
            s.name,
            fmt(os, 1),
            fmt(od, 1),
            fmt(qs, 1),
            fmt(qd, 1)
        );
    }
    md += &format!(
        "\nPhysical references in the same run, before the scenarios and after them: memcpy \
         {:.2} and {:.2} GB/s, loopback TCP {:.2} and {:.2} GB/s; by connections, after: {}.",
        mc / 1e9,
        mc_after / 1e9,
        tcp / 1e9,
        tcp_after / 1e9,
        streams_after
            .iter()
            .map(|(n, b)| format!("{n}: {:.2} GB/s", b / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(p) = best_fill_tput {
        md += &format!(
            " Our fill-1-GiB throughput ({:.0} MB/s) is {:.0}% of loopback TCP and {:.0}% of memcpy.",
            p,
            p * 1e6 / tcp * 100.0,
            p * 1e6 / mc * 100.0
        );
    }
    if let Some((s, limit, p)) = fill_tput
        .iter()
        .filter(|(s, ..)| s.multifd > 0 && !s.tls)
        .max_by(|a, b| a.2.total_cmp(&b.2))
    {
        md += &format!(
            " With multifd, at best ({}, limit {limit} ms), {:.0} MB/s: {:.0}% of loopback TCP",
            s.name,
            p,
            p * 1e6 / tcp * 100.0
        );
        // Against the same number of connections between 1 GiB buffers, when measured.
        match streams.iter().find(|(n, _)| *n == usize::from(s.multifd)) {
            Some((n, b)) => {
                md += &format!(
                    " and {:.0}% of {n} connections between 1 GiB buffers.",
                    p * 1e6 / b * 100.0
                );
            }
            None => md += ".",
        }
    }
    md += &format!(
        " Loopback TCP between two 1 GiB buffers, by number of connections at once: {streams_text}.\n"
    );
    let against_one: Vec<String> = fill_tput
        .iter()
        .filter(|(s, ..)| s.multifd > 0)
        .filter_map(|&(s, limit, p)| {
            let one = fill_tput
                .iter()
                .find(|(o, l, _)| o.multifd == 0 && o.tls == s.tls && *l == limit)?
                .2;
            Some(format!("{} (limit {limit} ms): {:.2}x", s.name, p / one))
        })
        .collect();
    // What TLS costs: each TLS row against the clear row with the same channels.
    let against_clear: Vec<String> = fill_tput
        .iter()
        .filter(|(s, ..)| s.tls)
        .filter_map(|&(s, limit, p)| {
            let clear = fill_tput
                .iter()
                .find(|(o, l, _)| {
                    !o.tls && o.multifd == s.multifd && !o.zstd && o.bandwidth == 0 && *l == limit
                })?
                .2;
            Some(format!(
                "{} (limit {limit} ms): {:.0}%",
                s.name,
                p / clear * 100.0
            ))
        })
        .collect();
    if !against_clear.is_empty() {
        md += &format!(
            "\nOur TLS throughput against our clear stream with as many channels (medians, same limit): {}.\n",
            against_clear.join("; ")
        );
    }
    if !against_one.is_empty() {
        md += &format!(
            "\nOur multifd throughput against our one stream (medians, same limit): {}.\n",
            against_one.join("; ")
        );
    }
    if let (Some(old), Some(p)) = (&old, &opts.check) {
        md += &format!(
            "\nThe figures of {} against this run:\n\n{}",
            p.display(),
            crate::check::verdict(old, &runs)
        );
    }
    std::fs::write(opts.out.join("report.md"), &md)?;
    let results = json!({
        "host": host(), "qemu": qemu_version, "memcpy_bps": mc, "loopback_tcp_bps": tcp,
        "after": {"memcpy_bps": mc_after, "loopback_tcp_bps": tcp_after,
                  "loopback_tcp_streams_bps": streams_after.iter().map(|(n, b)| json!({"streams": n, "bps": b})).collect::<Vec<_>>()},
        "loopback_tcp_streams_bps": streams.iter().map(|(n, b)| json!({"streams": n, "bps": b})).collect::<Vec<_>>(),
        "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
        "memory_runs": mem_runs.iter().map(Run::json).collect::<Vec<_>>(),
    });
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    // Total time by guest size, where the run has fills of several sizes.
    let fills: Vec<&&Scenario> = scenarios
        .iter()
        .filter(|s| s.workload == "fill" && s.bandwidth == 0 && s.multifd == 0 && !s.tls)
        .collect();
    if fills.len() > 1 {
        let points: Vec<(&str, f64, f64)> = runs
            .iter()
            .filter(|r| r.completed && r.limit == 300)
            .filter_map(|r| {
                let s = fills.iter().find(|s| s.slug == r.scenario)?;
                Some((r.side, s.memory_mib as f64 / 1024.0, r.total_ms))
            })
            .collect();
        plot::scaling(&opts.out.join("scaling.svg"), &points)?;
    }
    for s in &scenarios {
        let pick = |side: &str| {
            runs.iter()
                .find(|r| r.side == side && r.scenario == s.slug && r.limit == 300)
        };
        plot::scenario(
            &opts.out.join(format!("{}.svg", s.slug)),
            s.name,
            pick("ours"),
            pick("qemu"),
        )?;
    }
    println!("{md}");
    eprintln!("bench: wrote {}", opts.out.display());
    Ok(())
}

fn describe(r: &Run) -> String {
    let throttle = match r.throttle {
        0 => String::new(),
        t => format!(", throttled up to {t}%"),
    };
    match &r.error {
        Some(e) => format!("FAILED {e}{throttle}"),
        None => format!(
            "total {:.0} ms, real downtime {:.1} ms, {:.0} MB{throttle}",
            r.total_ms,
            r.downtime_ms,
            r.bytes as f64 / 1e6
        ),
    }
}

fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{} x {cpu}, {date}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}
