//! The two kinds of sections a VM registers: live (iterative) and device (one shot).

use std::sync::Arc;

use qemu_file::QemuFile;

use crate::return_path::{PageRequestSink, ReturnPath};
use crate::{FieldReader, FieldWriter, VmState};

/// The error a section handler returns; savevm wraps it with the section's name and the
/// operation.
pub type SectionError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Name, instance and versions of a registered section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    /// The section's name in the stream, e.g. `ram` (at most 127 bytes).
    pub idstr: String,
    /// The instance of that name, e.g. a vCPU index.
    pub instance_id: u32,
    /// The version this side writes, and the newest it loads.
    pub version_id: u32,
    /// The oldest version this side loads.
    pub minimum_version_id: u32,
}

impl SectionInfo {
    /// A section that writes and loads exactly `version`.
    pub fn new(idstr: impl Into<String>, instance_id: u32, version: u32) -> Self {
        SectionInfo {
            idstr: idstr.into(),
            instance_id,
            version_id: version,
            minimum_version_id: version,
        }
    }
}

impl SectionInfo {
    /// The section of a device whose state is a [`VmState`]: its versions are the
    /// struct's.
    pub fn for_state<T: VmState + ?Sized>(idstr: impl Into<String>, instance_id: u32) -> Self {
        SectionInfo {
            idstr: idstr.into(),
            instance_id,
            version_id: T::VERSION,
            minimum_version_id: T::MINIMUM_VERSION,
        }
    }
}

/// A live section (QEMU's `SaveVMHandlers`): state too large to send while the VM is
/// stopped, sent while it runs and resent where it changes (RAM, disks).
///
/// On the source, the migration thread calls `setup` once (START), then alternately
/// `pending_*` and `iterate` (PART) while the VM runs, then, with the VM stopped,
/// `pending_exact` for the final sync and `complete` (END), and `cleanup` at the end
/// whatever happened. On the destination, `load_setup`, then `load` for each record, then
/// `load_cleanup`.
///
/// The VM lock is held during `pending_*` and `iterate`, which only queue data on the
/// file; the migration thread writes it out after releasing the lock.
pub trait SectionHandler: Send {
    /// Writes the START payload and starts tracking changes (e.g. dirty logging on).
    ///
    /// # Errors
    /// When tracking cannot start; the migration fails and `cleanup` runs.
    fn setup(&mut self, f: &mut QemuFile) -> Result<(), SectionError>;

    /// Does slow work for the next iteration (e.g. reading disk chunks) before the
    /// migration thread takes the VM lock; `budget` is the size of one chunk of output.
    ///
    /// # Errors
    /// When the data cannot be read; the migration fails.
    fn prepare(&mut self, budget: usize) -> Result<(), SectionError> {
        let _ = budget;
        Ok(())
    }

    /// Whether the migration must not complete yet whatever the pending figure (a disk
    /// still in its bulk copy).
    fn blocks_completion(&self) -> bool {
        false
    }

    /// Whether the destination should have applied this section's setup before the
    /// guest stops (RAM whose memory was handed over, which the destination maps in
    /// place of its own, work that would otherwise fall into the pause). With a return
    /// path the migration thread then waits for the answer to a PING (QEMU's
    /// `MIG_CMD_PING`) before it goes on.
    fn setup_needs_acknowledgement(&self) -> bool {
        false
    }

    /// Queues a PART payload: as much as [`QemuFile::budget_exhausted`] allows. Returns
    /// `true` when nothing known to be dirty remains.
    ///
    /// # Errors
    /// When the state cannot be read; the migration fails.
    fn iterate(&mut self, f: &mut QemuFile) -> Result<bool, SectionError>;

    /// A cheap estimate of the bytes still to send, without syncing the dirty log.
    fn pending_estimate(&self) -> u64;

    /// Syncs the dirty log and returns the bytes still to send.
    ///
    /// # Errors
    /// When the dirty log cannot be read.
    fn pending_exact(&mut self) -> Result<u64, SectionError>;

    /// Queues the END payload: everything still dirty. The VM is stopped and the final
    /// sync was just made by `pending_exact`.
    ///
    /// # Errors
    /// When the state cannot be read.
    fn complete(&mut self, f: &mut QemuFile) -> Result<(), SectionError>;

    /// Ends tracking (dirty logging off) after a completed, failed or cancelled migration.
    fn cleanup(&mut self) {}

    /// Prepares to load on the destination.
    ///
    /// # Errors
    /// When the destination cannot take a stream (e.g. its storage is not ready).
    fn load_setup(&mut self) -> Result<(), SectionError> {
        Ok(())
    }

    /// Reads one START, PART or END payload written at `version_id`.
    ///
    /// # Errors
    /// Any inconsistency with this side (unknown block, wrong size) or a hostile payload.
    fn load(&mut self, f: &mut QemuFile, version_id: u32) -> Result<(), SectionError>;

    /// Post-copy (source): whether this section goes on after the guest switched to the
    /// destination (RAM), as QEMU's `has_postcopy`. The others end at the switch.
    fn postcopy_capable(&self) -> bool {
        false
    }

