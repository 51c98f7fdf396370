//! `cargo xtask bench --check OLD.json`: which figures of an earlier run (the README's
//! claims come from one) fall outside what a new run measures.
//!
//! For every scenario and limit of the old run, each claim is the old ratio of medians,
//! ours / QEMU, of the total time and of the real downtime, and our throughput. The new
//! run gives a 90% bootstrap interval of each ratio (our throughput: the new runs' range);
//! a claim outside it does not hold on this re-run.

use serde_json::Value;

use crate::run::{Run, mb_per_s};
use crate::stats::{median, range, ratio_interval};

/// A claimed ratio and the samples on either side of it.
type Ratio<'a> = (&'a str, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// One row of an old results.json.
struct OldRun<'a> {
    side: &'a str,
    scenario: &'a str,
    limit: u64,
    total_ms: f64,
    downtime_ms: f64,
    bytes: f64,
}

fn old_runs(old: &Value) -> Vec<OldRun<'_>> {
    old["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["completed"] == true)
        .filter_map(|r| {
            Some(OldRun {
                side: r["side"].as_str()?,
                scenario: r["scenario"].as_str()?,
                limit: r["limit_ms"].as_u64()?,
                total_ms: r["total_ms"].as_f64()?,
                downtime_ms: r["downtime_ms"].as_f64()?,
                bytes: r["bytes"].as_f64()?,
            })
        })
        .collect()
}

/// The scenarios an old run measured, in its order.
pub fn scenarios(old: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in old_runs(old) {
        if !out.iter().any(|s| s == r.scenario) {
            out.push(r.scenario.to_string());
        }
    }
    out
}

/// The host part of a results.json `host` ("2 x AMD EPYC, 2026-12-07"): CPUs and model,
/// without the date.
fn host_kind(host: &str) -> &str {
    host.rsplit_once(", ").map_or(host, |(kind, _)| kind)
}

/// The verdict table: every claim of `old` against the interval of `new`, measured on
/// `host` (as results.json names it). A claim from another kind of host says so first:
/// QEMU's time for the same fill was 4.6 to 7 times longer on one kind of host than
/// on the other, the same day here.
pub fn verdict(old: &Value, new: &[Run], host: &str) -> String {
    let olds = old_runs(old);
    let mut keys: Vec<(&str, u64)> = Vec::new();
    for r in &olds {
        // Only what this run measured (`--only` may have left scenarios out).
        let measured = new.iter().any(|n| n.scenario == r.scenario);
        if measured && !keys.contains(&(r.scenario, r.limit)) {
            keys.push((r.scenario, r.limit));
        }
    }
    let mut md = String::new();
    if let Some(then) = old["host"].as_str()
        && host_kind(then) != host_kind(host)
    {
        md += &format!(
            "The claims were measured on another kind of host ({}) than this run ({}): a \
             figure may have moved with the host, not with the code.\n\n",
            host_kind(then),
            host_kind(host)
        );
    }
    md += "| scenario | limit ms | claim | old | new median | new 90% interval | verdict |\n\
           |---|---:|---|---:|---:|---:|---|\n";
    let (mut held, mut total) = (0, 0);
    for (scenario, limit) in keys {
        let old_side = |side: &str, f: &dyn Fn(&OldRun) -> f64| -> Vec<f64> {
            olds.iter()
                .filter(|r| r.side == side && r.scenario == scenario && r.limit == limit)
                .map(f)
                .collect()
        };
        let new_side = |side: &str, f: &dyn Fn(&Run) -> f64| -> Vec<f64> {
            new.iter()
                .filter(|r| {
                    r.side == side && r.scenario == scenario && r.limit == limit && r.completed
                })
                .map(f)
                .collect()
        };
        // (claim, old ours, old QEMU, new ours, new QEMU)
        let ratios: [Ratio; 2] = [
            (
                "total time, ours / QEMU",
                old_side("ours", &|r| r.total_ms),
                old_side("qemu", &|r| r.total_ms),
                new_side("ours", &|r| r.total_ms),
                new_side("qemu", &|r| r.total_ms),
            ),
            (
                "real downtime, ours / QEMU",
                old_side("ours", &|r| r.downtime_ms),
                old_side("qemu", &|r| r.downtime_ms),
                new_side("ours", &|r| r.downtime_ms),
                new_side("qemu", &|r| r.downtime_ms),
            ),
        ];
        for (claim, oa, ob, na, nb) in ratios {
            let (Some(a), Some(b)) = (median(&oa), median(&ob)) else {
                continue;
            };
            let old_ratio = a / b;
            let new_ratio = median(&na).zip(median(&nb)).map(|(a, b)| a / b);
            let row = judge(old_ratio, new_ratio, ratio_interval(&na, &nb), 2);
            total += 1;
            held += usize::from(row.1);
            md += &format!("| {scenario} | {limit} | {claim} | {} |\n", row.0);
        }
        let ot = old_side("ours", &|r| mb_per_s(r.bytes, r.total_ms));
        let nt = new_side("ours", &|r| r.throughput());
        if let Some(o) = median(&ot) {
            let row = judge(o, median(&nt), range(&nt), 0);
            total += 1;
            held += usize::from(row.1);
            md += &format!(
                "| {scenario} | {limit} | our throughput, MB/s (new: min–max) | {} |\n",
                row.0
            );
        }
    }
    md += &format!("\n{held} of {total} claims hold on this run.\n");
    md
}

