//! The framing of QEMU's migration stream (QEMU `migration/savevm.c`), byte for byte.
//!
//! ```text
//! be32 magic "QEVM" | be32 version 3
//! u8 0x07 | be32 len | machine type name                       configuration
//! u8 0x01 START / 0x04 FULL | be32 section_id | u8 idlen | idstr | be32 instance_id | be32 version_id
//!     ... payload ... | u8 0x7e | be32 section_id                 footer
//! u8 0x02 PART / 0x03 END | be32 section_id | payload | u8 0x7e | be32 section_id
//! u8 0x00                                                       EOF
//! u8 0x06 | be32 json_len | json                                VM description trailer
//! ```

use qemu_file::QemuFile;

use crate::{Error, Result};

/// "QEVM": the first four bytes of every stream.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU has written since 2.x.
pub const QEMU_VM_FILE_VERSION: u32 = 0x0000_0003;
/// End of the sections.
pub const QEMU_VM_EOF: u8 = 0x00;
/// First part of a live section (its setup), with the full header.
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// One iteration of a live section, with the short header.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// The completion of a live section, with the short header.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// A whole non-live (device) section, with the full header.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// A subsection inside a device section.
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// The JSON VM description after EOF.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// The configuration section (machine type).
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// A command: `be16 command | be16 length | data` (QEMU's `qemu_savevm_command_send`).
/// This implementation sends and takes [`MIG_CMD_OPEN_RETURN_PATH`] and [`MIG_CMD_PING`].
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// Command: the destination opens the return path (no data).
pub const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
/// Command: the destination answers with a PONG carrying the same be32 on the return path.
pub const MIG_CMD_PING: u16 = 2;
/// Writes a QEMU_VM_COMMAND record.
pub fn write_command(f: &mut QemuFile, command: u16, data: &[u8]) {
    f.put_u8(QEMU_VM_COMMAND);
    f.put_be16(command);
    f.put_be16(data.len() as u16);
    f.put_buffer(data);
}

/// The footer after every section's payload.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// Longest idstr accepted: QEMU's analyzer reads the length byte as signed.
pub const MAX_IDSTR_LEN: usize = 127;
/// Longest machine type name accepted from a stream.
pub const MAX_MACHINE_NAME_LEN: u32 = 256;
/// Largest JSON VM description accepted from a stream.
pub const MAX_DESCRIPTION_LEN: u32 = 16 << 20;

/// The kind of a section record, as its leading byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionType {
    /// [`QEMU_VM_EOF`]
    Eof,
    /// [`QEMU_VM_SECTION_START`]
    Start,
    /// [`QEMU_VM_SECTION_PART`]
    Part,
    /// [`QEMU_VM_SECTION_END`]
    End,
    /// [`QEMU_VM_SECTION_FULL`]
    Full,
    /// [`QEMU_VM_CONFIGURATION`]
    Configuration,
    /// [`QEMU_VM_COMMAND`]
    Command,
}

impl TryFrom<u8> for SectionType {
    type Error = u8;
    fn try_from(b: u8) -> std::result::Result<Self, u8> {
        Ok(match b {
            QEMU_VM_EOF => SectionType::Eof,
            QEMU_VM_SECTION_START => SectionType::Start,
            QEMU_VM_SECTION_PART => SectionType::Part,
            QEMU_VM_SECTION_END => SectionType::End,
            QEMU_VM_SECTION_FULL => SectionType::Full,
            QEMU_VM_CONFIGURATION => SectionType::Configuration,
            QEMU_VM_COMMAND => SectionType::Command,
            other => return Err(other),
        })
    }
}

impl SectionType {
    /// The byte that starts this record.
    pub fn byte(self) -> u8 {
        match self {
            SectionType::Eof => QEMU_VM_EOF,
            SectionType::Start => QEMU_VM_SECTION_START,
            SectionType::Part => QEMU_VM_SECTION_PART,
            SectionType::End => QEMU_VM_SECTION_END,
            SectionType::Full => QEMU_VM_SECTION_FULL,
            SectionType::Configuration => QEMU_VM_CONFIGURATION,
            SectionType::Command => QEMU_VM_COMMAND,
        }
    }

    /// QEMU's name of the record, for dumps and errors.
    pub fn name(self) -> &'static str {
        match self {
            SectionType::Eof => "EOF",
            SectionType::Start => "START",
            SectionType::Part => "PART",
            SectionType::End => "END",
            SectionType::Full => "FULL",
            SectionType::Configuration => "CONFIGURATION",
            SectionType::Command => "COMMAND",
        }
    }
}

/// The stream header: `be32 magic | be32 version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader;

