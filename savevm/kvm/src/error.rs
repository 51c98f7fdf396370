//! The errors of reading and loading KVM state.

/// A KVM ioctl that failed, or state KVM did not take whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ioctl `op` failed.
    #[error("{op}")]
    Ioctl {
        /// The ioctl, e.g. `KVM_GET_REGS`.
        op: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("KVM {verb} {done} of {asked} MSRs")]
    Msrs {
        /// `read` or `took`.
        verb: &'static str,
        /// How many it did.
        done: usize,
        /// How many were asked for.
        asked: usize,
    },
    /// The MSR list cannot be built (more than KVM's list holds).
    #[error("MSR list: {0}")]
    MsrList(String),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Names a failed ioctl.
pub(crate) fn ioctl<T>(
    op: &'static str,
    r: std::result::Result<T, kvm_ioctls::Error>,
) -> Result<T> {
    r.map_err(|source| Error::Ioctl { op, source })
}
