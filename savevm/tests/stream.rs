//! Whole streams: save, load back, and every way a hostile stream is refused.

mod common;

use std::sync::{Arc, Mutex};

use common::{Uart, UartSection, Words, WordsSection};
use qemu_file::{MemBuffer, QemuFile};
use savevm::{Error, SaveVm, SectionInfo};

fn source_vm(mem: &Arc<Words>, uart: &Arc<Mutex<Uart>>) -> SaveVm {
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        SectionInfo::new("words", 0, 2),
        Box::new(WordsSection::new(mem.clone())),
    )
    .unwrap();
    vm.register_device(
        SectionInfo::new("uart", 0, 1),
        Box::new(UartSection(uart.clone())),
    )
    .unwrap();
    vm
}

fn snapshot_bytes() -> (Vec<u8>, Vec<u64>, Uart) {
    let mem = Words::new(64);
    mem.write(5, 0xdead_beef);
    let uart = Arc::new(Mutex::new(Uart {
        lcr: 3,
        divisor: 12,
        enabled: true,
        ticks: 1 << 40,
        fifo: b"hi".to_vec(),
    }));
    let buf = MemBuffer::new();
    source_vm(&mem, &uart)
        .save_snapshot(&mut buf.file())
        .unwrap();
    let u = uart.lock().unwrap().clone();
    (buf.contents(), mem.snapshot(), u)
}

fn load(bytes: &[u8]) -> (Result<savevm::LoadReport, Error>, Vec<u64>, Uart) {
    let mem = Words::new(64);
    for i in 0..64 {
        mem.write(i, 0);
    }
    let uart = Arc::new(Mutex::new(Uart::default()));
    let mut vm = source_vm(&mem, &uart);
    let r = vm.load(&mut QemuFile::from_bytes(bytes.to_vec()));
    let u = uart.lock().unwrap().clone();
    (r, mem.snapshot(), u)
}

#[test]
fn snapshot_round_trips() {
    let (bytes, words, uart) = snapshot_bytes();
    let (r, loaded, luart) = load(&bytes);
    let r = r.unwrap();
    assert_eq!(loaded, words);
    assert_eq!(luart, uart);
    assert_eq!(r.bytes, bytes.len() as u64);
    assert_eq!(r.records, 3, "START, END, FULL");
    let d: serde_json::Value = serde_json::from_str(r.description.as_deref().unwrap()).unwrap();
    assert_eq!(d["devices"][0]["name"], "uart");
    assert_eq!(d["devices"][0]["fields"][5]["size"], 2);
}

#[test]
fn snapshot_golden_framing() {
    let (bytes, _, _) = snapshot_bytes();
    #[rustfmt::skip]
    let head: &[u8] = &[
        0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3,          // "QEVM", version 3
        0x07, 0, 0, 0, 2, b'p', b'c',                // configuration "pc"
        0x01, 0, 0, 0, 1,                            // START section 1
        5, b'w', b'o', b'r', b'd', b's',             // "words"
        0, 0, 0, 0, 0, 0, 0, 2,                      // instance 0, version 2
        0x80, 0, 0, 0, 0, 0, 0, 64,                  // count 64
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // EOS
        0x7e, 0, 0, 0, 1,                            // footer of section 1
        0x03, 0, 0, 0, 1,                            // END section 1
    ];
    assert_eq!(&bytes[..head.len()], head);
    let eof = bytes.iter().rposition(|b| *b == 0x06).unwrap();
    assert_eq!(bytes[eof - 1], 0x00, "EOF right before the description");
    let len = u32::from_be_bytes(bytes[eof + 1..eof + 5].try_into().unwrap()) as usize;
    assert_eq!(eof + 5 + len, bytes.len());
}

