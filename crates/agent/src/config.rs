//! The configuration file: `/etc/kvm-manager-agent/config.toml` on Linux,
//! `%ProgramData%\KVM Manager Agent\config.toml` on Windows
//! ([`default_config_path`]).
//!
//! Every key is optional and has a safe default; unknown keys are errors, and
//! each validation error names the key. `kvm-manager-agent --check-config`
//! runs the same checks and exits.

use std::path::{Path, PathBuf};

use kvm_agent_protocol::frame::{DEFAULT_MAX_FRAME_BYTES, MIN_MAX_FRAME_BYTES};
use kvm_agent_protocol::MethodName;
use serde::{Deserialize, Serialize};

use crate::transport::TransportSpec;

/// Where the agent looks for its configuration on Linux when `--config` is
/// not given (see [`default_config_path`] for every platform).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvm-manager-agent/config.toml";

/// The folder under `%ProgramData%` that holds the Windows configuration
/// (the MSI installs the default file there).
pub const WINDOWS_CONFIG_DIR: &str = "KVM Manager Agent";

/// Where the agent looks for its configuration when `--config` is not
/// given: [`DEFAULT_CONFIG_PATH`] on Linux; on Windows `config.toml` in
/// [`WINDOWS_CONFIG_DIR`] under the ProgramData known folder (where the MSI's
/// `CommonAppDataFolder` points; `C:\ProgramData` normally).
pub fn default_config_path() -> PathBuf {
    #[cfg(windows)]
    {
        program_data().join(WINDOWS_CONFIG_DIR).join("config.toml")
    }
    #[cfg(not(windows))]
    {
        PathBuf::from(DEFAULT_CONFIG_PATH)
    }
}

/// The ProgramData folder, from `SHGetKnownFolderPath` rather than the
/// `%ProgramData%` variable: a service's environment may say otherwise
/// (Wine gives services `C:\users\Public`). The variable, then
/// `C:\ProgramData`, only if the call fails.
#[cfg(windows)]
fn program_data() -> PathBuf {
    use std::os::windows::ffi::OsStringExt;
    use windows_sys::Win32::System::Com::CoTaskMemFree;
    use windows_sys::Win32::UI::Shell::{
        FOLDERID_ProgramData, SHGetKnownFolderPath, KF_FLAG_DEFAULT,
    };
    let mut path: *mut u16 = std::ptr::null_mut();
    // SAFETY: FOLDERID_ProgramData is a valid known-folder id; a null token
    // means this process's; `path` receives a string we free below.
    let hr = unsafe {
        SHGetKnownFolderPath(
            &FOLDERID_ProgramData,
            KF_FLAG_DEFAULT as u32,
            std::ptr::null_mut(),
            &mut path,
        )
    };
    let found = if hr >= 0 && !path.is_null() {
        // SAFETY: on success `path` is a NUL-terminated UTF-16 string.
        let len = (0..).take_while(|&i| unsafe { *path.add(i) } != 0).count();
        // SAFETY: `len` units before the NUL are readable.
        let units = unsafe { std::slice::from_raw_parts(path, len) };
        Some(PathBuf::from(std::ffi::OsString::from_wide(units)))
    } else {
        None
    };
    // SAFETY: `path` came from SHGetKnownFolderPath (CoTaskMemFree accepts
    // null too) and is not used after this.
    unsafe { CoTaskMemFree(path.cast()) };
    found
        .or_else(|| {
            std::env::var_os("ProgramData")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and position.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {problem}")]
    Invalid {
        /// The file (or `<defaults>`).
        path: PathBuf,
        /// The offending key, dotted (`limits.max_frame_bytes`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The file could be changed by someone other than the administrators
    /// (`platform::check_guarded`).
    #[error("{path}: refusing a configuration file that {problem}; {remedy}")]
    Insecure {
        /// The file.
        path: PathBuf,
        /// What is wrong with its ownership, mode or ACL.
        problem: String,
        /// What it must be instead, and how (`platform::guard_remedy`).
        remedy: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`: transports and logging.
    #[serde(default)]
    pub agent: AgentSection,
    /// `[limits]`: sizes and concurrency.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[security]`: what the host may do.
    #[serde(default)]
    pub security: SecuritySection,
    /// `[exec]`: timeouts, output sizes and handle retention of exec.
    #[serde(default)]
    pub exec: ExecSection,
    /// `[audit]`: where the audit trail goes.
    #[serde(default)]
    pub audit: AuditSection,
    /// `[info]`: what `get_info` and `get_metrics` report.
    #[serde(default)]
    pub info: InfoSection,
    /// `[qga]`: the qemu-guest-agent protocol front end.
    #[serde(default)]
    pub qga: QgaSection,
}

/// `[qga]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QgaSection {
    /// Serve qemu-guest-agent's protocol too (docs/qga-compat.md).
    #[serde(default)]
    pub enable: bool,
    /// Where to serve it, in the forms of `agent.transports`.
    #[serde(default = "default_qga_transports")]
    pub transports: Vec<String>,
}

impl Default for QgaSection {
    fn default() -> Self {
        Self {
            enable: false,
            transports: default_qga_transports(),
        }
    }
}

fn default_qga_transports() -> Vec<String> {
    vec![format!("virtio-serial:{}", crate::qga::PORT_NAME)]
}

/// `[agent]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Where to listen: `virtio-serial[:NAME_OR_PATH]`, `vsock[:PORT]`,
    /// `unix:PATH`; on Windows also `pipe:NAME` and `com:COMn`.
    #[serde(default = "default_transports")]
    pub transports: Vec<String>,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            transports: default_transports(),
            log_level: default_log_level(),
        }
    }
}

