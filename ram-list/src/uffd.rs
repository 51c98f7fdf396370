//! userfaultfd: guest RAM whose missing pages someone else supplies, the mechanism of a
//! post-copy destination. Registered memory (`MISSING` mode) makes every thread that
//! touches a page nobody placed yet wait, a vCPU inside `KVM_RUN` included, while a
//! fault thread reads the fault ([`Userfault::read_event`]), gets the page and places it
//! atomically ([`Userfault::copy`], [`Userfault::zero`]), which wakes the waiters.
//!
//! Measured on these hosts (ARCHITECTURE.md, "Post-copy groundwork"): KVM under kvm-pvm
//! resolves guest faults through it, anonymous and memfd memory alike. The descriptor is
//! made without `UFFD_USER_MODE_ONLY`, which would leave faults taken in the kernel (KVM's
//! among them) undelivered: that needs root (or CAP_SYS_PTRACE), or access to
//! `/dev/userfaultfd`, which is tried second.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING mode on shared memory (a memfd).
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_THREAD_ID`: faults name the faulting thread.
const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// The ioctls a registration must allow: WAKE, COPY, ZEROPAGE (`1 << _UFFDIO_*`).
const NEEDED_IOCTLS: u64 = (1 << 2) | (1 << 3) | (1 << 4);

/// `_IOWR(0xaa, nr, size)` / `_IOR(0xaa, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
/// `USERFAULTFD_IOC_NEW`: `_IO(0xaa, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa << 8;
/// `struct uffd_msg`: 32 bytes, packed.
const MSG_LEN: usize = 32;

/// A thread waiting for a page that nobody placed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The host address that faulted (not page-aligned).
    pub address: u64,
    /// Whether it was a write.
    pub write: bool,
    /// The faulting thread (its tid).
    pub thread: u32,
}

/// What became of a page handed to [`Userfault::copy`] or [`Userfault::zero`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page is in place now; its waiters run.
    Now,
    /// It was in place already (placed before, or a duplicate fault): left as it was,
    /// and its waiters woken in case they waited on the duplicate.
    Already,
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    features: u64,
}

