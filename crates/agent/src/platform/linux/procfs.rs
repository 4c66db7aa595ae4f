//! Parsers for /proc files. Pure functions over text, each tested on
//! fixtures; lines they do not understand are skipped, never fatal.

use std::collections::BTreeSet;

use kvm_agent_protocol::methods::info::MemoryMetrics;

use crate::platform::{CpuSample, CpuTimes, DiskCounters, FsKind, Mount, NetCounters};

/// /proc/stat: the aggregate `cpu` line and each `cpuN` line (offline CPUs
/// have no line). None without an aggregate line.
///
/// Fields: user nice system idle iowait irq softirq steal guest guest_nice.
/// Busy is user+nice+system+irq+softirq+steal (guest time is already part of
/// user and nice); total adds idle and iowait.
pub fn parse_stat(text: &str) -> Option<CpuSample> {
    let mut total = None;
    let mut per_cpu = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(label) = fields.next() else { continue };
        let Some(rest) = label.strip_prefix("cpu") else {
            continue;
        };
        let v: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
        let times = CpuTimes {
            busy,
            total: busy + at(3) + at(4),
        };
        if rest.is_empty() {
            total = Some(times);
        } else if let Ok(n) = rest.parse::<u32>() {
            per_cpu.push((n, times));
        }
    }
    per_cpu.sort_by_key(|(n, _)| *n);
    Some(CpuSample {
        total: total?,
        per_cpu,
    })
}

/// /proc/meminfo, in bytes. `cache` is Buffers + Cached + SReclaimable (the
/// memory `free` reports as buff/cache); `available` is MemAvailable, or on
/// kernels before 3.14 MemFree + Buffers + Cached. None without MemTotal.
pub fn parse_meminfo(text: &str) -> Option<MemoryMetrics> {
    let mut get = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_ascii_whitespace();
        let Some(Ok(n)) = words.next().map(str::parse::<u64>) else {
            continue;
        };
        let bytes = if words.next() == Some("kB") {
            n * 1024
        } else {
            n
        };
        get.insert(key.trim(), bytes);
    }
    let v = |k: &str| get.get(k).copied().unwrap_or(0);
    let total = *get.get("MemTotal")?;
    let free = v("MemFree");
    let available = get
        .get("MemAvailable")
        .copied()
        .unwrap_or_else(|| free + v("Buffers") + v("Cached"))
        .min(total);
    let swap_total = v("SwapTotal");
    Some(MemoryMetrics {
        total_bytes: total,
        available_bytes: available,
        used_bytes: total - available,
        free_bytes: free,
        cache_bytes: v("Buffers") + v("Cached") + v("SReclaimable"),
        swap_total_bytes: swap_total,
        swap_used_bytes: swap_total.saturating_sub(v("SwapFree")),
    })
}

/// /proc/loadavg: the three averages.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut f = text.split_ascii_whitespace().map(str::parse::<f64>);
    Some([f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?])
}

/// /proc/uptime: seconds since boot.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_ascii_whitespace().next()?.parse().ok()
}

/// Whether a device is left out of the disk list: RAM disks always, and
/// loop, nbd and zram devices that have never done any I/O (unused slots the
/// kernel creates in advance). Every other device is kept, partitions
/// included, so an idle but attached disk still shows.
fn skip_disk(name: &str, read_ops: u64, write_ops: u64) -> bool {
    name.starts_with("ram")
        || (["loop", "nbd", "zram"].iter().any(|p| name.starts_with(p))
            && read_ops == 0
            && write_ops == 0)
}

/// /proc/diskstats: reads completed (field 4), sectors read (6), writes
/// completed (8), sectors written (10). Sectors are always 512 bytes here,
/// whatever the device's own sector size.
pub fn parse_diskstats(text: &str) -> Vec<DiskCounters> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().ok();
        let (Some(reads), Some(read_sectors), Some(writes), Some(write_sectors)) =
            (n(3), n(5), n(7), n(9))
        else {
            continue;
        };
        if skip_disk(f[2], reads, writes) {
            continue;
        }
        out.push(DiskCounters {
            name: f[2].to_owned(),
            read_bytes: read_sectors * 512,
            write_bytes: write_sectors * 512,
            read_ops: reads,
            write_ops: writes,
        });
    }
    out
}

/// /proc/net/dev: every interface, with or without traffic.
pub fn parse_net_dev(text: &str) -> Vec<NetCounters> {
    let mut out = Vec::new();
    for line in text.lines() {
        // Names cannot hold ':'; old kernels glue the first number to it.
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_ascii_whitespace()
            .map_while(|f| f.parse().ok())
            .collect();
        if v.len() < 16 {
            continue;
        }
        out.push(NetCounters {
            name: name.trim().to_owned(),
            rx_bytes: v[0],
            rx_packets: v[1],
            rx_errors: v[2],
            rx_dropped: v[3],
            tx_bytes: v[8],
            tx_packets: v[9],
            tx_errors: v[10],
            tx_dropped: v[11],
        });
    }
    out
}

