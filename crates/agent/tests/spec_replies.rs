//! The replies shown in docs/protocol.md against the real agent: what the
//! document says the agent sends is what it sends, compared exactly as JSON
//! values (id, code, message, data: everything).
//!
//! `crates/protocol/tests/spec_examples.rs` checks the same examples against
//! the protocol types; this test replays them, with the default
//! configuration, over the unix transport (on Windows: the named pipe):
//!
//! - every `text malformed` / `hex malformed` / `hex oversize` input of the
//!   document, followed by its reply block (`json error`, `json response ...`
//!   or `text noreply`). After each one the next frame must answer a ping, so
//!   exactly the reply shown (or none) was sent;
//! - every `json request` immediately followed by a `json response` block
//!   whose methods the agent implements and allows by default (those its
//!   `get_capabilities` lists);
//! - every `json request` immediately followed by a `json error` block whose
//!   code is one the dispatcher gives before any handler runs
//!   ([`DISPATCH_CODES`]): those replies are the same whether or not the
//!   method is implemented. Other request/error pairs show what a handler not
//!   written yet will answer (e.g. -32007 for `shutdown` without `confirm`),
//!   and are left out;
//! - a few error examples that need a setting or a situation of their own
//!   (`max_connections`, `security.disabled_methods`), each in its own test.

#[path = "../../protocol/tests/spec_doc/mod.rs"]
mod spec_doc;

mod common;

use common::{Agent, Conn};
use serde_json::{json, Value};
use spec_doc::{blocks, kind, read_doc, Block, Kind};

/// Error codes the dispatcher answers before any handler runs: unknown
/// method, invalid params, denied by policy, not implemented. (-32009 also
/// comes from the dispatcher, but depends on what else is running.)
const DISPATCH_CODES: [i64; 4] = [-32601, -32602, -32000, -32010];

/// Methods whose results describe the machine (its OS, interfaces, load,
/// users): their examples cannot match any real guest exactly. They are
/// checked against the machine itself in `guest_info.rs`.
const MACHINE_DEPENDENT: [&str; 3] = ["get_info", "get_metrics", "get_users"];

/// Methods whose example results are Linux's: the file-transfer examples
/// use POSIX paths under /tmp (the default allowed directory on Linux). On
/// Windows their result examples are not replayed, nor their errors about a
/// POSIX path (Windows refuses such a path for another reason: it has no
/// drive letter); their other dispatcher errors still are.
#[cfg(windows)]
const LINUX_RESULTS: [&str; 6] = [
    "copy_to_guest",
    "copy_from_guest",
    "file_open",
    "file_read",
    "file_write",
    "file_close",
];
/// Methods whose example results are Linux's (see the Windows definition).
#[cfg(not(windows))]
const LINUX_RESULTS: [&str; 0] = [];

/// The document's examples come from a Linux guest: `"os_family": "linux"`
/// becomes this platform's family, the one field that differs by design.
fn this_os_family(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("os_family") == Some(&json!("linux")) && cfg!(windows) {
                m.insert("os_family".into(), json!("windows"));
            }
            m.values_mut().for_each(this_os_family);
        }
        Value::Array(a) => a.iter_mut().for_each(this_os_family),
        _ => {}
    }
}

/// Fewest examples the document must let this test replay.
const MIN_REPLAYED: usize = 30;

/// The reply block's content as JSON (`None` for `text noreply`).
fn expected_reply(b: &Block) -> Result<Option<Value>, String> {
    match kind(b)? {
        Kind::NoReply => Ok(None),
        Kind::Error | Kind::Response(_) => serde_json::from_str(&b.body)
            .map(|mut v| {
                this_os_family(&mut v);
                Some(v)
            })
            .map_err(|e| format!("reply block is not JSON: {e}")),
        other => Err(format!("expected a reply block, found {other:?}")),
    }
}

