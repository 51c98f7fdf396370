//! The incoming side: loading a stream into a VM that is not running.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_file::QemuFile;

use crate::format::{
    Configuration, FileHeader, Footer, FullHeader, MAX_DESCRIPTION_LEN, MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PING, QEMU_VM_VMDESCRIPTION, SectionType,
};
use crate::postcopy::{
    MIG_CMD_PACKAGED, MIG_CMD_POSTCOPY_ADVISE, MIG_CMD_POSTCOPY_LISTEN,
    MIG_CMD_POSTCOPY_RAM_DISCARD, MIG_CMD_POSTCOPY_RESUME, MIG_CMD_POSTCOPY_RUN,
    MIG_CMD_RECV_BITMAP, read_advise, read_discard, read_packaged, read_recv_bitmap,
};
use crate::registry::{Handler, TARGET_PAGE_SIZE, section_error};
use crate::return_path::ReturnPath;
use crate::vmstate::FieldReader;
use crate::{Error, Result, SaveVm};

/// What a successful load read.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Stream bytes read, header to trailer.
    pub bytes: u64,
    /// Section records read (START, PART, END, FULL).
    pub records: u64,
    /// Time from the first byte to the end of the load.
    pub duration: Duration,
    /// The JSON VM description the source appended, if any (none after post-copy).
    pub description: Option<String>,
    /// The guest switched here during the load (post-copy's RUN): it runs already.
    pub postcopy: bool,
    /// Post-copy's return path, once the source advised it: the final answer goes
    /// there (the fault thread may still hold it).
    pub return_path: Option<Arc<ReturnPath>>,
}

/// Where a load stands with post-copy.
#[derive(Default)]
struct PostcopyLoad {
    /// The source advised post-copy and a section here takes part; the return path,
    /// shared from then on.
    rp: Option<Arc<ReturnPath>>,
    listening: bool,
    running: bool,
    /// Bytes read on the connections a resume replaced.
    bytes_before: u64,
}

/// The stream's section ids: id -> (index of the registered entry, version from its
/// START).
type ById = Vec<(u32, usize, u32)>;

/// Where each registered section stands during a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    NotSeen,
    Started,
    Done,
}

