//! Linux: everything is read from /proc, /sys, /etc and a few system calls
//! (uname, getifaddrs, statvfs, localtime_r). Nothing here runs a program or
//! does a name-service lookup: the agent is a static binary.
//!
//! The parsers are pure functions over text or bytes, unit-tested on
//! fixtures; the functions exported here only read the files and call them.

mod guarded;
mod names;
mod net;
mod os_release;
mod power;
mod process;
mod procfs;
mod timezone;
mod utmp;

use std::path::Path;

use kvm_agent_protocol::methods::core::OsFamily;
use kvm_agent_protocol::methods::info::{Interface, LoggedInUser, MemoryMetrics, OsInfo, Timezone};

use super::{CpuSample, DiskCounters, FsStats, Mount, NetCounters, PlatformError};

pub use guarded::{check_guarded, create_private, guard_remedy};
pub use power::{
    forced as power_forced, graceful as power_graceful, graceful_command as power_graceful_command,
};
pub use process::{
    current_uid, exit_parts, isolate, lookup_uid, lookup_user, signal_number, ProcessTree, UserIds,
    SIGKILL,
};
#[cfg(test)]
pub use utmp::record as utmp_record;
pub use utmp::{parse_utmp, UTMP_RECORD_LEN};

/// This guest's OS family.
pub const OS_FAMILY: OsFamily = OsFamily::Linux;

/// Where the session list is, in order of preference.
pub const UTMP_PATHS: [&str; 2] = ["/run/utmp", "/var/run/utmp"];

fn read(path: &str) -> Result<String, PlatformError> {
    std::fs::read_to_string(path).map_err(|e| PlatformError::io(path, e))
}

/// Identifies the current boot; the kernel makes a new one at every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| {
            log::warn!("cannot read the boot id: {e}");
            String::new()
        })
}

/// Distribution (os-release; missing files leave the fields null), kernel
/// release and machine architecture.
pub fn os_info() -> Result<OsInfo, PlatformError> {
    let text = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let release = os_release::parse(&text);
    let uts = names::uname()?;
    Ok(OsInfo {
        family: OS_FAMILY,
        name: release.get("NAME"),
        version: release.get("VERSION"),
        id: release.get("ID"),
        version_id: release.get("VERSION_ID"),
        pretty_name: release.get("PRETTY_NAME"),
        kernel_release: uts.release,
        machine: uts.machine,
    })
}

/// The host name (the kernel's node name).
/// The kernel's build string (uname's `version`: `#1 SMP PREEMPT_DYNAMIC ...`).
pub fn kernel_version() -> Option<String> {
    names::uname().ok().map(|u| u.version)
}

pub fn hostname() -> Result<String, PlatformError> {
    Ok(names::uname()?.nodename)
}

/// The fully qualified name, from /etc/hostname and /etc/hosts only.
pub fn fqdn(hostname: &str) -> Option<String> {
    let etc_hostname = std::fs::read_to_string("/etc/hostname").ok();
    let hosts = std::fs::read_to_string("/etc/hosts").ok();
    names::fqdn_from(hostname, etc_hostname.as_deref(), hosts.as_deref())
}

/// Every network interface, in kernel index order, unfiltered.
pub fn interfaces() -> Result<Vec<Interface>, PlatformError> {
    net::interfaces()
}

/// Seconds since boot.
pub fn uptime_seconds() -> Result<f64, PlatformError> {
    const PATH: &str = "/proc/uptime";
    procfs::parse_uptime(&read(PATH)?).ok_or_else(|| PlatformError::Malformed {
        source_name: PATH.into(),
        problem: "no uptime figure".into(),
    })
}

/// The time zone's name and current offset.
pub fn timezone() -> Timezone {
    timezone::current()
}

/// Cumulative CPU times from /proc/stat.
pub fn cpu_times() -> Result<CpuSample, PlatformError> {
    const PATH: &str = "/proc/stat";
    procfs::parse_stat(&read(PATH)?).ok_or_else(|| PlatformError::Malformed {
        source_name: PATH.into(),
        problem: "no aggregate cpu line".into(),
    })
}

