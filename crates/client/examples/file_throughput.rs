//! Upload and download throughput of a large file through the client library
//! (chunked, pipelined, sha256 verified at both ends), and the agent's peak
//! memory.
//!
//! ```text
//! mkdir -p /var/tmp/kva-bench && printf '[security]\nallowed_file_paths = ["/var/tmp/kva-bench"]\n' > /tmp/kva-bench.toml
//! kvm-manager-agent --config /tmp/kva-bench.toml --transport unix:/tmp/kva.sock &
//! cargo run --release -p kvm-agent-client --example file_throughput -- \
//!     unix:/tmp/kva.sock /var/tmp/kva-bench 256 1024 4 $(pidof kvm-manager-agent)
//! ```
//!
//! Arguments: TARGET GUEST_DIR [SIZE_MIB=256] [CHUNK_KIB=1024] [PIPELINE=4]
//! [AGENT_PID]. With the agent's pid it also prints the agent's peak resident
//! memory (VmHWM), which counts from the agent's start, and its CPU time a
//! byte beside the client's.

// The client's file transfer is unix-only for now: on other hosts this
// example only says so.
#[cfg(not(unix))]
fn main() {
    eprintln!("file_throughput: the client's file transfer is available on unix hosts only");
    std::process::exit(2);
}

#[cfg(unix)]
use std::time::Instant;

#[cfg(unix)]
use kvm_agent_client::files::{self, TransferOptions};
#[cfg(unix)]
use kvm_agent_client::{Client, ClientOptions, Target};

#[cfg(unix)]
fn vm_hwm_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) of a process so far, in clock ticks (100 a second).
#[cfg(unix)]
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// What each side spent on a transfer: CPU nanoseconds a byte.
#[cfg(unix)]
fn cpu_line(pid: Option<&str>, before: (Option<u64>, Option<u64>), bytes: usize) -> String {
    let per_byte = |ticks: u64| ticks as f64 * 1e7 / bytes as f64;
    let mut parts = Vec::new();
    if let (Some(a), Some(b)) = (before.0, cpu_ticks("self")) {
        parts.push(format!("client {:.2} ns/B", per_byte(b - a)));
    }
    if let (Some(a), Some(b)) = (before.1, pid.and_then(cpu_ticks)) {
        parts.push(format!("agent {:.2} ns/B", per_byte(b - a)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; CPU {}", parts.join(", "))
    }
}

#[cfg(unix)]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: file_throughput TARGET GUEST_DIR [SIZE_MIB] [CHUNK_KIB] [PIPELINE] [AGENT_PID]";
    let target: Target = args.first().expect(usage).parse().expect("a target");
    let guest_dir = args.get(1).expect(usage).trim_end_matches('/').to_owned();
    let mib: usize = args.get(2).map_or(256, |s| s.parse().expect("MiB"));
    let chunk_kib: u32 = args.get(3).map_or(1024, |s| s.parse().expect("KiB"));
    let pipeline: usize = args.get(4).map_or(4, |s| s.parse().expect("a depth"));
    let pid = args.get(5).cloned();

    let local = std::env::temp_dir().join(format!("kva-throughput-{}", std::process::id()));
    let back = local.with_extension("back");
    let mut data = vec![0u8; mib << 20];
    let mut x = 0x2545F4914F6CDD1Du64;
    for w in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    std::fs::write(&local, &data).expect("write the local file");
    drop(data);

    let options = ClientOptions {
        call_timeout: std::time::Duration::from_secs(300),
        ..ClientOptions::default()
    };
    let client = Client::connect(target, options).await.expect("connect");
    let opts = TransferOptions {
        overwrite: true,
        chunk_bytes: chunk_kib * 1024,
        pipeline,
        ..TransferOptions::default()
    };
    let guest = format!("{guest_dir}/throughput.bin");
    let rss = |what: &str| {
        if let Some(kib) = pid.as_deref().and_then(vm_hwm_kib) {
            println!(
                "agent peak RSS after {what}: {:.1} MiB",
                kib as f64 / 1024.0
            );
        }
    };
    rss("start");
    let bytes = mib << 20;
    let cpu = || (cpu_ticks("self"), pid.as_deref().and_then(cpu_ticks));
    let before = cpu();
    let t = Instant::now();
    let up = files::upload(&client, &local, &guest, &opts, &mut |_, _| {})
        .await
        .expect("upload");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "upload   {mib} MiB in {secs:.3} s: {:.0} MiB/s (chunks {chunk_kib} KiB, {pipeline} in flight, sha256 {}){}",
        mib as f64 / secs,
        &up.sha256[..16],
        cpu_line(pid.as_deref(), before, bytes)
    );
    rss("upload");
    let before = cpu();
    let t = Instant::now();
    let down = files::download(&client, &guest, &back, &opts, &mut |_, _| {})
        .await
        .expect("download");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "download {mib} MiB in {secs:.3} s: {:.0} MiB/s (sha256 {}){}",
        mib as f64 / secs,
        &down.sha256[..16],
        cpu_line(pid.as_deref(), before, bytes)
    );
    rss("download");
    assert_eq!(up.sha256, down.sha256);
    let _ = std::fs::remove_file(&local);
    let _ = std::fs::remove_file(&back);
    let _ = std::fs::remove_file(&guest);
}
