//! Messages the agent sends without being asked (JSON-RPC notifications).

use serde::{Deserialize, Serialize};

use crate::methods::core::OsFamily;

/// Name of the notification sent to every host when it connects.
pub const AGENT_READY: &str = "agent_ready";

/// Params of `agent_ready`: sent as the first message of every connection, so
/// a host learns the agent is up (and whether the guest rebooted) without
/// polling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReady {
    /// The agent's version.
    pub agent_version: String,
    /// The protocol version, `MAJOR.MINOR`.
    pub protocol_version: String,
    /// Identifies the guest's current boot; it changes on every reboot.
    pub boot_id: String,
    /// The guest's OS family.
    pub os_family: OsFamily,
}
