//! Built without the `multifd` feature: the sender's interface, whose channels cannot be
//! started, so the `multifd` capability fails clearly and the RAM section keeps one
//! stream. `send.rs` is the real one.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use qemu_file::Transport;

use super::MultifdCompression;
use crate::{Error, RamBlock, Result};

/// Batches a channel may have queued (the real sender's bound).
pub const QUEUED_BATCHES: usize = 256;

/// A source's multifd channels: never made in this build.
#[derive(Debug)]
pub struct MultifdSender(Infallible);

impl MultifdSender {
    /// Fails: no multifd in this build.
    ///
    /// # Errors
    /// Always, [`Error::MultifdSetup`].
    pub fn start(
        _channels: Vec<Box<dyn Transport>>,
        _uuid: [u8; 16],
        _compression: MultifdCompression,
        _zstd_level: u8,
    ) -> Result<Self> {
        Err(Error::MultifdSetup {
            reason: "this build has no multifd (ram-list's `multifd` feature is off)".into(),
        })
    }

    /// Never called (no value exists).
    pub fn set_bandwidth(&mut self, _bytes_per_sec: u64) {
        match self.0 {}
    }

    /// Never called.
    pub fn can_take(&self, _block: &Arc<RamBlock>) -> bool {
        match self.0 {}
    }

    /// Never called.
    ///
    /// # Errors
    /// None.
    pub fn push(&mut self, _block: &Arc<RamBlock>, _page: usize) -> Result<()> {
        match self.0 {}
    }

    /// Never called.
    ///
    /// # Errors
    /// None.
    pub fn end_round(&mut self) -> Result<()> {
        match self.0 {}
    }

    /// Never called.
    ///
    /// # Errors
    /// None.
    pub fn wait_room(&self) -> Result<()> {
        match self.0 {}
    }

    /// Never called.
    ///
    /// # Errors
    /// None.
    pub fn wait_drained(&self, _limit: Duration) -> Result<()> {
        match self.0 {}
    }

    /// Never called.
    ///
    /// # Errors
    /// None.
    pub fn wait_one(&self) -> Result<()> {
        match self.0 {}
    }

    /// Never called.
    pub fn in_flight(&self) -> u64 {
        match self.0 {}
    }

    /// Never called.
    pub fn take_written(&mut self) -> u64 {
        match self.0 {}
    }

    /// Never called.
    ///
    /// # Errors
    /// None.
    pub fn finish(&mut self) -> Result<()> {
        match self.0 {}
    }
}
