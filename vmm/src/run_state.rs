//! The VM's run state, as QEMU names it.

/// The VM's run state, with QEMU's names (`query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Started with `--paused` (QEMU's `-S`): never run yet, waiting for `cont`.
    Prelaunch,
    /// The vCPUs run.
    Running,
    /// Stopped by the user (`stop`).
    Paused,
    /// A destination waiting for, or loading, a migration stream.
    InMigrate,
    /// Stopped by the migration thread for the switchover.
    FinishMigrate,
    /// Migrated away: this copy must not run again.
    PostMigrate,
    /// The guest crashed (triple fault, KVM entry failure).
    GuestPanicked,
    /// The process is ending (`quit`, a signal): stopped for good, without a STOP event
    /// (QEMU sends SHUTDOWN only).
    Shutdown,
}

impl RunState {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Shutdown => "shutdown",
        }
    }
}
