//! `SaveVm`: the registry of a VM's sections, and the save side of the stream.

use std::fmt;

use qemu_file::QemuFile;

use crate::format::{
    Configuration, FileHeader, Footer, FullHeader, MAX_IDSTR_LEN, QEMU_VM_EOF, QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_PART, QEMU_VM_VMDESCRIPTION, SectionType,
};
use crate::vmstate::{DeviceDescription, FieldWriter, VmDescription};
use crate::{DeviceHandler, Error, Result, SectionError, SectionHandler, SectionInfo};

/// The target page size written into the VM description.
pub const TARGET_PAGE_SIZE: u64 = 4096;

pub(crate) enum Handler {
    Live(Box<dyn SectionHandler>),
    Device(Box<dyn DeviceHandler>),
}

pub(crate) struct Entry {
    pub(crate) info: SectionInfo,
    pub(crate) section_id: u32,
    pub(crate) handler: Handler,
}

/// The START or FULL header of section `section_id`.
fn header(section_id: u32, info: &SectionInfo) -> FullHeader {
    FullHeader {
        section_id,
        idstr: info.idstr.clone(),
        instance_id: info.instance_id,
        version_id: info.version_id,
    }
}

/// Wraps a handler's error with the section's name and the operation.
pub(crate) fn section_error<'a>(
    info: &'a SectionInfo,
    op: &'static str,
) -> impl FnOnce(SectionError) -> Error + 'a {
    move |source| Error::Section {
        idstr: info.idstr.clone(),
        instance_id: info.instance_id,
        op,
        source,
    }
}

/// The sections of a VM and the stream they make (QEMU's `savevm.c`).
///
/// Sections are registered once, in a fixed order that is the order of the stream; each
/// gets a section id in registration order. The same registry saves (on the source, driven
/// by [`crate::run_migration`] or [`SaveVm::save_snapshot`]) and loads (on the
/// destination, [`SaveVm::load`]).
///
/// Only the thread running the migration or the load uses a `SaveVm`; it is moved there.
pub struct SaveVm {
    machine: String,
    next_id: u32,
    pub(crate) entries: Vec<Entry>,
    /// Where the next `save_iterate` starts, so that one busy section cannot take every
    /// chunk's budget from the others.
    iterate_from: usize,
    /// Post-copy (destination): what the VMM does at RUN, at a break, at a resume.
    pub(crate) postcopy_hooks: Option<Box<dyn PostcopyHooks>>,
}

/// What a post-copy destination's VMM does at the load's turns; the loading thread
/// calls them, and goes on reading the pages the guest lacks after each.
pub trait PostcopyHooks: Send {
    /// RUN: start the guest, without touching its memory on this thread (hand that to
    /// another: the pages it lacks come only through this one).
    ///
    /// # Errors
    /// The guest cannot start; the load fails.
    fn run(&mut self) -> std::result::Result<(), SectionError>;

    /// The stream failed after RUN (`why`): the guest lacks pages that only the source
    /// has. Wait for a new connection from it (QEMU's `migrate-recover`) and return it,
    /// or None to give up (the load then fails, the guest still waiting for its pages).
    fn paused(&mut self, why: &Error) -> Option<QemuFile> {
        let _ = why;
        None
    }

    /// The source resumed over the new connection (POSTCOPY_RESUME).
    fn resumed(&mut self) {}
}

impl fmt::Debug for SaveVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for (id, info, live) in self.sections() {
            l.entry(&format_args!(
                "{id}: {} {:?}/{} v{}",
                if live { "live" } else { "device" },
                info.idstr,
                info.instance_id,
                info.version_id
            ));
        }
        l.finish()
    }
}

impl SaveVm {
    /// An empty registry for a VM of machine type `machine` (sent in the configuration
    /// section; the destination must have the same).
    pub fn new(machine: impl Into<String>) -> Self {
        SaveVm {
            machine: machine.into(),
            // From 1: QEMU's loader finds a PART or END section by the id its START
            // gave, comparing with `load_section_id`, which is 0 in every entry not
            // started: id 0 would name QEMU's first registered entry ("timer").
            next_id: 1,
            entries: Vec::new(),
            iterate_from: 0,
            postcopy_hooks: None,
        }
    }