    /// Post-copy (source), at the switch: the guest is stopped and the final sync made.
    /// Writes what the destination must drop (RAM's discards: pages dirtied since they
    /// were sent, and pages never sent) and stops tracking changes; `iterate` then sends
    /// the rest, requested pages first.
    ///
    /// # Errors
    /// When the state cannot be read; the switch fails and the source resumes.
    fn postcopy_switch(&mut self, f: &mut QemuFile) -> Result<(), SectionError> {
        let _ = f;
        Ok(())
    }

    /// Post-copy (source): where the destination's page requests go.
    fn page_requests(&self) -> Option<Arc<dyn PageRequestSink>> {
        None
    }

    /// Post-copy recovery (source): the blocks whose received bitmaps a resume asks
    /// the destination for (RECV_BITMAP).
    fn postcopy_blocks(&self) -> Vec<String> {
        Vec::new()
    }

    /// Post-copy recovery (source): the destination's received bitmaps (block, bitmap as
    /// little-endian bytes): every page it lacks is to send again, and the requests made
    /// before the break are forgotten (it asks again).
    ///
    /// # Errors
    /// A bitmap for an unknown block, or of the wrong size.
    fn postcopy_resume(&mut self, received: &[(String, Vec<u8>)]) -> Result<(), SectionError> {
        let _ = received;
        Ok(())
    }

    /// Post-copy (destination): the source advised post-copy (ADVISE). `Ok(true)`: this
    /// section takes part (it checked that it can, and that post-copy is on here).
    ///
    /// # Errors
    /// Post-copy is off on this side, or the host cannot do it (no userfaultfd).
    fn load_postcopy_advise(&mut self) -> Result<bool, SectionError> {
        Ok(false)
    }

    /// Post-copy (destination): drop the `(start, length)` byte ranges of `block`; `Ok(true)`
    /// if the block is this section's.
    ///
    /// # Errors
    /// Ranges outside the block, or the kernel's.
    fn load_postcopy_discard(
        &mut self,
        block: &str,
        ranges: &[(u64, u64)],
    ) -> Result<bool, SectionError> {
        let _ = (block, ranges);
        Ok(false)
    }

    /// Post-copy (destination), LISTEN: from now on the guest may run while this
    /// section's data arrives; what it lacks is asked for on `rp`.
    ///
    /// # Errors
    /// The section cannot wait for its data (e.g. userfaultfd registration failed).
    fn load_postcopy_listen(&mut self, rp: &Arc<ReturnPath>) -> Result<(), SectionError> {
        let _ = rp;
        Ok(())
    }

    /// Post-copy recovery (destination): which pages of `block` arrived, as
    /// little-endian bytes of a bitmap (page i is bit i % 8 of byte i / 8); None when the
    /// block is not this section's.
    ///
    /// # Errors
    /// Post-copy does not run here.
    fn load_postcopy_recv_bitmap(&mut self, block: &str) -> Result<Option<Vec<u8>>, SectionError> {
        let _ = block;
        Ok(None)
    }

    /// Post-copy recovery (destination), POSTCOPY_RESUME: ask again, on `rp`, for what
    /// the guest still waits for (the source forgot the requests made before the break).
    ///
    /// # Errors
    /// The return path's.
    fn load_postcopy_resume(&mut self, rp: &Arc<ReturnPath>) -> Result<(), SectionError> {
        let _ = rp;
        Ok(())
    }

    /// Finishes loading; `ok` says whether the whole stream loaded. Makes the loaded state
    /// durable (e.g. fsync a disk image) before the guest may run.
    ///
    /// # Errors
    /// When the loaded state cannot be made durable.
    fn load_cleanup(&mut self, ok: bool) -> Result<(), SectionError> {
        let _ = ok;
        Ok(())
    }
}

/// A non-live device section (QEMU's VMState): saved in one FULL record while the VM is
/// stopped, as a list of described fields.
///
/// `save` writes fields through a [`FieldWriter`], which records each field's name, QEMU
/// type and size for the stream's JSON description; `load` reads them back in the same
/// order through a [`FieldReader`].
pub trait DeviceHandler: Send {
    /// Writes the device state.
    ///
    /// # Errors
    /// When the state cannot be read (e.g. a KVM ioctl fails).
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError>;

    /// Reads the device state written at `version_id`; nothing may be applied to a running
    /// VM (the caller resumes only after the whole stream loaded).
    ///
    /// # Errors
    /// A truncated or inconsistent state.
    fn load(&mut self, r: &mut FieldReader<'_>, version_id: u32) -> Result<(), SectionError>;
}

/// A device whose whole state is a [`VmState`] value behind a mutex: register a clone of
/// the `Arc` (with [`SectionInfo::for_state`]) and the section saves and loads the value.
impl<T: VmState + Send> DeviceHandler for std::sync::Arc<std::sync::Mutex<T>> {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.state(&*self.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(())
    }

    fn load(&mut self, r: &mut FieldReader<'_>, version_id: u32) -> Result<(), SectionError> {
        let mut state = self.lock().unwrap_or_else(|p| p.into_inner());
        r.state(&mut *state, version_id)?;
        Ok(())
    }
}
