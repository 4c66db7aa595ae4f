//! `kva-bench`: kvm-manager-agent and qemu-guest-agent side by side.
//!
//! `cargo xtask bench` builds what this needs (the static agent, the guest
//! images with qemu-ga inside, qemu-ga itself from Debian's packages) and
//! runs it; run by hand:
//!
//! ```text
//! kva-bench --agent PATH --qemu-ga PATH --out FILE.md [--smoke] [--only SECTION,...]
//! ```
//!
//! Sections: requests, startup, binaries, files, connections, fleet, guest
//! (the guest needs the `KVA_VM_*` variables of `cargo xtask vm-test --env`,
//! with `KVA_VM_INITRAMFS` naming an initramfs that carries qemu-ga).
//! The figures go to FILE.md as Markdown; `--smoke` runs every benchmark
//! briefly, to check that each one works, and its figures mean nothing.

#[cfg(unix)]
mod agents;
#[cfg(unix)]
mod files;
#[cfg(unix)]
mod guest;
#[cfg(unix)]
mod host;
#[cfg(unix)]
mod many;
#[cfg(unix)]
mod procfs;
mod report;
#[cfg(unix)]
mod wire;

/// How much of everything a run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub smoke: bool,
    pub pings: usize,
    pub pipelined: usize,
    pub info: usize,
    pub exec: usize,
    pub file_mib: usize,
    /// Our chunk sizes and chunks in flight.
    pub ours_chunks: Vec<(usize, usize)>,
    /// qemu-ga's chunk sizes.
    pub qga_chunks: Vec<usize>,
    /// qemu-ga's calls in flight during transfers.
    pub qga_depth: usize,
    pub starts: usize,
    pub connections: usize,
    pub pings_per_connection: usize,
    pub sequential_connections: usize,
    pub fleet: usize,
    pub guest_pings: usize,
    pub guest_mib: usize,
}

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

impl Plan {
    fn full() -> Self {
        Self {
            smoke: false,
            pings: 5000,
            pipelined: 200_000,
            info: 500,
            exec: 300,
            file_mib: 256,
            ours_chunks: vec![
                (256 * KIB, 8),
                (MIB, 4),
                (MIB, 8),
                (4 * MIB, 4),
                (8 * MIB, 2),
            ],
            qga_chunks: vec![64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 48 * MIB],
            qga_depth: 2,
            starts: 20,
            connections: 1000,
            pings_per_connection: 10,
            sequential_connections: 1000,
            fleet: 500,
            guest_pings: 500,
            guest_mib: 64,
        }
    }

    fn smoke() -> Self {
        Self {
            smoke: true,
            pings: 50,
            pipelined: 500,
            info: 10,
            exec: 5,
            file_mib: 8,
            ours_chunks: vec![(MIB, 4)],
            qga_chunks: vec![64 * KIB, 48 * MIB],
            qga_depth: 2,
            starts: 2,
            connections: 50,
            pings_per_connection: 2,
            sequential_connections: 20,
            fleet: 10,
            guest_pings: 20,
            guest_mib: 4,
        }
    }
}

/// Every section, in the order they run.
pub const SECTIONS: &[&str] = &[
    "binaries",
    "startup",
    "requests",
    "files",
    "connections",
    "fleet",
    "guest",
];

#[cfg(not(unix))]
fn main() {
    eprintln!("kva-bench runs on Linux only");
    std::process::exit(2);
}

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kva-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(unix)]
fn run() -> Result<(), String> {
    use std::path::PathBuf;

    let usage =
        "usage: kva-bench --agent PATH --qemu-ga PATH --out FILE.md [--smoke] [--only SECTION,...]";
    let mut agent = None;
    let mut qga = None;
    let mut out = None;
    let mut smoke = false;
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--qemu-ga" => qga = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from),
            "--smoke" => smoke = true,
            "--only" => {
                only = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "-h" | "--help" => {
                println!("{usage}\nsections: {}", SECTIONS.join(", "));
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n{usage}")),
        }
    }
    let (Some(agent), Some(qga), Some(out)) = (agent, qga, out) else {
        return Err(usage.into());
    };
    if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        return Err(format!(
            "unknown section {bad:?} (sections: {})",
            SECTIONS.join(", ")
        ));
    }
    let plan = if smoke { Plan::smoke() } else { Plan::full() };
    let selected = |s: &str| only.is_empty() || only.iter().any(|o| o == s);

    let nofile = procfs::raise_nofile();
    let setup =
        agents::Setup::new(agent, qga).map_err(|e| format!("set up the run's folders: {e}"))?;
    let mut report = report::Report::default();
    let load_start = procfs::loadavg();
    let started = std::time::Instant::now();
    let mut chunks = guest::GuestChunks {
        ours: (MIB, 4),
        qga: (64 * KIB, 1),
    };
    for section in SECTIONS.iter().filter(|s| selected(s)) {
        println!("bench: == {section}");
        let t = std::time::Instant::now();
        let result = match *section {
            "binaries" => host::binaries(&setup, &mut report),
            "startup" => host::startup(&setup, &plan, &mut report),
            "requests" => host::requests(&setup, &plan, &mut report),
            "files" => files::transfers(&setup, &plan, &mut report).map(|c| chunks = c),
            "connections" => many::connections(&setup, &plan, &mut report),
            "fleet" => many::fleet(&setup, &plan, &mut report),
            "guest" => guest::guest(&plan, chunks, &setup.local, &mut report),
            _ => unreachable!("sections are checked above"),
        };
        result.map_err(|e| format!("section {section}: {e}"))?;
        println!("bench: {section} took {:.1} s", t.elapsed().as_secs_f64());
    }
    report.run = run_lines(&setup, &plan, &load_start, started.elapsed(), nofile);
    std::fs::write(&out, report.markdown()).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("bench: figures written to {}", out.display());
    Ok(())
}

#[cfg(unix)]
fn run_lines(
    setup: &agents::Setup,
    plan: &Plan,
    load_start: &str,
    took: std::time::Duration,
    nofile: u64,
) -> Vec<String> {
    use std::process::Command;
    let sh = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let ours_version = sh(&setup.ours.display().to_string(), &["--version"]);
    let qga_version = sh(&setup.qga.display().to_string(), &["--version"]);
    let qga_package = sh("dpkg-query", &["-W", "-f=${Version}", "qemu-guest-agent"]);
    let qemu = std::env::var("KVA_VM_QEMU")
        .ok()
        .map(|q| sh(&q, &["--version"]))
        .unwrap_or_default();
    let mut lines = vec![
        format!(
            "{}, `cargo xtask bench`{}, {:.0} s; load average {} at the start, {} at the end",
            sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            if plan.smoke { " --smoke" } else { "" },
            took.as_secs_f64(),
            load_start,
            procfs::loadavg()
        ),
        format!(
            "machine: {model}, {cores} cores{}{}, {mem_gib:.0} GiB; {os}, kernel {}; open files limit {nofile}",
            if has("sha_ni") { ", SHA-NI" } else { "" },
            if has("avx2") { ", AVX2" } else { "" },
            sh("uname", &["-r"])
        ),
        format!(
            "ours: {ours_version}, the static release build `cargo xtask dist` ships (`opt-level = \"s\"`, +crt-static)"
        ),
        format!("qemu-ga: {qga_version} (Debian package {qga_package})"),
    ];
    if !qemu.is_empty() {
        lines.push(format!("guest: {qemu}"));
    }
    lines
}