fn default_transports() -> Vec<String> {
    vec!["virtio-serial".to_owned()]
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// `[limits]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest frame body either way, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// Processes started by `exec` and `exec_start` running at once.
    #[serde(default = "default_max_processes")]
    pub max_processes: u32,
    /// Unread output the agent buffers per stream of an `exec_start`
    /// process; at the cap it stops reading that pipe until the host reads.
    #[serde(default = "default_max_exec_buffer_bytes")]
    pub max_exec_buffer_bytes: u32,
    /// Largest number of requests in one batch.
    #[serde(default = "default_max_batch_len")]
    pub max_batch_len: u32,
    /// Requests running at once on one connection.
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: u32,
    /// Requests running at once across all connections.
    #[serde(default = "default_max_requests_total")]
    pub max_requests_total: u32,
    /// Host connections served at once on listening transports.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest file `file_open` writes or `copy_*` moves, in bytes.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// File handles one connection may have open at once.
    #[serde(default = "default_max_file_handles_per_connection")]
    pub max_file_handles_per_connection: u32,
    /// File handles open at once across the agent.
    #[serde(default = "default_max_file_handles_total")]
    pub max_file_handles_total: u32,
    /// A file handle unused this long is closed (an upload discarded).
    #[serde(default = "default_file_handle_idle_seconds")]
    pub file_handle_idle_seconds: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_frame_bytes: default_max_frame_bytes(),
            max_processes: default_max_processes(),
            max_exec_buffer_bytes: default_max_exec_buffer_bytes(),
            max_batch_len: default_max_batch_len(),
            max_requests_per_connection: default_max_requests_per_connection(),
            max_requests_total: default_max_requests_total(),
            max_connections: default_max_connections(),
            max_file_bytes: default_max_file_bytes(),
            max_file_handles_per_connection: default_max_file_handles_per_connection(),
            max_file_handles_total: default_max_file_handles_total(),
            file_handle_idle_seconds: default_file_handle_idle_seconds(),
        }
    }
}

fn default_max_processes() -> u32 {
    16
}
fn default_max_exec_buffer_bytes() -> u32 {
    4 * 1024 * 1024
}
fn default_max_frame_bytes() -> u32 {
    DEFAULT_MAX_FRAME_BYTES
}
fn default_max_batch_len() -> u32 {
    256
}
fn default_max_requests_per_connection() -> u32 {
    64
}
fn default_max_requests_total() -> u32 {
    256
}
fn default_max_connections() -> u32 {
    64
}
fn default_max_file_bytes() -> u64 {
    64 << 30
}
fn default_max_file_handles_per_connection() -> u32 {
    16
}
fn default_max_file_handles_total() -> u32 {
    64
}
fn default_file_handle_idle_seconds() -> u64 {
    600
}

impl LimitsSection {
    /// Largest file chunk: the largest power of two whose base64 form, with
    /// room for the envelope, fits in a frame (1 when the frame limit leaves
    /// no room beyond the envelope, as at its minimum, 4096).
    pub fn max_chunk_bytes(&self) -> u32 {
        let room = (u64::from(self.max_frame_bytes).saturating_sub(4096) * 3 / 4).max(1);
        1 << (63 - room.leading_zeros())
    }

    /// Most output bytes of one stream in one `exec` result or
    /// `exec_status` answer: half a chunk, so that both streams, even as
    /// base64, fit in one frame.
    pub fn max_exec_output_bytes(&self) -> u64 {
        let room = u64::from(self.max_frame_bytes).saturating_sub(4096) * 3 / 4;
        match room {
            0..=1 => 1,
            _ => (1u64 << (63 - room.leading_zeros())) / 2,
        }
    }
}

