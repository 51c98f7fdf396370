//! What the bench measures of a post-copy run, the same way for ours and QEMU's: the
//! switch after a whole pass over the workload's range, the guest's work rate (its
//! passes, one serial byte each) before the migration and at the destination while
//! post-copy runs, and how long each fault waited from the destination's fault thread
//! seeing it to the page being placed (ours: its `postcopy-faults` event; QEMU's: its
//! trace events `postcopy_ram_fault_thread_request` and `postcopy_place_page`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm_harness::Qmp;

use super::report::fmt;
use super::scenarios::{Scenario, range_bytes};
use crate::run::{PostcopyRun, Run};
use crate::stats::{median, range};

/// QEMU's trace options that log the fault thread's requests and the pages placed,
/// with timestamps, into `log`.
pub(super) fn qemu_trace_args(log: &Path) -> Vec<String> {
    [
        "-trace",
        "enable=postcopy_ram_fault_thread_request",
        "-trace",
        "enable=postcopy_place_page",
        "-msg",
        "timestamp=on",
        "-D",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([log.display().to_string()])
    .collect()
}

/// The bytes the guest printed so far (a pass each).
fn passes(serial: &Path) -> u64 {
    std::fs::metadata(serial).map(|m| m.len()).unwrap_or(0)
}

/// The guest's passes per second over `over`, from its serial file.
pub(super) fn work_rate(serial: &Path, over: Duration) -> f64 {
    let (a, t) = (passes(serial), Instant::now());
    std::thread::sleep(over);
    (passes(serial) - a) as f64 / t.elapsed().as_secs_f64()
}

/// Follows a post-copy migration: asks for the switch once a whole pass went, and
/// records the guest's passes on both sides.
pub(super) struct Watch {
    range: u64,
    t0: Instant,
    src_serial: PathBuf,
    dst_serial: PathBuf,
    switched: Option<f64>,
    /// When post-copy was first seen active, and the destination's passes then.
    active: Option<(Instant, u64)>,
    work: Vec<(f64, u64)>,
}

impl Watch {
    /// For scenario `s`, the guest's serial files on both sides.
    pub(super) fn new(s: &Scenario, src_serial: PathBuf, dst_serial: PathBuf) -> Self {
        Watch {
            range: range_bytes(s),
            t0: Instant::now(),
            src_serial,
            dst_serial,
            switched: None,
            active: None,
            work: Vec::new(),
        }
    }

    /// At each poll of the source's query-migrate (`m`).
    pub(super) fn poll(&mut self, q: &mut Qmp, m: &Value) {
        let t = self.t0.elapsed().as_secs_f64() * 1e3;
        let dst = passes(&self.dst_serial);
        self.work.push((t, passes(&self.src_serial) + dst));
        if self.switched.is_none()
            && m["status"] == "active"
            && m["ram"]["normal-bytes"].as_u64().unwrap_or(0) >= self.range
        {
            q.cmd("migrate-start-postcopy", json!({}));
            self.switched = Some(t);
        }
        if self.active.is_none() && m["status"] == "postcopy-active" {
            self.active = Some((Instant::now(), dst));
        }
    }

    /// What the run measured; `end` is the source's last query-migrate, `faults` the
    /// destination's.
    pub(super) fn finish(self, end: &Value, work_before: f64, faults: FaultWaits) -> PostcopyRun {
        let work_postcopy = match self.active {
            Some((at, dst)) => {
                (passes(&self.dst_serial) - dst) as f64 / at.elapsed().as_secs_f64().max(1e-3)
            }
            None => 0.0,
        };
        PostcopyRun {
            switch_ms: self.switched.unwrap_or(0.0),
            requests: end["ram"]["postcopy-requests"].as_u64().unwrap_or(0),
            faults: faults.count,
            fault_p50_us: faults.p50_us,
            fault_p99_us: faults.p99_us,
            vcpu_blocked_ms: faults.vcpu_blocked_ms,
            faults_by_connection: faults.by_connection,
            fault_histogram_us: faults.histogram,
            work_before,
            work_postcopy,
            work: self.work,
        }
    }
}

/// The faults' waits as a destination reported them: how many were measured, their
/// p50 and p99 (µs), and the vCPUs' time blocked (ms, QEMU's `postcopy-vcpu-blocktime`
/// summed).
#[derive(Debug, Clone, Default)]
pub(super) struct FaultWaits {
    pub(super) count: u64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) vcpu_blocked_ms: Option<f64>,
    /// Ours: the waits by the connection the page came on (`on_preempt`, `on_stream`).
    pub(super) by_connection: Option<Value>,
    /// The waits by powers of two, as the destination's `postcopy-faults` event has them:
    /// (bound µs, how many waited below it and at least half of it).
    pub(super) histogram: Vec<(u64, u64)>,
}

