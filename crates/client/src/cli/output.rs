//! Human-readable rendering of results: key/value listings and tables.

use std::fmt::Write as _;

use kvm_agent_client::protocol::methods::core::Capabilities;
use kvm_agent_client::protocol::methods::info::{GuestInfo, Metrics, Users};

/// Aligned `key  value` lines.
pub fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<width$}  {v}");
    }
    out
}

/// A table with a header row; columns separated by two spaces, the last
/// column not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            text.push_str(cell);
            text.extend(std::iter::repeat_n(' ', pad));
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// Bytes in IEC units with one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn capabilities(c: &Capabilities) -> String {
    let methods: Vec<&str> = c.methods.iter().map(|m| m.as_str()).collect();
    key_values(&[
        ("protocol_version", c.protocol_version.clone()),
        ("agent_version", c.agent_version.clone()),
        ("os_family", c.os_family.as_str().to_owned()),
        ("auth_required", c.auth_required.to_string()),
        ("max_frame_bytes", c.limits.max_frame_bytes.to_string()),
        ("max_chunk_bytes", c.limits.max_chunk_bytes.to_string()),
        ("max_batch_len", c.limits.max_batch_len.to_string()),
        (
            "max_requests_per_connection",
            c.limits.max_requests_per_connection.to_string(),
        ),
        ("methods", methods.join(", ")),
    ])
}

pub fn info(i: &GuestInfo) -> String {
    let os_name =
        i.os.pretty_name
            .clone()
            .or_else(|| i.os.name.clone())
            .unwrap_or_else(|| i.os.family.as_str().to_owned());
    let tz = match &i.timezone.name {
        Some(n) => format!("{n} (UTC{:+}s)", i.timezone.utc_offset_seconds),
        None => format!("UTC{:+}s", i.timezone.utc_offset_seconds),
    };
    let mut out = key_values(&[
        ("hostname", i.hostname.clone()),
        ("fqdn", opt(&i.fqdn)),
        ("os", os_name),
        ("kernel", i.os.kernel_release.clone()),
        ("machine", i.os.machine.clone()),
        ("boot_id", i.boot_id.clone()),
        ("uptime", format!("{:.0} s", i.uptime_seconds)),
        ("timezone", tz),
        ("agent_version", i.agent_version.clone()),
        ("protocol_version", i.protocol_version.clone()),
    ]);
    if !i.interfaces.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = i
            .interfaces
            .iter()
            .map(|ifc| {
                let addrs: Vec<String> = ifc
                    .addresses
                    .iter()
                    .map(|a| format!("{}/{}", a.address, a.prefix_len))
                    .collect();
                vec![
                    ifc.name.clone(),
                    opt(&ifc.mac),
                    opt(&ifc.mtu),
                    ifc.flags.join(","),
                    addrs.join(" "),
                ]
            })
            .collect();
        out.push_str(&table(
            &["INTERFACE", "MAC", "MTU", "FLAGS", "ADDRESSES"],
            &rows,
        ));
    }
    out
}

fn pct(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"))
}

/// A per-second rate in IEC units, `-` when there is none.
fn per_second(v: Option<f64>) -> String {
    v.map_or_else(
        || "-".to_owned(),
        |v| format!("{}/s", bytes(v.round() as u64)),
    )
}

