//! Windows: guest information from Win32 and ntdll calls, under the same
//! names as on Linux. Nothing here runs a program or makes a DNS lookup.
//!
//! - `system`: boot id, OS version, names, uptime, time zone;
//! - `net`: adapters and their counters (GetAdaptersAddresses, GetIfEntry2);
//! - `perf`: CPU times, memory, processes, disks, volumes;
//! - `sessions`: logged-in users (WTS);
//! - `process`: exec's commands, each in a job object of its own;
//! - `power`: shutdown and restart (InitiateShutdownW).
//! - `acl`: owners and DACLs: who else may read or change a file.

pub mod acl;
mod net;
mod perf;
mod power;
mod process;
mod sessions;
mod system;
mod wide;

use kvm_agent_protocol::methods::core::OsFamily;

use super::PlatformError;

pub use acl::{check_guarded, create_private, guard_remedy};
pub use net::{interfaces, net_counters};
pub use perf::{cpu_times, disk_counters, fs_stats, load_average, memory, mounts, process_count};
pub use power::{
    forced as power_forced, graceful as power_graceful, graceful_command as power_graceful_command,
};
#[cfg(test)]
pub(crate) use process::test_support;
pub use process::{
    current_uid, exit_parts, isolate, lookup_uid, lookup_user, signal_number, ProcessTree, UserIds,
    KILLED_EXIT_CODE, SIGKILL,
};
pub use sessions::logged_in_users;
pub use system::{boot_id, fqdn, hostname, kernel_version, os_info, timezone, uptime_seconds};

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

/// A failed NTSTATUS from `call` (not a Win32 error code, so no `os_error`).
fn nt_error(call: &str, status: i32) -> PlatformError {
    PlatformError::io(
        call,
        std::io::Error::other(format!("NTSTATUS {:#010x}", status as u32)),
    )
}
