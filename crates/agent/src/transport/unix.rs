//! A unix-socket listener (`unix:PATH`), for development and tests. The
//! socket is created with mode 0600: only root (or the agent's user) may talk
//! to the agent through it.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::{Connection, Peer};

/// A bound unix socket. The socket file is removed when this is dropped.
#[derive(Debug)]
pub struct UnixTransport {
    listener: UnixListener,
    path: PathBuf,
}

impl UnixTransport {
    /// Bind `path`, replacing a stale socket left by an earlier run (but
    /// never any other kind of file). The socket is made under a temporary
    /// name and renamed into place once it listens, so a socket file at
    /// `path` always accepts connections.
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "unix: needs a file name")
        })?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let _ = std::fs::remove_file(&temp);
        let listener = UnixListener::bind(&temp)?;
        let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&temp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    async fn accept_one(&self) -> io::Result<Connection> {
        let (stream, _) = self.listener.accept().await?;
        let cred = stream.peer_cred().ok();
        Ok(Connection {
            peer: Peer::Unix {
                pid: cred.as_ref().and_then(|c| c.pid()),
                uid: cred.as_ref().map(|c| c.uid()),
            },
            stream: Box::new(stream),
            initial: Vec::new(),
        })
    }
}

impl Drop for UnixTransport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl super::Listener for UnixTransport {
    async fn accept(&self) -> io::Result<Connection> {
        self.accept_one().await
    }
}