/// `[security]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// Allow `exec` and `exec_*` at all.
    #[serde(default)]
    pub enable_exec: bool,
    /// Commands `exec` may run with any arguments, as the user the agent
    /// runs as: absolute paths or bare names.
    #[serde(default)]
    pub allowed_commands: Vec<String>,
    /// `[[security.commands]]`: commands with argument rules or a user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<CommandRule>,
    /// Environment variable names (`*` and `?` patterns) a request's `env`
    /// may set.
    #[serde(default = "default_exec_env")]
    pub exec_env: Vec<String>,
    /// Allow the file transfer methods at all.
    #[serde(default = "default_true")]
    pub enable_file_copy: bool,
    /// Directories file transfers are confined to. Default: `/tmp` and
    /// `/var/tmp` on Unix; on Windows `%ProgramData%\KVM Manager
    /// Agent\transfer` (drive-letter paths whose names pass the Windows
    /// path rules, else the configuration is refused; compared
    /// case-insensitively; a directory that does not exist makes every
    /// transfer to it answer "not found").
    #[serde(default = "default_allowed_file_paths")]
    pub allowed_file_paths: Vec<PathBuf>,
    /// Methods refused with `denied` whatever else is configured.
    #[serde(default)]
    pub disabled_methods: Vec<String>,
    /// The shared key (hex) that authenticates requests; absent:
    /// authentication is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_key_file: Option<PathBuf>,
    /// A second key still accepted during a key rollover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_previous_key_file: Option<PathBuf>,
    /// How far a request's timestamp may be from the agent's clock.
    #[serde(default = "default_hmac_max_skew_seconds")]
    pub hmac_max_skew_seconds: u64,
}

impl Default for SecuritySection {
    fn default() -> Self {
        Self {
            enable_exec: false,
            allowed_commands: Vec::new(),
            commands: Vec::new(),
            exec_env: default_exec_env(),
            enable_file_copy: true,
            allowed_file_paths: default_allowed_file_paths(),
            disabled_methods: Vec::new(),
            hmac_key_file: None,
            hmac_previous_key_file: None,
            hmac_max_skew_seconds: default_hmac_max_skew_seconds(),
        }
    }
}

/// Variables that change how programs talk, never what code they load
/// (no `LD_*`, `PATH`, `PYTHON*`, `BASH_ENV`...).
fn default_exec_env() -> Vec<String> {
    ["LANG", "LC_*", "TZ", "TERM", "COLUMNS", "LINES", "NO_COLOR"]
        .map(String::from)
        .to_vec()
}

/// One `[[security.commands]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRule {
    /// Absolute path or bare name, as in `allowed_commands`.
    pub path: String,
    /// The argument vectors allowed, each a list of patterns, one per
    /// argument (`*` and `?` within an argument; a last `"**"` matches any
    /// further arguments, none included). Absent: any arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Vec<String>>>,
    /// Run as this user (from /etc/passwd), with its group and
    /// supplementary groups (from /etc/group), instead of as the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

/// `[exec]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSection {
    /// Timeout of a command whose request gives none.
    #[serde(default = "default_exec_timeout_ms")]
    pub default_timeout_ms: u64,
    /// Largest timeout; larger requested values are lowered to it.
    #[serde(default = "default_exec_max_timeout_ms")]
    pub max_timeout_ms: u64,
    /// Output kept per stream by `exec` when the request gives no
    /// `max_output_bytes`.
    #[serde(default = "default_exec_max_output_bytes")]
    pub default_max_output_bytes: u64,
    /// Finished `exec_start` handles kept for the host to read.
    #[serde(default = "default_exec_keep_finished")]
    pub keep_finished: u32,
    /// Seconds a finished handle is kept after its process exited.
    #[serde(default = "default_exec_keep_finished_seconds")]
    pub keep_finished_seconds: u64,
}

impl Default for ExecSection {
    fn default() -> Self {
        Self {
            default_timeout_ms: default_exec_timeout_ms(),
            max_timeout_ms: default_exec_max_timeout_ms(),
            default_max_output_bytes: default_exec_max_output_bytes(),
            keep_finished: default_exec_keep_finished(),
            keep_finished_seconds: default_exec_keep_finished_seconds(),
        }
    }
}

fn default_exec_timeout_ms() -> u64 {
    60_000
}
fn default_exec_max_timeout_ms() -> u64 {
    3_600_000
}
fn default_exec_max_output_bytes() -> u64 {
    1024 * 1024
}
fn default_exec_keep_finished() -> u32 {
    64
}
fn default_exec_keep_finished_seconds() -> u64 {
    600
}

fn default_hmac_max_skew_seconds() -> u64 {
    kvm_agent_protocol::auth::DEFAULT_MAX_SKEW_SECONDS
}

fn default_true() -> bool {
    true
}

fn default_allowed_file_paths() -> Vec<PathBuf> {
    if cfg!(unix) {
        vec![PathBuf::from("/tmp"), PathBuf::from("/var/tmp")]
    } else {
        // The agent's own transfer directory under %ProgramData% (only
        // administrators and the service write there by default).
        let base = std::env::var_os("ProgramData")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"));
        vec![base.join("KVM Manager Agent").join("transfer")]
    }
}

/// Where audit records go besides the optional JSON-lines file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDestination {
    /// On Linux journald when its socket exists, else syslog when `/dev/log`
    /// exists, else stderr; on Windows the Event Log.
    Auto,
    /// journald's native socket, with structured fields (Linux only).
    Journald,
    /// The local syslog socket, facility authpriv (Linux only).
    Syslog,
    /// The Windows Event Log, Application log, source `kvm-manager-agent`
    /// (Windows only).
    Eventlog,
    /// Standard error.
    Stderr,
    /// Nowhere but the JSON-lines file (`jsonl_path` must be set).
    None,
}

