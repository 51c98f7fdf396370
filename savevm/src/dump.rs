//! `dump_stream`: any stream file as annotated text (QEMU's `analyze-migration.py`, in
//! prose).
//!
//! Framing and device sections are read here, devices through the JSON description at the
//! end of the file, so a stream QEMU wrote can be walked too. A live section's records are
//! not self-delimiting; a [`SectionWalker`] that knows its format (the `ram` one lives in
//! ram-list, the `block` one in block-migration) reads and summarises them.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::Path;

use qemu_file::{FdTransport, QemuFile};

use crate::format::{
    Configuration, FileHeader, Footer, FullHeader, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING,
    QEMU_VM_FILE_MAGIC, QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION, SectionType,
};
use crate::vmstate::{DeviceDescription, FieldDesc, StructDesc, VmDescription};
use crate::{Error, Result, SectionError};

/// Largest single field a dump reads.
const MAX_DUMP_FIELD: u64 = 64 << 20;
/// Most field entries a dump walks (a hostile trailer's `array_len` must not loop forever).
const MAX_DUMP_ENTRIES: u64 = 1 << 25;
/// Deepest nesting of structs and subsections a dump follows.
const MAX_DUMP_DEPTH: usize = 32;
/// How far from the end the description is looked for (as QEMU's analyzer does).
const DESCRIPTION_SEARCH: u64 = 10 << 20;

/// Where the lines of a dump go, as they are made (a dump of a large stream is larger
/// still: it is never held whole).
pub struct DumpSink<'a> {
    out: &'a mut dyn std::io::Write,
    indent: usize,
    /// The first write error; later lines are dropped.
    error: Option<std::io::Error>,
}

impl fmt::Debug for DumpSink<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DumpSink")
            .field("indent", &self.indent)
            .field("error", &self.error)
            .finish()
    }
}

impl<'a> DumpSink<'a> {
    /// Lines go to `out`.
    pub fn new(out: &'a mut dyn std::io::Write) -> Self {
        DumpSink {
            out,
            indent: 0,
            error: None,
        }
    }

    /// Adds a line at the current indentation.
    pub fn line(&mut self, s: impl fmt::Display) {
        if self.error.is_some() {
            return;
        }
        let r = (0..self.indent)
            .try_for_each(|_| self.out.write_all(b"    "))
            .and_then(|_| writeln!(self.out, "{s}"));
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.indent += 1;
        let r = f(self);
        self.indent -= 1;
        r
    }
}

/// Reads the records of one kind of live section for [`dump_stream`].
pub trait SectionWalker {
    /// The idstr of the section this walker reads.
    fn idstr(&self) -> &str;

    /// Reads one START, PART or END payload (`kind`) written at `version_id` and describes
    /// it in `out`.
    ///
    /// # Errors
    /// A malformed payload.
    fn walk(
        &mut self,
        f: &mut QemuFile,
        kind: SectionType,
        version_id: u32,
        out: &mut DumpSink,
    ) -> std::result::Result<(), SectionError>;

    /// Adds totals after the last record (e.g. page counts by kind).
    fn summary(&self, out: &mut DumpSink) {
        let _ = out;
    }
}

/// Finds the JSON description at the end of a stream file, as QEMU's analyzer does: the
/// last NUL byte in the final 10 MiB, the first `{` after it, checked against the 0x06
/// marker and length before it.
fn find_description(file: &mut File) -> Result<Option<(u64, String)>> {
    let io = |e: std::io::Error| {
        Error::Stream(qemu_file::Error::Read {
            transport: "stream file".into(),
            offset: 0,
            source: std::sync::Arc::new(e),
        })
    };
    let end = file.seek(SeekFrom::End(0)).map_err(io)?;
    let start = end.saturating_sub(DESCRIPTION_SEARCH);
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let Some(nul) = tail.iter().rposition(|b| *b == 0) else {
        return Ok(None);
    };
    let Some(brace) = tail[nul..].iter().position(|b| *b == b'{').map(|p| p + nul) else {
        return Ok(None);
    };
    if brace < 5 || tail[brace - 5] != QEMU_VM_VMDESCRIPTION {
        return Ok(None);
    }
    let len = u32::from_be_bytes(tail[brace - 4..brace].try_into().expect("4 bytes")) as usize;
    if brace + len > tail.len() {
        return Ok(None);
    }
    let json = String::from_utf8(tail[brace..brace + len].to_vec()).map_err(|_| {
        Error::BadDescription {
            reason: "not UTF-8".into(),
        }
    })?;
    Ok(Some((start + brace as u64 - 5, json)))
}

