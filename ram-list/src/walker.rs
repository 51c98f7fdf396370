//! `RamWalker`: reads `"ram"` records for savevm's stream dump.

use qemu_file::QemuFile;
use savevm::format::SectionType;
use savevm::{DumpSink, SectionError, SectionWalker};

use crate::Error;
use crate::format::{
    RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO, RecordHeader, TARGET_PAGE_SIZE, read_block_list,
};

/// Most blocks a dumped block list may name.
const MAX_BLOCKS: usize = 4096;

/// Summarises RAM records: block lists, and per payload the pages by kind and block.
#[derive(Debug, Default)]
pub struct RamWalker {
    block: Option<String>,
    /// Per block: name, size, zero pages, normal pages.
    totals: Vec<(String, u64, u64, u64)>,
}

impl RamWalker {
    fn count(&mut self, name: &str, zero: bool) {
        let i = match self.totals.iter().position(|t| t.0 == name) {
            Some(i) => i,
            None => {
                self.totals.push((name.to_string(), 0, 0, 0));
                self.totals.len() - 1
            }
        };
        if zero {
            self.totals[i].2 += 1;
        } else {
            self.totals[i].3 += 1;
        }
    }
}

impl SectionWalker for RamWalker {
    fn idstr(&self) -> &str {
        "ram"
    }

    fn walk(
        &mut self,
        f: &mut QemuFile,
        _kind: SectionType,
        version_id: u32,
        out: &mut DumpSink,
    ) -> Result<(), SectionError> {
        if version_id != 4 {
            return Err(Box::new(Error::Version(version_id)));
        }
        let (mut zero, mut normal) = (0u64, 0u64);
        let mut blocks: Vec<String> = Vec::new();
        loop {
            let at = f.bytes_read();
            let h = RecordHeader::read_from(f)?;
            let mut flags = h.flags;
            if flags & RAM_SAVE_FLAG_MEM_SIZE != 0 {
                // A QEMU 7.2 stream does not say whether x-ignore-shared was on: the
                // list is read without guest addresses.
                let list = read_block_list(f, h.offset, MAX_BLOCKS, false)?;
                out.line(format_args!(
                    "MEM_SIZE: {} bytes in {} blocks",
                    h.offset,
                    list.len()
                ));
                for b in list {
                    let (name, len) = (b.idstr, b.used_length);
                    out.line(format_args!("    block {name:?}: {len} bytes"));
                    if !self.totals.iter().any(|t| t.0 == name) {
                        self.totals.push((name, len, 0, 0));
                    }
                }
                flags &= !RAM_SAVE_FLAG_MEM_SIZE;
            }
            if flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE) != 0 {
                if let Some(name) = h.idstr {
                    self.block = Some(name);
                }
                let name = self.block.clone().ok_or_else(|| Error::BadPage {
                    at,
                    reason: "CONTINUE with no previous block".into(),
                })?;
                if flags & RAM_SAVE_FLAG_ZERO != 0 {
                    f.get_u8()?;
                    zero += 1;
                    self.count(&name, true);
                } else {
                    f.skip(TARGET_PAGE_SIZE)?;
                    normal += 1;
                    self.count(&name, false);
                }
                if !blocks.contains(&name) {
                    blocks.push(name);
                }
                flags &= !(RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE);
            }
            flags &= !RAM_SAVE_FLAG_MULTIFD_FLUSH;
            if flags == RAM_SAVE_FLAG_EOS {
                break;
            }
            if flags != 0 {
                return Err(Box::new(Error::UnknownFlags { at, flags }));
            }
        }
        if zero + normal > 0 {
            out.line(format_args!(
                "{} pages: {zero} zero, {normal} normal, in {}",
                zero + normal,
                blocks
                    .iter()
                    .map(|b| format!("{b:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.line("EOS");
        Ok(())
    }

    fn summary(&self, out: &mut DumpSink) {
        for (name, len, zero, normal) in &self.totals {
            out.line(format_args!(
                "ram block {name:?} ({len} bytes): {zero} zero and {normal} normal page records in all"
            ));
        }
    }
}
