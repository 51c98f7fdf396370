//! `cargo xtask migrate-test`: the whole matrix of migrations between real vmm processes,
//! every case verified, and a table.
//!
//! Transports (unix, tcp, exec, fd, file) × workloads (idle, fill, dirty) × with and
//! without a migrated disk, then a cancel followed by a retry, three destinations that
//! must refuse (less memory, an unknown disk, more vCPUs: the last one only at the
//! completion), and the fault cases of [`crate::faults`] (every phase × cut, destination
//! killed, cancel, source killed), and post-copy (a guest that never converges, multifd
//! off and on; a cut, the source killed, the destination killed after the switch; a cut
//! recovered over a new connection). Each
//! migration is checked: RAM (and disk) hashes equal
//! at the switchover, the guest going on at the destination, no stale page or disk block,
//! the source gone; a failure leaves the source running, its guest progressing and
//! finding nothing stale, and a new migration of it then succeeds.

use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use vmm_harness::{Vmm, scratch};

use crate::e2e::{
    MEMORY, Measured, destination, disk_image_of, event, guest_args, last_lines, qmp_source, refs,
};
use crate::faults::{Action, Phase, migrate_again};

/// How a case moves its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket.
    Unix,
    /// TCP on 127.0.0.1.
    Tcp,
    /// `exec:cat > FILE`, then `exec:cat FILE`.
    Exec,
    /// An inherited socketpair.
    Fd,
    /// Save to a file, then restore from it.
    File,
    /// TCP with 2 multifd channels.
    TcpMultifd,
    /// A unix socket with 3 multifd channels, zstd-compressed.
    UnixMultifdZstd,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
            Transport::Exec => "exec",
            Transport::Fd => "fd",
            Transport::File => "file",
            Transport::TcpMultifd => "tcp multifd 2",
            Transport::UnixMultifdZstd => "unix multifd 3 zstd",
        }
    }

    /// Arguments both sides need.
    fn args(self) -> &'static [&'static str] {
        match self {
            Transport::TcpMultifd => &["--multifd-channels", "2"],
            Transport::UnixMultifdZstd => {
                &["--multifd-channels", "3", "--multifd-compression", "zstd"]
            }
            _ => &[],
        }
    }

    /// Whether both sides run at once (the real downtime is then measurable).
    fn live(self) -> bool {
        matches!(
            self,
            Transport::Unix
                | Transport::Tcp
                | Transport::Fd
                | Transport::TcpMultifd
                | Transport::UnixMultifdZstd
        )
    }
}

/// One case of the matrix.
#[derive(Debug, Clone)]
enum Case {
    Migrate {
        transport: Transport,
        workload: &'static str,
        disk: bool,
    },
    CancelThenRetry,
    RefuseMemory,
    RefuseDisk,
    RefuseVcpus,
    Fault(Phase, Action),
    Handover(crate::handover::Break, bool),
    PingPong(usize),
    /// A guest that never converges, switched to post-copy after a pass; multifd or not.
    Postcopy(bool),
    /// A failure after the switch to post-copy, at the switch or into it.
    PostcopyFailure(vmm_harness::postcopy::Failure, Duration),
    /// The same with `postcopy-preempt` (the pages asked for on a second connection);
    /// over TLS or not.
    PostcopyPreempt(bool),
    /// A connection cut after the switch, recovered over a new one; over TLS or not,
    /// with `postcopy-preempt` or not.
    PostcopyRecover(Duration, bool, bool),
}

impl Case {
    fn name(&self) -> String {
        match self {
            Case::Migrate {
                transport,
                workload,
                disk,
            } => format!(
                "{} {workload}{}",
                transport.name(),
                if *disk { " +disk" } else { "" }
            ),
            Case::CancelThenRetry => "cancel, then retry".into(),
            Case::RefuseMemory => "refused: less memory".into(),
            Case::RefuseDisk => "refused: unknown disk".into(),
            Case::RefuseVcpus => "refused at completion: more vCPUs".into(),
            Case::Fault(p, a) => format!("fault in {}: {}", p.name(), a.name()),
            Case::Handover(b, shared) => format!(
                "hand-over: {} {}",
                b.name(),
                if *shared { "+shared disk" } else { "+disk" }
            ),
            Case::PingPong(n) => format!("ping-pong x{n} +disk"),
            Case::Postcopy(multifd) => format!(
                "post-copy: never converges{}",
                if *multifd { ", multifd 2" } else { "" }
            ),
            Case::PostcopyFailure(f, after) => format!(
                "post-copy: {} {} ms after the switch",
                f.name(),
                after.as_millis()
            ),
            Case::PostcopyPreempt(tls) => format!(
                "post-copy preempt{}: never converges",
                if *tls { " over TLS" } else { "" }
            ),
            Case::PostcopyRecover(after, tls, preempt) => format!(
                "post-copy{}{}: cut {} ms after the switch, recovered",
                if *preempt { " preempt" } else { "" },
                if *tls { " over TLS" } else { "" },
                after.as_millis()
            ),
        }
    }
}

