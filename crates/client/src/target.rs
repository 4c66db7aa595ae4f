//! Where the agent is: [`Target`], parsed from strings such as
//! `unix:/run/vm1/agent.sock`, `vsock:3:1024`, `hvsock:/run/vm1/v.sock:1024`
//! or (inside a Windows guest) `pipe:kvm-manager-agent`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The prefix of local named pipes.
const PIPE_PREFIX: &str = r"\\.\pipe\";

/// How to reach an agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `unix:PATH`: a unix stream socket. Either the socket QEMU exposes for
    /// the virtio-serial chardev of the guest (`-chardev socket,path=PATH,server=on`),
    /// or the agent's own `unix:` listener.
    Unix(PathBuf),
    /// `vsock:CID:PORT`: AF_VSOCK, straight to the guest (Linux hosts only).
    Vsock {
        /// The guest's context id (3 or more for guests).
        cid: u32,
        /// The port the agent listens on.
        port: u32,
    },
    /// `hvsock:PATH:PORT`: the hybrid vsock of Firecracker, Cloud Hypervisor
    /// and vhost-device-vsock. The client connects to the unix socket `PATH`,
    /// sends `CONNECT <PORT>\n` and expects one line `OK <assigned port>\n`;
    /// after that the stream is the guest's vsock connection.
    HybridVsock {
        /// The VMM's unix socket.
        path: PathBuf,
        /// The guest port the agent listens on.
        port: u32,
    },
    /// `pipe:NAME` or `pipe:\\.\pipe\NAME`: the agent's named-pipe
    /// listener, from inside a Windows guest (Windows only). Held in the
    /// full `\\.\pipe\NAME` form.
    Pipe(String),
}

/// Why a target string is not a [`Target`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetParseError {
    /// No `SCHEME:` prefix, or an unknown scheme.
    #[error(
        "unknown target scheme in {0:?}: expected unix:PATH, vsock:CID:PORT, hvsock:PATH:PORT or pipe:NAME"
    )]
    UnknownScheme(String),
    /// A path that is empty.
    #[error("empty socket path in {0:?}")]
    EmptyPath(String),
    /// `vsock:` or `hvsock:` without the expected `:`-separated fields.
    #[error("malformed target {spec:?}: expected {expected}")]
    Malformed {
        /// The whole target string.
        spec: String,
        /// The expected form.
        expected: &'static str,
    },
    /// A CID or port that is not a 32-bit unsigned integer.
    #[error("invalid {field} {value:?} in {spec:?}: expected an integer 0..=4294967295")]
    InvalidNumber {
        /// The whole target string.
        spec: String,
        /// `cid` or `port`.
        field: &'static str,
        /// The offending text.
        value: String,
    },
}

fn number(spec: &str, field: &'static str, value: &str) -> Result<u32, TargetParseError> {
    // u32::from_str accepts a leading '+'; a target is stricter.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetParseError::InvalidNumber {
            spec: spec.to_owned(),
            field,
            value: value.to_owned(),
        });
    }
    value.parse().map_err(|_| TargetParseError::InvalidNumber {
        spec: spec.to_owned(),
        field,
        value: value.to_owned(),
    })
}

