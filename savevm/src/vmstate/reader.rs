//! `FieldReader`: a device's fields back from the stream, with the writer's limits.

use qemu_file::QemuFile;

use super::{MAX_ELEMENTS, MAX_FIELD_LEN, QEMU_VM_SUBSECTION};

/// An error reading (or writing) one field of a device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// The stream failed while reading the field.
    #[error("field {field:?}")]
    Stream {
        /// The field.
        field: String,
        /// The stream error.
        #[source]
        source: qemu_file::Error,
    },
    /// The field holds a value this side cannot accept (or, saving, cannot write).
    #[error("field {field:?}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl FieldError {
    /// A value of field `field` refused for `reason`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        FieldError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Reads a device's fields back, in the order they were written.
#[derive(Debug)]
pub struct FieldReader<'a> {
    f: &'a mut QemuFile,
    /// The longest array accepted here: [`MAX_ELEMENTS`], or less inside a field that
    /// says so.
    max_elements: usize,
}

impl<'a> FieldReader<'a> {
    pub(crate) fn new(f: &'a mut QemuFile) -> Self {
        FieldReader {
            f,
            max_elements: MAX_ELEMENTS,
        }
    }

    fn wrap<T>(name: &str, r: qemu_file::Result<T>) -> Result<T, FieldError> {
        r.map_err(|source| FieldError::Stream {
            field: name.to_string(),
            source,
        })
    }

    /// Runs `body` with arrays bounded to `n` elements, the bound the writer applied
    /// ([`FieldWriter::with_max_elements`](super::FieldWriter::with_max_elements)).
    pub fn with_max_elements<R>(&mut self, n: usize, body: impl FnOnce(&mut Self) -> R) -> R {
        let outer = self.max_elements;
        self.max_elements = n.min(outer);
        let r = body(self);
        self.max_elements = outer;
        r
    }

    /// Reads a `bool`; a byte other than 0 or 1 is refused.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn bool(&mut self, name: &str) -> Result<bool, FieldError> {
        match Self::wrap(name, self.f.get_u8())? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(FieldError::invalid(
                name,
                format!("a bool must be 0 or 1, the stream has {b:#04x}"),
            )),
        }
    }

    /// Reads a `uint8`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u8(&mut self, name: &str) -> Result<u8, FieldError> {
        Self::wrap(name, self.f.get_u8())
    }

    /// Reads a `uint16`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u16(&mut self, name: &str) -> Result<u16, FieldError> {
        Self::wrap(name, self.f.get_be16())
    }

    /// Reads a `uint32`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u32(&mut self, name: &str) -> Result<u32, FieldError> {
        Self::wrap(name, self.f.get_be32())
    }

    /// Reads a `uint64`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn u64(&mut self, name: &str) -> Result<u64, FieldError> {
        Self::wrap(name, self.f.get_be64())
    }

    /// Reads an `int8`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn i8(&mut self, name: &str) -> Result<i8, FieldError> {
        Self::wrap(name, self.f.get_u8()).map(|v| v as i8)
    }

    /// Reads an `int16`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn i16(&mut self, name: &str) -> Result<i16, FieldError> {
        Self::wrap(name, self.f.get_be16()).map(|v| v as i16)
    }

    /// Reads an `int32`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn i32(&mut self, name: &str) -> Result<i32, FieldError> {
        Self::wrap(name, self.f.get_be32()).map(|v| v as i32)
    }

    /// Reads an `int64`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn i64(&mut self, name: &str) -> Result<i64, FieldError> {
        Self::wrap(name, self.f.get_be64()).map(|v| v as i64)
    }

    /// Reads a `buffer` of exactly `dst.len()` bytes.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn buffer_into(&mut self, name: &str, dst: &mut [u8]) -> Result<(), FieldError> {
        Self::wrap(name, self.f.get_buffer(dst))
    }

    /// Reads a `buffer` of `len` bytes, `len` being at most [`MAX_FIELD_LEN`] (it may come
    /// from an earlier field, so it is checked first, and memory grows only as the bytes
    /// arrive).
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn buffer(&mut self, name: &str, len: usize) -> Result<Vec<u8>, FieldError> {
        Self::wrap(
            name,
            self.f
                .check_length(len as u64, MAX_FIELD_LEN as u64, "device field"),
        )?;
        let mut v = Vec::new();
        while v.len() < len {
            let at = v.len();
            v.resize(len.min(at + (1 << 16)), 0);
            self.buffer_into(name, &mut v[at..])?;
        }
        Ok(v)
    }

    /// Reads the element count of an array that follows (a `uint32` field `name`):
    /// more than [`MAX_ELEMENTS`] (or the bound of the field being read) is refused, as
    /// the writer refuses to write it.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn count(&mut self, name: &str) -> Result<usize, FieldError> {
        let n = self.u32(name)? as usize;
        if n > self.max_elements {
            return Err(FieldError::invalid(
                name,
                format!(
                    "{n} elements, more than the {} accepted{}",
                    self.max_elements,
                    if self.max_elements == MAX_ELEMENTS {
                        " (MAX_ELEMENTS)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(n)
    }

    /// The next subsection of the struct described as `parent`, its header consumed:
    /// its name and version. None when what follows is not one of `parent`'s (a name
    /// that does not start with `parent` and `/`, or no subsection), as QEMU's
    /// `vmstate_subsection_load` decides it, by peeking.
    ///
    /// # Errors
    /// [`FieldError`] naming the subsection when the stream fails.
    pub fn subsection(&mut self, parent: &str) -> Result<Option<(String, u32)>, FieldError> {
        let head = Self::wrap("subsection", self.f.peek(2))?;
        if head.len() < 2 || head[0] != QEMU_VM_SUBSECTION {
            return Ok(None);
        }
        let len = head[1] as usize;
        if len < parent.len() + 1 {
            return Ok(None);
        }
        let name = Self::wrap("subsection", self.f.peek(2 + len))?;
        if name.len() < 2 + len
            || !name[2..].starts_with(parent.as_bytes())
            || name[2 + parent.len()] != b'/'
        {
            return Ok(None);
        }
        let name = String::from_utf8_lossy(&name[2..]).into_owned();
        Self::wrap(&name, self.f.skip(2 + len as u64))?;
        let version = self.u32(&name)?;
        Ok(Some((name, version)))
    }
}

/// Refuses `version` of `name` outside `min..=max`, as QEMU's `vmstate_load_state`.
///
/// # Errors
/// [`FieldError::Invalid`] naming `name`.
pub fn check_version(name: &str, version: u32, min: u32, max: u32) -> Result<(), FieldError> {
    if version > max {
        return Err(FieldError::invalid(
            name,
            format!("version {version} is too new for this side's {max}"),
        ));
    }
    if version < min {
        return Err(FieldError::invalid(
            name,
            format!("version {version} is too old for this side's minimum {min}"),
        ));
    }
    Ok(())
}
