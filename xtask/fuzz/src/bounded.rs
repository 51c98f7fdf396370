//! What every target asks of an error a hostile input causes: it names what was wrong,
//! it does not repeat the input.

/// Longest error message a hostile input may produce.
pub const MAX_ERROR_LEN: usize = 1024;

/// Fails the input if `e`'s message, causes included, is longer than [`MAX_ERROR_LEN`].
pub(crate) fn check_error(e: &(dyn std::error::Error + 'static)) {
    let msg = savevm::error_chain(e);
    assert!(
        msg.len() <= MAX_ERROR_LEN,
        "an error of {} bytes: {msg:.2000}",
        msg.len()
    );
}
