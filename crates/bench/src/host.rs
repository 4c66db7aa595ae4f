//! The single-agent figures on this machine: round trips, pipelining,
//! information methods, exec, idle memory, binary size, start-up.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agents::{Kind, Setup};
use crate::procfs;
use crate::report::{fmt_time, percentiles, Better, Fig, Report};
use crate::wire::{kva_frame, qga_request, Kva, Qga};
use crate::Plan;

type Res<T = ()> = Result<T, String>;

fn e(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Sequential calls: `n` timed after `warm` untimed; returns the samples
/// and the agent's CPU time over the timed ones.
fn timed(
    pid: u32,
    warm: usize,
    n: usize,
    mut call: impl FnMut() -> io::Result<()>,
) -> io::Result<(Vec<Duration>, Duration)> {
    for _ in 0..warm {
        call()?;
    }
    let cpu0 = procfs::cpu(pid);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        call()?;
        samples.push(t.elapsed());
    }
    Ok((samples, procfs::cpu(pid).saturating_sub(cpu0)))
}

fn per_call_cpu(cpu: Duration, n: usize) -> String {
    fmt_time(cpu / n.max(1) as u32)
}

/// Ping round trips, pipelined pings, information methods and exec, with
/// one agent of each kind; also their idle memory.
pub fn requests(setup: &Setup, plan: &Plan, report: &mut Report) -> Res {
    let ours = setup
        .start(Kind::Ours, "ours")
        .map_err(e("start our agent"))?;
    let qga = setup.start(Kind::Qga, "qga").map_err(e("start qemu-ga"))?;
    // Idle: started, one ping answered, a second to settle.
    std::thread::sleep(Duration::from_secs(1));
    report.value("idle_rss_ours_kib", procfs::rss_kib(ours.pid) as f64);
    report.row(
        "agent RSS idle (VmRSS after start and one ping)",
        Fig::mib(procfs::rss_kib(ours.pid)),
        Fig::mib(procfs::rss_kib(qga.pid)),
        Better::Lower,
    );

    let mut kva = Kva::connect(&ours.sock).map_err(e("connect to our agent"))?;
    let mut q = Qga::connect(&qga.sock).map_err(e("connect to qemu-ga"))?;
    let n = plan.pings;
    let warm = n / 10;
    let (mut so, co) =
        timed(ours.pid, warm, n, || kva.call_raw("ping", None).map(|_| ())).map_err(e("ping"))?;
    let (mut sq, cq) = timed(qga.pid, warm, n, || {
        q.call_raw("guest-ping", None).map(|_| ())
    })
    .map_err(e("guest-ping"))?;
    let (o50, o99) = percentiles(&mut so);
    let (q50, q99) = percentiles(&mut sq);
    report.value("ping_p50_ours", o50.as_secs_f64());
    report.value("ping_p50_qga", q50.as_secs_f64());
    report.row(
        format!(
            "ping round trip p50, sequential ({} pings; qemu-ga: guest-ping)",
            crate::report::fmt_num(n as f64)
        ),
        Fig::time(o50),
        Fig::time(q50),
        Better::Lower,
    );
    report.row(
        "ping round trip p99, sequential",
        Fig::time(o99),
        Fig::time(q99),
        Better::Lower,
    );
    report.row(
        "agent CPU per sequential ping",
        Fig::new(co.as_secs_f64() / n as f64, per_call_cpu(co, n)),
        Fig::new(cq.as_secs_f64() / n as f64, per_call_cpu(cq, n)),
        Better::Lower,
    );

    // Pipelined: a writer thread sends every request at once; this thread
    // reads the answers.
    let np = plan.pipelined;
    let (ro, po) = pipelined_ours(&mut kva, ours.pid, np).map_err(e("pipelined ping"))?;
    let (rq, pq) = pipelined_qga(&mut q, qga.pid, np).map_err(e("pipelined guest-ping"))?;
    report.value("pipelined_ours", ro);
    report.value("pipelined_qga", rq);
    report.row(
        format!(
            "pipelined pings, requests/s ({} on one connection)",
            crate::report::fmt_num(np as f64)
        ),
        Fig::rate(ro, "req/s"),
        Fig::rate(rq, "req/s"),
        Better::Higher,
    );
    report.row(
        "agent CPU per pipelined ping",
        Fig::new(po.as_secs_f64() / np as f64, per_call_cpu(po, np)),
        Fig::new(pq.as_secs_f64() / np as f64, per_call_cpu(pq, np)),
        Better::Lower,
    );

    info_methods(&mut kva, &mut q, ours.pid, qga.pid, plan, report)?;
    exec(&mut kva, &mut q, ours.pid, qga.pid, plan, report)?;
    Ok(())
}