impl FromStr for Target {
    type Err = TargetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| TargetParseError::UnknownScheme(s.to_owned()))?;
        match scheme {
            "unix" => {
                if rest.is_empty() {
                    return Err(TargetParseError::EmptyPath(s.to_owned()));
                }
                Ok(Target::Unix(PathBuf::from(rest)))
            }
            "vsock" => {
                let (cid, port) =
                    rest.split_once(':')
                        .ok_or_else(|| TargetParseError::Malformed {
                            spec: s.to_owned(),
                            expected: "vsock:CID:PORT",
                        })?;
                Ok(Target::Vsock {
                    cid: number(s, "cid", cid)?,
                    port: number(s, "port", port)?,
                })
            }
            "hvsock" => {
                // The path may itself contain ':'; the port is after the last one.
                let (path, port) =
                    rest.rsplit_once(':')
                        .ok_or_else(|| TargetParseError::Malformed {
                            spec: s.to_owned(),
                            expected: "hvsock:PATH:PORT",
                        })?;
                if path.is_empty() {
                    return Err(TargetParseError::EmptyPath(s.to_owned()));
                }
                Ok(Target::HybridVsock {
                    path: PathBuf::from(path),
                    port: number(s, "port", port)?,
                })
            }
            "pipe" => {
                let name = rest.strip_prefix(PIPE_PREFIX).unwrap_or(rest);
                if name.is_empty() {
                    return Err(TargetParseError::EmptyPath(s.to_owned()));
                }
                if name.contains('\\') {
                    return Err(TargetParseError::Malformed {
                        spec: s.to_owned(),
                        expected: r"pipe:NAME or pipe:\\.\pipe\NAME, NAME without backslashes",
                    });
                }
                Ok(Target::Pipe(format!("{PIPE_PREFIX}{name}")))
            }
            _ => Err(TargetParseError::UnknownScheme(s.to_owned())),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Target::HybridVsock { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
            Target::Pipe(name) => write!(f, "pipe:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            "unix:/run/vm1/agent.sock".parse::<Target>().unwrap(),
            Target::Unix("/run/vm1/agent.sock".into())
        );
        assert_eq!(
            "unix:relative/sock".parse::<Target>().unwrap(),
            Target::Unix("relative/sock".into())
        );
        assert_eq!(
            "vsock:3:1024".parse::<Target>().unwrap(),
            Target::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            "vsock:4294967295:0".parse::<Target>().unwrap(),
            Target::Vsock {
                cid: u32::MAX,
                port: 0
            }
        );
        assert_eq!(
            "hvsock:/run/fc/v.sock:52".parse::<Target>().unwrap(),
            Target::HybridVsock {
                path: "/run/fc/v.sock".into(),
                port: 52
            }
        );
        assert_eq!(
            "hvsock:/odd:path/v.sock:52".parse::<Target>().unwrap(),
            Target::HybridVsock {
                path: "/odd:path/v.sock".into(),
                port: 52
            }
        );
        assert_eq!(
            "pipe:kvm-manager-agent".parse::<Target>().unwrap(),
            Target::Pipe(r"\\.\pipe\kvm-manager-agent".into())
        );
        assert_eq!(
            r"pipe:\\.\pipe\a:b".parse::<Target>().unwrap(),
            Target::Pipe(r"\\.\pipe\a:b".into())
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "unix:/run/vm1/agent.sock",
            "vsock:3:1024",
            "hvsock:/run/fc/v.sock:52",
            r"pipe:\\.\pipe\kvm-manager-agent",
        ] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_targets() {
        use TargetParseError as E;
        let err = |s: &str| s.parse::<Target>().unwrap_err();
        assert!(matches!(err("/run/agent.sock"), E::UnknownScheme(_)));
        assert!(matches!(err("tcp:127.0.0.1:5"), E::UnknownScheme(_)));
        assert!(matches!(err("UNIX:/x"), E::UnknownScheme(_)));
        assert!(matches!(err(""), E::UnknownScheme(_)));
        assert!(matches!(err("unix:"), E::EmptyPath(_)));
        assert!(matches!(err("hvsock::5"), E::EmptyPath(_)));
        assert!(matches!(err("pipe:"), E::EmptyPath(_)));
        assert!(matches!(err(r"pipe:\\.\pipe\"), E::EmptyPath(_)));
        assert!(matches!(err(r"pipe:a\b"), E::Malformed { .. }));
        assert!(matches!(err(r"pipe:\\host\pipe\x"), E::Malformed { .. }));
        assert!(matches!(err("vsock:3"), E::Malformed { .. }));
        assert!(matches!(err("hvsock:/x"), E::Malformed { .. }));
        assert!(matches!(
            err("vsock:x:1"),
            E::InvalidNumber { field: "cid", .. }
        ));
        assert!(matches!(
            err("vsock:3:"),
            E::InvalidNumber { field: "port", .. }
        ));
        assert!(matches!(
            err("vsock:3:+5"),
            E::InvalidNumber { field: "port", .. }
        ));
        assert!(matches!(
            err("vsock:3:4294967296"),
            E::InvalidNumber { field: "port", .. }
        ));
        assert!(matches!(
            err("vsock:3:4:5"),
            E::InvalidNumber { field: "port", .. }
        ));
        assert!(matches!(
            err("hvsock:/x:-1"),
            E::InvalidNumber { field: "port", .. }
        ));
    }
}
