//! Raw bytes against the real agent: every malformed case gets exactly the
//! documented reply (docs/protocol.md), at most one per bad frame, and the
//! agent keeps answering `ping` afterwards.

mod common;

use common::{error_code, Agent, Conn};
use serde_json::json;

const PING: &str = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;

#[test]
fn oversized_frame_gets_one_error_and_is_skipped() {
    let agent = Agent::start("[limits]\nmax_frame_bytes = 4096\n");
    let mut c = agent.connect();
    // Announce 1 MiB and send it all: the body must be skipped, not parsed.
    let body = vec![b'{'; 1 << 20];
    c.send(&body);
    let reply = c.recv();
    assert_eq!(reply["id"], json!(null));
    assert_eq!(error_code(&reply), -32005);
    assert_eq!(reply["error"]["data"]["max_frame_bytes"], 4096);
    assert_eq!(reply["error"]["data"]["frame_bytes"], 1 << 20);
    c.assert_ping_is_next();
}

#[test]
fn oversized_header_is_answered_before_its_body_arrives() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.send_raw(&u32::MAX.to_be_bytes());
    let reply = c.recv();
    assert_eq!(error_code(&reply), -32005);
    assert_eq!(reply["error"]["data"]["frame_bytes"], u64::from(u32::MAX));
    // The agent is now skipping 4 GiB on this connection; others are fine.
    let mut other = agent.connect();
    other.assert_ping_is_next();
}

#[test]
fn frame_at_the_limit_is_accepted() {
    let agent = Agent::start("[limits]\nmax_frame_bytes = 4096\n");
    let mut c = agent.connect();
    let mut body = br#"{"jsonrpc":"2.0","id":7,"method":"ping","pad":""#.to_vec();
    body.resize(4096 - 2, b' ');
    body.extend_from_slice(b"\"}");
    assert_eq!(body.len(), 4096);
    c.send(&body);
    assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":7,"result":{}}));
}

#[test]
fn truncated_frame_then_disconnect_does_not_garble_the_next_connection() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let mut framed = (PING.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&PING.as_bytes()[..10]);
    c.send_raw(&framed);
    drop(c);
    let mut next = agent.connect();
    next.assert_ping_is_next();
}

#[test]
fn zero_length_frame_is_a_parse_error() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.send(b"");
    let reply = c.recv();
    assert_eq!(reply["id"], json!(null));
    assert_eq!(error_code(&reply), -32700);
    assert_eq!(reply["error"]["data"]["reason"], "empty");
    c.assert_ping_is_next();
}

#[test]
fn garbage_is_one_parse_error() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.send(b"\x00\x01garbage{{{[[[\"");
    let reply = c.recv();
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(null), -32700)
    );
    c.assert_ping_is_next();
}

#[test]
fn invalid_utf8_is_a_parse_error_with_its_offset() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\xff\"}");
    let reply = c.recv();
    assert_eq!(error_code(&reply), -32700);
    assert_eq!(reply["error"]["data"]["offset"], 45);
    c.assert_ping_is_next();
}

#[test]
fn wrong_jsonrpc_version_is_an_invalid_request_with_the_id() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let reply = c.call(r#"{"jsonrpc":"1.0","id":41,"method":"ping"}"#);
    assert_eq!(reply["id"], 41);
    assert_eq!(error_code(&reply), -32600);
    c.assert_ping_is_next();
}

#[test]
fn missing_method_is_an_invalid_request() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let reply = c.call(r#"{"jsonrpc":"2.0","id":42}"#);
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(42), -32600)
    );
    // Without an id the object is still invalid, and answered with id null.
    let reply = c.call(r#"{"jsonrpc":"2.0"}"#);
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(null), -32600)
    );
    c.assert_ping_is_next();
}

#[test]
fn params_of_the_wrong_type() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    // Not structured at all: an invalid request.
    let reply = c.call(r#"{"jsonrpc":"2.0","id":43,"method":"ping","params":"now"}"#);
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(43), -32600)
    );
    // Structured, but not what the method takes: invalid params.
    let reply = c.call(r#"{"jsonrpc":"2.0","id":44,"method":"ping","params":{"count":3}}"#);
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(44), -32602)
    );
    assert!(reply["error"]["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("count"));
    let reply = c.call(r#"{"jsonrpc":"2.0","id":45,"method":"ping","params":[1]}"#);
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(45), -32602)
    );
    c.assert_ping_is_next();
}

#[test]
fn unknown_method_is_method_not_found() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let reply = c.call(r#"{"jsonrpc":"2.0","id":46,"method":"guest-ping"}"#);
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(46), -32601)
    );
    assert_eq!(reply["error"]["data"]["method"], "guest-ping");
    c.assert_ping_is_next();
}

#[test]
fn empty_batch_is_one_invalid_request() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let reply = c.call("[]");
    assert!(reply.is_object(), "one error, not an array: {reply}");
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(null), -32600)
    );
    c.assert_ping_is_next();
}

