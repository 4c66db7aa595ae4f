//! `get_metrics`: CPU, memory, disk, network and filesystem figures.
//!
//! **The window.** The agent keeps one previous sample, agent-wide (not per
//! connection). It takes one at start-up; each `get_metrics` takes a new
//! one, computes CPU usage and disk and network rates over the interval
//! since the previous one (`interval_ms`), and keeps the new one as the next
//! call's baseline. So the first call after start-up covers the time since
//! start-up, and two hosts polling the same agent shorten each other's
//! windows. A figure is null only when it cannot be computed honestly: no
//! baseline (the start-up sample failed), a CPU or device that was not in
//! the previous sample (hot-plugged), a counter that went backwards (a
//! device re-created under the same name), or no clock tick in between (CPU
//! usage over less than one tick). It is never a made-up 0 %.
//!
//! **Filesystems.** Local filesystems (block-backed, and ZFS) are always
//! reported; pseudo and memory filesystems (proc, sysfs, cgroup, tmpfs,
//! devtmpfs, overlay...) never; network filesystems (NFS, CIFS, 9p,
//! virtiofs, sshfs...) only with `include_network_filesystems`. Each statvfs
//! runs on a blocking thread and is awaited until `[info]
//! network_filesystem_timeout_ms` (the same deadline for local ones: a dead
//! iSCSI disk hangs too); a filesystem that does not answer in time is left
//! out and logged. Its thread is abandoned, and no new statvfs is started
//! on that mount point while the old one is still stuck, so a hung server
//! costs one thread, not one per call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_agent_protocol::methods::info::{
    CpuMetrics, CpuUsage, DiskMetrics, DiskRates, FilesystemMetrics, GetMetricsParams, Metrics,
    NetworkMetrics, NetworkRates,
};
use kvm_agent_protocol::{ErrorCode, ErrorObject};

use crate::context::Context;
use crate::platform::{
    self, CpuSample, CpuTimes, DiskCounters, FsKind, Mount, NetCounters, PlatformError,
};

/// Why `get_metrics` failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A source could not be read: -32003 (-32006 where the platform has none).
    #[error(transparent)]
    Source(#[from] PlatformError),
    /// The worker thread panicked: -32603.
    #[error("the get_metrics worker failed: {0}")]
    Worker(String),
}

impl From<&MetricsError> for ErrorObject {
    fn from(e: &MetricsError) -> Self {
        match e {
            MetricsError::Source(p) => p.to_error_object(),
            MetricsError::Worker(_) => ErrorObject::new(ErrorCode::InternalError)
                .data(serde_json::json!({ "method": "get_metrics" })),
        }
    }
}

/// The counters rates are computed from.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// CPU times.
    pub cpu: CpuSample,
    /// Disk counters by name.
    pub disks: HashMap<String, DiskCounters>,
    /// Interface counters by name.
    pub net: HashMap<String, NetCounters>,
}

/// The agent-wide metrics state, in [`Context`].
#[derive(Debug, Default)]
pub struct MetricsState {
    previous: Mutex<Option<Sample>>,
    /// Mount points whose statvfs has not returned yet.
    pending_statvfs: Arc<Mutex<HashSet<String>>>,
}

impl MetricsState {
    /// The state with a start-up baseline (none if it cannot be read: then
    /// the first call has null rates).
    pub fn with_baseline() -> Self {
        let baseline = take_counters().map(|(s, _)| s);
        if let Err(e) = &baseline {
            log::warn!("no start-up metrics baseline: {e}");
        }
        Self {
            previous: Mutex::new(baseline.ok()),
            pending_statvfs: Arc::default(),
        }
    }

    /// Keep `now` as the baseline and return the previous one.
    fn replace(&self, now: Sample) -> Option<Sample> {
        let mut slot = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        slot.replace(now)
    }
}

/// Everything read from the system for one call.
struct Readings {
    sample: Sample,
    timestamp_ms: u64,
    memory: kvm_agent_protocol::methods::info::MemoryMetrics,
    load_average: Option<[f64; 3]>,
    process_count: u64,
    mounts: Vec<Mount>,
}

/// Read the counters rates are computed from, with the wall-clock time.
fn take_counters() -> Result<(Sample, u64), PlatformError> {
    let cpu = platform::cpu_times()?;
    let disks = platform::disk_counters()?;
    let net = platform::net_counters()?;
    let at = Instant::now();
    let timestamp_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let sample = Sample {
        at,
        cpu,
        disks: disks.into_iter().map(|d| (d.name.clone(), d)).collect(),
        net: net.into_iter().map(|n| (n.name.clone(), n)).collect(),
    };
    Ok((sample, timestamp_ms))
}

