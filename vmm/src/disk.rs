//! The disks of a VM: opening `--drive`s and the block device the built-in guest drives.
//!
//! The device is deliberately small (a register-less "doorbell" over port I/O, documented
//! here) rather than virtio-blk: the guest is a 2 KiB program that must drive it from CPL 3,
//! where every port access traps, so one access per request matters.
//!
//! A request is a 32-byte block in guest memory:
//!
//! ```text
//! +0  u32 command   1 read, 2 write, 3 flush
//! +4  u32 status    written by the device: 1 done, 2 error
//! +8  u64 sector    first 512-byte sector
//! +16 u32 count     sectors, 1 to 2048 (1 MiB)
//! +24 u64 buffer    guest-physical address of the data
//! ```
//!
//! The guest writes the block's guest-physical address with a 32-bit `out` to the disk's
//! port (disk i at 0x510 + 4 i); the device carries the request out during that exit and
//! writes the status before the guest runs on. Data moves through vm-memory, so a read into
//! guest memory is dirty-tracked like any VMM write, and the disk's own dirty bitmap marks
//! every chunk a write touches.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use block_migration::{Disk, DiskOptions};
use rayon::prelude::*;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::DISK_PORT;
use vmm::spec::DriveSpec;

/// Read sectors into guest memory.
pub const CMD_READ: u32 = 1;
/// Write sectors from guest memory.
pub const CMD_WRITE: u32 = 2;
/// Flush the image to stable storage.
pub const CMD_FLUSH: u32 = 3;
/// The request was carried out.
pub const STATUS_DONE: u32 = 1;
/// The request was refused or failed.
pub const STATUS_ERROR: u32 = 2;
/// Most sectors one request moves.
pub const MAX_SECTORS: u32 = 2048;

/// Opens the disks of `specs`. A destination (`incoming`) leaves shared disks unlocked:
/// the source still writes them until the switchover.
///
/// # Errors
/// A duplicate id, a missing image, an image in use, a size that is not whole sectors.
pub fn open_disks(specs: &[DriveSpec], incoming: bool) -> Result<Vec<Arc<Disk>>> {
    let mut disks: Vec<Arc<Disk>> = Vec::new();
    for s in specs {
        if disks.iter().any(|d| d.name() == s.id) {
            bail!("two drives are named {:?}", s.id);
        }
        let mut options = DiskOptions::default();
        options.migrate = s.migrate;
        options.create = s.create;
        options.lock = s.migrate || !incoming;
        let d = Disk::open(&s.path, &s.id, &options)?;
        if d.size() % 512 != 0 {
            bail!(
                "disk image {} is not a whole number of 512-byte sectors",
                s.path.display()
            );
        }
        disks.push(Arc::new(d));
    }
    Ok(disks)
}

/// The block device: one doorbell port per disk.
pub struct BlockDevice {
    disks: Vec<Arc<Disk>>,
    mem: GuestMemoryMmap<AtomicBitmap>,
    buf: Vec<u8>,
}

impl BlockDevice {
    /// The device for `disks`, moving data through `mem`.
    pub fn new(disks: Vec<Arc<Disk>>, mem: GuestMemoryMmap<AtomicBitmap>) -> Self {
        BlockDevice {
            disks,
            mem,
            buf: Vec::new(),
        }
    }

    /// The disk whose port is `port`.
    pub fn disk_at(&self, port: u16) -> Option<usize> {
        let off = port.checked_sub(DISK_PORT)?;
        let i = usize::from(off / 4);
        (off % 4 == 0 && i < self.disks.len()).then_some(i)
    }

    /// Carries out the request at guest-physical `req` on disk `i`.
    pub fn request(&mut self, i: usize, req: u64) {
        let mut raw = [0u8; 32];
        if self.mem.read_slice(&mut raw, GuestAddress(req)).is_err() {
            return; // No request block to answer in.
        }
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
        let status = match self.execute(i, u32_at(0), u64_at(8), u32_at(16), u64_at(24)) {
            Ok(()) => STATUS_DONE,
            Err(_) => STATUS_ERROR,
        };
        let _ = self.mem.write_obj(status, GuestAddress(req + 4));
    }

    fn execute(&mut self, i: usize, cmd: u32, sector: u64, count: u32, buf: u64) -> Result<()> {
        let disk = &self.disks[i];
        if cmd == CMD_FLUSH {
            return Ok(disk.flush()?);
        }
        if count == 0 || count > MAX_SECTORS {
            bail!("bad sector count {count}");
        }
        let len = count as usize * 512;
        let offset = sector.checked_mul(512).context("sector out of range")?;
        self.buf.resize(len, 0);
        match cmd {
            CMD_READ => {
                disk.read_at(&mut self.buf, offset)?;
                self.mem.write_slice(&self.buf, GuestAddress(buf))?;
            }
            CMD_WRITE => {
                self.mem.read_slice(&mut self.buf, GuestAddress(buf))?;
                disk.write_at(&self.buf, offset)?;
            }
            other => bail!("unknown command {other}"),
        }
        Ok(())
    }
}

/// A hash of a disk image's contents (the `verify` check), computed in parallel.
///
/// # Errors
/// The image cannot be read.
pub fn hash(disk: &Disk) -> Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let size = disk.size();
    let parts: Vec<u64> = (0..size.div_ceil(CHUNK))
        .into_par_iter()
        .map(|i| {
            let mut buf = vec![0u8; CHUNK.min(size - i * CHUNK) as usize];
            disk.read_at(&mut buf, i * CHUNK)?;
            Ok(crate::memory::hash_bytes(i, &buf))
        })
        .collect::<Result<_>>()?;
    Ok(crate::memory::combine(&parts))
}