/// Renders the stream file at `path` as annotated text; `walkers` read the live sections.
///
/// # Errors
/// As [`dump_stream_to`].
pub fn dump_stream(path: &Path, walkers: &mut [&mut dyn SectionWalker]) -> Result<String> {
    let mut text = Vec::new();
    dump_stream_to(path, walkers, &mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Renders the stream file at `path` as annotated text into `out`, line by line;
/// `walkers` read the live sections. Only a regular file is read (its description is at
/// its end, which a pipe or a device never reaches).
///
/// # Errors
/// The file cannot be read or is not a regular file, the stream is malformed, a live
/// section has no walker, or `out` fails.
pub fn dump_stream_to(
    path: &Path,
    walkers: &mut [&mut dyn SectionWalker],
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let read_error = |e: std::io::Error| {
        Error::Stream(qemu_file::Error::Read {
            transport: path.display().to_string(),
            offset: 0,
            source: std::sync::Arc::new(e),
        })
    };
    let mut file = File::open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file: a stream's VM description is at its end, which a pipe or a \
             device never reaches (save the stream with `migrate file:PATH` first)",
        )));
    }
    let size = meta.len();
    let trailer = find_description(&mut file)?;
    let description: Option<VmDescription> = match &trailer {
        Some((_, json)) => Some(
            serde_json::from_str(json).map_err(|e| Error::BadDescription {
                reason: e.to_string(),
            })?,
        ),
        None => None,
    };
    let mut f = QemuFile::new(Box::new(FdTransport::new(
        OwnedFd::from(file),
        path.display().to_string(),
        false,
    )));
    let mut out = DumpSink::new(out);
    out.line(format_args!("stream of {size} bytes"));
    let r = dump_records(&mut f, description.as_ref(), walkers, &mut out);
    if let Err(e) = r {
        out.line(format_args!("@{} ERROR: {e}", f.bytes_read()));
        return Err(e);
    }
    for w in walkers.iter() {
        w.summary(&mut out);
    }
    match (&trailer, &description) {
        (Some((offset, json)), Some(d)) => out.line(format_args!(
            "@{offset} VM DESCRIPTION: {} bytes of JSON, page size {}, {} devices",
            json.len(),
            d.page_size,
            d.devices.len()
        )),
        _ => out.line("no VM description trailer"),
    }
    match out.error.take() {
        Some(e) => Err(Error::Stream(qemu_file::Error::Write {
            transport: "the dump's output".into(),
            source: std::sync::Arc::new(e),
        })),
        None => Ok(()),
    }
}

fn dump_records(
    f: &mut QemuFile,
    desc: Option<&VmDescription>,
    walkers: &mut [&mut dyn SectionWalker],
    out: &mut DumpSink,
) -> Result<()> {
    FileHeader::read_from(f)?;
    out.line(format_args!(
        "@0 HEADER magic {QEMU_VM_FILE_MAGIC:#010x} \"QEVM\", version 3"
    ));
    // Stream section id -> (idstr, version) of live sections seen in a START.
    let mut started: Vec<(u32, String, u32)> = Vec::new();
    loop {
        let offset = f.bytes_read();
        let b = f.get_u8()?;
        let ty = SectionType::try_from(b)
            .map_err(|found| Error::UnknownSectionType { found, offset })?;
        match ty {
            SectionType::Eof => {
                out.line(format_args!("@{offset} EOF"));
                return Ok(());
            }
            SectionType::Configuration => {
                let c = Configuration::read_from(f)?;
                out.line(format_args!(
                    "@{offset} CONFIGURATION machine {:?}",
                    c.machine
                ));
            }
            SectionType::Command => {
                let command = f.get_be16()?;
                let len = f.get_be16()?;
                match (command, len) {
                    (MIG_CMD_OPEN_RETURN_PATH, 0) => {
                        out.line(format_args!("@{offset} COMMAND OPEN_RETURN_PATH"));
                    }
                    (MIG_CMD_PING, 4) => {
                        let value = f.get_be32()?;
                        out.line(format_args!("@{offset} COMMAND PING {value}"));
                    }
                    _ => return Err(Error::UnsupportedCommand { command, offset }),
                }
            }
            SectionType::Start | SectionType::Full => {
                let h = FullHeader::read_from(f)?;
                out.line(format_args!(
                    "@{offset} {} section {} {:?} instance {} version {}",
                    ty.name(),
                    h.section_id,
                    h.idstr,
                    h.instance_id,
                    h.version_id
                ));
                if ty == SectionType::Start {
                    walk_live(f, walkers, &h.idstr, h.instance_id, ty, h.version_id, out)?;
                    started.push((h.section_id, h.idstr.clone(), h.version_id));
                } else {
                    let d = desc
                        .and_then(|d| d.device(&h.idstr, h.instance_id))
                        .ok_or_else(|| Error::BadDescription {
                            reason: format!(
                                "device section {:?} instance {} is not described, so its end cannot be found",
                                h.idstr, h.instance_id
                            ),
                        })?;
                    out.nested(|out| walk_device(f, d, out))?;
                }
                Footer::read_from(f, h.section_id, &h.idstr)?;
            }
            SectionType::Part | SectionType::End => {
                let section_id = f.get_be32()?;
                let (idstr, version) = started
                    .iter()
                    .find(|(id, _, _)| *id == section_id)
                    .map(|(_, s, v)| (s.clone(), *v))
                    .ok_or(Error::UnknownSectionId { section_id, offset })?;
                out.line(format_args!(
                    "@{offset} {} section {section_id} {idstr:?}",
                    ty.name()
                ));
                walk_live(f, walkers, &idstr, 0, ty, version, out)?;
                Footer::read_from(f, section_id, &idstr)?;
            }
        }
    }
}

