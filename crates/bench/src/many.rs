//! Many hosts and many agents: 1,000 connections to one agent at once, one
//! connection after another, and one client process talking to a fleet of
//! agents at once.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use kvm_agent_client::protocol::methods::info::GetInfoParams;
use kvm_agent_client::{Client, ClientOptions, Target};

use crate::agents::{Agent, Kind, Setup};
use crate::procfs;
use crate::report::{fmt_num, fmt_time, percentiles, Better, Fig, Report};
use crate::wire::{kva_frame, qga_request, Kva, Qga};
use crate::Plan;

type Res<T = ()> = Result<T, String>;

/// Bound on each phase of these benchmarks.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

fn runtime() -> Res<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

async fn read_frame(s: &mut UnixStream, body: &mut Vec<u8>) -> io::Result<()> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await?;
    body.resize(u32::from_be_bytes(header) as usize, 0);
    s.read_exact(body).await?;
    Ok(())
}

/// One of the concurrent connections: connect, agent_ready, wait for all the
/// others, then `pings` sequential pings.
async fn pinger(
    path: PathBuf,
    pings: usize,
    barrier: Arc<tokio::sync::Barrier>,
) -> io::Result<Vec<Duration>> {
    let mut s = UnixStream::connect(&path).await?;
    let mut body = Vec::new();
    read_frame(&mut s, &mut body).await?;
    barrier.wait().await;
    let mut samples = Vec::with_capacity(pings);
    for i in 0..pings {
        let frame = kva_frame(i as u64 + 1, "ping", None);
        let t = Instant::now();
        s.write_all(&frame).await?;
        loop {
            read_frame(&mut s, &mut body).await?;
            if body.starts_with(br#"{"jsonrpc":"2.0","id":"#) {
                break;
            }
        }
        samples.push(t.elapsed());
    }
    Ok(samples)
}