/// The cells from "old" on, and whether the claim holds.
fn judge(
    old: f64,
    new: Option<f64>,
    interval: Option<(f64, f64)>,
    digits: usize,
) -> (String, bool) {
    let f = |v: f64| format!("{v:.digits$}");
    match (new, interval) {
        (Some(n), Some((lo, hi))) => {
            let holds = (lo..=hi).contains(&old);
            let verdict = if holds {
                "holds"
            } else if old < lo {
                "outside: the claim is lower than this run"
            } else {
                "outside: the claim is higher than this run"
            };
            (
                format!("{} | {} | {}–{} | {verdict}", f(old), f(n), f(lo), f(hi)),
                holds,
            )
        }
        _ => (
            format!("{} | – | – | not measured (no completed runs)", f(old)),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(side: &'static str, total_ms: f64, downtime_ms: f64) -> Run {
        Run {
            completed: true,
            total_ms,
            downtime_ms,
            bytes: 1_000_000_000,
            ..Run::new(side, "fill", 300, 0)
        }
    }

    #[test]
    fn a_claim_inside_the_new_interval_holds_and_one_outside_does_not() {
        let row = |side: &str, total: f64, downtime: f64| {
            json!({"side": side, "scenario": "fill", "limit_ms": 300, "completed": true,
                   "total_ms": total, "downtime_ms": downtime, "bytes": 1_000_000_000u64})
        };
        // Old: total ratio 0.2 (too good), downtime ratio 0.5 (holds), 4000 MB/s.
        let old = json!({"host": "2 x AMD EPYC, 2026-12-06",
                         "runs": [row("ours", 250.0, 10.0), row("qemu", 1250.0, 20.0),
                                  // A scenario the new run left out is not judged.
                                  {"side": "ours", "scenario": "idle", "limit_ms": 300,
                                   "completed": true, "total_ms": 1.0, "downtime_ms": 1.0, "bytes": 1}]});
        assert_eq!(scenarios(&old), ["fill", "idle"]);
        let new: Vec<Run> = (0..5)
            .flat_map(|i| {
                let j = f64::from(i);
                [
                    run("ours", 250.0 + j, 10.0 + j),
                    run("qemu", 500.0 + j, 20.0 + j),
                ]
            })
            .collect();
        let v = verdict(&old, &new, "2 x AMD EPYC, 2026-12-07");
        assert!(
            !v.contains("another kind of host"),
            "the same kind, another day: {v}"
        );
        let other = verdict(&old, &new, "2 x Intel(R) Xeon(R) Processor, 2026-12-07");
        assert!(
            other.starts_with(
                "The claims were measured on another kind of host (2 x AMD EPYC) \
                               than this run (2 x Intel(R) Xeon(R) Processor)"
            ),
            "{other}"
        );
        assert!(
            v.contains("| fill | 300 | total time, ours / QEMU | 0.20 | 0.50 |"),
            "{v}"
        );
        assert!(
            v.contains("outside: the claim is lower than this run"),
            "{v}"
        );
        assert!(
            v.contains("| fill | 300 | real downtime, ours / QEMU | 0.50 |"),
            "{v}"
        );
        assert!(!v.contains("idle"), "{v}");
        assert!(v.contains("2 of 3 claims hold"), "{v}");
    }
}