impl FileHeader {
    /// Writes magic and version.
    pub fn write_to(f: &mut QemuFile) {
        f.put_be32(QEMU_VM_FILE_MAGIC);
        f.put_be32(QEMU_VM_FILE_VERSION);
    }

    /// Reads and checks magic and version.
    ///
    /// # Errors
    /// [`Error::BadMagic`], [`Error::UnsupportedVersion`] or a stream error.
    pub fn read_from(f: &mut QemuFile) -> Result<()> {
        let magic = f.get_be32()?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let version = f.get_be32()?;
        if version != QEMU_VM_FILE_VERSION {
            return Err(Error::UnsupportedVersion { found: version });
        }
        Ok(())
    }
}

/// The configuration section: `u8 0x07 | be32 len | machine type name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    /// The machine type, which source and destination must share.
    pub machine: String,
}

impl Configuration {
    /// Writes the record, type byte included.
    pub fn write_to(&self, f: &mut QemuFile) {
        f.put_u8(QEMU_VM_CONFIGURATION);
        f.put_be32(self.machine.len() as u32);
        f.put_buffer(self.machine.as_bytes());
    }

    /// Reads the record after its type byte.
    ///
    /// # Errors
    /// A length above [`MAX_MACHINE_NAME_LEN`], a name that is not UTF-8, or a stream error.
    pub fn read_from(f: &mut QemuFile) -> Result<Self> {
        let len = f.get_be32()?;
        let offset = f.bytes_read();
        let bytes = f.get_bytes(
            len.into(),
            MAX_MACHINE_NAME_LEN as usize,
            "machine type name",
        )?;
        let machine = String::from_utf8(bytes).map_err(|_| {
            Error::Stream(qemu_file::Error::InvalidUtf8 {
                what: "machine type name",
                offset,
            })
        })?;
        Ok(Configuration { machine })
    }
}

/// The header of a START or FULL record (after its type byte):
/// `be32 section_id | u8 len | idstr | be32 instance_id | be32 version_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullHeader {
    /// The sender's number for the section, repeated by PART, END and the footer.
    pub section_id: u32,
    /// The section's name, e.g. `ram`.
    pub idstr: String,
    /// Which instance of that name (e.g. the vCPU index).
    pub instance_id: u32,
    /// The format version of the payload.
    pub version_id: u32,
}

impl FullHeader {
    /// Writes the header, type byte `ty` included.
    pub fn write_to(&self, ty: SectionType, f: &mut QemuFile) {
        f.put_u8(ty.byte());
        f.put_be32(self.section_id);
        f.put_counted_string(&self.idstr);
        f.put_be32(self.instance_id);
        f.put_be32(self.version_id);
    }

    /// Reads the header after its type byte.
    ///
    /// # Errors
    /// A stream error (truncation, idstr not UTF-8).
    pub fn read_from(f: &mut QemuFile) -> Result<Self> {
        let section_id = f.get_be32()?;
        let idstr = f.get_counted_string("section idstr")?;
        let instance_id = f.get_be32()?;
        let version_id = f.get_be32()?;
        Ok(FullHeader {
            section_id,
            idstr,
            instance_id,
            version_id,
        })
    }
}

/// The footer after a section's payload: `u8 0x7e | be32 section_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer;

impl Footer {
    /// Writes the footer of section `section_id`.
    pub fn write_to(section_id: u32, f: &mut QemuFile) {
        f.put_u8(QEMU_VM_SECTION_FOOTER);
        f.put_be32(section_id);
    }

