//! What some QGA commands report that no native method does, read from
//! Linux's /proc and /sys: per-CPU times by kind, every field of
//! /proc/diskstats, logical processors, and the disk addresses libvirt
//! needs for `guest-get-fsinfo` and `guest-get-disks`. The parsers take
//! text so that tests feed them fixtures.

use std::path::{Path, PathBuf};

use super::schema::{
    CpuStats, DiskAddress, DiskInfo, DiskStats, DiskStatsInfo, LogicalProcessor, PciAddress,
};

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SysinfoError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        error: std::io::Error,
    },
}

fn read(path: &str) -> Result<String, SysinfoError> {
    std::fs::read_to_string(path).map_err(|error| SysinfoError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Clock ticks per second, for /proc/stat.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// `guest-get-cpustats`: each `cpuN` line of /proc/stat, in milliseconds.
pub fn cpu_stats() -> Result<Vec<CpuStats>, SysinfoError> {
    Ok(parse_cpu_stats(&read("/proc/stat")?, clock_ticks()))
}

/// Parse /proc/stat's per-CPU lines; times converted from `ticks` per
/// second to milliseconds, as qemu-ga does.
pub fn parse_cpu_stats(text: &str, ticks: u64) -> Vec<CpuStats> {
    let ms = |v: u64| v.saturating_mul(1000) / ticks.max(1);
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu: i64 = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
            if v.len() < 4 {
                return None;
            }
            let at = |i: usize| v.get(i).map(|x| ms(*x));
            Some(CpuStats {
                kind: "linux",
                cpu,
                user: ms(v[0]),
                nice: ms(v[1]),
                system: ms(v[2]),
                idle: ms(v[3]),
                iowait: at(4),
                irq: at(5),
                softirq: at(6),
                steal: at(7),
                guest: at(8),
                guestnice: at(9),
            })
        })
        .collect()
}

/// `guest-get-diskstats`: every line of /proc/diskstats.
pub fn disk_stats() -> Result<Vec<DiskStatsInfo>, SysinfoError> {
    Ok(parse_disk_stats(&read("/proc/diskstats")?))
}

/// Parse /proc/diskstats (Documentation/admin-guide/iostats.rst).
pub fn parse_disk_stats(text: &str) -> Vec<DiskStatsInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 14 {
                return None;
            }
            let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
            Some(DiskStatsInfo {
                name: f[2].to_owned(),
                major: n(0)?,
                minor: n(1)?,
                stats: DiskStats {
                    read_ios: n(3),
                    read_merges: n(4),
                    read_sectors: n(5),
                    read_ticks: n(6),
                    write_ios: n(7),
                    write_merges: n(8),
                    write_sectors: n(9),
                    write_ticks: n(10),
                    ios_pgr: n(11),
                    total_ticks: n(12),
                    weight_ticks: n(13),
                    discard_ios: n(14),
                    discard_merges: n(15),
                    discard_sectors: n(16),
                    discard_ticks: n(17),
                    flush_ios: n(18),
                    flush_ticks: n(19),
                },
            })
        })
        .collect()
}

/// `guest-get-vcpus`: the CPUs of /sys/devices/system/cpu.
pub fn vcpus() -> Result<Vec<LogicalProcessor>, SysinfoError> {
    vcpus_in(Path::new("/sys/devices/system/cpu"))
}

fn vcpus_in(root: &Path) -> Result<Vec<LogicalProcessor>, SysinfoError> {
    let entries = std::fs::read_dir(root).map_err(|error| SysinfoError::Read {
        path: root.display().to_string(),
        error,
    })?;
    let mut out: Vec<LogicalProcessor> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id: i64 = name.strip_prefix("cpu")?.parse().ok()?;
            let online_file = e.path().join("online");
            // No `online` file: the CPU cannot be taken offline (cpu0 on
            // most machines) and is online.
            let (online, can_offline) = match std::fs::read_to_string(&online_file) {
                Ok(v) => (v.trim() == "1", true),
                Err(_) => (true, false),
            };
            Some(LogicalProcessor {
                logical_id: id,
                online,
                can_offline: Some(can_offline),
            })
        })
        .collect();
    out.sort_by_key(|c| c.logical_id);
    Ok(out)
}

/// The address of block device `name` (`vda`, `sda`, `nvme0n1`), from its
/// sysfs path; a partition is resolved to its disk. `None` when it is no
/// disk (loop, zram, device-mapper: see [`slaves`]).
pub fn disk_address(name: &str) -> Option<DiskAddress> {
    disk_address_in(Path::new("/sys/class/block"), name)
}

fn disk_address_in(class: &Path, name: &str) -> Option<DiskAddress> {
    let dev = std::fs::canonicalize(class.join(name)).ok()?;
    // A partition's directory sits inside its disk's.
    let disk_dir = if dev.join("partition").exists() {
        dev.parent()?.to_path_buf()
    } else {
        dev.clone()
    };
    let disk = disk_dir.file_name()?.to_str()?.to_owned();
    let path = disk_dir.to_str()?;
    let pci = pci_of(path)?;
    let serial = std::fs::read_to_string(disk_dir.join("serial"))
        .or_else(|_| std::fs::read_to_string(disk_dir.join("device/serial")))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let (bus_type, bus, target, unit) = bus_of(path);
    Some(DiskAddress {
        pci_controller: pci,
        bus_type,
        bus,
        target,
        unit,
        serial,
        dev: Some(format!("/dev/{disk}")),
    })
}

