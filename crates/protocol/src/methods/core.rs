//! `ping` and `get_capabilities`, and the small types many methods share.

use serde::{Deserialize, Serialize};

/// Params of a method that takes none: absent, `{}` or `[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A result with nothing to say beyond success: `{}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The operating-system family of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsFamily {
    /// Linux.
    Linux,
    /// Windows.
    Windows,
}

impl OsFamily {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            OsFamily::Linux => "linux",
            OsFamily::Windows => "windows",
        }
    }
}

/// Result of `get_capabilities`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `MAJOR.MINOR` of the protocol the agent speaks.
    pub protocol_version: String,
    /// The agent's own version.
    pub agent_version: String,
    /// The guest's OS family.
    pub os_family: OsFamily,
    /// The methods this agent will execute under its current policy: every
    /// other method is answered with an error. Strings, not [`MethodName`](super::MethodName)s,
    /// so that a host reads the list of a newer agent too.
    pub methods: Vec<String>,
    /// The limits in force.
    pub limits: Limits,
    /// Whether requests must carry an authentication code.
    pub auth_required: bool,
}

/// Limits a host must respect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame body, in bytes, either direction.
    pub max_frame_bytes: u32,
    /// Largest `file_read`/`file_write` chunk, in bytes before base64.
    pub max_chunk_bytes: u32,
    /// Largest number of requests in one batch.
    pub max_batch_len: u32,
    /// Requests one connection may have running at once (beyond: `busy`).
    pub max_requests_per_connection: u32,
}
