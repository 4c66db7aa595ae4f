//! File transfer: a file of random bytes written to the agent and read back,
//! sha256 verified, at several chunk sizes; the agent's CPU time and peak
//! memory per transfer.
//!
//! Ours goes through the client library (`kvm_agent_client::files`: chunked
//! file_open / file_write / file_read / file_close, several chunks in
//! flight, sha256 at both ends). qemu-ga's goes through guest-file-open /
//! -write / -read / -close with base64 chunks; this client computes the
//! sha256 of what comes back, and of what landed after an upload.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use kvm_agent_client::files::{download, upload, TransferOptions};
use kvm_agent_client::{Client, ClientOptions, Target};

use crate::procfs;
use crate::report::fmt_num;
use crate::wire::{qga_request, Qga};

/// One transfer's figures.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub secs: f64,
    pub agent_cpu: Duration,
    pub peak_kib: u64,
    /// VmRSS once the transfer is over.
    pub after_kib: u64,
}

impl Transfer {
    pub fn mib_per_s(&self, bytes: u64) -> f64 {
        bytes as f64 / (1024.0 * 1024.0) / self.secs
    }
}

/// Pseudo-random bytes (xorshift64*): incompressible, reproducible.
pub fn make_file(path: &Path, bytes: usize) -> io::Result<String> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(bytes + 8);
    while out.len() < bytes {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(bytes);
    std::fs::write(path, &out)?;
    Ok(hex(&Sha256::digest(&out)))
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Measure `f` as one transfer of agent `pid` (peak memory reset first).
pub fn measure<T>(
    pid: Option<u32>,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<(T, Transfer), String> {
    if let Some(pid) = pid {
        procfs::reset_peak(pid);
    }
    let cpu0 = pid.map(procfs::cpu).unwrap_or_default();
    let started = Instant::now();
    let out = f()?;
    let secs = started.elapsed().as_secs_f64();
    let (agent_cpu, peak_kib, after_kib) = match pid {
        Some(pid) => (
            procfs::cpu(pid).saturating_sub(cpu0),
            procfs::hwm_kib(pid),
            procfs::rss_kib(pid),
        ),
        None => (Duration::ZERO, 0, 0),
    };
    Ok((
        out,
        Transfer {
            secs,
            agent_cpu,
            peak_kib,
            after_kib,
        },
    ))
}

/// Our agent: upload then download `local` to `remote` through the client
/// library; checks the sha256 the library reports against `sha`.
#[allow(clippy::too_many_arguments)]
pub fn ours_both_ways(
    rt: &tokio::runtime::Runtime,
    target: Target,
    pid: Option<u32>,
    local: &Path,
    remote: &str,
    back: &Path,
    sha: &str,
    chunk: u32,
    pipeline: usize,
) -> Result<(Transfer, Transfer), String> {
    rt.block_on(async {
        let options = ClientOptions {
            call_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(120),
            ..ClientOptions::default()
        };
        let client = Client::connect(target, options)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let opts = TransferOptions {
            overwrite: true,
            chunk_bytes: chunk,
            pipeline,
            ..TransferOptions::default()
        };
        let _ = std::fs::remove_file(back);
        let up = measure_async(pid, async {
            upload(&client, local, remote, &opts, &mut |_, _| {})
                .await
                .map_err(|err| format!("upload: {err}"))
        })
        .await?;
        if up.0.sha256 != sha {
            return Err(format!("upload: sha256 {} != {sha}", up.0.sha256));
        }
        let down = measure_async(pid, async {
            download(&client, remote, back, &opts, &mut |_, _| {})
                .await
                .map_err(|err| format!("download: {err}"))
        })
        .await?;
        if down.0.sha256 != sha {
            return Err(format!("download: sha256 {} != {sha}", down.0.sha256));
        }
        Ok((up.1, down.1))
    })
}

async fn measure_async<T>(
    pid: Option<u32>,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<(T, Transfer), String> {
    if let Some(pid) = pid {
        procfs::reset_peak(pid);
    }
    let cpu0 = pid.map(procfs::cpu).unwrap_or_default();
    let started = Instant::now();
    let out = f.await?;
    let secs = started.elapsed().as_secs_f64();
    let (agent_cpu, peak_kib, after_kib) = match pid {
        Some(pid) => (
            procfs::cpu(pid).saturating_sub(cpu0),
            procfs::hwm_kib(pid),
            procfs::rss_kib(pid),
        ),
        None => (Duration::ZERO, 0, 0),
    };
    Ok((
        out,
        Transfer {
            secs,
            agent_cpu,
            peak_kib,
            after_kib,
        },
    ))
}

#[derive(Deserialize)]
struct ReadAnswer<'a> {
    #[serde(rename = "return", borrow)]
    ret: ReadReturn<'a>,
}

#[derive(Deserialize)]
struct ReadReturn<'a> {
    count: u64,
    #[serde(rename = "buf-b64", borrow)]
    buf: &'a str,
    eof: bool,
}

fn io_err(what: String) -> io::Error {
    io::Error::other(what)
}

fn qga_handle(q: &mut Qga, path: &str, mode: &str) -> io::Result<u64> {
    let args = serde_json::json!({ "path": path, "mode": mode }).to_string();
    q.call("guest-file-open", Some(&args))?
        .as_u64()
        .ok_or_else(|| io_err("guest-file-open returned no handle".into()))
}

/// qemu-ga: write `local` to `remote` with guest-file-write, `chunk` bytes
/// a call, `depth` calls in flight.
pub fn qga_upload(
    q: &mut Qga,
    local: &Path,
    remote: &str,
    chunk: usize,
    depth: usize,
) -> io::Result<()> {
    let mut file = File::open(local)?;
    let total = file.metadata()?.len();
    let handle = qga_handle(q, remote, "w")?;
    let mut buf = vec![0u8; chunk];
    let mut request = String::new();
    let (mut sent, mut in_flight) = (0u64, 0usize);
    while sent < total || in_flight > 0 {
        while sent < total && in_flight < depth {
            let n = (total - sent).min(chunk as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            request.clear();
            let _ = write!(
                request,
                r#"{{"execute":"guest-file-write","arguments":{{"handle":{handle},"buf-b64":""#
            );
            base64_simd::STANDARD.encode_append(&buf[..n], &mut request);
            request.push_str("\"}}\n");
            q.send(request.as_bytes())?;
            sent += n as u64;
            in_flight += 1;
        }
        q.read_ok()?;
        in_flight -= 1;
    }
    q.call(
        "guest-file-close",
        Some(&format!(r#"{{"handle":{handle}}}"#)),
    )?;
    Ok(())
}

/// qemu-ga: read `remote` into `local` with guest-file-read, `chunk` bytes a
/// call, `depth` calls in flight; returns the sha256 of what arrived.
pub fn qga_download(
    q: &mut Qga,
    remote: &str,
    local: &Path,
    chunk: usize,
    depth: usize,
) -> io::Result<String> {
    let handle = qga_handle(q, remote, "r")?;
    let mut out = File::create(local)?;
    let mut hash = Sha256::new();
    let mut decoded = Vec::with_capacity(chunk);
    let read = qga_request(
        "guest-file-read",
        Some(&format!(r#"{{"handle":{handle},"count":{chunk}}}"#)),
    );
    let (mut in_flight, mut eof) = (0usize, false);
    loop {
        while !eof && in_flight < depth {
            q.send(read.as_bytes())?;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        let line = q.read_ok()?;
        in_flight -= 1;
        let answer: ReadAnswer<'_> = serde_json::from_slice(line)
            .map_err(|err| io_err(format!("guest-file-read answer: {err}")))?;
        decoded.clear();
        base64_simd::STANDARD
            .decode_append(answer.ret.buf.as_bytes(), &mut decoded)
            .map_err(|err| io_err(format!("guest-file-read base64: {err}")))?;
        if decoded.len() as u64 != answer.ret.count {
            return Err(io_err("guest-file-read: count and data disagree".into()));
        }
        hash.update(&decoded);
        out.write_all(&decoded)?;
        eof |= answer.ret.eof || answer.ret.count == 0;
    }
    q.call(
        "guest-file-close",
        Some(&format!(r#"{{"handle":{handle}}}"#)),
    )?;
    Ok(hex(&hash.finalize()))
}

/// qemu-ga: upload then download, sha256 checked (the uploaded file as it
/// landed when `landed` names it on this machine, and what came back).
#[allow(clippy::too_many_arguments)]
pub fn qga_both_ways(
    sock: &Path,
    pid: Option<u32>,
    local: &Path,
    remote: &str,
    landed: Option<&Path>,
    back: &Path,
    sha: &str,
    chunk: usize,
    depth: usize,
) -> Result<(Transfer, Transfer), String> {
    let mut q = Qga::connect(sock).map_err(|err| format!("connect to qemu-ga: {err}"))?;
    let ((), up) = measure(pid, || {
        qga_upload(&mut q, local, remote, chunk, depth).map_err(|err| format!("upload: {err}"))
    })?;
    if let Some(landed) = landed {
        let got = sha256_file(landed).map_err(|err| err.to_string())?;
        if got != sha {
            return Err(format!(
                "upload: the file landed with sha256 {got}, not {sha}"
            ));
        }
    }
    let (got, down) = measure(pid, || {
        qga_download(&mut q, remote, back, chunk, depth).map_err(|err| format!("download: {err}"))
    })?;
    if got != sha {
        return Err(format!("download: sha256 {got} != {sha}"));
    }
    Ok((up, down))
}

/// A chunk size as text.
pub fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", fmt_num((bytes >> 20) as f64))
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// One row of the sweep.
struct Swept {
    agent: &'static str,
    chunk: usize,
    depth: usize,
    result: Result<(Transfer, Transfer), String>,
}

/// The file-transfer figures: both agents over their chunk sizes.
pub fn transfers(
    setup: &crate::agents::Setup,
    plan: &crate::Plan,
    report: &mut crate::report::Report,
) -> Result<crate::guest::GuestChunks, String> {
    use crate::agents::Kind;
    use crate::report::{Better, Fig};

    let bytes = plan.file_mib << 20;
    let local = setup.local.join("source.bin");
    let back = setup.local.join("back.bin");
    let sha = make_file(&local, bytes).map_err(|err| format!("make the test file: {err}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| err.to_string())?;
    let mut swept = Vec::new();
    {
        let ours = setup
            .start(Kind::Ours, "files-ours")
            .map_err(|err| format!("start our agent: {err}"))?;
        let remote = setup.files.join("ours.bin");
        for &(chunk, depth) in &plan.ours_chunks {
            let result = ours_both_ways(
                &rt,
                Target::Unix(ours.sock.clone()),
                Some(ours.pid),
                &local,
                &remote.display().to_string(),
                &back,
                &sha,
                chunk as u32,
                depth,
            );
            swept.push(Swept {
                agent: "ours",
                chunk,
                depth,
                result,
            });
        }
        let _ = std::fs::remove_file(&remote);
    }
    {
        let qga = setup
            .start(Kind::Qga, "files-qga")
            .map_err(|err| format!("start qemu-ga: {err}"))?;
        let remote = setup.files.join("qga.bin");
        for &chunk in &plan.qga_chunks {
            let result = qga_both_ways(
                &qga.sock,
                Some(qga.pid),
                &local,
                &remote.display().to_string(),
                Some(&remote),
                &back,
                &sha,
                chunk,
                plan.qga_depth,
            );
            swept.push(Swept {
                agent: "qemu-ga",
                chunk,
                depth: plan.qga_depth,
                result,
            });
        }
        let _ = std::fs::remove_file(&remote);
    }
    let _ = std::fs::remove_file(&local);
    let _ = std::fs::remove_file(&back);

    let mut detail = format!(
        "{} MiB of random bytes written to the agent and read back on this machine (agent's \
         folder and host's file both on tmpfs), sha256 verified each way. Agent CPU is \
         utime+stime for the write and the read together; peak RSS is VmHWM during each \
         transfer (reset before it through /proc/PID/clear_refs); \"after\" is VmRSS once \
         the read is over. qemu-ga reads at most 48 MiB a call, and refuses a write whose \
         base64 text is over its JSON token limit of 64 MiB, which a 48 MiB chunk reaches.\n\n\
         | agent | chunk | in flight | write | read | agent CPU | peak RSS write / read | RSS after |\n\
         |---|---|---|---|---|---|---|---|\n",
        plan.file_mib
    );
    for s in &swept {
        match &s.result {
            Ok((up, down)) => {
                let _ = writeln!(
                    detail,
                    "| {} | {} | {} | {:.0} MiB/s | {:.0} MiB/s | {:.2} s | {:.1} / {:.1} MiB | {:.1} MiB |",
                    s.agent,
                    size_text(s.chunk),
                    s.depth,
                    up.mib_per_s(bytes as u64),
                    down.mib_per_s(bytes as u64),
                    (up.agent_cpu + down.agent_cpu).as_secs_f64(),
                    up.peak_kib as f64 / 1024.0,
                    down.peak_kib as f64 / 1024.0,
                    down.after_kib as f64 / 1024.0
                );
            }
            Err(err) => {
                println!(
                    "bench: {} {} chunks failed: {err}",
                    s.agent,
                    size_text(s.chunk)
                );
                let _ = writeln!(
                    detail,
                    "| {} | {} | {} | failed: {} | | | | |",
                    s.agent,
                    size_text(s.chunk),
                    s.depth,
                    err.split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .replace('|', "/")
                );
            }
        }
    }
    report.detail("File transfer, every chunk size", detail);

    // Best per agent and direction.
    let best = |agent: &str, up: bool| -> Option<(&Swept, Transfer)> {
        swept
            .iter()
            .filter(|s| s.agent == agent)
            .filter_map(|s| {
                let (u, d) = s.result.as_ref().ok()?;
                Some((s, if up { *u } else { *d }))
            })
            .min_by(|a, b| a.1.secs.total_cmp(&b.1.secs))
    };
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut peaks = Vec::new();
    for (up, what) in [
        (true, "write (upload to the agent)"),
        (false, "read (download)"),
    ] {
        let (Some(o), Some(q)) = (best("ours", up), best("qemu-ga", up)) else {
            return Err(format!(
                "file {what}: no chunk size worked for one of the agents"
            ));
        };
        let label = |s: &Swept| format!("{} chunks, {} in flight", size_text(s.chunk), s.depth);
        let (ko, kq) = if up {
            ("write_ours", "write_qga")
        } else {
            ("read_ours", "read_qga")
        };
        report.value(ko, o.1.mib_per_s(bytes as u64));
        report.value(kq, q.1.mib_per_s(bytes as u64));
        report.row(
            format!(
                "file {what}, {} MiB, sha256 verified, best chunk size",
                plan.file_mib
            ),
            Fig::rate(
                o.1.mib_per_s(bytes as u64),
                &format!("MiB/s ({})", label(o.0)),
            ),
            Fig::rate(
                q.1.mib_per_s(bytes as u64),
                &format!("MiB/s ({})", label(q.0)),
            ),
            Better::Higher,
        );
        report.row(
            format!(
                "agent CPU per GiB, file {}, at that chunk size",
                if up { "write" } else { "read" }
            ),
            Fig::new(
                o.1.agent_cpu.as_secs_f64() / gib,
                format!("{:.2} s", o.1.agent_cpu.as_secs_f64() / gib),
            ),
            Fig::new(
                q.1.agent_cpu.as_secs_f64() / gib,
                format!("{:.2} s", q.1.agent_cpu.as_secs_f64() / gib),
            ),
            Better::Lower,
        );
        peaks.push((o.1.peak_kib, q.1.peak_kib));
    }
    report.value(
        "peak_rss_ours_kib",
        peaks.iter().map(|p| p.0).max().unwrap_or(0) as f64,
    );
    report.row(
        "agent peak RSS during those best transfers",
        Fig::mib(peaks.iter().map(|p| p.0).max().unwrap_or(0)),
        Fig::mib(peaks.iter().map(|p| p.1).max().unwrap_or(0)),
        Better::Lower,
    );
    let worst = |agent: &str| {
        swept
            .iter()
            .filter(|s| s.agent == agent)
            .filter_map(|s| s.result.as_ref().ok())
            .map(|(u, d)| u.peak_kib.max(d.peak_kib))
            .max()
            .unwrap_or(0)
    };
    report.row(
        "agent peak RSS, largest over every chunk size tried",
        Fig::mib(worst("ours")),
        Fig::mib(worst("qemu-ga")),
        Better::Lower,
    );
    if plan.smoke {
        if let Some(failed) = swept.iter().find_map(|s| s.result.as_ref().err()) {
            return Err(format!("a transfer failed: {failed}"));
        }
    }
    // The guest's transfers use each agent's best size, both ways together.
    let both = |agent: &str| {
        swept
            .iter()
            .filter(|s| s.agent == agent)
            .filter_map(|s| {
                let (u, d) = s.result.as_ref().ok()?;
                Some((s.chunk, s.depth, u.secs + d.secs))
            })
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map_or((1 << 20, 2), |(c, d, _)| (c, d))
    };
    Ok(crate::guest::GuestChunks {
        ours: both("ours"),
        qga: both("qemu-ga"),
    })
}
