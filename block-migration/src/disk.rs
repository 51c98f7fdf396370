//! `Disk`: a raw disk image with positional I/O, an exclusive lock, and a dirty bitmap of
//! 1 MiB chunks that every write marks.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use dirty_bitmap::DirtyBitmap;

use crate::format::CHUNK_SIZE;
use crate::{Error, Result};

/// How a disk is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskOptions {
    /// Whether the image is copied by block migration (`migrate=on`) or is shared storage
    /// that both sides reach (`migrate=off`: flushed at completion, not copied).
    pub migrate: bool,
    /// Create the image if it does not exist (a destination sizes it from the stream).
    pub create: bool,
    /// Take the exclusive lock now. A destination's shared disk is locked only when the
    /// guest starts there, after the source released it.
    pub lock: bool,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            migrate: true,
            create: false,
            lock: true,
        }
    }
}

struct Layout {
    size: u64,
    dirty: Arc<DirtyBitmap>,
}

/// A raw disk image.
///
/// Writes go to the file with `pwrite` and then mark their chunks in the dirty bitmap (in
/// that order, so a migration that claims a chunk and reads it never misses a write:
/// either the read sees the data or the chunk is dirty again). Reads are single `pread`s of
/// whole chunks. While this process may write the image, it holds `flock(LOCK_EX)` on it,
/// so no second vmm writes the same image.
pub struct Disk {
    name: String,
    path: PathBuf,
    file: File,
    migrate: bool,
    locked: AtomicBool,
    // Lock: the size and the dirty bitmap; writes and the migration take it shared, a
    // destination's resize (create=on) takes it exclusive.
    layout: RwLock<Layout>,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("size", &self.size())
            .field("migrate", &self.migrate)
            .finish()
    }
}

