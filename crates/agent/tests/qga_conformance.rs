//! Side by side with the real qemu-ga: the same requests to Debian's
//! qemu-guest-agent and to this agent's qemu-ga front end, both on unix
//! sockets, and the replies compared by shape (member names, JSON types,
//! error classes, `id` echo), framing cases included.
//!
//! qemu-ga runs with every state-changing command blocked (`-b`), its state
//! directory and pid file in the scratch directory, no configuration file,
//! and its socket in a directory only this user can enter. qemu-ga must be
//! installed (`cargo xtask test` installs Debian's qemu-guest-agent): a
//! missing qemu-ga fails the test, it never skips it.
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{QgaConn as Conn, Scratch, PATIENCE};
use serde_json::{json, Value};

/// State-changing commands qemu-ga refuses in this test.
const BLOCKED: &[&str] = &[
    "guest-shutdown",
    "guest-exec",
    "guest-exec-status",
    "guest-file-write",
    "guest-set-time",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-set-vcpus",
    "guest-set-user-password",
    "guest-set-memory-blocks",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
];

fn qemu_ga_binary() -> PathBuf {
    let candidates = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"];
    if let Some(found) = candidates.iter().map(PathBuf::from).find(|p| p.exists()) {
        return found;
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(found) = std::env::split_paths(&path)
            .map(|d| d.join("qemu-ga"))
            .find(|p| p.exists())
        {
            return found;
        }
    }
    panic!(
        "qemu-ga is not installed: this test compares against it and must not be skipped. \
         `cargo xtask test` installs it (Debian package qemu-guest-agent)"
    );
}

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-ga and this agent, each on its own socket.
struct Pair {
    theirs: PathBuf,
    ours: PathBuf,
    scratch: Scratch,
    _procs: [Proc; 2],
}

