//! Anonymous files (memfd) for targets whose parser opens a path: nothing is left on disk.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

/// A memory-backed file and a path that opens it anew.
#[derive(Debug)]
pub struct MemFile {
    /// The file.
    pub file: File,
}

impl MemFile {
    /// An empty memfd.
    pub fn new(name: &str) -> Self {
        let cname = std::ffi::CString::new(name).expect("no NUL in the name");
        // SAFETY: `cname` is a valid C string; the flags are valid.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        MemFile { file }
    }

    /// `/proc/self/fd/N`: opening it opens the same memory.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}
