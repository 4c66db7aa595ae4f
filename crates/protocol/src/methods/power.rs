//! `shutdown` and `reboot`.

use serde::{Deserialize, Serialize};

/// Params of `shutdown` and `reboot`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerParams {
    /// Skip the orderly shutdown of services: sync filesystems and stop at once.
    #[serde(default)]
    pub force: bool,
    /// Must be `true`, or nothing happens and `confirmation_required` is returned.
    #[serde(default)]
    pub confirm: bool,
    /// Wait this long before acting.
    #[serde(default)]
    pub delay_seconds: u32,
    /// Shown to logged-in users where the guest supports it.
    #[serde(default)]
    pub message: Option<String>,
}

/// What the agent is about to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    /// Power off.
    Shutdown,
    /// Restart.
    Reboot,
}

/// Result of `shutdown` and `reboot`: sent before the agent acts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerAccepted {
    /// The action scheduled.
    pub action: PowerAction,
    /// Whether it is forced.
    pub force: bool,
    /// Seconds until it happens.
    pub delay_seconds: u32,
}
