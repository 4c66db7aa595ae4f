//! Long runs against the real agent binary, measuring its resources from
//! /proc (RSS, open descriptors, CPU ticks), never durations:
//!
//! - a million mixed requests, pipelined on four connections: RSS and
//!   descriptors sampled along the way do not grow;
//! - a gibibyte of garbage (plausibly framed junk, then unframed random
//!   bytes): at most one reply per frame, RSS bounded by the frame limit,
//!   and the agent still serving.
//!
//! Both need the `soak` feature (so the debug run of `cargo test` does not
//! build them) and run in release mode by `cargo xtask test soak` (`cargo
//! test --release -p kvm-manager-agent --features soak --test soak --
//! --nocapture`), which prints the figures docs/reliability.md reports.

#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Agent;
use kvm_agent_protocol::frame::{Decoded, FrameDecoder};
use serde_json::Value;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

// ------------------------------------------------------- a million requests

const TOTAL: u64 = 1_000_000;
const CONNECTIONS: u64 = 4;
/// Frames written before their replies are read (below the default
/// `max_requests_per_connection`, 64).
const DEPTH: u64 = 32;

/// Request `i` of the mix, and how many reply frames it earns.
fn mixed(i: u64) -> (String, u64) {
    let id = i;
    match i % 100 {
        0..=44 => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#),
            1,
        ),
        45..=59 => (
            format!(r#"{{"jsonrpc":"2.0","id":"c{id}","method":"get_capabilities"}}"#),
            1,
        ),
        60..=66 => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"no_such_method"}}"#),
            1,
        ),
        67..=73 => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping","params":{{"x":1}}}}"#),
            1,
        ),
        74..=78 => (format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"#), 1),
        79..=83 => (
            format!(
                r#"[{{"jsonrpc":"2.0","id":{id},"method":"ping"}},{{"jsonrpc":"2.0","method":"ping"}},{{"jsonrpc":"2.0","id":"b{id}","method":"get_capabilities"}}]"#
            ),
            1,
        ),
        84..=88 => (r#"{"jsonrpc":"2.0","method":"ping"}"#.to_owned(), 0),
        89..=93 => (
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"exec","params":{{"command":"uname"}}}}"#
            ),
            1,
        ),
        94..=96 => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"get_info"}}"#),
            1,
        ),
        97..=98 => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"get_metrics"}}"#),
            1,
        ),
        _ => (
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"get_users"}}"#),
            1,
        ),
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    done: u64,
    rss_kib: u64,
    fds: usize,
    cpu_ticks: u64,
}

#[test]
fn a_million_mixed_requests_leave_rss_and_descriptors_flat() {
    let agent = Agent::start("");
    let pid = agent.child.id();
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..CONNECTIONS {
        let mut c = agent.connect();
        let done = done.clone();
        workers.push(std::thread::spawn(move || {
            let mut errors = [0u64; 4];
            let mut i = w;
            while i < TOTAL {
                let mut frames = Vec::new();
                let mut expected = 0;
                for _ in 0..DEPTH {
                    if i >= TOTAL {
                        break;
                    }
                    let (body, replies) = mixed(i);
                    frames.extend_from_slice(&(body.len() as u32).to_be_bytes());
                    frames.extend_from_slice(body.as_bytes());
                    expected += replies;
                    i += CONNECTIONS;
                }
                c.send_raw(&frames);
                for _ in 0..expected {
                    let reply: Value = c.recv();
                    let code = reply.get("error").map(|e| e["code"].as_i64().unwrap());
                    match code {
                        None => {}
                        Some(-32601 | -32602 | -32700 | -32000) => {}
                        Some(other) => panic!("unexpected reply {reply} ({other})"),
                    }
                    errors[0] += u64::from(code.is_some());
                }
                done.fetch_add(DEPTH, Ordering::Relaxed);
            }
            c.assert_ping_is_next();
            (c, errors[0])
        }));
    }
    let sample = |done: u64| Sample {
        done,
        rss_kib: rss_kib(pid),
        fds: fds(pid),
        cpu_ticks: cpu_ticks(pid),
    };
    let mut samples = Vec::new();
    let mut next = TOTAL / 10;
    while workers.iter().any(|w| !w.is_finished()) {
        let d = done.load(Ordering::Relaxed);
        if d >= next {
            samples.push(sample(d));
            next += TOTAL / 10;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conns = Vec::new();
    let mut error_replies = 0;
    for w in workers {
        let (c, e) = w.join().unwrap();
        conns.push(c);
        error_replies += e;
    }
    let end = sample(done.load(Ordering::Relaxed));
    samples.push(end);
    for s in &samples {
        println!(
            "soak: {:>8} requests: RSS {:>6} KiB, {:>3} fds, {:>5} CPU ticks",
            s.done, s.rss_kib, s.fds, s.cpu_ticks
        );
    }
    println!("soak: {error_replies} error replies (as the mix intends)");
    // The first sample (10%) is after warm-up: buffers and caches at their
    // working size. From there on nothing may grow: descriptors not at all,
    // RSS by no more than 8 MiB (allocator slack; a leak of even 10 bytes a
    // request would add 8.6 MiB over the other 90%).
    let warm = samples[0];
    assert!(end.fds <= warm.fds, "descriptors grew: {samples:?}");
    assert!(
        end.rss_kib <= warm.rss_kib + 8 * 1024,
        "RSS grew: {samples:?}"
    );
    drop(conns);
    let mut last = agent.connect();
    last.assert_ping_is_next();
}

// --------------------------------------------------- a gibibyte of garbage

const GIB: usize = 1 << 30;

/// xorshift64: reproducible junk, the same on every run.
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Plausibly framed junk: mostly small frames of random bytes (some
    /// JSON-looking), some large ones up to the limit, some announcing
    /// more than the limit with their bodies following.
    fn framed(&mut self, out: &mut Vec<u8>, max: u32) {
        let kind = self.next() % 1000;
        let len = match kind {
            0..=989 => (self.next() % 4096) as u32,
            990..=994 => (self.next() % u64::from(max)) as u32,
            _ => max + 1 + (self.next() % (4 << 20)) as u32,
        };
        out.extend_from_slice(&len.to_be_bytes());
        let start = out.len();
        out.resize(start + len as usize, 0);
        self.fill(&mut out[start..]);
        if kind % 7 == 0 && len > 2 {
            out[start] = b'{';
        }
        if kind % 11 == 0 && len > 2 {
            out[start] = b'[';
        }
    }
}

/// Read frames from the agent until EOF or the answer to the ping with id
/// "after"; count the errors and the results.
fn drain(mut stream: std::os::unix::net::UnixStream) -> (u64, u64) {
    let mut dec = FrameDecoder::new(u32::MAX);
    let mut buf = vec![0u8; 1 << 16];
    let (mut errors, mut results) = (0, 0);
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (errors, results),
            Ok(n) => n,
        };
        let mut input = &buf[..n];
        while !input.is_empty() {
            let (used, ev) = dec.decode(input);
            input = &input[used..];
            if let Some(Decoded::Frame(body)) = ev {
                let v: Value = serde_json::from_slice(&body).expect("the agent sends JSON");
                if v.get("error").is_some() {
                    errors += 1;
                } else {
                    assert_eq!(v["id"], "after", "garbage earned a result: {v}");
                    results += 1;
                    return (errors, results);
                }
            }
        }
    }
}

