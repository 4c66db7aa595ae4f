//! Binary attachments (protocol 1.1, docs/protocol.md §3.2) against the real
//! agent, byte for byte: `file_write` with its bytes after the JSON,
//! `file_read` answering with them, and every misuse refused with the
//! documented error while the connection keeps serving.

mod common;

use common::{error_code, Conn, FileFixture, Scratch};
use kvm_agent_protocol::attachment;
use kvm_agent_protocol::codec;
use serde_json::{json, Value};

fn fixture(extra: &str) -> FileFixture {
    common::file_fixture("attach", extra)
}

/// A frame body: the request's JSON, NUL, the bytes.
fn with_bytes(request: &Value, bytes: &[u8]) -> Vec<u8> {
    let mut body = request.to_string().into_bytes();
    body.push(attachment::SEPARATOR);
    body.extend_from_slice(bytes);
    body
}

fn call(conn: &mut Conn, id: u64, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params});
    conn.call(&req.to_string())
}

fn open(conn: &mut Conn, path: &str, access: &str) -> u64 {
    let r = call(
        conn,
        1,
        "file_open",
        json!({"path": path, "access": access}),
    );
    r["result"]["handle"]
        .as_u64()
        .unwrap_or_else(|| panic!("{r}"))
}

/// Bytes that are not valid UTF-8 and contain NULs and quotes: anything
/// goes in an attachment.
fn awkward(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn write_and_read_with_attachments_round_trip_byte_for_byte() {
    let f = fixture("");
    let mut c = f.agent.connect();
    let path = f.root.join("blob");
    let path_s = path.to_str().unwrap();
    let data = awkward(300_000);
    let h = open(&mut c, path_s, "write");
    // Two chunks, the second first: offsets are honoured.
    let (a, b) = data.split_at(100_000);
    for (id, offset, part) in [(2, 100_000u64, b), (3, 0, a)] {
        let req = json!({"jsonrpc":"2.0","id":id,"method":"file_write",
            "params":{"handle":h,"offset":offset}});
        c.send(&with_bytes(&req, part));
        let r = c.recv();
        assert_eq!(r["result"]["written"], part.len() as u64, "{r}");
    }
    let sha = codec::sha256_hex(&data);
    let r = call(
        &mut c,
        4,
        "file_close",
        json!({"handle":h,"size":data.len(),"sha256":sha}),
    );
    assert_eq!(r["result"]["committed"], true, "{r}");
    assert_eq!(std::fs::read(&path).unwrap(), data);

    // Read it back as attachments: the reply is the result's JSON, NUL,
    // then exactly the bytes.
    let h = open(&mut c, path_s, "read");
    let mut back = Vec::new();
    let mut offset = 0u64;
    loop {
        let req = json!({"jsonrpc":"2.0","id":5,"method":"file_read",
            "params":{"handle":h,"offset":offset,"length":65536,"attachment":true}});
        c.send(req.to_string().as_bytes());
        let body = c.recv_bytes();
        let (json_text, bytes) = attachment::split(&body);
        let v: Value = serde_json::from_slice(json_text).unwrap();
        let bytes = bytes.unwrap_or_else(|| panic!("no attachment: {v}"));
        assert!(v["result"].get("data_base64").is_none(), "{v}");
        back.extend_from_slice(bytes);
        offset += bytes.len() as u64;
        if v["result"]["eof"] == true {
            break;
        }
    }
    assert_eq!(back, data);
    // The same chunk without `attachment` still comes as base64.
    let r = call(
        &mut c,
        6,
        "file_read",
        json!({"handle":h,"offset":0,"length":16}),
    );
    assert_eq!(
        codec::base64_decode(r["result"]["data_base64"].as_str().unwrap().as_bytes()).unwrap(),
        &data[..16]
    );
    c.assert_ping_is_next();
}

#[test]
fn misplaced_attachments_are_refused_and_the_connection_serves_on() {
    // max_chunk_bytes: 32768 with this frame limit.
    let f = fixture("[limits]\nmax_frame_bytes = 69632\n");
    let mut c = f.agent.connect();
    let path = f.root.join("t");
    let h = open(&mut c, path.to_str().unwrap(), "write");

    // On a method that takes none.
    let ping = json!({"jsonrpc":"2.0","id":10,"method":"ping"});
    c.send(&with_bytes(&ping, b"x"));
    let r = c.recv();
    assert_eq!(
        (r["id"].clone(), error_code(&r)),
        (json!(10), -32602),
        "{r}"
    );
    assert_eq!(
        r["error"]["data"]["reason"],
        "only file_write takes an attachment"
    );

    // Both data_base64 and an attachment.
    let both = json!({"jsonrpc":"2.0","id":11,"method":"file_write",
        "params":{"handle":h,"offset":0,"data_base64":"eA=="}});
    c.send(&with_bytes(&both, b"x"));
    let r = c.recv();
    assert_eq!(error_code(&r), -32602, "{r}");
    assert_eq!(r["error"]["data"]["kind"], "data");

    // Neither.
    let neither = json!({"jsonrpc":"2.0","id":12,"method":"file_write",
        "params":{"handle":h,"offset":0}});
    let r = c.call(&neither.to_string());
    assert_eq!(error_code(&r), -32602, "{r}");

    // Over max_chunk_bytes.
    let big = json!({"jsonrpc":"2.0","id":13,"method":"file_write",
        "params":{"handle":h,"offset":0}});
    c.send(&with_bytes(&big, &vec![1u8; 32769]));
    let r = c.recv();
    assert_eq!(error_code(&r), -32005, "{r}");
    assert_eq!(r["error"]["data"]["max_bytes"], 32768);

    // Beside a batch: one frame-level error, id null.
    let batch = json!([{"jsonrpc":"2.0","id":14,"method":"ping"}]);
    c.send(&with_bytes(&batch, b"x"));
    let r = c.recv();
    assert_eq!(
        (r["id"].clone(), error_code(&r)),
        (Value::Null, -32600),
        "{r}"
    );

    // A file_read asking for an attachment inside a batch.
    let h_read = {
        std::fs::write(f.root.join("r"), b"abc").unwrap();
        open(&mut c, f.root.join("r").to_str().unwrap(), "read")
    };
    let batch = json!([{"jsonrpc":"2.0","id":15,"method":"file_read",
        "params":{"handle":h_read,"offset":0,"length":3,"attachment":true}},
        {"jsonrpc":"2.0","id":16,"method":"ping"}]);
    let r = c.call(&batch.to_string());
    assert_eq!(r[0]["id"], 15, "{r}");
    assert_eq!(error_code(&r[0]), -32600, "{r}");
    assert_eq!(r[1]["result"], json!({}), "{r}");

    // Nothing was written by any of these.
    let r = call(&mut c, 17, "file_close", json!({"handle":h,"abort":true}));
    assert!(r.get("result").is_some(), "{r}");
    assert!(!path.exists());
    c.assert_ping_is_next();
}

#[test]
fn attachment_replies_fit_small_frames() {
    // max_chunk_bytes is 2048 with this frame limit: a whole chunk and its
    // JSON fit in one frame.
    let f = fixture("[limits]\nmax_frame_bytes = 8192\n");
    let mut c = f.agent.connect();
    let path = f.root.join("r");
    std::fs::write(&path, awkward(2048)).unwrap();
    let h = open(&mut c, path.to_str().unwrap(), "read");
    let req = json!({"jsonrpc":"2.0","id":20,"method":"file_read",
        "params":{"handle":h,"offset":0,"length":2048,"attachment":true}});
    c.send(req.to_string().as_bytes());
    let body = c.recv_bytes();
    let (json_text, bytes) = attachment::split(&body);
    assert_eq!(bytes.map(<[u8]>::len), Some(2048));
    let v: Value = serde_json::from_slice(json_text).unwrap();
    assert_eq!(v["result"]["eof"], true, "{v}");
    c.assert_ping_is_next();
}

#[test]
fn authenticated_requests_take_no_attachments() {
    let keys = Scratch::new("attach-keys");
    let key_path = keys.0.join("k");
    // The agent refuses a key file that others can read.
    kvm_manager_agent::platform::create_private(
        &key_path,
        format!("{}\n", "ab".repeat(32)).as_bytes(),
    )
    .unwrap();
    let f = fixture(&format!(
        "hmac_key_file = {}\n",
        common::toml_path(&key_path)
    ));
    let mut c = f.agent.connect();
    let key = kvm_agent_protocol::auth::Key::from_hex(&"ab".repeat(32)).unwrap();
    let mut body = Vec::new();
    kvm_agent_protocol::auth::write_signed_request(
        &mut body,
        &key,
        Some(&kvm_agent_protocol::jsonrpc::Id::from(30)),
        "file_write",
        Some(&json!({"handle":1,"offset":0})),
        kvm_agent_protocol::auth::now_ms(),
        &[7; 16],
    )
    .unwrap();
    body.push(attachment::SEPARATOR);
    body.extend_from_slice(b"bytes");
    c.send(&body);
    let r = c.recv();
    assert_eq!(error_code(&r), -32602, "{r}");
    assert!(
        r["error"]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("not covered by authentication"),
        "{r}"
    );
}