fn walk_live(
    f: &mut QemuFile,
    walkers: &mut [&mut dyn SectionWalker],
    idstr: &str,
    instance_id: u32,
    ty: SectionType,
    version: u32,
    out: &mut DumpSink,
) -> Result<()> {
    let w = walkers
        .iter_mut()
        .find(|w| w.idstr() == idstr)
        .ok_or_else(|| Error::UnknownSection {
            idstr: idstr.to_string(),
            instance_id,
        })?;
    out.nested(|out| w.walk(f, ty, version, out))
        .map_err(|source| Error::Section {
            idstr: idstr.to_string(),
            instance_id,
            op: "dump",
            source,
        })
}

/// What a device walk may still spend: entries and nesting.
struct Budget {
    entries: u64,
    depth: usize,
}

fn too_much(what: &str) -> Error {
    Error::BadDescription {
        reason: format!("the description asks for {what}; it is corrupt or hostile"),
    }
}

fn walk_device(f: &mut QemuFile, d: &DeviceDescription, out: &mut DumpSink) -> Result<()> {
    let mut budget = Budget {
        entries: MAX_DUMP_ENTRIES,
        depth: 0,
    };
    walk_struct(f, &d.state.fields, &d.state.subsections, out, &mut budget)
}

fn walk_struct(
    f: &mut QemuFile,
    fields: &[FieldDesc],
    subsections: &[StructDesc],
    out: &mut DumpSink,
    budget: &mut Budget,
) -> Result<()> {
    if budget.depth >= MAX_DUMP_DEPTH {
        return Err(too_much("more than 32 levels of nesting"));
    }
    budget.depth += 1;
    walk_fields(f, fields, out, budget)?;
    walk_subsections(f, subsections, out, budget)?;
    budget.depth -= 1;
    Ok(())
}

fn walk_subsections(
    f: &mut QemuFile,
    subs: &[StructDesc],
    out: &mut DumpSink,
    budget: &mut Budget,
) -> Result<()> {
    for s in subs {
        let offset = f.bytes_read();
        let byte = f.get_u8()?;
        if byte != QEMU_VM_SUBSECTION {
            return Err(Error::BadDescription {
                reason: format!(
                    "subsection {:?} expected at byte {offset}, found {byte:#04x}",
                    s.vmsd_name
                ),
            });
        }
        let name = f.get_counted_string("subsection name")?;
        let version = f.get_be32()?;
        out.line(format_args!("subsection {name:?} version {version}"));
        out.nested(|out| walk_struct(f, &s.fields, &s.subsections, out, budget))?;
    }
    Ok(())
}

fn walk_fields(
    f: &mut QemuFile,
    fields: &[FieldDesc],
    out: &mut DumpSink,
    budget: &mut Budget,
) -> Result<()> {
    for field in fields {
        let count = field.array_len.unwrap_or(1);
        for index in 0..count {
            budget.entries = budget
                .entries
                .checked_sub(1)
                .ok_or_else(|| too_much("more than a million fields"))?;
            let name = match (field.array_len, field.index) {
                (Some(_), _) => format!("{}[{index}]", field.name),
                (None, Some(i)) => format!("{}[{i}]", field.name),
                (None, None) => field.name.clone(),
            };
            if let Some(nested) = &field.nested {
                out.line(format_args!("{name}: struct"));
                out.nested(|out| walk_struct(f, &nested.fields, &nested.subsections, out, budget))?;
                continue;
            }
            let bytes = f.get_bytes(field.size, MAX_DUMP_FIELD as usize, "described field")?;
            out.line(format_args!(
                "{name}: {} = {}",
                field.ty,
                render(&field.ty, &bytes)
            ));
        }
    }
    Ok(())
}

fn render(ty: &str, bytes: &[u8]) -> String {
    let integer = ty.starts_with("int") || ty.starts_with("uint");
    if ty == "bool" && bytes.len() == 1 {
        return (bytes[0] != 0).to_string();
    }
    if integer && bytes.len() <= 8 {
        let mut v = 0u64;
        if ty.ends_with(" le") {
            for b in bytes.iter().rev() {
                v = v << 8 | u64::from(*b);
            }
        } else {
            for b in bytes {
                v = v << 8 | u64::from(*b);
            }
        }
        return format!("{v:#0w$x}", w = bytes.len() * 2 + 2);
    }
    let shown: Vec<String> = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > 16 { " ..." } else { "" };
    format!("{} bytes [{}{more}]", bytes.len(), shown.join(" "))
}
