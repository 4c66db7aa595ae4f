//! The agent's command line. Few options, parsed by hand to keep the static
//! binary small.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::transport::TransportSpec;

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `--config PATH`: the configuration file (default: the standard path,
    /// if it exists).
    pub config: Option<PathBuf>,
    /// `--check-config`: validate and exit.
    pub check_config: bool,
    /// `--transport SPEC`, repeatable: replaces the configured transports.
    pub transports: Vec<TransportSpec>,
    /// `--qga-transport SPEC`, repeatable: serve qemu-guest-agent's protocol
    /// there, replacing `[qga]` from the configuration.
    pub qga_transports: Vec<TransportSpec>,
    /// `--log-level LEVEL`: replaces the configured level.
    pub log_level: Option<String>,
    /// `--service`: run under the Windows Service Control Manager (the
    /// service installed by the MSI passes it; Windows only).
    pub service: bool,
    /// `--version`.
    pub version: bool,
    /// `--help`.
    pub help: bool,
}

/// A command line that cannot be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// An option this program does not have.
    #[error("unknown option {0:?} (see --help)")]
    Unknown(String),
    /// An option without its value.
    #[error("{0} needs a value (see --help)")]
    MissingValue(&'static str),
    /// A `--transport` value that does not parse.
    #[error("--transport {value}: {reason}")]
    BadTransport {
        /// The value given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// An argument that is not valid UTF-8.
    #[error("arguments must be valid UTF-8")]
    NotUtf8,
}

/// The `--help` text.
pub const HELP: &str = "\
kvm-manager-agent: guest agent for KVM virtual machines

Serves the kvm-manager-agent protocol (JSON-RPC 2.0 over length-prefixed
frames) to the host over virtio-serial, vsock or a unix socket: guest
information, metrics, users, power, exec under an allowlist and file
transfer confined to allowed directories. See docs/protocol.md.

USAGE:
    kvm-manager-agent [OPTIONS]

OPTIONS:
    --config PATH       Configuration file
                        [default: /etc/kvm-manager-agent/config.toml, if present;
                        on Windows %ProgramData%\\KVM Manager Agent\\config.toml]
    --check-config      Validate the configuration, print the result, exit
    --transport SPEC    Where to serve; repeat for several. Replaces
                        [agent] transports from the configuration:
                          virtio-serial[:NAME_OR_PATH]  the virtio-serial port
                              (default name org.kvmmanager.agent.0)
                          vsock[:PORT]     AF_VSOCK listener (default port 7789)
                          unix:PATH        unix-socket listener (mode 0600)
                          pipe:NAME        Windows named pipe \\\\.\\pipe\\NAME
                                           (SYSTEM and Administrators only)
                          com:COMn         Windows serial port, 115200 8N1
    --qga-transport SPEC
                        Also speak qemu-guest-agent's protocol there (same
                        forms; repeat for several). Replaces [qga] from the
                        configuration. See docs/qga-compat.md.
    --log-level LEVEL   error, warn, info, debug or trace [default: info]
    --service           Windows only: run as the service kvm-manager-agent,
                        started by the Service Control Manager (logs go to
                        the Event Log); the MSI installs it so
    --version           Print the version and exit
    --help              Print this help and exit

EXIT STATUS:
    0   stopped cleanly (SIGTERM or SIGINT), or the configuration is valid
    1   could not run (a transport could not be set up)
    2   bad command line
    78  bad configuration file
";

impl Args {
    /// Parse arguments (without the program name).
    pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Self, ArgsError> {
        let mut out = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let arg = arg.into_string().map_err(|_| ArgsError::NotUtf8)?;
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = |opt: &'static str| -> Result<String, ArgsError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => it
                        .next()
                        .ok_or(ArgsError::MissingValue(opt))?
                        .into_string()
                        .map_err(|_| ArgsError::NotUtf8),
                }
            };
            match name.as_str() {
                "--config" | "-c" => out.config = Some(PathBuf::from(value("--config")?)),
                "--check-config" => out.check_config = true,
                "--transport" | "-t" => {
                    let v = value("--transport")?;
                    let spec = v.parse().map_err(|e: crate::transport::SpecError| {
                        ArgsError::BadTransport {
                            value: v.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    out.transports.push(spec);
                }
                "--qga-transport" => {
                    let v = value("--qga-transport")?;
                    let spec = v.parse().map_err(|e: crate::transport::SpecError| {
                        ArgsError::BadTransport {
                            value: v.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    out.qga_transports.push(spec);
                }
                "--log-level" => out.log_level = Some(value("--log-level")?),
                "--service" => out.service = true,
                "--version" | "-V" => out.version = true,
                "--help" | "-h" => out.help = true,
                _ => return Err(ArgsError::Unknown(arg)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, ArgsError> {
        Args::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn options() {
        let a = parse(&[
            "--config",
            "/etc/x.toml",
            "--transport",
            "unix:/tmp/a",
            "--transport=vsock:5",
            "--check-config",
            "--qga-transport",
            "unix:/tmp/q",
        ])
        .unwrap();
        assert_eq!(a.qga_transports, vec![TransportSpec::Unix("/tmp/q".into())]);
        assert_eq!(a.config, Some(PathBuf::from("/etc/x.toml")));
        assert_eq!(
            a.transports,
            vec![
                TransportSpec::Unix("/tmp/a".into()),
                TransportSpec::Vsock(5)
            ]
        );
        assert!(a.check_config);
        assert!(!a.service);
        assert!(parse(&["--service"]).unwrap().service);
        assert_eq!(parse(&[]).unwrap(), Args::default());
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse(&["--bogus"]).unwrap_err(),
            ArgsError::Unknown("--bogus".into())
        );
        assert_eq!(
            parse(&["--config"]).unwrap_err(),
            ArgsError::MissingValue("--config")
        );
        assert!(matches!(
            parse(&["--transport", "tcp:1"]).unwrap_err(),
            ArgsError::BadTransport { .. }
        ));
    }
}
