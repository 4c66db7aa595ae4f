//! Every method under a policy that allows it and one that does not: the
//! one check in the dispatcher refuses exactly what the configuration says,
//! and get_capabilities lists exactly what it allows.

// These tests use POSIX paths and Linux programs: on Windows this file
// compiles to nothing rather than having its tests skipped or failing. On
// Linux they all run.
#![cfg(unix)]

mod common;

use common::{error_code, Agent, Scratch};
use kvm_agent_protocol::MethodName;
use serde_json::{json, Value};

/// Params that decode for each method, so the policy is what answers.
fn params(method: MethodName, dir: &str) -> Value {
    let file = format!("{dir}/policy-test.txt");
    match method {
        MethodName::Shutdown | MethodName::Reboot => json!({"confirm": false}),
        MethodName::Exec | MethodName::ExecStart => json!({"command": "true"}),
        MethodName::ExecStatus | MethodName::ExecKill => json!({"handle": 999}),
        MethodName::CopyToGuest => json!({"path": file, "content_base64": "aGk="}),
        MethodName::CopyFromGuest => json!({"path": file}),
        MethodName::FileOpen => json!({"path": file, "access": "read"}),
        MethodName::FileRead => json!({"handle": 999, "offset": 0, "length": 1}),
        MethodName::FileWrite => json!({"handle": 999, "offset": 0, "data_base64": ""}),
        MethodName::FileClose => json!({"handle": 999}),
        _ => json!({}),
    }
}

fn enabled_config(dir: &str, disabled: &[MethodName]) -> String {
    let disabled: Vec<&str> = disabled.iter().map(|m| m.as_str()).collect();
    format!(
        "[security]\nenable_exec = true\nallowed_commands = [\"true\"]\n\
         allowed_file_paths = [\"{dir}\"]\ndisabled_methods = {}\n",
        serde_json::to_string(&disabled).unwrap()
    )
}

fn request(c: &mut common::Conn, id: u64, method: MethodName, dir: &str) -> Value {
    let req =
        json!({"jsonrpc":"2.0","id":id,"method":method.as_str(),"params":params(method, dir)});
    c.call(&req.to_string())
}

fn is_denied_by(reply: &Value, key: &str) -> bool {
    reply["error"]["code"] == -32000 && reply["error"]["data"]["config_key"] == key
}

#[test]
fn each_method_is_refused_when_disabled_and_served_when_enabled() {
    let files = Scratch::new("policy-files");
    let dir = files.0.to_str().unwrap().to_owned();
    std::fs::write(files.0.join("policy-test.txt"), "hi").unwrap();

    // Everything enabled: no request is refused by the policy.
    let agent = Agent::start(&enabled_config(&dir, &[]));
    let mut c = agent.connect();
    for (i, m) in MethodName::ALL.iter().enumerate() {
        let reply = request(&mut c, i as u64, *m, &dir);
        assert!(
            reply["error"]["code"] != -32000,
            "{m} refused by an allowing policy: {reply}"
        );
    }
    let caps = c.call(r#"{"jsonrpc":"2.0","id":100,"method":"get_capabilities"}"#);
    let listed: Vec<&str> = caps["result"]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let all: Vec<&str> = MethodName::ALL.iter().map(|m| m.as_str()).collect();
    assert_eq!(listed, all, "get_capabilities under an allowing policy");
    drop(c);
    drop(agent);

    // Each method disabled in turn: refused, named, and left out of
    // get_capabilities; the others unaffected.
    for m in MethodName::ALL {
        if *m == MethodName::GetCapabilities {
            continue; // checked below with a separate agent
        }
        let agent = Agent::start(&enabled_config(&dir, &[*m]));
        let mut c = agent.connect();
        let reply = request(&mut c, 1, *m, &dir);
        assert!(
            is_denied_by(&reply, "security.disabled_methods"),
            "{m}: {reply}"
        );
        assert_eq!(reply["error"]["data"]["method"], m.as_str());
        let caps = c.call(r#"{"jsonrpc":"2.0","id":2,"method":"get_capabilities"}"#);
        let listed = caps["result"]["methods"].as_array().unwrap();
        assert!(!listed.iter().any(|x| x == m.as_str()), "{m} still listed");
        assert_eq!(listed.len(), MethodName::ALL.len() - 1);
    }
    let agent = Agent::start(&enabled_config(&dir, &[MethodName::GetCapabilities]));
    let mut c = agent.connect();
    let reply = c.call(r#"{"jsonrpc":"2.0","id":1,"method":"get_capabilities"}"#);
    assert!(is_denied_by(&reply, "security.disabled_methods"), "{reply}");
}

#[test]
fn the_default_policy_refuses_exec_and_nothing_else() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    for (i, m) in MethodName::ALL.iter().enumerate() {
        let reply = request(&mut c, i as u64, *m, "/tmp");
        let exec = m.as_str().starts_with("exec");
        assert_eq!(
            is_denied_by(&reply, "security.enable_exec"),
            exec,
            "{m}: {reply}"
        );
        if !exec {
            assert_ne!(error_code_or_zero(&reply), -32000, "{m}: {reply}");
        }
    }
}

fn error_code_or_zero(reply: &Value) -> i64 {
    if reply["error"].is_object() {
        error_code(reply)
    } else {
        0
    }
}

#[test]
fn file_copy_switched_off_refuses_every_file_method() {
    let agent = Agent::start("[security]\nenable_file_copy = false\n");
    let mut c = agent.connect();
    for (i, m) in MethodName::ALL.iter().enumerate() {
        let reply = request(&mut c, i as u64, *m, "/tmp");
        let file = matches!(
            m,
            MethodName::CopyToGuest
                | MethodName::CopyFromGuest
                | MethodName::FileOpen
                | MethodName::FileRead
                | MethodName::FileWrite
                | MethodName::FileClose
        );
        assert_eq!(
            is_denied_by(&reply, "security.enable_file_copy"),
            file,
            "{m}: {reply}"
        );
    }
}
