//! `MemfdMemory`: guest RAM in a memfd, mapped shared, which a local migration hands
//! over to the destination instead of copying it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use memmap2::{MmapMut, MmapOptions};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::{RamBacking, SharedMemory};

/// Guest RAM in a memfd (QEMU's `memory-backend-memfd` with `share=on`).
///
/// Its memory is one shared mapping whose address never changes: on a destination,
/// [`SharedMemory::adopt`] maps the source's memfd over it in place, so regions and
/// hypervisor memory slots that point into it see the guest's memory from then on.
///
/// Who may run the guest on it: the process holding its ownership lock
/// ([`MemfdMemory::try_lock`]), a lock on an open file of its own, so that a source and a
/// destination sharing the memory exclude each other as they do for a shared disk.
#[derive(Debug)]
pub struct MemfdMemory {
    /// The mapping; only its address and length are used (the guest writes the memory
    /// concurrently, so no Rust reference to its bytes is ever made).
    map: MmapMut,
    // Lock: this mutex; `adopt` and `detach` replace both files together.
    files: Mutex<Files>,
}

#[derive(Debug)]
struct Files {
    /// The memfd now mapped (what a hand-over passes).
    memory: File,
    /// This process's own open file of it, which carries the ownership lock (a passed
    /// descriptor shares its open file with the source's, so it cannot).
    owner: File,
    locked: bool,
}

impl MemfdMemory {
    /// A memfd named `name` of `size` bytes (zero), mapped shared. Pages take memory only
    /// when written.
    ///
    /// # Errors
    /// The memfd cannot be created, sized or mapped.
    pub fn new(name: &str, size: usize) -> io::Result<Self> {
        let memory = new_memfd(name, size)?;
        // SAFETY: the memfd is new and ours; what maps it (this process, a destination it
        // is handed to) shares it knowingly: nothing truncates it while it is mapped.
        let map = unsafe { MmapOptions::new().len(size).map_mut(&memory)? };
        let owner = reopen(&memory)?;
        Ok(MemfdMemory {
            map,
            files: Mutex::new(Files {
                memory,
                owner,
                locked: false,
            }),
        })
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the ownership lock without waiting: this process may run the guest.
    ///
    /// # Errors
    /// `WouldBlock`: another process holds it (the guest runs there, or may).
    pub fn try_lock(&self) -> io::Result<()> {
        let mut f = self.files();
        if !f.locked {
            flock(&f.owner, libc::LOCK_EX | libc::LOCK_NB)?;
            f.locked = true;
        }
        Ok(())
    }

    /// Releases the ownership lock (a source at the switchover of a hand-over).
    pub fn unlock(&self) {
        let mut f = self.files();
        if f.locked {
            let _ = flock(&f.owner, libc::LOCK_UN);
            f.locked = false;
        }
    }

    /// Maps a new, empty memfd in place of the memory, so this process no longer shares
    /// it: a destination whose load failed after it adopted the source's memory.
    ///
    /// # Errors
    /// The new memfd cannot be created or mapped.
    pub fn detach(&self) -> io::Result<()> {
        let fresh = new_memfd("detached", self.map.len())?;
        self.map_in_place(fresh)
    }

    /// Maps `memory` over the mapping, at the same address, and makes it the memory.
    fn map_in_place(&self, memory: File) -> io::Result<()> {
        let owner = reopen(&memory)?;
        let mut f = self.files();
        // SAFETY: MAP_FIXED replaces exactly our own mapping (same address and length) with
        // a shared mapping of `memory`, whose size the caller checked; the address stays
        // valid for everyone who points into it.
        let p = unsafe {
            libc::mmap(
                self.map.as_ptr() as *mut libc::c_void,
                self.map.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memory.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if f.locked {
            let _ = flock(&f.owner, libc::LOCK_UN);
        }
        *f = Files {
            memory,
            owner,
            locked: false,
        };
        Ok(())
    }
}

// SAFETY: the mapping lives, at one address and length, as long as the value; `adopt` and
// `detach` replace what is mapped there, never the range.
unsafe impl RamBacking for MemfdMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }
    fn size(&self) -> usize {
        self.map.len()
    }
}

impl SharedMemory for MemfdMemory {
    fn descriptor(&self) -> io::Result<OwnedFd> {
        self.files().memory.as_fd().try_clone_to_owned()
    }

    fn adopt(&self, fd: OwnedFd) -> io::Result<()> {
        let memory = File::from(fd);
        let meta = memory.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the descriptor passed is not a memory file",
            ));
        }
        if meta.len() < self.map.len() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the memory passed has {} bytes, fewer than this block's {}",
                    meta.len(),
                    self.map.len()
                ),
            ));
        }
        self.map_in_place(memory)
    }
}

fn new_memfd(name: &str, size: usize) -> io::Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
    let f = File::from(fd);
    f.set_len(size as u64)?;
    Ok(f)
}

/// A new open file of the same memory (through /proc, as a memfd has no path).
fn reopen(f: &File) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on an open descriptor borrowed for the call; no memory involved.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
