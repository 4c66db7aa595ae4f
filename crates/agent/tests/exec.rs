//! exec, exec_start, exec_status and exec_kill against the real agent
//! binary: the allowlist's refusals, exit codes and signals, timeouts that
//! kill the whole process group, `exited` while a background process holds
//! the pipes, bounded memory under an output flood, and lossless streaming.

// These tests run Linux programs (/bin/sh, /usr/bin/...): on Windows this
// file compiles to nothing rather than having its tests skipped or failing;
// Windows exec is tested through its handlers (handlers/exec.rs,
// `windows_tests`). On Linux they all run.
#![cfg(unix)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{error_code, Agent, Conn, PATIENCE};
use kvm_agent_protocol::codec::base64_decode;
use serde_json::{json, Value};

/// Allowed in most tests: the shell (for small scripts), head, true, echo
/// with rules, and sleep.
const CONFIG: &str = r#"
[security]
enable_exec = true
allowed_commands = ["sh", "/usr/bin/head", "true", "sleep"]

[[security.commands]]
path = "echo"
args = [["hello", "*"], ["-n", "**"]]
"#;

fn call(conn: &mut Conn, id: u64, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params});
    let reply = conn.call(&req.to_string());
    assert_eq!(reply["id"], id, "{reply}");
    reply
}

fn ok(reply: Value) -> Value {
    assert!(reply["error"].is_null(), "unexpected error: {reply}");
    reply["result"].clone()
}

fn bytes(output: &Value) -> Vec<u8> {
    let data = output["data"].as_str().expect("output data");
    match output["encoding"].as_str() {
        Some("utf-8") => data.as_bytes().to_vec(),
        Some("base64") => base64_decode(data.as_bytes()).expect("base64"),
        other => panic!("encoding {other:?}"),
    }
}

fn sh(conn: &mut Conn, script: &str, timeout_ms: u64) -> Value {
    ok(call(
        conn,
        1,
        "exec",
        json!({"command":"sh","args":["-c",script],"timeout_ms":timeout_ms}),
    ))
}

