//! `VmState`: a struct that is a QEMU VMState description, fields and subsections
//! declared once (usually by `#[derive(VmState)]`) and written, read and described from
//! that one declaration.

use super::{FieldError, FieldReader, FieldWriter, check_version};

/// A struct described as QEMU describes device state (`VMStateDescription`): a name,
/// a version and the oldest version it loads, fields in order (each possibly present only
/// from some version on, or only when a predicate says), then subsections.
///
/// Derive it rather than write it:
///
/// ```
/// use savevm::VmState;
///
/// #[derive(VmState, Default)]
/// #[vmstate(name = "timer", version = 2, minimum_version = 1)]
/// struct Timer {
///     ticks: u64,
///     regs: [u32; 4],
///     fifo: Vec<u8>,
///     /// Written from version 2; a version-1 stream leaves it as it was.
///     #[vmstate(version = 2)]
///     armed: bool,
///     /// A subsection, written when `Some` (QEMU's `needed`), named `timer/alarm`.
///     #[vmstate(subsection)]
///     alarm: Option<Alarm>,
///     /// Not migrated.
///     #[vmstate(skip)]
///     cache: Vec<u64>,
/// }
///
/// #[derive(VmState, Default)]
/// #[vmstate(name = "alarm")]
/// struct Alarm {
///     deadline: u64,
/// }
/// ```
pub trait VmState {
    /// The description's name (QEMU's `vmsd->name`): the `vmsd_name` of the JSON
    /// description, and the prefix of this struct's subsection names.
    const NAME: &'static str;
    /// The version written, and the newest one loaded.
    const VERSION: u32;
    /// The oldest version loaded.
    const MINIMUM_VERSION: u32;
    /// Whether every value has the same layout (no subsections, no conditional fields,
    /// nothing variable-length): arrays of it are described once.
    const SAME_LAYOUT: bool;

    /// Writes the fields that exist at [`VmState::VERSION`], then the subsections needed.
    fn save_state(&self, w: &mut FieldWriter<'_>);

    /// Reads what a writer at `version` wrote (the caller checked the version range):
    /// the fields that exist at `version`, then the subsections present.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    fn load_state(&mut self, r: &mut FieldReader<'_>, version: u32) -> Result<(), FieldError>;
}

impl FieldWriter<'_> {
    /// Writes a device's whole state: its fields and subsections, the device described
    /// under `T`'s name and version.
    pub fn state<T: VmState + ?Sized>(&mut self, state: &T) {
        if self.at_top() {
            self.describe_as(T::NAME, T::VERSION);
        }
        state.save_state(self);
    }
}

impl FieldReader<'_> {
    /// Reads a device's whole state written at `version`, refused outside
    /// `T::MINIMUM_VERSION..=T::VERSION`.
    ///
    /// # Errors
    /// [`FieldError`] naming the field.
    pub fn state<T: VmState + ?Sized>(
        &mut self,
        state: &mut T,
        version: u32,
    ) -> Result<(), FieldError> {
        check_version(T::NAME, version, T::MINIMUM_VERSION, T::VERSION)?;
        state.load_state(self, version)
    }
}
