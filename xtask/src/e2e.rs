//! The end-to-end layer over the harness that migrate-test and its fault, hand-over and
//! ping-pong cases share: a source driven over QMP, a destination, the guest's arguments,
//! disk images, events.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;
use vmm_harness::{Qmp, Vmm};

/// What a case measured.
#[derive(Debug, Default)]
pub struct Measured {
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub bytes: Option<u64>,
}

pub const MEMORY: &str = "256M";
/// An image of `size` bytes (whole MiB) with data in three chunks of four.
pub fn disk_image_of(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for chunk in 0..size >> 20 {
        let fill = if chunk % 4 == 3 { 0 } else { (chunk as u8) | 1 };
        buf.fill(fill);
        f.write_all(&buf)?;
    }
    Ok(())
}

pub fn guest_args(workload: &str) -> Vec<String> {
    guest_args_with(workload, MEMORY)
}

pub fn guest_args_with(workload: &str, memory: &str) -> Vec<String> {
    let range = if workload == "fill" { "192M" } else { "64M" };
    [
        "--memory",
        memory,
        "--workload",
        workload,
        "--range-size",
        range,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn event(v: &Vmm, name: &str, side: Option<&str>) -> Option<Value> {
    v.events()
        .into_iter()
        .find(|e| e["event"] == name && side.is_none_or(|s| e["side"] == s))
}

pub fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// A source driven over QMP, its guest past its first pass.
pub fn qmp_source(dir: &Path, workload: &str, extra: &[&str]) -> (Vmm, Qmp) {
    let qmp = dir.join("qmp.sock");
    let arg = format!("unix:{}", qmp.display());
    let g = guest_args(workload);
    let mut args = refs(&g);
    args.extend(["--qmp", &arg, "--verify"]);
    args.extend_from_slice(extra);
    let src = Vmm::start(dir, "source", &args);
    let mut q = Qmp::connect(&qmp);
    q.wait_guest_pass(1);
    (src, q)
}

/// A destination listening on TCP, and its URI.
pub fn destination(dir: &Path, name: &str, memory: &str, extra: &[&str]) -> (Vmm, String) {
    // The destination's own parameters do not matter (its guest comes from the stream),
    // but a range that fits its memory keeps them valid.
    let g = guest_args_with("idle", memory);
    let mut args = refs(&g);
    args.extend(["--incoming", "tcp:127.0.0.1:0"]);
    args.extend_from_slice(extra);
    let mut d = Vmm::start(dir, name, &args);
    let uri = d.listening_uri();
    (d, uri)
}