/// /proc/filesystems: the types marked `nodev` (not stored on a block device).
pub fn parse_nodev_types(text: &str) -> NodevTypes {
    let mut nodev = BTreeSet::new();
    let mut known = BTreeSet::new();
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        match (f.next(), f.next()) {
            (Some("nodev"), Some(t)) => {
                nodev.insert(t.to_owned());
                known.insert(t.to_owned());
            }
            (Some(t), None) => {
                known.insert(t.to_owned());
            }
            _ => {}
        }
    }
    NodevTypes { nodev, known }
}

/// What /proc/filesystems says about each type.
#[derive(Debug, Default)]
pub struct NodevTypes {
    nodev: BTreeSet<String>,
    known: BTreeSet<String>,
}

/// Types served over the network or by the hypervisor: they can hang.
const NETWORK_TYPES: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "ceph",
    "glusterfs",
    "9p",
    "virtiofs",
    "afs",
    "coda",
    "lustre",
    "gpfs",
    "beegfs",
    "davfs",
    "fuse.sshfs",
    "fuse.glusterfs",
    "fuse.s3fs",
    "fuse.rclone",
    "fuse.cephfs",
    "fuse.davfs2",
];

/// Types without a block device that still store data on this machine.
const LOCAL_NODEV_TYPES: &[&str] = &["zfs"];

/// The kind of a mount: network types by name; then block-backed types
/// (not `nodev` in /proc/filesystems) and ZFS are local; a type missing
/// from /proc/filesystems is local when its source is a /dev path; the rest
/// (proc, sysfs, cgroup, tmpfs, devtmpfs, overlay, fuse...) are pseudo.
pub fn classify(fs_type: &str, device: &str, types: &NodevTypes) -> FsKind {
    if NETWORK_TYPES.contains(&fs_type) {
        FsKind::Network
    } else if LOCAL_NODEV_TYPES.contains(&fs_type) {
        FsKind::Local
    } else if types.known.contains(fs_type) {
        if types.nodev.contains(fs_type) {
            FsKind::Pseudo
        } else {
            FsKind::Local
        }
    } else if device.starts_with("/dev/") {
        FsKind::Local
    } else {
        FsKind::Pseudo
    }
}

/// /proc/self/mountinfo: mount point (field 5), and after the `-`
/// separator the type and source; `\NNN` octal escapes (space, tab, newline,
/// backslash) decoded.
pub fn parse_mountinfo(text: &str, types: &NodevTypes) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if sep < 6 || f.len() < sep + 3 {
            continue;
        }
        let mount_point = unescape(f[4]);
        let fs_type = unescape(f[sep + 1]);
        let device = unescape(f[sep + 2]);
        out.push(Mount {
            kind: classify(&fs_type, &device, types),
            mount_point,
            fs_type,
            device,
        });
    }
    out
}