fn pipelined_ours(kva: &mut Kva, pid: u32, n: usize) -> io::Result<(f64, Duration)> {
    let mut all = Vec::with_capacity(n * 48);
    for id in 0..n as u64 {
        all.extend_from_slice(&kva_frame(1_000_000 + id, "ping", None));
    }
    let mut writer = kva.try_clone_writer()?;
    let cpu0 = procfs::cpu(pid);
    let started = Instant::now();
    let sender = std::thread::spawn(move || writer.write_all(&all));
    let mut answers = 0;
    while answers < n {
        let body = kva.read_frame()?;
        if body.starts_with(br#"{"jsonrpc":"2.0","id":"#) {
            if !crate::wire::contains(body, br#""result""#) {
                return Err(io::Error::other(format!(
                    "a pipelined ping failed: {}",
                    String::from_utf8_lossy(body)
                )));
            }
            answers += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    sender.join().expect("writer thread")?;
    Ok((n as f64 / secs, procfs::cpu(pid).saturating_sub(cpu0)))
}

fn pipelined_qga(q: &mut Qga, pid: u32, n: usize) -> io::Result<(f64, Duration)> {
    let one = qga_request("guest-ping", None);
    let all = one.repeat(n).into_bytes();
    let mut writer = q.try_clone_writer()?;
    let cpu0 = procfs::cpu(pid);
    let started = Instant::now();
    let sender = std::thread::spawn(move || writer.write_all(&all));
    for _ in 0..n {
        q.read_ok()?;
    }
    let secs = started.elapsed().as_secs_f64();
    sender.join().expect("writer thread")?;
    Ok((n as f64 / secs, procfs::cpu(pid).saturating_sub(cpu0)))
}

/// qemu-ga's nearest equivalents of get_info and get_metrics.
pub const QGA_INFO: &[&str] = &[
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-timezone",
    "guest-network-get-interfaces",
];
const QGA_METRICS: &[&str] = &[
    "guest-get-cpustats",
    "guest-get-load",
    "guest-get-diskstats",
    "guest-get-fsinfo",
    "guest-network-get-interfaces",
];

fn info_methods(
    kva: &mut Kva,
    q: &mut Qga,
    ours: u32,
    qga: u32,
    plan: &Plan,
    report: &mut Report,
) -> Res {
    let n = plan.info;
    let mut detail = String::from(
        "Sequential calls on one connection; p50 / p99, and the agent's CPU time per call.\n\n\
         | agent | method(s) | p50 | p99 | agent CPU per call |\n|---|---|---|---|---|\n",
    );
    let mut line = |agent: &str, what: &str, s: &mut Vec<Duration>, cpu: Duration| {
        let (p50, p99) = percentiles(s);
        let _ = writeln!(
            detail,
            "| {agent} | {what} | {} | {} | {} |",
            fmt_time(p50),
            fmt_time(p99),
            per_call_cpu(cpu, s.len())
        );
        p50
    };
    let mut result = Vec::new();
    for (ours_method, qga_methods) in [("get_info", QGA_INFO), ("get_metrics", QGA_METRICS)] {
        let (mut s, c) = timed(ours, n / 10, n, || {
            kva.call_raw(ours_method, None).map(|_| ())
        })
        .map_err(e(ours_method))?;
        let o = line("ours", &format!("`{ours_method}`"), &mut s, c);
        for m in qga_methods {
            let (mut s, c) =
                timed(qga, n / 10, n, || q.call_raw(m, None).map(|_| ())).map_err(e(m))?;
            line("qemu-ga", &format!("`{m}`"), &mut s, c);
        }
        let (mut s, c) = timed(qga, n / 10, n, || {
            for m in qga_methods {
                q.call_raw(m, None)?;
            }
            Ok(())
        })
        .map_err(e("qemu-ga sequence"))?;
        let names: Vec<String> = qga_methods.iter().map(|m| format!("`{m}`")).collect();
        let seq = line(
            "qemu-ga",
            &format!("all of {}", names.join(" + ")),
            &mut s,
            c,
        );
        result.push((ours_method, o, seq, qga_methods));
    }
    for (m, o, q, qms) in result {
        let names: Vec<&str> = qms.iter().map(|m| m.trim_start_matches("guest-")).collect();
        report.row(
            format!("`{m}` p50 (qemu-ga: {} in a row)", names.join(" + ")),
            Fig::time(o),
            Fig::time(q),
            Better::Lower,
        );
    }
    report.detail("Information methods", detail);
    Ok(())
}

fn exec(kva: &mut Kva, q: &mut Qga, ours: u32, qga: u32, plan: &Plan, report: &mut Report) -> Res {
    let n = plan.exec;
    let (mut so, co) = timed(ours, n / 10, n, || {
        let body = kva.call_raw("exec", Some(r#"{"command":"/bin/true"}"#))?;
        if !crate::wire::contains(body, br#""exit_code":0"#) {
            return Err(io::Error::other(format!(
                "exec /bin/true: {}",
                String::from_utf8_lossy(body)
            )));
        }
        Ok(())
    })
    .map_err(e("exec"))?;
    let mut polls = 0u64;
    let (mut sq, cq) = timed(qga, n / 10, n, || {
        let started = q.call("guest-exec", Some(r#"{"path":"/bin/true"}"#))?;
        let pid = started["pid"].as_u64().unwrap_or(0);
        let args = format!(r#"{{"pid":{pid}}}"#);
        loop {
            polls += 1;
            let status = q.call("guest-exec-status", Some(&args))?;
            if status["exited"] == true {
                if status["exitcode"] != 0 {
                    return Err(io::Error::other(format!("/bin/true: {status}")));
                }
                return Ok(());
            }
        }
    })
    .map_err(e("guest-exec"))?;
    let (o50, _) = percentiles(&mut so);
    let (q50, _) = percentiles(&mut sq);
    report.row(
        format!(
            "exec /bin/true to completion, p50 (qemu-ga: guest-exec, then guest-exec-status \
             back to back until exited, {:.1} polls on average)",
            polls as f64 / (n + n / 10) as f64
        ),
        Fig::time(o50),
        Fig::time(q50),
        Better::Lower,
    );
    report.row(
        "agent CPU per exec (the agent's own, children not counted)",
        Fig::new(co.as_secs_f64() / n as f64, per_call_cpu(co, n)),
        Fig::new(cq.as_secs_f64() / n as f64, per_call_cpu(cq, n)),
        Better::Lower,
    );
    Ok(())
}

/// Start-up: from spawning the process to the first answered request, a
/// fresh process each time.
pub fn startup(setup: &Setup, plan: &Plan, report: &mut Report) -> Res {
    let mut figs = Vec::new();
    for kind in [Kind::Ours, Kind::Qga] {
        let mut samples = Vec::new();
        for i in 0..plan.starts {
            let mut agent = setup
                .spawn(kind, &format!("start-{i}"))
                .map_err(e("spawn"))?;
            samples.push(agent.first_answer().map_err(e("first answer"))?);
        }
        let (p50, _) = percentiles(&mut samples);
        if kind == Kind::Ours {
            report.value("startup_ours_s", p50.as_secs_f64());
        }
        figs.push(Fig::time(p50));
    }
    let qga = figs.pop().unwrap_or_default();
    let ours = figs.pop().unwrap_or_default();
    report.row(
        format!(
            "start to first answered request, median of {} (spawn, connect, ping)",
            plan.starts
        ),
        ours,
        qga,
        Better::Lower,
    );
    Ok(())
}

/// Binary sizes and what they load.
pub fn binaries(setup: &Setup, report: &mut Report) -> Res {
    let mut figs = Vec::new();
    let mut detail = String::new();
    for (name, bin) in [("ours", &setup.ours), ("qemu-ga", &setup.qga)] {
        let size = std::fs::metadata(bin)
            .map_err(|err| format!("{}: {err}", bin.display()))?
            .len();
        let libs = shared_libs(bin);
        let lib_bytes: u64 = libs
            .iter()
            .filter_map(|l| std::fs::metadata(l).ok())
            .map(|m| m.len())
            .sum();
        let names: Vec<String> = libs
            .iter()
            .map(|l| {
                Path::new(l)
                    .file_name()
                    .map_or(l.clone(), |f| f.to_string_lossy().into_owned())
            })
            .collect();
        let _ = writeln!(
            detail,
            "- {name}: {size} bytes{}",
            if libs.is_empty() {
                ", static (ldd: no shared library)".to_string()
            } else {
                format!(
                    " + {lib_bytes} bytes of shared libraries ({})",
                    names.join(", ")
                )
            }
        );
        figs.push((size, libs.len(), lib_bytes));
    }
    let (os, ol, ob) = figs[0];
    let (qs, ql, qb) = figs[1];
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    report.row(
        "binary size (stripped, as shipped)",
        Fig::new(os as f64, format!("{:.2} MiB", mib(os))),
        Fig::new(qs as f64, format!("{:.2} MiB", mib(qs))),
        Better::Lower,
    );
    report.row(
        "shared libraries loaded (ldd), and their size",
        Fig::new(
            (os + ob) as f64,
            if ol == 0 {
                "none (static)".into()
            } else {
                format!("{ol}, {:.2} MiB", mib(ob))
            },
        ),
        Fig::new((qs + qb) as f64, format!("{ql}, {:.2} MiB", mib(qb))),
        Better::Neither,
    );
    report.row(
        "binary + libraries",
        Fig::new((os + ob) as f64, format!("{:.2} MiB", mib(os + ob))),
        Fig::new((qs + qb) as f64, format!("{:.2} MiB", mib(qs + qb))),
        Better::Lower,
    );
    report.detail("Binaries", detail);
    Ok(())
}

/// The shared libraries `ldd` lists with a path (the loader included).
pub fn shared_libs(bin: &Path) -> Vec<String> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_frames() {
        let frame = crate::wire::kva_frame(3, "ping", None);
        let mut body = Vec::new();
        crate::wire::read_kva_frame(&mut &frame[..], &mut body).unwrap();
        assert_eq!(body, br#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#);
    }
}
