//! The audit trail of the real agent: exactly one record per request, with
//! the right decision, whatever the request was.

mod common;

use std::collections::BTreeMap;

use common::{toml_path, Agent};
use serde_json::Value;

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn ten_thousand_mixed_requests_leave_ten_thousand_records() {
    let dir = common::Scratch::new("audit");
    let trail = dir.0.join("audit.jsonl");
    let agent = Agent::start(&format!(
        "[audit]\ndestination = \"none\"\njsonl_path = {}\njsonl_max_bytes = 1073741824\n\
         [limits]\nmax_requests_per_connection = 1\n",
        toml_path(&trail)
    ));
    let mut c = agent.connect();
    // Ten kinds of request, a thousand of each, sent in one stream.
    let kinds: [(&str, &str, &str); 9] = [
        (
            r#"{"jsonrpc":"2.0","id":ID,"method":"ping"}"#,
            "allowed",
            "ok",
        ),
        (
            r#"{"jsonrpc":"2.0","id":ID,"method":"get_capabilities"}"#,
            "allowed",
            "ok",
        ),
        (
            r#"{"jsonrpc":"2.0","id":ID,"method":"exec","params":{"command":"id"}}"#,
            "denied",
            "denied",
        ),
        (
            r#"{"jsonrpc":"2.0","id":ID,"method":"no_such_method"}"#,
            "invalid",
            "method_not_found",
        ),
        (
            r#"{"jsonrpc":"2.0","id":ID,"method":"ping","params":{"x":1}}"#,
            "invalid",
            "invalid_params",
        ),
        (
            r#"{"jsonrpc":"1.0","id":ID,"method":"ping"}"#,
            "invalid",
            "invalid_request",
        ),
        (r#"{"jsonrpc":"2.0","method":"ping"}"#, "allowed", "ok"),
        (
            r#"{"jsonrpc":"2.0","id":ID,"method":"shutdown","params":{"confirm":false,"x":1}}"#,
            "invalid",
            "invalid_params",
        ),
        ("not json ID", "invalid", "parse_error"),
    ];
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut answers = 0;
    let mut stream = Vec::new();
    for i in 0..10_000usize {
        let (template, decision, outcome) = kinds[i % kinds.len()];
        let body = template.replace("ID", &i.to_string());
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(body.as_bytes());
        *expected
            .entry((decision.to_owned(), outcome.to_owned()))
            .or_default() += 1;
        if !template.contains(r#""method":"ping"}"#) || template.contains("\"id\"") {
            answers += 1;
        }
    }
    c.send_raw(&stream);
    for _ in 0..answers {
        c.recv();
    }
    c.assert_ping_is_next();
    *expected
        .entry(("allowed".to_owned(), "ok".to_owned()))
        .or_default() += 1;

    let recs = records(&trail);
    assert_eq!(recs.len(), 10_001, "one record per request");
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &recs {
        let key = (
            r["decision"].as_str().unwrap().to_owned(),
            r["outcome"].as_str().unwrap().to_owned(),
        );
        *seen.entry(key).or_default() += 1;
        let (transport, peer) = if cfg!(windows) {
            ("pipe", "named pipe client pid ")
        } else {
            ("unix", "unix pid ")
        };
        assert_eq!(r["transport"], transport);
        assert!(r["peer"].as_str().unwrap().starts_with(peer), "{r}");
        assert!(r["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    }
    assert_eq!(seen, expected);
    let denied = recs.iter().find(|r| r["decision"] == "denied").unwrap();
    assert_eq!(denied["method"], "exec");
    assert_eq!(denied["error_code"], -32000);
    let notification = recs
        .iter()
        .find(|r| r.get("id").is_none() && r["method"] == "ping");
    assert!(notification.is_some(), "notifications are recorded too");
}

#[test]
fn busy_refusals_and_frame_errors_are_recorded() {
    let dir = common::Scratch::new("audit-busy");
    let trail = dir.0.join("audit.jsonl");
    let agent = Agent::start(&format!(
        "[audit]\ndestination = \"none\"\njsonl_path = {}\n\
         [limits]\nmax_requests_per_connection = 1\nmax_frame_bytes = 4096\n",
        toml_path(&trail)
    ));
    let mut c = agent.connect();
    let reply = c.call(
        r#"[{"jsonrpc":"2.0","id":1,"method":"get_users"},{"jsonrpc":"2.0","id":2,"method":"get_users"}]"#,
    );
    assert_eq!(reply[1]["error"]["code"], -32009);
    c.send(&vec![b' '; 5000]);
    assert_eq!(c.recv()["error"]["code"], -32005);
    c.assert_ping_is_next();
    let recs = records(&trail);
    let decisions: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| {
            (
                r["decision"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    // The batch's two members (one ran, one found no slot), the oversized
    // frame, the ping.
    assert_eq!(decisions.len(), 4, "{decisions:?}");
    assert!(decisions.contains(&("busy", "busy")), "{decisions:?}");
    assert!(
        decisions.contains(&("invalid", "payload_too_large")),
        "{decisions:?}"
    );
    assert_eq!(decisions[3], ("allowed", "ok"));
}

#[test]
fn an_unwritable_trail_stops_the_agent_at_start() {
    let dir = common::Scratch::new("audit-bad");
    let config = dir.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\njsonl_path = {}\n",
            toml_path(&dir.0.join("no/such/dir/audit.jsonl"))
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::agent_binary())
        .arg("--config")
        .arg(&config)
        .arg("--transport")
        .arg(common::transport(&common::endpoint(&dir, "a")))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audit"), "{err}");
}