/// 1,000 connections to our listener at once, each pinging; qemu-ga serves
/// one client at a time, shown with two; both agents one connection after
/// another.
pub fn connections(setup: &Setup, plan: &Plan, report: &mut Report) -> Res {
    let ours = setup
        .start(Kind::Ours, "conns-ours")
        .map_err(|e| format!("start our agent: {e}"))?;
    let qga = setup
        .start(Kind::Qga, "conns-qga")
        .map_err(|e| format!("start qemu-ga: {e}"))?;

    // One connection after another (connect, ping, close), first, while
    // both agents are fresh: right after the 1,000 connections, their
    // teardown was counted too (700 µs a connection instead of ~100).
    let seq = plan.sequential_connections;
    let mut rows = Vec::new();
    for agent in [&ours, &qga] {
        let cpu0 = procfs::cpu(agent.pid);
        let started = Instant::now();
        for _ in 0..seq {
            match agent.kind {
                Kind::Ours => {
                    let mut c = Kva::connect(&agent.sock).map_err(|e| format!("connect: {e}"))?;
                    c.call_raw("ping", None).map_err(|e| format!("ping: {e}"))?;
                }
                Kind::Qga => {
                    let mut c =
                        Qga::connect_plain(&agent.sock).map_err(|e| format!("connect: {e}"))?;
                    c.call_raw("guest-ping", None)
                        .map_err(|e| format!("guest-ping: {e}"))?;
                }
            }
        }
        let per = started.elapsed() / seq as u32;
        rows.push((
            per,
            procfs::cpu(agent.pid).saturating_sub(cpu0) / seq as u32,
        ));
    }
    report.row(
        format!(
            "{} connections one after another (connect, ping, close): time per connection",
            fmt_num(seq as f64)
        ),
        Fig::time(rows[0].0),
        Fig::time(rows[1].0),
        Better::Lower,
    );
    report.row(
        "agent CPU per such connection",
        Fig::time(rows[0].1),
        Fig::time(rows[1].1),
        Better::Lower,
    );

    let n = plan.connections;
    let pings = plan.pings_per_connection;
    let rt = runtime()?;
    let rss_before = procfs::rss_kib(ours.pid);
    let (connect_time, ping_time, mut samples, rss_open, cpu) = rt.block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
        let mut tasks = tokio::task::JoinSet::new();
        let started = Instant::now();
        for _ in 0..n {
            tasks.spawn(pinger(ours.sock.clone(), pings, barrier.clone()));
        }
        tokio::time::timeout(PHASE_TIMEOUT, barrier.wait())
            .await
            .map_err(|_| format!("{n} connections did not all get agent_ready in time"))?;
        let connect_time = started.elapsed();
        let rss_open = procfs::rss_kib(ours.pid);
        let cpu0 = procfs::cpu(ours.pid);
        let started = Instant::now();
        let mut samples = Vec::with_capacity(n * pings);
        while let Some(done) = tokio::time::timeout(PHASE_TIMEOUT, tasks.join_next())
            .await
            .map_err(|_| "the concurrent pings did not finish in time".to_string())?
        {
            let s = done
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("a connection failed: {e}"))?;
            samples.extend(s);
        }
        Ok::<_, String>((
            connect_time,
            started.elapsed(),
            samples,
            rss_open,
            procfs::cpu(ours.pid).saturating_sub(cpu0),
        ))
    })?;
    drop(rt);
    let (p50, p99) = percentiles(&mut samples);
    let total = n * pings;
    let rate = total as f64 / ping_time.as_secs_f64();

    // qemu-ga: a second client waits until the first one leaves.
    let one_at_a_time =
        qga_one_at_a_time(&qga.sock).map_err(|e| format!("qemu-ga, two clients: {e}"))?;

    report.row(
        format!(
            "{} connections at once to one agent, each pinging {pings} times: pings/s",
            fmt_num(n as f64)
        ),
        Fig::rate(rate, "pings/s"),
        Fig::text("not possible: serves one client at a time"),
        Better::Higher,
    );

    let mut detail = String::new();
    let _ = writeln!(
        detail,
        "Ours: {} connections opened at once from one client process (tokio, 2 threads), \
         each waited for its `agent_ready` ({} for all of them), then each sent {pings} \
         pings one after another, all connections at the same time: {} pings in {} \
         ({} pings/s), round trip p50 {} and p99 {} under that load, agent CPU {:.2} s. \
         The agent's VmRSS went from {:.1} MiB to {:.1} MiB with the connections open \
         (`[limits] max_connections` raised to 1,100 for this; the default is 64).\n",
        fmt_num(n as f64),
        fmt_time(connect_time),
        fmt_num(total as f64),
        fmt_time(ping_time),
        fmt_num(rate),
        fmt_time(p50),
        fmt_time(p99),
        cpu.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_open as f64 / 1024.0,
    );
    let _ = writeln!(detail, "qemu-ga: {one_at_a_time}\n");
    report.detail("Many connections", detail);
    Ok(())
}

/// Show that qemu-ga answers a second client only once the first has gone.
fn qga_one_at_a_time(sock: &Path) -> io::Result<String> {
    let first = Qga::connect(sock)?;
    let mut second = Qga::connect_plain(sock)?;
    second.send(qga_request("guest-ping", None).as_bytes())?;
    let wait = Duration::from_secs(1);
    second.set_read_timeout(Some(wait))?;
    let answered_early = second.read_line().is_ok();
    let closed = Instant::now();
    drop(first);
    second.set_read_timeout(Some(crate::wire::IO_TIMEOUT))?;
    second.read_ok()?;
    let after = closed.elapsed();
    Ok(if answered_early {
        "a second client was answered while the first one was still connected \
         (not what qemu-ga 10.0 did when this was written)"
            .to_string()
    } else {
        format!(
            "its unix-listen transport serves one client at a time. A second client's \
             connect() succeeds (the kernel's backlog), but its guest-ping got no answer \
             during {} while the first client stayed connected; it was answered {} after \
             the first one closed. So 1,000 concurrent connections cannot be measured; the \
             one-after-another figure is the comparable one.",
            fmt_time(wait),
            fmt_time(after)
        )
    })
}