fn ioctl<T>(fd: RawFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the kernel's structure for `request` (the constants above encode
    // its size), valid for reads and writes for the call.
    let r = unsafe { libc::ioctl(fd, request as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// A descriptor that delivers every fault (the kernel's included), non-blocking,
    /// with fault thread ids, and MISSING mode on shared memory where the kernel has it.
    ///
    /// # Errors
    /// Neither `userfaultfd(2)` nor `/dev/userfaultfd` gives one (not root, and no
    /// access to the device), or the kernel's API is not the one expected.
    pub fn new() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes only flags and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if raw >= 0 {
            // SAFETY: the syscall just returned this descriptor, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            let syscall_error = io::Error::last_os_error();
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|e| {
                    io::Error::new(
                        syscall_error.kind(),
                        format!(
                            "userfaultfd: {syscall_error} (it needs root or CAP_SYS_PTRACE), \
                             and /dev/userfaultfd: {e}"
                        ),
                    )
                })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new
            // descriptor or -1.
            let raw = unsafe {
                libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::c_ulong, flags)
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the ioctl just returned this descriptor, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        // Thread ids (Linux 4.14) and shared memory (4.11): a kernel without either
        // refuses the call.
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_THREAD_ID | FEATURE_MISSING_SHMEM,
            ..Default::default()
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| {
            io::Error::new(e.kind(), format!("UFFDIO_API (thread ids, shmem): {e}"))
        })?;
        Ok(Userfault {
            fd,
            features: api.features,
        })
    }

    /// Whether faults name their thread.
    pub fn reports_threads(&self) -> bool {
        self.features & FEATURE_THREAD_ID != 0
    }

    /// Registers `len` bytes at `start` (page-aligned, mapped) in MISSING mode: from now
    /// on a page of it that was never populated makes whoever touches it wait for
    /// [`Userfault::copy`] or [`Userfault::zero`].
    ///
    /// # Errors
    /// The kernel refuses the range (unaligned, unmapped, a kind of memory it cannot
    /// register), or it would not allow placing pages in it.
    pub fn register(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut r)
            .map_err(|e| io::Error::new(e.kind(), format!("UFFDIO_REGISTER: {e}")))?;
        if r.ioctls & NEEDED_IOCTLS != NEEDED_IOCTLS {
            let _ = self.unregister(start, len);
            return Err(io::Error::other(format!(
                "UFFDIO_REGISTER: the range allows ioctls {:#x}, not COPY, ZEROPAGE and WAKE",
                r.ioctls
            )));
        }
        Ok(())
    }

    /// Ends the registration of `len` bytes at `start`: missing pages read as zero (or
    /// the file's content) again, and nobody waits any more.
    ///
    /// # Errors
    /// The kernel's.
    pub fn unregister(&self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r)
    }

    /// The next fault, waiting at most `timeout` (None: for ever). `Ok(None)` when none
    /// came in time. Events other than page faults (none are asked for) are skipped.
    ///
    /// # Errors
    /// The descriptor fails.
    pub fn read_event(&self, timeout: Option<Duration>) -> io::Result<Option<PageFault>> {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(None);
            }
            let mut msg = [0u8; MSG_LEN];
            // SAFETY: reads at most MSG_LEN bytes into the buffer.
            let got = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_LEN) };
            if got < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    // Another reader took it, or a signal: wait again.
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            if got as usize != MSG_LEN {
                return Err(io::Error::other(format!(
                    "userfaultfd: a message of {got} bytes, not {MSG_LEN}"
                )));
            }
            if msg[0] != EVENT_PAGEFAULT {
                continue;
            }
            let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8"));
            return Ok(Some(PageFault {
                write: word(8) & PAGEFAULT_FLAG_WRITE != 0,
                address: word(16),
                thread: u32::from_ne_bytes(msg[24..28].try_into().expect("4")),
            }));
        }
    }

    /// Places the page `src` at `dst` (page-aligned, registered) atomically and wakes
    /// whoever waits for it. (For several pages, [`Userfault::copy_pages`]: this call
    /// reports them [`Placed::Already`] as soon as one was in place.)
    ///
    /// # Errors
    /// The kernel's: `dst` is not registered or not aligned.
    pub fn copy(&self, dst: *mut u8, src: &[u8]) -> io::Result<Placed> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        self.place(UFFDIO_COPY, &mut c, dst, src.len(), "UFFDIO_COPY")
    }

    /// Places consecutive pages `src` at `dst` (page-aligned, registered) with as few
    /// calls as the kernel allows, and wakes whoever waits for them. Pages in place
    /// already are left as they were (their waiters woken); the others are placed.
    /// Returns how many pages were placed now. One call for many pages costs about half
    /// what one call per page does (measured here: 1.1 against 2.0 µs a page).
    ///
    /// # Errors
    /// The kernel's: `dst` is not registered or not aligned.
    pub fn copy_pages(&self, dst: *mut u8, src: &[u8], page: usize) -> io::Result<usize> {
        let (mut done, mut placed) = (0usize, 0usize);
        while done < src.len() {
            let mut c = UffdioCopy {
                dst: dst as u64 + done as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(placed + (src.len() - done) / page),
                // Some pages went in before a page in place (or a mapping change)
                // stopped the call: go on after them.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if c.copy > 0 {
                        done += c.copy as usize;
                        placed += c.copy as usize / page;
                    }
                }
                // The first page is in place already: wake its waiters, skip it.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // (An address for the kernel, never dereferenced here.)
                    self.wake(dst.wrapping_add(done), page)?;
                    done += page;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("UFFDIO_COPY: {e}"))),
            }
        }
        Ok(placed)
    }

    /// Places zero pages at `dst` (`len` bytes, page-aligned, registered) and wakes
    /// whoever waits for them.
    ///
    /// # Errors
    /// As [`Userfault::copy`].
    pub fn zero(&self, dst: *mut u8, len: usize) -> io::Result<Placed> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        self.place(UFFDIO_ZEROPAGE, &mut z, dst, len, "UFFDIO_ZEROPAGE")
    }

    fn place<T>(
        &self,
        request: u64,
        arg: &mut T,
        dst: *mut u8,
        len: usize,
        what: &str,
    ) -> io::Result<Placed> {
        loop {
            match ioctl(self.fd.as_raw_fd(), request, arg) {
                Ok(()) => return Ok(Placed::Now),
                // The mapping changed under the call (the kernel says try again).
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Present already: a waiter of a duplicate fault still needs waking
                    // (seen on kvm-pvm's emulated path after a signal).
                    self.wake(dst, len)?;
                    return Ok(Placed::Already);
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{what}: {e}"))),
            }
        }
    }

    /// Wakes whoever waits on `len` bytes at `dst` (placed by other means).
    ///
    /// # Errors
    /// The kernel's.
    pub fn wake(&self, dst: *mut u8, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: dst as u64,
            len: len as u64,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r)
            .map_err(|e| io::Error::new(e.kind(), format!("UFFDIO_WAKE: {e}")))
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From linux/userfaultfd.h on x86_64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }
}
