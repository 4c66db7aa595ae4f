//! File transfer through the real agent: hostile paths end to end, atomicity
//! when transfers are cut off (disconnect, abort, bad hash, SIGKILL, full
//! disk), resume, limits, and sha256 round trips of random files from 0 bytes
//! to 256 MiB through the client library.
//!
//! Every agent here is confined to its own scratch directory
//! (`allowed_file_paths`), never the shared /tmp.

// These tests use POSIX paths, unix file modes and signals: on Windows this
// file compiles to nothing rather than having its tests skipped or failing;
// Windows file transfer is tested in files/tests_windows.rs and end to end
// in end_to_end.rs. On Linux they all run.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{error_code, Agent, Conn, FileFixture, Scratch, PATIENCE};
use kvm_agent_client::files::{self, TransferOptions};
use kvm_agent_client::{Client, ClientOptions};
use kvm_agent_protocol::codec;
use serde_json::{json, Value};

fn fixture(extra: &str) -> FileFixture {
    common::file_fixture("files", extra)
}

fn call(conn: &mut Conn, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc":"2.0","id":1,"method":method,"params":params});
    conn.call(&req.to_string())
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn temps(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.starts_with(".kva-upload."))
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn audit_records(agent: &Agent) -> Vec<Value> {
    std::fs::read_to_string(agent.scratch.0.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn hostile_paths_end_to_end() {
    let f = fixture("");
    let r = f.root.display().to_string();
    std::os::unix::fs::symlink("/etc", f.root.join("etc")).unwrap();
    std::fs::write(f.root.join("file"), "x").unwrap();
    let outside = f.agent.scratch.0.join("outside-secret");
    std::fs::write(&outside, "secret").unwrap();
    std::fs::hard_link(&outside, f.root.join("hard")).unwrap();
    let fifo = std::ffi::CString::new(format!("{r}/fifo")).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(f.root.join("dir")).unwrap();

    let mut c = f.agent.connect();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "copy_from_guest",
            json!({"path": format!("{r}/../outside-secret")}),
            "dotdot",
        ),
        (
            "copy_from_guest",
            json!({"path": format!("/{r}/./../outside-secret")}),
            "dotdot",
        ),
        (
            "copy_from_guest",
            json!({"path": "/etc/passwd"}),
            "outside_allowed",
        ),
        (
            "copy_from_guest",
            json!({"path": "/dev/zero"}),
            "outside_allowed",
        ),
        (
            "copy_from_guest",
            json!({"path": "/proc/self/environ"}),
            "outside_allowed",
        ),
        (
            "copy_from_guest",
            json!({"path": "relative/file"}),
            "relative",
        ),
        ("copy_from_guest", json!({"path": ""}), "empty"),
        (
            "copy_from_guest",
            json!({"path": format!("{r}/file\u{0}x")}),
            "nul",
        ),
        (
            "copy_from_guest",
            json!({"path": format!("{r}/etc/passwd")}),
            "symlink",
        ),
        (
            "copy_from_guest",
            json!({"path": format!("{r}/etc/shadow")}),
            "symlink",
        ),
        (
            "copy_from_guest",
            json!({"path": format!("{r}/hard")}),
            "hard_link",
        ),
        (
            "file_open",
            json!({"path": format!("{r}/fifo"), "access": "read"}),
            "fifo",
        ),
        (
            "file_open",
            json!({"path": format!("{r}/dir"), "access": "read"}),
            "directory",
        ),
        (
            "file_open",
            json!({"path": format!("{r}/file/x"), "access": "read"}),
            "not_a_directory",
        ),
        (
            "file_open",
            json!({"path": format!("{r}/etc/new"), "access": "write", "overwrite": true}),
            "symlink",
        ),
        (
            "copy_to_guest",
            json!({"path": format!("{r}/hard"), "content_base64": "", "overwrite": true}),
            "hard_link",
        ),
        (
            "copy_to_guest",
            json!({"path": format!("{r}/{}", "n".repeat(256)), "content_base64": ""}),
            "too_long",
        ),
        (
            "copy_to_guest",
            json!({"path": format!("{r}/.kva-upload.0000000000000000.tmp"), "content_base64": ""}),
            "reserved_name",
        ),
    ];
    for (method, params, reason) in &cases {
        let reply = call(&mut c, method, params.clone());
        assert_eq!(error_code(&reply), -32000, "{method} {params}: {reply}");
        let data = &reply["error"]["data"];
        assert_eq!(data["reason"], *reason, "{method} {params}: {reply}");
        assert_eq!(data["config_key"], "security.allowed_file_paths");
        assert_eq!(data["path"], params["path"]);
        c.assert_ping_is_next();
    }
    // A lone surrogate (a non-UTF-8 name cannot be written in JSON): -32602.
    let reply = c.call(
        r#"{"jsonrpc":"2.0","id":9,"method":"copy_from_guest","params":{"path":"/tmp/\udcff"}}"#,
    );
    assert_eq!(error_code(&reply), -32602, "{reply}");
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret");
    // Each refusal is in the audit trail with its path and reason.
    let recs = audit_records(&f.agent);
    for (_, params, reason) in &cases {
        assert!(
            recs.iter().any(|rec| rec["outcome"] == "denied"
                && rec["details"]["reason"] == *reason
                && rec["details"]["path"] == params["path"]),
            "no audit record for {params} ({reason})"
        );
    }
    println!("{} hostile paths refused end to end", cases.len() + 1);
}

#[test]
fn whole_file_copies_and_their_errors() {
    let f = fixture("[limits]\nmax_frame_bytes = 65536\n");
    let r = f.root.display().to_string();
    let mut c = f.agent.connect();
    let data = random_bytes(1000, 1);
    let b64 = codec::base64_encode(&data);
    let sha = codec::sha256_hex(&data);
    let p = format!("{r}/a/b/copy.bin");
    let reply = call(
        &mut c,
        "copy_to_guest",
        json!({"path": p, "content_base64": b64, "create_parents": true, "mode": 416, "sha256": sha}),
    );
    assert_eq!(
        reply["result"],
        json!({"path": p, "size": 1000, "sha256": sha}),
        "{reply}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let reply = call(
        &mut c,
        "copy_to_guest",
        json!({"path": p, "content_base64": b64}),
    );
    assert_eq!(error_code(&reply), -32002, "{reply}");
    // A wrong hash writes nothing.
    let q = format!("{r}/a/b/other.bin");
    let reply = call(
        &mut c,
        "copy_to_guest",
        json!({"path": q, "content_base64": b64, "sha256": "0".repeat(64)}),
    );
    assert_eq!(error_code(&reply), -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["kind"], "sha256_mismatch");
    assert!(!Path::new(&q).exists());
    let reply = call(
        &mut c,
        "copy_to_guest",
        json!({"path": q, "content_base64": "not base64!"}),
    );
    assert_eq!(reply["error"]["data"]["kind"], "base64", "{reply}");
    let reply = call(
        &mut c,
        "copy_to_guest",
        json!({"path": q, "content_base64": "", "mode": 2541}),
    );
    assert_eq!(reply["error"]["data"]["kind"], "mode", "{reply}");
    let reply = call(
        &mut c,
        "copy_to_guest",
        json!({"path": format!("{r}/missing/x"), "content_base64": ""}),
    );
    assert_eq!(error_code(&reply), -32001, "{reply}");
    let reply = call(&mut c, "copy_from_guest", json!({"path": p}));
    assert_eq!(
        reply["result"],
        json!({"content_base64": b64, "size": 1000, "sha256": sha})
    );
    // Over max_chunk_bytes (32 KiB with 64 KiB frames).
    std::fs::write(f.root.join("big"), vec![7u8; 40_000]).unwrap();
    let reply = call(
        &mut c,
        "copy_from_guest",
        json!({"path": format!("{r}/big")}),
    );
    assert_eq!(
        reply["error"],
        json!({"code": -32005, "message": "Payload too large", "data": {"max_bytes": 32768, "size": 40000}})
    );
    assert!(temps(&f.root).is_empty() && temps(&f.root.join("a/b")).is_empty());
    // Audit: resolved path, bytes and sha256 of the copy.
    let recs = audit_records(&f.agent);
    let rec = recs
        .iter()
        .find(|r| r["method"] == "copy_to_guest" && r["outcome"] == "ok")
        .unwrap();
    assert_eq!(
        rec["details"],
        json!({"path": p, "bytes": 1000, "sha256": sha})
    );
}

/// Upload `data` in `chunk`-byte pieces up to `stop` bytes over a raw
/// connection, and return the connection and handle.
fn partial_upload(
    agent: &Agent,
    path: &str,
    data: &[u8],
    chunk: usize,
    stop: usize,
) -> (Conn, u64) {
    let mut c = agent.connect();
    let reply = call(
        &mut c,
        "file_open",
        json!({"path": path, "access": "write", "overwrite": true}),
    );
    let handle = reply["result"]["handle"]
        .as_u64()
        .unwrap_or_else(|| panic!("{reply}"));
    let mut off = 0;
    while off < stop {
        let end = (off + chunk).min(stop);
        let reply = call(
            &mut c,
            "file_write",
            json!({"handle": handle, "offset": off, "data_base64": codec::base64_encode(&data[off..end])}),
        );
        assert_eq!(reply["result"]["written"], end - off, "{reply}");
        off = end;
    }
    (c, handle)
}

#[test]
fn transfers_cut_off_anywhere_leave_the_target_untouched_or_complete() {
    let f = fixture("[limits]\nfile_handle_idle_seconds = 1\n");
    let path = f.root.join("target");
    let p = path.display().to_string();
    std::fs::write(&path, "old content").unwrap();
    let data = random_bytes(200_000, 7);
    let sha = codec::sha256_hex(&data);
    let mut seed = 99u64;
    for round in 0..12 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let stop = (seed >> 33) as usize % data.len();
        let (mut c, handle) = partial_upload(&f.agent, &p, &data, 7000, stop);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"old content",
            "round {round}: partial target"
        );
        match round % 3 {
            0 => {
                let reply = call(
                    &mut c,
                    "file_close",
                    json!({"handle": handle, "abort": true}),
                );
                assert_eq!(reply["result"]["committed"], false, "{reply}");
            }
            1 => {
                // Closing with the full file's hash fails: nothing committed.
                let reply = call(
                    &mut c,
                    "file_close",
                    json!({"handle": handle, "size": data.len(), "sha256": sha}),
                );
                assert_eq!(error_code(&reply), -32602, "{reply}");
            }
            _ => drop(c), // host gone: the handle expires, its temporary goes
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    }
    wait_until("expired uploads to be removed", || {
        temps(&f.root).is_empty()
    });
    // A complete upload replaces the file at once.
    let (mut c, handle) = partial_upload(&f.agent, &p, &data, 7000, data.len());
    let reply = call(
        &mut c,
        "file_close",
        json!({"handle": handle, "size": data.len(), "sha256": sha}),
    );
    assert_eq!(
        reply["result"],
        json!({"size": data.len(), "sha256": sha, "committed": true}),
        "{reply}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(entries(&f.root), ["target"]);
    let reply = call(
        &mut c,
        "file_write",
        json!({"handle": handle, "offset": 0, "data_base64": ""}),
    );
    assert_eq!(
        reply["error"]["data"],
        json!({"handle": handle}),
        "a closed handle is gone"
    );
}

fn spawn_agent(config: &Path, socket: &Path) -> std::process::Child {
    Command::new(common::agent_binary())
        .arg("--config")
        .arg(config)
        .arg("--transport")
        .arg(format!("unix:{}", socket.display()))
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn an_upload_cut_by_sigkill_is_cleaned_up_at_the_next_start() {
    let mut f = fixture("");
    let path = f.root.join("sub/target");
    std::fs::create_dir(f.root.join("sub")).unwrap();
    let data = random_bytes(100_000, 3);
    let (_c, _h) = partial_upload(&f.agent, &path.display().to_string(), &data, 10_000, 50_000);
    assert_eq!(
        temps(&f.root.join("sub")).len(),
        1,
        "the upload's temporary file"
    );
    f.agent.child.kill().unwrap();
    f.agent.child.wait().unwrap();
    assert_eq!(
        temps(&f.root.join("sub")).len(),
        1,
        "left by the dead agent"
    );
    let _ = std::fs::remove_file(&f.agent.socket);
    f.agent.child = spawn_agent(&f.agent.scratch.0.join("config.toml"), &f.agent.socket);
    wait_until("the stale temporary to be removed", || {
        temps(&f.root.join("sub")).is_empty()
    });
    assert!(!path.exists(), "no partial target");
}

#[test]
fn a_full_disk_leaves_nothing_behind() {
    let scratch = Scratch::new("enospc");
    let mnt = scratch.0.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        // Without mount privileges there is no small file system to fill.
        println!("note: cannot mount a tmpfs here; the disk-full case did not run");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let agent = Agent::start(&format!(
        "[security]\nallowed_file_paths = [\"{}\"]\n",
        mnt.display()
    ));
    let mut c = agent.connect();
    let p = mnt.join("big").display().to_string();
    let reply = call(&mut c, "file_open", json!({"path": p, "access": "write"}));
    let handle = reply["result"]["handle"].as_u64().unwrap();
    let chunk = codec::base64_encode(&random_bytes(256 * 1024, 5));
    let mut failed = None;
    for i in 0..8u64 {
        let reply = call(
            &mut c,
            "file_write",
            json!({"handle": handle, "offset": i * 256 * 1024, "data_base64": chunk}),
        );
        if reply.get("error").is_some() {
            failed = Some(reply);
            break;
        }
    }
    let reply = failed.expect("a 2 MiB upload to a 1 MiB file system fails");
    assert_eq!(error_code(&reply), -32003, "{reply}");
    assert_eq!(reply["error"]["data"]["os_error"], libc::ENOSPC, "{reply}");
    let reply = call(
        &mut c,
        "file_close",
        json!({"handle": handle, "abort": true}),
    );
    assert_eq!(reply["result"]["committed"], false, "{reply}");
    assert!(entries(&mnt).is_empty(), "{:?}", entries(&mnt));
}

#[test]
fn handle_limits_and_misuse() {
    let f = fixture("[limits]\nmax_file_handles_per_connection = 2\nmax_file_handles_total = 3\n");
    let r = f.root.display().to_string();
    std::fs::write(f.root.join("f"), "hello").unwrap();
    let mut a = f.agent.connect();
    let open_read = |c: &mut Conn| {
        call(
            c,
            "file_open",
            json!({"path": format!("{r}/f"), "access": "read"}),
        )
    };
    let h1 = open_read(&mut a)["result"]["handle"].as_u64().unwrap();
    let h2 = open_read(&mut a)["result"]["handle"].as_u64().unwrap();
    assert!(h2 > h1);
    let reply = open_read(&mut a);
    assert_eq!(
        reply["error"]["data"],
        json!({"limit": "max_file_handles_per_connection", "value": 2}),
        "{reply}"
    );
    let mut b = f.agent.connect();
    let h3 = open_read(&mut b)["result"]["handle"].as_u64().unwrap();
    let reply = open_read(&mut b);
    assert_eq!(
        reply["error"]["data"],
        json!({"limit": "max_file_handles_total", "value": 3}),
        "{reply}"
    );
    // Handles work from any connection; a read handle is not written.
    let reply = call(
        &mut b,
        "file_read",
        json!({"handle": h1, "offset": 1, "length": 100}),
    );
    assert_eq!(
        reply["result"],
        json!({"data_base64": codec::base64_encode(b"ello"), "eof": true})
    );
    let reply = call(
        &mut b,
        "file_write",
        json!({"handle": h1, "offset": 0, "data_base64": ""}),
    );
    assert_eq!(reply["error"]["data"]["kind"], "access", "{reply}");
    for h in [h1, h2, h3] {
        let reply = call(&mut b, "file_close", json!({"handle": h}));
        assert_eq!(
            reply["result"]["sha256"],
            codec::sha256_hex(b"hello"),
            "{reply}"
        );
    }
    let reply = call(&mut b, "file_close", json!({"handle": h1}));
    assert_eq!(error_code(&reply), -32001);
    let h4 = open_read(&mut b)["result"]["handle"].as_u64().unwrap();
    assert!(h4 > h3, "handles are never reused");
    let reply = call(
        &mut b,
        "file_read",
        json!({"handle": h4, "offset": 0, "length": 100_000_000}),
    );
    assert_eq!(error_code(&reply), -32005, "{reply}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn client(agent: &Agent) -> Client {
    let target = format!("unix:{}", agent.socket.display()).parse().unwrap();
    Client::connect(
        target,
        ClientOptions {
            call_timeout: PATIENCE,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap()
}

#[test]
fn resume_continues_an_interrupted_upload_and_download() {
    let f = fixture("");
    let data = random_bytes(3_000_000, 11);
    let local = f.agent.scratch.0.join("local.bin");
    std::fs::write(&local, &data).unwrap();
    let guest = f.root.join("resumed.bin").display().to_string();
    // The first attempt stops after 1.2 MB: the host goes away.
    let (c, _) = partial_upload(&f.agent, &guest, &data, 400_000, 1_200_000);
    drop(c);
    runtime().block_on(async {
        let client = client(&f.agent).await;
        let opts = TransferOptions {
            overwrite: true,
            resume: true,
            ..TransferOptions::default()
        };
        let up = files::upload(&client, &local, &guest, &opts, &mut |_, _| {})
            .await
            .unwrap();
        assert_eq!(up.resumed_from, 1_200_000);
        assert_eq!(up.sha256, codec::sha256_hex(&data));
        assert_eq!(std::fs::read(&guest).unwrap(), data);
        // A download interrupted after 1 MB continues from its partial file.
        let dest = f.agent.scratch.0.join("back.bin");
        std::fs::write(files::part_path(&dest), &data[..1_000_000]).unwrap();
        let down = files::download(&client, &guest, &dest, &opts, &mut |_, _| {})
            .await
            .unwrap();
        assert_eq!(down.resumed_from, 1_000_000);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert!(!files::part_path(&dest).exists());
    });
    assert!(temps(&f.root).is_empty());
}

/// Random files from 0 bytes to 256 MiB, both directions, sha256 checked by
/// the library at both ends and compared with the bytes on disk here.
#[test]
fn sha256_round_trips_from_empty_to_256_mib() {
    let f = fixture("");
    let sizes: [usize; 9] = [
        0,
        1,
        3,
        (1 << 20) - 1,
        1 << 20,
        (1 << 20) + 1,
        5 * (1 << 20) + 17,
        9 * (1 << 20),
        256 << 20,
    ];
    let rt = runtime();
    rt.block_on(async {
        let client = client(&f.agent).await;
        for (i, &size) in sizes.iter().enumerate() {
            let data = random_bytes(size, i as u64 + 100);
            let sha = codec::sha256_hex(&data);
            let local = f.agent.scratch.0.join(format!("up-{i}"));
            std::fs::write(&local, &data).unwrap();
            drop(data);
            let guest = f.root.join(format!("file-{i}")).display().to_string();
            let opts = TransferOptions {
                chunk_bytes: if i % 2 == 0 { 1 << 20 } else { 8 << 20 },
                ..TransferOptions::default()
            };
            let up = files::upload(&client, &local, &guest, &opts, &mut |_, _| {})
                .await
                .unwrap();
            assert_eq!((up.size as usize, up.sha256.as_str()), (size, sha.as_str()));
            let dest = f.agent.scratch.0.join(format!("down-{i}"));
            let down = files::download(&client, &guest, &dest, &opts, &mut |_, _| {})
                .await
                .unwrap();
            assert_eq!(
                (down.size as usize, down.sha256.as_str()),
                (size, sha.as_str())
            );
            let back = std::fs::read(&dest).unwrap();
            assert_eq!(codec::sha256_hex(&back), sha, "size {size}");
            for p in [&local, &dest, &PathBuf::from(&guest)] {
                std::fs::remove_file(p).unwrap();
            }
        }
    });
    let recs = audit_records(&f.agent);
    let closes = recs
        .iter()
        .filter(|r| r["method"] == "file_close" && r["details"]["committed"] == true)
        .count();
    assert_eq!(
        closes,
        sizes.len(),
        "each upload's close is audited as committed"
    );
}
