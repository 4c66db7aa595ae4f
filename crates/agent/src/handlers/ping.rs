//! `ping`: proves the agent is alive and reading.

use kvm_agent_protocol::methods::core::{Empty, NoParams};

/// Answer a ping.
pub fn ping(_params: NoParams) -> Empty {
    Empty {}
}
