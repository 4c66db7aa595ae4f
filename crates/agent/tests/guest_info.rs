//! get_info, get_metrics and get_users through the real agent binary,
//! checked against independent sources on this machine: `hostname`,
//! `ip -j addr`, /proc/meminfo, `findmnt`, `df`, and utmp files the test
//! writes itself. No wall-clock thresholds. On Windows (under Wine in CI)
//! the same methods over the named pipe, checked against what Windows
//! itself reports to the test process.

mod common;

#[cfg(target_os = "linux")]
use std::collections::{BTreeMap, BTreeSet};
#[cfg(target_os = "linux")]
use std::process::Command;

#[cfg(target_os = "linux")]
use common::Scratch;
use common::{Agent, Conn};
#[cfg(target_os = "linux")]
use kvm_agent_protocol::methods::info::LoggedInUser;
#[cfg(target_os = "linux")]
use kvm_agent_protocol::methods::info::Metrics;
use kvm_agent_protocol::methods::info::{GuestInfo, Users};
#[cfg(target_os = "linux")]
use serde_json::Value;

fn result<T: serde::de::DeserializeOwned>(c: &mut Conn, method: &str, params: &str) -> T {
    let reply = c.call(&format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#
    ));
    assert!(reply["error"].is_null(), "{method}: {reply}");
    serde_json::from_value(reply["result"].clone())
        .unwrap_or_else(|e| panic!("{method} result does not fit its type: {e}: {reply}"))
}

#[cfg(target_os = "linux")]
/// Standard output of a command, or None when the command is not installed.
fn run(program: &str, args: &[&str]) -> Option<String> {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            assert!(out.status.success(), "{program} {args:?} failed");
            Some(String::from_utf8(out.stdout).unwrap())
        }
        Err(e) => {
            eprintln!("skipping the {program} comparison: {e}");
            None
        }
    }
}

// Linux only: compared with what Linux itself reports (/proc, ip, findmnt, df,
// utmp); the Windows counterparts are at the end of this file.
#[cfg(target_os = "linux")]
#[test]
fn hostname_and_os_match_the_system() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let info: GuestInfo = result(&mut c, "get_info", "{}");
    if let Some(h) = run("hostname", &[]) {
        assert_eq!(info.hostname, h.trim());
    }
    let uname_r = run("uname", &["-r"]).unwrap();
    assert_eq!(info.os.kernel_release, uname_r.trim());
    let uname_m = run("uname", &["-m"]).unwrap();
    assert_eq!(info.os.machine, uname_m.trim());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(info.boot_id, boot_id.trim());
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(info.uptime_seconds > 0.0 && info.uptime_seconds <= uptime + 1e-6);
    if let Ok(text) = std::fs::read_to_string("/etc/os-release") {
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("ID="))
            .map(|v| v.trim_matches(['"', '\'']).to_owned());
        assert_eq!(info.os.id, id);
    }
    assert_eq!(info.protocol_version, kvm_agent_protocol::PROTOCOL_VERSION);
    assert!(info.timezone.utc_offset_seconds.abs() <= 14 * 3600);
}