/// Wait for `path` to appear; fail at once, with its exit status and log,
/// when the process that should create it has exited.
fn wait_for(path: &Path, server: &mut Proc, log: Option<&Path>) {
    let deadline = Instant::now() + PATIENCE;
    while !path.exists() {
        if let Ok(Some(status)) = server.0.try_wait() {
            let said = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            panic!(
                "{} never appeared: its server exited ({status}): {said}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start() -> Pair {
    let scratch = Scratch::new("qga");
    std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let dir = &scratch.0;
    let theirs = dir.join("qemu-ga.sock");
    let ours = dir.join("ours.sock");
    // An empty configuration file: nothing from the machine's /etc/qemu.
    std::fs::write(dir.join("qemu-ga.conf"), "").unwrap();
    // The state folder exists before qemu-ga starts: it may look at it at
    // once, and exits when it is not there.
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let qga_log = std::fs::File::create(dir.join("qemu-ga.log")).unwrap();
    let qga = Command::new(qemu_ga_binary())
        .env("QGA_CONF", dir.join("qemu-ga.conf"))
        .args(["-m", "unix-listen", "-p"])
        .arg(&theirs)
        .arg("-t")
        .arg(dir.join("state"))
        .arg("-f")
        .arg(dir.join("qemu-ga.pid"))
        .arg("-b")
        .arg(BLOCKED.join(","))
        .stdin(Stdio::null())
        .stderr(qga_log)
        .spawn()
        .expect("start qemu-ga");
    let mut qga = Proc(qga);
    // Ours mirrors the blocklist where it is a policy (power off) and
    // otherwise runs with its defaults: exec is off, file reads are
    // confined to /tmp and /var/tmp.
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[security]\ndisabled_methods = [\"shutdown\", \"reboot\"]\n[audit]\ndestination = \"none\"\njsonl_path = \"{}\"\n",
            dir.join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let agent = Command::new(common::agent_binary())
        .env("KVA_POWER_DRY_RUN", dir.join("power.log"))
        .arg("--config")
        .arg(&config)
        .arg("--transport")
        .arg(format!("unix:{}", dir.join("native.sock").display()))
        .arg("--qga-transport")
        .arg(format!("unix:{}", ours.display()))
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the agent");
    let mut agent = Proc(agent);
    wait_for(&theirs, &mut qga, Some(&dir.join("qemu-ga.log")));
    wait_for(&ours, &mut agent, None);
    Pair {
        theirs,
        ours,
        scratch,
        _procs: [qga, agent],
    }
}

/// Members that QEMU's schema makes optional, which either agent may leave
/// out depending on the machine (a NIC without addresses, a disk without a
/// serial number...).
const OPTIONAL: &[&str] = &[
    "hardware-address",
    "ip-addresses",
    "statistics",
    "serial",
    "dev",
    "dependencies",
    "address",
    "can-offline",
    "zone",
    "used-bytes",
    "total-bytes",
    "total-bytes-privileged",
    "kernel-release",
    "kernel-version",
    "machine",
    "id",
    "name",
    "pretty-name",
    "version",
    "version-id",
    "variant",
    "variant-id",
    "domain",
    "alias",
    "smart",
    "iowait",
    "irq",
    "softirq",
    "steal",
    "guest",
    "guestnice",
    "discard-ios",
    "discard-merges",
    "discard-sectors",
    "discard-ticks",
    "flush-ios",
    "flush-ticks",
];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences in shape between `ours` and `theirs` (qemu-ga's), at `path`.
/// For arrays, each of our elements is compared with the union of
/// qemu-ga's elements: a member qemu-ga gives in every element is
/// required, one it gives in some is allowed.
fn diff(ours: &Value, theirs: &Value, path: &str, out: &mut Vec<String>) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            diff_object(a, &[b], path, out);
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.is_empty() || b.is_empty() {
                return;
            }
            if b.iter().all(Value::is_object) {
                let objs: Vec<&serde_json::Map<String, Value>> =
                    b.iter().filter_map(Value::as_object).collect();
                for (i, x) in a.iter().enumerate() {
                    match x.as_object() {
                        Some(o) => diff_object(o, &objs, &format!("{path}[{i}]"), out),
                        None => out.push(format!(
                            "{path}[{i}]: {} where qemu-ga has objects",
                            kind(x)
                        )),
                    }
                }
            } else {
                for (i, x) in a.iter().enumerate() {
                    diff(x, &b[0], &format!("{path}[{i}]"), out);
                }
            }
        }
        (a, b) => {
            let (ka, kb) = (kind(a), kind(b));
            // QAPI's `number` accepts integers.
            if ka != kb && !(ka == "int" && kb == "number") && !(ka == "number" && kb == "int") {
                out.push(format!("{path}: {ka} where qemu-ga has {kb}"));
            }
        }
    }
}

fn diff_object(
    ours: &serde_json::Map<String, Value>,
    theirs: &[&serde_json::Map<String, Value>],
    path: &str,
    out: &mut Vec<String>,
) {
    let known: BTreeSet<&String> = theirs.iter().flat_map(|o| o.keys()).collect();
    let always: BTreeSet<&String> = known
        .iter()
        .copied()
        .filter(|k| theirs.iter().all(|o| o.contains_key(*k)))
        .collect();
    let optional = |k: &str| OPTIONAL.contains(&k) || path.ends_with(".stats");
    for k in &always {
        if !ours.contains_key(*k) && !optional(k) {
            out.push(format!("{path}.{k}: missing"));
        }
    }
    for (k, v) in ours {
        if !known.contains(k) {
            if !optional(k) {
                out.push(format!("{path}.{k}: not a member qemu-ga gives here"));
            }
            continue;
        }
        // Compare with the union of qemu-ga's values for this member.
        let values: Vec<&Value> = theirs.iter().filter_map(|o| o.get(k)).collect();
        let arrays: Vec<Value> = values
            .iter()
            .filter_map(|v| v.as_array())
            .flatten()
            .cloned()
            .collect();
        if values.iter().all(|v| v.is_array()) {
            diff(v, &Value::Array(arrays), &format!("{path}.{k}"), out);
        } else if values.iter().all(|v| v.is_object()) {
            let objs: Vec<&serde_json::Map<String, Value>> =
                values.iter().filter_map(|v| v.as_object()).collect();
            match v.as_object() {
                Some(o) => diff_object(o, &objs, &format!("{path}.{k}"), out),
                None => out.push(format!(
                    "{path}.{k}: {} where qemu-ga has an object",
                    kind(v)
                )),
            }
        } else {
            diff(v, values[0], &format!("{path}.{k}"), out);
        }
    }
}

fn assert_same_shape(what: &str, ours: &Value, theirs: &Value) {
    let mut out = Vec::new();
    diff(ours, theirs, "", &mut out);
    // Error replies: the class must be the same.
    if theirs.get("error").is_some() || ours.get("error").is_some() {
        assert_eq!(
            ours["error"]["class"], theirs["error"]["class"],
            "{what}: error class\n ours:    {ours}\n qemu-ga: {theirs}"
        );
    }
    assert!(
        out.is_empty(),
        "{what}: shapes differ:\n  {}\n ours:    {ours}\n qemu-ga: {theirs}",
        out.join("\n  ")
    );
}

/// The same request to both, replies compared.
fn both(pair: &Pair, request: &str) -> (Value, Value) {
    let ours = Conn::open(&pair.ours).call(request);
    let theirs = Conn::open(&pair.theirs).call(request);
    assert_same_shape(request, &ours, &theirs);
    (ours, theirs)
}

#[test]
fn queries_answer_in_qemu_gas_shapes() {
    let pair = start();
    for command in [
        "guest-ping",
        "guest-info",
        "guest-get-osinfo",
        "guest-get-host-name",
        "guest-get-users",
        "guest-get-timezone",
        "guest-get-time",
        "guest-network-get-interfaces",
        "guest-get-fsinfo",
        "guest-get-disks",
        "guest-get-vcpus",
        "guest-get-load",
        "guest-get-cpustats",
        "guest-get-diskstats",
    ] {
        let (ours, _) = both(&pair, &format!(r#"{{"execute":"{command}"}}"#));
        assert!(ours.get("return").is_some(), "{command}: {ours}");
    }
    // guest-info lists every command qemu-ga has.
    let (ours, theirs) = both(&pair, r#"{"execute":"guest-info"}"#);
    let names = |v: &Value| -> BTreeSet<String> {
        v["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&ours), names(&theirs));
    // And says the same of which reply nothing on success.
    let silent = |v: &Value| -> BTreeSet<String> {
        v["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["success-response"] == false)
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(silent(&ours), silent(&theirs));
    let enabled = |v: &Value, name: &str| {
        v["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["enabled"]
            .clone()
    };
    for (name, on) in [
        ("guest-shutdown", false),
        ("guest-exec", false),
        ("guest-ping", true),
        ("guest-fsfreeze-freeze", false),
    ] {
        assert_eq!(enabled(&ours, name), json!(on), "{name}");
        assert_eq!(enabled(&theirs, name), json!(on), "{name} (qemu-ga)");
    }
    // The ids echo, and sync answers with its id.
    for id in [r#"5"#, r#""x-1""#, r#"{"a":[1]}"#, "null"] {
        let (ours, _) = both(&pair, &format!(r#"{{"execute":"guest-ping","id":{id}}}"#));
        assert_eq!(ours["id"], serde_json::from_str::<Value>(id).unwrap());
    }
    let (ours, theirs) = both(
        &pair,
        r#"{"execute":"guest-sync","arguments":{"id":123456789}}"#,
    );
    assert_eq!(
        (ours["return"].clone(), theirs["return"].clone()),
        (json!(123456789), json!(123456789))
    );
}

#[test]
fn errors_have_qemu_gas_classes() {
    let pair = start();
    for request in [
        // Unknown, disabled (by policy here, by -b there), not offered.
        r#"{"execute":"guest-no-such-command"}"#,
        r#"{"execute":"guest-no-such-command","id":3}"#,
        r#"{"execute":"guest-shutdown"}"#,
        r#"{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/true"}}"#,
        r#"{"execute":"guest-exec","arguments":{}}"#,
        r#"{"execute":"guest-fsfreeze-freeze"}"#,
        r#"{"execute":"guest-set-user-password","arguments":{}}"#,
        // Arguments.
        r#"{"execute":"guest-sync","arguments":{}}"#,
        r#"{"execute":"guest-sync","arguments":{"id":"x"}}"#,
        r#"{"execute":"guest-ping","arguments":{"x":1}}"#,
        r#"{"execute":"guest-exec-status","arguments":{"pid":999999}}"#,
        r#"{"execute":"guest-file-read","arguments":{"handle":999999}}"#,
        r#"{"execute":"guest-file-close","arguments":{"handle":999999}}"#,
        // The envelope.
        r#"[{"execute":"guest-ping"}]"#,
        r#"{"execute":5,"id":7}"#,
        r#"{"execute":"guest-ping","foo":1}"#,
        r#"{"arguments":{}}"#,
        r#"{"execute":"guest-ping","arguments":[]}"#,
        r#"{"exec-oob":"guest-ping"}"#,
    ] {
        let (ours, _) = both(&pair, request);
        assert!(ours.get("error").is_some(), "{request}: {ours}");
    }
}

#[test]
fn file_reads_match() {
    let pair = start();
    let file = std::env::temp_dir().join(format!("kva-qga-read-{}", std::process::id()));
    std::fs::write(&file, b"0123456789").unwrap();
    let mut handles = Vec::new();
    for path in [&pair.ours, &pair.theirs] {
        let mut c = Conn::open(path);
        let open = c.call(&format!(
            r#"{{"execute":"guest-file-open","arguments":{{"path":"{}","mode":"r"}}}}"#,
            file.display()
        ));
        let h = open["return"].as_i64().unwrap_or_else(|| panic!("{open}"));
        let mut replies = vec![open];
        for r in [
            format!(r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":4}}}}"#),
            format!(
                r#"{{"execute":"guest-file-seek","arguments":{{"handle":{h},"offset":-2,"whence":"end"}}}}"#
            ),
            format!(r#"{{"execute":"guest-file-read","arguments":{{"handle":{h}}}}}"#),
            format!(
                r#"{{"execute":"guest-file-seek","arguments":{{"handle":{h},"offset":1,"whence":0}}}}"#
            ),
            format!(r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":2}}}}"#),
            format!(r#"{{"execute":"guest-file-flush","arguments":{{"handle":{h}}}}}"#),
            format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#),
        ] {
            replies.push(c.call(&r));
        }
        handles.push(replies);
    }
    let _ = std::fs::remove_file(&file);
    let (ours, theirs) = (&handles[0], &handles[1]);
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_same_shape(&format!("file step {i}"), a, b);
    }
    // Same data at the same positions.
    assert_eq!(ours[1]["return"]["buf-b64"], theirs[1]["return"]["buf-b64"]);
    assert_eq!(ours[2]["return"]["position"], json!(8));
    assert_eq!(ours[3]["return"], theirs[3]["return"]);
    assert_eq!(ours[5]["return"], theirs[5]["return"]);
}

#[test]
fn framing_cases_match() {
    let pair = start();
    let ping = |id: u32| format!(r#"{{"execute":"guest-ping","id":{id}}}"#);
    for path in [&pair.ours, &pair.theirs] {
        let who = if path == &pair.ours {
            "ours"
        } else {
            "qemu-ga"
        };
        // Back to back in one write, with and without whitespace between.
        let mut c = Conn::open(path);
        c.resync(1);
        c.send(
            format!(
                "{}{}\n{}",
                ping(1),
                ping(2),
                r#"{"execute":"guest-sync","arguments":{"id":3}}"#
            )
            .as_bytes(),
        );
        assert_eq!(c.reply().1["id"], 1, "{who}");
        assert_eq!(c.reply().1["id"], 2, "{who}");
        assert_eq!(c.reply().1["return"], 3, "{who}");
        // Split byte by byte.
        for b in ping(4).as_bytes() {
            c.send(&[*b]);
        }
        assert_eq!(c.reply().1, json!({"return": {}, "id": 4}), "{who}");
        // Garbage, half a request, then 0xFF and a delimited sync: the host
        // finds its answer after the 0xFF.
        c.send(b"}}garbage{\"execute\":\"gue");
        c.resync(77);
        assert_eq!(c.call(&ping(5))["id"], 5, "{who}");
        // A half request, then the host goes away; the next host, after the
        // resync every host must do, is served. (qemu-ga serves one host at
        // a time: each connection is closed before the next.)
        drop(c);
        let mut half = Conn::open(path);
        half.resync(2);
        half.send(br#"{"execute":"guest-ping","id":"#);
        drop(half);
        let mut next = Conn::open(path);
        next.resync(88);
        assert_eq!(next.call(&ping(6))["id"], 6, "{who}");
    }
    // Ours starts every connection afresh: a request right after a
    // half request of an earlier host is answered even without a resync
    // (qemu-ga keeps the half request and garbles the next host's first).
    let mut half = Conn::open(&pair.ours);
    half.send(br#"{"execute":"guest-ping","id":"#);
    drop(half);
    let mut next = Conn::open(&pair.ours);
    assert_eq!(next.call(&ping(9))["id"], 9);
    let _ = &pair.scratch;
}

#[test]
fn garbage_gets_few_errors_and_never_a_flood() {
    let pair = start();
    let mut c = Conn::open(&pair.ours);
    // 64 KiB of stray closing braces, then a request: one error, then the
    // answer.
    let mut junk = vec![b'}'; 65536];
    junk.extend_from_slice(br#"{"execute":"guest-ping","id":1}"#);
    c.send(&junk);
    let (_, e) = c.reply();
    assert_eq!(e["error"]["class"], "GenericError");
    assert_eq!(c.reply().1["id"], 1);
    // A thousand invalid messages in a row: at most 16 errors, then
    // silence until the host resynchronises.
    let bad = r#"{"execute":5}"#.repeat(1000);
    c.send(bad.as_bytes());
    c.send(&[0xFF]);
    c.send(br#"{"execute":"guest-sync-delimited","arguments":{"id":5}}"#);
    let mut errors = 0;
    loop {
        let (delimited, v) = c.reply();
        if delimited {
            assert_eq!(v["return"], 5);
            break;
        }
        assert_eq!(v["error"]["class"], "GenericError");
        errors += 1;
    }
    assert_eq!(errors, 16);
    // Errors are answered again after the resync.
    assert_eq!(c.call(r#"{"execute":5}"#)["error"]["class"], "GenericError");
    assert_eq!(c.call(r#"{"execute":"guest-ping","id":2}"#)["id"], 2);
}

/// The comparator itself: it must see a missing member, a wrong type and
/// an unknown member, and accept schema-optional ones.
#[test]
fn the_shape_comparator_sees_differences() {
    let theirs =
        json!({"return": [{"name": "lo", "ip-addresses": [{"prefix": 8}]}, {"name": "eth0"}]});
    let mut out = Vec::new();
    diff(&json!({"return": [{"name": "x"}]}), &theirs, "", &mut out);
    assert!(out.is_empty(), "{out:?}");
    diff(&json!({"return": [{"name": 1}]}), &theirs, "", &mut out);
    diff(&json!({"return": [{"nom": "x"}]}), &theirs, "", &mut out);
    diff(
        &json!({"return": [{"ip-addresses": [{}]}]}),
        &theirs,
        "",
        &mut out,
    );
    diff(
        &json!({"return": [{"name": "x", "ip-addresses": [{"prefix": "8"}]}]}),
        &theirs,
        "",
        &mut out,
    );
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(out[2].ends_with("prefix: missing"), "{out:?}");
}
