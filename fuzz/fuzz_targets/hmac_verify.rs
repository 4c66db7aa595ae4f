//! Request authentication (crates/protocol/src/auth.rs and the agent's
//! crates/agent/src/auth.rs: MAC, clock window, replay cache) and the
//! client's checks of signed responses and `agent_ready`.
//!
//! Input byte 0 picks a mode:
//! - 0: the rest is a frame from a host, checked by an agent with two keys
//!   (current and previous); nothing the fuzzer writes can carry a valid
//!   MAC, so nothing may be accepted.
//! - 1: the rest is a frame from an agent, checked as the client checks
//!   responses and `agent_ready`; nothing may be accepted either.
//! - 2: a request is signed from fuzzed parts (method, id, params, clock
//!   offset, nonce, key), then the fuzzer's edits are applied to the signed
//!   frame. Unedited, it must be accepted exactly when inside the clock
//!   window, then refused as replayed. Edited, it may be accepted only if
//!   everything the MAC covers (method, id text, params text, ts, nonce)
//!   is still what was signed.
//! - 3: the same for a response signed by the agent, checked by the client.
#![no_main]

use kvm_agent_protocol::auth::{self, Failure, Key, ResponseSigner};
use kvm_agent_protocol::jsonrpc::{self, FromAgent, Id, Incoming, Request};
use kvm_agent_protocol::ErrorObject;
use kvm_manager_agent::auth::{Authenticator, Refused};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const NOW: u64 = 1_700_000_000_000;
const SKEW_S: u64 = 300;

fn keys() -> [Key; 2] {
    [
        Key::from_bytes(&[0x11; 32]).unwrap(),
        Key::from_bytes(&[0x22; 40]).unwrap(),
    ]
}

fn requests(frame: &[u8]) -> Vec<Request> {
    match jsonrpc::parse_frame(frame, 64) {
        Incoming::Single(Ok(r)) => vec![r],
        Incoming::Batch(items) => items.into_iter().flatten().collect(),
        _ => Vec::new(),
    }
}

/// A small cursor over the fuzz input.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| acc << 8 | u64::from(self.byte()))
    }
    /// A length-prefixed piece.
    fn piece(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (piece, rest) = self.0.split_at(n);
        self.0 = rest;
        piece
    }
    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.piece()).into_owned()
    }
}

/// Apply the rest of the input as edits: (position, new byte) pairs; a zero
/// byte first means "delete" instead.
fn edit(frame: &mut Vec<u8>, b: &mut Bytes<'_>) -> bool {
    let mut edited = false;
    while b.0.len() >= 3 && !frame.is_empty() {
        let kind = b.byte();
        let pos = usize::from(b.byte()) << 8 | usize::from(b.byte());
        let pos = pos % frame.len();
        match kind % 3 {
            0 => {
                frame.remove(pos);
            }
            1 => frame.insert(pos, b.byte()),
            _ => frame[pos] = b.byte(),
        }
        edited = true;
    }
    edited
}

