//! The hand-over between real vmm processes when the link breaks around the switchover
//! (ARCHITECTURE.md, "The hand-over"): a proxy between them delays then cuts the
//! destination's answer, drops it, cuts the connection once the whole stream went
//! through, or holds back the stream's last bytes and cuts. Each case runs with a shared
//! disk (`migrate=off`) and with a copied one, the guest rewriting its disk throughout
//! (it checks every block against the pass before, so two writers show as stale blocks).
//!
//! Checked every time: at most one guest ran after the source stopped (the source never
//! resumes by itself once its last byte left; the destination runs only a complete load),
//! and a whole copy survives: the destination runs the guest with the source's RAM and
//! disk hashes, or the source holds it paused and `cont` takes it back intact.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use vmm_harness::Vmm;
use vmm_harness::proxy::{Fault, FaultProxy};

use crate::e2e::{MEMORY, Measured, destination, disk_image_of, event, qmp_source};

/// How the link breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The destination's answer is held 1.5 s, then both connections are cut.
    AnswerDelayedThenCut,
    /// The destination's answer never arrives; the connections stay open.
    AnswerDropped,
    /// Both connections are cut when the answer arrives (after the stream's last byte).
    CutAfterLastByte,
    /// The stream's last bytes are held back, then both connections are cut.
    CutBeforeLastByte,
}

impl Break {
    pub fn name(self) -> &'static str {
        match self {
            Break::AnswerDelayedThenCut => "answer delayed, then cut",
            Break::AnswerDropped => "answer dropped",
            Break::CutAfterLastByte => "cut after the last byte",
            Break::CutBeforeLastByte => "cut before the last byte",
        }
    }

    fn fault(self) -> Fault {
        match self {
            Break::AnswerDelayedThenCut => Fault::CutAnswer(Duration::from_millis(1500)),
            Break::AnswerDropped => Fault::DropAnswer,
            Break::CutAfterLastByte => Fault::CutAnswer(Duration::ZERO),
            Break::CutBeforeLastByte => Fault::HoldTail(64),
        }
    }
}

/// The disk image size: a guest pass over it takes well under a second.
const DISK: u64 = 16 << 20;

/// Runs one case: `shared` puts both processes on one image (`migrate=off`), otherwise
/// the destination gets its own copy over the stream.
pub fn run(b: Break, shared: bool) -> Result<Measured> {
    let dir = vmm_harness::scratch(&format!(
        "handover-{}-{}",
        b.name().replace([' ', ','], "-"),
        if shared { "shared" } else { "copied" }
    ));
    let src_img = dir.join("src.img");
    disk_image_of(&src_img, DISK)?;
    let (src_spec, dst_spec) = if shared {
        let s = format!("file={},id=disk0,migrate=off", src_img.display());
        (s.clone(), s)
    } else {
        let dst_img = dir.join("dst.img");
        disk_image_of(&dst_img, DISK)?;
        (
            format!("file={},id=disk0", src_img.display()),
            format!("file={},id=disk0", dst_img.display()),
        )
    };
    let (mut src, mut q) = qmp_source(&dir, "disk", &["--drive", &src_spec]);
    // A destination answers at once once loaded: 2 s of silence is a lost answer.
    q.cmd("migrate-set-parameters", json!({"x-stall-timeout": 2000}));
    let (mut dst, uri) = destination(
        &dir,
        "destination",
        MEMORY,
        &["--drive", &dst_spec, "--verify", "--exit-after", "3"],
    );
    let proxy = FaultProxy::start(
        &dir.join("proxy.sock"),
        uri.trim_start_matches("tcp:"),
        u64::MAX,
        b.fault(),
    )?;
    let t = Instant::now();
    q.cmd("migrate", json!({"uri": proxy.uri()}));
    let m = loop {
        let m = q.cmd("query-migrate", json!({}));
        if matches!(
            m["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break m;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the migration did not end in 60 s: {m}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ended_ms = t.elapsed().as_secs_f64() * 1e3;
    // The source wrote its last byte and heard nothing: it must not run the guest.
    if m["status"] != "failed" || m["x-outcome"] != "unknown" {
        bail!("the source should not know the outcome: {m}");
    }
    if q.cmd("query-status", json!({}))["status"] != "postmigrate" {
        bail!("the source is not stopped as migrated away: {m}");
    }
    if src
        .events()
        .iter()
        .any(|e| e["event"] == "resumed" && e["after"] == "failed migration")
    {
        bail!("the source resumed after its whole stream went out");
    }
    drop(proxy);

    let dst_ran = b != Break::CutBeforeLastByte;
    let dst_status = dst.wait();
    if dst_ran {
        // The destination loaded, answered into the void and ran the guest: the only
        // copy that runs, with the source's memory and disk.
        if !dst_status.success() {
            bail!("the destination failed: {}", dst.stderr());
        }
        if dst.event("incoming-resumed").is_none() {
            bail!("the destination did not run the guest");
        }
        same_hashes(&src, &dst)?;
        let exit = dst
            .event("exit")
            .ok_or_else(|| anyhow::anyhow!("the destination logged no exit"))?;
        if exit["mismatches"] != 0 {
            bail!("the guest found stale blocks at the destination: {exit}");
        }
        if shared {
            // While the destination held the disk, the operator's cont was refused; it
            // has exited now, so the check is on the log of that refusal's absence: the
            // source never ran.
            if q.cmd("query-status", json!({}))["status"] != "postmigrate" {
                bail!("the source left postmigrate by itself");
            }
        }
    } else {
        // The destination never had the whole stream: it did not run, and the guest
        // lives on paused at the source, whose cont takes it back intact.
        if dst_status.success() || dst.event("incoming-resumed").is_some() {
            bail!("the destination ran an incomplete stream");
        }
        q.cmd("cont", json!({}));
        let g = q.cmd("x-query-guest", json!({}));
        let pass = g["pass"].as_u64().unwrap_or(0);
        q.wait_guest_pass(pass + 2);
        let g = q.cmd("x-query-guest", json!({}));
        if g["mismatches"] != 0 {
            bail!("the guest found stale pages or blocks after cont: {g}");
        }
    }
    let _ = q.try_cmd("quit", json!({}));
    let _ = src.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        total_ms: Some(ended_ms),
        ..Measured::default()
    })
}

/// RAM and disk hashes equal at the switchover.
fn same_hashes(src: &Vmm, dst: &Vmm) -> Result<()> {
    for what in ["ram-hash", "disk-hash"] {
        let a = event(src, what, Some("source"));
        let b = event(dst, what, Some("destination"));
        if a.is_none() || a.as_ref().map(|h| &h["hash"]) != b.as_ref().map(|h| &h["hash"]) {
            bail!("{what} differs: {a:?} vs {b:?}");
        }
    }
    Ok(())
}
