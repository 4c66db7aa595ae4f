//! `shutdown` and `reboot`: reply first, then act.
//!
//! The handler only checks `confirm` and answers. The action is scheduled by
//! the dispatcher *after* the request's audit record is written
//! ([`schedule`]), and waits for the connection to report the reply written
//! to the transport (or undeliverable: no id, host gone), then
//! [`SETTLE`] so the bytes leave the guest, then `delay_seconds`; only then
//! does it ask the platform to act. A host therefore always gets its answer
//! before the guest goes down.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_agent_protocol::methods::power::{PowerAccepted, PowerAction, PowerParams};
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde_json::json;
use tokio::sync::oneshot;

use crate::audit::PendingAudit;
use crate::platform::{self, PlatformError};

/// Time between the reply leaving the agent and the action.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for the reply to be written (a host that does not read).
pub const REPLY_WAIT: Duration = Duration::from_secs(30);
/// The environment variable that makes the agent record power actions in a
/// file instead of performing them. Set by the test harnesses of this
/// repository, which run the real agent on the development machine.
pub const DRY_RUN_ENV: &str = "KVA_POWER_DRY_RUN";

/// Why a power request is refused.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// `confirm` was not `true`: nothing happens.
    #[error("{0} needs \"confirm\": true")]
    NotConfirmed(MethodName),
}

impl From<&PowerError> for ErrorObject {
    fn from(e: &PowerError) -> Self {
        match e {
            PowerError::NotConfirmed(m) => ErrorObject::new(ErrorCode::ConfirmationRequired)
                .data(json!({ "method": m.as_str() })),
        }
    }
}

/// What carries out power actions.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Power off or restart now.
    fn act(
        &self,
        action: PowerAction,
        force: bool,
        message: Option<&str>,
    ) -> Result<(), PlatformError>;
}

/// The operating system.
#[derive(Debug)]
struct System;

impl Backend for System {
    fn act(
        &self,
        action: PowerAction,
        force: bool,
        message: Option<&str>,
    ) -> Result<(), PlatformError> {
        if force {
            platform::power_forced(action)
        } else {
            platform::power_graceful(action, message)
        }
    }
}

/// Records actions instead of performing them: in memory, and appended to a
/// file when one is given (one line each: `shutdown force=false`).
#[derive(Debug, Default)]
pub struct Recorder {
    file: Option<PathBuf>,
    /// The actions recorded.
    pub actions: Mutex<Vec<(PowerAction, bool)>>,
}

impl Backend for Recorder {
    fn act(
        &self,
        action: PowerAction,
        force: bool,
        _message: Option<&str>,
    ) -> Result<(), PlatformError> {
        self.actions.lock().unwrap().push((action, force));
        if let Some(path) = &self.file {
            let name = match action {
                PowerAction::Shutdown => "shutdown",
                PowerAction::Reboot => "reboot",
            };
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{name} force={force}"))
                .map_err(|e| PlatformError::io(path.display().to_string(), e))?;
        }
        Ok(())
    }
}

/// The power backend in force.
#[derive(Clone, Debug)]
pub struct PowerControl {
    backend: Arc<dyn Backend>,
}

impl PowerControl {
    /// The operating system, unless [`DRY_RUN_ENV`] names a file to record
    /// to instead. Unit tests of this crate always record in memory.
    pub fn from_env() -> Self {
        if cfg!(test) {
            return Self::with_backend(Arc::new(Recorder::default()));
        }
        match std::env::var_os(DRY_RUN_ENV) {
            Some(file) => {
                log::warn!(
                    "{DRY_RUN_ENV} is set: shutdown and reboot are recorded in {}, not performed",
                    PathBuf::from(&file).display()
                );
                Self::with_backend(Arc::new(Recorder {
                    file: Some(file.into()),
                    actions: Mutex::default(),
                }))
            }
            None => Self::with_backend(Arc::new(System)),
        }
    }

    /// A given backend.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }
}

/// `shutdown` / `reboot`: check `confirm` and answer. Nothing happens here.
pub fn request(
    method: MethodName,
    params: &PowerParams,
    audit: &mut PendingAudit,
) -> Result<PowerAccepted, PowerError> {
    audit.detail("force", params.force);
    audit.detail("delay_seconds", params.delay_seconds);
    if !params.confirm {
        return Err(PowerError::NotConfirmed(method));
    }
    let action = match method {
        MethodName::Reboot => PowerAction::Reboot,
        _ => PowerAction::Shutdown,
    };
    Ok(PowerAccepted {
        action,
        force: params.force,
        delay_seconds: params.delay_seconds,
    })
}

/// Carry out an accepted request: once `written` fires (the reply is on its
/// way, or has nowhere to go) or [`REPLY_WAIT`] passes, wait [`SETTLE`]
/// and the requested delay, then act.
pub fn schedule(
    power: &PowerControl,
    accepted: &PowerAccepted,
    message: Option<String>,
    written: oneshot::Receiver<()>,
) {
    let backend = power.backend.clone();
    let (action, force) = (accepted.action, accepted.force);
    let delay = Duration::from_secs(u64::from(accepted.delay_seconds));
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REPLY_WAIT, written).await;
        tokio::time::sleep(SETTLE + delay).await;
        log::warn!("power: {action:?} (force: {force}) now");
        let result =
            tokio::task::spawn_blocking(move || backend.act(action, force, message.as_deref()))
                .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("power: {action:?} failed: {e}"),
            Err(e) => log::error!("power: {action:?} failed: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acts_only_after_the_reply_is_written() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let recorder = Arc::new(Recorder::default());
        let power = PowerControl::with_backend(recorder.clone());
        let acted = || recorder.actions.lock().unwrap().clone();
        rt.block_on(async {
            let accepted = PowerAccepted {
                action: PowerAction::Reboot,
                force: true,
                delay_seconds: 0,
            };
            let (tx, rx) = oneshot::channel();
            schedule(&power, &accepted, None, rx);
            tokio::time::sleep(SETTLE * 2).await;
            assert!(acted().is_empty(), "acted before the reply was written");
            tx.send(()).unwrap();
            tokio::time::sleep(SETTLE / 2).await;
            assert!(acted().is_empty(), "acted before the settle time");
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !acted().is_empty() {
                    break;
                }
            }
            assert_eq!(acted(), [(PowerAction::Reboot, true)]);
        });
    }

    #[test]
    fn confirm_is_required() {
        let auditor = Arc::new(crate::audit::Auditor::new(Vec::new(), true));
        let origin = crate::audit::Origin::new(&crate::transport::Peer::Unix {
            pid: None,
            uid: None,
        });
        let mut audit = PendingAudit::open(auditor, &origin, Some("shutdown"), None);
        let e = request(
            MethodName::Shutdown,
            &PowerParams {
                force: true,
                ..PowerParams::default()
            },
            &mut audit,
        )
        .unwrap_err();
        let wire = ErrorObject::from(&e);
        assert_eq!(wire.code, -32007);
        assert_eq!(wire.data.unwrap()["method"], "shutdown");
        let ok = request(
            MethodName::Reboot,
            &PowerParams {
                confirm: true,
                delay_seconds: 3,
                ..PowerParams::default()
            },
            &mut audit,
        )
        .unwrap();
        assert_eq!(ok.action, PowerAction::Reboot);
        assert_eq!(ok.delay_seconds, 3);
    }
}
