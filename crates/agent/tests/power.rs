//! shutdown and reboot against the real agent binary, on the development
//! machine: only refusals and the dry-run recorder (the harness sets
//! KVA_POWER_DRY_RUN, see common::power_log). Real power actions are tested
//! inside guests by crates/vmtest.

// On Windows the same tests run over the named pipe (tests/common), with
// the same dry-run recorder in front of InitiateShutdownW.

mod common;

use std::time::{Duration, Instant};

use common::{error_code, power_log, Agent};
use serde_json::json;

fn log_of(agent: &Agent) -> Option<String> {
    std::fs::read_to_string(power_log(&agent.scratch.0.join("config.toml"))).ok()
}

#[test]
fn without_confirm_nothing_happens() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    for (id, method, params) in [
        (1, "shutdown", json!({})),
        (2, "shutdown", json!({"confirm":false,"force":true})),
        (3, "reboot", json!({"force":true})),
        (4, "reboot", json!({"confirm":false,"delay_seconds":0})),
    ] {
        let r =
            c.call(&json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string());
        assert_eq!(
            r,
            json!({"jsonrpc":"2.0","id":id,"error":{"code":-32007,"message":"Confirmation required","data":{"method":method}}})
        );
    }
    // Longer than the settle time of an accepted request: still nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(log_of(&agent), None, "a refused request acted");
}

#[test]
fn a_confirmed_request_is_answered_first_then_recorded() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let r = c.call(
        r#"{"jsonrpc":"2.0","id":7,"method":"reboot","params":{"confirm":true,"force":true}}"#,
    );
    assert_eq!(
        r,
        json!({"jsonrpc":"2.0","id":7,"result":{"action":"reboot","force":true,"delay_seconds":0}})
    );
    assert_eq!(log_of(&agent), None, "acted before the settle time");
    let deadline = Instant::now() + common::PATIENCE;
    while log_of(&agent).is_none() {
        assert!(Instant::now() < deadline, "never acted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(log_of(&agent).unwrap(), "reboot force=true\n");
    // Audit-logged before acting.
    let audit = std::fs::read_to_string(agent.scratch.0.join("audit.jsonl")).unwrap();
    let rec: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|r: &serde_json::Value| r["method"] == "reboot")
        .unwrap();
    assert_eq!(rec["outcome"], "ok");
    assert_eq!(rec["details"]["force"], true);
}

#[test]
fn disabled_power_methods_are_denied() {
    let agent = Agent::start("[security]\ndisabled_methods = [\"shutdown\", \"reboot\"]\n");
    let mut c = agent.connect();
    let r = c.call(r#"{"jsonrpc":"2.0","id":1,"method":"shutdown","params":{"confirm":true}}"#);
    assert_eq!(error_code(&r), -32000);
    assert_eq!(
        r["error"]["data"]["config_key"],
        "security.disabled_methods"
    );
    let caps = c.call(r#"{"jsonrpc":"2.0","id":2,"method":"get_capabilities"}"#);
    let methods = caps["result"]["methods"].as_array().unwrap();
    assert!(!methods.iter().any(|m| m == "shutdown" || m == "reboot"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(log_of(&agent), None);
}