async fn qga_info(path: PathBuf, methods: &'static [&'static str]) -> io::Result<()> {
    let s = UnixStream::connect(&path).await?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    for m in methods {
        w.write_all(qga_request(m, None).as_bytes()).await?;
        line.clear();
        r.read_until(b'\n', &mut line).await?;
        if !line.starts_with(br#"{"return""#) {
            return Err(io::Error::other(format!(
                "{m}: {}",
                String::from_utf8_lossy(&line)
            )));
        }
    }
    Ok(())
}

/// One client process, a fleet of agents (one process each, on its own
/// socket): get_info from all of them at once.
pub fn fleet(setup: &Setup, plan: &Plan, report: &mut Report) -> Res {
    let n = plan.fleet;
    let mut figs = Vec::new();
    let mut detail = String::new();
    for kind in [Kind::Ours, Kind::Qga] {
        let started = Instant::now();
        let mut agents: Vec<Agent> = Vec::with_capacity(n);
        for i in 0..n {
            agents.push(
                setup
                    .spawn(kind, &format!("fleet-{i}"))
                    .map_err(|e| format!("spawn agent {i}: {e}"))?,
            );
        }
        for a in &mut agents {
            a.first_answer().map_err(|e| format!("fleet agent: {e}"))?;
        }
        let up = started.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let rss: u64 = agents.iter().map(|a| procfs::rss_kib(a.pid)).sum();
        let socks: Vec<PathBuf> = agents.iter().map(|a| a.sock.clone()).collect();
        let rt = runtime()?;
        let cpu0 = procfs::self_cpu();
        let started = Instant::now();
        match kind {
            Kind::Ours => rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for s in socks {
                    set.spawn(async move {
                        let options = ClientOptions {
                            connect_timeout: PHASE_TIMEOUT,
                            call_timeout: PHASE_TIMEOUT,
                            ..ClientOptions::default()
                        };
                        let client = Client::connect(Target::Unix(s), options).await?;
                        client.get_info(&GetInfoParams::default()).await?;
                        Ok::<_, kvm_agent_client::ClientError>(())
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())?
                        .map_err(|e| format!("get_info: {e}"))?;
                }
                Ok::<_, String>(())
            })?,
            Kind::Qga => rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for s in socks {
                    set.spawn(qga_info(s, crate::host::QGA_INFO));
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())?
                        .map_err(|e| format!("qemu-ga info: {e}"))?;
                }
                Ok::<_, String>(())
            })?,
        }
        let took = started.elapsed();
        let client_cpu = procfs::self_cpu().saturating_sub(cpu0);
        drop(rt);
        let _ = writeln!(
            detail,
            "- {}: {n} processes started and answering in {}; together {:.0} MiB resident \
             ({:.1} MiB each); {} for the client to connect to all and get the answers, \
             client CPU {:.2} s.",
            kind.name(),
            fmt_time(up),
            rss as f64 / 1024.0,
            rss as f64 / 1024.0 / n as f64,
            fmt_time(took),
            client_cpu.as_secs_f64()
        );
        figs.push((took, client_cpu, rss));
        drop(agents);
    }
    let names: Vec<&str> = crate::host::QGA_INFO
        .iter()
        .map(|m| m.trim_start_matches("guest-"))
        .collect();
    report.row(
        format!(
            "one client, {n} agents at once (one process each): connect + `get_info` from all, \
             total time (qemu-ga: {})",
            names.join(" + ")
        ),
        Fig::time(figs[0].0),
        Fig::time(figs[1].0),
        Better::Lower,
    );
    report.row(
        "client CPU for that",
        Fig::time(figs[0].1),
        Fig::time(figs[1].1),
        Better::Lower,
    );
    report.row(
        format!("memory of the {n} idle agents, VmRSS summed"),
        Fig::mib(figs[0].2),
        Fig::mib(figs[1].2),
        Better::Lower,
    );
    report.detail(
        format!("{n} agents, one client"),
        format!(
            "The client is one process with a 2-thread tokio runtime; ours through the client \
             library (`Client::connect` + `get_info` per agent), qemu-ga through the benchmark's \
             own async client (the four calls in a row per agent), every agent at once. The \
             machine has 2 cores for the client and all the agents.\n\n{detail}"
        ),
    );
    Ok(())
}
