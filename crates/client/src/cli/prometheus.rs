//! `metrics --prometheus`: the Prometheus text exposition format (0.0.4).
//!
//! Every family has `# HELP` and `# TYPE` lines; cumulative counters end in
//! `_total`; label values escape `\`, `"` and newlines. A figure the agent
//! reports as null (CPU usage and rates without a previous sample) is left
//! out rather than written as 0. Rates are not exported: Prometheus derives
//! them from the counters with `rate()`.

use std::fmt::Write as _;

use kvm_agent_client::protocol::methods::info::Metrics;

/// Escape a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value: integers as integers, `NaN`, `+Inf`, `-Inf` spelt out.
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A counter or gauge family over a list: name, help, and the figure of one item.
type Column<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Builds the text, one family at a time.
struct Exposition {
    out: String,
}

impl Exposition {
    /// Start a family: its HELP and TYPE lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value(v));
    }

    /// A family with one sample per item.
    fn each<T>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        items: &[T],
        labels: impl Fn(&T) -> Vec<(&'static str, String)>,
        v: impl Fn(&T) -> Option<f64>,
    ) {
        let rows: Vec<(Vec<(&str, String)>, f64)> = items
            .iter()
            .filter_map(|i| v(i).map(|v| (labels(i), v)))
            .collect();
        if rows.is_empty() {
            return;
        }
        self.family(name, kind, help);
        for (l, v) in rows {
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.sample(name, &l, v);
        }
    }
}