fn flock(file: &File, op: libc::c_int) -> bool {
    // SAFETY: flock(2) on a descriptor we own; it touches no memory.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

impl Disk {
    /// Opens (or with `create`, creates) the image at `path` as disk `name`.
    ///
    /// # Errors
    /// [`Error::BadName`], [`Error::Open`], or [`Error::Locked`] when another process holds
    /// the image.
    pub fn open(path: &Path, name: &str, opts: &DiskOptions) -> Result<Self> {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::BadName { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(opts.create)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?
            .len();
        let disk = Disk {
            name: name.into(),
            path: path.into(),
            file,
            migrate: opts.migrate,
            locked: AtomicBool::new(false),
            layout: RwLock::new(Layout {
                size,
                dirty: Arc::new(DirtyBitmap::new(size.div_ceil(CHUNK_SIZE) as usize)),
            }),
        };
        if opts.lock {
            disk.lock()?;
        }
        Ok(disk)
    }

    fn layout(&self) -> RwLockReadGuard<'_, Layout> {
        self.layout.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk's name (its id in the stream).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether block migration copies it.
    pub fn migrates(&self) -> bool {
        self.migrate
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.layout().size
    }

    /// The dirty bitmap: one bit per 1 MiB chunk written since it was last cleared.
    pub fn dirty(&self) -> Arc<DirtyBitmap> {
        self.layout().dirty.clone()
    }

    /// Chunks in the disk.
    pub fn chunks(&self) -> u64 {
        self.size().div_ceil(CHUNK_SIZE)
    }

    /// Takes the exclusive lock (idempotent).
    ///
    /// # Errors
    /// [`Error::Locked`] while another process holds it.
    pub fn lock(&self) -> Result<()> {
        if self.locked.load(Ordering::SeqCst) {
            return Ok(());
        }
        if !flock(&self.file, libc::LOCK_EX | libc::LOCK_NB) {
            return Err(Error::Locked {
                path: self.path.clone(),
            });
        }
        self.locked.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Releases the lock (a source handing a shared disk to the destination).
    pub fn unlock(&self) {
        if self.locked.swap(false, Ordering::SeqCst) {
            flock(&self.file, libc::LOCK_UN);
        }
    }

    /// Whether this process holds the lock.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::SeqCst)
    }

    fn io(&self, op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            op,
            name: self.name.clone(),
            offset,
            source,
        }
    }

    fn check_range(&self, op: &'static str, offset: u64, len: usize) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(self.io(op, offset)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} pass the end of the {size}-byte disk"),
            )));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (one `pread`, retried until complete).
    ///
    /// # Errors
    /// Past the end, or an I/O error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("reading", offset, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io("reading", offset))
    }

    /// Writes `buf` at `offset`, then marks its chunks dirty.
    ///
    /// # Errors
    /// Past the end, or an I/O error.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("writing", offset, buf.len())?;
        self.file
            .write_all_at(buf, offset)
            .map_err(self.io("writing", offset))?;
        if !buf.is_empty() {
            let first = offset / CHUNK_SIZE;
            let last = (offset + buf.len() as u64 - 1) / CHUNK_SIZE;
            self.layout()
                .dirty
                .set_range(first as usize..last as usize + 1);
        }
        Ok(())
    }

    /// Writes to stable storage (fsync).
    ///
    /// # Errors
    /// An I/O error.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_all().map_err(self.io("flushing", 0))
    }

    /// Makes the image `size` bytes long (a destination creating it from the stream), with
    /// a fresh dirty bitmap.
    ///
    /// # Errors
    /// An I/O error.
    pub fn set_size(&self, size: u64) -> Result<()> {
        let mut l = self.layout.write().unwrap_or_else(|p| p.into_inner());
        self.file.set_len(size).map_err(self.io("resizing", size))?;
        *l = Layout {
            size,
            dirty: Arc::new(DirtyBitmap::new(size.div_ceil(CHUNK_SIZE) as usize)),
        };
        Ok(())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("blockmig-disk-{}-{name}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn writes_mark_their_chunks_after_the_data() {
        let p = tmp("mark", 3 * CHUNK_SIZE + 4096);
        let d = Disk::open(&p, "d0", &DiskOptions::default()).unwrap();
        assert_eq!(d.chunks(), 4);
        d.write_at(&[7; 8192], CHUNK_SIZE - 4096).unwrap();
        d.write_at(&[1; 512], 3 * CHUNK_SIZE).unwrap();
        assert_eq!(d.dirty().iter().collect::<Vec<_>>(), [0, 1, 3]);
        let mut b = [0u8; 8192];
        d.read_at(&mut b, CHUNK_SIZE - 4096).unwrap();
        assert!(b.iter().all(|x| *x == 7));
        assert!(
            d.write_at(&[0; 8192], 3 * CHUNK_SIZE).is_err(),
            "past the end"
        );
        assert!(d.read_at(&mut b, u64::MAX - 10).is_err());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_second_opener_is_refused_until_the_lock_is_released() {
        let p = tmp("lock", CHUNK_SIZE);
        let a = Disk::open(&p, "a", &DiskOptions::default()).unwrap();
        let e = Disk::open(&p, "b", &DiskOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        let b = Disk::open(
            &p,
            "b",
            &DiskOptions {
                lock: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(b.lock().is_err());
        a.unlock();
        b.lock().unwrap();
        assert!(a.lock().is_err());
        drop(b);
        a.lock().unwrap();
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn create_and_resize() {
        let p = std::env::temp_dir().join(format!("blockmig-disk-{}-create", std::process::id()));
        let _ = std::fs::remove_file(&p);
        assert!(Disk::open(&p, "c", &DiskOptions::default()).is_err());
        let d = Disk::open(
            &p,
            "c",
            &DiskOptions {
                create: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(d.size(), 0);
        d.set_size(5 * CHUNK_SIZE).unwrap();
        assert_eq!(
            (d.size(), d.chunks(), d.dirty().len()),
            (5 * CHUNK_SIZE, 5, 5)
        );
        std::fs::remove_file(p).unwrap();
    }
}
