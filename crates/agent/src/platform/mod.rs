//! Operating-system specifics, behind one set of names.
//!
//! `linux/` and `windows.rs` export the same functions; callers use
//! `platform::x` and never mention the platform. The raw figures they return
//! (counters, mounts) are defined here, once, for both.
//!
//! | function | what |
//! |---|---|
//! | `boot_id()` | this boot's id |
//! | `os_info()` | distribution, kernel release, architecture |
//! | `kernel_version()` | the kernel's build string (uname's version) |
//! | `hostname()`, `fqdn(hostname)` | names, without DNS |
//! | `interfaces()` | every interface with MAC, MTU, flags, addresses (unfiltered) |
//! | `uptime_seconds()` | seconds since boot |
//! | `timezone()` | zone name and current UTC offset |
//! | `cpu_times()` | cumulative CPU time, total and per CPU |
//! | `memory()` | memory and swap figures |
//! | `load_average()`, `process_count()` | scheduler figures |
//! | `disk_counters()`, `net_counters()` | cumulative I/O counters |
//! | `mounts()`, `fs_stats(path)` | mounted filesystems and their sizes (`fs_stats` may block) |
//! | `logged_in_users()` | login sessions |
//! | `isolate(cmd)`, `ProcessTree::adopt(child)` | exec's commands: a process group (Linux) or a job object (Windows), ended as a whole |
//! | `power_graceful()`, `power_forced()` | shutdown and restart |
//! | `check_guarded(path, guard)`, `guard_remedy(guard, path)`, `create_private(path, bytes)` | a file that steers the agent (configuration, keys) is safe from other accounts |

use std::fmt;

mod time;
pub use time::rfc3339_utc;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;

/// Why a platform source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A file or system call failed.
    #[error("{source_name}: {error}")]
    Io {
        /// The file read (`/proc/stat`) or the call made (`getifaddrs`).
        source_name: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file was read but its content makes no sense.
    #[error("{source_name}: {problem}")]
    Malformed {
        /// The file.
        source_name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// This platform has no such source (yet).
    #[error("{what} is not supported on this platform")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
}

impl PlatformError {
    /// An I/O error on `source_name`.
    pub fn io(source_name: impl Into<String>, error: std::io::Error) -> Self {
        Self::Io {
            source_name: source_name.into(),
            error,
        }
    }

    /// The error as wire data: `{"path","os_error","detail"}` (or `{"reason"}`).
    pub fn wire_data(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::Io { source_name, error } => json!({
                "path": source_name,
                "os_error": error.raw_os_error(),
                "detail": error.to_string(),
            }),
            Self::Malformed {
                source_name,
                problem,
            } => json!({ "path": source_name, "detail": problem }),
            Self::Unsupported { what } => json!({ "reason": format!("{what} is not supported") }),
        }
    }

    /// The wire error for this failure.
    pub fn to_error_object(&self) -> kvm_agent_protocol::ErrorObject {
        use kvm_agent_protocol::{ErrorCode, ErrorObject};
        let code = match self {
            Self::Io { .. } | Self::Malformed { .. } => ErrorCode::Io,
            Self::Unsupported { .. } => ErrorCode::Unsupported,
        };
        ErrorObject::with_message(code, format!("{}: {self}", code.default_message()))
            .data(self.wire_data())
    }
}

/// What nobody but the administrators (root; SYSTEM, Administrators and
/// TrustedInstaller on Windows) and the agent's own account may do to a file
/// that steers the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// Change it: the configuration decides what hosts may do.
    Change,
    /// Read or change it: a key file (and it must be a regular file).
    ReadOrChange,
}

/// Why [`check_guarded`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Its metadata or security information could not be read.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// Someone else could read or change it: what is wrong, as a phrase
    /// that follows "it" ("is owned by uid 1000").
    #[error("it {0}")]
    Insecure(String),
}

/// Cumulative CPU time of one CPU or of all, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Time doing work: user, nice, system, irq, softirq, steal.
    pub busy: u64,
    /// Busy plus idle and iowait.
    pub total: u64,
}

/// CPU times, total and per online CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSample {
    /// All CPUs together (over all possible CPUs, so it keeps counting
    /// across hot-plug).
    pub total: CpuTimes,
    /// Each online CPU, by number, in increasing order.
    pub per_cpu: Vec<(u32, CpuTimes)>,
}

/// Cumulative counters of one block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskCounters {
    /// Device name (`vda`, `vda1`).
    pub name: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Reads completed.
    pub read_ops: u64,
    /// Writes completed.
    pub write_ops: u64,
}

/// Cumulative counters of one network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Interface name.
    pub name: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Send errors.
    pub tx_errors: u64,
    /// Outgoing packets dropped.
    pub tx_dropped: u64,
}

/// What kind of filesystem a mount is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    /// Stored on a local block device (or a local pool such as ZFS).
    Local,
    /// Served over the network or by the hypervisor (NFS, CIFS, 9p,
    /// virtiofs...): may hang, so only statted with a deadline.
    Network,
    /// Pseudo or memory filesystems (proc, sysfs, cgroup, tmpfs, overlay...).
    Pseudo,
}

/// One mounted filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted, unescaped.
    pub mount_point: String,
    /// Filesystem type (`ext4`, `nfs4`, `fuse.sshfs`).
    pub fs_type: String,
    /// Source device, unescaped.
    pub device: String,
    /// Its kind.
    pub kind: FsKind,
}

/// Sizes of one filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Size in bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Inodes in all.
    pub total_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
    /// Inodes free.
    pub free_inodes: u64,
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsKind::Local => "local",
            FsKind::Network => "network",
            FsKind::Pseudo => "pseudo",
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::{check_guarded, Guard, GuardError};

    /// What [`check_guarded`] says of a directory and of a missing file, on
    /// either platform.
    pub fn directories_and_absent_files_are_refused(dir: &Path) {
        assert!(matches!(
            check_guarded(dir, Guard::ReadOrChange),
            Err(GuardError::Insecure(p)) if p == "is not a regular file"
        ));
        assert!(matches!(
            check_guarded(&dir.join("absent"), Guard::Change),
            Err(GuardError::Read(_))
        ));
    }
}
