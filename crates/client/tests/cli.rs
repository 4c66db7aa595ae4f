//! Runs the `kvm-agent-ctl` binary against a fake agent on a unix socket and
//! checks its output and exit codes.

// The fake agent listens on a unix socket (the CLI is a host tool, and KVM
// hosts are Linux): on Windows this file compiles to nothing rather than
// having its tests skipped or failing. On Linux they all run.
#![cfg(unix)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// What the fake does with a request: `Some(message)` to answer, `None` to
/// stay silent. A `Value::String` is sent as raw frame bytes.
type Handler = fn(&Value) -> Option<Value>;

struct Fake {
    dir: PathBuf,
    sock: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvm-agent-ctl-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn send(stream: &mut UnixStream, body: &[u8]) {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    let _ = stream.write_all(&frame);
}

fn fake(handler: Handler) -> Fake {
    let dir = temp_dir();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    // The thread ends with the test process.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let ready = json!({"jsonrpc": "2.0", "method": "agent_ready", "params": {
                    "agent_version": "0.0.0-fake", "protocol_version": "1.0",
                    "boot_id": "b0", "os_family": "linux"}});
                send(&mut stream, ready.to_string().as_bytes());
                loop {
                    let mut len = [0u8; 4];
                    if stream.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if stream.read_exact(&mut body).is_err() {
                        return;
                    }
                    let req: Value = serde_json::from_slice(&body).unwrap();
                    seen.lock().unwrap().push(req.clone());
                    match handler(&req) {
                        Some(Value::String(raw)) => send(&mut stream, raw.as_bytes()),
                        Some(msg) => send(&mut stream, msg.to_string().as_bytes()),
                        None => {}
                    }
                }
            });
        }
    });
    Fake {
        dir,
        sock,
        requests,
    }
}

fn ok(req: &Value, result: Value) -> Option<Value> {
    Some(json!({"jsonrpc": "2.0", "id": req["id"], "result": result}))
}

fn error(req: &Value, code: i64, message: &str, data: Value) -> Option<Value> {
    Some(json!({"jsonrpc": "2.0", "id": req["id"],
        "error": {"code": code, "message": message, "data": data}}))
}