/// The last PCI function in a sysfs device path (`.../0000:00:02.0/...`).
fn pci_of(path: &str) -> Option<PciAddress> {
    path.split('/').rev().find_map(|part| {
        // dddd:bb:ss.f
        let (domain, rest) = part.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (slot, function) = rest.split_once('.')?;
        if domain.len() != 4 || bus.len() != 2 || slot.len() != 2 || function.len() != 1 {
            return None;
        }
        Some(PciAddress {
            domain: i64::from_str_radix(domain, 16).ok()?,
            bus: i64::from_str_radix(bus, 16).ok()?,
            slot: i64::from_str_radix(slot, 16).ok()?,
            function: i64::from_str_radix(function, 16).ok()?,
        })
    })
}

/// Bus type and bus/target/unit from a sysfs device path, as qemu-ga
/// derives them: SCSI-like devices from their `H:C:T:L` component
/// (channel, target, lun), virtio-blk as 0/0/0.
fn bus_of(path: &str) -> (&'static str, i64, i64, i64) {
    let hctl = path.split('/').rev().find_map(|part| {
        let n: Vec<i64> = part
            .split(':')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        (n.len() == 4).then_some(n)
    });
    let kind = if path.contains("/nvme/") {
        "nvme"
    } else if path.contains("/usb") {
        "usb"
    } else if path.contains("/ata") {
        "sata"
    } else if path.contains("/virtio") && hctl.is_none() {
        "virtio"
    } else if hctl.is_some() {
        "scsi"
    } else {
        "unknown"
    };
    match hctl {
        Some(n) => (kind, n[1], n[2], n[3]),
        None => (kind, 0, 0, 0),
    }
}

/// Block devices a device-mapper or md device is built on (`slaves`).
pub fn slaves(name: &str) -> Vec<String> {
    std::fs::read_dir(PathBuf::from("/sys/class/block").join(name).join("slaves"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `guest-get-disks`: every disk and partition with a hardware address,
/// and every device-mapper/md device with its dependencies.
pub fn disks() -> Result<Vec<DiskInfo>, SysinfoError> {
    let class = Path::new("/sys/class/block");
    let entries = std::fs::read_dir(class).map_err(|error| SysinfoError::Read {
        path: class.display().to_string(),
        error,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let partition = class.join(&name).join("partition").exists();
        let deps = slaves(&name);
        let address = disk_address_in(class, &name);
        if address.is_none() && deps.is_empty() {
            continue; // loop, zram, ram...
        }
        let dependencies = if partition {
            // A partition depends on its disk.
            std::fs::canonicalize(class.join(&name))
                .ok()
                .and_then(|p| {
                    p.parent()?
                        .file_name()?
                        .to_str()
                        .map(|d| format!("/dev/{d}"))
                })
                .map(|d| vec![d])
        } else {
            Some(deps.into_iter().map(|d| format!("/dev/{d}")).collect())
        };
        out.push(DiskInfo {
            name: format!("/dev/{name}"),
            partition,
            dependencies,
            address: if partition { None } else { address },
        });
    }
    Ok(out)
}

/// The disk addresses under a mounted device (`/dev/vda1`, `/dev/dm-0`...),
/// following device-mapper and md to the disks they use.
pub fn addresses_of_device(device: &str) -> Vec<DiskAddress> {
    let Some(name) = resolve_block_name(device) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut todo = vec![name];
    let mut seen = 0;
    while let Some(n) = todo.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        let deps = slaves(&n);
        if deps.is_empty() {
            if let Some(a) = disk_address(&n) {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        } else {
            todo.extend(deps);
        }
    }
    out
}

/// `/dev/vda1` (or a symlink to it, `/dev/mapper/x`) to its sysfs block
/// name (`vda1`, `dm-0`).
fn resolve_block_name(device: &str) -> Option<String> {
    if !device.starts_with("/dev/") {
        return None;
    }
    let real = std::fs::canonicalize(device).ok()?;
    let name = real.file_name()?.to_str()?.to_owned();
    Path::new("/sys/class/block")
        .join(&name)
        .exists()
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stats_in_milliseconds() {
        let text = "cpu  10 0 0 0\ncpu0 100 2 30 400 5 0 6 7 0 0\ncpu1 1 1 1 1\nintr 5\n";
        let s = parse_cpu_stats(text, 100);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].cpu, s[0].user, s[0].idle, s[0].steal),
            (0, 1000, 4000, Some(70))
        );
        assert_eq!(s[1].iowait, None);
    }

    #[test]
    fn disk_stats_every_field() {
        let text = " 254       0 vda 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n   7 0 loop0 0 0 0 0 0 0 0 0 0 0 0\n";
        let s = parse_disk_stats(text);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].major, s[0].minor, s[0].name.as_str()),
            (254, 0, "vda")
        );
        assert_eq!(s[0].stats.read_ios, Some(1));
        assert_eq!(s[0].stats.weight_ticks, Some(11));
        assert_eq!(s[0].stats.flush_ticks, Some(17));
        assert_eq!(s[1].stats.discard_ios, None);
    }

    #[test]
    fn addresses_from_sysfs_paths() {
        assert_eq!(
            pci_of("/sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda"),
            Some(PciAddress {
                domain: 0,
                bus: 0,
                slot: 2,
                function: 0
            })
        );
        assert_eq!(
            bus_of("/sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda"),
            ("virtio", 0, 0, 0)
        );
        assert_eq!(
            bus_of(
                "/sys/devices/pci0000:00/0000:00:04.0/virtio2/host0/target0:0:1/0:0:1:3/block/sda"
            ),
            ("scsi", 0, 1, 3)
        );
        assert_eq!(
            bus_of("/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"),
            ("sata", 0, 0, 0)
        );
        assert_eq!(pci_of("/sys/devices/virtual/block/loop0"), None);
    }
}