#[test]
fn a_gibibyte_of_garbage_keeps_rss_bounded_and_the_agent_serving() {
    const MAX: u32 = 16 << 20; // the default max_frame_bytes
    let agent = Agent::start("");
    let pid = agent.child.id();
    let baseline = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while stop.load(Ordering::Relaxed) == 0 {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let ticks_before = cpu_ticks(pid);

    // 1 GiB of framed junk; count the frames as the agent will see them.
    let c = agent.connect();
    let reader = {
        let s = c.stream.try_clone().unwrap();
        std::thread::spawn(move || drain(s))
    };
    let mut junk = Junk(0x9e37_79b9_7f4a_7c15);
    let mut ours = FrameDecoder::new(MAX);
    let mut sent = 0usize;
    let mut events = 0u64;
    let mut w = c.stream.try_clone().unwrap();
    let mut buf = Vec::with_capacity(32 << 20);
    while sent < GIB {
        buf.clear();
        while buf.len() < 8 << 20 {
            junk.framed(&mut buf, MAX);
        }
        let mut input = &buf[..];
        while !input.is_empty() {
            let (used, ev) = ours.decode(input);
            input = &input[used..];
            events += u64::from(ev.is_some());
        }
        w.write_all(&buf).unwrap();
        sent += buf.len();
    }
    // End on a frame boundary, then close our side: the agent answers what
    // it has and closes.
    assert!(ours.is_idle());
    // A ping after the garbage: its answer comes after the garbage's
    // (a host that closes its side loses the answers still owed to it).
    let mut c = c;
    c.send(br#"{"jsonrpc":"2.0","id":"after","method":"ping"}"#);
    let (replies, pings) = reader.join().unwrap();
    drop(c);

    // 256 MiB of unframed random bytes on another connection: whatever the
    // first four bytes announce, the agent skips or buffers within limits.
    let mut raw = agent.connect();
    let mut block = vec![0u8; 4 << 20];
    let mut raw_sent = 0;
    let raw_reader = {
        let s = raw.stream.try_clone().unwrap();
        std::thread::spawn(move || drain(s))
    };
    while raw_sent < GIB / 4 {
        junk.fill(&mut block);
        raw.send_raw(&block);
        raw_sent += block.len();
    }
    raw.stream.shutdown(std::net::Shutdown::Both).unwrap();
    let (raw_replies, _) = raw_reader.join().unwrap();

    // Still serving, on a fresh connection.
    let mut fresh = agent.connect();
    fresh.assert_ping_is_next();
    stop.store(1, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let end = rss_kib(pid);
    println!(
        "garbage: {sent} framed bytes in {events} frames, {replies} error replies, \
         {pings} ping answer; \
         {raw_sent} unframed bytes, {raw_replies} replies"
    );
    println!(
        "garbage: RSS baseline {baseline} KiB, peak {peak} KiB, after {end} KiB; \
         {} CPU ticks",
        cpu_ticks(pid) - ticks_before
    );
    // One error per frame, and the ping after them answered.
    assert_eq!(replies, events, "replies to {events} frames");
    assert_eq!(pings, 1);
    // Bounded by the frame limit: a body being received and one being
    // parsed, with their copies, is at most a few times the limit.
    assert!(
        peak <= baseline + 4 * u64::from(MAX) / 1024,
        "peak RSS {peak} KiB from {baseline} KiB"
    );
}
