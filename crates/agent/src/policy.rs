//! The local policy: what the host may ask of this guest. Checked once, in
//! the dispatcher, before any handler runs.

pub mod commands;

use kvm_agent_protocol::methods::Call;
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};

use crate::config::Config;
pub use commands::{Allowlist, Grant};

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
    /// A file method's path fails the lexical rules of
    /// `security.allowed_file_paths` ([`crate::files::path`]).
    #[error("{method}: {path:?}: {}", reason.describe())]
    Path {
        /// The method.
        method: MethodName,
        /// The path as given.
        path: String,
        /// Why it is refused.
        reason: crate::files::Reason,
    },
    /// The exec allowlist refuses the command (or its arguments or
    /// environment).
    #[error("{command}: {}", refusal.reason())]
    Command {
        /// `exec` or `exec_start`.
        method: MethodName,
        /// The command as the request named it.
        command: String,
        /// Its arguments, for the audit record.
        args: Vec<String>,
        /// Why.
        refusal: commands::Refusal,
    },
}

impl PolicyError {
    /// For a refused file path: the path and the reason.
    pub fn path_refusal(&self) -> Option<(&str, crate::files::Reason)> {
        match self {
            Self::Path { path, reason, .. } => Some((path, *reason)),
            _ => None,
        }
    }

    fn method(&self) -> MethodName {
        match self {
            Self::MethodDisabled(m) | Self::ExecDisabled(m) | Self::FileCopyDisabled(m) => *m,
            Self::Path { method, .. } => *method,
            Self::Command { method, .. } => *method,
        }
    }

    fn key(&self) -> &'static str {
        match self {
            Self::MethodDisabled(_) => "security.disabled_methods",
            Self::ExecDisabled(_) => "security.enable_exec",
            Self::FileCopyDisabled(_) => "security.enable_file_copy",
            Self::Path { .. } => crate::files::PATH_CONFIG_KEY,
            Self::Command { refusal, .. } => refusal.config_key(),
        }
    }
}

impl PolicyError {
    /// For a refused command: the argument vector asked for (the command as
    /// named, then its arguments), for the audit record.
    pub fn argv(&self) -> Option<Vec<String>> {
        match self {
            Self::Command { command, args, .. } => Some(
                std::iter::once(command.clone())
                    .chain(args.iter().cloned())
                    .collect(),
            ),
            _ => None,
        }
    }
}

impl From<&PolicyError> for ErrorObject {
    fn from(e: &PolicyError) -> Self {
        if let PolicyError::Path {
            method,
            path,
            reason,
        } = e
        {
            return ErrorObject::from(&crate::files::FileError::Refused {
                method: *method,
                path: path.clone(),
                reason: *reason,
            });
        }
        if let PolicyError::Command {
            method,
            command,
            refusal,
            ..
        } = e
        {
            let data = serde_json::json!({
                "method": method.as_str(),
                "config_key": e.key(),
                "command": command,
                "reason": refusal.reason(),
            });
            // A command the allowlist names but this system lacks.
            if *refusal == commands::Refusal::NotFound {
                return ErrorObject::with_message(
                    ErrorCode::NotFound,
                    format!("Not found: command {command}"),
                )
                .data(data);
            }
            return ErrorObject::with_message(ErrorCode::Denied, format!("Denied by policy: {e}"))
                .data(data);
        }
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
    file_roots: Vec<std::path::PathBuf>,
    commands: Allowlist,
}

impl Policy {
    /// The policy a configuration describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            disabled: config.disabled_methods(),
            exec: config.security.enable_exec,
            file_copy: config.security.enable_file_copy,
            file_roots: config.security.allowed_file_paths.clone(),
            commands: Allowlist::from_config(&config.security),
        }
    }

    /// Whether `call` may run.
    pub fn check(&self, call: &Call) -> Result<(), PolicyError> {
        self.check_method(call.method())?;
        self.check_file_path(call)?;
        match call {
            Call::Exec(p) => self
                .check_command(MethodName::Exec, &p.command, &p.args, p.env.keys())
                .map(drop),
            Call::ExecStart(p) => self
                .check_command(MethodName::ExecStart, &p.command, &p.args, p.env.keys())
                .map(drop),
            _ => Ok(()),
        }
    }

    /// Whether the exec allowlist lets `command` run with `args` and a
    /// request environment setting `env`, and how: the path to run and the
    /// user. [`Policy::check`] calls it for `exec` and `exec_start` before
    /// any handler runs; the handler calls it again for the grant, so what
    /// starts is what passed the check at that moment.
    pub fn check_command<'a>(
        &self,
        method: MethodName,
        command: &str,
        args: &[String],
        env: impl IntoIterator<Item = &'a String>,
    ) -> Result<Grant, PolicyError> {
        self.commands
            .check(command, args, env)
            .map_err(|refusal| PolicyError::Command {
                method,
                command: command.to_owned(),
                args: args.to_vec(),
                refusal,
            })
    }

    /// The lexical path rules for the file methods that name a path
    /// (absolute, no NUL, no `..`, inside an allowed directory); what the
    /// path leads to on disk is checked race-free by the handler
    /// ([`crate::files::resolve`]).
    pub fn check_file_path(&self, call: &Call) -> Result<(), PolicyError> {
        let path = match call {
            Call::CopyToGuest(p) => &p.path,
            Call::CopyFromGuest(p) => &p.path,
            Call::FileOpen(p) => &p.path,
            _ => return Ok(()),
        };
        crate::files::path::check(path, &self.file_roots)
            .map(drop)
            .map_err(|reason| PolicyError::Path {
                method: call.method(),
                path: path.clone(),
                reason,
            })
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
