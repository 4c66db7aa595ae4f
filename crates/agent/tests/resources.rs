//! The agent sleeps when there is nothing to do and stays small when a host
//! misbehaves. These tests measure CPU time and memory of the agent process
//! (from /proc), never wall-clock durations.

// These tests read the agent's memory and descriptors from /proc: on
// Windows this file compiles to nothing rather than having its tests
// skipped or failing. On Linux they all run.
#![cfg(unix)]

mod common;

use std::io::Read;
use std::time::Duration;

use common::{Agent, Conn};

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Resident set size in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A busy loop burns about 100 ticks a second; an idle agent burns none.
/// Allow a little for the scheduler's rounding.
const IDLE_TICKS: u64 = 10;

#[test]
fn idle_agent_uses_no_cpu() {
    // An empty allowed directory: the start-up sweep for stale upload
    // temporaries (a bounded scan of the allowed directories, in the
    // background) is over at once instead of overlapping the measurement
    // when /tmp is large.
    let root = common::Scratch::new("idle-root");
    let agent = Agent::start(&format!(
        "[security]\nallowed_file_paths = [{}]\n",
        common::toml_path(&root.0)
    ));
    let pid = agent.child.id();
    let mut c = agent.connect();
    c.assert_ping_is_next();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(used <= IDLE_TICKS, "idle agent used {used} ticks in 2 s");
    c.assert_ping_is_next();
}

#[test]
fn host_that_stops_reading_costs_no_cpu_and_bounded_memory() {
    let agent = Agent::start("[limits]\nmax_frame_bytes = 4096\n");
    let pid = agent.child.id();
    let mut c = agent.connect();
    let mut writer = Conn {
        stream: c.stream.try_clone().unwrap(),
    };
    // Far more answers than the agent may queue (1 MiB + one frame) plus
    // what the socket buffers hold: the agent must stop reading.
    const N: u32 = 200_000;
    let sender = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 0..N {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#);
            all.extend_from_slice(&(body.len() as u32).to_be_bytes());
            all.extend_from_slice(body.as_bytes());
        }
        writer.send_raw(&all);
    });
    // Wait until the agent stalls: its CPU time stops moving.
    let mut last = cpu_ticks(pid);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_ticks(pid);
        if now - last <= 1 {
            break;
        }
        last = now;
    }
    assert!(
        !sender.is_finished(),
        "the agent should have stopped reading"
    );
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used <= IDLE_TICKS,
        "a stalled connection cost {used} ticks in 2 s"
    );
    let rss = rss_bytes(pid);
    assert!(
        rss < 48 << 20,
        "agent RSS {rss} bytes while the host is not reading"
    );

    // Another host is served meanwhile.
    let mut other = agent.connect();
    other.assert_ping_is_next();

    // Once the host reads again, every answer arrives, in order.
    for i in 0..N {
        let reply = c.recv();
        assert_eq!(reply["id"], i);
    }
    sender.join().unwrap();
    c.assert_ping_is_next();
}

#[test]
fn thousands_of_connects_and_disconnects_leak_no_descriptors() {
    let agent = Agent::start("");
    let pid = agent.child.id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let mut c = agent.connect();
    c.assert_ping_is_next();
    let before = fds();
    for i in 0..10_000 {
        let mut c = Conn::open(&agent.socket);
        if i % 2 == 0 {
            // Read agent_ready and leave; or leave without reading.
            let mut b = [0u8; 4];
            c.stream.read_exact(&mut b).unwrap();
        }
    }
    // Disconnects are noticed asynchronously: a final round trip on a fresh
    // connection, then count.
    let mut last = agent.connect();
    last.assert_ping_is_next();
    drop(last);
    let mut settled = false;
    for _ in 0..200 {
        if fds() <= before {
            settled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(settled, "descriptors before {before}, after {}", fds());
    c.assert_ping_is_next();
}

/// Found by the soak test (tests/soak.rs): every request run as a task
/// stayed in memory until its connection closed (its finished task was kept
/// by the connection's JoinSet), about 2 KiB each; on one long connection,
/// like virtio-serial's, the agent grew without bound. 20,000 task-routed
/// requests on one connection must not grow the RSS measured after the
/// first 2,000 by more than 8 MiB (the leak added about 36 MiB).
#[test]
fn finished_request_tasks_are_released_while_the_connection_stays_open() {
    let agent = Agent::start("");
    let pid = agent.child.id();
    let mut c = agent.connect();
    // file_read of a handle that does not exist: runs as a task, fails at
    // once, touches no file.
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"file_read","params":{"handle":999999,"offset":0,"length":1}}"#;
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(body);
    let batch: Vec<u8> = framed.repeat(32);
    let run = |rounds: usize, c: &mut Conn| {
        for _ in 0..rounds {
            c.send_raw(&batch);
            for _ in 0..32 {
                let reply = c.recv();
                assert!(reply["error"].is_object(), "{reply}");
            }
        }
    };
    run(2_000 / 32, &mut c);
    let warm = rss_bytes(pid);
    run(18_000 / 32, &mut c);
    let end = rss_bytes(pid);
    assert!(
        end <= warm + (8 << 20),
        "RSS grew from {warm} to {end} bytes over 18,000 requests"
    );
    c.assert_ping_is_next();
}
