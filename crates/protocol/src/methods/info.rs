//! `get_info`, `get_metrics` and `get_users`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::core::OsFamily;

/// Params of `get_info`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetInfoParams {
    /// Include interfaces the configured filter hides (container plumbing).
    #[serde(default)]
    pub all_interfaces: bool,
}

/// Result of `get_info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// The operating system.
    pub os: OsInfo,
    /// The host name.
    pub hostname: String,
    /// The fully qualified name, when the guest knows one without DNS.
    pub fqdn: Option<String>,
    /// Network interfaces, filtered unless `all_interfaces` was asked for.
    pub interfaces: Vec<Interface>,
    /// Identifies the current boot; changes on every reboot.
    pub boot_id: String,
    /// Seconds since boot.
    pub uptime_seconds: f64,
    /// The guest's time zone.
    pub timezone: Timezone,
    /// The agent's version.
    pub agent_version: String,
    /// The protocol version, `MAJOR.MINOR`.
    pub protocol_version: String,
}

/// The operating system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    /// `linux` or `windows`.
    pub family: OsFamily,
    /// Distribution or product name (`NAME` of os-release).
    pub name: Option<String>,
    /// Version string (`VERSION`).
    pub version: Option<String>,
    /// Machine-readable distribution id (`ID`).
    pub id: Option<String>,
    /// Machine-readable version (`VERSION_ID`).
    pub version_id: Option<String>,
    /// Human-readable full name (`PRETTY_NAME`).
    pub pretty_name: Option<String>,
    /// Kernel release (`uname -r`), or the Windows build number.
    pub kernel_release: String,
    /// Machine architecture (`uname -m`).
    pub machine: String,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address, lower-case colon-separated hex, when it has one.
    pub mac: Option<String>,
    /// MTU in bytes.
    pub mtu: Option<u32>,
    /// State flags, lower case: `up`, `running`, `loopback`, `broadcast`, `multicast`, ...
    pub flags: Vec<String>,
    /// Every address, IPv4 and IPv6.
    pub addresses: Vec<IpAddress>,
}

/// An address with its prefix length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpAddress {
    /// The address.
    pub address: IpAddr,
    /// Prefix length in bits.
    pub prefix_len: u8,
}

/// The guest's time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timezone {
    /// IANA name (`Europe/Paris`), when known.
    pub name: Option<String>,
    /// Current offset from UTC in seconds, east positive.
    pub utc_offset_seconds: i32,
}

/// Params of `get_metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetMetricsParams {
    /// Also report network filesystems (each statted with a deadline).
    #[serde(default)]
    pub include_network_filesystems: bool,
    /// Include interfaces the configured filter hides, as for `get_info`.
    #[serde(default)]
    pub all_interfaces: bool,
}

/// Result of `get_metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// When the sample was taken, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Milliseconds since the previous sample that rates and CPU usage cover;
    /// null when there was no previous sample.
    pub interval_ms: Option<u64>,
    /// CPU figures.
    pub cpu: CpuMetrics,
    /// Memory figures.
    pub memory: MemoryMetrics,
    /// Block devices.
    pub disks: Vec<DiskMetrics>,
    /// Network interfaces.
    pub network: Vec<NetworkMetrics>,
    /// Mounted filesystems.
    pub filesystems: Vec<FilesystemMetrics>,
}

/// CPU figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuMetrics {
    /// Busy share of all CPUs over `interval_ms`, 0-100; null without a previous sample.
    pub usage_percent: Option<f64>,
    /// The same per CPU.
    pub per_cpu: Vec<CpuUsage>,
    /// 1, 5 and 15 minute load averages (null where the OS has none).
    pub load_average: Option<[f64; 3]>,
    /// Number of processes.
    pub process_count: u64,
}

/// One CPU's usage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuUsage {
    /// CPU number.
    pub cpu: u32,
    /// Busy share over `interval_ms`, 0-100; null without a previous sample.
    pub usage_percent: Option<f64>,
}

/// Memory figures, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMetrics {
    /// Total usable memory.
    pub total_bytes: u64,
    /// Memory available for new work without swapping.
    pub available_bytes: u64,
    /// `total - available`.
    pub used_bytes: u64,
    /// Memory not used at all.
    pub free_bytes: u64,
    /// Buffers and page cache.
    pub cache_bytes: u64,
    /// Swap size.
    pub swap_total_bytes: u64,
    /// Swap in use.
    pub swap_used_bytes: u64,
}

/// One block device: cumulative counters since boot, plus rates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskMetrics {
    /// Device name (`vda`).
    pub name: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read operations completed.
    pub read_ops: u64,
    /// Write operations completed.
    pub write_ops: u64,
    /// Per-second rates over `interval_ms`; null without a previous sample.
    pub rates: Option<DiskRates>,
}

/// Per-second disk rates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskRates {
    /// Bytes read per second.
    pub read_bytes_per_second: f64,
    /// Bytes written per second.
    pub write_bytes_per_second: f64,
    /// Reads per second.
    pub read_ops_per_second: f64,
    /// Writes per second.
    pub write_ops_per_second: f64,
}

/// One network interface: cumulative counters since boot, plus rates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkMetrics {
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
    /// Per-second rates over `interval_ms`; null without a previous sample.
    pub rates: Option<NetworkRates>,
}

/// Per-second network rates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkRates {
    /// Bytes received per second.
    pub rx_bytes_per_second: f64,
    /// Bytes sent per second.
    pub tx_bytes_per_second: f64,
    /// Packets received per second.
    pub rx_packets_per_second: f64,
    /// Packets sent per second.
    pub tx_packets_per_second: f64,
}

/// One mounted filesystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemMetrics {
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type (`ext4`).
    pub fs_type: String,
    /// Source device.
    pub device: String,
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

/// Result of `get_users`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Users {
    /// One entry per login session.
    pub users: Vec<LoggedInUser>,
}

/// One login session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedInUser {
    /// User name.
    pub user: String,
    /// Terminal or session name (`tty1`, `pts/0`).
    pub terminal: Option<String>,
    /// Where the user logged in from, for remote sessions.
    pub host: Option<String>,
    /// Login time, RFC 3339 in UTC.
    pub login_time: String,
    /// Login time, seconds since the Unix epoch.
    pub login_time_epoch: i64,
}