/// Decode the kernel's `\NNN` octal escapes (the kernel escapes space, tab,
/// newline and backslash this way in mount tables).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_one_cpu() {
        let s = parse_stat(include_str!("fixtures/stat-1cpu")).unwrap();
        assert_eq!(s.per_cpu.len(), 1);
        assert_eq!(s.per_cpu[0].0, 0);
        let busy = 4705 + 356 + 584 + 23;
        assert_eq!(
            s.total,
            CpuTimes {
                busy,
                total: busy + 3699176 + 23
            }
        );
        assert_eq!(s.per_cpu[0].1, s.total);
    }

    #[test]
    fn stat_sixty_four_cpus() {
        let s = parse_stat(include_str!("fixtures/stat-64cpu")).unwrap();
        assert_eq!(s.per_cpu.len(), 64);
        let numbers: Vec<u32> = s.per_cpu.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, (0..64).collect::<Vec<_>>());
        // cpu63: user 163, nice 63, system 50, idle 10063, iowait 5, irq 1, softirq 2, steal 3
        assert_eq!(
            s.per_cpu[63].1,
            CpuTimes {
                busy: 163 + 63 + 50 + 1 + 2 + 3,
                total: 163 + 63 + 50 + 1 + 2 + 3 + 10063 + 5
            }
        );
        let sum_busy: u64 = s.per_cpu.iter().map(|(_, t)| t.busy).sum();
        assert_eq!(s.total.busy, sum_busy);
    }

    #[test]
    fn stat_with_offline_cpus() {
        let s = parse_stat(include_str!("fixtures/stat-offline")).unwrap();
        let numbers: Vec<u32> = s.per_cpu.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [0, 2]);
        // The aggregate counts CPU 1's past time too.
        assert_eq!(s.total.busy, 400);
        assert!(parse_stat("cpu0 1 2 3 4\n").is_none());
        assert!(parse_stat("").is_none());
    }

    #[test]
    fn meminfo_without_swap() {
        let m = parse_meminfo(include_str!("fixtures/meminfo-noswap")).unwrap();
        assert_eq!(m.total_bytes, 2014064 * 1024);
        assert_eq!(m.available_bytes, 1244128 * 1024);
        assert_eq!(m.used_bytes, (2014064 - 1244128) * 1024);
        assert_eq!(m.free_bytes, 120148 * 1024);
        assert_eq!(m.cache_bytes, (65536 + 999424 + 70000) * 1024);
        assert_eq!((m.swap_total_bytes, m.swap_used_bytes), (0, 0));
    }

    #[test]
    fn meminfo_old_kernel_and_swap() {
        let m = parse_meminfo(
            "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n\
             SwapTotal: 500 kB\nSwapFree: 450 kB\n",
        )
        .unwrap();
        assert_eq!(m.available_bytes, 310 * 1024);
        assert_eq!(m.swap_used_bytes, 50 * 1024);
        assert!(parse_meminfo("MemFree: 1 kB\n").is_none());
    }

    #[test]
    fn loadavg_and_uptime() {
        assert_eq!(
            parse_loadavg("0.42 0.35 0.30 2/345 6789\n"),
            Some([0.42, 0.35, 0.30])
        );
        assert_eq!(parse_loadavg("0.1\n"), None);
        assert_eq!(parse_uptime("86431.27 170000.00\n"), Some(86431.27));
    }

    #[test]
    fn diskstats() {
        let d = parse_diskstats(include_str!("fixtures/diskstats"));
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["loop1", "vda", "vda1", "zram1", "sr0"]);
        assert_eq!(
            d[1],
            DiskCounters {
                name: "vda".into(),
                read_bytes: 3920370 * 512,
                write_bytes: 8140560 * 512,
                read_ops: 26572,
                write_ops: 7983,
            }
        );
        // Old kernels have 11 counters; that is enough.
        assert_eq!(d[2].read_ops, 26400);
    }

    #[test]
    fn net_dev_with_idle_interfaces() {
        let n = parse_net_dev(include_str!("fixtures/net-dev"));
        let names: Vec<&str> = n.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["lo", "eth0", "ifb0"]);
        assert_eq!(
            n[1],
            NetCounters {
                name: "eth0".into(),
                rx_bytes: 918273645,
                rx_packets: 712044,
                rx_errors: 1,
                rx_dropped: 12,
                tx_bytes: 203948576,
                tx_packets: 388120,
                tx_errors: 2,
                tx_dropped: 3,
            }
        );
        assert_eq!(
            n[2],
            NetCounters {
                name: "ifb0".into(),
                ..NetCounters::default()
            }
        );
    }

    #[test]
    fn mountinfo_with_escapes_and_kinds() {
        let types = parse_nodev_types(include_str!("fixtures/filesystems"));
        let m = parse_mountinfo(include_str!("fixtures/mountinfo"), &types);
        let local: Vec<(&str, &str, &str)> = m
            .iter()
            .filter(|m| m.kind == FsKind::Local)
            .map(|m| {
                (
                    m.mount_point.as_str(),
                    m.fs_type.as_str(),
                    m.device.as_str(),
                )
            })
            .collect();
        assert_eq!(
            local,
            [
                ("/", "ext4", "/dev/vda1"),
                ("/home/my files", "xfs", "/dev/disk/by-label/data disk"),
                ("/tank", "zfs", "tank"),
                ("/tab\tand\\back", "btrfs", "/dev/vdb"),
                ("/srv", "ext4", "/dev/vda1"),
            ]
        );
        let network: Vec<(&str, &str)> = m
            .iter()
            .filter(|m| m.kind == FsKind::Network)
            .map(|m| (m.mount_point.as_str(), m.device.as_str()))
            .collect();
        assert_eq!(
            network,
            [
                ("/srv/shared", "192.0.2.5:/export/shared"),
                ("/mnt/win", "//fs/share name"),
                ("/mnt/remote", "user@host:/"),
                ("/mnt/host", "hostshare"),
            ]
        );
        let pseudo = m.iter().filter(|m| m.kind == FsKind::Pseudo).count();
        assert_eq!(pseudo, 5, "sysfs proc devtmpfs tmpfs overlay");
    }

    #[test]
    fn unescaping() {
        assert_eq!(unescape(r"a\040b\011c\012d\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape(r"end\04"), r"end\04");
        assert_eq!(unescape(r"\999"), r"\999");
        assert_eq!(unescape("plain"), "plain");
    }

    #[test]
    fn unknown_types_by_source() {
        let types = NodevTypes::default();
        assert_eq!(classify("ext4", "/dev/sda1", &types), FsKind::Local);
        assert_eq!(classify("weird", "none", &types), FsKind::Pseudo);
        assert_eq!(classify("nfs", "h:/x", &types), FsKind::Network);
    }
}