fn read_all() -> Result<Readings, PlatformError> {
    let (sample, timestamp_ms) = take_counters()?;
    Ok(Readings {
        sample,
        timestamp_ms,
        memory: platform::memory()?,
        load_average: platform::load_average()?,
        process_count: platform::process_count()?,
        mounts: platform::mounts()?,
    })
}

/// Take a sample and report it against the previous one.
pub async fn get(ctx: &Context, params: GetMetricsParams) -> Result<Metrics, MetricsError> {
    let readings = tokio::task::spawn_blocking(read_all)
        .await
        .map_err(|e| MetricsError::Worker(e.to_string()))??;
    let previous = ctx.metrics.replace(readings.sample.clone());
    let mut c = compare(previous.as_ref(), &readings.sample);
    c.cpu.load_average = readings.load_average;
    c.cpu.process_count = readings.process_count;
    let info = &ctx.config.info;
    if !params.all_interfaces {
        c.network.retain(|n| !info.hides_interface(&n.name));
    }
    let wanted = select_mounts(readings.mounts, params.include_network_filesystems);
    let deadline = Duration::from_millis(info.network_filesystem_timeout_ms);
    Ok(Metrics {
        timestamp_ms: readings.timestamp_ms,
        interval_ms: c.interval_ms,
        cpu: c.cpu,
        memory: readings.memory,
        disks: c.disks,
        network: c.network,
        filesystems: stat_filesystems(&ctx.metrics, wanted, deadline).await,
    })
}

/// The figures computed from two samples.
#[derive(Debug)]
pub struct Compared {
    /// Milliseconds between the samples; None without a previous one.
    pub interval_ms: Option<u64>,
    /// CPU usage (load average and process count left empty).
    pub cpu: CpuMetrics,
    /// Disks, by name.
    pub disks: Vec<DiskMetrics>,
    /// Interfaces, by name.
    pub network: Vec<NetworkMetrics>,
}

/// The mounts to report: local ones, and network ones when asked; for a
/// mount point mounted over, only the last (visible) mount.
pub fn select_mounts(mounts: Vec<Mount>, include_network: bool) -> Vec<Mount> {
    let keep = |m: &Mount| match m.kind {
        FsKind::Local => true,
        FsKind::Network => include_network,
        FsKind::Pseudo => false,
    };
    let last: HashMap<&str, usize> = mounts
        .iter()
        .enumerate()
        .map(|(i, m)| (m.mount_point.as_str(), i))
        .collect();
    let visible: HashSet<usize> = last.into_values().collect();
    mounts
        .into_iter()
        .enumerate()
        .filter(|(i, m)| visible.contains(i) && keep(m))
        .map(|(_, m)| m)
        .collect()
}

/// statvfs each mount on its own blocking thread, waiting at most
/// `deadline` for all of them together.
async fn stat_filesystems(
    state: &MetricsState,
    mounts: Vec<Mount>,
    deadline: Duration,
) -> Vec<FilesystemMetrics> {
    let until = tokio::time::Instant::now() + deadline;
    let mut jobs = Vec::new();
    for m in mounts {
        {
            let mut pending = state
                .pending_statvfs
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !pending.insert(m.mount_point.clone()) {
                log::warn!(
                    "{} ({}) left out: its previous statvfs has not returned",
                    m.mount_point,
                    m.fs_type
                );
                continue;
            }
        }
        let pending = state.pending_statvfs.clone();
        let path = m.mount_point.clone();
        let job = tokio::task::spawn_blocking(move || {
            let r = platform::fs_stats(&path);
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&path);
            r
        });
        jobs.push((m, job));
    }
    let mut out = Vec::with_capacity(jobs.len());
    for (m, job) in jobs {
        match tokio::time::timeout_at(until, job).await {
            Ok(Ok(Ok(s))) => out.push(FilesystemMetrics {
                mount_point: m.mount_point,
                fs_type: m.fs_type,
                device: m.device,
                total_bytes: s.total_bytes,
                used_bytes: s.used_bytes,
                available_bytes: s.available_bytes,
                total_inodes: s.total_inodes,
                used_inodes: s.used_inodes,
                free_inodes: s.free_inodes,
            }),
            Ok(Ok(Err(e))) => log::debug!("{} left out: {e}", m.mount_point),
            Ok(Err(e)) => log::warn!("{} left out: statvfs worker failed: {e}", m.mount_point),
            Err(_) => log::warn!(
                "{} ({}) left out: statvfs did not answer within {} ms",
                m.mount_point,
                m.fs_type,
                deadline.as_millis()
            ),
        }
    }
    out
}

