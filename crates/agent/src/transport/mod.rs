//! Where host connections come from.
//!
//! - [`unix`]: a unix-socket listener, for development and tests.
//! - [`vsock`]: an AF_VSOCK listener; several hosts at once.
//! - [`virtio_serial`]: the guest side of a virtio-serial port; one host at a
//!   time, appearing and disappearing as the host side opens and closes it.
//!
//! Every transport produces [`Connection`]s: a byte stream plus who is on the
//! other end. The rest of the agent never sees which transport it was.

#[cfg(target_os = "linux")]
pub(crate) mod fd_stream;
#[cfg(unix)]
pub mod unix;
#[cfg(target_os = "linux")]
pub mod virtio_serial;
#[cfg(target_os = "linux")]
pub mod vsock;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};

/// Name of the agent's virtio-serial port.
pub const VIRTIO_PORT_NAME: &str = "org.kvmmanager.agent.0";

/// Default AF_VSOCK port the agent listens on.
pub const DEFAULT_VSOCK_PORT: u32 = 7789;

/// A transport as written in the config file or on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportSpec {
    /// `virtio-serial[:NAME_OR_PATH]`: a port name, or an absolute device path.
    VirtioSerial(String),
    /// `vsock[:PORT]`.
    Vsock(u32),
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// A transport spec that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not one of the known forms.
    #[error(
        "unknown transport {0:?}: expected virtio-serial[:NAME_OR_PATH], vsock[:PORT] or unix:PATH"
    )]
    Unknown(String),
    /// `vsock:` with something that is not a port number.
    #[error("invalid vsock port {0:?}: expected a number between 1 and 4294967294")]
    BadPort(String),
    /// `unix:` without a path.
    #[error("unix: needs a path, as in unix:/run/kvm-manager-agent.sock")]
    MissingPath,
}

impl FromStr for TransportSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (s, None),
        };
        match (kind, rest) {
            ("virtio-serial", None) => Ok(Self::VirtioSerial(VIRTIO_PORT_NAME.to_owned())),
            ("virtio-serial", Some(r)) if !r.is_empty() => Ok(Self::VirtioSerial(r.to_owned())),
            ("vsock", None) => Ok(Self::Vsock(DEFAULT_VSOCK_PORT)),
            ("vsock", Some(r)) => match r.parse::<u32>() {
                Ok(p) if p != 0 && p != u32::MAX => Ok(Self::Vsock(p)),
                _ => Err(SpecError::BadPort(r.to_owned())),
            },
            ("unix", Some(r)) if !r.is_empty() => Ok(Self::Unix(PathBuf::from(r))),
            ("unix", _) => Err(SpecError::MissingPath),
            _ => Err(SpecError::Unknown(s.to_owned())),
        }
    }
}

impl fmt::Display for TransportSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VirtioSerial(n) => write!(f, "virtio-serial:{n}"),
            Self::Vsock(p) => write!(f, "vsock:{p}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Who is on the other end of a connection (for logs and the audit trail).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The host side of a virtio-serial port.
    VirtioSerial {
        /// The device path.
        port: PathBuf,
    },
    /// An AF_VSOCK peer.
    Vsock {
        /// The peer's context id (2 is the host).
        cid: u32,
        /// The peer's port.
        port: u32,
    },
    /// A unix-socket peer, with its credentials when the OS reports them.
    Unix {
        /// Process id.
        pid: Option<i32>,
        /// User id.
        uid: Option<u32>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VirtioSerial { port } => write!(f, "virtio-serial {}", port.display()),
            Self::Vsock { cid, port } => write!(f, "vsock cid {cid} port {port}"),
            Self::Unix { pid, uid } => {
                write!(f, "unix")?;
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, " uid {uid}")?;
                }
                Ok(())
            }
        }
    }
}

/// A byte stream to one host.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A transport that accepts any number of hosts (unix, vsock).
pub trait Listener: Send + Sync + 'static {
    /// Wait for the next host.
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Connection>> + Send;
}

/// One host connection, as a transport hands it over.
pub struct Connection {
    /// The byte stream.
    pub stream: Box<dyn Stream>,
    /// Bytes already read from the stream while detecting the host.
    pub initial: Vec<u8>,
    /// Who is on the other end.
    pub peer: Peer,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("initial", &self.initial.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for (text, spec) in [
            (
                "virtio-serial",
                TransportSpec::VirtioSerial(VIRTIO_PORT_NAME.into()),
            ),
            (
                "virtio-serial:/dev/vport1p1",
                TransportSpec::VirtioSerial("/dev/vport1p1".into()),
            ),
            ("vsock", TransportSpec::Vsock(DEFAULT_VSOCK_PORT)),
            ("vsock:1234", TransportSpec::Vsock(1234)),
            (
                "unix:/run/a.sock",
                TransportSpec::Unix("/run/a.sock".into()),
            ),
        ] {
            assert_eq!(text.parse::<TransportSpec>().unwrap(), spec);
            assert_eq!(spec.to_string().parse::<TransportSpec>().unwrap(), spec);
        }
        for bad in [
            "",
            "tcp:1",
            "vsock:",
            "vsock:x",
            "vsock:0",
            "vsock:4294967295",
            "unix:",
            "unix",
            "virtio-serial:",
        ] {
            assert!(bad.parse::<TransportSpec>().is_err(), "{bad:?}");
        }
    }
}
