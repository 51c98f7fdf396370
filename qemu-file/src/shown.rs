//! Names that come from a stream, as error messages show them: quoted and escaped like
//! `{:?}`, and cut short, so a hostile stream cannot fill a log with its bytes.

/// Characters of a name an error message shows before cutting it short.
pub const SHOWN_CHARS: usize = 32;

/// `s` quoted and escaped, at most [`SHOWN_CHARS`] characters of it, with its length when
/// it was cut.
///
/// ```
/// assert_eq!(qemu_file::shown("pc.ram"), "\"pc.ram\"");
/// let long = qemu_file::shown(&"\u{16}".repeat(255));
/// assert!(long.len() < 400 && long.ends_with("(255 bytes)"));
/// ```
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}