const DISK_SIZE: u64 = 64 << 20;

fn cases(quick: bool) -> Vec<Case> {
    use Transport::*;
    let mut v = Vec::new();
    if quick {
        for (transport, workload, disk) in [
            (Unix, "dirty", true),
            (Tcp, "dirty", false),
            (Exec, "idle", false),
            (Fd, "fill", false),
            (File, "dirty", true),
            (TcpMultifd, "dirty", false),
        ] {
            v.push(Case::Migrate {
                transport,
                workload,
                disk,
            });
        }
    } else {
        for transport in [Unix, Tcp, Exec, Fd, File, TcpMultifd, UnixMultifdZstd] {
            for workload in ["idle", "fill", "dirty"] {
                for disk in [false, true] {
                    v.push(Case::Migrate {
                        transport,
                        workload,
                        disk,
                    });
                }
            }
        }
    }
    v.extend([
        Case::CancelThenRetry,
        Case::RefuseMemory,
        Case::RefuseDisk,
        Case::RefuseVcpus,
    ]);
    {
        use crate::handover::Break::*;
        let breaks = [
            AnswerDelayedThenCut,
            AnswerDropped,
            CutAfterLastByte,
            CutBeforeLastByte,
        ];
        for b in breaks {
            for shared in [true, false] {
                // CI runs each break once, alternating the disk.
                if !quick || shared == matches!(b, AnswerDelayedThenCut | CutAfterLastByte) {
                    v.push(Case::Handover(b, shared));
                }
            }
        }
    }
    {
        use vmm_harness::postcopy::Failure::*;
        v.push(Case::Postcopy(false));
        v.push(Case::Postcopy(true));
        let when: &[u64] = if quick { &[0] } else { &[0, 500, 2000] };
        for failure in [Cut, KillSource, KillDestination] {
            for &ms in when {
                v.push(Case::PostcopyFailure(failure, Duration::from_millis(ms)));
            }
        }
        for &ms in when {
            v.push(Case::PostcopyRecover(
                Duration::from_millis(ms),
                false,
                false,
            ));
        }
        v.push(Case::PostcopyRecover(
            Duration::from_millis(500),
            true,
            false,
        ));
        v.push(Case::PostcopyPreempt(false));
        v.push(Case::PostcopyRecover(
            Duration::from_millis(500),
            false,
            true,
        ));
        if !quick {
            v.push(Case::PostcopyPreempt(true));
            v.push(Case::PostcopyRecover(
                Duration::from_millis(500),
                true,
                true,
            ));
        }
    }
    if quick {
        v.extend([
            Case::Fault(Phase::Setup, Action::KillSource),
            Case::Fault(Phase::Iterate, Action::Cut),
            Case::Fault(Phase::Complete, Action::KillDestination),
            Case::Fault(Phase::DiskBulk, Action::Cancel),
            Case::PingPong(4),
        ]);
    } else {
        for phase in [
            Phase::Setup,
            Phase::Iterate,
            Phase::Complete,
            Phase::DiskBulk,
        ] {
            for action in [
                Action::Cut,
                Action::KillDestination,
                Action::Cancel,
                Action::KillSource,
            ] {
                v.push(Case::Fault(phase, action));
            }
        }
        v.push(Case::PingPong(50));
    }
    v
}

/// A 64 MiB image with data in three chunks of four (the rest zero, as real disks).
fn disk_image(path: &Path) -> Result<()> {
    disk_image_of(path, DISK_SIZE)
}

