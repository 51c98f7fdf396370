//! Built without the `multifd` feature: the receiver's interface, whose channels cannot
//! be started, so a destination with the `multifd` capability fails clearly. `recv.rs`
//! is the real one.

use std::convert::Infallible;

use qemu_file::{ShutdownHandle, Transport};

use super::RecvTarget;
use crate::{Error, Result};

/// A destination's multifd channels: never made in this build.
#[derive(Debug)]
pub struct MultifdReceiver(Infallible);

impl MultifdReceiver {
    /// Fails: no multifd in this build.
    ///
    /// # Errors
    /// Always, [`Error::MultifdSetup`].
    pub fn start(
        _channels: Vec<Box<dyn Transport>>,
        _target: RecvTarget,
        _on_error: Option<ShutdownHandle>,
    ) -> Result<Self> {
        Err(Error::MultifdSetup {
            reason: "this build has no multifd (ram-list's `multifd` feature is off)".into(),
        })
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    /// None.
    pub fn sync(&self) -> Result<()> {
        match self.0 {}
    }

    /// Never called.
    pub fn bytes_read(&self) -> u64 {
        match self.0 {}
    }

    /// Never called.
    pub fn fail(&self, _e: Error) {
        match self.0 {}
    }

    /// Never called.
    pub fn error(&self) -> Option<Error> {
        match self.0 {}
    }

    /// Never called.
    pub fn finish(&self) {
        match self.0 {}
    }
}