pub fn metrics(m: &Metrics) -> String {
    let load = m.cpu.load_average.map_or_else(
        || "-".to_owned(),
        |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]),
    );
    let mem = &m.memory;
    let per_cpu: Vec<String> = m
        .cpu
        .per_cpu
        .iter()
        .map(|c| format!("{}:{}", c.cpu, pct(c.usage_percent)))
        .collect();
    let window = m.interval_ms.map_or_else(
        || "none (no previous sample)".to_owned(),
        |ms| format!("{:.1} s since the previous sample", ms as f64 / 1000.0),
    );
    let mut out = key_values(&[
        ("window", window),
        ("cpu_usage", pct(m.cpu.usage_percent)),
        ("per_cpu", per_cpu.join(" ")),
        ("load_average", load),
        ("processes", m.cpu.process_count.to_string()),
        (
            "memory",
            format!(
                "{} used of {} ({} available, {} free, {} cache)",
                bytes(mem.used_bytes),
                bytes(mem.total_bytes),
                bytes(mem.available_bytes),
                bytes(mem.free_bytes),
                bytes(mem.cache_bytes)
            ),
        ),
        (
            "swap",
            format!(
                "{} used of {}",
                bytes(mem.swap_used_bytes),
                bytes(mem.swap_total_bytes)
            ),
        ),
    ]);
    if !m.disks.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = m
            .disks
            .iter()
            .map(|d| {
                let r = d.rates.as_ref();
                vec![
                    d.name.clone(),
                    bytes(d.read_bytes),
                    bytes(d.write_bytes),
                    d.read_ops.to_string(),
                    d.write_ops.to_string(),
                    per_second(r.map(|r| r.read_bytes_per_second)),
                    per_second(r.map(|r| r.write_bytes_per_second)),
                    r.map_or_else(
                        || "-".into(),
                        |r| format!("{:.1}", r.read_ops_per_second + r.write_ops_per_second),
                    ),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "DISK",
                "READ",
                "WRITTEN",
                "READ_OPS",
                "WRITE_OPS",
                "READ/S",
                "WRITE/S",
                "IOPS",
            ],
            &rows,
        ));
    }
    if !m.network.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = m
            .network
            .iter()
            .map(|n| {
                let r = n.rates.as_ref();
                vec![
                    n.name.clone(),
                    bytes(n.rx_bytes),
                    bytes(n.tx_bytes),
                    n.rx_packets.to_string(),
                    n.tx_packets.to_string(),
                    (n.rx_errors + n.tx_errors).to_string(),
                    (n.rx_dropped + n.tx_dropped).to_string(),
                    per_second(r.map(|r| r.rx_bytes_per_second)),
                    per_second(r.map(|r| r.tx_bytes_per_second)),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "INTERFACE",
                "RX",
                "TX",
                "RX_PKTS",
                "TX_PKTS",
                "ERRORS",
                "DROPPED",
                "RX/S",
                "TX/S",
            ],
            &rows,
        ));
    }
    if !m.filesystems.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = m
            .filesystems
            .iter()
            .map(|f| {
                let share = |used: u64, total: u64| {
                    if total > 0 {
                        format!("{:.0}%", used as f64 * 100.0 / total as f64)
                    } else {
                        "-".to_owned()
                    }
                };
                vec![
                    f.mount_point.clone(),
                    f.fs_type.clone(),
                    f.device.clone(),
                    bytes(f.total_bytes),
                    bytes(f.used_bytes),
                    bytes(f.available_bytes),
                    share(f.used_bytes, f.total_bytes),
                    share(f.used_inodes, f.total_inodes),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "MOUNT", "TYPE", "DEVICE", "SIZE", "USED", "AVAIL", "USE%", "INODE%",
            ],
            &rows,
        ));
    }
    out
}

pub fn users(u: &Users) -> String {
    if u.users.is_empty() {
        return "no users logged in\n".to_owned();
    }
    let rows: Vec<Vec<String>> = u
        .users
        .iter()
        .map(|s| {
            vec![
                s.user.clone(),
                opt(&s.terminal),
                opt(&s.host),
                s.login_time.clone(),
            ]
        })
        .collect();
    table(&["USER", "TERMINAL", "HOST", "LOGIN (UTC)"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["x".into(), "1".into()],
                vec!["wide cell".into(), "2".into()],
            ],
        );
        assert_eq!(t, "A          LONGER\nx          1\nwide cell  2\n");
    }

    #[test]
    fn key_values_align() {
        assert_eq!(
            key_values(&[("a", "1".into()), ("long", "2".into())]),
            "a     1\nlong  2\n"
        );
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 * 1024 * 1024), "16.0 MiB");
    }
}