    /// The machine type.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// Post-copy (destination): what starts the guest at RUN, and what waits for a new
    /// connection when the stream breaks after it ([`PostcopyHooks`]).
    pub fn set_postcopy_hooks(&mut self, hooks: Box<dyn PostcopyHooks>) {
        self.postcopy_hooks = Some(hooks);
    }

    fn register(&mut self, info: SectionInfo, handler: Handler) -> Result<u32> {
        if info.idstr.len() > MAX_IDSTR_LEN {
            return Err(Error::IdTooLong {
                len: info.idstr.len(),
                idstr: info.idstr,
            });
        }
        if self.find(&info.idstr, info.instance_id).is_some() {
            return Err(Error::DuplicateRegistration {
                idstr: info.idstr,
                instance_id: info.instance_id,
            });
        }
        let section_id = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry {
            info,
            section_id,
            handler,
        });
        Ok(section_id)
    }

    /// Registers a live section; returns its section id.
    ///
    /// # Errors
    /// [`Error::DuplicateRegistration`] or [`Error::IdTooLong`].
    pub fn register_live(
        &mut self,
        info: SectionInfo,
        handler: Box<dyn SectionHandler>,
    ) -> Result<u32> {
        self.register(info, Handler::Live(handler))
    }

    /// Registers a device section; returns its section id.
    ///
    /// # Errors
    /// [`Error::DuplicateRegistration`] or [`Error::IdTooLong`].
    pub fn register_device(
        &mut self,
        info: SectionInfo,
        handler: Box<dyn DeviceHandler>,
    ) -> Result<u32> {
        self.register(info, Handler::Device(handler))
    }

    /// Removes a section; returns whether it was registered.
    pub fn unregister(&mut self, idstr: &str, instance_id: u32) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|e| !(e.info.idstr == idstr && e.info.instance_id == instance_id));
        before != self.entries.len()
    }

    pub(crate) fn find(&self, idstr: &str, instance_id: u32) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.info.idstr == idstr && e.info.instance_id == instance_id)
    }

    /// The registered sections in stream order: section id, info, whether live.
    pub fn sections(&self) -> impl Iterator<Item = (u32, &SectionInfo, bool)> {
        self.entries
            .iter()
            .map(|e| (e.section_id, &e.info, matches!(e.handler, Handler::Live(_))))
    }

    // ------------------------------------------------------------------ save

    /// Writes the stream header and the configuration section.
    pub fn save_header(&self, f: &mut QemuFile) {
        FileHeader::write_to(f);
        Configuration {
            machine: self.machine.clone(),
        }
        .write_to(f);
    }

    /// Writes the START record of every live section (QEMU's `qemu_savevm_state_setup`).
    ///
    /// # Errors
    /// A section's setup failed (wrapped with its name) or the stream failed.
    pub fn save_setup(&mut self, f: &mut QemuFile) -> Result<()> {
        for e in &mut self.entries {
            let Handler::Live(h) = &mut e.handler else {
                continue;
            };
            header(e.section_id, &e.info).write_to(SectionType::Start, f);
            h.setup(f).map_err(section_error(&e.info, "setup"))?;
            Footer::write_to(e.section_id, f);
        }
        Ok(f.check()?)
    }

    /// Writes a PART record for the live sections in turn until the file's budget is used
    /// (QEMU's `qemu_savevm_state_iterate`). Returns `true` when every section has sent
    /// everything it knew to be dirty.
    ///
    /// # Errors
    /// A section failed or the stream failed.
    pub fn save_iterate(&mut self, f: &mut QemuFile) -> Result<bool> {
        let mut all_done = true;
        let n = self.entries.len();
        let start = self.iterate_from % n.max(1);
        for k in 0..n {
            let i = (start + k) % n;
            let e = &mut self.entries[i];
            let Handler::Live(h) = &mut e.handler else {
                continue;
            };
            if h.pending_estimate() == 0 {
                continue;
            }
            if f.budget_exhausted() {
                // This section's turn comes first next time.
                self.iterate_from = i;
                all_done = false;
                break;
            }
            f.put_u8(QEMU_VM_SECTION_PART);
            f.put_be32(e.section_id);
            let done = h.iterate(f).map_err(section_error(&e.info, "iterate"))?;
            Footer::write_to(e.section_id, f);
            all_done &= done;
            if !done {
                self.iterate_from = i + 1;
            }
        }
        f.check()?;
        Ok(all_done)
    }

    /// Lets every live section do its slow work for the next iteration, without the VM
    /// lock.
    ///
    /// # Errors
    /// A section failed.
    pub fn prepare_iterate(&mut self, budget: usize) -> Result<()> {
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                h.prepare(budget)
                    .map_err(section_error(&e.info, "prepare"))?;
            }
        }
        Ok(())
    }

    /// Whether a live section holds the completion back (e.g. a disk in its bulk copy).
    pub fn completion_blocked(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(&e.handler, Handler::Live(h) if h.blocks_completion()))
    }

    /// Whether a live section wants its setup acknowledged by the destination before
    /// the migration goes on ([`SectionHandler::setup_needs_acknowledgement`]).
    pub fn setup_needs_acknowledgement(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(&e.handler, Handler::Live(h) if h.setup_needs_acknowledgement()))
    }

    /// The live sections' estimate of bytes still to send, without syncing.
    pub fn pending_estimate(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.handler {
                Handler::Live(h) => h.pending_estimate(),
                Handler::Device(_) => 0,
            })
            .sum()
    }

    /// Syncs every live section's dirty log and returns the bytes still to send.
    ///
    /// # Errors
    /// A section could not sync.
    pub fn pending_exact(&mut self) -> Result<u64> {
        let mut total = 0;
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                total += h.pending_exact().map_err(section_error(&e.info, "sync"))?;
            }
        }
        Ok(total)
    }

    /// Writes the END record of every live section, with everything left (QEMU's
    /// `qemu_savevm_state_complete_precopy`, iterable part). The VM must be stopped and
    /// the final sync made.
    ///
    /// # Errors
    /// A section failed or the stream failed.
    pub fn save_complete(&mut self, f: &mut QemuFile) -> Result<()> {
        for e in &mut self.entries {
            let Handler::Live(h) = &mut e.handler else {
                continue;
            };
            f.put_u8(QEMU_VM_SECTION_END);
            f.put_be32(e.section_id);
            h.complete(f).map_err(section_error(&e.info, "complete"))?;
            Footer::write_to(e.section_id, f);
        }
        Ok(f.check()?)
    }

    // ------------------------------------------------------------- post-copy

    /// Whether a live section goes on after a switch to post-copy (RAM).
    pub fn postcopy_capable(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(&e.handler, Handler::Live(h) if h.postcopy_capable()))
    }

    /// What the sections that end at the switch still have to send (a disk's dirty
    /// blocks): the switch waits until it fits the downtime threshold.
    pub fn pending_precopy_only(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.handler {
                Handler::Live(h) if !h.postcopy_capable() => h.pending_estimate(),
                _ => 0,
            })
            .sum()
    }

    /// Where the destination's page requests go, one sink per section that takes them.
    pub fn page_request_sinks(
        &self,
    ) -> Vec<std::sync::Arc<dyn crate::return_path::PageRequestSink>> {
        self.entries
            .iter()
            .filter_map(|e| match &e.handler {
                Handler::Live(h) => h.page_requests(),
                Handler::Device(_) => None,
            })
            .collect()
    }

    /// Post-copy recovery: the blocks whose received bitmaps the source asks for.
    pub fn postcopy_blocks(&self) -> Vec<String> {
        self.entries
            .iter()
            .flat_map(|e| match &e.handler {
                Handler::Live(h) => h.postcopy_blocks(),
                Handler::Device(_) => Vec::new(),
            })
            .collect()
    }

    /// Post-copy recovery: the destination's received bitmaps to every section that went
    /// on after the switch.
    ///
    /// # Errors
    /// A section refused them.
    pub fn postcopy_resume(&mut self, received: &[(String, Vec<u8>)]) -> Result<()> {
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                if h.postcopy_capable() {
                    h.postcopy_resume(received)
                        .map_err(section_error(&e.info, "resume post-copy"))?;
                }
            }
        }
        Ok(())
    }

    /// The switch to post-copy (QEMU's `postcopy_start`), the guest stopped and the final
    /// sync made: END records of the live sections that do not go on, then each other
    /// live section's discards.
    ///
    /// # Errors
    /// A section failed or the stream failed.
    pub fn save_postcopy_switch(&mut self, f: &mut QemuFile) -> Result<()> {
        for e in &mut self.entries {
            let Handler::Live(h) = &mut e.handler else {
                continue;
            };
            if h.postcopy_capable() {
                continue;
            }
            f.put_u8(QEMU_VM_SECTION_END);
            f.put_be32(e.section_id);
            h.complete(f).map_err(section_error(&e.info, "complete"))?;
            Footer::write_to(e.section_id, f);
        }
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                if h.postcopy_capable() {
                    h.postcopy_switch(f)
                        .map_err(section_error(&e.info, "switch to post-copy"))?;
                }
            }
        }
        Ok(f.check()?)
    }

    /// Writes a FULL record for every device section, without EOF or description: the
    /// body of post-copy's package.
    ///
    /// # Errors
    /// A device could not be saved or the stream failed.
    pub fn save_device_records(&mut self, f: &mut QemuFile) -> Result<()> {
        self.save_device_sections(f)?;
        Ok(f.check()?)
    }

    /// Ends post-copy (QEMU's `qemu_savevm_state_complete_postcopy`): the END record of
    /// every live section that went on (everything it had left), then EOF. No
    /// description follows, as in QEMU.
    ///
    /// # Errors
    /// A section failed or the stream failed.
    pub fn save_complete_postcopy(&mut self, f: &mut QemuFile) -> Result<()> {
        for e in &mut self.entries {
            let Handler::Live(h) = &mut e.handler else {
                continue;
            };
            if !h.postcopy_capable() {
                continue;
            }
            f.put_u8(QEMU_VM_SECTION_END);
            f.put_be32(e.section_id);
            h.complete(f).map_err(section_error(&e.info, "complete"))?;
            Footer::write_to(e.section_id, f);
        }
        f.put_u8(QEMU_VM_EOF);
        Ok(f.check()?)
    }

    /// Writes a FULL record for every device section, then EOF and the JSON VM description
    /// (QEMU's `qemu_savevm_state_complete_precopy_non_iterable`).
    ///
    /// # Errors
    /// A device could not be saved or the stream failed.
    pub fn save_devices(&mut self, f: &mut QemuFile) -> Result<()> {
        let devices = self.save_device_sections(f)?;
        f.put_u8(QEMU_VM_EOF);
        let json = serde_json::to_vec(&VmDescription {
            page_size: TARGET_PAGE_SIZE,
            devices,
        })
        .map_err(|e| Error::BadDescription {
            reason: e.to_string(),
        })?;
        f.put_u8(QEMU_VM_VMDESCRIPTION);
        f.put_be32(json.len() as u32);
        f.put_buffer(&json);
        Ok(f.check()?)
    }

    /// The FULL records of the device sections; returns their descriptions.
    fn save_device_sections(&mut self, f: &mut QemuFile) -> Result<Vec<DeviceDescription>> {
        let mut devices = Vec::new();
        for e in &mut self.entries {
            let Handler::Device(h) = &mut e.handler else {
                continue;
            };
            header(e.section_id, &e.info).write_to(SectionType::Full, f);
            let mut w = FieldWriter::new(f);
            h.save(&mut w).map_err(section_error(&e.info, "save"))?;
            let desc = w
                .into_description()
                .map_err(|err| section_error(&e.info, "save")(err.into()))?;
            let mut state = desc;
            if state.vmsd_name.is_empty() {
                state.vmsd_name = e.info.idstr.clone();
            }
            state.version = e.info.version_id;
            devices.push(DeviceDescription {
                name: e.info.idstr.clone(),
                instance_id: e.info.instance_id,
                state,
            });
            Footer::write_to(e.section_id, f);
        }
        Ok(devices)
    }

    /// Ends every live section's tracking (dirty logging off), whatever the outcome.
    pub fn save_cleanup(&mut self) {
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                h.cleanup();
            }
        }
    }

    /// Saves a whole stream of a VM that is not running (QEMU's `savevm` / `migrate` to a
    /// file of a stopped VM): header, setup, completion, devices, EOF, description; flushes
    /// and finishes the file.
    ///
    /// # Errors
    /// A section or the stream failed; tracking is cleaned up either way.
    pub fn save_snapshot(&mut self, f: &mut QemuFile) -> Result<()> {
        let r = (|| {
            self.save_header(f);
            self.save_setup(f)?;
            self.pending_exact()?;
            self.save_complete(f)?;
            self.save_devices(f)?;
            Ok(f.finish()?)
        })();
        self.save_cleanup();
        r
    }
}
