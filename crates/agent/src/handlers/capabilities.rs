//! `get_capabilities`: what this agent is and what it will do under its
//! current policy.

use kvm_agent_protocol::methods::core::{Capabilities, NoParams};
use kvm_agent_protocol::{MethodName, PROTOCOL_VERSION};

use crate::context::Context;
use crate::dispatch;
use crate::platform;

/// Describe the agent.
pub fn get(ctx: &Context, _params: NoParams) -> Capabilities {
    Capabilities {
        protocol_version: PROTOCOL_VERSION.to_owned(),
        agent_version: crate::AGENT_VERSION.to_owned(),
        os_family: platform::OS_FAMILY,
        methods: MethodName::ALL
            .iter()
            .copied()
            .filter(|m| dispatch::is_implemented(*m) && ctx.policy.check_method(*m).is_ok())
            .map(|m| m.as_str().to_owned())
            .collect(),
        limits: ctx.limits(),
        auth_required: ctx.auth.is_enabled(),
    }
}