#[test]
fn batch_is_answered_in_order_without_notifications() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let reply = c.call(
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},
            {"jsonrpc":"2.0","method":"ping"},
            1,
            {"jsonrpc":"2.0","id":"x","method":"nope"},
            {"jsonrpc":"2.0","id":3,"method":"get_capabilities"}]"#,
    );
    let items = reply.as_array().expect("an array");
    assert_eq!(items.len(), 4, "{reply}");
    assert_eq!(items[0], json!({"jsonrpc":"2.0","id":1,"result":{}}));
    assert_eq!(
        (items[1]["id"].clone(), error_code(&items[1])),
        (json!(null), -32600)
    );
    assert_eq!(
        (items[2]["id"].clone(), error_code(&items[2])),
        (json!("x"), -32601)
    );
    assert_eq!(items[3]["id"], 3);
    assert!(items[3]["result"]["methods"].is_array());
    c.assert_ping_is_next();
}

#[test]
fn batch_of_notifications_gets_no_reply() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.send(br#"[{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"get_info"}]"#);
    c.send(br#"{"jsonrpc":"2.0","method":"ping"}"#);
    c.assert_ping_is_next();
}

#[test]
fn batch_longer_than_the_limit_is_one_error() {
    let agent = Agent::start("[limits]\nmax_batch_len = 2\n");
    let mut c = agent.connect();
    let reply = c.call(&format!("[{PING},{PING},{PING}]"));
    assert_eq!(
        (reply["id"].clone(), error_code(&reply)),
        (json!(null), -32005)
    );
    assert_eq!(
        reply["error"]["data"],
        json!({"max_batch_len": 2, "batch_len": 3})
    );
    c.assert_ping_is_next();
}

#[test]
fn duplicate_ids_are_each_answered() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    c.send(br#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#);
    c.send(br#"{"jsonrpc":"2.0","id":5,"method":"get_capabilities"}"#);
    let (a, b) = (c.recv(), c.recv());
    assert_eq!((a["id"].clone(), b["id"].clone()), (json!(5), json!(5)));
    assert!(a["result"].is_object() && b["result"].is_object());
    let reply = c.call(
        r#"[{"jsonrpc":"2.0","id":6,"method":"ping"},{"jsonrpc":"2.0","id":6,"method":"ping"}]"#,
    );
    assert_eq!(reply.as_array().map(Vec::len), Some(2));
    c.assert_ping_is_next();
}

#[test]
fn ten_thousand_pipelined_requests_are_all_answered() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let mut writer = Conn {
        stream: c.stream.try_clone().unwrap(),
    };
    let sender = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 0..10_000u32 {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#);
            all.extend_from_slice(&(body.len() as u32).to_be_bytes());
            all.extend_from_slice(body.as_bytes());
        }
        writer.send_raw(&all);
    });
    for i in 0..10_000u32 {
        assert_eq!(c.recv(), json!({"jsonrpc":"2.0","id":i,"result":{}}));
    }
    sender.join().unwrap();
    c.assert_ping_is_next();
}

#[test]
fn requests_beyond_the_per_connection_limit_are_busy() {
    let agent = Agent::start("[limits]\nmax_requests_per_connection = 1\n");
    let mut c = agent.connect();
    // Both members need a task slot; the second finds none.
    let reply = c.call(
        r#"[{"jsonrpc":"2.0","id":1,"method":"get_info"},{"jsonrpc":"2.0","id":2,"method":"get_info"}]"#,
    );
    let items = reply.as_array().expect("an array");
    assert!(items[0]["result"].is_object(), "{}", items[0]);
    assert_eq!(error_code(&items[1]), -32009);
    assert_eq!(
        items[1]["error"]["data"],
        json!({"limit": "max_requests_per_connection", "value": 1})
    );
    // The slot is back once the first request finished.
    let reply = c.call(r#"{"jsonrpc":"2.0","id":3,"method":"get_info"}"#);
    assert!(reply["result"].is_object(), "{reply}");
    c.assert_ping_is_next();
}

#[test]
fn one_bad_frame_among_good_ones_earns_exactly_one_error() {
    let agent = Agent::start("");
    let mut c = agent.connect();
    let bad: [&[u8]; 6] = [
        b"",
        b"nonsense",
        b"[]",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xc3\"}",
        br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
        br#"[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79,80,81,82,83,84,85,86,87,88,89,90,91,92,93,94,95,96,97,98,99,100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115,116,117,118,119,120,121,122,123,124,125,126,127,128,129,130,131,132,133,134,135,136,137,138,139,140,141,142,143,144,145,146,147,148,149,150,151,152,153,154,155,156,157,158,159,160,161,162,163,164,165,166,167,168,169,170,171,172,173,174,175,176,177,178,179,180,181,182,183,184,185,186,187,188,189,190,191,192,193,194,195,196,197,198,199,200,201,202,203,204,205,206,207,208,209,210,211,212,213,214,215,216,217,218,219,220,221,222,223,224,225,226,227,228,229,230,231,232,233,234,235,236,237,238,239,240,241,242,243,244,245,246,247,248,249,250,251,252,253,254,255,256,257]"#,
    ];
    for body in bad {
        c.send(body);
        let reply = c.recv();
        assert!(reply.is_object(), "exactly one error object: {reply}");
        assert!(reply["error"].is_object(), "{reply}");
        c.assert_ping_is_next();
    }
}

#[test]
fn a_hung_up_connection_does_not_disturb_others() {
    let agent = Agent::start("");
    let mut a = agent.connect();
    let mut b = agent.connect();
    drop(Conn::open(&agent.socket));
    a.assert_ping_is_next();
    b.assert_ping_is_next();
}