/// A live iteration is a PART record (`0x02 | be32 section_id`, payload, footer), and
/// a device section a FULL record with the START header's layout.
#[test]
fn part_and_full_golden_framing() {
    let mem = Words::new(64);
    let uart = Arc::new(Mutex::new(Uart::default()));
    let mut vm = source_vm(&mem, &uart);
    let buf = MemBuffer::new();
    let mut f = buf.file();
    vm.save_header(&mut f);
    vm.save_setup(&mut f).unwrap();
    f.flush().unwrap();
    let setup_len = buf.contents().len();
    mem.write(7, 1);
    vm.save_iterate(&mut f).unwrap();
    f.flush().unwrap();
    let part = buf.contents()[setup_len..].to_vec();
    #[rustfmt::skip]
    let head: &[u8] = &[
        0x02, 0, 0, 0, 1,                            // PART section 1
    ];
    assert_eq!(&part[..head.len()], head, "{part:02x?}");
    assert_eq!(
        &part[part.len() - 5..],
        &[0x7e, 0, 0, 0, 1],
        "footer of section 1"
    );

    vm.save_devices(&mut f).unwrap();
    f.flush().unwrap();
    let all = buf.contents();
    let full = all
        .windows(5)
        .position(|w| w == [0x04, 0, 0, 0, 2])
        .expect("a FULL record for section 2");
    #[rustfmt::skip]
    let golden: &[u8] = &[
        0x04, 0, 0, 0, 2,                            // FULL section 2
        4, b'u', b'a', b'r', b't',                   // "uart"
        0, 0, 0, 0, 0, 0, 0, 1,                      // instance 0, version 1
    ];
    assert_eq!(&all[full..full + golden.len()], golden);
    vm.save_cleanup();
}

#[test]
fn every_truncation_is_refused() {
    let (bytes, _, _) = snapshot_bytes();
    let eof = bytes.iter().rposition(|b| *b == 0x06).unwrap() - 1;
    for cut in 0..=eof {
        let (r, _, _) = load(&bytes[..cut]);
        match r {
            Err(Error::Stream(qemu_file::Error::UnexpectedEof { .. })) => {}
            Err(Error::Section { source, .. })
                if savevm::error_chain(&*source).contains("ended") => {}
            other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
        }
    }
    // Cut inside the description trailer: refused too.
    for cut in eof + 2..bytes.len() {
        assert!(load(&bytes[..cut]).0.is_err(), "cut at {cut}");
    }
    // Without a trailer at all the stream is still complete.
    assert!(load(&bytes[..=eof]).0.is_ok());
}

#[test]
fn random_bit_flips_never_panic() {
    let (bytes, _, _) = snapshot_bytes();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut refused = 0;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + (x % 3) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % b.len();
            b[i] ^= 1 << (x >> 60 & 7);
        }
        let (r, _, _) = load(&b);
        if let Err(e) = r {
            refused += 1;
            assert!(!e.to_string().is_empty());
        }
    }
    assert!(refused > 1000, "most flips must be detected, got {refused}");
}

fn patched(f: impl FnOnce(&mut Vec<u8>)) -> Error {
    let (mut bytes, _, _) = snapshot_bytes();
    f(&mut bytes);
    load(&bytes).0.unwrap_err()
}

#[test]
fn wrong_magic_and_version() {
    assert!(matches!(patched(|b| b[0] = b'X'), Error::BadMagic { .. }));
    assert!(matches!(
        patched(|b| b[7] = 4),
        Error::UnsupportedVersion { found: 4 }
    ));
}

#[test]
fn machine_type_mismatch() {
    let e = patched(|b| b[13] = b'q');
    assert!(
        matches!(&e, Error::MachineMismatch { stream, .. } if stream == "qc"),
        "{e}"
    );
}

