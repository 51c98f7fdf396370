//! A unix socket only its owner can connect to, from the first moment it exists.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a listening unix socket at `path` with mode 0600. The socket is bound under a
/// hidden name beside `path`, restricted, then renamed into place, so no other user can
/// connect in the moment between `bind` (whose mode follows the umask) and `chmod`.
///
/// # Errors
/// A `path` without a file name, or the bind, chmod or rename failing (the hidden
/// socket is then removed).
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no socket file", path.display()),
        )
    })?;
    let hidden = path.with_file_name(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&hidden);
    let listener = UnixListener::bind(&hidden)?;
    let placed = fs::set_permissions(&hidden, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&hidden, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&hidden);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn the_socket_appears_with_mode_0600_and_accepts() {
        let dir = std::env::temp_dir().join(format!("private-socket-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = bind_private(&path).unwrap();
        let m = fs::metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        // Nothing is left behind but the socket.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_without_a_name_is_refused() {
        assert!(bind_private(Path::new("/")).is_err());
    }
}