/// The methods a request block calls (one per element of a batch).
fn methods_called(body: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(body).expect("request examples are JSON");
    let items = match v {
        Value::Array(a) => a,
        v => vec![v],
    };
    items
        .iter()
        .map(|r| r["method"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Receive one frame and compare it with what the document shows.
fn expect_reply(conn: &mut Conn, expected: &Value, what: &str) -> Result<(), String> {
    let got = conn.recv();
    if &got != expected {
        return Err(format!(
            "{what}: the agent sent\n    {got}\nthe document shows\n    {expected}"
        ));
    }
    Ok(())
}

/// Send the rest of an oversized frame's body, which the agent skips.
fn send_rest_of_oversized(conn: &mut Conn, sent: &[u8]) {
    let announced = u32::from_be_bytes(sent[..4].try_into().unwrap()) as usize;
    let mut rest = announced - (sent.len() - 4);
    let zeros = vec![0u8; 1 << 20];
    while rest > 0 {
        let n = rest.min(zeros.len());
        conn.send_raw(&zeros[..n]);
        rest -= n;
    }
}

/// Where the document's file examples write (inside the default allowed
/// /tmp); removed before and after the replay so no run leaves files behind
/// or finds the previous run's.
const EXAMPLE_DIR: &str = "/tmp/kvm-agent-example";

struct RemoveOnDrop(&'static str);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

#[test]
fn document_replies_are_the_agents() {
    let _ = std::fs::remove_dir_all(EXAMPLE_DIR);
    let _cleanup = RemoveOnDrop(EXAMPLE_DIR);
    let doc = read_doc();
    let blocks = blocks(&doc);
    let agent = Agent::start("");
    let mut conn = agent.connect();

    // What this agent implements and allows with the default configuration.
    let caps = conn.call(r#"{"jsonrpc":"2.0","id":0,"method":"get_capabilities"}"#);
    let available: Vec<String> = serde_json::from_value(caps["result"]["methods"].clone())
        .unwrap_or_else(|e| panic!("get_capabilities: {e}: {caps}"));

    let mut failures = Vec::new();
    let mut replayed = 0;
    let mut skipped = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let k = match kind(b) {
            Ok(k) => k,
            Err(e) => {
                failures.push(format!("line {}: {e}", b.line));
                continue;
            }
        };
        let next = blocks.get(i + 1);
        let outcome: Result<(), String> = match &k {
            k if k.is_bad_input() => {
                let Some(reply_block) = next else {
                    failures.push(format!("line {}: input without a reply block", b.line));
                    continue;
                };
                expected_reply(reply_block).and_then(|expected| {
                    replayed += 1;
                    match k {
                        Kind::Malformed(body) => {
                            conn.send(body);
                            check_then_ping(&mut conn, expected.as_ref())
                        }
                        Kind::MalformedFrame(bytes) => {
                            conn.send_raw(bytes);
                            check_then_ping(&mut conn, expected.as_ref())
                        }
                        Kind::Oversize(bytes) => {
                            // The agent skips the announced body on this
                            // connection: use one of its own, send the whole
                            // body, and the connection must go on working.
                            let mut c = agent.connect();
                            c.send_raw(bytes);
                            let r = match &expected {
                                Some(e) => expect_reply(&mut c, e, "reply"),
                                None => Ok(()),
                            };
                            send_rest_of_oversized(&mut c, bytes);
                            r.and_then(|()| check_then_ping(&mut c, None))
                        }
                        _ => unreachable!(),
                    }
                })
            }
            Kind::Request => {
                let Some(reply_block) = next else { continue };
                let methods = methods_called(&b.body);
                let replay = match kind(reply_block) {
                    Ok(Kind::Response(_)) => methods.iter().all(|m| {
                        available.contains(m)
                            && !MACHINE_DEPENDENT.contains(&m.as_str())
                            && !LINUX_RESULTS.contains(&m.as_str())
                    }),
                    Ok(Kind::Error) => {
                        serde_json::from_str::<Value>(&reply_block.body)
                            .ok()
                            .and_then(|v| v["error"]["code"].as_i64())
                            .is_some_and(|c| DISPATCH_CODES.contains(&c))
                            && !(methods.iter().any(|m| LINUX_RESULTS.contains(&m.as_str()))
                                && b.body.contains("\"path\":\"/"))
                    }
                    _ => continue,
                };
                if !replay {
                    skipped.push(format!("line {}: {}", b.line, methods.join(", ")));
                    continue;
                }
                replayed += 1;
                expected_reply(reply_block).and_then(|expected| {
                    conn.send(b.body.as_bytes());
                    check_then_ping(&mut conn, expected.as_ref())
                })
            }
            _ => continue,
        };
        if let Err(e) = outcome {
            failures.push(format!("line {}: {e}", b.line));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "replayed {replayed} examples against the agent; left out {} request examples \
         whose reply describes the machine or needs a handler not written yet:\n  {}",
        skipped.len(),
        skipped.join("\n  ")
    );
    assert!(
        replayed >= MIN_REPLAYED,
        "only {replayed} examples replayed (at least {MIN_REPLAYED} expected)"
    );
}

/// The reply (if one is expected), then the answer to a ping as the very
/// next frame: exactly that one reply, or none, was sent.
fn check_then_ping(conn: &mut Conn, expected: Option<&Value>) -> Result<(), String> {
    if let Some(e) = expected {
        expect_reply(conn, e, "reply")?;
    }
    let ping = conn.call(r#"{"jsonrpc":"2.0","id":"after","method":"ping"}"#);
    let want = json!({"jsonrpc":"2.0","id":"after","result":{}});
    if ping != want {
        return Err(format!(
            "after the reply the agent sent {ping}, not the answer to a ping"
        ));
    }
    Ok(())
}

/// Every `agent_version` shown in the document is this build's.
#[test]
fn document_agent_version_is_the_crates() {
    let doc = read_doc();
    let mut seen = 0;
    for b in blocks(&doc).iter().filter(|b| b.lang == "json") {
        let Ok(v) = serde_json::from_str::<Value>(&b.body) else {
            continue;
        };
        let mut stack = vec![&v];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(o) => {
                    if let Some(version) = o.get("agent_version") {
                        seen += 1;
                        assert_eq!(
                            version,
                            env!("CARGO_PKG_VERSION"),
                            "line {}: agent_version",
                            b.line
                        );
                    }
                    stack.extend(o.values());
                }
                Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }
    }
    assert!(seen > 0, "no agent_version in the document");
}

/// The one `json error` block whose `error.data` has `member` = `value`.
fn error_example(member: &str, value: &str) -> Value {
    let doc = read_doc();
    let found: Vec<Value> = blocks(&doc)
        .iter()
        .filter(|b| matches!(kind(b), Ok(Kind::Error)))
        .filter_map(|b| serde_json::from_str::<Value>(&b.body).ok())
        .filter(|v| v["error"]["data"][member] == value)
        .collect();
    match <[Value; 1]>::try_from(found) {
        Ok([v]) => v,
        Err(found) => panic!(
            "expected one error example with data.{member} = {value:?}, found {}",
            found.len()
        ),
    }
}

/// §7: a connection beyond `max_connections` (default 64) gets the example's
/// error instead of `agent_ready`, and is closed.
#[test]
fn max_connections_example_is_the_agents() {
    let expected = error_example("limit", "max_connections");
    let limit = expected["error"]["data"]["value"]
        .as_u64()
        .expect("data.value");
    let agent = Agent::start("");
    let held: Vec<Conn> = (0..limit).map(|_| agent.connect()).collect();
    let mut refused = Conn::open(&agent.socket);
    assert_eq!(refused.recv(), expected);
    assert!(
        refused.closed_by_agent(),
        "the refused connection stays open"
    );
    drop(held);
}

/// §9: a method listed in `security.disabled_methods` gets the example's
/// error (the example's id and method, sent to an agent so configured).
#[test]
fn disabled_method_example_is_the_agents() {
    let expected = error_example("config_key", "security.disabled_methods");
    let method = expected["error"]["data"]["method"]
        .as_str()
        .expect("data.method");
    let agent = Agent::start(&format!(
        "[security]\ndisabled_methods = [{}]\n",
        json!(method)
    ));
    let mut conn = agent.connect();
    let request = json!({"jsonrpc":"2.0","id":expected["id"],"method":method});
    conn.send(request.to_string().as_bytes());
    assert_eq!(conn.recv(), expected);
}

/// §3.1: a batch reply over `max_frame_bytes` is replaced by one -32005 error
/// with id null, whose `response_bytes` is the size the array would have had.
#[test]
fn batch_reply_too_large_is_one_error() {
    let agent = Agent::start("[limits]\nmax_frame_bytes = 4096\n");
    let mut conn = agent.connect();
    // Each `0` earns an invalid-request answer much longer than itself.
    let n = 60;
    let body = format!("[{}]", vec!["0"; n].join(","));
    let member = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request: not an object","data":{"reason":"not an object"}}}"#;
    let response_bytes = n * member.len() + (n - 1) + 2;
    assert!(response_bytes > 4096);
    conn.send(body.as_bytes());
    assert_eq!(
        conn.recv(),
        json!({"jsonrpc":"2.0","id":null,"error":{"code":-32005,"message":"Response too large",
            "data":{"max_frame_bytes":4096,"response_bytes":response_bytes}}})
    );
    conn.assert_ping_is_next();
}