impl AuditDestination {
    /// Why this destination cannot be used on this platform, if it cannot:
    /// one config file may serve both, but naming the other platform's log
    /// is a mistake better caught at start than found in an empty trail.
    pub fn unavailable(self) -> Option<&'static str> {
        match self {
            Self::Eventlog if !cfg!(windows) => Some(
                "\"eventlog\" (the Windows Event Log) exists only on Windows; \
                 use \"auto\", \"journald\", \"syslog\" or \"stderr\"",
            ),
            Self::Journald | Self::Syslog if cfg!(windows) => Some(
                "\"journald\" and \"syslog\" exist only on Linux; \
                 on Windows use \"auto\" or \"eventlog\" (the Event Log), or \"stderr\"",
            ),
            _ => None,
        }
    }
}

/// `[audit]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// The main destination.
    #[serde(default = "default_audit_destination")]
    pub destination: AuditDestination,
    /// Also append JSON lines to this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonl_path: Option<PathBuf>,
    /// Rotate the JSON-lines file past this size.
    #[serde(default = "default_jsonl_max_bytes")]
    pub jsonl_max_bytes: u64,
    /// Rotated JSON-lines files kept.
    #[serde(default = "default_jsonl_keep")]
    pub jsonl_keep: u32,
    /// Refuse privileged requests (exec, file writes, power) while a
    /// destination fails, rather than running them unaudited.
    #[serde(default = "default_true")]
    pub require_for_privileged: bool,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            destination: default_audit_destination(),
            jsonl_path: None,
            jsonl_max_bytes: default_jsonl_max_bytes(),
            jsonl_keep: default_jsonl_keep(),
            require_for_privileged: true,
        }
    }
}

fn default_audit_destination() -> AuditDestination {
    AuditDestination::Auto
}
fn default_jsonl_max_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_jsonl_keep() -> u32 {
    5
}

/// `[info]`
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InfoSection {
    /// Interface name patterns (`*` any run, `?` any one character) left out
    /// of `get_info` and `get_metrics` unless the host asks for all.
    #[serde(default = "default_hide_interfaces")]
    pub hide_interfaces: Vec<String>,
    /// How long `get_metrics` waits for the filesystems' statvfs answers.
    #[serde(default = "default_network_filesystem_timeout_ms")]
    pub network_filesystem_timeout_ms: u64,
}

impl Default for InfoSection {
    fn default() -> Self {
        Self {
            hide_interfaces: default_hide_interfaces(),
            network_filesystem_timeout_ms: default_network_filesystem_timeout_ms(),
        }
    }
}

