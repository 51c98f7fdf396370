//! What a migration reports (`query-migrate`): its status, progress and completion
//! times.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// The state of a migration, with QEMU's names (`query-migrate`'s `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationStatus {
    /// No migration has started.
    #[default]
    None,
    /// Writing the header and the START sections.
    Setup,
    /// Iterating while the guest runs.
    Active,
    /// The guest is stopped and the rest is being sent.
    Device,
    /// Everything was sent (and, with a return path, loaded by the destination).
    Completed,
    /// The migration failed; the source runs on.
    Failed,
    /// A cancel was requested and is being carried out.
    Cancelling,
    /// The migration was cancelled; the source runs on.
    Cancelled,
    /// The guest is stopped for the switchover and the migration waits for
    /// `migrate-continue` (the `pause-before-switchover` capability).
    PreSwitchover,
    /// The guest runs at the destination, which fetches the pages it lacks (post-copy).
    PostcopyActive,
    /// Post-copy was interrupted (the connection failed): neither side has the whole
    /// guest; the destination waits, paused, and the source keeps its copy, stopped,
    /// until a new connection resumes it (`migrate-recover`, `migrate` with `resume`).
    PostcopyPaused,
    /// A paused post-copy is resuming over a new connection.
    PostcopyRecover,
}

impl MigrationStatus {
    /// QEMU's name, as in `query-migrate` and MIGRATION events.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Device => "device",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
        }
    }

    /// Whether the migration has ended. `postcopy-paused` has not, as in QEMU: it waits
    /// to be resumed.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    /// Whether the guest has switched to the destination (post-copy runs or ran).
    pub fn in_postcopy(self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long each step of the completion phase took: the guest is paused through all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompletionTimes {
    /// Until every vCPU was out of KVM_RUN.
    pub stop_vcpus: Duration,
    /// Flushing the disks.
    pub flush_disks: Duration,
    /// The final dirty sync.
    pub final_sync: Duration,
    /// Sending what the live sections (RAM, disks) still had, and writing it out.
    pub send_ram: Duration,
    /// Saving and sending the devices, EOF and the description.
    pub send_devices: Duration,
    /// Waiting for the destination to say it loaded everything (return path).
    pub wait_destination: Duration,
    /// From the stop request to the end of the above: the source's view of the downtime.
    pub total: Duration,
}

/// A snapshot of a migration (`query-migrate`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MigrationInfo {
    /// Where it stands.
    pub status: MigrationStatus,
    /// Since the start (or the whole migration once ended); while it runs, as of the
    /// last chunk written (`started` gives it to the moment).
    pub total_time: Duration,
    /// When the migration started.
    pub started: Option<Instant>,
    /// Header and START sections.
    pub setup_time: Duration,
    /// The source's measured downtime, once completed.
    pub downtime: Option<Duration>,
    /// Pending bytes / bandwidth at the last window.
    pub expected_downtime: Duration,
    /// Stream bytes produced so far (multifd channels' included).
    pub transferred: u64,
    /// The part of `transferred` that connections other than the main stream carried
    /// (RAM's multifd channels: QEMU's `multifd-bytes`).
    pub bytes_elsewhere: u64,
    /// The part of `transferred` sent with the guest stopped, once completed.
    pub downtime_bytes: u64,
    /// Bytes the live sections still have to send (last estimate).
    pub remaining: u64,
    /// Bandwidth of the last 100 ms window, bytes per second.
    pub bandwidth: f64,
    /// Threshold of the last window: bandwidth × downtime limit, bytes.
    pub threshold: u64,
    /// Chunks collected and written.
    pub iterations: u64,
    /// Exact pending figures asked for (each one a dirty sync).
    pub dirty_syncs: u64,
    /// Wall-clock time the source asked its vCPUs to stop (to compute the real downtime
    /// against the destination's resume time).
    pub stopped_at: Option<SystemTime>,
    /// The completion breakdown, once the completion phase ran.
    pub completion: Option<CompletionTimes>,
    /// How much the vCPUs are throttled (auto-converge), percent.
    pub cpu_throttle_percentage: u8,
    /// The most they were throttled in this migration, percent.
    pub cpu_throttle_peak: u8,
    /// What went wrong, for `failed` and `cancelled`.
    pub error: Option<String>,
    /// The switchover waited in `pre-switchover` (the `device` status then follows it).
    pub paused_before_switchover: bool,
    /// Failed after the whole stream went out, without the destination's answer: the
    /// guest may run there, and this source stays stopped.
    pub outcome_unknown: bool,
    /// Post-copy: page requests the destination made (QEMU's `postcopy-requests`).
    pub postcopy_requests: u64,
    /// Post-copy: stream bytes sent after the switch (QEMU's `postcopy-bytes`).
    pub postcopy_bytes: u64,
    /// Post-copy preempt: of those, the bytes sent on the preempt connection.
    pub postcopy_preempt_bytes: u64,
    /// Post-copy: when the switch began, the guest stopping here.
    pub postcopy_started: Option<Instant>,
}
