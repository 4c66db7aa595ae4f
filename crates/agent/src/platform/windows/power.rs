//! Power off and restart: enable the shutdown privilege in the agent's own
//! token (a service running as LocalSystem holds it, disabled), then
//! InitiateShutdownW with a planned-shutdown reason.
//!
//! - graceful: SHUTDOWN_POWEROFF or SHUTDOWN_RESTART, a grace period of
//!   [`GRACE_SECONDS`] during which logged-in users see the message, and
//!   applications may refuse to close (the request then fails later, as
//!   with `shutdown /s`);
//! - forced: the same plus SHUTDOWN_FORCE_OTHERS | SHUTDOWN_FORCE_SELF
//!   (applications are closed without asking), no grace period.
//!
//! The flags are pure functions, unit-tested; the real call is never made by
//! the tests (the power handler records actions in tests and under
//! `KVA_POWER_DRY_RUN`).

use kvm_agent_protocol::methods::power::PowerAction;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use windows_sys::Win32::Foundation::{GetLastError, ERROR_NOT_ALL_ASSIGNED, HANDLE, LUID};
use windows_sys::Win32::Security::{
    AdjustTokenPrivileges, LookupPrivilegeValueW, LUID_AND_ATTRIBUTES, SE_PRIVILEGE_ENABLED,
    SE_SHUTDOWN_NAME, TOKEN_ADJUST_PRIVILEGES, TOKEN_PRIVILEGES, TOKEN_QUERY,
};
use windows_sys::Win32::System::Shutdown::{
    InitiateShutdownW, SHTDN_REASON_FLAG_PLANNED, SHTDN_REASON_MAJOR_OTHER,
    SHTDN_REASON_MINOR_OTHER, SHUTDOWN_FORCE_OTHERS, SHUTDOWN_FORCE_SELF, SHUTDOWN_POWEROFF,
    SHUTDOWN_RESTART,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

use super::super::PlatformError;
use super::wide::to_wide;

/// Seconds a graceful shutdown waits, showing its message, before it acts.
pub const GRACE_SECONDS: u32 = 5;

/// The reason recorded in the system event log: planned, "other".
pub const REASON: u32 =
    SHTDN_REASON_FLAG_PLANNED | SHTDN_REASON_MAJOR_OTHER | SHTDN_REASON_MINOR_OTHER;

/// What is shown to logged-in users when the host gives no message.
pub const DEFAULT_MESSAGE: &str = "Shutdown requested by the host (kvm-manager-agent)";

/// InitiateShutdownW's flags for `action`.
pub fn shutdown_flags(action: PowerAction, force: bool) -> u32 {
    let base = match action {
        PowerAction::Shutdown => SHUTDOWN_POWEROFF,
        PowerAction::Reboot => SHUTDOWN_RESTART,
    };
    if force {
        base | SHUTDOWN_FORCE_OTHERS | SHUTDOWN_FORCE_SELF
    } else {
        base
    }
}

/// InitiateShutdownW's grace period.
pub fn grace_period(force: bool) -> u32 {
    if force {
        0
    } else {
        GRACE_SECONDS
    }
}

/// There is no command on Windows: power goes through InitiateShutdownW.
pub fn graceful_command(_action: PowerAction, _message: Option<&str>) -> Option<Vec<String>> {
    None
}

/// Graceful power off or restart.
pub fn graceful(action: PowerAction, message: Option<&str>) -> Result<(), PlatformError> {
    initiate(action, false, message)
}

/// Forced power off or restart.
pub fn forced(action: PowerAction) -> Result<(), PlatformError> {
    initiate(action, true, None)
}

fn initiate(action: PowerAction, force: bool, message: Option<&str>) -> Result<(), PlatformError> {
    enable_shutdown_privilege()?;
    let flags = shutdown_flags(action, force);
    let grace = grace_period(force);
    log::warn!("power: InitiateShutdownW flags {flags:#x}, grace {grace} s");
    let message = to_wide(message.unwrap_or(DEFAULT_MESSAGE));
    // SAFETY: null machine name (this one); `message` is a NUL-terminated
    // UTF-16 string that outlives the call.
    let code =
        unsafe { InitiateShutdownW(std::ptr::null(), message.as_ptr(), grace, flags, REASON) };
    if code != 0 {
        return Err(super::win32_error("InitiateShutdownW", code));
    }
    Ok(())
}

/// Enable SeShutdownPrivilege in the agent's process token. Fails with
/// ERROR_NOT_ALL_ASSIGNED when the token does not hold it at all.
pub fn enable_shutdown_privilege() -> Result<(), PlatformError> {
    let mut raw: HANDLE = std::ptr::null_mut();
    // SAFETY: the pseudo handle of this process; `raw` is writable.
    if unsafe {
        OpenProcessToken(
            GetCurrentProcess(),
            TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY,
            &mut raw,
        )
    } == 0
    {
        return Err(super::last_error("OpenProcessToken"));
    }
    // SAFETY: a new handle owned by nobody else.
    let token = unsafe { OwnedHandle::from_raw_handle(raw as RawHandle) };
    let mut luid = LUID::default();
    // SAFETY: SE_SHUTDOWN_NAME is a static NUL-terminated string; `luid` is
    // writable.
    if unsafe { LookupPrivilegeValueW(std::ptr::null(), SE_SHUTDOWN_NAME, &mut luid) } == 0 {
        return Err(super::last_error("LookupPrivilegeValueW"));
    }
    let state = TOKEN_PRIVILEGES {
        PrivilegeCount: 1,
        Privileges: [LUID_AND_ATTRIBUTES {
            Luid: luid,
            Attributes: SE_PRIVILEGE_ENABLED,
        }],
    };
    // SAFETY: the token is open with TOKEN_ADJUST_PRIVILEGES; `state` is a
    // valid one-entry list; no previous state is asked for.
    let ok = unsafe {
        AdjustTokenPrivileges(
            token.as_raw_handle() as HANDLE,
            0,
            &state,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    // AdjustTokenPrivileges succeeds even when it enabled nothing: the
    // last error tells.
    // SAFETY: GetLastError has no preconditions.
    let last = unsafe { GetLastError() };
    if ok == 0 {
        return Err(super::win32_error("AdjustTokenPrivileges", last));
    }
    if last == ERROR_NOT_ALL_ASSIGNED {
        return Err(super::win32_error(
            "AdjustTokenPrivileges (SeShutdownPrivilege)",
            last,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use windows_sys::Win32::Security::{GetTokenInformation, TokenPrivileges};

    #[test]
    fn flags_per_action_and_force() {
        assert_eq!(shutdown_flags(PowerAction::Shutdown, false), 0x8);
        assert_eq!(shutdown_flags(PowerAction::Reboot, false), 0x4);
        assert_eq!(shutdown_flags(PowerAction::Shutdown, true), 0x8 | 0x1 | 0x2);
        assert_eq!(shutdown_flags(PowerAction::Reboot, true), 0x4 | 0x1 | 0x2);
        assert_eq!(grace_period(false), GRACE_SECONDS);
        assert_eq!(grace_period(true), 0);
        // Planned, major and minor "other": the highest bit only.
        assert_eq!(REASON, 0x8000_0000);
        assert_eq!(graceful_command(PowerAction::Shutdown, Some("x")), None);
    }

    /// Whether SeShutdownPrivilege is enabled in this process's token.
    fn shutdown_privilege_enabled() -> bool {
        let mut raw: HANDLE = std::ptr::null_mut();
        // SAFETY: as in enable_shutdown_privilege.
        assert_ne!(
            unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut raw) },
            0
        );
        // SAFETY: a new handle owned by nobody else.
        let token = unsafe { OwnedHandle::from_raw_handle(raw as RawHandle) };
        let mut luid = LUID::default();
        // SAFETY: as in enable_shutdown_privilege.
        assert_ne!(
            unsafe { LookupPrivilegeValueW(std::ptr::null(), SE_SHUTDOWN_NAME, &mut luid) },
            0
        );
        let mut buf = vec![0u64; 512];
        let mut len = 0u32;
        // SAFETY: `buf` is writable for the size given and 8-byte aligned.
        assert_ne!(
            unsafe {
                GetTokenInformation(
                    token.as_raw_handle() as HANDLE,
                    TokenPrivileges,
                    buf.as_mut_ptr().cast(),
                    (buf.len() * 8) as u32,
                    &mut len,
                )
            },
            0
        );
        let list = buf.as_ptr().cast::<TOKEN_PRIVILEGES>();
        // SAFETY: GetTokenInformation wrote a TOKEN_PRIVILEGES with
        // PrivilegeCount entries into `buf`.
        let entries = unsafe {
            std::slice::from_raw_parts(
                (&raw const (*list).Privileges).cast::<LUID_AND_ATTRIBUTES>(),
                (*list).PrivilegeCount as usize,
            )
        };
        entries.iter().any(|e| {
            e.Luid.LowPart == luid.LowPart
                && e.Luid.HighPart == luid.HighPart
                && e.Attributes & SE_PRIVILEGE_ENABLED != 0
        })
    }

    /// Under Wine the token of a test process holds SeShutdownPrivilege
    /// (as an administrator's does on Windows), disabled: enabling it
    /// succeeds and shows in the token.
    #[test]
    fn the_shutdown_privilege_is_enabled() {
        assert!(!shutdown_privilege_enabled(), "enabled before the call");
        enable_shutdown_privilege().unwrap();
        assert!(shutdown_privilege_enabled());
    }
}