/// Runs one migration case and checks it.
fn migrate(
    transport: Transport,
    workload: &'static str,
    disk: bool,
    name: &str,
) -> Result<Measured> {
    let dir = scratch(&name.replace([' ', '+', ','], "-"));
    let mut src_args = guest_args(workload);
    let mut dst_args = guest_args(workload);
    for a in transport.args() {
        src_args.push(a.to_string());
        dst_args.push(a.to_string());
    }
    if disk {
        let (s, d) = (dir.join("src.img"), dir.join("dst.img"));
        disk_image(&s)?;
        src_args.extend(["--drive".into(), format!("file={},id=disk0", s.display())]);
        dst_args.extend([
            "--drive".into(),
            format!("file={},id=disk0,create=on", d.display()),
        ]);
    }
    src_args.push("--verify".into());
    dst_args.extend(["--verify".into(), "--exit-after".into(), "1".into()]);
    let stream = dir.join("stream");
    let (mut src, mut dst) = match transport {
        Transport::Unix | Transport::Tcp | Transport::TcpMultifd | Transport::UnixMultifdZstd => {
            let listen = match transport {
                Transport::Unix | Transport::UnixMultifdZstd => {
                    format!("unix:{}", dir.join("m.sock").display())
                }
                _ => "tcp:127.0.0.1:0".into(),
            };
            dst_args.extend(["--incoming".into(), listen]);
            let mut dst = Vmm::start(&dir, "destination", &refs(&dst_args));
            let uri = dst.listening_uri();
            src_args.extend(["--migrate-to".into(), uri]);
            (Vmm::start(&dir, "source", &refs(&src_args)), dst)
        }
        Transport::Exec | Transport::File => {
            let (out, inp) = match transport {
                Transport::Exec => (
                    format!("exec:cat > '{}'", stream.display()),
                    format!("exec:cat '{}'", stream.display()),
                ),
                _ => (
                    format!("file:{}", stream.display()),
                    format!("file:{}", stream.display()),
                ),
            };
            src_args.extend(["--migrate-to".into(), out]);
            let mut src = Vmm::start(&dir, "source", &refs(&src_args));
            if !src.wait().success() {
                bail!("the source failed: {}", src.stderr());
            }
            dst_args.extend(["--incoming".into(), inp]);
            (src, Vmm::start(&dir, "destination", &refs(&dst_args)))
        }
        Transport::Fd => {
            let (a, b) = std::os::unix::net::UnixStream::pair()?;
            let (fa, fb) = (a.into_raw_fd(), b.into_raw_fd());
            let pass = |keep: i32, close: i32| {
                move |c: &mut std::process::Command| {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: only async-signal-safe calls (fcntl, close) between fork and exec.
                    unsafe {
                        c.pre_exec(move || {
                            libc::fcntl(keep, libc::F_SETFD, 0);
                            libc::close(close);
                            Ok(())
                        });
                    }
                }
            };
            dst_args.extend(["--incoming".into(), format!("fd:{fb}")]);
            src_args.extend(["--migrate-to".into(), format!("fd:{fa}")]);
            let dst = Vmm::start_with(&dir, "destination", &refs(&dst_args), pass(fb, fa));
            let src = Vmm::start_with(&dir, "source", &refs(&src_args), pass(fa, fb));
            // SAFETY: the parent's copies are not needed once both children have theirs.
            unsafe {
                libc::close(fa);
                libc::close(fb);
            }
            (src, dst)
        }
    };
    if !src.wait().success() {
        bail!("the source failed: {}", last_lines(&src.stderr()));
    }
    if !dst.wait().success() {
        bail!("the destination failed: {}", last_lines(&dst.stderr()));
    }
    // RAM (and disk) equal at the switchover.
    let sh = event(&src, "ram-hash", Some("source"))
        .ok_or_else(|| anyhow::anyhow!("no source RAM hash"))?;
    let dh = event(&dst, "ram-hash", Some("destination"))
        .ok_or_else(|| anyhow::anyhow!("no destination RAM hash"))?;
    if sh["hash"] != dh["hash"] {
        bail!(
            "RAM differs at the switchover: {} vs {}",
            sh["hash"],
            dh["hash"]
        );
    }
    if disk {
        let (sd, dd) = (
            event(&src, "disk-hash", Some("source")),
            event(&dst, "disk-hash", Some("destination")),
        );
        match (sd, dd) {
            (Some(a), Some(b)) if a["hash"] == b["hash"] => {}
            (a, b) => bail!("the disk differs at the switchover: {a:?} vs {b:?}"),
        }
    }
    // The guest goes on at the destination.
    let exit = dst
        .event("exit")
        .ok_or_else(|| anyhow::anyhow!("the destination logged no exit"))?;
    if let Some(f) = exit["fault"].as_str() {
        bail!("the guest crashed at the destination: {f}");
    }
    if exit["mismatches"] != 0 {
        bail!("the guest found stale pages: {exit}");
    }
    if workload == "dirty" && exit["pass"].as_u64() <= dh["pass"].as_u64() {
        bail!(
            "the guest did not carry on: pass {} at the switchover, {} at exit",
            dh["pass"],
            exit["pass"]
        );
    }
    if src.event("exit").map(|e| e["reason"] == "migrated") != Some(true) {
        bail!("the source did not end as migrated");
    }
    let sw = src
        .event("switchover")
        .ok_or_else(|| anyhow::anyhow!("no switchover"))?;
    let downtime = match (
        transport.live(),
        sw["stopped_at_us"].as_u64(),
        dst.event("incoming-resumed"),
    ) {
        (true, Some(stop), Some(r)) => r["ready_at_us"]
            .as_u64()
            .map(|ready| (ready as f64 - stop as f64) / 1e3),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        total_ms: sw["total_time_ms"].as_f64(),
        downtime_ms: downtime,
        bytes: sw["transferred"].as_u64(),
    })
}

