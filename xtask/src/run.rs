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
}

impl Run {
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
        }
    }

    /// As results.json has it.
    pub fn json(&self) -> Value {
        json!({"side": self.side, "scenario": self.scenario, "limit_ms": self.limit, "round": self.round,
               "completed": self.completed, "total_ms": self.total_ms, "downtime_ms": self.downtime_ms,
               "bytes": self.bytes, "throttle_max": self.throttle,
               "mem_overhead": self.mem.map(|(s, d)| json!({"source": s, "destination": d})),
               "error": self.error})
    }
}