// Linux only: compared with what Linux itself reports (/proc, ip, findmnt, df,
// utmp); the Windows counterparts are at the end of this file.
#[cfg(target_os = "linux")]
#[test]
fn interfaces_match_ip_addr() {
    let agent = Agent::start("[info]\nhide_interfaces = [\"ifb*\", \"nomatch?\"]\n");
    let mut c = agent.connect();
    let all: GuestInfo = result(&mut c, "get_info", r#"{"all_interfaces":true}"#);
    let Some(text) = run("ip", &["-j", "addr"]) else {
        return;
    };
    let ip: Vec<Value> = serde_json::from_str(&text).unwrap();
    let ours: BTreeMap<&str, _> = all
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    assert_eq!(
        ours.keys().copied().collect::<BTreeSet<_>>(),
        ip.iter()
            .map(|l| l["ifname"].as_str().unwrap())
            .collect::<BTreeSet<_>>(),
        "interface names"
    );
    for link in &ip {
        let name = link["ifname"].as_str().unwrap();
        let i = ours[name];
        assert_eq!(i.mtu, link["mtu"].as_u64().map(|m| m as u32), "{name} mtu");
        let mac = link["address"]
            .as_str()
            .filter(|m| m.chars().any(|c| c != '0' && c != ':'));
        assert_eq!(i.mac.as_deref(), mac, "{name} mac");
        let flags: Vec<&str> = link["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        for (theirs, mine) in [
            ("UP", "up"),
            ("LOOPBACK", "loopback"),
            ("BROADCAST", "broadcast"),
            ("MULTICAST", "multicast"),
            ("LOWER_UP", "lower_up"),
        ] {
            assert_eq!(
                flags.contains(&theirs),
                i.flags.iter().any(|f| f == mine),
                "{name} flag {mine}: ip says {flags:?}, agent {:?}",
                i.flags
            );
        }
        let expected: BTreeSet<(String, u8)> = link["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["local"].as_str().unwrap().to_owned(),
                    a["prefixlen"].as_u64().unwrap() as u8,
                )
            })
            .collect();
        let got: BTreeSet<(String, u8)> = i
            .addresses
            .iter()
            .map(|a| (a.address.to_string(), a.prefix_len))
            .collect();
        assert_eq!(got, expected, "{name} addresses");
    }

    // The filter: hidden by default, shown with all_interfaces.
    let filtered: GuestInfo = result(&mut c, "get_info", "{}");
    let names: Vec<&str> = filtered
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with("ifb")), "{names:?}");
    assert!(names.contains(&"lo"), "the loopback stays unless filtered");
    let hidden = all.interfaces.len() - filtered.interfaces.len();
    let ifb = all
        .interfaces
        .iter()
        .filter(|i| i.name.starts_with("ifb"))
        .count();
    assert_eq!(hidden, ifb);
}

#[cfg(target_os = "linux")]
fn meminfo_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

// Linux only: compared with what Linux itself reports (/proc, ip, findmnt, df,
// utmp); the Windows counterparts are at the end of this file.
#[cfg(target_os = "linux")]
#[test]
fn metrics_match_proc_and_have_a_window_from_the_first_call() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let first: Metrics = result(&mut c, "get_metrics", "{}");
    // The agent sampled at start-up: even the first call has a window.
    assert!(first.interval_ms.is_some());
    let second: Metrics = result(&mut c, "get_metrics", "{}");
    assert!(second.interval_ms.is_some());
    assert!(second.timestamp_ms >= first.timestamp_ms);

    let m = &second.memory;
    assert_eq!(m.total_bytes, meminfo_kb("MemTotal") * 1024);
    assert_eq!(m.swap_total_bytes, meminfo_kb("SwapTotal") * 1024);
    assert_eq!(m.used_bytes, m.total_bytes - m.available_bytes);
    assert!(m.free_bytes <= m.total_bytes && m.available_bytes <= m.total_bytes);

    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpus: Vec<u32> = stat
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("cpu")?
                .parse()
                .ok()
        })
        .collect();
    let ours: Vec<u32> = second.cpu.per_cpu.iter().map(|c| c.cpu).collect();
    assert_eq!(ours, cpus);
    for u in second
        .cpu
        .per_cpu
        .iter()
        .filter_map(|c| c.usage_percent)
        .chain(second.cpu.usage_percent)
    {
        assert!((0.0..=100.0).contains(&u), "{u}");
    }
    assert!(second.cpu.load_average.is_some());
    assert!(second.cpu.process_count > 0);

    let net_dev = std::fs::read_to_string("/proc/net/dev").unwrap();
    let dev_names: BTreeSet<&str> = net_dev
        .lines()
        .filter_map(|l| Some(l.split_once(':')?.0.trim()))
        .collect();
    for n in &second.network {
        assert!(dev_names.contains(n.name.as_str()), "{}", n.name);
        assert!(n.rates.is_some(), "{}: both samples saw it", n.name);
    }
    let diskstats = std::fs::read_to_string("/proc/diskstats").unwrap();
    for d in &second.disks {
        let line = diskstats
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(d.name.as_str()))
            .unwrap_or_else(|| panic!("{} not in /proc/diskstats", d.name));
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(3)
            .map(|x| x.parse().unwrap())
            .collect();
        // Counters only grow: the agent's sample is no later than ours.
        assert!(
            d.read_ops <= f[0] && d.read_bytes <= f[2] * 512,
            "{}",
            d.name
        );
        assert!(
            d.write_ops <= f[4] && d.write_bytes <= f[6] * 512,
            "{}",
            d.name
        );
    }
}