/// Container, Kubernetes and nested-virtualisation plumbing.
fn default_hide_interfaces() -> Vec<String> {
    [
        "veth*",
        "docker*",
        "br-*",
        "cni*",
        "flannel*",
        "cali*",
        "vxlan.calico",
        "tunl0",
        "cilium_*",
        "lxc*",
        "weave",
        "kube-ipvs0",
        "kube-bridge",
        "podman*",
        "virbr*",
        "vnet*",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn default_network_filesystem_timeout_ms() -> u64 {
    2000
}

/// Whether `name` matches a `hide_interfaces` pattern: `*` matches any run
/// of characters (also none), `?` exactly one; everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl InfoSection {
    /// Whether the interface filter hides `name`.
    pub fn hides_interface(&self, name: &str) -> bool {
        self.hide_interfaces.iter().any(|p| glob_match(p, name))
    }
}

impl Config {
    /// Parse and validate configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Read, check ownership of, parse and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        check_ownership(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The configured transports, parsed.
    pub fn transports(&self) -> Vec<TransportSpec> {
        self.agent
            .transports
            .iter()
            .map(|t| t.parse().expect("validated"))
            .collect()
    }

    /// The transports of the qemu-guest-agent front end, parsed (none
    /// unless `qga.enable`).
    pub fn qga_transports(&self) -> Vec<TransportSpec> {
        if !self.qga.enable {
            return Vec::new();
        }
        self.qga
            .transports
            .iter()
            .map(|t| t.parse().expect("validated"))
            .collect()
    }

    /// The disabled methods, parsed.
    pub fn disabled_methods(&self) -> Vec<MethodName> {
        self.security
            .disabled_methods
            .iter()
            .map(|m| MethodName::from_name(m).expect("validated"))
            .collect()
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            problem,
        };
        if self.agent.transports.is_empty() {
            return Err(invalid(
                "agent.transports",
                "must name at least one transport".into(),
            ));
        }
        for (i, t) in self.agent.transports.iter().enumerate() {
            t.parse::<TransportSpec>()
                .map_err(|e| invalid(&format!("agent.transports[{i}]"), e.to_string()))?;
        }
        for (i, t) in self.qga.transports.iter().enumerate() {
            let spec = t
                .parse::<TransportSpec>()
                .map_err(|e| invalid(&format!("qga.transports[{i}]"), e.to_string()))?;
            if self.qga.enable && self.transports().contains(&spec) {
                return Err(invalid(
                    &format!("qga.transports[{i}]"),
                    format!(
                        "{t} is also in agent.transports: a port or socket serves one protocol"
                    ),
                ));
            }
        }
        if self.qga.enable && self.qga.transports.is_empty() {
            return Err(invalid(
                "qga.transports",
                "must name at least one transport when qga.enable is true".into(),
            ));
        }
        if self.qga.enable && self.security.hmac_key_file.is_some() {
            return Err(invalid(
                "qga.enable",
                "qemu-guest-agent's protocol cannot carry authentication: it cannot be enabled while security.hmac_key_file is set".into(),
            ));
        }
        if crate::logging::parse_level(&self.agent.log_level).is_none() {
            return Err(invalid(
                "agent.log_level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.agent.log_level
                ),
            ));
        }
        let l = &self.limits;
        if l.max_frame_bytes < MIN_MAX_FRAME_BYTES {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!(
                    "must be at least {MIN_MAX_FRAME_BYTES} (got {})",
                    l.max_frame_bytes
                ),
            ));
        }
        if l.max_frame_bytes > i32::MAX as u32 {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!("must be at most {} (got {})", i32::MAX, l.max_frame_bytes),
            ));
        }
        for (key, value) in [
            ("limits.max_batch_len", l.max_batch_len),
            (
                "limits.max_requests_per_connection",
                l.max_requests_per_connection,
            ),
            ("limits.max_requests_total", l.max_requests_total),
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_file_handles_per_connection",
                l.max_file_handles_per_connection,
            ),
            ("limits.max_file_handles_total", l.max_file_handles_total),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if !(1..=7 * 86_400).contains(&l.file_handle_idle_seconds) {
            return Err(invalid(
                "limits.file_handle_idle_seconds",
                format!(
                    "must be between 1 and 604800 (got {})",
                    l.file_handle_idle_seconds
                ),
            ));
        }
        for (i, m) in self.security.disabled_methods.iter().enumerate() {
            if MethodName::from_name(m).is_none() {
                return Err(invalid(
                    &format!("security.disabled_methods[{i}]"),
                    format!("{m:?} is not a method of this protocol"),
                ));
            }
        }
        let sec = &self.security;
        for (key, path) in [
            ("security.hmac_key_file", &sec.hmac_key_file),
            (
                "security.hmac_previous_key_file",
                &sec.hmac_previous_key_file,
            ),
        ] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Err(invalid(
                        key,
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        if sec.hmac_previous_key_file.is_some() && sec.hmac_key_file.is_none() {
            return Err(invalid(
                "security.hmac_previous_key_file",
                "needs security.hmac_key_file: the previous key is accepted only beside a current one".into(),
            ));
        }
        if !(1..=86_400).contains(&sec.hmac_max_skew_seconds) {
            return Err(invalid(
                "security.hmac_max_skew_seconds",
                format!(
                    "must be between 1 and 86400 (got {})",
                    sec.hmac_max_skew_seconds
                ),
            ));
        }
        if let Some(p) = &self.audit.jsonl_path {
            if !p.is_absolute() {
                return Err(invalid(
                    "audit.jsonl_path",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if let Some(why) = self.audit.destination.unavailable() {
            return Err(invalid("audit.destination", why.into()));
        }
        if self.audit.destination == AuditDestination::None && self.audit.jsonl_path.is_none() {
            return Err(invalid(
                "audit.destination",
                "\"none\" needs audit.jsonl_path: every request must be recorded somewhere".into(),
            ));
        }
        if self.audit.jsonl_max_bytes < 4096 {
            return Err(invalid(
                "audit.jsonl_max_bytes",
                format!("must be at least 4096 (got {})", self.audit.jsonl_max_bytes),
            ));
        }
        for (i, p) in self.info.hide_interfaces.iter().enumerate() {
            if p.is_empty() || p.len() > 64 || p.chars().any(|c| c.is_whitespace() || c == '/') {
                return Err(invalid(
                    &format!("info.hide_interfaces[{i}]"),
                    format!("{p:?} is not an interface name pattern (1-64 characters, no spaces or '/')"),
                ));
            }
        }
        let t = self.info.network_filesystem_timeout_ms;
        if !(1..=60_000).contains(&t) {
            return Err(invalid(
                "info.network_filesystem_timeout_ms",
                format!("must be between 1 and 60000 (got {t})"),
            ));
        }
        for (i, p) in self.security.allowed_file_paths.iter().enumerate() {
            if !p.is_absolute() {
                return Err(invalid(
                    &format!("security.allowed_file_paths[{i}]"),
                    format!("{} is not an absolute path", p.display()),
                ));
            }
            if cfg!(windows) {
                if let Err(r) = crate::files::path::check_windows_root(p) {
                    return Err(invalid(
                        &format!("security.allowed_file_paths[{i}]"),
                        format!("{}: {}", p.display(), r.describe()),
                    ));
                }
            }
        }
        self.validate_exec(&invalid)
    }

    fn validate_exec(
        &self,
        invalid: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_processes", l.max_processes),
            ("limits.max_exec_buffer_bytes", l.max_exec_buffer_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        let sec = &self.security;
        for (i, c) in sec.allowed_commands.iter().enumerate() {
            check_command_name(c)
                .map_err(|p| invalid(&format!("security.allowed_commands[{i}]"), p))?;
        }
        for (i, rule) in sec.commands.iter().enumerate() {
            let key = |k: &str| format!("security.commands[{i}].{k}");
            check_command_name(&rule.path).map_err(|p| invalid(&key("path"), p))?;
            if rule.args.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(
                    &key("args"),
                    "is empty, which allows nothing: give [[]] for \"no arguments\", or leave it out for \"any\"".into(),
                ));
            }
            for (j, pattern) in rule.args.iter().flatten().enumerate() {
                if let Some(k) = pattern.iter().position(|a| a == "**") {
                    if k + 1 != pattern.len() {
                        return Err(invalid(
                            &format!("security.commands[{i}].args[{j}]"),
                            "\"**\" may only be the last pattern".into(),
                        ));
                    }
                }
            }
            if let Some(user) = &rule.run_as {
                if user.is_empty() || user.contains([':', '/', '\n']) {
                    return Err(invalid(
                        &key("run_as"),
                        format!("{user:?} is not a user name"),
                    ));
                }
            }
        }
        for (i, p) in sec.exec_env.iter().enumerate() {
            if p.is_empty() || p.contains('=') || p.contains('\0') {
                return Err(invalid(
                    &format!("security.exec_env[{i}]"),
                    format!("{p:?} is not a variable name pattern"),
                ));
            }
        }
        let e = &self.exec;
        if !(1..=e.max_timeout_ms).contains(&e.default_timeout_ms) {
            return Err(invalid(
                "exec.default_timeout_ms",
                format!(
                    "must be between 1 and exec.max_timeout_ms ({}) (got {})",
                    e.max_timeout_ms, e.default_timeout_ms
                ),
            ));
        }
        if e.default_max_output_bytes == 0 {
            return Err(invalid(
                "exec.default_max_output_bytes",
                "must be at least 1".into(),
            ));
        }
        if e.keep_finished == 0 {
            return Err(invalid("exec.keep_finished", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// An allowlist entry: an absolute path without `.` or `..` components, or a
/// bare name.
/// On Windows the allowlist's own rules (`X:\...\name.exe` or `name.exe`).
#[cfg(windows)]
fn check_command_name(c: &str) -> Result<(), String> {
    crate::policy::commands::windows::parse(c)
        .map(|_| ())
        .map_err(|r| format!("{c:?}: {}", r.reason()))
}

#[cfg(not(windows))]
fn check_command_name(c: &str) -> Result<(), String> {
    if c.is_empty() || c.contains('\0') {
        return Err(format!("{c:?} is not a command"));
    }
    if c.starts_with('/') {
        if c.ends_with('/')
            || c.split('/')
                .skip(1)
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!(
                "{c} is not a plain absolute path (no \".\", \"..\", \"//\" or trailing \"/\")"
            ));
        }
    } else if c.contains('/') || c == "." || c == ".." {
        return Err(format!("{c:?} is neither an absolute path nor a bare name"));
    }
    Ok(())
}

/// The file must not be changeable by anyone but the administrators (or the
/// account the agent runs as, for development): it decides what the host may
/// do as root.
fn check_ownership(path: &Path) -> Result<(), ConfigError> {
    use crate::platform::{self, Guard, GuardError};
    platform::check_guarded(path, Guard::Change).map_err(|e| match e {
        GuardError::Read(source) => ConfigError::Read {
            path: path.to_owned(),
            source,
        },
        GuardError::Insecure(problem) => ConfigError::Insecure {
            path: path.to_owned(),
            problem,
            remedy: platform::guard_remedy(Guard::Change, path),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn default_path_per_platform() {
        let path = default_config_path();
        if cfg!(windows) {
            // Under the tests' own environment the variable and the known
            // folder agree.
            let data = std::env::var_os("ProgramData").expect("ProgramData is set");
            assert!(path.starts_with(&data), "{}", path.display());
            assert!(
                path.ends_with(Path::new(WINDOWS_CONFIG_DIR).join("config.toml")),
                "{}",
                path.display()
            );
        } else {
            assert_eq!(path, Path::new(DEFAULT_CONFIG_PATH));
        }
    }

    /// The file the MSI installs (packaging/windows/config.toml) is valid
    /// and serves the virtio-serial port and the local named pipe.
    #[test]
    fn the_windows_config_is_valid() {
        let c = parse(include_str!("../../../packaging/windows/config.toml")).unwrap();
        assert_eq!(
            c.agent.transports,
            ["virtio-serial", "pipe:kvm-manager-agent"]
        );
        assert_eq!(c.audit.destination, AuditDestination::Auto);
        assert!(!c.security.enable_exec);
        assert!(c.security.allowed_file_paths.is_empty());
    }

    #[test]
    fn empty_file_gives_safe_defaults() {
        let c = parse("").unwrap();
        assert!(!c.security.enable_exec);
        assert!(c.security.enable_file_copy);
        if cfg!(unix) {
            let tmp = [PathBuf::from("/tmp"), PathBuf::from("/var/tmp")];
            assert_eq!(c.security.allowed_file_paths, tmp);
        } else {
            let [root] = c.security.allowed_file_paths.as_slice() else {
                panic!("{:?}", c.security.allowed_file_paths);
            };
            assert!(root.is_absolute(), "{root:?}");
            assert!(root.ends_with(r"KVM Manager Agent\transfer"), "{root:?}");
        }
        assert_eq!(c.limits.max_frame_bytes, 16 * 1024 * 1024);
        assert_eq!(c.limits.max_chunk_bytes(), 8 * 1024 * 1024);
        assert_eq!(c.agent.transports, ["virtio-serial"]);
    }

    /// The default configuration file shipped in packages (`config.toml`
    /// beside this crate's manifest) sets every key, to its default. It is
    /// the Linux file (its paths are Linux paths); the Windows one comes
    /// with the Windows package.
    #[cfg(unix)]
    #[test]
    fn shipped_config_file_documents_every_key_with_its_default() {
        let text = include_str!("../config.toml");
        let shipped: toml::Table = toml::from_str(text).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        assert_eq!(shipped, defaults);
        assert_eq!(parse(text).unwrap(), Config::default());
        // Every key has a comment right above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains(" = ") && !line.starts_with('#') {
                assert!(
                    i > 0 && lines[i - 1].starts_with('#'),
                    "key without a comment: {line}"
                );
            }
        }
    }

    #[test]
    fn chunk_size_follows_the_frame_limit() {
        let mut l = LimitsSection {
            max_frame_bytes: 4096 + 4,
            ..LimitsSection::default()
        };
        assert_eq!(l.max_chunk_bytes(), 2);
        // At the smallest frame limit there is no room beyond the envelope:
        // one byte per chunk, not an overflowed shift.
        l.max_frame_bytes = MIN_MAX_FRAME_BYTES;
        assert_eq!(l.max_chunk_bytes(), 1);
        l.max_frame_bytes = 1 << 20;
        assert_eq!(l.max_chunk_bytes(), 512 * 1024);
    }

    /// Found by the config_parser fuzz target (fuzz/): at the smallest
    /// frame limits allowed (4096, 4097) there is no room for a chunk, and
    /// the computation underflowed: a panic in debug builds, 2 GiB
    /// advertised as `max_chunk_bytes` in release builds.
    #[test]
    fn chunk_size_at_the_smallest_frame_limits() {
        for (frame, chunk) in [(4096, 1), (4097, 1), (4098, 1), (4100, 2)] {
            let l = parse(&format!("[limits]\nmax_frame_bytes = {frame}\n"))
                .unwrap()
                .limits;
            assert_eq!(l.max_chunk_bytes(), chunk, "max_frame_bytes {frame}");
            assert!(l.max_exec_output_bytes() >= 1);
        }
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = parse("[limits]\nmax_frame_byte = 5000\n").unwrap_err();
        assert!(e.to_string().contains("max_frame_byte"), "{e}");
        let e = parse("[securty]\n").unwrap_err();
        assert!(e.to_string().contains("securty"), "{e}");
    }

    #[test]
    fn wrong_types_are_errors() {
        let e = parse("[security]\nenable_exec = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("enable_exec"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let e = parse("[limits]\nmax_frame_bytes = 10\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_frame_bytes"), "{e}");
        let e = parse("[limits]\nmax_requests_total = 0\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_requests_total"), "{e}");
        let e = parse("[agent]\ntransports = [\"carrier-pigeon\"]\n").unwrap_err();
        assert!(e.to_string().contains("agent.transports[0]"), "{e}");
        let e = parse("[agent]\ntransports = []\n").unwrap_err();
        assert!(e.to_string().contains("agent.transports"), "{e}");
        let e = parse("[agent]\nlog_level = \"loud\"\n").unwrap_err();
        assert!(e.to_string().contains("agent.log_level"), "{e}");
        let e = parse("[security]\ndisabled_methods = [\"ping\", \"pong\"]\n").unwrap_err();
        assert!(e.to_string().contains("disabled_methods[1]"), "{e}");
        let e = parse("[audit]\njsonl_path = \"audit.jsonl\"\n").unwrap_err();
        assert!(e.to_string().contains("audit.jsonl_path"), "{e}");
        let e = parse("[audit]\ndestination = \"none\"\n").unwrap_err();
        assert!(e.to_string().contains("audit.destination"), "{e}");
        let e = parse("[audit]\ndestination = \"carrier-pigeon\"\n").unwrap_err();
        assert!(e.to_string().contains("destination"), "{e}");
        // Each platform refuses the other's log by name.
        let (foreign, native) = if cfg!(windows) {
            (["journald", "syslog"], "eventlog")
        } else {
            (["eventlog", "eventlog"], "journald")
        };
        for d in foreign {
            let e = parse(&format!("[audit]\ndestination = \"{d}\"\n")).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("audit.destination") && text.contains("only on"),
                "{e}"
            );
        }
        parse(&format!("[audit]\ndestination = \"{native}\"\n")).unwrap();
        let e = parse("[security]\nallowed_file_paths = [\"tmp\"]\n").unwrap_err();
        assert!(e.to_string().contains("allowed_file_paths[0]"), "{e}");
        let e = parse("[security]\nhmac_key_file = \"hmac.key\"\n").unwrap_err();
        assert!(e.to_string().contains("security.hmac_key_file"), "{e}");
        let e = parse("[security]\nhmac_previous_key_file = \"/etc/old.key\"\n").unwrap_err();
        assert!(
            e.to_string().contains("security.hmac_previous_key_file"),
            "{e}"
        );
        let e = parse("[security]\nhmac_max_skew_seconds = 0\n").unwrap_err();
        assert!(
            e.to_string().contains("security.hmac_max_skew_seconds"),
            "{e}"
        );
        let root = if cfg!(windows) { "C:/" } else { "/" };
        let c = parse(&format!(
            "[security]\nhmac_key_file = \"{root}etc/k\"\nhmac_previous_key_file = \"{root}etc/j\"\n"
        ))
        .unwrap();
        assert_eq!(c.security.hmac_max_skew_seconds, 300);
    }

    #[test]
    fn qga_section_is_validated() {
        let c = parse("").unwrap();
        assert!(c.qga_transports().is_empty(), "off by default");
        let c = parse("[qga]\nenable = true\n").unwrap();
        assert_eq!(
            c.qga_transports(),
            [TransportSpec::VirtioSerial("org.qemu.guest_agent.0".into())]
        );
        let e = parse("[qga]\nenable = true\ntransports = [\"virtio-serial\"]\n").unwrap_err();
        assert!(e.to_string().contains("qga.transports[0]"), "{e}");
        let e = parse("[qga]\ntransports = [\"tcp:1\"]\n").unwrap_err();
        assert!(e.to_string().contains("qga.transports[0]"), "{e}");
        let e = parse("[qga]\nenable = true\ntransports = []\n").unwrap_err();
        assert!(e.to_string().contains("qga.transports"), "{e}");
        let root = if cfg!(windows) { "C:/" } else { "/" };
        let e = parse(&format!(
            "[qga]\nenable = true\n[security]\nhmac_key_file = \"{root}k\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("qga.enable"), "{e}");
    }

    #[test]
    fn interface_patterns() {
        assert!(glob_match("veth*", "veth12ab"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("br-*", "br-1f2e"));
        assert!(!glob_match("br-*", "br0"));
        assert!(glob_match("eth?", "eth0"));
        assert!(!glob_match("eth?", "eth10"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(!glob_match("a*b*c", "aXXbYYb"));
        assert!(glob_match("tunl0", "tunl0"));
        let info = InfoSection::default();
        for hidden in [
            "veth0a1b",
            "docker0",
            "cni0",
            "flannel.1",
            "cali123",
            "virbr0",
            "vnet3",
        ] {
            assert!(info.hides_interface(hidden), "{hidden}");
        }
        for shown in [
            "lo", "eth0", "enp1s0", "ens3", "wg0", "tun0", "br0", "bond0",
        ] {
            assert!(!info.hides_interface(shown), "{shown}");
        }
    }

    #[test]
    fn info_section_is_validated() {
        let c = parse("[info]\nhide_interfaces = []\n").unwrap();
        assert!(!c.info.hides_interface("veth0"));
        let e = parse("[info]\nhide_interfaces = [\"ok*\", \"\"]\n").unwrap_err();
        assert!(e.to_string().contains("info.hide_interfaces[1]"), "{e}");
        let e = parse("[info]\nhide_interfaces = [\"a b\"]\n").unwrap_err();
        assert!(e.to_string().contains("info.hide_interfaces[0]"), "{e}");
        let e = parse("[info]\nnetwork_filesystem_timeout_ms = 0\n").unwrap_err();
        assert!(
            e.to_string().contains("info.network_filesystem_timeout_ms"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn group_writable_or_foreign_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kva-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Insecure { .. }), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load(&path).unwrap();
        // Owned by someone who is neither root nor the agent's user: refused.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let e = Config::load(&path).unwrap_err();
            assert!(matches!(e, ConfigError::Insecure { .. }), "{e}");
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