/// Busy share between two readings; None when they are not comparable.
fn usage(prev: CpuTimes, now: CpuTimes) -> Option<f64> {
    let total = now.total.checked_sub(prev.total)?;
    let busy = now.busy.checked_sub(prev.busy)?;
    if total == 0 {
        return None;
    }
    let pct = (busy as f64 * 100.0 / total as f64).clamp(0.0, 100.0);
    Some((pct * 100.0).round() / 100.0)
}

/// A per-second rate; None when the counter went backwards.
fn rate(prev: u64, now: u64, secs: f64) -> Option<f64> {
    let d = now.checked_sub(prev)?;
    Some(((d as f64 / secs) * 1000.0).round() / 1000.0)
}

/// CPU, disk and network figures of `now`, with usage and rates against
/// `prev` when there is one.
pub fn compare(prev: Option<&Sample>, now: &Sample) -> Compared {
    let elapsed = prev.map(|p| now.at.saturating_duration_since(p.at));
    // Rates need a non-zero interval.
    let secs = elapsed.map(|d| d.as_secs_f64()).filter(|s| *s > 0.0);
    let prev_cpu: HashMap<u32, CpuTimes> = prev
        .map(|p| p.cpu.per_cpu.iter().copied().collect())
        .unwrap_or_default();
    let cpu = CpuMetrics {
        usage_percent: prev.and_then(|p| usage(p.cpu.total, now.cpu.total)),
        per_cpu: now
            .cpu
            .per_cpu
            .iter()
            .map(|(n, t)| CpuUsage {
                cpu: *n,
                usage_percent: prev_cpu.get(n).and_then(|p| usage(*p, *t)),
            })
            .collect(),
        load_average: None,
        process_count: 0,
    };
    let mut disks: Vec<DiskMetrics> = now
        .disks
        .values()
        .map(|d| {
            let rates = secs
                .zip(prev.and_then(|p| p.disks.get(&d.name)))
                .and_then(|(s, p)| {
                    Some(DiskRates {
                        read_bytes_per_second: rate(p.read_bytes, d.read_bytes, s)?,
                        write_bytes_per_second: rate(p.write_bytes, d.write_bytes, s)?,
                        read_ops_per_second: rate(p.read_ops, d.read_ops, s)?,
                        write_ops_per_second: rate(p.write_ops, d.write_ops, s)?,
                    })
                });
            DiskMetrics {
                name: d.name.clone(),
                read_bytes: d.read_bytes,
                write_bytes: d.write_bytes,
                read_ops: d.read_ops,
                write_ops: d.write_ops,
                rates,
            }
        })
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    let mut network: Vec<NetworkMetrics> = now
        .net
        .values()
        .map(|n| {
            let rates = secs
                .zip(prev.and_then(|p| p.net.get(&n.name)))
                .and_then(|(s, p)| {
                    Some(NetworkRates {
                        rx_bytes_per_second: rate(p.rx_bytes, n.rx_bytes, s)?,
                        tx_bytes_per_second: rate(p.tx_bytes, n.tx_bytes, s)?,
                        rx_packets_per_second: rate(p.rx_packets, n.rx_packets, s)?,
                        tx_packets_per_second: rate(p.tx_packets, n.tx_packets, s)?,
                    })
                });
            NetworkMetrics {
                name: n.name.clone(),
                rx_bytes: n.rx_bytes,
                rx_packets: n.rx_packets,
                rx_errors: n.rx_errors,
                rx_dropped: n.rx_dropped,
                tx_bytes: n.tx_bytes,
                tx_packets: n.tx_packets,
                tx_errors: n.tx_errors,
                tx_dropped: n.tx_dropped,
                rates,
            }
        })
        .collect();
    network.sort_by(|a, b| a.name.cmp(&b.name));
    Compared {
        interval_ms: elapsed.map(|d| d.as_millis() as u64),
        cpu,
        disks,
        network,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(busy: u64, total: u64) -> CpuTimes {
        CpuTimes { busy, total }
    }

    fn sample(at: Instant, cpus: &[(u32, CpuTimes)], disk_read: u64, rx: u64) -> Sample {
        let total = cpus
            .iter()
            .fold(t(0, 0), |a, (_, c)| t(a.busy + c.busy, a.total + c.total));
        Sample {
            at,
            cpu: CpuSample {
                total,
                per_cpu: cpus.to_vec(),
            },
            disks: [(
                "vda".to_owned(),
                DiskCounters {
                    name: "vda".into(),
                    read_bytes: disk_read,
                    write_bytes: 0,
                    read_ops: disk_read / 512,
                    write_ops: 0,
                },
            )]
            .into(),
            net: [(
                "eth0".to_owned(),
                NetCounters {
                    name: "eth0".into(),
                    rx_bytes: rx,
                    ..NetCounters::default()
                },
            )]
            .into(),
        }
    }

    #[test]
    fn no_baseline_means_null_not_zero() {
        let now = sample(Instant::now(), &[(0, t(10, 100))], 0, 0);
        let m = compare(None, &now);
        assert_eq!(m.interval_ms, None);
        assert_eq!(m.cpu.usage_percent, None);
        assert_eq!(m.cpu.per_cpu[0].usage_percent, None);
        assert!(m.disks[0].rates.is_none() && m.network[0].rates.is_none());
    }

    #[test]
    fn usage_and_rates_over_the_interval() {
        let t0 = Instant::now();
        let prev = sample(t0, &[(0, t(100, 1000)), (1, t(100, 1000))], 1024, 5000);
        let now = sample(
            t0 + Duration::from_secs(2),
            &[(0, t(150, 1100)), (1, t(110, 1100))],
            1024 + 4096,
            9000,
        );
        let m = compare(Some(&prev), &now);
        assert_eq!(m.interval_ms, Some(2000));
        assert_eq!(m.cpu.usage_percent, Some(30.0));
        assert_eq!(m.cpu.per_cpu[0].usage_percent, Some(50.0));
        assert_eq!(m.cpu.per_cpu[1].usage_percent, Some(10.0));
        let d = m.disks[0].rates.as_ref().unwrap();
        assert_eq!(d.read_bytes_per_second, 2048.0);
        assert_eq!(d.read_ops_per_second, 4.0);
        assert_eq!(d.write_bytes_per_second, 0.0);
        let n = m.network[0].rates.as_ref().unwrap();
        assert_eq!(n.rx_bytes_per_second, 2000.0);
    }

    #[test]
    fn hot_plugged_and_offline_cpus() {
        let t0 = Instant::now();
        let prev = sample(t0, &[(0, t(100, 1000)), (1, t(100, 1000))], 0, 0);
        // CPU 1 went offline, CPU 2 came online.
        let now = sample(
            t0 + Duration::from_secs(1),
            &[(0, t(200, 1100)), (2, t(5, 50))],
            0,
            0,
        );
        let m = compare(Some(&prev), &now);
        let per: Vec<(u32, Option<f64>)> = m
            .cpu
            .per_cpu
            .iter()
            .map(|c| (c.cpu, c.usage_percent))
            .collect();
        assert_eq!(per, [(0, Some(100.0)), (2, None)]);
    }

    #[test]
    fn counters_going_backwards_or_no_tick_give_null() {
        let t0 = Instant::now();
        let prev = sample(t0, &[(0, t(100, 1000))], 5000, 5000);
        let now = sample(t0 + Duration::from_secs(1), &[(0, t(100, 1000))], 10, 10);
        let m = compare(Some(&prev), &now);
        assert_eq!(m.cpu.usage_percent, None, "no tick elapsed");
        assert!(m.disks[0].rates.is_none());
        assert!(m.network[0].rates.is_none());
    }

    fn mount(point: &str, kind: FsKind) -> Mount {
        Mount {
            mount_point: point.into(),
            fs_type: "x".into(),
            device: "d".into(),
            kind,
        }
    }

    #[test]
    fn mount_selection() {
        let mounts = vec![
            mount("/", FsKind::Local),
            mount("/proc", FsKind::Pseudo),
            mount("/srv", FsKind::Network),
            mount("/data", FsKind::Local),
            mount("/data", FsKind::Pseudo), // mounted over /data
        ];
        let points = |v: Vec<Mount>| v.into_iter().map(|m| m.mount_point).collect::<Vec<_>>();
        assert_eq!(points(select_mounts(mounts.clone(), false)), ["/"]);
        assert_eq!(points(select_mounts(mounts, true)), ["/", "/srv"]);
    }

    // Stats this machine's "/" for real.
    #[cfg(unix)]
    #[test]
    fn a_stuck_mount_is_not_statted_twice() {
        let state = MetricsState::default();
        state.pending_statvfs.lock().unwrap().insert("/".into());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let out = rt.block_on(stat_filesystems(
            &state,
            vec![mount("/", FsKind::Local)],
            Duration::from_secs(5),
        ));
        assert!(out.is_empty());
        state.pending_statvfs.lock().unwrap().clear();
        let out = rt.block_on(stat_filesystems(
            &state,
            vec![mount("/", FsKind::Local)],
            Duration::from_secs(60),
        ));
        assert_eq!(out.len(), 1);
        assert!(state.pending_statvfs.lock().unwrap().is_empty());
    }
}