/// As QEMU 7.2: a stream without its machine type is refused ("Configuration section
/// missing"), and so is a second one.
#[test]
fn the_configuration_section_is_required_once() {
    // Header (8 bytes), then 0x07, be32 2, "pc".
    let e = patched(|b| {
        b.drain(8..15);
    });
    assert!(
        matches!(e, Error::ConfigurationMissing { offset: 8, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("Configuration section missing"));
    let e = patched(|b| {
        let config: Vec<u8> = b[8..15].to_vec();
        b.splice(15..15, config);
    });
    assert!(matches!(e, Error::WrongRecordKind { .. }), "{e}");
}

#[test]
fn unknown_section_name_and_type() {
    let e = patched(|b| b[21] = b'x');
    assert!(
        matches!(&e, Error::UnknownSection { idstr, .. } if idstr == "xords"),
        "{e}"
    );
    let e = patched(|b| b[15] = 0x09);
    assert!(
        matches!(
            e,
            Error::UnknownSectionType {
                found: 9,
                offset: 15
            }
        ),
        "{e}"
    );
}

#[test]
fn version_out_of_range() {
    let e = patched(|b| b[33] = 3);
    assert!(
        matches!(&e, Error::VersionOutOfRange { idstr, version: 3, min: 2, max: 2 } if idstr == "words"),
        "{e}"
    );
}

#[test]
fn footer_mismatch_names_the_section() {
    // The START footer (byte 50) is followed by the section id; corrupt its last byte.
    let e = patched(|b| b[54] = 9);
    assert!(
        matches!(&e, Error::FooterMismatch { idstr, section_id: 1, found_id: Some(9), .. } if idstr == "words"),
        "{e}"
    );
}

#[test]
fn part_for_a_section_never_started() {
    // Make the END refer to section 7.
    let e = patched(|b| b[59] = 7);
    assert!(
        matches!(e, Error::UnknownSectionId { section_id: 7, .. }),
        "{e}"
    );
}

#[test]
fn a_section_missing_from_the_stream() {
    let (bytes, _, _) = snapshot_bytes();
    let mem = Words::new(64);
    let mut vm = SaveVm::new("pc");
    vm.register_live(
        SectionInfo::new("words", 0, 2),
        Box::new(WordsSection::new(mem)),
    )
    .unwrap();
    vm.register_device(
        SectionInfo::new("uart", 0, 1),
        Box::new(UartSection(Default::default())),
    )
    .unwrap();
    vm.register_device(
        SectionInfo::new("rtc", 0, 1),
        Box::new(UartSection(Default::default())),
    )
    .unwrap();
    let e = vm.load(&mut QemuFile::from_bytes(bytes)).unwrap_err();
    assert!(
        matches!(&e, Error::MissingSection { idstr, started: false, .. } if idstr == "rtc"),
        "{e}"
    );
}

#[test]
fn a_device_load_error_names_section_and_field() {
    let (bytes, _, _) = snapshot_bytes();
    let at = bytes.windows(5).position(|w| w == b"\x04uart").unwrap();
    // FULL header: type, id(4), len, "uart", instance(4), version(4); fields: lcr(1),
    // divisor(2), enabled(1) -> corrupt the bool.
    let enabled = at + 5 + 8 + 3;
    let mut b = bytes.clone();
    b[enabled] = 7;
    let e = savevm::error_chain(&load(&b).0.unwrap_err());
    assert!(e.contains("uart") && e.contains("enabled"), "{e}");
}

#[test]
fn registry_refuses_duplicates_and_long_names() {
    let mut vm = SaveVm::new("pc");
    vm.register_device(
        SectionInfo::new("a", 0, 1),
        Box::new(UartSection(Default::default())),
    )
    .unwrap();
    assert!(matches!(
        vm.register_device(
            SectionInfo::new("a", 0, 1),
            Box::new(UartSection(Default::default()))
        ),
        Err(Error::DuplicateRegistration { .. })
    ));
    assert_eq!(
        vm.register_device(
            SectionInfo::new("a", 1, 1),
            Box::new(UartSection(Default::default()))
        )
        .unwrap(),
        2,
        "ids count from 1, as QEMU's loader needs"
    );
    let long = "x".repeat(128);
    assert!(matches!(
        vm.register_device(
            SectionInfo::new(long, 0, 1),
            Box::new(UartSection(Default::default()))
        ),
        Err(Error::IdTooLong { len: 128, .. })
    ));
    assert!(vm.unregister("a", 0));
    assert!(!vm.unregister("a", 0));
}
