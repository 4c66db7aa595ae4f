//! A named-pipe listener (`pipe:NAME`, Windows): the Windows counterpart of
//! the unix socket, for the service's local clients and for tests.
//!
//! - One pipe instance always waits for the next client: as soon as one
//!   connects, the next instance is created, so several clients are served
//!   at once (up to `limits.max_connections`, like every listener).
//! - The first instance is created with `FILE_FLAG_FIRST_PIPE_INSTANCE`: if
//!   another process (a second agent, or a squatter that got there first)
//!   already owns the name, binding fails instead of sharing it.
//! - Remote clients (`\\SERVER\pipe\NAME` over SMB) are rejected
//!   (`PIPE_REJECT_REMOTE_CLIENTS`).
//! - Every instance carries a security descriptor whose DACL grants access
//!   to SYSTEM and the Administrators group only ([`PIPE_SDDL`]), the
//!   Windows form of the unix socket's mode 0600.
//!
//! The peer of a connection is described by the client's process id
//! (`GetNamedPipeClientProcessId`) for the audit trail.

use std::ffi::c_void;
use std::io;
use std::os::windows::io::AsRawHandle;

use tokio::net::windows::named_pipe::{NamedPipeServer, PipeMode, ServerOptions};
use tokio::sync::Mutex;
use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::SECURITY_ATTRIBUTES;
use windows_sys::Win32::System::Pipes::GetNamedPipeClientProcessId;

use super::{Connection, Peer};

/// The pipe's security descriptor: a protected DACL (no inherited entries)
/// that grants full access to LocalSystem (`SY`) and the built-in
/// Administrators (`BA`), and nothing to anyone else.
pub const PIPE_SDDL: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)";

/// A listening named pipe.
#[derive(Debug)]
pub struct PipeTransport {
    name: String,
    sd: SecurityDescriptor,
    /// The instance waiting for the next client.
    waiting: Mutex<NamedPipeServer>,
}

impl PipeTransport {
    /// Create the first instance of `name` (`\\.\pipe\NAME`). Fails if the
    /// name is already in use by anyone.
    pub fn bind(name: &str) -> io::Result<Self> {
        let sd = SecurityDescriptor::from_sddl(PIPE_SDDL)?;
        let first = sd.create(name, true)?;
        Ok(Self {
            name: name.to_owned(),
            sd,
            waiting: Mutex::new(first),
        })
    }

    async fn accept_one(&self) -> io::Result<Connection> {
        let mut waiting = self.waiting.lock().await;
        waiting.connect().await?;
        // The next client gets a fresh instance; this one is the connection.
        let next = self.sd.create(&self.name, false)?;
        let connected = std::mem::replace(&mut *waiting, next);
        drop(waiting);
        Ok(Connection {
            peer: Peer::Pipe {
                pid: client_pid(&connected),
            },
            stream: Box::new(connected),
            initial: Vec::new(),
        })
    }
}

impl super::Listener for PipeTransport {
    async fn accept(&self) -> io::Result<Connection> {
        self.accept_one().await
    }
}

fn client_pid(pipe: &NamedPipeServer) -> Option<u32> {
    let mut pid = 0u32;
    // SAFETY: a valid pipe handle owned by `pipe`, and a valid out pointer.
    let ok = unsafe { GetNamedPipeClientProcessId(pipe.as_raw_handle(), &mut pid) };
    (ok != 0 && pid != 0).then_some(pid)
}

/// A self-relative security descriptor allocated by
/// `ConvertStringSecurityDescriptorToSecurityDescriptorW`, freed on drop.
#[derive(Debug)]
struct SecurityDescriptor(*mut c_void);

// SAFETY: the descriptor is never written after creation; Windows only reads
// it (while creating pipe instances), from any thread.
unsafe impl Send for SecurityDescriptor {}
// SAFETY: as above: shared read-only access.
unsafe impl Sync for SecurityDescriptor {}

impl SecurityDescriptor {
    fn from_sddl(sddl: &str) -> io::Result<Self> {
        let wide: Vec<u16> = sddl.encode_utf16().chain(Some(0)).collect();
        let mut sd: *mut c_void = std::ptr::null_mut();
        // SAFETY: a NUL-terminated UTF-16 string and a valid out pointer;
        // the size out pointer may be null.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                wide.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 || sd.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(sd))
    }

    /// A new instance of the pipe `name` with this descriptor.
    fn create(&self, name: &str, first: bool) -> io::Result<NamedPipeServer> {
        let mut attrs = SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: self.0,
            bInheritHandle: 0,
        };
        let mut options = ServerOptions::new();
        options
            .first_pipe_instance(first)
            .reject_remote_clients(true)
            .pipe_mode(PipeMode::Byte);
        // SAFETY: `attrs` is a valid SECURITY_ATTRIBUTES whose descriptor
        // lives as long as `self`; Windows copies it into the new instance.
        unsafe {
            options.create_with_security_attributes_raw(name, (&raw mut attrs).cast::<c_void>())
        }
    }
}

impl Drop for SecurityDescriptor {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW
        // with LocalAlloc, freed once.
        unsafe { LocalFree(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::windows::named_pipe::ClientOptions;

    use crate::transport::Listener;

    fn unique(tag: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!(r"\\.\pipe\kva-unit-{tag}-{}-{n}", std::process::id())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_sddl_parses() {
        SecurityDescriptor::from_sddl(PIPE_SDDL).unwrap();
        assert!(SecurityDescriptor::from_sddl("not SDDL").is_err());
    }

    #[test]
    fn serves_several_clients_at_once_and_names_them() {
        runtime().block_on(async {
            let name = unique("several");
            let t = PipeTransport::bind(&name).unwrap();
            let mut first = ClientOptions::new().open(&name).unwrap();
            let a = t.accept().await.unwrap();
            // A second client while the first is still connected.
            let mut second = ClientOptions::new().open(&name).unwrap();
            let b = t.accept().await.unwrap();
            let me = std::process::id();
            assert_eq!(a.peer, Peer::Pipe { pid: Some(me) });
            assert_eq!(b.peer.to_string(), format!("named pipe client pid {me}"));
            let (mut a, mut b) = (a.stream, b.stream);
            first.write_all(b"one").await.unwrap();
            second.write_all(b"two").await.unwrap();
            let mut buf = [0u8; 3];
            b.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"two");
            a.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"one");
            a.write_all(b"back").await.unwrap();
            let mut back = [0u8; 4];
            first.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"back");
        });
    }
}
