//! `Raw<T>`: a kernel structure carried as its bytes, one `buffer` field.

use savevm::{FieldError, FieldReader, FieldWriter, VmField};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A plain-data structure (a KVM ioctl's argument) as one `buffer` field of its size.
#[derive(Clone, Copy, Default)]
pub struct Raw<T>(pub T);

impl<T> std::fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Raw<{}>({} bytes)",
            std::any::type_name::<T>(),
            std::mem::size_of::<T>()
        )
    }
}

impl<T: FromBytes + IntoBytes + Immutable> VmField for Raw<T> {
    fn save_field(&self, name: &str, w: &mut FieldWriter<'_>) {
        w.buffer(name, self.0.as_bytes());
    }

    fn load_field(&mut self, name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError> {
        r.buffer_into(name, self.0.as_mut_bytes())
    }
}
