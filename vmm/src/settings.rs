//! What `migrate-set-parameters` and `migrate-set-capabilities` set, for the next
//! migration and the running one: the migration thread's parameters (savevm's
//! `MigrationParams`) and the RAM section's (multifd, x-ignore-shared), which the generic
//! driver never reads.

use ram_list::MultifdCompression;
use savevm::MigrationParams;

/// A vmm's migration settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// The migration thread's.
    pub migration: MigrationParams,
    /// The RAM section's.
    pub ram: RamSettings,
}

/// How RAM travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamSettings {
    /// The `multifd` capability: RAM pages travel over `multifd_channels` extra
    /// connections besides the main stream (tcp and unix only).
    pub multifd: bool,
    /// `multifd-channels`: how many (default 2, as QEMU).
    pub multifd_channels: u8,
    /// `multifd-compression`: how each batch of pages is compressed (default none).
    pub multifd_compression: MultifdCompression,
    /// `multifd-zstd-level`: zstd's level, 0 to 20 (default 1).
    pub multifd_zstd_level: u8,
    /// The `x-ignore-shared` capability (set on both sides): RAM in shared memory is
    /// handed over instead of copied (a local migration over a unix socket).
    pub ignore_shared: bool,
}

impl Default for RamSettings {
    fn default() -> Self {
        RamSettings {
            multifd: false,
            multifd_channels: 2,
            multifd_compression: MultifdCompression::None,
            multifd_zstd_level: 1,
            ignore_shared: false,
        }
    }
}
