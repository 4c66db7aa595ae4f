//! Start-up, configuration checking, connection limits and shutdown of the
//! real agent binary.

// These tests send unix signals (SIGTERM, SIGKILL) to the agent: on Windows
// this file compiles to nothing rather than having its tests skipped or
// failing. On Linux they all run.
#![cfg(unix)]

mod common;

use std::process::Command;

use common::{agent_binary, error_code, Agent, Scratch};
use serde_json::json;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_binary()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_bad_key() {
    let dir = Scratch::new("cfg");
    let good = dir.0.join("good.toml");
    std::fs::write(&good, "[security]\nenable_exec = false\n").unwrap();
    let (code, out, _) = run(&["--config", good.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 0);
    assert!(out.contains("configuration is valid"), "{out}");

    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_frame_bytes = 12\n").unwrap();
    let (code, _, err) = run(&["--config", bad.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 78);
    assert!(err.contains("limits.max_frame_bytes"), "{err}");

    std::fs::write(
        &bad,
        "[security]\nenable_exec = false\nallow_everything = true\n",
    )
    .unwrap();
    let (code, _, err) = run(&["--config", bad.to_str().unwrap(), "--check-config"]);
    assert_eq!(code, 78);
    assert!(err.contains("allow_everything"), "{err}");

    let (code, _, err) = run(&["--config", dir.0.join("absent.toml").to_str().unwrap()]);
    assert_eq!(code, 78);
    assert!(err.contains("absent.toml"), "{err}");
}

#[test]
fn bad_command_line_is_exit_2() {
    let (code, _, err) = run(&["--frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("--frobnicate"), "{err}");
    let (code, _, err) = run(&["--transport", "tcp:80"]);
    assert_eq!(code, 2);
    assert!(err.contains("tcp:80"), "{err}");
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--transport SPEC"));
}

#[test]
fn sigterm_stops_the_agent_cleanly() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.assert_ping_is_next();
    let socket = agent.socket.clone();
    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[test]
fn every_connection_starts_with_agent_ready() {
    let agent = Agent::start("");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    for _ in 0..3 {
        let mut c = common::Conn::open(&agent.socket);
        let ready = c.recv();
        assert_eq!(ready["jsonrpc"], "2.0");
        assert_eq!(ready["method"], "agent_ready");
        assert!(ready.get("id").is_none(), "a notification has no id");
        assert_eq!(ready["params"]["boot_id"], boot_id.trim());
        assert_eq!(ready["params"]["os_family"], "linux");
    }
}

#[test]
fn connections_beyond_the_limit_get_busy_and_are_closed() {
    let agent = Agent::start("[limits]\nmax_connections = 1\n");
    let mut first = agent.connect();
    let mut second = common::Conn::open(&agent.socket);
    let reply = second.recv();
    assert_eq!(error_code(&reply), -32009);
    assert_eq!(
        reply["error"]["data"],
        json!({"limit": "max_connections", "value": 1})
    );
    assert!(second.closed_by_agent());
    first.assert_ping_is_next();
    drop(first);
    // The slot comes back: a new connection is served (the agent may take a
    // moment to notice the first one left, so retry a few times).
    let mut served = false;
    for _ in 0..100 {
        let mut c = common::Conn::open(&agent.socket);
        if c.recv()["method"] == "agent_ready" {
            c.assert_ping_is_next();
            served = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(served);
}

#[test]
fn stale_socket_file_is_replaced_but_other_files_are_not() {
    let dir = Scratch::new("stale");
    let path = dir.0.join("not-a-socket");
    std::fs::write(&path, "precious").unwrap();
    let (code, _, err) = run(&["--transport", &format!("unix:{}", path.display())]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}
