//! The bench's report: report.md (tables with medians, spreads and intervals, real
//! downtime against the limit, memory, the references, throughput against them, the
//! check of an earlier run), results.json, and the plots.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use serde_json::{Value, json};

use super::drivers::SAMPLE;
use super::references::References;
use super::scenarios::Scenario;
use crate::plot;
use crate::run::Run;
use crate::stats;

/// What a run measured, for the report.
pub(super) struct Measured<'a> {
    /// Rounds per scenario and limit.
    pub(super) rounds: usize,
    /// Where the report goes.
    pub(super) out: &'a Path,
    /// The earlier results.json being checked, and its path.
    pub(super) check: Option<(Value, &'a Path)>,
    pub(super) scenarios: Vec<&'a Scenario>,
    pub(super) runs: Vec<Run>,
    pub(super) mem_runs: Vec<Run>,
    pub(super) before: References,
    pub(super) after: References,
    pub(super) qemu_version: Option<String>,
}

/// Writes report.md, results.json and the plots into `out`, and prints report.md.
///
/// # Errors
/// A file cannot be written.
pub(super) fn write(m: Measured<'_>) -> Result<()> {
    let Measured {
        rounds,
        out,
        check,
        scenarios,
        runs,
        mem_runs,
        before,
        after,
        qemu_version,
    } = m;
    let (mc, tcp, streams) = (before.memcpy, before.tcp, &before.streams);
    let (mc_after, tcp_after, streams_after) = (after.memcpy, after.tcp, &after.streams);
    let streams_text = before.streams_text();
    let link = loopback_shaping();
    let mut md = String::new();
    md += &format!(
        "Guest: the built-in guest, 1 GiB, KVM (kvm-pvm) on {}; {} rounds per row, medians; \
         tcp 127.0.0.1{}, bandwidth unlimited (QEMU's raised to 10 GB/s) unless the \
         scenario names a cap. {}\n\n",
        host(),
        rounds,
        link.as_deref().map_or(String::new(), |l| format!(
            " through a shaped loopback ({l})"
        )),
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
            let tput = Run::throughput;
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
    md += &super::postcopy::table(&scenarios, &runs);
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
    md += &against_loopback(&scenarios, &runs);
    if let Some((old, p)) = &check {
        md += &format!(
            "\nThe figures of {} against this run:\n\n{}",
            p.display(),
            crate::check::verdict(old, &runs, &host())
        );
    }
    std::fs::write(out.join("report.md"), &md)?;
    let results = json!({
        "host": host(), "link": link, "qemu": qemu_version, "memcpy_bps": mc, "loopback_tcp_bps": tcp,
        "after": {"memcpy_bps": mc_after, "loopback_tcp_bps": tcp_after,
                  "loopback_tcp_streams_bps": streams_after.iter().map(|(n, b)| json!({"streams": n, "bps": b})).collect::<Vec<_>>()},
        "loopback_tcp_streams_bps": streams.iter().map(|(n, b)| json!({"streams": n, "bps": b})).collect::<Vec<_>>(),
        "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
        "memory_runs": mem_runs.iter().map(Run::json).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("results.json"),
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
        plot::scaling(&out.join("scaling.svg"), &points)?;
    }
    for s in &scenarios {
        let pick = |side: &str| {
            runs.iter()
                .find(|r| r.side == side && r.scenario == s.slug && r.limit == 300)
        };
        plot::scenario(
            &out.join(format!("{}.svg", s.slug)),
            s.name,
            pick("ours"),
            pick("qemu"),
        )?;
    }
    println!("{md}");
    Ok(())
}

/// How far each row's figures can be trusted: the range of every round, and a 90%
/// bootstrap interval of the ratio of medians (ours / QEMU).
pub(super) fn spread_table(scenarios: &[&Scenario], runs: &[Run]) -> String {
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
            let tput = Run::throughput;
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
pub(super) const MIB: f64 = (1u64 << 20) as f64;

pub(super) fn median(v: Vec<f64>) -> Option<f64> {
    stats::median(&v)
}

/// Each throughput round against the loopback copies measured right after it (a table,
/// or nothing if no round has them): the references drift during a run by as much as
/// the margins in question, so a ratio to the run's start or end says little.
fn against_loopback(scenarios: &[&Scenario], runs: &[Run]) -> String {
    let mut md = String::new();
    for s in scenarios.iter().filter(|s| s.is_throughput()) {
        for &limit in s.limits {
            for side in ["ours", "qemu"] {
                // (MB/s, against one connection between 1 MiB buffers, against as
                // many connections between 1 GiB buffers), per round.
                let rounds: Vec<(f64, f64, f64)> = runs
                    .iter()
                    .filter(|r| {
                        r.side == side && r.scenario == s.slug && r.limit == limit && r.completed
                    })
                    .filter_map(|r| {
                        let (tcp, buffers, _) = r.loopback?;
                        let mbps = r.throughput();
                        Some((mbps, mbps * 1e6 / tcp, mbps * 1e6 / buffers))
                    })
                    .collect();
                if rounds.is_empty() {
                    continue;
                }
                let col =
                    |f: fn(&(f64, f64, f64)) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };
                let pct = |v: &[f64]| match (stats::median(v), stats::range(v)) {
                    (Some(m), Some((lo, hi))) => {
                        format!("{:.0}% ({:.0}–{:.0})", m * 100.0, lo * 100.0, hi * 100.0)
                    }
                    _ => "-".to_string(),
                };
                let mbs = col(|r| r.0);
                let spread =
                    stats::range(&mbs).map_or("-".into(), |(lo, hi)| format!(" ({lo:.0}–{hi:.0})"));
                md += &format!(
                    "| {} | {limit} | {side} | {}{spread} | {} | {} |\n",
                    s.name,
                    fmt(stats::median(&mbs), 0),
                    pct(&col(|r| r.1)),
                    pct(&col(|r| r.2)),
                );
            }
        }
    }
    if md.is_empty() {
        return md;
    }
    "\nThroughput against loopback TCP measured right after each round (the same \
     side's round; median of the per-round ratios, and their min–max). One connection \
     between 1 MiB buffers keeps its data in cache; the 1 GiB buffers, as many \
     connections as the run used, read and write memory as a migration must:\n\n\
     | scenario | limit ms | side | throughput MB/s (min–max) | / loopback, 1 connection, 1 MiB buffers | / loopback, same connections, 1 GiB buffers |\n\
     |---|---:|---|---:|---:|---:|\n"
        .to_string()
        + &md
}

pub(super) fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

pub(super) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

pub(super) fn describe(r: &Run) -> String {
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

pub(super) fn host() -> String {
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

/// The queueing discipline on the loopback when it shapes the traffic (`tc qdisc` in
/// the network namespace the bench runs in, e.g. a 1 Gbit/s link for a run under `ip
/// netns exec`), None when the loopback is as the kernel made it.
fn loopback_shaping() -> Option<String> {
    let out = Command::new("tc")
        .args(["qdisc", "show", "dev", "lo"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim();
    (!line.is_empty() && !line.starts_with("qdisc noqueue")).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::scenarios::SCENARIOS;

    fn round(side: &'static str, total_ms: f64, loopback: Option<(f64, f64, usize)>) -> Run {
        Run {
            completed: true,
            total_ms,
            bytes: 1_000_000_000,
            loopback,
            ..Run::new(side, "fill", 300, 0)
        }
    }

    #[test]
    fn each_round_is_held_against_its_own_loopback() {
        let fill = SCENARIOS.iter().find(|s| s.slug == "fill").unwrap();
        // 2 and 4 GB/s, against 4 and 5 GB/s in cache (50% and 80%) and 4 and 4 GB/s
        // between 1 GiB buffers (50% and 100%).
        let runs = [
            round("ours", 500.0, Some((4e9, 4e9, 1))),
            round("ours", 250.0, Some((5e9, 4e9, 1))),
            round("qemu", 500.0, None),
        ];
        let md = against_loopback(&[fill], &runs);
        assert!(
            md.contains(
                "| fill 1 GiB | 300 | ours | 3000 (2000–4000) | 65% (50–80) | 75% (50–100) |"
            ),
            "{md}"
        );
        // QEMU's round has no reference: no row for it, and no table without any.
        assert!(!md.contains("| qemu |"), "{md}");
        assert_eq!(against_loopback(&[fill], &runs[2..]), "");
    }
}
