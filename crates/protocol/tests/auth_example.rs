//! The worked example of docs/protocol.md §13.5 ("Authentication"),
//! reproduced from its inputs: every canonical form, MAC, message and frame
//! shown there is recomputed, once by hand from the canonical forms of §13.2
//! (with the `hmac` and `sha2` crates directly) and once with the protocol
//! crate's own signing and verifying functions.

mod spec_doc;

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use kvm_agent_protocol::auth::{self, Key, ResponseSigner};
use kvm_agent_protocol::frame;
use kvm_agent_protocol::jsonrpc::{self, FromAgent, Id, Incoming};
use kvm_agent_protocol::notifications::AgentReady;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::Sha256;
use spec_doc::{blocks, hex_bytes, kind, read_doc, section, Kind};

/// The `auth-*` blocks of §13, by tag.
fn example() -> BTreeMap<String, String> {
    let doc = read_doc();
    let text = section(&doc, "## 13. Authentication");
    let mut out = BTreeMap::new();
    for b in blocks(text) {
        if let Ok(Kind::AuthExample(tag)) = kind(&b) {
            assert!(
                out.insert(tag.clone(), b.body.clone()).is_none(),
                "{tag} twice"
            );
        }
    }
    out
}

fn get<'a>(ex: &'a BTreeMap<String, String>, tag: &str) -> &'a str {
    ex.get(tag)
        .unwrap_or_else(|| panic!("§13.5 has no {tag} block"))
}

fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    auth::to_hex(&m.finalize().into_bytes())
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn worked_example_reproduces_byte_for_byte() {
    let ex = example();
    // The key: 0x00..0x1f.
    let key_text = get(&ex, "auth-key").trim();
    let key_bytes = hex_decode(key_text);
    assert_eq!(key_bytes, (0u8..32).collect::<Vec<_>>());
    let key = Key::from_hex(key_text).unwrap();

    // The request's inputs, read from the request as shown.
    let body = get(&ex, "auth-request");
    let v: Value = serde_json::from_str(body).unwrap();
    let (ts, nonce) = (
        v["auth"]["ts"].as_u64().unwrap(),
        v["auth"]["nonce"].as_str().unwrap(),
    );
    assert_eq!(
        (v["method"].as_str(), v["id"].as_u64(), ts, nonce),
        (
            Some("ping"),
            Some(7),
            1_700_000_000_000,
            "00112233445566778899aabbccddeeff"
        )
    );
    // Canonical bytes, by hand from §13.2 and as the crate builds them.
    let canonical = format!("kvm-agent-auth-v1 request\nping\n7\n{ts}\n{nonce}\n{{}}");
    let shown = hex_bytes(get(&ex, "auth-canonical-request")).unwrap();
    assert_eq!(shown, canonical.as_bytes(), "canonical request bytes");
    assert_eq!(
        auth::request_canonical("ping", Some("7"), ts, nonce, Some("{}")).unwrap(),
        shown
    );
    // The MAC.
    let mac = get(&ex, "auth-mac-request").trim();
    assert_eq!(hmac_hex(&key_bytes, &shown), mac, "request MAC");
    assert_eq!(v["auth"]["mac"], mac);
    // The request as the crate writes it is the one shown.
    let mut out = Vec::new();
    let nonce_bytes: [u8; 16] = hex_decode(nonce).try_into().unwrap();
    auth::write_signed_request(
        &mut out,
        &key,
        Some(&Id::from(7)),
        "ping",
        Some(&serde_json::json!({})),
        ts,
        &nonce_bytes,
    )
    .unwrap();
    assert_eq!(std::str::from_utf8(&out).unwrap(), body, "request as sent");
    // The frame.
    assert_eq!(
        hex_bytes(get(&ex, "auth-frame")).unwrap(),
        frame::encode(body.as_bytes()),
        "frame"
    );
    // The agent's side: it verifies (with its clock at the request's ts).
    let req = match jsonrpc::parse_frame(body.as_bytes(), 16) {
        Incoming::Single(Ok(r)) => r,
        other => panic!("{other:?}"),
    };
    let verified = auth::verify_request(std::slice::from_ref(&key), &req, ts, 300_000).unwrap();
    assert_eq!(verified.nonce, nonce);

    // The response.
    let resp_body = get(&ex, "auth-response");
    let rv: Value = serde_json::from_str(resp_body).unwrap();
    let rts = rv["auth"]["ts"].as_u64().unwrap();
    assert_eq!(rts, 1_700_000_000_042);
    let canonical = format!("kvm-agent-auth-v1 response\n7\n{nonce}\n{rts}\nresult\n{{}}");
    let shown = hex_bytes(get(&ex, "auth-canonical-response")).unwrap();
    assert_eq!(shown, canonical.as_bytes(), "canonical response bytes");
    let rmac = get(&ex, "auth-mac-response").trim();
    assert_eq!(hmac_hex(&key_bytes, &shown), rmac, "response MAC");
    assert_eq!(rv["auth"]["mac"], rmac);
    let signer = ResponseSigner::new(key.clone(), "7".into(), nonce.into());
    let mut out = Vec::new();
    let empty = RawValue::from_string("{}".into()).unwrap();
    auth::write_signed_response(&mut out, &Id::from(7), Ok(&empty), &signer, rts);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        resp_body,
        "response as sent"
    );
    match jsonrpc::parse_from_agent(resp_body.as_bytes()).unwrap() {
        FromAgent::Response(r) => {
            auth::verify_response(&key, "7", nonce, &r).unwrap();
        }
        other => panic!("{other:?}"),
    }

    // agent_ready.
    let n_body = get(&ex, "auth-notification");
    let nv: Value = serde_json::from_str(n_body).unwrap();
    let (nts, nnonce) = (
        nv["auth"]["ts"].as_u64().unwrap(),
        nv["auth"]["nonce"].as_str().unwrap(),
    );
    // The params' exact text (a Value would reorder the members).
    let params = match jsonrpc::parse_from_agent(n_body.as_bytes()).unwrap() {
        FromAgent::Notification(n) => n.params.unwrap().get().to_owned(),
        other => panic!("{other:?}"),
    };
    let canonical =
        format!("kvm-agent-auth-v1 notification\nagent_ready\n{nts}\n{nnonce}\n{params}");
    let shown = hex_bytes(get(&ex, "auth-canonical-notification")).unwrap();
    assert_eq!(shown, canonical.as_bytes(), "canonical notification bytes");
    let nmac = get(&ex, "auth-mac-notification").trim();
    assert_eq!(hmac_hex(&key_bytes, &shown), nmac, "notification MAC");
    assert_eq!(nv["auth"]["mac"], nmac);
    let ready: AgentReady = serde_json::from_value(nv["params"].clone()).unwrap();
    let mut out = Vec::new();
    let nnonce_bytes: [u8; 16] = hex_decode(nnonce).try_into().unwrap();
    auth::write_signed_notification(
        &mut out,
        std::slice::from_ref(&key),
        "agent_ready",
        Some(&ready),
        nts,
        &nnonce_bytes,
    )
    .unwrap();
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        n_body,
        "agent_ready as sent"
    );
    match jsonrpc::parse_from_agent(n_body.as_bytes()).unwrap() {
        FromAgent::Notification(n) => {
            auth::verify_notification(&key, &n).unwrap();
        }
        other => panic!("{other:?}"),
    }
}

/// §13.4 lists the reasons the crate gives, and its -32008 examples are the
/// crate's replies.
#[test]
fn reasons_and_error_examples_are_the_crates() {
    use kvm_agent_protocol::auth::Failure;
    let doc = read_doc();
    let text = section(&doc, "### 13.4 What the agent checks");
    for f in [
        Failure::Missing,
        Failure::Malformed,
        Failure::BadMac,
        Failure::Stale,
        Failure::Replayed,
    ] {
        assert!(
            text.contains(&format!("| `{}` |", f.reason())),
            "§13.4 does not list {f}"
        );
        let e = serde_json::to_value(f.error()).unwrap();
        for b in blocks(text) {
            if !matches!(kind(&b), Ok(Kind::Error)) {
                continue;
            }
            let v: Value = serde_json::from_str(&b.body).unwrap();
            if v["error"]["data"]["reason"] == f.reason() {
                assert_eq!(v["error"], e, "line {}", b.line);
            }
        }
    }
}