fn cancel_then_retry() -> Result<Measured> {
    let dir = scratch("cancel-retry");
    let (mut src, mut q) = qmp_source(&dir, "dirty", &["--max-bandwidth", "20M"]);
    let (mut d1, uri) = destination(&dir, "dest1", MEMORY, &[]);
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("active");
    std::thread::sleep(Duration::from_millis(300));
    q.cmd("migrate_cancel", json!({}));
    q.wait_status("cancelled");
    if q.cmd("query-status", json!({}))["status"] != "running" {
        bail!("the source does not run after the cancel");
    }
    let pass = q.cmd("x-query-guest", json!({}))["pass"]
        .as_u64()
        .unwrap_or(0);
    q.wait_guest_pass(pass + 2);
    if d1.wait().success() || d1.event("incoming-resumed").is_some() {
        bail!("the cancelled destination ran the guest");
    }
    let m = migrate_again(&dir, &mut src, &mut q, &[], false)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        total_ms: m["total-time"].as_f64(),
        downtime_ms: None,
        bytes: m["ram"]["transferred"].as_u64(),
    })
}

fn refuse(what: &str) -> Result<Measured> {
    let dir = scratch(&format!("refuse-{what}"));
    let img = dir.join("src.img");
    disk_image(&img)?;
    let spec = format!("file={},id=disk0", img.display());
    let (mut src, mut q) = qmp_source(&dir, "dirty", &["--drive", &spec]);
    let dimg = dir.join("dst.img");
    let (memory, id, expect) = match what {
        "memory" => ("128M", "disk0", "same memory size"),
        "vcpus" => (MEMORY, "disk0", "\"cpu\" instance 1"),
        _ => (MEMORY, "data", "does not have"),
    };
    let mut extra = vec![
        "--drive".to_string(),
        format!("file={},id={id},create=on", dimg.display()),
    ];
    if what == "vcpus" {
        // Only the completion's device sections show the difference: the destination
        // has loaded RAM and disk by then.
        extra.extend(["--vcpus".into(), "2".into()]);
    }
    let (mut d, uri) = destination(&dir, "destination", memory, &refs(&extra));
    q.cmd("migrate", json!({"uri": uri}));
    q.wait_status("failed");
    if d.wait().success() {
        bail!("the destination accepted the stream");
    }
    if !d.stderr().contains(expect) {
        bail!(
            "the refusal does not say {expect:?}: {}",
            last_lines(&d.stderr())
        );
    }
    if what != "vcpus"
        && std::fs::metadata(&dimg).map(|m| m.len()).unwrap_or(0) > 0
        && std::fs::read(&dimg)?.iter().any(|b| *b != 0)
    {
        bail!("the refusing destination wrote its disk");
    }
    if q.cmd("query-status", json!({}))["status"] != "running" {
        bail!("the source does not run after the refusal");
    }
    let pass = q.cmd("x-query-guest", json!({}))["pass"]
        .as_u64()
        .unwrap_or(0);
    q.wait_guest_pass(pass + 2);
    let _ = std::fs::remove_file(&dimg);
    let again = [
        "--drive".to_string(),
        format!("file={},id=disk0,create=on", dimg.display()),
    ];
    migrate_again(&dir, &mut src, &mut q, &again, true)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured::default())
}

