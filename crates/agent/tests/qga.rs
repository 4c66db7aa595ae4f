//! The qemu-guest-agent front end end to end, where qemu-ga cannot be the
//! reference: our exec allowlist, path policy, power and audit trail apply
//! to QGA requests exactly as to native ones.
#![cfg(target_os = "linux")]

mod common;

use common::{b64, unb64, QgaAgent};
use serde_json::json;

#[test]
fn exec_runs_only_what_the_allowlist_names() {
    let agent =
        QgaAgent::start("[security]\nenable_exec = true\nallowed_commands = [\"cat\", \"sh\"]\n");
    let mut c = agent.connect();
    let started = c.call(&format!(
        r#"{{"execute":"guest-exec","arguments":{{"path":"cat","input-data":"{}","capture-output":true}}}}"#,
        b64("hello qga")
    ));
    let pid = started["return"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{started}"));
    let status = c.wait_exited(pid);
    assert_eq!(status["exitcode"], 0);
    assert_eq!(unb64(&status["out-data"]), "hello qga");
    assert_eq!(unb64(&status["err-data"]), "");
    // Once reported, the pid is forgotten, as with qemu-ga.
    let again = c.call(&format!(
        r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
    ));
    assert_eq!(again["error"]["class"], "GenericError");
    // Exit code, stderr, and no capture.
    let started = c.call(
        r#"{"execute":"guest-exec","arguments":{"path":"sh","arg":["-c","echo oops >&2; exit 3"],"capture-output":"stderr"}}"#,
    );
    let pid = started["return"]["pid"].as_i64().unwrap();
    let status = c.wait_exited(pid);
    assert_eq!(status["exitcode"], 3);
    assert_eq!(unb64(&status["err-data"]), "oops\n");
    assert!(status.get("out-data").is_none(), "{status}");
    // Not on the allowlist: refused by policy, a GenericError naming why.
    let refused =
        c.call(r#"{"execute":"guest-exec","arguments":{"path":"/bin/rm","arg":["-rf","/tmp/x"]}}"#);
    assert_eq!(refused["error"]["class"], "GenericError", "{refused}");
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("Denied by policy"),
        "{refused}"
    );
    let merged =
        c.call(r#"{"execute":"guest-exec","arguments":{"path":"cat","capture-output":"merged"}}"#);
    assert_eq!(merged["error"]["class"], "GenericError");
    // Every request left one record, marked as QGA, the refusal as denied
    // with the argv asked for.
    agent.assert_exec_denied_in_trail(json!(["/bin/rm", "-rf", "/tmp/x"]));
}

#[test]
fn disabled_exec_answers_as_qemu_ga_disabled_commands() {
    let agent = QgaAgent::start("");
    let mut c = agent.connect();
    for r in [
        r#"{"execute":"guest-exec","arguments":{"path":"true"}}"#,
        r#"{"execute":"guest-exec-status","arguments":{"pid":1}}"#,
        // Disabled comes before argument checks, as in qemu-ga.
        r#"{"execute":"guest-exec","arguments":{}}"#,
    ] {
        let e = c.call(r);
        assert_eq!(e["error"]["class"], "CommandNotFound", "{r}: {e}");
        assert!(e["error"]["desc"]
            .as_str()
            .unwrap()
            .ends_with("has been disabled: the command is not allowed"));
    }
    let trail = agent.audit();
    assert_eq!(trail.len(), 3);
    assert!(trail.iter().all(|r| r["decision"] == "denied"), "{trail:?}");
}

#[test]
fn files_are_confined_and_written_atomically() {
    let agent = QgaAgent::start("");
    let dir = &agent.scratch.0;
    let mut c = agent.connect();
    let e = c.call(r#"{"execute":"guest-file-open","arguments":{"path":"/etc/shadow"}}"#);
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    let e = c.call(&format!(
        r#"{{"execute":"guest-file-open","arguments":{{"path":"{}/../x"}}}}"#,
        dir.display()
    ));
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    let target = dir.join("written.txt");
    let open = c.call(&format!(
        r#"{{"execute":"guest-file-open","arguments":{{"path":"{}","mode":"w"}}}}"#,
        target.display()
    ));
    let h = open["return"].as_i64().unwrap_or_else(|| panic!("{open}"));
    for part in ["first ", "second"] {
        let w = c.call(&format!(
            r#"{{"execute":"guest-file-write","arguments":{{"handle":{h},"buf-b64":"{}"}}}}"#,
            b64(part)
        ));
        assert_eq!(
            w["return"],
            json!({"count": part.len(), "eof": false}),
            "{w}"
        );
    }
    // count cuts the buffer.
    let w = c.call(&format!(
        r#"{{"execute":"guest-file-write","arguments":{{"handle":{h},"buf-b64":"{}","count":1}}}}"#,
        b64("!?")
    ));
    assert_eq!(w["return"]["count"], 1);
    assert!(!target.exists(), "nothing in place before close");
    assert_eq!(
        c.call(&format!(
            r#"{{"execute":"guest-file-flush","arguments":{{"handle":{h}}}}}"#
        ))["return"],
        json!({})
    );
    assert_eq!(
        c.call(&format!(
            r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#
        ))["return"],
        json!({})
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "first second!");
    // Handles outlive the connection, as qemu-ga's do.
    let h = c.call(&format!(
        r#"{{"execute":"guest-file-open","arguments":{{"path":"{}"}}}}"#,
        target.display()
    ))["return"]
        .as_i64()
        .unwrap();
    drop(c);
    let mut c = agent.connect();
    let r = c.call(&format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":5}}}}"#
    ));
    assert_eq!(r["return"]["count"], 5);
    assert_eq!(unb64(&r["return"]["buf-b64"]), "first");
    c.call(&format!(
        r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#
    ));
}

#[test]
fn shutdown_sends_no_reply_and_goes_through_the_power_handler() {
    let agent = QgaAgent::start("[security]\ndisabled_methods = [\"reboot\"]\n");
    let mut c = agent.connect();
    let e = c.call(r#"{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}"#);
    assert_eq!(
        e["error"]["class"], "CommandNotFound",
        "reboot is disabled: {e}"
    );
    let e = c.call(r#"{"execute":"guest-shutdown","arguments":{"mode":"sideways"}}"#);
    assert_eq!(e["error"]["class"], "GenericError");
    c.send(br#"{"execute":"guest-shutdown"}"#);
    // No reply: the next reply is the ping's.
    assert_eq!(
        c.call(r#"{"execute":"guest-ping","id":1}"#),
        json!({"return": {}, "id": 1})
    );
    agent.wait_for_power_record("shutdown force=false");
    let trail = agent.audit();
    assert!(
        trail
            .iter()
            .any(|r| r["method"] == "guest-shutdown" && r["outcome"] == "ok"),
        "{trail:?}"
    );
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// As resources.rs measures the native protocol: CPU time and memory of the
/// agent from /proc, never durations.
#[test]
fn a_host_that_stops_reading_costs_no_cpu_and_stalls_only_itself() {
    let agent = QgaAgent::start("");
    let pid = agent.child.id();
    let mut greedy = agent.connect();
    // Far more replies than socket buffers hold, never reading one.
    const N: usize = 200_000;
    let many = r#"{"execute":"guest-ping"}"#.repeat(N);
    let mut sock = greedy.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut sock, many.as_bytes());
    });
    // Wait until the agent stalls: its CPU time stops moving.
    let mut last = cpu_ticks(pid);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
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
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(used <= 10, "a stalled connection cost {used} ticks in 2 s");
    // Another host is served meanwhile.
    let mut other = agent.connect();
    assert_eq!(other.call(r#"{"execute":"guest-ping","id":1}"#)["id"], 1);
    // Once the host reads again, every reply arrives.
    for _ in 0..N {
        assert_eq!(greedy.reply().1, json!({"return": {}}));
    }
    sender.join().unwrap();
}
