//! Windows. The guest-information sources come in a later change; until
//! then each one answers "unsupported", under the same names as on Linux.

use kvm_agent_protocol::methods::core::OsFamily;
use kvm_agent_protocol::methods::info::{Interface, LoggedInUser, MemoryMetrics, OsInfo, Timezone};

use super::{CpuSample, DiskCounters, FsStats, Mount, NetCounters, PlatformError};

/// This guest's OS family.
pub const OS_FAMILY: OsFamily = OsFamily::Windows;

fn unsupported<T>(what: &'static str) -> Result<T, PlatformError> {
    Err(PlatformError::Unsupported { what })
}

/// Identifies the current boot. Windows has no boot id; until the Windows
/// platform code lands this is empty, which hosts treat as unknown.
pub fn boot_id() -> String {
    String::new()
}

/// Product name, version and build.
pub fn os_info() -> Result<OsInfo, PlatformError> {
    unsupported("os_info")
}

/// The computer name.
/// The kernel's build string: none on Windows yet.
pub fn kernel_version() -> Option<String> {
    None
}

pub fn hostname() -> Result<String, PlatformError> {
    unsupported("hostname")
}

/// The fully qualified name.
pub fn fqdn(_hostname: &str) -> Option<String> {
    None
}

/// Every network adapter.
pub fn interfaces() -> Result<Vec<Interface>, PlatformError> {
    unsupported("interfaces")
}

/// Seconds since boot.
pub fn uptime_seconds() -> Result<f64, PlatformError> {
    unsupported("uptime")
}

/// The time zone.
pub fn timezone() -> Timezone {
    Timezone {
        name: None,
        utc_offset_seconds: 0,
    }
}

/// Cumulative CPU times.
pub fn cpu_times() -> Result<CpuSample, PlatformError> {
    unsupported("cpu_times")
}

/// Memory figures.
pub fn memory() -> Result<MemoryMetrics, PlatformError> {
    unsupported("memory")
}

/// Windows has no load average.
pub fn load_average() -> Result<Option<[f64; 3]>, PlatformError> {
    Ok(None)
}

/// Number of processes.
pub fn process_count() -> Result<u64, PlatformError> {
    unsupported("process_count")
}

/// Disk counters.
pub fn disk_counters() -> Result<Vec<DiskCounters>, PlatformError> {
    unsupported("disk_counters")
}

/// Network counters.
pub fn net_counters() -> Result<Vec<NetCounters>, PlatformError> {
    unsupported("net_counters")
}

/// Mounted volumes.
pub fn mounts() -> Result<Vec<Mount>, PlatformError> {
    unsupported("mounts")
}

/// Sizes of one volume.
pub fn fs_stats(_mount_point: &str) -> Result<FsStats, PlatformError> {
    unsupported("fs_stats")
}

/// Interactive sessions.
pub fn logged_in_users() -> Result<Vec<LoggedInUser>, PlatformError> {
    unsupported("logged_in_users")
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
