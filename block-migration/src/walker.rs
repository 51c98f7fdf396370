//! `BlockWalker`: reads `"block"` records for savevm's stream dump.

use qemu_file::QemuFile;
use savevm::format::SectionType;
use savevm::{DumpSink, SectionError, SectionWalker};

use crate::format::{
    BLK_MIG_FLAG_DEVICE_BLOCK, BLK_MIG_FLAG_DEVICE_INFO, BLK_MIG_FLAG_EOS, BLK_MIG_FLAG_PROGRESS,
    BLK_MIG_FLAG_ZERO_BLOCK, CHUNK_SIZE, Record, SECTOR_SIZE,
};

/// Summarises block records: the device list, and per payload the chunks by kind.
#[derive(Debug, Default)]
pub struct BlockWalker {
    /// Per disk: name, data chunks, zero chunks.
    totals: Vec<(String, u64, u64)>,
}

impl SectionWalker for BlockWalker {
    fn idstr(&self) -> &str {
        "block"
    }

    fn walk(
        &mut self,
        f: &mut QemuFile,
        _kind: SectionType,
        _version: u32,
        out: &mut DumpSink,
    ) -> Result<(), SectionError> {
        let (mut data, mut zero, mut progress) = (0u64, 0u64, None);
        loop {
            let at = f.bytes_read();
            let r = Record::read_from(f)?;
            r.check(at)?;
            if r.flags & BLK_MIG_FLAG_DEVICE_INFO != 0 {
                let name = r.name.unwrap_or_default();
                out.line(format_args!(
                    "disk {name:?}: {} bytes",
                    r.value * SECTOR_SIZE
                ));
                continue;
            }
            if r.flags & BLK_MIG_FLAG_DEVICE_BLOCK != 0 {
                let name = r.name.unwrap_or_default();
                let i = match self.totals.iter().position(|t| t.0 == name) {
                    Some(i) => i,
                    None => {
                        self.totals.push((name, 0, 0));
                        self.totals.len() - 1
                    }
                };
                if r.flags & BLK_MIG_FLAG_ZERO_BLOCK != 0 {
                    zero += 1;
                    self.totals[i].2 += 1;
                } else {
                    f.skip(CHUNK_SIZE)?;
                    data += 1;
                    self.totals[i].1 += 1;
                }
            } else if r.flags & BLK_MIG_FLAG_PROGRESS != 0 {
                progress = Some(r.value);
            } else if r.flags & BLK_MIG_FLAG_EOS != 0 {
                break;
            }
        }
        if data + zero > 0 {
            out.line(format_args!(
                "{} chunks of 1 MiB: {data} with data, {zero} zero",
                data + zero
            ));
        }
        if let Some(p) = progress {
            out.line(format_args!("bulk copy at {p} %"));
        }
        out.line("EOS");
        Ok(())
    }

    fn summary(&self, out: &mut DumpSink) {
        for (name, data, zero) in &self.totals {
            out.line(format_args!(
                "disk {name:?}: {data} data and {zero} zero chunk records in all"
            ));
        }
    }
}