    /// Reads a footer and checks that it closes section `section_id` (named `idstr`).
    ///
    /// # Errors
    /// [`Error::FooterMismatch`] when the section's payload did not end where its loader
    /// stopped, or a stream error.
    pub fn read_from(f: &mut QemuFile, section_id: u32, idstr: &str) -> Result<()> {
        let offset = f.bytes_read();
        let b = f.get_u8()?;
        let found = if b == QEMU_VM_SECTION_FOOTER {
            Some(f.get_be32()?)
        } else {
            None
        };
        if found != Some(section_id) {
            return Err(Error::FooterMismatch {
                idstr: idstr.to_string(),
                section_id,
                found_byte: b,
                found_id: found,
                offset,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_file::MemBuffer;

    fn bytes(f: impl FnOnce(&mut QemuFile)) -> Vec<u8> {
        let b = MemBuffer::new();
        let mut q = b.file();
        f(&mut q);
        q.flush().unwrap();
        b.contents()
    }

    fn reader(b: &[u8]) -> QemuFile {
        QemuFile::from_bytes(b.to_vec())
    }

    /// Every proper prefix of `full` must fail to parse with `parse`.
    fn every_prefix_fails<T: std::fmt::Debug>(
        full: &[u8],
        parse: impl Fn(&mut QemuFile) -> Result<T>,
    ) {
        for cut in 0..full.len() {
            let r = parse(&mut reader(&full[..cut]));
            assert!(
                matches!(
                    r,
                    Err(Error::Stream(qemu_file::Error::UnexpectedEof { .. }))
                ),
                "prefix of {cut} bytes gave {r:?}"
            );
        }
    }

    #[test]
    fn header_golden_bytes() {
        #[rustfmt::skip]
        let golden = [
            0x51, 0x45, 0x56, 0x4d, // magic "QEVM"
            0x00, 0x00, 0x00, 0x03, // version 3
        ];
        assert_eq!(bytes(FileHeader::write_to), golden);
        FileHeader::read_from(&mut reader(&golden)).unwrap();
        every_prefix_fails(&golden, FileHeader::read_from);
    }

    #[test]
    fn header_rejects_wrong_magic_and_version() {
        assert!(matches!(
            FileHeader::read_from(&mut reader(b"QEVX\0\0\0\x03")),
            Err(Error::BadMagic { found: 0x5145_5658 })
        ));
        assert!(matches!(
            FileHeader::read_from(&mut reader(b"QEVM\0\0\0\x02")),
            Err(Error::UnsupportedVersion { found: 2 })
        ));
    }

    #[test]
    fn configuration_golden_bytes() {
        #[rustfmt::skip]
        let golden = [
            0x07,                   // QEMU_VM_CONFIGURATION
            0x00, 0x00, 0x00, 0x02, // name length
            b'p', b'c',             // machine type
        ];
        let c = Configuration {
            machine: "pc".into(),
        };
        assert_eq!(bytes(|f| c.write_to(f)), golden);
        let mut r = reader(&golden);
        assert_eq!(r.get_u8().unwrap(), QEMU_VM_CONFIGURATION);
        assert_eq!(Configuration::read_from(&mut r).unwrap(), c);
        every_prefix_fails(&golden[1..], Configuration::read_from);
    }

    #[test]
    fn configuration_refuses_a_huge_name() {
        let r = Configuration::read_from(&mut reader(&[0xff, 0xff, 0xff, 0xff]));
        assert!(matches!(
            r,
            Err(Error::Stream(qemu_file::Error::LengthTooLarge {
                len: 0xffff_ffff,
                ..
            }))
        ));
    }

    #[test]
    fn start_header_golden_bytes() {
        #[rustfmt::skip]
        let golden = [
            0x01,                   // QEMU_VM_SECTION_START
            0x00, 0x00, 0x00, 0x02, // section_id 2
            0x03, b'r', b'a', b'm', // idstr "ram"
            0x00, 0x00, 0x00, 0x00, // instance_id 0
            0x00, 0x00, 0x00, 0x04, // version_id 4
        ];
        let h = FullHeader {
            section_id: 2,
            idstr: "ram".into(),
            instance_id: 0,
            version_id: 4,
        };
        assert_eq!(bytes(|f| h.write_to(SectionType::Start, f)), golden);
        let mut r = reader(&golden);
        assert_eq!(
            SectionType::try_from(r.get_u8().unwrap()),
            Ok(SectionType::Start)
        );
        assert_eq!(FullHeader::read_from(&mut r).unwrap(), h);
        every_prefix_fails(&golden[1..], FullHeader::read_from);
    }

    #[test]
    fn footer_golden_bytes_and_mismatch() {
        let golden = [0x7e, 0x00, 0x00, 0x00, 0x05];
        assert_eq!(bytes(|f| Footer::write_to(5, f)), golden);
        Footer::read_from(&mut reader(&golden), 5, "x").unwrap();
        every_prefix_fails(&golden, |f| Footer::read_from(f, 5, "x"));
        match Footer::read_from(&mut reader(&golden), 6, "serial") {
            Err(
                e @ Error::FooterMismatch {
                    found_id: Some(5), ..
                },
            ) => {
                assert!(e.to_string().contains("serial"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Footer::read_from(&mut reader(&[0x00, 0, 0, 0, 5]), 5, "x"),
            Err(Error::FooterMismatch {
                found_byte: 0,
                found_id: None,
                ..
            })
        ));
    }

    #[test]
    fn section_types_round_trip_and_unknown_bytes_are_rejected() {
        for b in 0..=255u8 {
            match SectionType::try_from(b) {
                Ok(t) => assert_eq!(t.byte(), b),
                Err(x) => assert_eq!(x, b),
            }
        }
        assert_eq!(SectionType::try_from(0x7e), Err(0x7e));
        assert_eq!(SectionType::try_from(0x05), Err(0x05));
    }
}