#[cfg(target_os = "linux")]
/// findmnt's flattened tree: target -> (fstype, source).
fn findmnt() -> Option<BTreeMap<String, (String, String)>> {
    fn walk(v: &Value, out: &mut BTreeMap<String, (String, String)>) {
        for fs in v.as_array().into_iter().flatten() {
            out.insert(
                fs["target"].as_str().unwrap().to_owned(),
                (
                    fs["fstype"].as_str().unwrap().to_owned(),
                    fs["source"].as_str().unwrap_or("").to_owned(),
                ),
            );
            walk(&fs["children"], out);
        }
    }
    let text = run("findmnt", &["-J", "-o", "TARGET,FSTYPE,SOURCE"])?;
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeMap::new();
    walk(&v["filesystems"], &mut out);
    Some(out)
}

// Linux only: compared with what Linux itself reports (/proc, ip, findmnt, df,
// utmp); the Windows counterparts are at the end of this file.
#[cfg(target_os = "linux")]
#[test]
fn filesystems_match_findmnt_and_df() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let m: Metrics = result(&mut c, "get_metrics", "{}");
    assert!(
        m.filesystems.iter().any(|f| f.mount_point == "/"),
        "{:?}",
        m.filesystems
    );
    let pseudo = [
        "proc", "sysfs", "tmpfs", "devtmpfs", "cgroup", "cgroup2", "overlay", "devpts",
    ];
    for f in &m.filesystems {
        assert!(!pseudo.contains(&f.fs_type.as_str()), "{f:?}");
        assert!(f.used_bytes <= f.total_bytes && f.available_bytes <= f.total_bytes);
        assert_eq!(f.used_inodes + f.free_inodes, f.total_inodes);
    }
    if let Some(mounts) = findmnt() {
        for f in &m.filesystems {
            let (fstype, _) = mounts
                .get(&f.mount_point)
                .unwrap_or_else(|| panic!("{} not listed by findmnt", f.mount_point));
            assert_eq!(&f.fs_type, fstype, "{}", f.mount_point);
        }
        let block = ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs"];
        for (target, (fstype, source)) in &mounts {
            if block.contains(&fstype.as_str()) && source.starts_with("/dev/") {
                assert!(
                    m.filesystems.iter().any(|f| &f.mount_point == target),
                    "{target} ({fstype} on {source}) is missing"
                );
            }
        }
    }
    if let Some(df) = run("df", &["-B1", "--output=size,itotal", "/"]) {
        let nums: Vec<u64> = df
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let root = m
            .filesystems
            .iter()
            .rev()
            .find(|f| f.mount_point == "/")
            .unwrap();
        assert_eq!(root.total_bytes, nums[0]);
        assert_eq!(root.total_inodes, nums[1]);
    }
    // Asking for network filesystems too still answers (none here, or
    // some with a deadline).
    let with_net: Metrics = result(
        &mut c,
        "get_metrics",
        r#"{"include_network_filesystems":true}"#,
    );
    assert!(with_net.filesystems.len() >= m.filesystems.len());
}

#[cfg(target_os = "linux")]
/// One glibc x86_64 utmp record, built independently of the agent's parser.
fn utmp_record(ut_type: i16, user: &str, line: &str, host: &str, secs: i32) -> Vec<u8> {
    let mut r = vec![0u8; 384];
    r[0..2].copy_from_slice(&ut_type.to_ne_bytes());
    r[8..8 + line.len()].copy_from_slice(line.as_bytes());
    r[44..44 + user.len()].copy_from_slice(user.as_bytes());
    r[76..76 + host.len()].copy_from_slice(host.as_bytes());
    r[340..344].copy_from_slice(&secs.to_ne_bytes());
    r
}

