//! Authentication (docs/protocol.md, "Authentication") with the real agent
//! binary: raw signed frames, the real client library with a key, key
//! rotation, replayed and stale requests, tampered responses (through a
//! proxy that rewrites the agent's frames), the audit trail, and key files
//! the agent refuses.

// Key files here are protected by unix file modes, which the agent checks:
// on Windows this file compiles to nothing (the signing itself runs there in
// attachments.rs and the protocol crate's tests) rather than having its
// tests skipped or failing. On Linux they all run.
#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Agent, Conn, Scratch};
use kvm_agent_client::{AuthKey, Client, ClientError, ClientOptions, Target};
use kvm_agent_protocol::auth::{self, Key};
use kvm_agent_protocol::jsonrpc::{parse_from_agent, FromAgent, Id};
use serde_json::{json, Value};

const KEY_A: u8 = 0x00;
const KEY_B: u8 = 0x40;

fn key_bytes(first: u8) -> Vec<u8> {
    (first..first + 32).collect()
}

fn key(first: u8) -> Key {
    Key::from_bytes(&key_bytes(first)).unwrap()
}

/// Write a key file with `mode`.
fn key_file(dir: &Path, name: &str, first: u8, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", auth::to_hex(&key_bytes(first)))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An agent with authentication on: the current key A (and, with
/// `previous`, the previous key B).
fn agent_with_keys(keys: &Scratch, previous: bool) -> Agent {
    let current = key_file(&keys.0, "current.key", KEY_A, 0o600);
    let mut config = format!("[security]\nhmac_key_file = \"{}\"\n", current.display());
    if previous {
        let prev = key_file(&keys.0, "previous.key", KEY_B, 0o600);
        config.push_str(&format!(
            "hmac_previous_key_file = \"{}\"\n",
            prev.display()
        ));
    }
    Agent::start(&config)
}

/// A signed request frame body.
fn signed(k: &Key, id: u64, method: &str, params: Option<Value>, ts: u64, nonce: u8) -> Vec<u8> {
    let mut out = Vec::new();
    auth::write_signed_request(
        &mut out,
        k,
        Some(&Id::from(id)),
        method,
        params.as_ref(),
        ts,
        &[nonce; 16],
    )
    .unwrap();
    out
}

/// Check the response to request `id` (nonce `[nonce; 16]`) was signed with `k`.
fn assert_signed(k: &Key, body: &[u8], id: u64, nonce: u8) {
    let r = match parse_from_agent(body).unwrap() {
        FromAgent::Response(r) => r,
        other => panic!("{other:?}"),
    };
    auth::verify_response(k, &id.to_string(), &auth::to_hex(&[nonce; 16]), &r)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn options(k: Option<u8>) -> ClientOptions {
    ClientOptions {
        auth: k.map(|k| AuthKey::from_bytes(&key_bytes(k)).unwrap()),
        call_timeout: common::PATIENCE,
        connect_timeout: common::PATIENCE,
        reconnect: false,
        ..ClientOptions::default()
    }
}

fn audit_records(agent: &Agent) -> Vec<Value> {
    let text = std::fs::read_to_string(agent.scratch.0.join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn raw_frames_signed_unsigned_replayed_stale_and_batched() {
    let keys = Scratch::new("keys");
    let agent = agent_with_keys(&keys, false);
    let mut conn = Conn::open(&agent.socket);
    // agent_ready is signed with the current key.
    let ready = conn.recv_bytes();
    match parse_from_agent(&ready).unwrap() {
        FromAgent::Notification(n) => {
            auth::verify_notification(&key(KEY_A), &n).expect("signed agent_ready");
        }
        other => panic!("{other:?}"),
    }

    // Good: answered and signed; capabilities say auth is required.
    conn.send(&signed(
        &key(KEY_A),
        1,
        "get_capabilities",
        None,
        now_ms(),
        1,
    ));
    let body = conn.recv_bytes();
    assert_signed(&key(KEY_A), &body, 1, 1);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["result"]["auth_required"], true, "{v}");

    let refused = |conn: &mut Conn, frame: &[u8], reason: &str| {
        conn.send(frame);
        let v = conn.recv();
        assert_eq!(v["error"]["code"], -32008, "{v}");
        assert_eq!(v["error"]["data"], json!({ "reason": reason }), "{v}");
        assert!(v.get("auth").is_none(), "-32008 is never signed: {v}");
        v
    };
    // Missing: even an unknown method is refused for its authentication first.
    let v = refused(
        &mut conn,
        br#"{"jsonrpc":"2.0","id":2,"method":"no_such_method"}"#,
        "missing",
    );
    assert_eq!(v["id"], 2);
    // Malformed: auth without mac; bad hex.
    refused(
        &mut conn,
        format!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"ping","auth":{{"ts":{},"nonce":"{}"}}}}"#,
            now_ms(),
            "00".repeat(16)
        )
        .as_bytes(),
        "malformed",
    );
    refused(
        &mut conn,
        format!(
            r#"{{"jsonrpc":"2.0","id":4,"method":"ping","auth":{{"ts":{},"nonce":"{}","mac":"{}"}}}}"#,
            now_ms(),
            "00".repeat(16),
            "zz".repeat(32)
        )
        .as_bytes(),
        "malformed",
    );
    // Wrong key.
    refused(
        &mut conn,
        &signed(&key(KEY_B), 5, "ping", None, now_ms(), 5),
        "bad_mac",
    );
    // One flipped bit in the params.
    let good = signed(
        &key(KEY_A),
        6,
        "get_info",
        Some(json!({"all_interfaces": true})),
        now_ms(),
        6,
    );
    let text = String::from_utf8(good).unwrap();
    let flipped = text.replacen("all_interfaces", "`ll_interfaces", 1);
    refused(&mut conn, flipped.as_bytes(), "bad_mac");
    // Replayed: the same frame twice.
    let frame = signed(&key(KEY_A), 7, "ping", None, now_ms(), 7);
    conn.send(&frame);
    assert_signed(&key(KEY_A), &conn.recv_bytes(), 7, 7);
    refused(&mut conn, &frame, "replayed");
    // Stale and future timestamps (default skew: 300 s).
    refused(
        &mut conn,
        &signed(&key(KEY_A), 8, "ping", None, now_ms() - 301_000, 8),
        "stale",
    );
    refused(
        &mut conn,
        &signed(&key(KEY_A), 9, "ping", None, now_ms() + 301_000, 9),
        "stale",
    );
    // Authenticated but unknown method: -32601, signed.
    conn.send(&signed(
        &key(KEY_A),
        10,
        "no_such_method",
        None,
        now_ms(),
        10,
    ));
    let body = conn.recv_bytes();
    assert_signed(&key(KEY_A), &body, 10, 10);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["error"]["code"],
        -32601
    );

    // A batch: each element authenticated on its own, each reply signed.
    let a = String::from_utf8(signed(&key(KEY_A), 11, "ping", None, now_ms(), 11)).unwrap();
    let b = r#"{"jsonrpc":"2.0","id":12,"method":"ping"}"#;
    let c = String::from_utf8(signed(&key(KEY_A), 13, "get_users", None, now_ms(), 13)).unwrap();
    conn.send(format!("[{a},{b},{c}]").as_bytes());
    let body = conn.recv_bytes();
    let replies = match parse_from_agent(&body).unwrap() {
        FromAgent::Batch(rs) => rs,
        other => panic!("{other:?}"),
    };
    assert_eq!(replies.len(), 3);
    auth::verify_response(&key(KEY_A), "11", &auth::to_hex(&[11; 16]), &replies[0]).unwrap();
    assert!(replies[1].auth.is_none());
    assert_eq!(replies[1].outcome.as_ref().unwrap_err().code, -32008);
    auth::verify_response(&key(KEY_A), "13", &auth::to_hex(&[13; 16]), &replies[2]).unwrap();

    // The trail: every refused request is `unauthenticated`.
    drop(conn);
    let records = audit_records(&agent);
    let decisions: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("-").to_owned(),
                r["decision"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let of = |id: &str| {
        decisions
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, d)| d.as_str())
            .collect::<Vec<_>>()
    };
    for id in ["2", "3", "4", "5", "6", "8", "9", "12"] {
        assert_eq!(of(id), ["unauthenticated"], "id {id}: {records:?}");
    }
    assert_eq!(of("7"), ["allowed", "unauthenticated"]);
    assert_eq!(of("10"), ["invalid"]);
    assert_eq!(of("1"), ["allowed"]);
    let r = records.iter().find(|r| r["id"] == "5").unwrap();
    assert_eq!(r["outcome"], "authentication_failed");
    assert_eq!(r["error_code"], -32008);
    assert!(r["reason"].as_str().unwrap().contains("bad_mac"), "{r}");
}

