//! `get_users`: login sessions. On Linux, the `USER_PROCESS` records of
//! utmp (/run/utmp, else /var/run/utmp); no utmp file means nobody is
//! logged in, not an error.

use kvm_agent_protocol::methods::core::NoParams;
use kvm_agent_protocol::methods::info::Users;
use kvm_agent_protocol::{ErrorCode, ErrorObject};

use crate::context::Context;
use crate::platform::{self, PlatformError};

/// Why `get_users` failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The session list could not be read: -32003 (-32006 where the platform
    /// has none yet).
    #[error(transparent)]
    Source(#[from] PlatformError),
    /// The worker thread panicked: -32603.
    #[error("the get_users worker failed: {0}")]
    Worker(String),
}

impl From<&UsersError> for ErrorObject {
    fn from(e: &UsersError) -> Self {
        match e {
            UsersError::Source(p) => p.to_error_object(),
            UsersError::Worker(_) => ErrorObject::new(ErrorCode::InternalError)
                .data(serde_json::json!({ "method": "get_users" })),
        }
    }
}

/// List the sessions.
pub async fn get(_ctx: &Context, _params: NoParams) -> Result<Users, UsersError> {
    let users = tokio::task::spawn_blocking(platform::logged_in_users)
        .await
        .map_err(|e| UsersError::Worker(e.to_string()))??;
    Ok(Users { users })
}

/// The sessions recorded in the utmp file at `path` (a missing file is an
/// empty list).
#[cfg(target_os = "linux")]
pub fn list_from(path: &std::path::Path) -> Result<Users, UsersError> {
    Ok(Users {
        users: platform::utmp_users(path)?,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::platform::utmp_record;

    #[test]
    fn list_from_a_written_utmp_file() {
        let dir = std::env::temp_dir().join(format!("kva-utmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("utmp");
        let mut bytes = utmp_record(7, "alice", "pts/3", "2001:db8::7", 1_767_258_843);
        bytes.extend(utmp_record(8, "bob", "pts/4", "", 1_767_258_900));
        std::fs::write(&path, &bytes).unwrap();
        let users = list_from(&path).unwrap().users;
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].user, "alice");
        assert_eq!(users[0].terminal.as_deref(), Some("pts/3"));
        assert_eq!(users[0].host.as_deref(), Some("2001:db8::7"));
        assert_eq!(users[0].login_time, "2026-01-01T09:14:03Z");
        // Missing: empty, not an error.
        assert!(list_from(&dir.join("absent")).unwrap().users.is_empty());
        // Unreadable (a directory): -32003 naming the path.
        let e = list_from(&dir).unwrap_err();
        let wire = ErrorObject::from(&e);
        assert_eq!(wire.kind(), Some(ErrorCode::Io));
        assert_eq!(wire.data.unwrap()["path"], dir.display().to_string());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
