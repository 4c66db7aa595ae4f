//! Windows: guest information from Win32 and ntdll calls, under the same
//! names as on Linux. Nothing here runs a program or makes a DNS lookup.
//!
//! - `system`: boot id, OS version, names, uptime, time zone;
//! - `net`: adapters and their counters (GetAdaptersAddresses, GetIfEntry2);
//! - `perf`: CPU times, memory, processes, disks, volumes;
//! - `sessions`: logged-in users (WTS).
//!
//! Exec and power are not done yet: they answer "unsupported".

mod net;
mod perf;
mod sessions;
mod system;
mod wide;

use kvm_agent_protocol::methods::core::OsFamily;

use super::PlatformError;

pub use net::{interfaces, net_counters};
pub use perf::{cpu_times, disk_counters, fs_stats, load_average, memory, mounts, process_count};
pub use sessions::logged_in_users;
pub use system::{boot_id, fqdn, hostname, os_info, timezone, uptime_seconds};

/// This guest's OS family.
pub const OS_FAMILY: OsFamily = OsFamily::Windows;

fn unsupported<T>(what: &'static str) -> Result<T, PlatformError> {
    Err(PlatformError::Unsupported { what })
}

/// The calling thread's last Win32 error, for `call`.
fn last_error(call: &str) -> PlatformError {
    PlatformError::io(call, std::io::Error::last_os_error())
}

/// A Win32 error code returned by `call`.
fn win32_error(call: &str, code: u32) -> PlatformError {
    PlatformError::io(call, std::io::Error::from_raw_os_error(code as i32))
}

/// The kernel's build string (qga's `kernel-version`): none on Windows yet.
pub fn kernel_version() -> Option<String> {
    None
}

/// A failed NTSTATUS from `call` (not a Win32 error code, so no `os_error`).
fn nt_error(call: &str, status: i32) -> PlatformError {
    PlatformError::io(
        call,
        std::io::Error::other(format!("NTSTATUS {:#010x}", status as u32)),
    )
}

/// A user to run a command as (not supported on Windows yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserIds {
    /// Login name.
    pub name: String,
    /// Home directory.
    pub home: String,
}

/// Users cannot be switched on Windows yet.
pub fn lookup_user(_name: &str) -> Result<Option<UserIds>, PlatformError> {
    unsupported("run_as")
}

/// The agent's own user.
pub fn lookup_uid(_uid: u32) -> Option<UserIds> {
    None
}

/// The agent's user id (none on Windows).
pub fn current_uid() -> u32 {
    0
}

/// Process isolation (a job object) comes with the Windows exec support.
pub fn isolate(_cmd: &mut std::process::Command, _user: Option<&UserIds>) {}

/// Signalling process groups is not supported yet.
pub fn signal_group(_pgid: u32, _signal: i32) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Whether a process group still has members.
pub fn group_alive(_pgid: u32) -> bool {
    false
}

/// Terminate, for timeouts.
pub const SIGKILL: i32 = 9;

/// Only termination is possible on Windows.
pub fn signal_number(s: kvm_agent_protocol::methods::exec::Signal) -> Result<i32, PlatformError> {
    match s {
        kvm_agent_protocol::methods::exec::Signal::Kill => Ok(SIGKILL),
        _ => unsupported("signals other than SIGKILL"),
    }
}

/// Exit code (Windows has no terminating signals).
pub fn exit_parts(status: std::process::ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), None)
}

/// The graceful power command (not supported yet).
pub fn power_graceful_command(
    _action: kvm_agent_protocol::methods::power::PowerAction,
    _message: Option<&str>,
) -> Option<Vec<String>> {
    None
}

/// Graceful power off or restart (not supported yet).
pub fn power_graceful(
    _action: kvm_agent_protocol::methods::power::PowerAction,
    _message: Option<&str>,
) -> Result<(), PlatformError> {
    unsupported("shutdown and reboot")
}

/// Forced power off or restart (not supported yet).
pub fn power_forced(
    _action: kvm_agent_protocol::methods::power::PowerAction,
) -> Result<(), PlatformError> {
    unsupported("shutdown and reboot")
}
