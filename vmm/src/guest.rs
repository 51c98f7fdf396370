//! The built-in test guest (`guest/guest.S`, assembled into `guest/guest.bin` by
//! `cargo xtask guest`) and its parameter block.
//!
//! The image starts with a boot sector: the same bytes boot under QEMU (SeaBIOS loads the
//! first sector from a raw disk, which reads the rest) and under vmm (which loads the whole
//! image at 0x7c00 and starts the vCPU there in real mode). The parameter block at byte
//! 0x180 says what the guest does; the status block at its end is where the guest reports
//! its passes and any stale pages or failed disk writes it found.

use anyhow::{Result, bail, ensure};

use crate::memory::{HIGH_MEMORY_START, LOW_MEMORY};

/// The assembled guest.
pub const IMAGE: &[u8; 2048] = include_bytes!("../guest/guest.bin");
/// Where a boot sector is loaded and entered.
pub const LOAD_ADDR: u64 = 0x7c00;
/// Largest image vmm loads at [`LOAD_ADDR`] (up to 0x17c00, below the EBDA).
pub const MAX_IMAGE: usize = 64 * 1024;
/// Offset of the parameter block in the image.
pub const PARAMS_OFFSET: usize = 0x180;
/// "MIGT": the parameter block's magic.
pub const PARAMS_MAGIC: &[u8; 4] = b"MIGT";
/// Offset of the status block (pass count, then stale-page count) in the image.
pub const STATUS_OFFSET: usize = 0x1b0;
/// Port of the built-in guest's disk 0.
pub const DISK_PORT: u16 = 0x510;
/// Lowest range start: below 1 MiB live the guest's tables, code and stacks.
pub const MIN_RANGE_START: u64 = 1 << 20;
/// Offset in the parameter block of where the hole starts (u64).
const HOLE_OFFSET: usize = 0x40;
/// Offset in the parameter block of the GiB count to map (u16).
const MAP_OFFSET: usize = 0x48;

const PAGE: u64 = 4096;

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Print "S" and halt.
    Idle,
    /// Write 0xa5 over the range once, print "F", halt.
    Fill,
    /// Rewrite the range pass after pass, checking every page's pass count.
    Dirty,
    /// Rewrite every 4 KiB block of disk 0 pass after pass, with a pattern of block and
    /// pass, reading each back first to check the previous pass's.
    Disk,
    /// Each pass a dirty pass over the range, then a disk pass.
    Mixed,
}

/// The parameter block (layout in `guest/guest.S`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// The workload.
    pub workload: Workload,
    /// First byte of the range (page aligned, at least 1 MiB).
    pub range_start: u64,
    /// Bytes in the range (page multiple).
    pub range_size: u64,
    /// Pages (dirty) or 4 KiB blocks (disk) per second; 0: as fast as the guest can.
    pub rate: u32,
    /// The guest's TSC frequency, for pacing.
    pub tsc_khz: u32,
    /// 4 KiB blocks of disk 0 (the disk workload writes them all).
    pub disk_blocks: u64,
}

impl GuestParams {
    /// Checks the parameters against a guest of `memory` bytes.
    ///
    /// # Errors
    /// A range that is unaligned, too low, empty, or not inside the guest's memory.
    pub fn validate(&self, memory: u64) -> Result<()> {
        ensure!(
            !matches!(self.workload, Workload::Disk | Workload::Mixed) || self.disk_blocks > 0,
            "the disk workload needs a disk: add --drive file=PATH,id=NAME"
        );
        if !matches!(
            self.workload,
            Workload::Fill | Workload::Dirty | Workload::Mixed
        ) {
            // Only fill, dirty and mixed use the memory range.
            return Ok(());
        }
        ensure!(
            self.range_start % PAGE == 0 && self.range_size % PAGE == 0,
            "the workload range must be page aligned (start {:#x}, size {:#x})",
            self.range_start,
            self.range_size
        );
        ensure!(
            self.range_start >= MIN_RANGE_START,
            "the workload range must start at 1 MiB or above (the guest's own tables live below)"
        );
        ensure!(self.range_size > 0, "the workload range is empty");
        ensure!(
            self.range_start + self.range_size <= memory,
            "the workload range ends at {} MiB, past the guest's {} MiB of memory",
            (self.range_start + self.range_size) >> 20,
            memory >> 20
        );
        ensure!(
            self.range_start < LOW_MEMORY,
            "the workload range must start below {} MiB (it counts RAM, which goes on at \
             4 GiB)",
            LOW_MEMORY >> 20
        );
        Ok(())
    }

    /// TSC ticks per page for pacing (0: unpaced).
    pub fn ticks_per_page(&self) -> u64 {
        if self.rate == 0 || self.tsc_khz == 0 {
            0
        } else {
            u64::from(self.tsc_khz) * 1000 / u64::from(self.rate)
        }
    }

    /// Writes the parameters into a boot sector that has the parameter block.
    ///
    /// # Errors
    /// An image without the block's magic.
    pub fn patch(&self, image: &mut [u8]) -> Result<()> {
        if !has_params(image) {
            bail!("the guest image has no parameter block (\"MIGT\" at byte {PARAMS_OFFSET:#x})");
        }
        let p = &mut image[PARAMS_OFFSET..];
        p[4] = match self.workload {
            Workload::Idle => 0,
            Workload::Fill => 1,
            Workload::Dirty => 2,
            Workload::Disk => 3,
            Workload::Mixed => 4,
        };
        p[6..8].copy_from_slice(&DISK_PORT.to_le_bytes());
        p[8..16].copy_from_slice(&self.range_start.to_le_bytes());
        p[16..24].copy_from_slice(&self.range_size.to_le_bytes());
        p[24..28].copy_from_slice(&self.rate.to_le_bytes());
        p[28..32].copy_from_slice(&self.tsc_khz.to_le_bytes());
        p[32..40].copy_from_slice(&self.ticks_per_page().to_le_bytes());
        p[40..48].copy_from_slice(&self.disk_blocks.to_le_bytes());
        p[HOLE_OFFSET..HOLE_OFFSET + 8].copy_from_slice(&LOW_MEMORY.to_le_bytes());
        p[MAP_OFFSET..MAP_OFFSET + 2].copy_from_slice(&self.map_gib().to_le_bytes());
        Ok(())
    }