/// The whole exposition of one `get_metrics` result.
pub fn render(m: &Metrics) -> String {
    let mut e = Exposition { out: String::new() };
    if let Some(ms) = m.interval_ms {
        e.family(
            "kvm_guest_metrics_interval_seconds",
            "gauge",
            "Seconds covered by the CPU usage figures (since the agent's previous sample).",
        );
        e.sample(
            "kvm_guest_metrics_interval_seconds",
            &[],
            ms as f64 / 1000.0,
        );
    }
    if let Some(p) = m.cpu.usage_percent {
        e.family(
            "kvm_guest_cpu_usage_percent",
            "gauge",
            "Busy share of all CPUs over the interval, 0-100.",
        );
        e.sample("kvm_guest_cpu_usage_percent", &[], p);
    }
    e.each(
        "kvm_guest_cpu_core_usage_percent",
        "gauge",
        "Busy share of one CPU over the interval, 0-100.",
        &m.cpu.per_cpu,
        |c| vec![("cpu", c.cpu.to_string())],
        |c| c.usage_percent,
    );
    if let Some(l) = m.cpu.load_average {
        e.family(
            "kvm_guest_load_average",
            "gauge",
            "Load average over 1, 5 and 15 minutes.",
        );
        for (period, v) in ["1m", "5m", "15m"].iter().zip(l) {
            e.sample("kvm_guest_load_average", &[("period", period)], v);
        }
    }
    e.family("kvm_guest_processes", "gauge", "Number of processes.");
    e.sample("kvm_guest_processes", &[], m.cpu.process_count as f64);

    let mem = &m.memory;
    e.family(
        "kvm_guest_memory_bytes",
        "gauge",
        "Memory by kind, in bytes (cache: buffers, page cache and reclaimable slab).",
    );
    for (kind, v) in [
        ("total", mem.total_bytes),
        ("available", mem.available_bytes),
        ("used", mem.used_bytes),
        ("free", mem.free_bytes),
        ("cache", mem.cache_bytes),
        ("swap_total", mem.swap_total_bytes),
        ("swap_used", mem.swap_used_bytes),
    ] {
        e.sample("kvm_guest_memory_bytes", &[("kind", kind)], v as f64);
    }

    type Disk = kvm_agent_client::protocol::methods::info::DiskMetrics;
    let disk = |d: &Disk| vec![("device", d.name.clone())];
    let disks: [Column<Disk>; 4] = [
        (
            "kvm_guest_disk_read_bytes_total",
            "Bytes read from the block device since boot.",
            |d| d.read_bytes,
        ),
        (
            "kvm_guest_disk_written_bytes_total",
            "Bytes written to the block device since boot.",
            |d| d.write_bytes,
        ),
        (
            "kvm_guest_disk_reads_completed_total",
            "Reads completed by the block device since boot.",
            |d| d.read_ops,
        ),
        (
            "kvm_guest_disk_writes_completed_total",
            "Writes completed by the block device since boot.",
            |d| d.write_ops,
        ),
    ];
    for (name, help, get) in disks {
        e.each(name, "counter", help, &m.disks, disk, |d| {
            Some(get(d) as f64)
        });
    }

    type Net = kvm_agent_client::protocol::methods::info::NetworkMetrics;
    let iface = |n: &Net| vec![("interface", n.name.clone())];
    let net: [Column<Net>; 8] = [
        (
            "kvm_guest_network_receive_bytes_total",
            "Bytes received since boot.",
            |n| n.rx_bytes,
        ),
        (
            "kvm_guest_network_transmit_bytes_total",
            "Bytes sent since boot.",
            |n| n.tx_bytes,
        ),
        (
            "kvm_guest_network_receive_packets_total",
            "Packets received since boot.",
            |n| n.rx_packets,
        ),
        (
            "kvm_guest_network_transmit_packets_total",
            "Packets sent since boot.",
            |n| n.tx_packets,
        ),
        (
            "kvm_guest_network_receive_errors_total",
            "Receive errors since boot.",
            |n| n.rx_errors,
        ),
        (
            "kvm_guest_network_transmit_errors_total",
            "Send errors since boot.",
            |n| n.tx_errors,
        ),
        (
            "kvm_guest_network_receive_drop_total",
            "Received packets dropped since boot.",
            |n| n.rx_dropped,
        ),
        (
            "kvm_guest_network_transmit_drop_total",
            "Outgoing packets dropped since boot.",
            |n| n.tx_dropped,
        ),
    ];
    for (name, help, get) in net {
        e.each(name, "counter", help, &m.network, iface, |n| {
            Some(get(n) as f64)
        });
    }

    type Fs = kvm_agent_client::protocol::methods::info::FilesystemMetrics;
    let fs_labels = |f: &Fs| {
        vec![
            ("mountpoint", f.mount_point.clone()),
            ("fstype", f.fs_type.clone()),
            ("device", f.device.clone()),
        ]
    };
    let fs: [Column<Fs>; 5] = [
        (
            "kvm_guest_filesystem_size_bytes",
            "Filesystem size in bytes.",
            |f| f.total_bytes,
        ),
        (
            "kvm_guest_filesystem_used_bytes",
            "Filesystem bytes in use.",
            |f| f.used_bytes,
        ),
        (
            "kvm_guest_filesystem_avail_bytes",
            "Filesystem bytes available to unprivileged users.",
            |f| f.available_bytes,
        ),
        (
            "kvm_guest_filesystem_inodes",
            "Filesystem inodes in all.",
            |f| f.total_inodes,
        ),
        (
            "kvm_guest_filesystem_inodes_free",
            "Filesystem inodes free.",
            |f| f.free_inodes,
        ),
    ];
    for (name, help, get) in fs {
        e.each(name, "gauge", help, &m.filesystems, fs_labels, |f| {
            Some(get(f) as f64)
        });
    }
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_agent_client::protocol::methods::info::{
        CpuMetrics, CpuUsage, DiskMetrics, FilesystemMetrics, MemoryMetrics, NetworkMetrics,
    };

    fn metrics(first: bool) -> Metrics {
        Metrics {
            timestamp_ms: 1_767_259_200_000,
            interval_ms: (!first).then_some(2500),
            cpu: CpuMetrics {
                usage_percent: (!first).then_some(12.5),
                per_cpu: vec![
                    CpuUsage {
                        cpu: 0,
                        usage_percent: (!first).then_some(17.0),
                    },
                    CpuUsage {
                        cpu: 1,
                        usage_percent: None,
                    },
                ],
                load_average: Some([0.42, 0.35, 0.3]),
                process_count: 142,
            },
            memory: MemoryMetrics {
                total_bytes: 4096,
                available_bytes: 1024,
                used_bytes: 3072,
                free_bytes: 512,
                cache_bytes: 256,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            },
            disks: vec![DiskMetrics {
                name: "vda".into(),
                read_bytes: 734003200,
                write_bytes: 1,
                read_ops: 2,
                write_ops: 3,
                rates: None,
            }],
            network: vec![NetworkMetrics {
                name: "eth0".into(),
                rx_bytes: 10,
                rx_packets: 1,
                rx_errors: 0,
                rx_dropped: 0,
                tx_bytes: 20,
                tx_packets: 2,
                tx_errors: 0,
                tx_dropped: 0,
                rates: None,
            }],
            filesystems: vec![FilesystemMetrics {
                mount_point: "/mnt/my \"odd\" dir\\x\n".into(),
                fs_type: "ext4".into(),
                device: "/dev/vdb".into(),
                total_bytes: 100,
                used_bytes: 40,
                available_bytes: 55,
                total_inodes: 10,
                used_inodes: 4,
                free_inodes: 6,
            }],
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
        assert_eq!(value(f64::NAN), "NaN");
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(3.0), "3");
        assert_eq!(value(0.42), "0.42");
        assert_eq!(value(734003200.0), "734003200");
    }

    #[test]
    fn full_exposition() {
        let text = render(&metrics(false));
        for line in [
            "# HELP kvm_guest_cpu_usage_percent Busy share of all CPUs over the interval, 0-100.",
            "# TYPE kvm_guest_cpu_usage_percent gauge",
            "kvm_guest_cpu_usage_percent 12.5",
            "kvm_guest_cpu_core_usage_percent{cpu=\"0\"} 17",
            "kvm_guest_metrics_interval_seconds 2.5",
            "kvm_guest_load_average{period=\"15m\"} 0.3",
            "kvm_guest_processes 142",
            "kvm_guest_memory_bytes{kind=\"total\"} 4096",
            "kvm_guest_memory_bytes{kind=\"swap_used\"} 0",
            "# TYPE kvm_guest_disk_read_bytes_total counter",
            "kvm_guest_disk_read_bytes_total{device=\"vda\"} 734003200",
            "kvm_guest_network_transmit_bytes_total{interface=\"eth0\"} 20",
            "kvm_guest_filesystem_avail_bytes{mountpoint=\"/mnt/my \\\"odd\\\" dir\\\\x\\n\",fstype=\"ext4\",device=\"/dev/vdb\"} 55",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // CPU 1 has no figure: no sample, rather than a made-up 0.
        assert!(!text.contains("cpu=\"1\""), "{text}");
        // Every family is announced once, before its samples, and every
        // sample line belongs to the family announced last.
        let mut current = String::new();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(current.clone()), "{current} twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn first_sample_has_no_usage_families() {
        let text = render(&metrics(true));
        assert!(!text.contains("kvm_guest_cpu_usage_percent"));
        assert!(!text.contains("kvm_guest_cpu_core_usage_percent"));
        assert!(!text.contains("interval_seconds"));
        assert!(text.contains("kvm_guest_processes 142"));
    }
}
