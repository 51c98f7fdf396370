//! One migration run of the bench, ours or QEMU's: what the report, the plots and the
//! check read.

use serde_json::{Value, json};

/// One migration run.
#[derive(Debug, Clone)]
pub struct Run {
    /// `ours` or `qemu`.
    pub side: &'static str,
    /// Scenario slug.
    pub scenario: &'static str,
    /// downtime-limit, ms.
    pub limit: u64,
    /// Round number.
    pub round: usize,
    /// Whether it completed.
    pub completed: bool,
    /// query-migrate's total-time, ms.
    pub total_ms: f64,
    /// Destination running minus source stopped, ms.
    pub downtime_ms: f64,
    /// Stream bytes.
    pub bytes: u64,
    /// What went wrong.
    pub error: Option<String>,
    /// (ms since migrate, remaining bytes, dirty pages/s).
    pub series: Vec<(f64, u64, u64)>,
    /// The highest cpu-throttle-percentage seen.
    pub throttle: u64,
    /// Peak memory beyond guest RAM of the source and the destination, bytes (memory
    /// runs only).
    pub mem: Option<(u64, u64)>,
    /// Post-copy runs: what the switch and the faults after it did.
    pub postcopy: Option<PostcopyRun>,
    /// Where the pause went, as each side reports it (ours: the source's completion
    /// phases, its pending estimate at the switch and the destination's start; QEMU:
    /// the downtime and setup time it reports), so a figure can be explained.
    pub detail: Value,
    /// Throughput rounds: loopback TCP measured right after the round, bytes/s (one
    /// connection between 1 MiB buffers; as many connections as the run used between
    /// 1 GiB buffers; that number).
    pub loopback: Option<(f64, f64, usize)>,
}

/// What a post-copy run measured beyond the others.
#[derive(Debug, Clone, Default)]
pub struct PostcopyRun {
    /// From `migrate` to `migrate-start-postcopy`, ms.
    pub switch_ms: f64,
    /// Pages the destination asked for (the source's count).
    pub requests: u64,
    /// Faults whose wait was measured (fault seen by the fault thread to page placed).
    pub faults: u64,
    /// Median and 99th percentile of those waits, µs.
    pub fault_p50_us: f64,
    /// 99th percentile.
    pub fault_p99_us: f64,
    /// The time the vCPU waited for pages, ms (the destination's
    /// `postcopy-vcpu-blocktime`, summed over vCPUs).
    pub vcpu_blocked_ms: Option<f64>,
    /// Ours: the waits by the connection the page came on (the destination's
    /// `on_preempt` and `on_stream`: count, p50/p99/max µs).
    pub faults_by_connection: Option<Value>,
    /// The waits by powers of two: (bound µs, how many below it and at least half of
    /// it), so that rounds can be pooled.
    pub fault_histogram_us: Vec<(u64, u64)>,
    /// The guest's passes per second before the migration.
    pub work_before: f64,
    /// Its passes per second at the destination while post-copy ran.
    pub work_postcopy: f64,
    /// (ms since migrate, the guest's passes so far wherever it runs).
    pub work: Vec<(f64, u64)>,
}

/// MB/s of `bytes` sent in `total_ms`.
pub fn mb_per_s(bytes: f64, total_ms: f64) -> f64 {
    bytes / (total_ms / 1e3).max(1e-9) / 1e6
}

impl Run {
    /// Its throughput: stream bytes over total time, MB/s.
    pub fn throughput(&self) -> f64 {
        mb_per_s(self.bytes as f64, self.total_ms)
    }

    /// A run of scenario `scenario` that has not completed (yet).
    pub fn new(side: &'static str, scenario: &'static str, limit: u64, round: usize) -> Self {
        Run {
            side,
            scenario,
            limit,
            round,
            completed: false,
            total_ms: 0.0,
            downtime_ms: 0.0,
            bytes: 0,
            error: None,
            series: Vec::new(),
            throttle: 0,
            mem: None,
            postcopy: None,
            detail: Value::Null,
            loopback: None,
        }
    }

    /// As results.json has it.
    pub fn json(&self) -> Value {
        json!({"side": self.side, "scenario": self.scenario, "limit_ms": self.limit, "round": self.round,
               "completed": self.completed, "total_ms": self.total_ms, "downtime_ms": self.downtime_ms,
               "bytes": self.bytes, "throttle_max": self.throttle,
               "mem_overhead": self.mem.map(|(s, d)| json!({"source": s, "destination": d})),
               "postcopy": self.postcopy.as_ref().map(|p| json!({
                   "switch_ms": p.switch_ms, "requests": p.requests, "faults": p.faults,
                   "fault_p50_us": p.fault_p50_us, "fault_p99_us": p.fault_p99_us,
                   "vcpu_blocked_ms": p.vcpu_blocked_ms, "by_connection": p.faults_by_connection,
                   "fault_histogram_us": p.fault_histogram_us,
                   "work_before": p.work_before, "work_postcopy": p.work_postcopy})),
               "loopback": self.loopback.map(|(tcp, buffers, n)| json!({
                   "tcp_bps": tcp, "buffers_bps": buffers, "connections": n})),
               "detail": self.detail, "error": self.error})
    }
}