impl SaveVm {
    /// Loads a whole stream into the registered sections (QEMU's `qemu_loadvm_state`).
    ///
    /// Every record is checked: magic and version, machine type, each section known and
    /// of a loadable version, START before PART/END, every footer, every registered
    /// section present and every live section ended. The VM must not run during the load;
    /// the caller resumes it only after `Ok`. On error nothing tells the caller the state
    /// is usable: the destination must discard it.
    ///
    /// # Errors
    /// The first inconsistency, as a typed [`Error`] that names the section and offset.
    pub fn load(&mut self, f: &mut QemuFile) -> Result<LoadReport> {
        let t0 = Instant::now();
        let start_offset = f.bytes_read();
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                h.load_setup()
                    .map_err(section_error(&e.info, "load setup"))?;
            }
        }
        let mut progress = vec![Progress::NotSeen; self.entries.len()];
        let mut postcopy = PostcopyLoad::default();
        let result = self.load_records(f, &mut progress, &mut postcopy);
        let ok = result.is_ok();
        let mut cleanup_result = Ok(());
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                let r = h
                    .load_cleanup(ok)
                    .map_err(section_error(&e.info, "load cleanup"));
                if cleanup_result.is_ok() {
                    cleanup_result = r;
                }
            }
        }
        let (records, description) = result?;
        cleanup_result?;
        Ok(LoadReport {
            bytes: postcopy.bytes_before + f.bytes_read() - start_offset,
            records,
            duration: t0.elapsed(),
            description,
            postcopy: postcopy.running,
            return_path: postcopy.rp,
        })
    }

    fn check_configuration(&self, f: &mut QemuFile) -> Result<()> {
        let c = Configuration::read_from(f)?;
        if c.machine != self.machine() {
            return Err(Error::MachineMismatch {
                stream: c.machine,
                local: self.machine().to_string(),
            });
        }
        Ok(())
    }

    fn load_records(
        &mut self,
        f: &mut QemuFile,
        progress: &mut [Progress],
        postcopy: &mut PostcopyLoad,
    ) -> Result<(u64, Option<String>)> {
        FileHeader::read_from(f)?;
        // As QEMU (with send-configuration, its default): the machine type comes first,
        // once.
        let offset = f.bytes_read();
        match f.get_u8()? {
            b if SectionType::try_from(b) == Ok(SectionType::Configuration) => {
                self.check_configuration(f)?
            }
            found => return Err(Error::ConfigurationMissing { found, offset }),
        }
        let mut by_id = ById::new();
        let records = self.load_body(f, progress, &mut by_id, postcopy, false)?;
        if let Some(i) = progress.iter().position(|p| *p != Progress::Done) {
            return Err(self.missing(i, progress[i] == Progress::Started));
        }
        // The source appends the JSON description after EOF; read it so that a socket is
        // drained, and stop there (the source may wait for our answer). After post-copy
        // none comes (as from QEMU), and the source waits for SHUT before it ends the
        // stream: nothing more is read.
        if postcopy.running {
            return Ok((records, None));
        }
        let description = match f.try_get_u8()? {
            None => None,
            Some(QEMU_VM_VMDESCRIPTION) => {
                let len = f.get_be32()?;
                let json =
                    f.get_bytes(len.into(), MAX_DESCRIPTION_LEN as usize, "VM description")?;
                Some(String::from_utf8(json).map_err(|_| Error::BadDescription {
                    reason: "not UTF-8".into(),
                })?)
            }
            Some(other) => {
                return Err(Error::UnknownSectionType {
                    found: other,
                    offset: f.bytes_read() - 1,
                });
            }
        };
        Ok((records, description))
    }

    /// Reads records up to EOF, or (`package`: post-copy's package, which has none) to
    /// the end of the data. Returns how many section records it read. After post-copy's
    /// RUN a broken stream pauses instead ([`PostcopyHooks::paused`](crate::PostcopyHooks::paused)):
    /// the load goes on over the connection the source resumes on.
    fn load_body(
        &mut self,
        f: &mut QemuFile,
        progress: &mut [Progress],
        by_id: &mut ById,
        postcopy: &mut PostcopyLoad,
        package: bool,
    ) -> Result<u64> {
        let mut records = 0u64;
        loop {
            match self.load_record(f, progress, by_id, postcopy, package) {
                Ok(Some(n)) => records += n,
                Ok(None) => return Ok(records),
                Err(e) => {
                    // The guest runs here and lacks pages only the source has: a broken
                    // stream waits for the source to come back.
                    let broken = postcopy.running
                        && !package
                        && (f.error().is_some() || matches!(e, Error::Stream(_)));
                    let new = match (&mut self.postcopy_hooks, broken) {
                        (Some(h), true) => h.paused(&e),
                        _ => None,
                    };
                    let Some(new) = new else {
                        return Err(e);
                    };
                    postcopy.bytes_before += f.bytes_read();
                    *f = new;
                    if let Some(rp) = &postcopy.rp {
                        rp.replace(f.return_path()?);
                    }
                }
            }
        }
    }

    /// Reads one record: Some(section records read, a package's included), or None at
    /// the end.
    fn load_record(
        &mut self,
        f: &mut QemuFile,
        progress: &mut [Progress],
        by_id: &mut ById,
        postcopy: &mut PostcopyLoad,
        package: bool,
    ) -> Result<Option<u64>> {
        let offset = f.bytes_read();
        let b = match f.try_get_u8()? {
            Some(b) => b,
            None if package => return Ok(None),
            None => return Err(Error::Stream(qemu_file::Error::UnexpectedEof { offset })),
        };
        let ty = SectionType::try_from(b)
            .map_err(|found| Error::UnknownSectionType { found, offset })?;
        match ty {
            SectionType::Eof => return Ok(None),
            SectionType::Configuration => {
                return Err(Error::WrongRecordKind {
                    idstr: "configuration".into(),
                    found: "a second CONFIGURATION",
                });
            }
            SectionType::Command => {
                let command = f.get_be16()?;
                let len = f.get_be16()?;
                match (command, len) {
                    (MIG_CMD_OPEN_RETURN_PATH, 0) => {}
                    (MIG_CMD_PING, 4) => {
                        let value = f.get_be32()?;
                        match &postcopy.rp {
                            Some(rp) => rp.pong(value)?,
                            None => crate::return_path::send_pong(f, value)?,
                        }
                    }
                    (MIG_CMD_POSTCOPY_ADVISE, _) => {
                        if let Some(advise) = read_advise(f, len)? {
                            self.postcopy_advise(f, advise, postcopy)?;
                        }
                    }
                    (MIG_CMD_POSTCOPY_RAM_DISCARD, _) => {
                        postcopy_step(postcopy.rp.is_some() && !postcopy.listening, command)?;
                        let (block, ranges) = read_discard(f, len)?;
                        self.postcopy_discard(&block, &ranges)?;
                    }
                    (MIG_CMD_PACKAGED, _) => {
                        postcopy_step(postcopy.rp.is_some() && !package, command)?;
                        let mut p = QemuFile::from_bytes(read_packaged(f, len)?);
                        let n = self.load_body(&mut p, progress, by_id, postcopy, true)?;
                        return Ok(Some(n));
                    }
                    (MIG_CMD_POSTCOPY_LISTEN, 0) => {
                        postcopy_step(postcopy.rp.is_some() && !postcopy.listening, command)?;
                        let rp = postcopy.rp.clone().expect("checked above");
                        for e in &mut self.entries {
                            if let Handler::Live(h) = &mut e.handler {
                                h.load_postcopy_listen(&rp)
                                    .map_err(section_error(&e.info, "listen"))?;
                            }
                        }
                        postcopy.listening = true;
                    }
                    (MIG_CMD_POSTCOPY_RUN, 0) => {
                        postcopy_step(postcopy.listening && !postcopy.running, command)?;
                        if let Some(i) = progress.iter().enumerate().position(|(i, p)| {
                            *p != Progress::Done
                                && matches!(self.entries[i].handler, Handler::Device(_))
                        }) {
                            return Err(self.missing(i, false));
                        }
                        if let Some(h) = &mut self.postcopy_hooks {
                            h.run().map_err(|e| Error::Postcopy {
                                reason: format!("starting the guest: {e}"),
                            })?;
                        }
                        postcopy.running = true;
                    }
                    (MIG_CMD_RECV_BITMAP, _) => {
                        postcopy_step(postcopy.running && !package, command)?;
                        let block = read_recv_bitmap(f, len)?;
                        self.postcopy_recv_bitmap(&block, postcopy)?;
                    }
                    (MIG_CMD_POSTCOPY_RESUME, 0) => {
                        postcopy_step(postcopy.running && !package, command)?;
                        let rp = postcopy.rp.clone().expect("running implies advised");
                        rp.resume_ack()?;
                        for e in &mut self.entries {
                            if let Handler::Live(h) = &mut e.handler {
                                h.load_postcopy_resume(&rp)
                                    .map_err(section_error(&e.info, "resume post-copy"))?;
                            }
                        }
                        if let Some(h) = &mut self.postcopy_hooks {
                            h.resumed();
                        }
                    }
                    _ => return Err(Error::UnsupportedCommand { command, offset }),
                }
            }
            SectionType::Start | SectionType::Full => {
                let h = FullHeader::read_from(f)?;
                let i =
                    self.find(&h.idstr, h.instance_id)
                        .ok_or_else(|| Error::UnknownSection {
                            idstr: h.idstr.clone(),
                            instance_id: h.instance_id,
                        })?;
                if progress[i] != Progress::NotSeen
                    || by_id.iter().any(|(id, _, _)| *id == h.section_id)
                {
                    return Err(Error::DuplicateSection {
                        idstr: h.idstr,
                        section_id: h.section_id,
                    });
                }
                let e = &mut self.entries[i];
                if h.version_id > e.info.version_id || h.version_id < e.info.minimum_version_id {
                    return Err(Error::VersionOutOfRange {
                        idstr: h.idstr,
                        version: h.version_id,
                        min: e.info.minimum_version_id,
                        max: e.info.version_id,
                    });
                }
                match (&mut e.handler, ty) {
                    (Handler::Live(lh), SectionType::Start) => {
                        lh.load(f, h.version_id)
                            .map_err(section_error(&e.info, "load"))?;
                        progress[i] = Progress::Started;
                    }
                    (Handler::Device(dh), SectionType::Full) => {
                        dh.load(&mut FieldReader::new(f), h.version_id)
                            .map_err(section_error(&e.info, "load"))?;
                        progress[i] = Progress::Done;
                    }
                    _ => {
                        return Err(Error::WrongRecordKind {
                            idstr: h.idstr,
                            found: ty.name(),
                        });
                    }
                }
                Footer::read_from(f, h.section_id, &e.info.idstr)?;
                by_id.push((h.section_id, i, h.version_id));
                return Ok(Some(1));
            }
            SectionType::Part | SectionType::End => {
                let section_id = f.get_be32()?;
                let (i, version) = by_id
                    .iter()
                    .find(|(id, _, _)| *id == section_id)
                    .map(|(_, i, v)| (*i, *v))
                    .ok_or(Error::UnknownSectionId { section_id, offset })?;
                let e = &mut self.entries[i];
                let Handler::Live(lh) = &mut e.handler else {
                    return Err(Error::WrongRecordKind {
                        idstr: e.info.idstr.clone(),
                        found: ty.name(),
                    });
                };
                if progress[i] != Progress::Started {
                    return Err(Error::WrongRecordKind {
                        idstr: e.info.idstr.clone(),
                        found: ty.name(),
                    });
                }
                // PART and END carry no version: they are in their START's.
                lh.load(f, version)
                    .map_err(section_error(&e.info, "load"))?;
                Footer::read_from(f, section_id, &e.info.idstr)?;
                if ty == SectionType::End {
                    progress[i] = Progress::Done;
                }
                return Ok(Some(1));
            }
        }
        Ok(Some(0))
    }

    /// Section `i` never came (or never ended, `started`).
    fn missing(&self, i: usize, started: bool) -> Error {
        Error::MissingSection {
            idstr: self.entries[i].info.idstr.clone(),
            instance_id: self.entries[i].info.instance_id,
            started,
        }
    }

    /// ADVISE with RAM: the page sizes must be ours, and a section here must take part
    /// (post-copy on at this side too); the return path is shared from now on.
    fn postcopy_advise(
        &mut self,
        f: &QemuFile,
        advise: crate::postcopy::Advise,
        postcopy: &mut PostcopyLoad,
    ) -> Result<()> {
        let bad = |reason: String| Error::Postcopy { reason };
        if advise.target_page_size != TARGET_PAGE_SIZE {
            return Err(bad(format!(
                "the source's target page size is {:#x}, this side's {TARGET_PAGE_SIZE:#x}",
                advise.target_page_size
            )));
        }
        if advise.page_size_summary != TARGET_PAGE_SIZE {
            return Err(bad(format!(
                "the source's RAM has page sizes {:#x} (an OR of them), this side only \
                 {TARGET_PAGE_SIZE:#x}: back both sides' RAM the same way",
                advise.page_size_summary
            )));
        }
        let mut taken = false;
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                taken |= h
                    .load_postcopy_advise()
                    .map_err(section_error(&e.info, "post-copy advise"))?;
            }
        }
        if !taken {
            return Err(bad(
                "the source advised post-copy, but no section here loads it".into(),
            ));
        }
        postcopy.rp = Some(Arc::new(ReturnPath::new(f.return_path()?)));
        Ok(())
    }

    /// RECV_BITMAP: which pages of `block` arrived, to the source.
    fn postcopy_recv_bitmap(&mut self, block: &str, postcopy: &PostcopyLoad) -> Result<()> {
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                let bitmap = h
                    .load_postcopy_recv_bitmap(block)
                    .map_err(section_error(&e.info, "received bitmap"))?;
                if let Some(b) = bitmap {
                    let rp = postcopy.rp.as_ref().expect("running implies advised");
                    return rp.recv_bitmap(block, &b);
                }
            }
        }
        Err(Error::Postcopy {
            reason: format!(
                "the source asks for the received pages of block {}, which no section here has",
                qemu_file::shown(block)
            ),
        })
    }

    fn postcopy_discard(&mut self, block: &str, ranges: &[(u64, u64)]) -> Result<()> {
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                if h.load_postcopy_discard(block, ranges)
                    .map_err(section_error(&e.info, "post-copy discard"))?
                {
                    return Ok(());
                }
            }
        }
        Err(Error::Postcopy {
            reason: format!(
                "a discard for block {}, which no section here has",
                qemu_file::shown(block)
            ),
        })
    }
}

/// A post-copy command out of its order (QEMU's `postcopy_state` checks).
fn postcopy_step(in_order: bool, command: u16) -> Result<()> {
    if in_order {
        return Ok(());
    }
    Err(Error::BadCommand {
        command,
        reason: "a post-copy command out of order (ADVISE, discards, PACKAGED with LISTEN, \
                 devices and RUN; after RUN, a resume's RECV_BITMAP and POSTCOPY_RESUME)"
            .into(),
    })
}