/// Waits (µs) by powers of two, as our destination bins them.
fn histogram(waits_us: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut counts = [0u64; 65];
    for w in waits_us {
        counts[(u64::BITS - w.leading_zeros()) as usize] += 1;
    }
    (0..counts.len())
        .filter(|&i| counts[i] > 0)
        .map(|i| (1u64.checked_shl(i as u32).unwrap_or(u64::MAX), counts[i]))
        .collect()
}

/// The sum of a `postcopy-vcpu-blocktime` list, ms.
pub(super) fn vcpu_blocked_ms(list: &Value) -> Option<f64> {
    list.as_array()
        .map(|l| l.iter().filter_map(Value::as_f64).sum())
}

/// Ours: the destination's `postcopy-faults` event.
pub(super) fn our_fault_waits(e: Option<Value>) -> FaultWaits {
    match e {
        Some(e) => FaultWaits {
            count: e["resolved"].as_u64().unwrap_or(0),
            p50_us: e["p50_us"].as_f64().unwrap_or(0.0),
            p99_us: e["p99_us"].as_f64().unwrap_or(0.0),
            vcpu_blocked_ms: vcpu_blocked_ms(&e["vcpu_blocktime_ms"]),
            by_connection: Some(
                json!({"on_preempt": e["on_preempt"], "on_stream": e["on_stream"]}),
            ),
            histogram: e["histogram_us"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|b| Some((b[0].as_u64()?, b[1].as_u64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        },
        None => FaultWaits::default(),
    }
}

/// QEMU's: each request of its fault thread matched with the placing of its page, from
/// the trace log (`PID@SECONDS.MICROS:event args`); the vCPUs' blocktime from the
/// destination's `query-migrate` (`dst_info`).
pub(super) fn qemu_fault_waits(log: &Path, dst_info: &Value) -> FaultWaits {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut asked: HashMap<u64, f64> = HashMap::new();
    let mut waits: Vec<f64> = Vec::new();
    for line in text.lines() {
        let Some((head, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(t) = head
            .split_once('@')
            .and_then(|(_, t)| t.parse::<f64>().ok())
        else {
            continue;
        };
        let hex = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                .map(|a| a & !0xfff)
        };
        if rest.starts_with("postcopy_ram_fault_thread_request") {
            if let Some(a) = hex("HVA=") {
                asked.entry(a).or_insert(t);
            }
        } else if rest.starts_with("postcopy_place_page ") {
            if let Some(since) = hex("host=").and_then(|a| asked.remove(&a)) {
                waits.push((t - since) * 1e6);
            }
        }
    }
    waits.sort_by(f64::total_cmp);
    let at = |q: f64| match waits.len() {
        0 => 0.0,
        n => waits[((n - 1) as f64 * q).round() as usize],
    };
    FaultWaits {
        count: waits.len() as u64,
        p50_us: at(0.5),
        p99_us: at(0.99),
        vcpu_blocked_ms: vcpu_blocked_ms(&dst_info["postcopy-vcpu-blocktime"]),
        by_connection: None,
        histogram: histogram(waits.iter().map(|&w| w as u64)),
    }
}

/// The report's post-copy table: for each post-copy scenario, both sides' medians (and
/// ranges) over the rounds; beside it, the total time of the scenario of the same guest
/// under auto-converge, when it ran.
pub(super) fn table(scenarios: &[&Scenario], runs: &[Run]) -> String {
    let mut md = String::new();
    for s in scenarios.iter().filter(|s| s.postcopy) {
        md += &format!(
            "\nPost-copy, {} (switched once a whole pass of the range was sent; fault waits \
             from the destination's fault thread seeing a fault to the page placed; the \
             guest's work in passes per second, before the migration and at the destination \
             while post-copy ran):\n\n",
            s.name
        );
        md += "| side | runs | total ms | real downtime ms | switch at ms | requests | fault wait p50 µs | p99 µs | vCPU blocked ms | work before /s | during post-copy /s |\n";
        md += "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
        for (side, name) in [("ours", "ours"), ("qemu", "QEMU")] {
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.side == side && r.scenario == s.slug && r.completed)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let all = |f: &dyn Fn(&Run) -> f64| mine.iter().map(|r| f(r)).collect::<Vec<f64>>();
            let spread = |v: Vec<f64>, digits: usize| match (median(&v), range(&v)) {
                (Some(m), Some((lo, hi))) => format!(
                    "{} ({}–{})",
                    fmt(Some(m), digits),
                    fmt(Some(lo), digits),
                    fmt(Some(hi), digits)
                ),
                _ => "-".into(),
            };
            let pc = |f: &dyn Fn(&PostcopyRun) -> f64| {
                median(
                    &mine
                        .iter()
                        .filter_map(|r| r.postcopy.as_ref().map(f))
                        .collect::<Vec<f64>>(),
                )
            };
            md += &format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                mine.len(),
                spread(all(&|r| r.total_ms), 0),
                spread(all(&|r| r.downtime_ms), 1),
                fmt(pc(&|p| p.switch_ms), 0),
                fmt(pc(&|p| p.requests as f64), 0),
                fmt(pc(&|p| p.fault_p50_us), 0),
                fmt(pc(&|p| p.fault_p99_us), 0),
                fmt(
                    median(
                        &mine
                            .iter()
                            .filter_map(|r| r.postcopy.as_ref()?.vcpu_blocked_ms)
                            .collect::<Vec<f64>>()
                    ),
                    0
                ),
                fmt(pc(&|p| p.work_before), 0),
                fmt(pc(&|p| p.work_postcopy), 0),
            );
        }
        let same_guest = scenarios.iter().find(|o| {
            o.auto_converge
                && o.workload == s.workload
                && o.range == s.range
                && o.bandwidth == s.bandwidth
        });
        if let Some(o) = same_guest {
            let total = |side: &str| {
                let v: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.side == side && r.scenario == o.slug && r.completed)
                    .map(|r| r.total_ms)
                    .collect();
                median(&v)
            };
            md += &format!(
                "\nThe same guest under auto-converge ({}): total ms ours {}, QEMU {}.\n",
                o.name,
                fmt(total("ours"), 0),
                fmt(total("qemu"), 0)
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_trace_lines_pair_requests_with_placed_pages() {
        let dir = std::env::temp_dir().join(format!("pc-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("trace.log");
        std::fs::write(
            &log,
            "10@100.000010:postcopy_ram_fault_thread_request Request for HVA=0x7f0000001234 rb=pc.ram offset=0x1000 pid=11\n\
             10@100.000020:postcopy_place_page host=0x7f0000005000\n\
             10@100.000060:postcopy_place_page host=0x7f0000001000\n\
             10@100.000100:postcopy_ram_fault_thread_request Request for HVA=0x7f0000009000 rb=pc.ram offset=0x9000 pid=11\n\
             10@100.000300:postcopy_place_page host=0x7f0000009000\n",
        )
        .unwrap();
        let info = json!({"postcopy-vcpu-blocktime": [3, 4]});
        let w = qemu_fault_waits(&log, &info);
        let (n, p50, p99) = (w.count, w.p50_us, w.p99_us);
        assert_eq!(n, 2);
        assert_eq!(w.vcpu_blocked_ms, Some(7.0));
        assert!(
            (p50 - 50.0).abs() < 1.0 || (p50 - 200.0).abs() < 1.0,
            "{p50}"
        );
        assert!((p99 - 200.0).abs() < 1.0, "{p99}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