fn run_case(case: &Case) -> Result<Measured> {
    match case {
        Case::Migrate {
            transport,
            workload,
            disk,
        } => migrate(*transport, workload, *disk, &case.name()),
        Case::CancelThenRetry => cancel_then_retry(),
        Case::RefuseMemory => refuse("memory"),
        Case::RefuseDisk => refuse("disk"),
        Case::RefuseVcpus => refuse("vcpus"),
        Case::Fault(p, a) => crate::faults::run(*p, *a),
        Case::Handover(b, shared) => crate::handover::run(*b, *shared),
        Case::PingPong(n) => crate::ping_pong::run(*n),
        Case::Postcopy(multifd) => {
            use vmm_harness::postcopy::{GUEST, SMALL, migrate_in_postcopy};
            let s = match multifd {
                false => migrate_in_postcopy("postcopy", GUEST, 512 << 20, &[]),
                true => migrate_in_postcopy(
                    "postcopy-multifd",
                    SMALL,
                    128 << 20,
                    &["--multifd-channels", "2"],
                ),
            };
            Ok(Measured {
                total_ms: Some(s.total_ms),
                downtime_ms: None,
                bytes: Some(s.bytes),
            })
        }
        Case::PostcopyFailure(f, after) => {
            vmm_harness::postcopy::fail_after_switch(*f, *after);
            Ok(Measured::default())
        }
        Case::PostcopyPreempt(tls) => {
            use vmm_harness::postcopy::{GUEST, migrate_in_postcopy_preempt};
            let name = if *tls {
                "postcopy-preempt-tls"
            } else {
                "postcopy-preempt"
            };
            let s = migrate_in_postcopy_preempt(name, GUEST, 512 << 20, *tls);
            Ok(Measured {
                total_ms: Some(s.total_ms),
                downtime_ms: None,
                bytes: Some(s.bytes),
            })
        }
        Case::PostcopyRecover(after, tls, preempt) => {
            let s = vmm_harness::postcopy::recover_after_cut(*after, *tls, *preempt);
            Ok(Measured {
                total_ms: Some(s.total_ms),
                downtime_ms: None,
                bytes: Some(s.bytes),
            })
        }
    }
}

/// Runs the matrix with the vmm at `vmm`; fails if any case failed.
///
/// # Errors
/// A failed case.
pub fn run(vmm: PathBuf, quick: bool, only: &[String]) -> Result<()> {
    vmm_harness::set_vmm(vmm);
    let mut cases = cases(quick);
    if !only.is_empty() {
        cases.retain(|c| only.iter().any(|o| c.name().contains(o.as_str())));
        if cases.is_empty() {
            bail!("no case matches {only:?}");
        }
    }
    println!(
        "migrate-test: {} cases, guest memory {MEMORY}, accelerator {}\n",
        cases.len(),
        vmm_harness::accel()
    );
    println!("| case | result | total ms | real downtime ms | bytes | MB/s |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut failed = Vec::new();
    let t = Instant::now();
    for case in &cases {
        let name = case.name();
        // The harness panics on a broken expectation; a case is then a failure, and the
        // next one runs.
        let r = std::panic::catch_unwind(|| run_case(case))
            .unwrap_or_else(|p| Err(anyhow::anyhow!("{}", panic_message(&p))));
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
        match r {
            Ok(m) => {
                let mbps = match (m.bytes, m.total_ms) {
                    // A fault case's time is the recovery, its bytes where the stream stalled.
                    _ if matches!(case, Case::Fault(..)) => "-".into(),
                    (Some(b), Some(t)) if t > 0.0 => format!("{:.0}", b as f64 / t / 1e3),
                    _ => "-".into(),
                };
                println!(
                    "| {name} | ok | {} | {} | {} | {mbps} |",
                    fmt(m.total_ms),
                    fmt(m.downtime_ms),
                    m.bytes.map_or("-".into(), |b| b.to_string())
                );
            }
            Err(e) => {
                println!("| {name} | **FAILED** | - | - | - | - |");
                failed.push((name, e));
            }
        }
    }
    println!("\n{} cases in {:.0?}", cases.len(), t.elapsed());
    if !failed.is_empty() {
        for (name, e) in &failed {
            eprintln!("FAILED {name}: {e:#}");
        }
        bail!("{} of {} cases failed", failed.len(), cases.len());
    }
    Ok(())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}
