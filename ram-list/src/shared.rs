//! `SharedMemory`: guest RAM that another process can map, so a local migration hands
//! it over instead of copying it.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;

/// The memory behind a RAM block when it is shared memory (a memfd or a file mapped
/// `MAP_SHARED`), given to the block with [`RamBlock::with_shared`](crate::RamBlock::with_shared).
///
/// With the `x-ignore-shared` capability (QEMU's name) such a block's pages are not
/// sent: the source passes the memory's descriptor with the stream over a unix socket
/// (SCM_RIGHTS, to a process of the same user only), and the destination maps it in
/// place of its own. Only device and vCPU state is copied, so the pause does not grow
/// with the guest's size.
pub trait SharedMemory: Send + Sync + fmt::Debug {
    /// A descriptor of the memory to pass to the destination.
    ///
    /// # Errors
    /// The descriptor cannot be duplicated.
    fn descriptor(&self) -> io::Result<OwnedFd>;

    /// On the destination, before its guest ever runs: maps the memory of `fd` (passed by
    /// the source) in place of the block's own, at the same host address, so everything
    /// that points into the block (vm-memory regions, the hypervisor's memory slot) sees
    /// the guest's memory from now on.
    ///
    /// # Errors
    /// `fd` is not memory of at least the block's size, or cannot be mapped; the block
    /// keeps its own memory then.
    fn adopt(&self, fd: OwnedFd) -> io::Result<()>;
}
