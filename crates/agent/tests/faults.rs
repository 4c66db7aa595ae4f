//! Faults from outside the protocol, with the real agent binary: a clock
//! that jumps inside (and beyond) the HMAC window, a read-only file system,
//! a fork bomb run through `exec`, and SIGKILL in the middle of overwriting
//! a file. Resources are measured (processes, descriptors), never durations.
//!
//! Elsewhere: a full disk during an upload and SIGKILL during a first upload
//! (tests/file_transfer.rs), a host that stops reading and connect/disconnect
//! storms (tests/resources.rs), a million requests and a gibibyte of garbage
//! (tests/soak.rs).

// Linux only: libfaketime, mount(8), /proc.
#![cfg(target_os = "linux")]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{error_code, Agent, Conn, Scratch, PATIENCE};
use kvm_agent_protocol::auth::{self, Key};
use kvm_agent_protocol::codec;
use kvm_agent_protocol::jsonrpc::Id;
use serde_json::{json, Value};

fn call(conn: &mut Conn, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc":"2.0","id":1,"method":method,"params":params});
    conn.call(&req.to_string())
}

fn ok(reply: Value) -> Value {
    assert!(reply["error"].is_null(), "unexpected error: {reply}");
    reply["result"].clone()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- clock jump

/// Where Debian's libfaketime package puts the library (any architecture).
/// `cargo xtask test` installs the package.
fn libfaketime() -> PathBuf {
    for dir in std::fs::read_dir("/usr/lib").unwrap().flatten() {
        let candidate = dir.path().join("faketime/libfaketimeMT.so.1");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "libfaketime is not installed (`apt-get install libfaketime`; \
         `cargo xtask test` installs it)"
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn signed(key: &Key, id: u64, method: &str, ts: u64, nonce: u8) -> Vec<u8> {
    let mut out = Vec::new();
    auth::write_signed_request::<Value>(
        &mut out,
        key,
        Some(&Id::from(id)),
        method,
        None,
        ts,
        &[nonce; 16],
    )
    .unwrap();
    out
}

fn auth_failure(reply: &Value) -> String {
    assert_eq!(error_code(reply), -32008, "{reply}");
    reply["error"]["data"]["reason"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The agent's clock (libfaketime, for the agent process only: an offset
/// read from a file at every clock reading) jumps while the host's does not.
/// Inside the window (300 s) signed requests keep working and replays stay
/// refused across the jumps; beyond it fresh requests are stale until the
/// host signs with the agent's time.
#[test]
fn a_clock_jump_inside_the_hmac_window() {
    let keys = Scratch::new("clock-keys");
    let key_bytes: Vec<u8> = (0x10..0x30).collect();
    let key_path = keys.0.join("agent.key");
    std::fs::write(&key_path, auth::to_hex(&key_bytes)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = Key::from_bytes(&key_bytes).unwrap();
    let offset_file = keys.0.join("faketime.rc");
    let jump = |offset: &str| std::fs::write(&offset_file, format!("{offset}\n")).unwrap();
    jump("+0");
    let preload = libfaketime();
    let agent = Agent::start_with(
        &format!(
            "[security]\nhmac_key_file = \"{}\"\nhmac_max_skew_seconds = 300\n",
            key_path.display()
        ),
        |cmd| {
            cmd.env("LD_PRELOAD", &preload)
                .env("FAKETIME_TIMESTAMP_FILE", &offset_file)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_DONT_RESET", "1");
        },
    );
    // The agent's clock as its signed agent_ready tells it, minus ours.
    let agent_offset_s = || -> i64 {
        let mut c = Conn::open(&agent.socket);
        let before = now_ms();
        let ready = c.recv();
        let ts = ready["auth"]["ts"].as_u64().expect("a signed agent_ready");
        (ts as i64 - before as i64) / 1000
    };
    let offset = agent_offset_s();
    assert!(offset.abs() < 60, "no jump yet, offset {offset} s");
    let mut c = agent.connect();

    let first = signed(&key, 1, "ping", now_ms(), 1);
    assert_eq!(ok(c.call(std::str::from_utf8(&first).unwrap())), json!({}));

    // Forward 120 s: still inside the window.
    jump("+120");
    let offset = agent_offset_s();
    assert!((100..200).contains(&offset), "jumped by {offset} s");
    let second = signed(&key, 2, "ping", now_ms(), 2);
    assert_eq!(ok(c.call(std::str::from_utf8(&second).unwrap())), json!({}));
    assert_eq!(
        auth_failure(&c.call(std::str::from_utf8(&first).unwrap())),
        "replayed"
    );

    // Back 240 s: the agent is now 120 s behind the host.
    jump("-120");
    let offset = agent_offset_s();
    assert!((-200..-100).contains(&offset), "jumped by {offset} s");
    let third = signed(&key, 3, "ping", now_ms(), 3);
    assert_eq!(ok(c.call(std::str::from_utf8(&third).unwrap())), json!({}));
    for replay in [&first, &second] {
        assert_eq!(
            auth_failure(&c.call(std::str::from_utf8(replay).unwrap())),
            "replayed"
        );
    }

    // Beyond the window: stale, until the host signs with the agent's time.
    jump("+400");
    let offset = agent_offset_s();
    assert!((380..500).contains(&offset), "jumped by {offset} s");
    let fourth = signed(&key, 4, "ping", now_ms(), 4);
    assert_eq!(
        auth_failure(&c.call(std::str::from_utf8(&fourth).unwrap())),
        "stale"
    );
    let fifth = signed(&key, 5, "ping", now_ms() + 400_000, 5);
    assert_eq!(ok(c.call(std::str::from_utf8(&fifth).unwrap())), json!({}));

    // Back to the real time, 400 s back: what was signed 400 s ahead is
    // stale now. So is a request signed now: the agent has read a clock
    // 400 s ahead, and a request whose window (ts + 300 s) ends before that
    // reading could reuse a nonce it has already forgotten
    // (docs/protocol.md §13). Signed 150 s ahead, inside the window of both
    // readings, it passes.
    jump("+0");
    assert!(agent_offset_s().abs() < 60);
    let call_signed = |c: &mut Conn, frame: &[u8]| c.call(std::str::from_utf8(frame).unwrap());
    assert_eq!(auth_failure(&call_signed(&mut c, &fifth)), "stale");
    let sixth = signed(&key, 6, "ping", now_ms(), 6);
    assert_eq!(auth_failure(&call_signed(&mut c, &sixth)), "stale");
    let seventh = signed(&key, 7, "get_capabilities", now_ms() + 150_000, 7);
    let caps = ok(call_signed(&mut c, &seventh));
    assert_eq!(caps["auth_required"], true);
}

// ------------------------------------------------------ read-only file system

/// A small tmpfs, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path) -> Mount {
        std::fs::create_dir(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (these tests run as root)",
            at.display()
        );
        Mount(at.to_owned())
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every write is refused with the OS's EROFS, nothing is left behind, reads
/// still work, and once the file system is writable again so are uploads,
/// without restarting the agent.
#[test]
fn a_read_only_file_system() {
    let scratch = Scratch::new("rofs");
    let mnt = Mount::tmpfs(&scratch.0.join("ro"));
    std::fs::write(mnt.0.join("existing"), b"kept as it was").unwrap();
    mnt.remount("ro");
    let agent = Agent::start(&format!(
        "[security]\nallowed_file_paths = [\"{}\"]\n",
        mnt.0.display()
    ));
    let mut c = agent.connect();
    let path = |name: &str| mnt.0.join(name).display().to_string();
    let data = codec::base64_encode(b"new content");

    let writes = [
        call(
            &mut c,
            "copy_to_guest",
            json!({"path": path("new"), "content_base64": data}),
        ),
        call(
            &mut c,
            "copy_to_guest",
            json!({"path": path("existing"), "content_base64": data, "overwrite": true}),
        ),
        call(
            &mut c,
            "file_open",
            json!({"path": path("sub/new"), "access": "write", "create_parents": true}),
        ),
        call(
            &mut c,
            "file_open",
            json!({"path": path("other"), "access": "write"}),
        ),
    ];
    for reply in &writes {
        assert_eq!(error_code(reply), -32003, "{reply}");
        assert_eq!(reply["error"]["data"]["os_error"], libc::EROFS, "{reply}");
    }
    let read = ok(call(
        &mut c,
        "copy_from_guest",
        json!({"path": path("existing")}),
    ));
    assert_eq!(
        codec::base64_decode(read["content_base64"].as_str().unwrap().as_bytes()).unwrap(),
        b"kept as it was"
    );
    let mut names: Vec<String> = std::fs::read_dir(&mnt.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["existing"]);
    c.assert_ping_is_next();

    mnt.remount("rw");
    let reply = ok(call(
        &mut c,
        "copy_to_guest",
        json!({"path": path("existing"), "content_base64": data, "overwrite": true}),
    ));
    assert_eq!(reply["size"], 11, "{reply}");
    assert_eq!(
        std::fs::read(mnt.0.join("existing")).unwrap(),
        b"new content"
    );
}

// ------------------------------------------------------------------ fork bomb

/// Live processes owned by `uid` (zombies excluded).
fn processes_of(uid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        };
        if field("State:").as_deref() == Some("Z") {
            continue;
        }
        if field("Uid:").and_then(|u| u.parse::<u32>().ok()) == Some(uid) {
            out.push(pid);
        }
    }
    out
}

fn nobody_uid() -> u32 {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|u| u.parse().ok())
        .expect("a nobody user in /etc/passwd")
}

/// On drop, SIGKILL the process groups of every process of `uid` (none ran
/// before the test, checked at its start).
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = processes_of(self.0);
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let pgid = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 2..].split(' ').nth(2))
                    .and_then(|g| g.parse::<i32>().ok());
                // SAFETY: kill(2); a process group of the bomb's user.
                unsafe {
                    match pgid {
                        Some(g) if g > 1 => libc::kill(-g, libc::SIGKILL),
                        _ => libc::kill(pid as i32, libc::SIGKILL),
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Most processes the fork bomb's user may have (RLIMIT_NPROC, set on the
/// agent as `LimitNPROC=` in a unit would, inherited by its commands, and
/// enforced once a command runs as the unprivileged `run_as` user).
const NPROC: u64 = 48;

/// A shell fork bomb started with `exec_start`, as an unprivileged
/// `run_as` user under RLIMIT_NPROC: it never has more than NPROC
/// processes, the timeout kills its whole process group, and meanwhile and
/// afterwards the agent answers on another connection with its own
/// descriptors and threads back where they were.
///
/// Safety on the machine running the test: the limit holds for any process
/// of that user; the script also refuses to run as root, and a first
/// command checks that run_as took effect before the bomb is started.
#[test]
fn a_fork_bomb_under_the_exec_limits() {
    let nobody = nobody_uid();
    assert!(
        processes_of(nobody).is_empty(),
        "processes of uid {nobody} already run: {:?}",
        processes_of(nobody)
    );
    // Whatever happens below, no process of the bomb outlives the test.
    let _reaper = Reaper(nobody);
    let agent = Agent::start_with(
        r#"
[security]
enable_exec = true

[[security.commands]]
path = "/bin/bash"
args = [["-c", "*"]]
run_as = "nobody"
"#,
        |cmd| {
            // SAFETY: setrlimit is async-signal-safe and touches no memory
            // of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: NPROC,
                        rlim_max: NPROC,
                    };
                    if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let pid = agent.child.id();
    // Descriptors and threads of the agent.
    let counts = |pid: u32| {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count();
        (fds, threads)
    };
    let mut c = agent.connect();
    let mut other = agent.connect();

    // run_as must be in force before anything forks.
    let who = ok(call(
        &mut c,
        "exec",
        json!({"command": "/bin/bash", "args": ["-c", "id -u"]}),
    ));
    assert_eq!(who["stdout"]["data"], format!("{nobody}\n"), "{who}");
    let before = counts(pid);

    // The classic bomb: each process starts two and returns. Under bash a
    // fork refused for the limit is retried ("fork: retry: Resource
    // temporarily unavailable"), so the pressure lasts until the timeout
    // (dash gives up at the first refusal and the bomb dies out alone).
    let bomb = r#"[ "$(id -u)" = 0 ] && exit 99; b() { b | b & }; b; wait"#;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(processes_of(nobody).len());
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    let started = ok(call(
        &mut c,
        "exec_start",
        json!({"command": "/bin/bash", "args": ["-c", bomb], "timeout_ms": 3000}),
    ));
    let handle = started["handle"].as_u64().unwrap();
    let status = loop {
        other.assert_ping_is_next();
        let st = ok(call(&mut c, "exec_status", json!({"handle": handle})));
        if st["exited"] == true {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();
    // The bomb's first shell may return before the timeout (its `wait`
    // ends once its own children have), leaving the rest of the bomb
    // running in its process group; those hold its output open, and the
    // agent kills the whole group at the timeout.
    if status["timed_out"] == true {
        assert_eq!(status["signal"], libc::SIGKILL, "{status}");
    }
    println!(
        "fork bomb: first shell: exit {} signal {} timed out {}",
        status["exit_code"], status["signal"], status["timed_out"]
    );
    assert!(most > 1, "the bomb never forked");
    assert!(
        most as u64 <= NPROC,
        "{most} processes of uid {nobody}, limit {NPROC}"
    );
    println!("fork bomb: at most {most} processes (limit {NPROC})");
    wait_until("every process of the bomb to be gone", || {
        processes_of(nobody).is_empty()
    });
    other.assert_ping_is_next();
    wait_until("the agent's descriptors to settle", || {
        counts(pid).0 <= before.0
    });
    println!(
        "agent before the bomb: {} fds, {} threads; after: {:?}",
        before.0,
        before.1,
        counts(pid)
    );
    c.assert_ping_is_next();
}

// ------------------------------------------------------ SIGKILL mid-overwrite

fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kva-upload."))
        .collect()
}

/// An upload that overwrites an existing file, cut by SIGKILL half way: the
/// old file is untouched (same bytes, same inode), the temporary is removed
/// when the agent starts again, and the restarted agent serves uploads.
#[test]
fn sigkill_while_overwriting_leaves_the_old_file() {
    let scratch = Scratch::new("kill-overwrite");
    let root = scratch.0.join("files");
    std::fs::create_dir(&root).unwrap();
    let target = root.join("target");
    std::fs::write(&target, b"the old content").unwrap();
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(&target).unwrap().ino();
    let mut agent = Agent::start(&format!(
        "[security]\nallowed_file_paths = [\"{}\"]\n",
        root.display()
    ));
    let mut c = agent.connect();
    let open = ok(call(
        &mut c,
        "file_open",
        json!({"path": target.display().to_string(), "access": "write", "overwrite": true}),
    ));
    let handle = open["handle"].as_u64().unwrap();
    let chunk = codec::base64_encode(&[0x5a; 64 * 1024]);
    for i in 0..4u64 {
        ok(call(
            &mut c,
            "file_write",
            json!({"handle": handle, "offset": i * 64 * 1024, "data_base64": chunk}),
        ));
    }
    assert_eq!(temps(&root).len(), 1, "the upload's temporary file");
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"the old content");
    // Restart on the same socket and configuration.
    let _ = std::fs::remove_file(&agent.socket);
    agent.child = Command::new(common::agent_binary())
        .arg("--config")
        .arg(agent.scratch.0.join("config.toml"))
        .arg("--transport")
        .arg(format!("unix:{}", agent.socket.display()))
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the stale temporary to be removed", || {
        temps(&root).is_empty()
    });
    wait_until("the socket", || agent.socket.exists());
    assert_eq!(std::fs::read(&target).unwrap(), b"the old content");
    assert_eq!(std::fs::metadata(&target).unwrap().ino(), inode);
    let mut c = agent.connect();
    let data = codec::base64_encode(b"the new content");
    ok(call(
        &mut c,
        "copy_to_guest",
        json!({"path": target.display().to_string(), "content_base64": data, "overwrite": true}),
    ));
    assert_eq!(std::fs::read(&target).unwrap(), b"the new content");
}
