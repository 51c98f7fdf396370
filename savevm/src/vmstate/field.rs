//! `VmField`: a Rust value that is one described field (or array of fields) in the
//! stream: scalars, arrays, `Vec`s with their length field, and (by the derive) structs.

use super::{FieldError, FieldReader, FieldWriter};

/// A value written as one vmstate field, by name.
///
/// Implemented for `bool`, the integers, fixed arrays and `Vec`s of them, and, by
/// `#[derive(VmState)]`, for structs (a `struct` field). A VMM implements it for a type of
/// its own to choose how it looks in the stream (say, a kernel structure as a `buffer`).
pub trait VmField {
    /// Whether every value has the same layout in the stream and description (no
    /// length of its own, no subsection or conditional field): arrays of it are then
    /// described once, as QEMU compresses them.
    const SAME_LAYOUT: bool = true;

    /// Writes the value as field `name`.
    fn save_field(&self, name: &str, w: &mut FieldWriter<'_>);

    /// Reads field `name` into the value.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    fn load_field(&mut self, name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError>;

    /// Writes `items` as array field `name` (QEMU's `VMS_ARRAY`). Bytes override this to
    /// write one `buffer`.
    fn save_array(items: &[Self], name: &str, w: &mut FieldWriter<'_>)
    where
        Self: Sized,
    {
        w.array(name, items.len(), Self::SAME_LAYOUT, |w, i| {
            items[i].save_field(name, w);
        });
    }

    /// Reads array field `name` into `items`, what [`VmField::save_array`] wrote.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    fn load_array(items: &mut [Self], name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError>
    where
        Self: Sized,
    {
        items.iter_mut().try_for_each(|v| v.load_field(name, r))
    }
}

macro_rules! scalar {
    ($($t:ty => $m:ident),* $(,)?) => {$(
        impl VmField for $t {
            fn save_field(&self, name: &str, w: &mut FieldWriter<'_>) {
                w.$m(name, *self);
            }
            fn load_field(&mut self, name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError> {
                *self = r.$m(name)?;
                Ok(())
            }
        }
    )*};
}

scalar!(bool => bool, u16 => u16, u32 => u32, u64 => u64, i8 => i8, i16 => i16, i32 => i32, i64 => i64);

/// Bytes: one `uint8`, and arrays of them one `buffer` (QEMU's `VMSTATE_BUFFER`).
impl VmField for u8 {
    fn save_field(&self, name: &str, w: &mut FieldWriter<'_>) {
        w.u8(name, *self);
    }
    fn load_field(&mut self, name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError> {
        *self = r.u8(name)?;
        Ok(())
    }
    fn save_array(items: &[u8], name: &str, w: &mut FieldWriter<'_>) {
        w.buffer(name, items);
    }
    fn load_array(items: &mut [u8], name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError> {
        r.buffer_into(name, items)
    }
}

/// A fixed array: its elements, no length in the stream.
impl<T: VmField, const N: usize> VmField for [T; N] {
    const SAME_LAYOUT: bool = T::SAME_LAYOUT;

    fn save_field(&self, name: &str, w: &mut FieldWriter<'_>) {
        T::save_array(self, name, w);
    }
    fn load_field(&mut self, name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError> {
        T::load_array(self, name, r)
    }
}

/// Elements a `Vec` grows by while loading, so a hostile length costs only what arrives.
const LOAD_CHUNK: usize = 1 << 16;

/// A `Vec`: a `uint32` field `<name>_len`, then the elements as an array (QEMU's
/// `VMSTATE_VARRAY_UINT32` with its length field). At most
/// [`MAX_ELEMENTS`](super::MAX_ELEMENTS) elements, or a field's own bound
/// (`#[vmstate(max_len = N)]`), on both sides.
impl<T: VmField + Default> VmField for Vec<T> {
    const SAME_LAYOUT: bool = false;

    fn save_field(&self, name: &str, w: &mut FieldWriter<'_>) {
        let len_name = format!("{name}_len");
        match u32::try_from(self.len()) {
            Ok(n) if self.len() <= w.max_elements() => {
                w.u32(&len_name, n);
                T::save_array(self, name, w);
            }
            _ => {
                let max = w.max_elements();
                w.refuse(
                    name,
                    format!(
                        "{} elements, more than the {max} a reader takes{}: saved, it could \
                         not be loaded",
                        self.len(),
                        if max == super::MAX_ELEMENTS {
                            " (MAX_ELEMENTS)"
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
    }

    fn load_field(&mut self, name: &str, r: &mut FieldReader<'_>) -> Result<(), FieldError> {
        let n = r.count(&format!("{name}_len"))?;
        self.clear();
        while self.len() < n {
            let at = self.len();
            self.resize_with(n.min(at + LOAD_CHUNK), T::default);
            T::load_array(&mut self[at..], name, r)?;
        }
        Ok(())
    }
}
