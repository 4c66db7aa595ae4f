//! `exec`, `exec_start`, `exec_status` and `exec_kill`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Params of `exec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// An allowed command: absolute path or bare name from the allowlist.
    pub command: String,
    /// Arguments, passed as a vector; no shell is involved.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to the clean minimal environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input, base64.
    #[serde(default)]
    pub stdin_base64: Option<String>,
    /// Kill the process group after this long (default and maximum from config).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Keep at most this many bytes of each output stream.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
}

/// How output bytes are carried in a JSON string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// The bytes were valid UTF-8 and are the string itself.
    #[serde(rename = "utf-8")]
    Utf8,
    /// The bytes were not UTF-8; the string is their standard base64.
    #[serde(rename = "base64")]
    Base64,
}

/// A piece of process output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// How `data` encodes the bytes.
    pub encoding: Encoding,
    /// The bytes.
    pub data: String,
}

/// Result of `exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended the process.
    pub signal: Option<i32>,
    /// Standard output.
    pub stdout: Output,
    /// Standard error.
    pub stderr: Output,
    /// Standard output went past `max_output_bytes` and was cut.
    pub stdout_truncated: bool,
    /// Standard error went past `max_output_bytes` and was cut.
    pub stderr_truncated: bool,
    /// The timeout killed the process group.
    pub timed_out: bool,
    /// Wall time from start to exit.
    pub duration_ms: u64,
}

/// Params of `exec_start`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStartParams {
    /// An allowed command: absolute path or bare name from the allowlist.
    pub command: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to the clean minimal environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input, base64.
    #[serde(default)]
    pub stdin_base64: Option<String>,
    /// Kill the process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Result of `exec_start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    /// Handle for `exec_status` and `exec_kill`.
    pub handle: u64,
    /// The process id in the guest.
    pub pid: u32,
}

/// Params of `exec_status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStatusParams {
    /// The handle from `exec_start`.
    pub handle: u64,
    /// Return standard output from this byte offset.
    #[serde(default)]
    pub stdout_offset: u64,
    /// Return standard error from this byte offset.
    #[serde(default)]
    pub stderr_offset: u64,
    /// Return at most this many bytes of each stream.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// Result of `exec_status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStatus {
    /// The process has exited (even if a background child still holds its pipes).
    pub exited: bool,
    /// Exit code, once exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, once ended by a signal.
    pub signal: Option<i32>,
    /// The timeout killed the process group.
    pub timed_out: bool,
    /// Standard output from `stdout_offset`.
    pub stdout: Output,
    /// Standard error from `stderr_offset`.
    pub stderr: Output,
    /// Offset to ask for next time to continue standard output.
    pub stdout_next_offset: u64,
    /// Offset to ask for next time to continue standard error.
    pub stderr_next_offset: u64,
    /// Both streams are closed and everything has been returned.
    pub output_complete: bool,
}

/// A signal for `exec_kill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// Ask politely.
    #[serde(rename = "SIGTERM")]
    Term,
    /// Kill.
    #[serde(rename = "SIGKILL")]
    Kill,
    /// Interrupt.
    #[serde(rename = "SIGINT")]
    Int,
    /// Hang up.
    #[serde(rename = "SIGHUP")]
    Hup,
}

/// Params of `exec_kill`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecKillParams {
    /// The handle from `exec_start`.
    pub handle: u64,
    /// The signal; default `SIGKILL`. Sent to the whole process group.
    #[serde(default = "default_signal")]
    pub signal: Signal,
}

fn default_signal() -> Signal {
    Signal::Kill
}