/// The audit records written so far.
fn audit(agent: &Agent) -> Vec<Value> {
    std::fs::read_to_string(agent.scratch.0.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn denied(reply: &Value, key: &str, reason: &str) {
    assert_eq!(error_code(reply), -32000, "{reply}");
    let data = &reply["error"]["data"];
    assert_eq!(data["config_key"], key, "{reply}");
    assert!(
        data["reason"].as_str().unwrap_or_default().contains(reason),
        "{reply}"
    );
}

#[test]
fn the_allowlist_refuses_what_it_does_not_name() {
    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    // A bare name not listed, an absolute path not listed.
    let r = call(
        &mut c,
        1,
        "exec",
        json!({"command":"cat","args":["/etc/shadow"]}),
    );
    denied(&r, "security.allowed_commands", "not in the allowlist");
    assert_eq!(
        r["error"]["data"],
        json!({"method":"exec","config_key":"security.allowed_commands","command":"cat","reason":"not in the allowlist"})
    );
    let r = call(&mut c, 2, "exec_start", json!({"command":"/usr/bin/cat"}));
    denied(&r, "security.allowed_commands", "not in the allowlist");
    assert_eq!(r["error"]["data"]["method"], "exec_start");
    // ../ tricks, even towards an allowed program.
    for trick in [
        "/usr/bin/../bin/sh",
        "/usr/bin/./head",
        "../../bin/sh",
        "bin/sh",
    ] {
        let r = call(&mut c, 3, "exec", json!({"command":trick}));
        denied(&r, "security.allowed_commands", "");
    }
    // A symlink to an allowed program is not that program.
    let link = agent.scratch.0.join("head");
    std::os::unix::fs::symlink("/usr/bin/head", &link).unwrap();
    let r = call(
        &mut c,
        4,
        "exec",
        json!({"command":link,"args":["-c","1","/dev/zero"]}),
    );
    denied(&r, "security.allowed_commands", "not in the allowlist");
    // Argument rules.
    let r = ok(call(
        &mut c,
        5,
        "exec",
        json!({"command":"echo","args":["hello","world"]}),
    ));
    assert_eq!(bytes(&r["stdout"]), b"hello world\n");
    let r = ok(call(
        &mut c,
        6,
        "exec",
        json!({"command":"echo","args":["-n"]}),
    ));
    assert_eq!(bytes(&r["stdout"]), b"");
    let r = call(
        &mut c,
        7,
        "exec",
        json!({"command":"echo","args":["goodbye","world"]}),
    );
    denied(&r, "security.commands", "arguments");
    let r = call(
        &mut c,
        8,
        "exec",
        json!({"command":"echo","args":["hello"]}),
    );
    denied(&r, "security.commands", "arguments");
    // Environment variables that would change what code runs.
    for var in ["PATH", "LD_PRELOAD", "BASH_ENV"] {
        let r = call(
            &mut c,
            9,
            "exec",
            json!({"command":"true","env":{var:"/tmp"}}),
        );
        denied(&r, "security.exec_env", var);
    }
    // Every refusal is in the audit trail with its full argv.
    let recs = audit(&agent);
    let shadow = recs
        .iter()
        .find(|r| r["id"] == "1" && r["method"] == "exec")
        .expect("record of request 1");
    assert_eq!(shadow["decision"], "denied");
    assert_eq!(shadow["details"]["argv"], json!(["cat", "/etc/shadow"]));
    let allowed = recs
        .iter()
        .find(|r| r["id"] == "5")
        .expect("record of request 5");
    assert_eq!(
        allowed["details"]["argv"],
        json!(["echo", "hello", "world"])
    );
    assert_eq!(allowed["details"]["exit_code"], 0);
    assert!(allowed["details"]["path"]
        .as_str()
        .unwrap()
        .ends_with("/echo"));
}

#[test]
fn path_in_env_does_not_change_what_runs() {
    let agent = Agent::start(&CONFIG.replace(
        "enable_exec = true",
        "enable_exec = true\nexec_env = [\"PATH\"]",
    ));
    let mut c = agent.connect();
    // A `true` of our own that fails, first in the PATH we pass.
    let fake = agent.scratch.0.join("true");
    std::fs::write(&fake, "#!/bin/sh\nexit 42\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = agent.scratch.0.display().to_string();
    let r = ok(call(
        &mut c,
        1,
        "exec",
        json!({"command":"true","env":{"PATH":dir}}),
    ));
    assert_eq!(r["exit_code"], 0, "the system's true ran: {r}");
    // The variable reaches the command, but resolution never used it.
    let r = ok(call(
        &mut c,
        2,
        "exec",
        json!({"command":"sh","args":["-c","echo $PATH"],"env":{"PATH":dir}}),
    ));
    assert_eq!(bytes(&r["stdout"]), format!("{dir}\n").as_bytes());
    // Without env, the fixed search path.
    let r = ok(call(
        &mut c,
        3,
        "exec",
        json!({"command":"sh","args":["-c","echo $PATH; echo $HOME; echo $USER"]}),
    ));
    let out = String::from_utf8(bytes(&r["stdout"])).unwrap();
    assert!(
        out.starts_with("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"),
        "{out}"
    );
}

#[test]
fn exit_codes_and_signals_are_reported_exactly() {
    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    for code in [0, 3, 255] {
        let r = sh(&mut c, &format!("exit {code}"), 10_000);
        assert_eq!(
            (r["exit_code"].clone(), r["signal"].clone()),
            (json!(code), Value::Null),
            "{r}"
        );
        assert_eq!(r["timed_out"], false);
    }
    let r = sh(&mut c, "kill -SEGV $$", 10_000);
    assert_eq!(
        (r["exit_code"].clone(), r["signal"].clone()),
        (Value::Null, json!(11)),
        "{r}"
    );
    // stdin, cwd, and stderr.
    let r = ok(call(
        &mut c,
        1,
        "exec",
        json!({"command":"sh","args":["-c","cat; pwd; echo oops >&2"],"cwd":"/tmp","stdin_base64":"aGVsbG8K"}),
    ));
    assert_eq!(bytes(&r["stdout"]), b"hello\n/tmp\n");
    assert_eq!(bytes(&r["stderr"]), b"oops\n");
    // Binary output comes as base64.
    let r = sh(&mut c, "printf '\\377\\376'", 10_000);
    assert_eq!(r["stdout"], json!({"encoding":"base64","data":"//4="}));
    // exec_kill: SIGTERM, SIGKILL, SIGINT, each to the process group.
    for (signal, number) in [("SIGTERM", 15), ("SIGKILL", 9), ("SIGINT", 2)] {
        let started = ok(call(
            &mut c,
            2,
            "exec_start",
            json!({"command":"sleep","args":["1000"]}),
        ));
        let handle = started["handle"].as_u64().unwrap();
        ok(call(
            &mut c,
            3,
            "exec_kill",
            json!({"handle":handle,"signal":signal}),
        ));
        let st = wait_exited(&mut c, handle);
        assert_eq!(
            (st["exit_code"].clone(), st["signal"].clone()),
            (Value::Null, json!(number)),
            "{st}"
        );
        assert_eq!(st["output_complete"], true);
        // Released by the status that reported everything.
        let r = call(&mut c, 4, "exec_status", json!({"handle":handle}));
        assert_eq!(error_code(&r), -32001);
        assert_eq!(r["error"]["data"], json!({"handle":handle}));
    }
    // Missing working directory, bad base64.
    let r = call(
        &mut c,
        5,
        "exec",
        json!({"command":"true","cwd":"/no/such/dir"}),
    );
    assert_eq!(error_code(&r), -32001);
    assert_eq!(r["error"]["data"], json!({"path":"/no/such/dir"}));
    let r = call(
        &mut c,
        6,
        "exec",
        json!({"command":"true","stdin_base64":"***"}),
    );
    assert_eq!(error_code(&r), -32602);
}

/// Poll until `exited` (returning that status, read from offset 0).
fn wait_exited(c: &mut Conn, handle: u64) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = ok(call(c, 100, "exec_status", json!({"handle":handle})));
        if st["exited"] == true {
            return st;
        }
        assert!(Instant::now() < deadline, "never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (non-zombie) processes whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        if f[0] != "Z" && f[2].parse::<u32>().ok() == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

fn wait_group_gone(pgid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !group_members(pgid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes of group {pgid} remain: {:?}",
            group_members(pgid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    // exec: the shell and the sleep it put in the background both die.
    let r = sh(&mut c, "sleep 1000 & echo $$; sleep 1000", 500);
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(
        (r["exit_code"].clone(), r["signal"].clone()),
        (Value::Null, json!(9))
    );
    let pgid: u32 = String::from_utf8(bytes(&r["stdout"]))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_group_gone(pgid);
    // exec_start likewise.
    let started = ok(call(
        &mut c,
        2,
        "exec_start",
        json!({"command":"sh","args":["-c","sleep 1000 & sleep 1000"],"timeout_ms":500}),
    ));
    let pid = started["pid"].as_u64().unwrap() as u32;
    assert!(!group_members(pid).is_empty());
    let st = wait_exited(&mut c, started["handle"].as_u64().unwrap());
    assert_eq!(st["timed_out"], true);
    assert_eq!(st["signal"], 9);
    wait_group_gone(pid);
}

#[test]
fn exited_is_reported_while_a_background_process_holds_the_pipes() {
    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    let started = ok(call(
        &mut c,
        1,
        "exec_start",
        json!({"command":"sh","args":["-c","sleep 1000 & echo started; exit 7"]}),
    ));
    let handle = started["handle"].as_u64().unwrap();
    let st = wait_exited(&mut c, handle);
    assert_eq!(st["exit_code"], 7, "{st}");
    assert_eq!(
        st["output_complete"], false,
        "the background sleep holds stdout"
    );
    assert_eq!(bytes(&st["stdout"]), b"started\n");
    // The group is still there; exec_kill ends it and the output completes.
    ok(call(&mut c, 2, "exec_kill", json!({"handle":handle})));
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = ok(call(
            &mut c,
            3,
            "exec_status",
            json!({"handle":handle,"stdout_offset":8}),
        ));
        if st["output_complete"] == true {
            assert_eq!(st["exit_code"], 7, "the command's own status stays");
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_group_gone(started["pid"].as_u64().unwrap() as u32);
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn an_output_flood_leaves_the_agents_memory_flat() {
    let agent = Agent::start(&format!(
        "{CONFIG}\n[limits]\nmax_exec_buffer_bytes = 1048576\n"
    ));
    let pid = agent.child.id();
    let mut c = agent.connect();
    ok(call(&mut c, 1, "exec", json!({"command":"true"})));
    let baseline = vm_kib(pid, "VmRSS:");
    // exec_start with a host that reads slowly: 1 GiB on offer.
    let started = ok(call(
        &mut c,
        2,
        "exec_start",
        json!({"command":"/usr/bin/head","args":["-c","1G","/dev/zero"]}),
    ));
    let handle = started["handle"].as_u64().unwrap();
    let mut offset = 0u64;
    let mut samples = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        let st = ok(call(
            &mut c,
            3,
            "exec_status",
            json!({"handle":handle,"stdout_offset":offset,"max_bytes":262144}),
        ));
        assert_eq!(st["exited"], false, "head cannot finish while nobody reads");
        offset = st["stdout_next_offset"].as_u64().unwrap();
        samples.push(vm_kib(pid, "VmRSS:"));
    }
    ok(call(&mut c, 4, "exec_kill", json!({"handle":handle})));
    // exec, synchronous, keeping 1 MiB: the rest is read and dropped.
    let t = Instant::now();
    let r = ok(call(
        &mut c,
        5,
        "exec",
        json!({"command":"/usr/bin/head","args":["-c","1G","/dev/zero"],"max_output_bytes":1048576,"timeout_ms":600000}),
    ));
    assert_eq!(r["exit_code"], 0, "{}", r["stderr"]);
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(bytes(&r["stdout"]).len(), 1 << 20);
    samples.push(vm_kib(pid, "VmRSS:"));
    let peak = vm_kib(pid, "VmHWM:");
    println!(
        "agent RSS: baseline {baseline} KiB, while flooded {samples:?} KiB, peak {peak} KiB; 1 GiB drained by exec in {:?}",
        t.elapsed()
    );
    assert!(
        peak < baseline + 48 * 1024,
        "peak RSS {peak} KiB grew more than 48 MiB over {baseline} KiB"
    );
}

#[test]
fn streamed_output_loses_no_bytes() {
    const SIZE: u64 = 100 << 20;
    let script = format!("yes 'abcdefghijklmnopqrstuvwxyz 0123456789' | head -c {SIZE}");
    let expected = Command::new("sh")
        .args(["-c", &format!("{script} | sha256sum")])
        .output()
        .unwrap();
    let expected = String::from_utf8(expected.stdout).unwrap()[..64].to_owned();

    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    let started = ok(call(
        &mut c,
        1,
        "exec_start",
        json!({"command":"sh","args":["-c",script],"timeout_ms":600000}),
    ));
    let handle = started["handle"].as_u64().unwrap();
    let mut hasher = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sink = hasher.stdin.take().unwrap();
    let (mut offset, mut polls) = (0u64, 0);
    loop {
        let st = ok(call(
            &mut c,
            2,
            "exec_status",
            json!({"handle":handle,"stdout_offset":offset}),
        ));
        polls += 1;
        let chunk = bytes(&st["stdout"]);
        assert_eq!(
            st["stdout_next_offset"].as_u64().unwrap(),
            offset + chunk.len() as u64
        );
        sink.write_all(&chunk).unwrap();
        offset += chunk.len() as u64;
        if st["output_complete"] == true {
            assert_eq!(st["exit_code"], 0);
            break;
        }
        if chunk.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(sink);
    let got = hasher.wait_with_output().unwrap();
    let got = String::from_utf8(got.stdout).unwrap()[..64].to_owned();
    println!("streamed {offset} bytes in {polls} exec_status calls; sha256 {got}");
    assert_eq!(offset, SIZE);
    assert_eq!(got, expected);
}

#[test]
fn offsets_release_output_and_stay_honest() {
    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    let started = ok(call(
        &mut c,
        1,
        "exec_start",
        json!({"command":"sh","args":["-c","echo one; echo two >&2; sleep 0.2; echo three"]}),
    ));
    let handle = started["handle"].as_u64().unwrap();
    // Poll without reading (max_bytes 0) until it exits.
    let deadline = Instant::now() + PATIENCE;
    while ok(call(
        &mut c,
        2,
        "exec_status",
        json!({"handle":handle,"max_bytes":0}),
    ))["exited"]
        != true
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Four bytes from offset 0; a retry of the same offsets gets the same.
    for _ in 0..2 {
        let st = ok(call(
            &mut c,
            3,
            "exec_status",
            json!({"handle":handle,"max_bytes":4}),
        ));
        assert_eq!(bytes(&st["stdout"]), b"one\n");
        assert_eq!(bytes(&st["stderr"]), b"two\n");
        assert_eq!(st["stdout_next_offset"], 4);
        assert_eq!(st["output_complete"], false);
    }
    // Past the end: invalid params.
    let r = call(
        &mut c,
        4,
        "exec_status",
        json!({"handle":handle,"stdout_offset":99}),
    );
    assert_eq!(error_code(&r), -32602);
    // Asking from 4 releases bytes 0..4; asking for them again is an error.
    ok(call(
        &mut c,
        5,
        "exec_status",
        json!({"handle":handle,"stdout_offset":4,"max_bytes":0}),
    ));
    let r = call(
        &mut c,
        6,
        "exec_status",
        json!({"handle":handle,"stdout_offset":0}),
    );
    assert_eq!(error_code(&r), -32602, "{r}");
    // The answer that returns the rest says output_complete and releases
    // the handle.
    let st = ok(call(
        &mut c,
        7,
        "exec_status",
        json!({"handle":handle,"stdout_offset":4,"stderr_offset":4}),
    ));
    assert_eq!(bytes(&st["stdout"]), b"three\n");
    assert_eq!(st["output_complete"], true);
    let r = call(&mut c, 8, "exec_status", json!({"handle":handle}));
    assert_eq!(error_code(&r), -32001);
}

#[test]
fn the_process_limit_answers_busy() {
    let agent = Agent::start(&format!("{CONFIG}\n[limits]\nmax_processes = 2\n"));
    let mut c = agent.connect();
    let a = ok(call(
        &mut c,
        1,
        "exec_start",
        json!({"command":"sleep","args":["1000"]}),
    ));
    let b = ok(call(
        &mut c,
        2,
        "exec_start",
        json!({"command":"sleep","args":["1000"]}),
    ));
    let r = call(&mut c, 3, "exec", json!({"command":"true"}));
    assert_eq!(error_code(&r), -32009);
    assert_eq!(
        r["error"]["data"],
        json!({"limit":"max_processes","value":2})
    );
    for h in [&a, &b] {
        ok(call(&mut c, 4, "exec_kill", json!({"handle":h["handle"]})));
        wait_exited(&mut c, h["handle"].as_u64().unwrap());
    }
    ok(call(&mut c, 5, "exec", json!({"command":"true"})));
}

#[test]
fn run_as_drops_user_group_and_supplementary_groups() {
    let agent = Agent::start(
        r#"
[security]
enable_exec = true

[[security.commands]]
path = "/usr/bin/id"
run_as = "nobody"
"#,
    );
    let mut c = agent.connect();
    let result = ok(call(&mut c, 1, "exec", json!({"command": "/usr/bin/id"})));
    assert_eq!(result["exit_code"], 0, "{result}");
    let out = String::from_utf8(bytes(&result["stdout"])).unwrap();
    let nobody = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .map(|l| l.split(':').nth(2).unwrap().to_owned())
        .expect("a nobody user");
    assert!(out.starts_with(&format!("uid={nobody}(nobody) ")), "{out}");
    // No group of root's survives: the only groups are nobody's own.
    let groups = out.trim().rsplit("groups=").next().unwrap();
    assert!(!groups.contains("(root)"), "{out}");
    assert_eq!(groups.split(',').count(), 1, "{out}");
    // The test runs as root: the same command without run_as would say uid=0.
    let record = audit(&agent)
        .into_iter()
        .find(|r| r["method"] == "exec")
        .unwrap();
    assert_eq!(record["outcome"], "ok");
}

#[test]
fn a_slow_request_never_delays_ping() {
    let agent = Agent::start(CONFIG);
    let mut c = agent.connect();
    // A request that takes a while (sleep 3, one call), then a ping on the
    // same connection: the ping's answer comes first.
    let slow =
        json!({"jsonrpc":"2.0","id":1,"method":"exec","params":{"command":"sleep","args":["3"]}});
    c.send(slow.to_string().as_bytes());
    c.send(br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#);
    let first = c.recv();
    assert_eq!(first["id"], 2, "ping waited behind exec: {first}");
    let second = c.recv();
    assert_eq!(second["id"], 1, "{second}");
    assert_eq!(second["result"]["exit_code"], 0, "{second}");
}