fn standard(req: &Value) -> Option<Value> {
    let p = &req["params"];
    match req["method"].as_str().unwrap() {
        "ping" => ok(req, json!({})),
        "get_capabilities" => ok(
            req,
            json!({
                "protocol_version": "1.0", "agent_version": "0.0.0-fake", "os_family": "linux",
                "methods": ["ping", "get_capabilities"],
                "limits": {"max_frame_bytes": 16777216, "max_chunk_bytes": 1048576,
                           "max_batch_len": 16, "max_requests_per_connection": 32},
                "auth_required": false,
                "future_member": 1
            }),
        ),
        "echo" => ok(req, p.clone()),
        "exec" if p["command"] == "fail" => ok(
            req,
            json!({"exit_code": 3, "signal": null,
                "stdout": {"encoding": "utf-8", "data": "hi\n"},
                "stderr": {"encoding": "base64", "data": "/w=="},
                "stdout_truncated": false, "stderr_truncated": false,
                "timed_out": false, "duration_ms": 4}),
        ),
        "exec" if p["command"] == "killed" => ok(
            req,
            json!({"exit_code": null, "signal": 9,
                "stdout": {"encoding": "utf-8", "data": ""},
                "stderr": {"encoding": "utf-8", "data": ""},
                "stdout_truncated": false, "stderr_truncated": false,
                "timed_out": true, "duration_ms": 100}),
        ),
        "exec_start" if p["command"] == "fail" => ok(req, json!({"handle": 1, "pid": 10})),
        "exec_start" if p["command"] == "killed" => ok(req, json!({"handle": 2, "pid": 11})),
        // Handle 1: "hi\n" and a 0xff byte while running, then exit 3.
        "exec_status" if p["handle"] == 1 && p["stdout_offset"] == 0 => ok(
            req,
            json!({"exited": false, "exit_code": null, "signal": null, "timed_out": false,
                "stdout": {"encoding": "utf-8", "data": "hi\n"},
                "stderr": {"encoding": "base64", "data": "/w=="},
                "stdout_next_offset": 3, "stderr_next_offset": 1, "output_complete": false}),
        ),
        "exec_status" if p["handle"] == 1 => ok(
            req,
            json!({"exited": true, "exit_code": 3, "signal": null, "timed_out": false,
                "stdout": {"encoding": "utf-8", "data": "bye\n"},
                "stderr": {"encoding": "utf-8", "data": ""},
                "stdout_next_offset": 7, "stderr_next_offset": 1, "output_complete": true}),
        ),
        "exec_status" if p["handle"] == 2 => ok(
            req,
            json!({"exited": true, "exit_code": null, "signal": 9, "timed_out": true,
                "stdout": {"encoding": "utf-8", "data": ""},
                "stderr": {"encoding": "utf-8", "data": ""},
                "stdout_next_offset": 0, "stderr_next_offset": 0, "output_complete": true}),
        ),
        "shutdown" | "reboot" if p["confirm"] != true => error(
            req,
            -32007,
            "Confirmation required",
            json!({"field": "confirm"}),
        ),
        "reboot" => ok(
            req,
            json!({"action": "reboot", "force": p["force"], "delay_seconds": p["delay_seconds"]}),
        ),
        "copy_from_guest" => ok(
            req,
            json!({"content_base64": "aGVsbG8=", "size": 5,
                "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}),
        ),
        "copy_to_guest" => ok(
            req,
            json!({"path": p["path"], "size": 5, "sha256": p["sha256"]}),
        ),
        // Chunked transfers of local files: a 5-byte guest file "hello".
        "file_open" if p["access"] == "read" => ok(req, json!({"handle": 7, "size": 5})),
        "file_open" => ok(req, json!({"handle": 8, "size": null})),
        "file_read" if p["offset"] == 0 => ok(req, json!({"data_base64": "aGVsbG8=", "eof": true})),
        "file_read" => ok(req, json!({"data_base64": "", "eof": true})),
        "file_write" => ok(req, json!({"written": 5})),
        "file_close" => ok(
            req,
            json!({"size": 5, "committed": p["handle"] == 8,
                "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}),
        ),
        "garbage" => Some(Value::String("{not json".into())),
        "hang" => None,
        m => error(req, -32010, "Not implemented", json!({"method": m})),
    }
}

fn ctl(fake: &Fake, args: &[&str]) -> Output {
    ctl_stdin(fake, args, b"")
}

fn ctl_stdin(fake: &Fake, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvm-agent-ctl"))
        .env_remove("KVM_AGENT_CONNECT")
        .arg("--connect")
        .arg(format!("unix:{}", fake.sock.display()))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ping_and_caps_succeed() {
    let agent = fake(standard);
    let out = ctl(&agent, &["ping"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("pong from unix:"));

    let out = ctl(&agent, &["caps"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("methods                      ping, get_capabilities"));
    assert!(stdout.contains("max_frame_bytes              16777216"));

    // --json prints the raw result, members unknown to this client included.
    let out = ctl(&agent, &["caps", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["future_member"], 1);
}

#[test]
fn agent_errors_exit_1_with_message_and_data() {
    let agent = fake(standard);
    let out = ctl(&agent, &["users"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Not implemented (code -32010, not_implemented)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"data: {"method":"get_users"}"#),
        "{stderr}"
    );
}

#[test]
fn exec_streams_output_and_exits_with_the_remote_exit_code() {
    let agent = fake(standard);
    let out = ctl_stdin(
        &agent,
        &[
            "exec",
            "--env",
            "A=1",
            "--cwd",
            "/tmp",
            "--timeout",
            "5000",
            "--",
            "fail",
            "-x",
        ],
        b"input",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"hi\nbye\n");
    assert_eq!(out.stderr, [0xff]);
    let reqs = agent.requests.lock().unwrap().clone();
    let start = &reqs[0];
    assert_eq!(start["method"], "exec_start");
    assert_eq!(start["params"]["command"], "fail");
    assert_eq!(start["params"]["args"], json!(["-x"]));
    assert_eq!(start["params"]["env"], json!({"A": "1"}));
    assert_eq!(start["params"]["cwd"], "/tmp");
    assert_eq!(start["params"]["timeout_ms"], 5000);
    // Standard input from a pipe is sent.
    assert_eq!(start["params"]["stdin_base64"], "aW5wdXQ=");
    // The second poll continues from the offsets the first one reached.
    assert_eq!(reqs[1]["method"], "exec_status");
    assert_eq!(reqs[2]["params"]["stdout_offset"], 3);
    assert_eq!(reqs[2]["params"]["stderr_offset"], 1);
    assert_eq!(reqs.len(), 3);

    let out = ctl(&agent, &["exec", "--no-stdin", "killed"]);
    assert_eq!(out.status.code(), Some(137));
    assert!(text(&out.stderr).contains("timed out"));
    let reqs = agent.requests.lock().unwrap().clone();
    assert!(reqs[3]["params"]["stdin_base64"].is_null());
}

#[test]
fn exec_with_an_output_limit_runs_in_one_call() {
    let agent = fake(standard);
    let out = ctl(
        &agent,
        &["exec", "--max-output-bytes", "100", "--", "fail", "-x"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, [0xff]);
    let req = agent.requests.lock().unwrap()[0].clone();
    assert_eq!(req["method"], "exec");
    assert_eq!(req["params"]["max_output_bytes"], 100);

    let out = ctl(&agent, &["exec", "--json", "killed"]);
    assert_eq!(out.status.code(), Some(137));
}

#[test]
fn power_needs_yes() {
    let agent = fake(standard);
    let out = ctl(&agent, &["reboot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--yes"));
    let out = ctl(&agent, &["reboot", "--yes", "--delay", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "reboot accepted: in 5 s\n");
    let reqs = agent.requests.lock().unwrap().clone();
    assert_eq!(reqs[0]["params"]["confirm"], false);
    assert_eq!(reqs[1]["params"]["confirm"], true);
}

#[test]
fn raw_call_prints_the_result() {
    let agent = fake(standard);
    let out = ctl(&agent, &["call", "echo", r#"{"a":[1,2]}"#, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "{\"a\":[1,2]}\n");
    let out = ctl(&agent, &["call", "echo", "42"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cp_both_ways() {
    let agent = fake(standard);
    let out = ctl_stdin(&agent, &["cp", "-", "guest:/tmp/x"], b"hello");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let req = agent.requests.lock().unwrap()[0].clone();
    assert_eq!(req["params"]["content_base64"], "aGVsbG8=");
    assert_eq!(
        req["params"]["sha256"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );

    let dest = agent.dir.join("out");
    std::fs::create_dir(&dest).unwrap();
    let out = ctl(
        &agent,
        &["cp", "guest:/var/log/app.log", dest.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(dest.join("app.log")).unwrap(), b"hello");
    // No silent overwrite of a local file.
    let out = ctl(
        &agent,
        &["cp", "guest:/var/log/app.log", dest.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));

    let out = ctl(&agent, &["cp", "a", "b"]);
    assert_eq!(out.status.code(), Some(2));

    // A local file goes in chunks, verified at close.
    let local = agent.dir.join("local");
    std::fs::write(&local, "hello").unwrap();
    let out = ctl(&agent, &["cp", local.to_str().unwrap(), "guest:/tmp/y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("sha256 2cf24dba"),
        "{}",
        text(&out.stdout)
    );
    let reqs = agent.requests.lock().unwrap().clone();
    let close = reqs.iter().rfind(|r| r["method"] == "file_close").unwrap();
    assert_eq!(close["params"]["size"], 5);
    assert_eq!(
        close["params"]["sha256"],
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
}

#[test]
fn malformed_answer_exits_4() {
    let agent = fake(standard);
    let out = ctl(&agent, &["call", "garbage"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
}

#[test]
fn connection_problems_exit_3() {
    let agent = fake(standard);
    let out = ctl(&agent, &["--timeout", "0.3", "call", "hang"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("timed out"));

    let out = Command::new(env!("CARGO_BIN_EXE_kvm-agent-ctl"))
        .env(
            "KVM_AGENT_CONNECT",
            format!("unix:{}", agent.dir.join("none").display()),
        )
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvm-agent-ctl"))
        .env_remove("KVM_AGENT_CONNECT")
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("KVM_AGENT_CONNECT"));

    let out = Command::new(env!("CARGO_BIN_EXE_kvm-agent-ctl"))
        .args(["completions", "zsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("kvm-agent-ctl"));
}

#[test]
fn env_var_names_the_target() {
    let agent = fake(standard);
    let out = Command::new(env!("CARGO_BIN_EXE_kvm-agent-ctl"))
        .env(
            "KVM_AGENT_CONNECT",
            format!("unix:{}", agent.sock.display()),
        )
        .args(["ping", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["rtt_ms"].is_number());
}

/// A fake agent with authentication on (key 0x00..0x1f): signs agent_ready
/// and its answers to `ping`, refuses requests that do not verify with an
/// unsigned -32008, as the real agent does.
fn signing_fake() -> Fake {
    use kvm_agent_client::protocol::auth::{self, Key, ResponseSigner};
    use kvm_agent_client::protocol::jsonrpc::{self, Incoming};
    let dir = temp_dir();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let key = Key::from_bytes(&(0u8..32).collect::<Vec<_>>()).unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let key = key.clone();
            std::thread::spawn(move || {
                let ready = json!({"agent_version": "0.0.0-fake", "protocol_version": "1.0",
                    "boot_id": "b0", "os_family": "linux"});
                let mut out = Vec::new();
                auth::write_signed_notification(
                    &mut out,
                    std::slice::from_ref(&key),
                    "agent_ready",
                    Some(&ready),
                    now(),
                    &[9; 16],
                )
                .unwrap();
                send(&mut stream, &out);
                loop {
                    let mut len = [0u8; 4];
                    if stream.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if stream.read_exact(&mut body).is_err() {
                        return;
                    }
                    let Incoming::Single(Ok(req)) = jsonrpc::parse_frame(&body, 16) else {
                        panic!("the client sent a bad frame");
                    };
                    let id = req.id.clone().unwrap();
                    let mut out = Vec::new();
                    match auth::verify_request(std::slice::from_ref(&key), &req, now(), 300_000) {
                        Ok(v) => {
                            let signer = ResponseSigner::new(
                                key.clone(),
                                req.raw_id.as_deref().unwrap().get().to_owned(),
                                v.nonce,
                            );
                            let result =
                                serde_json::value::RawValue::from_string("{}".into()).unwrap();
                            auth::write_signed_response(&mut out, &id, Ok(&result), &signer, now());
                        }
                        Err(f) => jsonrpc::write_response(&mut out, &id, Err(&f.error())),
                    }
                    send(&mut stream, &out);
                }
            });
        }
    });
    Fake {
        dir,
        sock,
        requests: Arc::new(Mutex::new(Vec::new())),
    }
}

#[test]
fn key_file_signs_requests_and_verifies_answers() {
    let agent = signing_fake();
    let keys = temp_dir();
    let hex = |first: u8| {
        (first..first + 32)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let good = keys.join("good.key");
    std::fs::write(&good, format!("{}\n", hex(0))).unwrap();
    let wrong = keys.join("wrong.key");
    std::fs::write(&wrong, hex(1)).unwrap();
    let good_arg = good.display().to_string();

    let out = ctl(&agent, &["--key-file", &good_arg, "ping"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("pong from unix:"));

    // The same key from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_kvm-agent-ctl"))
        .env(
            "KVM_AGENT_CONNECT",
            format!("unix:{}", agent.sock.display()),
        )
        .env("KVM_AGENT_KEY_FILE", &good)
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Without a key: the agent's -32008 (exit 1).
    let out = ctl(&agent, &["ping"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("authentication_failed"),
        "{}",
        text(&out.stderr)
    );

    // The wrong key: agent_ready does not verify (exit 4).
    let out = ctl(
        &agent,
        &["--key-file", &wrong.display().to_string(), "ping"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("response authentication failed"),
        "{}",
        text(&out.stderr)
    );

    // A key file that is missing or not a key: usage error (exit 2).
    let missing = keys.join("missing.key");
    let out = ctl(
        &agent,
        &["--key-file", &missing.display().to_string(), "ping"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    std::fs::write(&wrong, "not hex").unwrap();
    let out = ctl(
        &agent,
        &["--key-file", &wrong.display().to_string(), "ping"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("hex"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&keys);
}
