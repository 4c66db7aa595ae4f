//! The qemu-guest-agent front end on Windows, end to end: the real agent exe
//! (under Wine here) serving qemu-ga's protocol on a named pipe, which stands
//! in for vioser's `\\.\Global\org.qemu.guest_agent.0`. The same allowlist,
//! path policy, power handler and audit trail apply as on Linux
//! (`tests/qga.rs`), with Windows names and paths.
#![cfg(windows)]

mod common;

use common::{b64, unb64, QgaAgent, QgaConn};
use serde_json::{json, Value};

/// One command with its arguments (paths with backslashes escaped by JSON).
fn call(c: &mut QgaConn, execute: &str, arguments: Value) -> Value {
    c.call(&json!({ "execute": execute, "arguments": arguments }).to_string())
}

#[test]
fn information_comes_as_qemu_ga_for_windows_gives_it() {
    let agent = QgaAgent::start("");
    let mut c = agent.connect();
    assert_eq!(
        c.call(r#"{"execute":"guest-sync","arguments":{"id":4711}}"#),
        json!({"return": 4711})
    );
    let os = c.call(r#"{"execute":"guest-get-osinfo"}"#);
    let os = &os["return"];
    assert_eq!(os["id"], "mswindows", "qemu-ga's id on Windows: {os}");
    let version_id = os["version-id"].as_str().unwrap_or_else(|| panic!("{os}"));
    let kernel_version = os["kernel-version"]
        .as_str()
        .unwrap_or_else(|| panic!("{os}"));
    assert!(
        version_id.starts_with(&format!("{kernel_version}.")),
        "kernel-version is major.minor of {version_id}: {os}"
    );
    assert_eq!(
        os["kernel-release"].as_str(),
        version_id.rsplit('.').next(),
        "the build number: {os}"
    );
    let host = c.call(r#"{"execute":"guest-get-host-name"}"#);
    assert!(
        !host["return"]["host-name"].as_str().unwrap().is_empty(),
        "{host}"
    );
    let nics = c.call(r#"{"execute":"guest-network-get-interfaces"}"#);
    assert!(nics["return"].is_array(), "{nics}");
    // The commands only Linux sources serve are disabled here, and
    // guest-info says so.
    let info = c.call(r#"{"execute":"guest-info"}"#);
    let commands = info["return"]["supported_commands"].as_array().unwrap();
    let enabled = |name: &str| {
        commands
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed"))["enabled"]
            .as_bool()
            .unwrap()
    };
    assert!(enabled("guest-get-osinfo"));
    assert!(!enabled("guest-get-fsinfo"));
    let e = c.call(r#"{"execute":"guest-get-fsinfo"}"#);
    assert_eq!(e["error"]["class"], "CommandNotFound", "{e}");
}

#[test]
fn exec_runs_only_what_the_allowlist_names() {
    let agent =
        QgaAgent::start("[security]\nenable_exec = true\nallowed_commands = [\"whoami.exe\"]\n");
    let mut c = agent.connect();
    let started = call(
        &mut c,
        "guest-exec",
        json!({"path": "whoami.exe", "capture-output": true}),
    );
    let pid = started["return"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{started}"));
    let status = c.wait_exited(pid);
    assert_eq!(status["exitcode"], 0, "{status}");
    assert!(!unb64(&status["out-data"]).trim().is_empty(), "{status}");
    // Not on the allowlist: refused by policy, a GenericError naming why.
    let refused = call(
        &mut c,
        "guest-exec",
        json!({"path": "cmd.exe", "arg": ["/c", "echo hi"]}),
    );
    assert_eq!(refused["error"]["class"], "GenericError", "{refused}");
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("Denied by policy"),
        "{refused}"
    );
    agent.assert_exec_denied_in_trail(json!(["cmd.exe", "/c", "echo hi"]));
}

#[test]
fn files_are_confined_and_written_atomically() {
    let agent = QgaAgent::start("[security]\nallowed_file_paths = [{scratch}]\n");
    let dir = &agent.scratch.0;
    let mut c = agent.connect();
    for outside in [
        r"C:\windows\win.ini".to_owned(),
        format!(r"{}\..\x", dir.display()),
        format!(r"{}\x.txt:stream", dir.display()),
        format!(r"{}\NUL", dir.display()),
    ] {
        let e = call(
            &mut c,
            "guest-file-open",
            json!({ "path": outside, "mode": "w" }),
        );
        assert_eq!(e["error"]["class"], "GenericError", "{outside}: {e}");
    }
    let target = dir.join("written.txt");
    let open = call(
        &mut c,
        "guest-file-open",
        json!({"path": target.display().to_string(), "mode": "w"}),
    );
    let h = open["return"].as_i64().unwrap_or_else(|| panic!("{open}"));
    for part in ["first ", "second"] {
        let w = call(
            &mut c,
            "guest-file-write",
            json!({"handle": h, "buf-b64": b64(part)}),
        );
        assert_eq!(
            w["return"],
            json!({"count": part.len(), "eof": false}),
            "{w}"
        );
    }
    assert!(!target.exists(), "nothing in place before close");
    assert_eq!(
        call(&mut c, "guest-file-close", json!({ "handle": h }))["return"],
        json!({})
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "first second");
    // Handles outlive the connection, as qemu-ga's do.
    let h = call(
        &mut c,
        "guest-file-open",
        json!({"path": target.display().to_string()}),
    )["return"]
        .as_i64()
        .unwrap();
    drop(c);
    let mut c = agent.connect();
    let r = call(&mut c, "guest-file-read", json!({"handle": h, "count": 5}));
    assert_eq!(r["return"]["count"], 5, "{r}");
    assert_eq!(unb64(&r["return"]["buf-b64"]), "first");
    call(&mut c, "guest-file-close", json!({ "handle": h }));
}

#[test]
fn shutdown_sends_no_reply_and_goes_through_the_power_handler() {
    let agent = QgaAgent::start("");
    let mut c = agent.connect();
    c.send(br#"{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}"#);
    // No reply: the next reply is the ping's.
    assert_eq!(
        c.call(r#"{"execute":"guest-ping","id":1}"#),
        json!({"return": {}, "id": 1})
    );
    agent.wait_for_power_record("reboot force=false");
}
