//! The proxy's Unix-domain socket (`proxy.unix_socket_dir`): the file
//! `<dir>/.s.PGSQL.<port>`, named as PostgreSQL and PgBouncer name theirs,
//! so `psql -h <dir> -p <port>` and libpq's defaults find it.
//!
//! A socket file outlives a process that was killed; one left behind is
//! removed at start, but only when nothing answers on it (a connect test),
//! so a second pgshift on the same directory and port refuses to start
//! instead of stealing the first one's clients. The file is removed when the
//! proxy stops accepting.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// PostgreSQL's default `unix_socket_permissions`: every local user may
/// connect; authentication is what decides.
const SOCKET_MODE: u32 = 0o777;

#[derive(Debug, Error)]
pub enum UnixSocketError {
    #[error(
        "proxy.unix_socket_dir: another process is listening on {}; stop it or choose another directory or port",
        .0.display()
    )]
    InUse(PathBuf),
    #[error(
        "proxy.unix_socket_dir: {} exists and is not a socket; remove it or choose another directory",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error("proxy.unix_socket_dir: cannot listen on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bound, listening Unix socket; its file is removed when this is dropped.
pub struct UnixSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// The file's (device, inode) as bound, to remove only our own file.
    file_id: (u64, u64),
}

impl UnixSocket {
    /// Binds `<dir>/.s.PGSQL.<port>` (see the module doc for a file left behind).
    pub fn bind(dir: &Path, port: u16) -> Result<UnixSocket, UnixSocketError> {
        let path = crate::config::unix_socket_path(dir, port);
        let io = |source| UnixSocketError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(UnixSocketError::NotASocket(path));
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => return Err(UnixSocketError::InUse(path)),
                // Nobody accepts on it: a crashed or killed process left it.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale socket file");
                    std::fs::remove_file(&path).map_err(io)?;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(io)?;
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        let socket = UnixSocket {
            listener,
            path: path.clone(),
            file_id: (meta.dev(), meta.ino()),
        };
        std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io)?;
        socket.listener.set_nonblocking(true).map_err(io)?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener, for the runtime the accept loop runs on.
    pub(crate) fn listener(&self) -> std::io::Result<tokio::net::UnixListener> {
        tokio::net::UnixListener::from_std(self.listener.try_clone()?)
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        // Only the file this socket was bound to: a file another process
        // bound after ours was removed by hand is not ours to delete.
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove the socket file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_in_use_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::config::unix_socket_path(dir.path(), 6543);
        // Left behind: removed, and the socket bound in its place.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let first = UnixSocket::bind(dir.path(), 6543).unwrap();
        assert_eq!(first.path(), path);
        // Someone listens: refused, the file kept.
        let e = UnixSocket::bind(dir.path(), 6543).err().unwrap();
        assert!(matches!(e, UnixSocketError::InUse(_)), "{e}");
        assert!(path.exists());
        drop(first);
        assert!(!path.exists(), "removed with the socket");
        // Not a socket: never deleted.
        std::fs::write(&path, "data").unwrap();
        let e = UnixSocket::bind(dir.path(), 6543).err().unwrap();
        assert!(matches!(e, UnixSocketError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        // A file put in place of ours after we bound is not ours to remove.
        std::fs::remove_file(&path).unwrap();
        let s = UnixSocket::bind(dir.path(), 6543).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        drop(s);
        assert!(path.exists());
    }
}