#[test]
fn client_with_the_key_signs_and_verifies() {
    let keys = Scratch::new("keys");
    let agent = agent_with_keys(&keys, false);
    let target = Target::Unix(agent.socket.clone());
    runtime().block_on(async {
        // From a file, as kvm-agent-ctl --key-file reads it.
        let opts = ClientOptions {
            auth: Some(AuthKey::from_file(keys.0.join("current.key")).unwrap()),
            ..options(None)
        };
        let client = Client::connect(target.clone(), opts).await.unwrap();
        client.ping().await.unwrap();
        let caps = client.get_capabilities().await.unwrap();
        assert!(caps.auth_required);
        // Many calls, each with a fresh nonce.
        for _ in 0..50 {
            client.ping().await.unwrap();
        }
        let e = client.call_raw("no_such_method", None).await.unwrap_err();
        assert_eq!(e.code(), Some(-32601));

        // Without a key: refused, and the client passes the -32008 on.
        let client = Client::connect(target.clone(), options(None))
            .await
            .unwrap();
        let e = client.ping().await.unwrap_err();
        assert_eq!(e.code(), Some(-32008), "{e}");
        assert_eq!(
            e.agent_error().unwrap().data,
            Some(json!({"reason": "missing"}))
        );

        // With the wrong key: agent_ready does not verify.
        let e = Client::connect(target.clone(), options(Some(KEY_B)))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Authentication(_)), "{e}");
    });
}

