//! QEMU's own `scripts/analyze-migration.py` reads our streams: RAM plus a described
//! device, extracted with `-x` and compared with the source memory.
//!
//! The script is QEMU's (GPL) and is not part of this repository: point
//! `QEMU_ANALYZE_MIGRATION` at a copy to run this check (docs/testing.md says how).
//! Without it the test says so loudly and checks only that the stream was written.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use qemu_file::{QemuFile, connect};
use ram_list::{RamBlock, RamList, RamSection, RamStats};
use savevm::{DeviceHandler, FieldReader, FieldWriter, SaveVm, SectionError, SectionInfo};
use vm_memory::MmapRegion;

struct Cpu;

impl DeviceHandler for Cpu {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.u64("rip", 0x7c00);
        w.u32("efer", 0x500);
        w.u16("cs", 0x8);
        w.u8("cpl", 3);
        w.bool("halted", false);
        w.i64("tsc_offset", -5);
        w.buffer("xsave", &[0x5a; 64]);
        Ok(())
    }
    fn load(&mut self, _r: &mut FieldReader<'_>, _v: u32) -> Result<(), SectionError> {
        Ok(())
    }
}

#[test]
fn qemu_analyze_migration_reads_our_stream() {
    let dir = std::env::temp_dir().join(format!("ram-list-analyze-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let list = Arc::new(RamList::new());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut expect = Vec::new();
    for (name, pages) in [("pc.ram", 512usize), ("vga.vram", 64)] {
        let host = Arc::new(MmapRegion::<()>::new(pages * 4096).unwrap());
        let b = list
            .add(RamBlock::new(name, host, Box::new(())).unwrap())
            .unwrap();
        let mut mem = vec![0u8; pages * 4096];
        for (i, page) in mem.chunks_mut(4096).enumerate() {
            if i % 3 != 0 {
                for w in page.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        b.write_bytes(0, &mem);
        expect.push((name, mem));
    }
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        RamSection::info(),
        Box::new(RamSection::new(list, Arc::new(RamStats::default()))),
    )
    .unwrap();
    vm.register_device(SectionInfo::new("cpu", 0, 1), Box::new(Cpu))
        .unwrap();
    let stream = dir.join("stream");
    let uri = qemu_file::MigrationUri::File(stream.clone());
    vm.save_snapshot(&mut QemuFile::new(connect(&uri).unwrap()))
        .unwrap();
    assert!(std::fs::metadata(&stream).unwrap().len() > 350 * 4096);

    let Some(script) = std::env::var_os("QEMU_ANALYZE_MIGRATION").map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: QEMU's analyze-migration.py check; set QEMU_ANALYZE_MIGRATION=/path/to/analyze-migration.py \
             (see docs/testing.md)"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    };
    let out = Command::new("python3")
        .arg(&script)
        .args(["-x", "-f"])
        .arg(&stream)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, mem) in &expect {
        let got = std::fs::read(dir.join(name)).unwrap();
        assert!(
            got == *mem,
            "extracted {name} differs from the source memory"
        );
    }
    let state: serde_json_lite::Value =
        serde_json_lite::parse(&std::fs::read_to_string(dir.join("state.json")).unwrap());
    let cpu = state
        .get("cpu (1)")
        .expect("the cpu section is in state.json");
    assert_eq!(cpu.get("rip").unwrap().as_str(), "0x0000000000007c00");
    assert_eq!(
        cpu.get("tsc_offset").unwrap().as_str(),
        "0xfffffffffffffffb (-5)"
    );
    assert_eq!(cpu.get("halted").unwrap().as_str(), "false");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Just enough JSON reading for state.json (objects of strings, numbers and bools).
mod serde_json_lite {
    pub enum Value {
        Obj(Vec<(String, Value)>),
        Str(String),
    }
    impl Value {
        pub fn get(&self, k: &str) -> Option<&Value> {
            match self {
                Value::Obj(v) => v.iter().find(|(n, _)| n == k).map(|(_, v)| v),
                Value::Str(_) => None,
            }
        }
        pub fn as_str(&self) -> &str {
            match self {
                Value::Str(s) => s,
                Value::Obj(_) => "",
            }
        }
    }
    pub fn parse(s: &str) -> Value {
        let b = s.as_bytes();
        let mut i = 0;
        value(b, &mut i)
    }
    fn ws(b: &[u8], i: &mut usize) {
        while *i < b.len() && (b[*i] as char).is_whitespace() {
            *i += 1;
        }
    }
    fn value(b: &[u8], i: &mut usize) -> Value {
        ws(b, i);
        match b[*i] {
            b'{' => {
                *i += 1;
                let mut v = Vec::new();
                loop {
                    ws(b, i);
                    if b[*i] == b'}' {
                        *i += 1;
                        return Value::Obj(v);
                    }
                    let Value::Str(k) = value(b, i) else {
                        panic!("key")
                    };
                    ws(b, i);
                    *i += 1; // ':'
                    let val = value(b, i);
                    v.push((k, val));
                    ws(b, i);
                    if b[*i] == b',' {
                        *i += 1;
                    }
                }
            }
            b'"' => {
                *i += 1;
                let start = *i;
                while b[*i] != b'"' {
                    *i += 1;
                }
                *i += 1;
                Value::Str(String::from_utf8(b[start..*i - 1].to_vec()).unwrap())
            }
            _ => {
                let start = *i;
                while *i < b.len() && !b",}] \n".contains(&b[*i]) {
                    *i += 1;
                }
                Value::Str(String::from_utf8(b[start..*i].to_vec()).unwrap())
            }
        }
    }
}
