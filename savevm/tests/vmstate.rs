//! Device state declared once with `#[derive(VmState)]`: the bytes QEMU's vmstate would
//! write, the description QEMU's analyzer reads, versions, subsections and limits.

use std::sync::{Arc, Mutex};

use qemu_file::{MemBuffer, QemuFile};
use savevm::{
    DeviceHandler, FieldReader, FieldWriter, MAX_ELEMENTS, MAX_FIELD_LEN, SaveVm, SectionError,
    SectionInfo, VmDescription, VmState,
};

#[derive(VmState, Default, Debug, Clone, PartialEq)]
#[vmstate(name = "timer")]
struct Timer {
    deadline: u64,
    armed: bool,
}

#[derive(VmState, Default, Debug, Clone, PartialEq)]
#[vmstate(name = "uart/fifo")]
struct Fifo {
    bytes: Vec<u8>,
}

#[derive(VmState, Default, Debug, Clone, PartialEq)]
#[vmstate(name = "uart", version = 3, minimum_version = 1)]
struct Uart {
    lcr: u8,
    divisor: u16,
    flags: u32,
    tsc: u64,
    delta: i8,
    skew: i16,
    offset: i32,
    base: i64,
    enabled: bool,
    regs: [u32; 4],
    scratch: [u8; 8],
    log: Vec<u64>,
    timer: Timer,
    timers: [Timer; 3],
    queue: Vec<Timer>,
    #[vmstate(version = 2)]
    modem: u8,
    #[vmstate(exists = Uart::has_extra)]
    extra: u32,
    #[vmstate(rename = "ier")]
    interrupt_enable: u8,
    #[vmstate(subsection)]
    fifo: Option<Fifo>,
    #[vmstate(subsection)]
    timeout: Option<Timer>,
    #[vmstate(skip)]
    cache: Vec<u32>,
}

impl Uart {
    fn has_extra(&self, _version: u32) -> bool {
        self.flags & 1 != 0
    }

    fn sample() -> Self {
        let t = |d| Timer {
            deadline: d,
            armed: d % 2 == 1,
        };
        Uart {
            lcr: 3,
            divisor: 12,
            flags: 0xdead_beef,
            tsc: 1 << 40,
            delta: -3,
            skew: -300,
            offset: -70_000,
            base: -(1 << 40),
            enabled: true,
            regs: [1, 2, 3, 4],
            scratch: *b"scratch!",
            log: vec![10, 20, 30],
            timer: t(7),
            timers: [t(1), t(2), t(3)],
            queue: vec![t(4), t(5)],
            modem: 0x80,
            extra: 99,
            interrupt_enable: 0x0f,
            fifo: Some(Fifo {
                bytes: b"hello".to_vec(),
            }),
            timeout: None,
            cache: vec![1, 2, 3],
        }
    }
}

fn snapshot(info: SectionInfo, device: Box<dyn DeviceHandler>) -> Vec<u8> {
    let mut vm = SaveVm::new("pc");
    vm.register_device(info, device).unwrap();
    let b = MemBuffer::new();
    vm.save_snapshot(&mut b.file()).unwrap();
    b.contents()
}

fn load(bytes: &[u8], info: SectionInfo, device: Box<dyn DeviceHandler>) -> savevm::Result<()> {
    let mut vm = SaveVm::new("pc");
    vm.register_device(info, device).unwrap();
    vm.load(&mut QemuFile::from_bytes(bytes.to_vec()))
        .map(|_| ())
}

/// A snapshot of one device, section `idstr`, whose state is `value`.
fn save<T: VmState + Send + 'static>(idstr: &str, value: T) -> Vec<u8> {
    snapshot(
        SectionInfo::for_state::<T>(idstr, 0),
        Box::new(Arc::new(Mutex::new(value))),
    )
}

/// `bytes` loaded into a default `T`, section `idstr`.
fn load_state<T: VmState + Default + Send + 'static>(
    bytes: &[u8],
    idstr: &str,
) -> savevm::Result<T> {
    let dest = Arc::new(Mutex::new(T::default()));
    load(
        bytes,
        SectionInfo::for_state::<T>(idstr, 0),
        Box::new(dest.clone()),
    )?;
    let state = std::mem::take(&mut *dest.lock().unwrap());
    Ok(state)
}

/// The JSON description after the stream's EOF.
fn description(bytes: &[u8]) -> VmDescription {
    let start = bytes
        .windows(13)
        .rposition(|w| w == b"{\"page_size\":")
        .expect("a JSON trailer");
    let json = &bytes[start..];
    serde_json::from_slice(json).unwrap()
}

