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
