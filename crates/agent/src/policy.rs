//! The local policy: what the host may ask of this guest. Checked once, in
//! the dispatcher, before any handler runs.

use kvm_agent_protocol::methods::Call;
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};

use crate::config::Config;

/// Why the policy refuses a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The method is listed in `security.disabled_methods`.
    #[error("{0} is disabled by security.disabled_methods")]
    MethodDisabled(MethodName),
    /// An exec method while `security.enable_exec` is false.
    #[error("{0} is disabled: security.enable_exec is false")]
    ExecDisabled(MethodName),
    /// A file method while `security.enable_file_copy` is false.
    #[error("{0} is disabled: security.enable_file_copy is false")]
    FileCopyDisabled(MethodName),
}

impl PolicyError {
    fn method(&self) -> MethodName {
        match self {
            Self::MethodDisabled(m) | Self::ExecDisabled(m) | Self::FileCopyDisabled(m) => *m,
        }
    }

    fn key(&self) -> &'static str {
        match self {
            Self::MethodDisabled(_) => "security.disabled_methods",
            Self::ExecDisabled(_) => "security.enable_exec",
            Self::FileCopyDisabled(_) => "security.enable_file_copy",
        }
    }
}

impl From<&PolicyError> for ErrorObject {
    fn from(e: &PolicyError) -> Self {
        ErrorObject::with_message(ErrorCode::Denied, format!("Denied by policy: {e}"))
            .data(serde_json::json!({ "method": e.method().as_str(), "config_key": e.key() }))
    }
}

/// The policy in force, derived from the configuration at start-up. No
/// request can change it.
#[derive(Clone, Debug)]
pub struct Policy {
    disabled: Vec<MethodName>,
    exec: bool,
    file_copy: bool,
}

impl Policy {
    /// The policy a configuration describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            disabled: config.disabled_methods(),
            exec: config.security.enable_exec,
            file_copy: config.security.enable_file_copy,
        }
    }

    /// Whether `call` may run.
    pub fn check(&self, call: &Call) -> Result<(), PolicyError> {
        self.check_method(call.method())
    }

    /// Whether `method` may run at all (what `get_capabilities` lists).
    pub fn check_method(&self, method: MethodName) -> Result<(), PolicyError> {
        use MethodName::*;
        if self.disabled.contains(&method) {
            return Err(PolicyError::MethodDisabled(method));
        }
        match method {
            Exec | ExecStart | ExecStatus | ExecKill if !self.exec => {
                Err(PolicyError::ExecDisabled(method))
            }
            CopyToGuest | CopyFromGuest | FileOpen | FileRead | FileWrite | FileClose
                if !self.file_copy =>
            {
                Err(PolicyError::FileCopyDisabled(method))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(text: &str) -> Policy {
        Policy::from_config(&Config::parse(text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn defaults_deny_exec_and_allow_the_rest() {
        let p = policy("");
        for m in MethodName::ALL {
            let exec = m.as_str().starts_with("exec");
            assert_eq!(p.check_method(*m).is_err(), exec, "{m}");
        }
    }

    #[test]
    fn switches_and_disabled_methods() {
        let p = policy("[security]\nenable_exec = true\nenable_file_copy = false\ndisabled_methods = [\"reboot\"]\n");
        assert!(p.check_method(MethodName::Exec).is_ok());
        assert_eq!(
            p.check_method(MethodName::FileRead),
            Err(PolicyError::FileCopyDisabled(MethodName::FileRead))
        );
        assert_eq!(
            p.check_method(MethodName::Reboot),
            Err(PolicyError::MethodDisabled(MethodName::Reboot))
        );
        let wire = ErrorObject::from(&p.check_method(MethodName::Reboot).unwrap_err());
        assert_eq!(wire.kind(), Some(ErrorCode::Denied));
        assert_eq!(
            wire.data.unwrap()["config_key"],
            "security.disabled_methods"
        );
    }
}