fn signed_request(b: &mut Bytes<'_>) {
    let keys = keys();
    let method = b.text();
    let id = match b.byte() % 4 {
        0 => None,
        1 => Some(Id::Null),
        2 => Some(Id::from(b.u64())),
        _ => Some(Id::String(b.text())),
    };
    let params_text = b.text();
    let params = serde_json::from_str::<Box<RawValue>>(&params_text)
        .ok()
        .filter(|p| matches!(p.get().as_bytes().first(), Some(b'{' | b'[')));
    let offset = i64::from(b.byte() as i8) * 10_000;
    let ts = NOW.saturating_add_signed(offset);
    let mut nonce = [0u8; 16];
    for n in &mut nonce {
        *n = b.byte();
    }
    let key = &keys[usize::from(b.byte() % 2)];
    let mut frame = Vec::new();
    if auth::write_signed_request(
        &mut frame,
        key,
        id.as_ref(),
        &method,
        params.as_ref(),
        ts,
        &nonce,
    )
    .is_err()
    {
        return; // a control character in the method: cannot be signed
    }
    let original = frame.clone();
    let edited = edit(&mut frame, b);
    let agent = Authenticator::with_keys(keys.to_vec(), SKEW_S);
    let signed_id = id.as_ref().map(|i| serde_json::to_string(i).unwrap());
    let signed_params = params.as_ref().map(|p| p.get().to_owned());
    let nonce_hex = auth::nonce_hex(&nonce);
    let reqs = requests(&frame);
    if !edited {
        assert_eq!(
            reqs.len(),
            1,
            "a signed request does not parse: {original:?}"
        );
    }
    for req in reqs {
        let verdict = agent.check_at(&req, NOW);
        let accepted = verdict.is_ok();
        if accepted || edited {
            // What the MAC covers must be what was signed.
            if accepted {
                let (a, _) = auth::parse_message_auth(req.auth.as_deref().unwrap()).unwrap();
                assert_eq!(req.method, method, "accepted with another method");
                assert_eq!(
                    req.raw_id.as_deref().map(RawValue::get),
                    signed_id.as_deref()
                );
                assert_eq!(
                    req.params.as_deref().map(RawValue::get),
                    signed_params.as_deref()
                );
                assert_eq!((a.ts, a.nonce.as_str()), (ts, nonce_hex.as_str()));
            }
        }
        if !edited {
            let inside = ts.abs_diff(NOW) <= SKEW_S * 1000;
            match (&verdict, inside) {
                (Ok(Some(_)), true) => {}
                (Err(Refused::Failed(Failure::Stale)), false) => {}
                other => panic!(
                    "signed request, inside window {inside}: {:?}",
                    other.0.as_ref().err()
                ),
            }
        }
        if accepted {
            assert!(
                matches!(
                    agent.check_at(&req, NOW),
                    Err(Refused::Failed(Failure::Replayed))
                ),
                "a replay was accepted"
            );
        }
    }
}

fn signed_response(b: &mut Bytes<'_>) {
    let keys = keys();
    let key = &keys[0];
    let raw_id = b.u64().to_string();
    let nonce = auth::nonce_hex(&[b.byte(); 16]);
    let signer = ResponseSigner::new(key.clone(), raw_id.clone(), nonce.clone());
    let id = Id::Number(raw_id.parse::<u64>().unwrap().into());
    let result_text = b.text();
    let result = serde_json::from_str::<Box<RawValue>>(&result_text).ok();
    let error = ErrorObject {
        code: -32000 - i64::from(b.byte()),
        message: b.text(),
        data: None,
    };
    let ts = b.u64();
    let mut frame = Vec::new();
    let outcome = match &result {
        Some(r) => Ok(&**r),
        None => Err(&error),
    };
    auth::write_signed_response(&mut frame, &id, outcome, &signer, ts);
    let edited = edit(&mut frame, b);
    let Ok(FromAgent::Response(resp)) = jsonrpc::parse_from_agent(&frame) else {
        assert!(edited, "a signed response does not parse");
        return;
    };
    match auth::verify_response(key, &raw_id, &nonce, &resp) {
        Ok(a) => {
            assert_eq!(a.ts, ts);
            match (&resp.outcome, &result) {
                (Ok(got), Some(want)) => assert_eq!(got.get(), want.get()),
                (Err(_), None) => {
                    assert_eq!(
                        resp.raw_error.as_deref().map(RawValue::get),
                        Some(serde_json::to_string(&error).unwrap().as_str())
                    )
                }
                _ => panic!("accepted with the outcome swapped"),
            }
        }
        Err(e) => assert!(edited, "an unedited signed response failed: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let agent = Authenticator::with_keys(keys().to_vec(), SKEW_S);
            for req in requests(rest) {
                assert!(
                    agent.check_at(&req, NOW).is_err(),
                    "forged request accepted"
                );
            }
        }
        1 => {
            let key = &keys()[0];
            match jsonrpc::parse_from_agent(rest) {
                Ok(FromAgent::Response(r)) => {
                    assert!(auth::verify_response(key, "1", "00", &r).is_err())
                }
                Ok(FromAgent::Batch(rs)) => {
                    for r in rs {
                        assert!(auth::verify_response(key, "1", "00", &r).is_err());
                    }
                }
                Ok(FromAgent::Notification(n)) => {
                    assert!(auth::verify_notification(key, &n).is_err())
                }
                Err(_) => {}
            }
        }
        2 => signed_request(&mut Bytes(rest)),
        _ => signed_response(&mut Bytes(rest)),
    }
});