// Linux only: compared with what Linux itself reports (/proc, ip, findmnt, df,
// utmp); the Windows counterparts are at the end of this file.
#[cfg(target_os = "linux")]
#[test]
fn users_from_a_written_utmp_file() {
    let dir = Scratch::new("utmp");
    let path = dir.0.join("utmp");
    let mut bytes = utmp_record(2, "reboot", "~", "", 1_700_000_000);
    bytes.extend(utmp_record(7, "carol", "tty2", "", 1_700_000_100));
    bytes.extend(utmp_record(
        7,
        "dave",
        "pts/7",
        "198.51.100.4",
        1_700_000_200,
    ));
    bytes.extend(utmp_record(8, "erin", "pts/8", "", 1_700_000_300));
    std::fs::write(&path, &bytes).unwrap();
    let users = kvm_manager_agent::handlers::users::list_from(&path)
        .unwrap()
        .users;
    let user = |user: &str, terminal: &str, host: Option<&str>, time: &str, epoch| LoggedInUser {
        user: user.into(),
        terminal: Some(terminal.into()),
        host: host.map(Into::into),
        login_time: time.into(),
        login_time_epoch: epoch,
    };
    assert_eq!(
        users,
        [
            user("carol", "tty2", None, "2023-11-14T22:15:00Z", 1_700_000_100),
            user(
                "dave",
                "pts/7",
                Some("198.51.100.4"),
                "2023-11-14T22:16:40Z",
                1_700_000_200
            ),
        ]
    );
    assert!(
        kvm_manager_agent::handlers::users::list_from(&dir.0.join("none"))
            .unwrap()
            .users
            .is_empty()
    );
}

// Linux only: compared with what Linux itself reports (/proc, ip, findmnt, df,
// utmp); the Windows counterparts are at the end of this file.
#[cfg(target_os = "linux")]
#[test]
fn get_users_over_the_wire_matches_the_system_utmp() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let users: Users = result(&mut c, "get_users", "{}");
    let system = ["/run/utmp", "/var/run/utmp"]
        .iter()
        .find(|p| std::path::Path::new(p).exists());
    match system {
        None => assert!(users.users.is_empty(), "no utmp file, yet {users:?}"),
        Some(p) => {
            let expected = kvm_manager_agent::handlers::users::list_from(p.as_ref()).unwrap();
            assert_eq!(users.users.len(), expected.users.len());
        }
    }
}

/// The Windows counterpart of `hostname_and_os_match_the_system`: the
/// computer name Windows gives this process, the OS family, and the
/// `agent_ready` of the same connection.
#[cfg(windows)]
#[test]
fn windows_info_matches_the_system() {
    let agent = Agent::start("");
    let mut c = common::Conn::open(&agent.socket);
    let ready = c.recv();
    assert_eq!(ready["method"], "agent_ready", "{ready}");
    let info: GuestInfo = result(&mut c, "get_info", "{}");
    assert_eq!(
        info.os.family,
        kvm_agent_protocol::methods::core::OsFamily::Windows
    );
    let computer = std::env::var("COMPUTERNAME").expect("Windows sets COMPUTERNAME");
    assert!(
        info.hostname.eq_ignore_ascii_case(&computer),
        "{} is not {computer}",
        info.hostname
    );
    assert_eq!(serde_json::json!(info.boot_id), ready["params"]["boot_id"]);
    assert!(info.uptime_seconds > 0.0);
    assert_eq!(info.protocol_version, kvm_agent_protocol::PROTOCOL_VERSION);
    assert!(info.timezone.utc_offset_seconds.abs() <= 14 * 3600);
}

/// Users over the pipe: the answer has the documented shape. (get_metrics
/// is not checked here: Wine 8.0 answers SystemPageFileInformation with
/// STATUS_INVALID_INFO_CLASS, so under Wine the agent rightly reports an
/// I/O error; it needs a real Windows.)
#[cfg(windows)]
#[test]
fn windows_users_over_the_pipe() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let users: Users = result(&mut c, "get_users", "{}");
    assert!(users.users.iter().all(|u| !u.user.is_empty()), "{users:?}");
}