/// Memory and swap from /proc/meminfo.
pub fn memory() -> Result<MemoryMetrics, PlatformError> {
    const PATH: &str = "/proc/meminfo";
    procfs::parse_meminfo(&read(PATH)?).ok_or_else(|| PlatformError::Malformed {
        source_name: PATH.into(),
        problem: "no MemTotal line".into(),
    })
}

/// 1, 5 and 15 minute load averages.
pub fn load_average() -> Result<Option<[f64; 3]>, PlatformError> {
    Ok(procfs::parse_loadavg(&read("/proc/loadavg")?))
}

/// Number of processes: the numeric directories of /proc.
pub fn process_count() -> Result<u64, PlatformError> {
    let dir = std::fs::read_dir("/proc").map_err(|e| PlatformError::io("/proc", e))?;
    Ok(dir
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
        .count() as u64)
}

/// Block device counters from /proc/diskstats (see [`procfs::parse_diskstats`]
/// for which devices are left out).
pub fn disk_counters() -> Result<Vec<DiskCounters>, PlatformError> {
    Ok(procfs::parse_diskstats(&read("/proc/diskstats")?))
}

/// Interface counters from /proc/net/dev.
pub fn net_counters() -> Result<Vec<NetCounters>, PlatformError> {
    Ok(procfs::parse_net_dev(&read("/proc/net/dev")?))
}

/// Mounted filesystems from /proc/self/mountinfo, classified with
/// /proc/filesystems.
pub fn mounts() -> Result<Vec<Mount>, PlatformError> {
    let filesystems = read("/proc/filesystems")?;
    let nodev = procfs::parse_nodev_types(&filesystems);
    Ok(procfs::parse_mountinfo(
        &read("/proc/self/mountinfo")?,
        &nodev,
    ))
}

/// statvfs(3) of one mount point. May block for as long as the filesystem
/// does (a hung NFS server): call it on a blocking thread.
pub fn fs_stats(mount_point: &str) -> Result<FsStats, PlatformError> {
    let path = std::ffi::CString::new(mount_point).map_err(|_| PlatformError::Malformed {
        source_name: mount_point.into(),
        problem: "mount point holds a NUL byte".into(),
    })?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(PlatformError::io(
            mount_point,
            std::io::Error::last_os_error(),
        ));
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    Ok(FsStats {
        total_bytes: total,
        used_bytes: total.saturating_sub(free),
        available_bytes: st.f_bavail as u64 * frsize,
        total_inodes: st.f_files as u64,
        used_inodes: (st.f_files as u64).saturating_sub(st.f_ffree as u64),
        free_inodes: st.f_ffree as u64,
    })
}

/// Login sessions from the first utmp file that exists; none when there is
/// no utmp file at all.
pub fn logged_in_users() -> Result<Vec<LoggedInUser>, PlatformError> {
    match UTMP_PATHS.iter().map(Path::new).find(|p| p.exists()) {
        Some(path) => utmp_users(path),
        None => Ok(Vec::new()),
    }
}

/// Login sessions from the utmp file at `path`; a missing file is an empty list.
pub fn utmp_users(path: &Path) -> Result<Vec<LoggedInUser>, PlatformError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(parse_utmp(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(PlatformError::io(path.display().to_string(), e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_id_is_a_uuid() {
        let id = super::boot_id();
        assert_eq!(id.len(), 36, "{id:?}");
        assert_eq!(id.matches('-').count(), 4, "{id:?}");
    }

    #[test]
    fn live_sources_read() {
        assert!(super::cpu_times().unwrap().total.total > 0);
        assert!(super::memory().unwrap().total_bytes > 0);
        assert!(super::uptime_seconds().unwrap() > 0.0);
        assert!(super::process_count().unwrap() > 0);
        assert!(!super::hostname().unwrap().is_empty());
        let root = super::fs_stats("/").unwrap();
        assert!(root.total_bytes >= root.used_bytes);
    }
}
