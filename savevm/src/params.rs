//! `MigrationParams`: the parameters and capabilities of an outgoing migration, with
//! QEMU's names.

use std::time::Duration;

/// The migration thread's parameters, with QEMU's names. What other sections need (RAM's
/// multifd channels, say) is theirs to hold.
///
/// New parameters come with new releases: start from [`MigrationParams::default`] and
/// set what you need.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationParams {
    /// `downtime-limit`: the longest pause the switchover may cause (default 300 ms).
    pub downtime_limit: Duration,
    /// `max-bandwidth` in bytes per second; 0 is unlimited (the default).
    pub max_bandwidth: u64,
    /// Bytes collected per hold of the VM lock before they are written (default 2 MiB).
    pub chunk_bytes: usize,
    /// Whether the destination answers on the reverse direction of the stream, and the
    /// source keeps its VM until it says it loaded everything (sockets; not exec or file).
    pub return_path: bool,
    /// The `auto-converge` capability: throttle vCPUs that dirty memory faster than it
    /// can be sent (see [`crate::convergence`]).
    pub auto_converge: bool,
    /// `cpu-throttle-initial`: the first throttle, percent (default 20).
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`: added at each further step, percent (default 10).
    pub cpu_throttle_increment: u8,
    /// `max-cpu-throttle`: the most the vCPUs are throttled, percent (default 99).
    pub max_cpu_throttle: u8,
    /// `throttle-trigger-threshold`: the dirtied bytes of a period, as a percentage of
    /// those sent, above which the guest counts as dirtying too fast (default 50).
    pub throttle_trigger_threshold: u8,
    /// `x-stall-timeout`: how long the pending bytes may stay without dropping (and no
    /// throttle rise) before the migration fails as unable to converge (default 30 s).
    pub stall_timeout: Duration,
    /// `x-incoming-timeout`: how long a destination's read of the stream may wait without
    /// a byte before the load fails (default 120 s: a link that moves at all delivers
    /// something far more often; a source held in `pre-switchover` longer needs more).
    pub incoming_timeout: Duration,
    /// The `pause-before-switchover` capability: once the guest is stopped for the
    /// switchover, wait in `pre-switchover` for [`MigrationControl::continue_switchover`](crate::MigrationControl::continue_switchover)
    /// (an orchestrator's moment to move what the VMM does not, e.g. network ports).
    pub pause_before_switchover: bool,
    /// Once the pending bytes fit the limit, send further rounds while they shorten the
    /// pause ([`crate::switchover::Approach`]; default on). Off: switch over at the first
    /// moment that fits, as QEMU does.
    pub approach: bool,
    /// The `postcopy-ram` capability: the migration may switch to post-copy
    /// ([`MigrationControl::start_postcopy`](crate::MigrationControl::start_postcopy)),
    /// after which the guest runs at the destination and the pages it lacks follow on
    /// demand. Needs a stream with a return path.
    pub postcopy: bool,
    /// `max-postcopy-bandwidth` in bytes per second, the limit once post-copy runs (the
    /// guest waits for what is not there yet); 0 is unlimited (the default).
    pub max_postcopy_bandwidth: u64,
    /// `x-postcopy-auto`: with `postcopy` on, switch to post-copy by itself where
    /// pre-copy would throttle the guest or give up (the convergence watch's verdict),
    /// instead of waiting for `migrate-start-postcopy`.
    pub postcopy_auto: bool,
    /// `postcopy-preempt`: after the switch, the pages the destination asks for go on
    /// a second connection of their own (opened with the main stream, given with
    /// [`MigrationControl::set_preempt_channel`](crate::MigrationControl::set_preempt_channel)),
    /// never behind the background pass.
    pub postcopy_preempt: bool,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: 0,
            chunk_bytes: 2 << 20,
            return_path: false,
            auto_converge: false,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            throttle_trigger_threshold: 50,
            stall_timeout: Duration::from_secs(30),
            incoming_timeout: Duration::from_secs(120),
            pause_before_switchover: false,
            approach: true,
            postcopy: false,
            max_postcopy_bandwidth: 0,
            postcopy_auto: false,
            postcopy_preempt: false,
        }
    }
}