#[test]
fn a_derived_device_round_trips_and_describes_every_field() {
    let source = Arc::new(Mutex::new(Uart::sample()));
    let info = || SectionInfo::for_state::<Uart>("uart", 0);
    let bytes = snapshot(info(), Box::new(source.clone()));

    let dest = Arc::new(Mutex::new(Uart {
        timeout: Some(Timer::default()),
        cache: vec![9],
        ..Uart::default()
    }));
    load(&bytes, info(), Box::new(dest.clone())).unwrap();
    let got = dest.lock().unwrap().clone();
    let want = Uart {
        // Not migrated: left as the destination had it.
        cache: vec![9],
        ..Uart::sample()
    };
    assert_eq!(got, want, "a subsection absent from the stream is None");

    let desc = description(&bytes);
    let d = desc.device("uart", 0).unwrap();
    assert_eq!((d.state.vmsd_name.as_str(), d.state.version), ("uart", 3));
    let fields: Vec<String> = d
        .state
        .fields
        .iter()
        .map(|f| {
            let mut s = format!("{} {} {}", f.name, f.ty, f.size);
            if let Some(n) = f.array_len {
                s += &format!(" x{n}");
            }
            if let Some(i) = f.index {
                s += &format!(" [{i}]");
            }
            s
        })
        .collect();
    assert_eq!(
        fields,
        [
            "lcr uint8 1",
            "divisor uint16 2",
            "flags uint32 4",
            "tsc uint64 8",
            "delta int8 1",
            "skew int16 2",
            "offset int32 4",
            "base int64 8",
            "enabled bool 1",
            "regs uint32 4 x4",
            "scratch buffer 8",
            "log_len uint32 4",
            "log uint64 8 x3",
            "timer struct 9",
            "timers struct 9 x3",
            "queue_len uint32 4",
            "queue struct 9 x2",
            "modem uint8 1",
            "extra uint32 4",
            "ier uint8 1",
        ]
    );
    let timer = d.state.fields[13].nested.as_ref().unwrap();
    assert_eq!((timer.vmsd_name.as_str(), timer.version), ("timer", 1));
    assert_eq!(timer.fields.len(), 2);
    assert_eq!(d.state.subsections.len(), 1);
    let fifo = &d.state.subsections[0];
    assert_eq!(fifo.vmsd_name, "uart/fifo");
    assert_eq!(fifo.fields[1].name, "bytes");
    assert_eq!(fifo.fields[1].ty, "buffer");

    // Our own dump walks it all by the description.
    let dir = std::env::temp_dir().join(format!("vmstate-dump-{}", std::process::id()));
    std::fs::write(&dir, &bytes).unwrap();
    let text = savevm::dump_stream(&dir, &mut []).unwrap();
    std::fs::remove_file(&dir).unwrap();
    for line in [
        "regs[3]: uint32 = 0x00000004",
        "timers[2]: struct",
        "deadline: uint64 = 0x0000000000000003",
        "subsection \"uart/fifo\" version 1",
        "ier: uint8 = 0x0f",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
}

#[test]
fn fields_and_subsections_are_the_bytes_qemus_vmstate_writes() {
    #[derive(VmState, Default)]
    #[vmstate(name = "dev")]
    struct Dev {
        a: u16,
        b: [u8; 2],
        #[vmstate(subsection)]
        sub: Option<Sub>,
    }
    #[derive(VmState, Default)]
    #[vmstate(name = "ignored", version = 7)]
    struct Sub {
        c: u32,
    }
    let b = MemBuffer::new();
    let dev = Dev {
        a: 0x0102,
        b: [3, 4],
        sub: Some(Sub { c: 0x0506_0708 }),
    };
    let mut f = b.file();
    let info = SectionInfo::for_state::<Dev>("dev", 0);
    let mut vm = SaveVm::new("pc");
    vm.register_device(info, Box::new(Arc::new(Mutex::new(dev))))
        .unwrap();
    vm.save_snapshot(&mut f).unwrap();
    let bytes = b.contents();
    #[rustfmt::skip]
    let fields: &[u8] = &[
        0x01, 0x02,                         // a
        0x03, 0x04,                         // b
        0x05, 7, b'd', b'e', b'v', b'/', b's', b'u', b'b', // QEMU_VM_SUBSECTION, name
        0x00, 0x00, 0x00, 0x07,             // its version
        0x05, 0x06, 0x07, 0x08,             // c
        0x7e,                               // the section footer
    ];
    assert!(
        bytes.windows(fields.len()).any(|w| w == fields),
        "the fields are not in the stream: {bytes:02x?}"
    );
}

/// A device state as its first version knew it.
#[derive(VmState, Default, Debug, PartialEq)]
#[vmstate(name = "nic", version = 1)]
struct NicV1 {
    mac: [u8; 6],
}

/// The same device a release later: a new field from version 2, loads version 1.
#[derive(VmState, Default, Debug, PartialEq)]
#[vmstate(name = "nic", version = 2, minimum_version = 1)]
struct NicV2 {
    mac: [u8; 6],
    #[vmstate(version = 2)]
    mtu: u16,
}

#[test]
fn an_older_version_loads_without_its_newer_fields_and_a_newer_one_is_refused() {
    let old = save("nic", NicV1 { mac: [1; 6] });
    let dest = Arc::new(Mutex::new(NicV2 {
        mac: [0; 6],
        mtu: 1500,
    }));
    load(
        &old,
        SectionInfo::for_state::<NicV2>("nic", 0),
        Box::new(dest.clone()),
    )
    .unwrap();
    assert_eq!(
        *dest.lock().unwrap(),
        NicV2 {
            mac: [1; 6],
            mtu: 1500
        },
        "a field newer than the stream keeps its value"
    );

    let new = save(
        "nic",
        NicV2 {
            mac: [2; 6],
            mtu: 9000,
        },
    );
    let e = load_state::<NicV1>(&new, "nic").unwrap_err();
    assert!(e.to_string().contains("version 2"), "{e}");
}

#[test]
fn a_subsection_this_side_does_not_know_is_refused_naming_it() {
    #[derive(VmState, Default)]
    #[vmstate(name = "dev")]
    struct WithSub {
        a: u8,
        #[vmstate(subsection)]
        extra: Option<Timer>,
    }
    #[derive(VmState, Default, Debug)]
    #[vmstate(name = "dev")]
    struct Without {
        a: u8,
    }
    let bytes = save(
        "dev",
        WithSub {
            a: 1,
            extra: Some(Timer::default()),
        },
    );
    let e = load_state::<Without>(&bytes, "dev").unwrap_err();
    let chain = savevm::error_chain(&e);
    assert!(
        chain.contains("dev/extra") && chain.contains("does not know"),
        "{chain}"
    );
}

/// A device with a million-element `Vec`.
#[derive(VmState, Default, Debug, PartialEq)]
#[vmstate(name = "table")]
struct Table {
    entries: Vec<u64>,
    tags: Vec<u8>,
}

#[test]
fn a_million_element_vec_round_trips() {
    let table = Table {
        entries: (0..1_000_000u64).map(|i| i * 0x9e37_79b9).collect(),
        tags: (0..1_000_000u32).map(|i| i as u8).collect(),
    };
    let bytes = save("table", table);
    let got: Table = load_state(&bytes, "table").unwrap();
    assert_eq!(got.entries.len(), 1_000_000);
    assert!(
        got.entries
            .iter()
            .enumerate()
            .all(|(i, v)| *v == i as u64 * 0x9e37_79b9)
    );
    assert!(got.tags.iter().enumerate().all(|(i, v)| *v == i as u8));
    let d = description(&bytes);
    let f = &d.device("table", 0).unwrap().state.fields[1];
    assert_eq!((f.name.as_str(), f.array_len), ("entries", Some(1_000_000)));
}

#[test]
fn what_cannot_be_loaded_cannot_be_saved() {
    // One element more than a reader takes: the save fails naming the field, and
    // nothing of it is in the stream.
    let too_long = Table {
        entries: Vec::new(),
        tags: vec![0; MAX_ELEMENTS + 1],
    };
    let mut vm = SaveVm::new("pc");
    vm.register_device(
        SectionInfo::for_state::<Table>("table", 0),
        Box::new(Arc::new(Mutex::new(too_long))),
    )
    .unwrap();
    let b = MemBuffer::new();
    let e = vm.save_snapshot(&mut b.file()).unwrap_err();
    let chain = savevm::error_chain(&e);
    assert!(
        chain.contains("\"tags\"") && chain.contains("could not be loaded"),
        "{chain}"
    );

    // And the largest that can be saved loads.
    let largest = Table {
        entries: Vec::new(),
        tags: vec![7; MAX_FIELD_LEN],
    };
    let bytes = save("table", largest);
    let got: Table = load_state(&bytes, "table").unwrap();
    assert_eq!(got.tags.len(), MAX_FIELD_LEN);
}

/// A hand-written device claiming a length: the reader refuses what the writer would.
struct Claims(u32);

impl DeviceHandler for Claims {
    fn save(&mut self, w: &mut FieldWriter<'_>) -> Result<(), SectionError> {
        w.u32("entries_len", 0);
        w.u32("tags_len", self.0);
        Ok(())
    }
    fn load(&mut self, _r: &mut FieldReader<'_>, _v: u32) -> Result<(), SectionError> {
        unreachable!("only saves")
    }
}

#[test]
fn a_length_beyond_the_limit_is_refused_before_anything_is_allocated() {
    let bytes = snapshot(
        SectionInfo::new("table", 0, 1),
        Box::new(Claims(MAX_ELEMENTS as u32 + 1)),
    );
    let e = load_state::<Table>(&bytes, "table").unwrap_err();
    let chain = savevm::error_chain(&e);
    assert!(
        chain.contains("tags_len") && chain.contains("MAX_ELEMENTS"),
        "{chain}"
    );
    // A length within the limit whose bytes never come is a clean error too.
    let bytes = snapshot(SectionInfo::new("table", 0, 1), Box::new(Claims(1000)));
    let e = load_state::<Table>(&bytes, "table").unwrap_err();
    assert!(savevm::error_chain(&e).contains("tags"), "{e}");
}

/// QEMU's own analyzer reads the derived device by its description and names every
/// field: set QEMU_ANALYZE_MIGRATION to its `scripts/analyze-migration.py` (docs/testing.md).
#[test]
fn qemu_analyze_migration_names_every_field() {
    let Some(script) = std::env::var_os("QEMU_ANALYZE_MIGRATION") else {
        eprintln!("SKIPPED: set QEMU_ANALYZE_MIGRATION=/path/to/analyze-migration.py");
        return;
    };
    let bytes = save("uart", Uart::sample());
    let path = std::env::temp_dir().join(format!("vmstate-analyze-{}", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["-d", "state", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uart = &state["uart (0)"];
    assert_eq!(uart["lcr"], "0x03");
    assert_eq!(uart["offset"], "0xfffeee90 (-70000)");
    assert_eq!(
        uart["regs"],
        serde_json::json!(["0x00000001", "0x00000002", "0x00000003", "0x00000004"])
    );
    assert_eq!(uart["log_len"], "0x00000003");
    assert_eq!(uart["log"][2], "0x000000000000001e");
    assert_eq!(uart["timer"]["deadline"], "0x0000000000000007");
    assert_eq!(uart["timers"][2]["armed"], true);
    assert_eq!(uart["queue"][1]["deadline"], "0x0000000000000005");
    assert_eq!(uart["ier"], "0x0f");
    assert_eq!(uart["uart/fifo"]["bytes"], "68 65 6c 6c 6f");
}

#[test]
fn a_fields_own_bound_holds_on_save_and_on_load() {
    #[derive(VmState, Default, Debug)]
    #[vmstate(name = "msrs")]
    struct Bounded {
        #[vmstate(max_len = 4)]
        list: Vec<u16>,
    }
    #[derive(VmState, Default)]
    #[vmstate(name = "msrs")]
    struct Unbounded {
        list: Vec<u16>,
    }
    let mut vm = SaveVm::new("pc");
    vm.register_device(
        SectionInfo::for_state::<Bounded>("msrs", 0),
        Box::new(Arc::new(Mutex::new(Bounded { list: vec![1; 5] }))),
    )
    .unwrap();
    let e = vm.save_snapshot(&mut MemBuffer::new().file()).unwrap_err();
    let chain = savevm::error_chain(&e);
    assert!(
        chain.contains("\"list\"") && chain.contains("more than the 4"),
        "{chain}"
    );

    let five = save("msrs", Unbounded { list: vec![1; 5] });
    let e = load_state::<Bounded>(&five, "msrs").unwrap_err();
    let chain = savevm::error_chain(&e);
    assert!(
        chain.contains("list_len") && chain.contains("more than the 4"),
        "{chain}"
    );
    let four = save("msrs", Unbounded { list: vec![1; 4] });
    let dest = Arc::new(Mutex::new(Bounded::default()));
    load(
        &four,
        SectionInfo::for_state::<Bounded>("msrs", 0),
        Box::new(dest.clone()),
    )
    .unwrap();
    assert_eq!(dest.lock().unwrap().list, [1; 4]);
}