#[test]
fn old_key_is_accepted_during_rotation_only() {
    let keys = Scratch::new("keys");
    let rotating = agent_with_keys(&keys, true);
    runtime().block_on(async {
        // A host still on the previous key B: agent_ready carries a MAC with
        // B too, its requests pass and the answers are signed with B.
        let target = Target::Unix(rotating.socket.clone());
        let client = Client::connect(target.clone(), options(Some(KEY_B)))
            .await
            .unwrap();
        let caps = client.get_capabilities().await.unwrap();
        assert!(caps.auth_required);
        // And a host on the new key A.
        let client = Client::connect(target, options(Some(KEY_A))).await.unwrap();
        client.ping().await.unwrap();
    });
    // Raw: B's request answered with B's MAC.
    let mut conn = rotating.connect();
    conn.send(&signed(&key(KEY_B), 1, "ping", None, now_ms(), 1));
    assert_signed(&key(KEY_B), &conn.recv_bytes(), 1, 1);
    drop(conn);

    // Rollover done: only A configured, B is refused.
    let keys = Scratch::new("keys");
    let rotated = agent_with_keys(&keys, false);
    let mut conn = rotated.connect();
    conn.send(&signed(&key(KEY_B), 1, "ping", None, now_ms(), 1));
    let v = conn.recv();
    assert_eq!(v["error"]["data"]["reason"], "bad_mac", "{v}");
}

/// Forward frames between a host and the agent, rewriting each frame from
/// the agent with `tamper`.
fn tampering_proxy(agent_socket: &Path, dir: &Path, tamper: fn(String) -> String) -> PathBuf {
    let path = dir.join("proxy.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent_socket = agent_socket.to_owned();
    std::thread::spawn(move || {
        for host in listener.incoming() {
            let Ok(mut host) = host else { return };
            let mut agent = UnixStream::connect(&agent_socket).unwrap();
            let mut host_rd = host.try_clone().unwrap();
            let mut agent_wr = agent.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut host_rd, &mut agent_wr);
            });
            std::thread::spawn(move || loop {
                let mut header = [0u8; 4];
                if agent.read_exact(&mut header).is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
                if agent.read_exact(&mut body).is_err() {
                    return;
                }
                let body = tamper(String::from_utf8(body).unwrap());
                let mut framed = (body.len() as u32).to_be_bytes().to_vec();
                framed.extend_from_slice(body.as_bytes());
                if host.write_all(&framed).is_err() {
                    return;
                }
            });
        }
    });
    path
}

#[test]
fn a_tampered_response_fails_verification() {
    let keys = Scratch::new("keys");
    let agent = agent_with_keys(&keys, false);
    let proxy = tampering_proxy(&agent.socket, &keys.0, |body| {
        body.replace("\"auth_required\":true", "\"auth_required\":false")
    });
    runtime().block_on(async {
        let client = Client::connect(Target::Unix(proxy), options(Some(KEY_A)))
            .await
            .unwrap();
        client.ping().await.unwrap();
        let e = client.get_capabilities().await.unwrap_err();
        assert!(matches!(e, ClientError::Authentication(_)), "{e}");
        assert!(e.is_protocol_error());
        // The connection is closed: nothing more is trusted from it.
        assert!(client.ping().await.is_err());
    });
    // A stripped auth member fails too.
    let proxy_dir = Scratch::new("proxy");
    let proxy = tampering_proxy(&agent.socket, &proxy_dir.0, |body| {
        match body.find(",\"auth\":") {
            Some(at) if body.contains("\"id\"") => format!("{}}}", &body[..at]),
            _ => body,
        }
    });
    runtime().block_on(async {
        let client = Client::connect(Target::Unix(proxy), options(Some(KEY_A)))
            .await
            .unwrap();
        let e = client.ping().await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Authentication(m) if m.contains("no auth member")),
            "{e}"
        );
    });
}

#[test]
fn key_files_readable_by_others_or_not_keys_are_refused_at_start() {
    let keys = Scratch::new("keys");
    let run = |key_path: &Path, extra: &[&str]| {
        let config = keys.0.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[security]\nhmac_key_file = \"{}\"\n[audit]\ndestination = \"stderr\"\n",
                key_path.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = Command::new(common::agent_binary())
            .arg("--config")
            .arg(&config)
            .arg("--transport")
            .arg(format!("unix:{}", keys.0.join("a.sock").display()))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let readable = key_file(&keys.0, "readable.key", KEY_A, 0o640);
    for extra in [&[][..], &["--check-config"][..]] {
        let (code, stderr) = run(&readable, extra);
        assert_eq!(code, Some(78), "{stderr}");
        assert!(
            stderr.contains("security.hmac_key_file")
                && stderr.contains(&readable.display().to_string())
                && stderr.contains("chmod 600"),
            "{stderr}"
        );
    }
    let short = keys.0.join("short.key");
    std::fs::write(&short, "abcd\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = run(&short, &["--check-config"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    let good = key_file(&keys.0, "good.key", KEY_A, 0o600);
    let (code, stderr) = run(&good, &["--check-config"]);
    assert_eq!(code, Some(0), "{stderr}");
}
