//! Where host connections come from.
//!
//! - [`unix`]: a unix-socket listener, for development and tests.
//! - [`vsock`]: an AF_VSOCK listener; several hosts at once.
//! - [`virtio_serial`]: the guest side of a virtio-serial port; one host at a
//!   time, appearing and disappearing as the host side opens and closes it.
//! - `named_pipe` (Windows): a named-pipe listener (`pipe:NAME`), the
//!   Windows counterpart of the unix socket; several clients at once.
//! - `windows_port` (Windows): the virtio-serial port of virtio-win's vioser
//!   driver (`virtio-serial[:NAME_OR_PATH]`) and the COM-port fallback
//!   (`com:COMn`); one host at a time, like the Linux port.
//!
//! Every transport produces [`Connection`]s: a byte stream plus who is on the
//! other end. The rest of the agent never sees which transport it was.

#[cfg(target_os = "linux")]
pub(crate) mod fd_stream;
#[cfg(windows)]
pub mod named_pipe;
#[cfg(unix)]
pub mod unix;
#[cfg(target_os = "linux")]
pub mod virtio_serial;
#[cfg(target_os = "linux")]
pub mod vsock;
#[cfg(windows)]
pub mod windows_port;

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
    /// `pipe:NAME` or `pipe:\\.\pipe\NAME` (Windows): always held in the
    /// full `\\.\pipe\NAME` form.
    Pipe(String),
    /// `com:COMn` (Windows): a serial port, held as `COMn` in capitals.
    Com(String),
}

/// The prefix of local named pipes.
pub const PIPE_PREFIX: &str = r"\\.\pipe\";

/// A transport spec that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not one of the known forms.
    #[error(
        "unknown transport {0:?}: expected virtio-serial[:NAME_OR_PATH], vsock[:PORT], unix:PATH, pipe:NAME or com:COMn"
    )]
    Unknown(String),
    /// `pipe:` with an empty or malformed name.
    #[error(r"invalid pipe name {0:?}: expected pipe:NAME or pipe:\\.\pipe\NAME (NAME without backslashes)")]
    BadPipeName(String),
    /// `com:` with something that is not `COM1` to `COM255`.
    #[error("invalid serial port {0:?}: expected COM1 to COM255")]
    BadComPort(String),
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
            ("pipe", Some(r)) => parse_pipe_name(r).map(Self::Pipe),
            ("pipe", None) => Err(SpecError::BadPipeName(String::new())),
            ("com", Some(r)) => parse_com_port(r).map(Self::Com),
            ("com", None) => Err(SpecError::BadComPort(String::new())),
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
            Self::Pipe(p) => write!(f, "pipe:{p}"),
            Self::Com(p) => write!(f, "com:{p}"),
        }
    }
}

/// `NAME` or `\\.\pipe\NAME` to the full form. Pipe names may hold any
/// character but a backslash; the prefix is compared without regard to case,
/// as Windows does.
fn parse_pipe_name(r: &str) -> Result<String, SpecError> {
    let bad = || SpecError::BadPipeName(r.to_owned());
    let name = match r.get(..PIPE_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(PIPE_PREFIX) => &r[PIPE_PREFIX.len()..],
        _ => r,
    };
    // Windows limits the whole path to 256 characters.
    if name.is_empty() || name.contains('\\') || PIPE_PREFIX.len() + name.len() > 256 {
        return Err(bad());
    }
    Ok(format!("{PIPE_PREFIX}{name}"))
}

/// `COMn` (any case) with n from 1 to 255, to `COMn` in capitals.
fn parse_com_port(r: &str) -> Result<String, SpecError> {
    let bad = || SpecError::BadComPort(r.to_owned());
    let digits = match r.get(..3) {
        Some(p) if p.eq_ignore_ascii_case("COM") => &r[3..],
        _ => return Err(bad()),
    };
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match digits.parse::<u8>() {
        Ok(n) if n >= 1 => Ok(format!("COM{n}")),
        _ => Err(bad()),
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
    /// A named-pipe client (Windows), with its process id when the OS
    /// reports it.
    Pipe {
        /// Process id.
        pid: Option<u32>,
    },
    /// The host at the other end of a serial port (Windows `com:`).
    Com {
        /// The port, as in `COM2`.
        port: String,
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
            Self::Pipe { pid: Some(pid) } => write!(f, "named pipe client pid {pid}"),
            Self::Pipe { pid: None } => write!(f, "named pipe client"),
            Self::Com { port } => write!(f, "serial port {port}"),
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

/// A transport that serves one host at a time (virtio-serial, serial
/// ports): `accept` returns the next session once the previous one ended.
pub trait SessionSource: Send + 'static {
    /// Wait for the next host session.
    fn accept(&mut self) -> impl std::future::Future<Output = std::io::Result<Connection>> + Send;
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
            (
                "pipe:kvm-manager-agent",
                TransportSpec::Pipe(r"\\.\pipe\kvm-manager-agent".into()),
            ),
            (
                r"pipe:\\.\pipe\a b.c",
                TransportSpec::Pipe(r"\\.\pipe\a b.c".into()),
            ),
            (
                r"virtio-serial:\\.\Global\org.example.0",
                TransportSpec::VirtioSerial(r"\\.\Global\org.example.0".into()),
            ),
            ("com:COM2", TransportSpec::Com("COM2".into())),
            ("com:com255", TransportSpec::Com("COM255".into())),
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
            "pipe",
            "pipe:",
            r"pipe:\\.\pipe\",
            r"pipe:a\b",
            r"pipe:\\.\pipe\a\b",
            r"pipe:\\server\pipe\x",
            "com",
            "com:",
            "com:COM0",
            "com:COM256",
            "com:COM02",
            "com:COM",
            "com:COM1x",
            "com:LPT1",
            r"com:\\.\COM1",
        ] {
            assert!(bad.parse::<TransportSpec>().is_err(), "{bad:?}");
        }
        let long = format!("pipe:{}", "x".repeat(256 - PIPE_PREFIX.len()));
        assert!(long.parse::<TransportSpec>().is_ok());
        let too_long = format!("pipe:{}", "x".repeat(257 - PIPE_PREFIX.len()));
        assert!(too_long.parse::<TransportSpec>().is_err());
    }

    #[test]
    fn peers_describe_themselves() {
        assert_eq!(
            Peer::Pipe { pid: Some(42) }.to_string(),
            "named pipe client pid 42"
        );
        assert_eq!(Peer::Pipe { pid: None }.to_string(), "named pipe client");
        assert_eq!(
            Peer::Com {
                port: "COM2".into()
            }
            .to_string(),
            "serial port COM2"
        );
    }
}