    /// The guest-physical address of page `i` of the range, which counts RAM: past the
    /// hole's start it goes on at 4 GiB.
    pub fn page_address(&self, i: u64) -> u64 {
        ram_to_address(self.range_start + i * PAGE)
    }

    /// GiB of addresses the guest maps: enough for the range, at least 4.
    fn map_gib(&self) -> u16 {
        let end = ram_to_address(self.range_start + self.range_size);
        u16::try_from(end.div_ceil(1 << 30).max(4)).unwrap_or(u16::MAX)
    }

    /// Reads the parameters from an image (None without the block).
    pub fn read(image: &[u8]) -> Option<Self> {
        if !has_params(image) {
            return None;
        }
        let p = &image[PARAMS_OFFSET..];
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes"));
        Some(GuestParams {
            workload: match p[4] {
                0 => Workload::Idle,
                1 => Workload::Fill,
                3 => Workload::Disk,
                4 => Workload::Mixed,
                _ => Workload::Dirty,
            },
            range_start: u64_at(8),
            range_size: u64_at(16),
            rate: u32_at(24),
            tsc_khz: u32_at(28),
            disk_blocks: u64_at(40),
        })
    }
}

/// Where RAM at offset `offset` is seen by the guest: below the hole as is, from the
/// hole's start on at 4 GiB and above (QEMU's pc layout, and vmm's).
pub fn ram_to_address(offset: u64) -> u64 {
    if offset >= LOW_MEMORY {
        offset - LOW_MEMORY + HIGH_MEMORY_START
    } else {
        offset
    }
}

/// Whether `image` carries the parameter block.
pub fn has_params(image: &[u8]) -> bool {
    image.len() >= 512 && &image[PARAMS_OFFSET..PARAMS_OFFSET + 4] == PARAMS_MAGIC
}

/// Checks an image given with `--guest-image`: whole sectors, a boot signature, small
/// enough to sit at 0x7c00 below the EBDA.
///
/// # Errors
/// A bad size or no 0x55 0xaa signature.
pub fn check_image(image: &[u8]) -> Result<()> {
    ensure!(
        !image.is_empty() && image.len() % 512 == 0 && image.len() <= MAX_IMAGE,
        "a guest image is 1 to {} sectors of 512 bytes starting with a boot sector; this one is {} bytes",
        MAX_IMAGE / 512,
        image.len()
    );
    ensure!(
        image[510] == 0x55 && image[511] == 0xaa,
        "the guest image lacks the boot signature 0x55 0xaa at its end"
    );
    Ok(())
}

/// Guest-physical address of the pass counter.
pub const PASS_ADDR: u64 = LOAD_ADDR + STATUS_OFFSET as u64;
/// Guest-physical address of the stale-page counter.
pub const MISMATCH_ADDR: u64 = PASS_ADDR + 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_image_is_a_boot_sector_with_parameters() {
        check_image(IMAGE).unwrap();
        let p = GuestParams::read(IMAGE).unwrap();
        assert_eq!(p.workload, Workload::Dirty);
        assert_eq!((p.range_start, p.range_size), (2 << 20, 64 << 20));
        assert_eq!(
            &IMAGE[0x7f8..0x7fc],
            b"MRST",
            "the marker that the whole image is loaded"
        );
    }

    #[test]
    fn patch_round_trips_and_derives_the_pacing() {
        let mut img = *IMAGE;
        let p = GuestParams {
            workload: Workload::Fill,
            range_start: 4 << 20,
            range_size: 8 << 20,
            rate: 50_000,
            tsc_khz: 2_000_000,
            disk_blocks: 7,
        };
        p.patch(&mut img).unwrap();
        assert_eq!(GuestParams::read(&img), Some(p));
        assert_eq!(p.ticks_per_page(), 40_000);
        assert_eq!(
            u64::from_le_bytes(
                img[PARAMS_OFFSET + 32..PARAMS_OFFSET + 40]
                    .try_into()
                    .unwrap()
            ),
            40_000
        );
        assert_eq!(
            &img[..PARAMS_OFFSET],
            &IMAGE[..PARAMS_OFFSET],
            "code untouched"
        );
    }

    #[test]
    fn bad_ranges_are_refused_with_a_reason() {
        let ok = GuestParams {
            workload: Workload::Dirty,
            range_start: 2 << 20,
            range_size: 64 << 20,
            rate: 0,
            tsc_khz: 0,
            disk_blocks: 0,
        };
        ok.validate(128 << 20).unwrap();
        for (p, mem) in [
            (
                GuestParams {
                    range_start: 4096,
                    ..ok
                },
                128 << 20,
            ),
            (
                GuestParams {
                    range_size: 100,
                    ..ok
                },
                128 << 20,
            ),
            (
                GuestParams {
                    range_size: 0,
                    ..ok
                },
                128 << 20,
            ),
            (ok, 32 << 20),
            (
                GuestParams {
                    workload: Workload::Disk,
                    ..ok
                },
                128 << 20,
            ),
        ] {
            assert!(p.validate(mem).is_err(), "{p:?}");
        }
    }
}
