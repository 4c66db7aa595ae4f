//! Checks every example in docs/protocol.md against the protocol types, so
//! the specification cannot drift from the code.
//!
//! Fenced blocks are recognised by their info string:
//!
//! - ```` ```json request ````: a request or a batch of requests (host to agent).
//!   It must parse with [`jsonrpc::parse_frame`], name a method of the table,
//!   and its params must decode strictly into that method's params type and
//!   encode back to the same members.
//! - ```` ```json response M... ````: a response (or a batch: one `M` per
//!   element). `M` is a method name, whose result type the result must decode
//!   into and encode back to exactly, or `error` for an error response.
//! - ```` ```json error ````: one error response with a code of the table.
//! - ```` ```json notification ````: a notification from the agent.
//! - ```` ```hex frame ````: a complete frame, header and body, holding a valid
//!   request.
//! - ```` ```text malformed ```` / ```` ```hex malformed ````: a frame body
//!   (text) or a complete frame (hex) the agent must reject, and
//!   ```` ```hex oversize ````: a frame header above the default limit. Each
//!   is followed by the reply the agent sends: a `json error` or
//!   `json response` block, or ```` ```text noreply ```` when none is sent.
//!
//! - ```` ```LANG auth-NAME ````: the authentication worked example,
//!   checked by `auth_example.rs`.
//!
//! Any other `json` or `hex` block is an error, so nothing escapes checking.
//!
//! Reading the document (blocks, tags, hex dumps) is in `spec_doc`, shared
//! with crates/agent/tests/spec_replies.rs, which replays the same examples
//! against the real agent. Requests are decoded with [`Call::decode`], the
//! agent's own decoder, so the -32601 and -32602 replies shown are exactly
//! the agent's.

mod spec_doc;

use std::collections::BTreeMap;

use kvm_agent_protocol::frame::{self, Decoded, FrameDecoder, DEFAULT_MAX_FRAME_BYTES};
use kvm_agent_protocol::jsonrpc::{self, FromAgent, Id, Incoming, Request};
use kvm_agent_protocol::methods::*;
use kvm_agent_protocol::notifications::{AgentReady, AGENT_READY};
use kvm_agent_protocol::{ErrorCode, ErrorObject, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use spec_doc::{blocks, kind, read_doc, section, Block, Kind};

/// Default `limits.max_batch_len`, as the specification states it.
const DEFAULT_MAX_BATCH_LEN: usize = 256;

/// Fewest checked examples the document may hold.
const MIN_CHECKED_EXAMPLES: usize = 80;

// ---------------------------------------------------------------------------
// Typed checks, one generic function per direction, picked by method name

/// Something to do with a method's types.
trait MethodVisitor {
    type Out;
    fn visit<M: Method>(self) -> Self::Out;
}

fn with_method<V: MethodVisitor>(m: MethodName, v: V) -> V::Out {
    match m {
        MethodName::Ping => v.visit::<PingMethod>(),
        MethodName::GetCapabilities => v.visit::<GetCapabilitiesMethod>(),
        MethodName::GetInfo => v.visit::<GetInfoMethod>(),
        MethodName::GetMetrics => v.visit::<GetMetricsMethod>(),
        MethodName::GetUsers => v.visit::<GetUsersMethod>(),
        MethodName::Shutdown => v.visit::<ShutdownMethod>(),
        MethodName::Reboot => v.visit::<RebootMethod>(),
        MethodName::Exec => v.visit::<ExecMethod>(),
        MethodName::ExecStart => v.visit::<ExecStartMethod>(),
        MethodName::ExecStatus => v.visit::<ExecStatusMethod>(),
        MethodName::ExecKill => v.visit::<ExecKillMethod>(),
        MethodName::CopyToGuest => v.visit::<CopyToGuestMethod>(),
        MethodName::CopyFromGuest => v.visit::<CopyFromGuestMethod>(),
        MethodName::FileOpen => v.visit::<FileOpenMethod>(),
        MethodName::FileRead => v.visit::<FileReadMethod>(),
        MethodName::FileWrite => v.visit::<FileWriteMethod>(),
        MethodName::FileClose => v.visit::<FileCloseMethod>(),
    }
}

/// Decode params with the agent's own decoder ([`decode_params`]) and encode
/// them back.
struct DecodeParams<'a>(Option<&'a RawValue>);

impl MethodVisitor for DecodeParams<'_> {
    type Out = Result<Value, CallError>;
    fn visit<M: Method>(self) -> Self::Out {
        decode_params::<M>(self.0).map(|typed| to_value(&typed))
    }
}

/// Decode a result into the method's result type; encoding it again must give
/// exactly the example (results ignore unknown members, so this is what
/// catches a misspelt or missing one).
struct CheckResult<'a>(&'a Value);

impl MethodVisitor for CheckResult<'_> {
    type Out = Result<(), String>;
    fn visit<M: Method>(self) -> Self::Out {
        round_trip::<M::Result>(self.0)
    }
}

fn round_trip<T: Serialize + DeserializeOwned>(example: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(example.clone()).map_err(|e| e.to_string())?;
    let back = to_value(&typed);
    if &back != example {
        return Err(format!("re-encoded as {back}"));
    }
    Ok(())
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("protocol types encode")
}

// ---------------------------------------------------------------------------
// Host-to-agent frames

/// A request that passed the dispatcher's decoding.
struct Dispatched {
    method: MethodName,
    /// The params as sent (`null` when absent).
    params: Value,
    /// The params decoded into their type and encoded again.
    reencoded: Value,
}

/// What the dispatcher answers to a well-formed request before the policy
/// and any handler: [`Call::decode`], the agent's own decoder, gives -32601
/// for a method not in the table and -32602 for params that do not decode.
/// `Ok` when the request gets past decoding.
fn dispatch_check(req: &Request) -> Result<Dispatched, ErrorObject> {
    let raw = req.params.as_deref();
    let call = Call::decode(&req.method, raw).map_err(|e| ErrorObject::from(&e))?;
    let method = call.method();
    let reencoded = with_method(method, DecodeParams(raw))
        .unwrap_or_else(|e| panic!("Call::decode accepted what decode_params refuses: {e}"));
    let params = raw.map_or(Value::Null, |p| {
        serde_json::from_str(p.get()).expect("parse_frame checked the JSON")
    });
    Ok(Dispatched {
        method,
        params,
        reencoded,
    })
}

/// A `json request` block: every request must get past decoding (whether
/// the policy allows it and a handler exists is the agent's business, which
/// crates/agent/tests/spec_replies.rs checks), and its params must survive
/// decoding: every member shown comes back unchanged (members left out come
/// back with their defaults).
fn check_request(body: &[u8]) -> Result<Vec<MethodName>, String> {
    let requests = match jsonrpc::parse_frame(body, DEFAULT_MAX_BATCH_LEN) {
        Incoming::Single(r) => vec![r],
        Incoming::Batch(items) => items,
        Incoming::Invalid(e) => return Err(format!("frame rejected: {e:?}")),
    };
    let check = |r: &Result<Request, jsonrpc::Rejected>| {
        let r = r.as_ref().map_err(|r| format!("request rejected: {r:?}"))?;
        let d = dispatch_check(r).map_err(|e| format!("{}: {e:?}", r.method))?;
        for (key, value) in d.params.as_object().into_iter().flatten() {
            let back = d.reencoded.get(key).unwrap_or(&Value::Null);
            if back != value {
                return Err(format!(
                    "{}: params member {key:?} is {value}, re-encoded {back}",
                    d.method
                ));
            }
        }
        Ok(d.method)
    };
    requests.iter().map(check).collect()
}

/// One reply the agent owes for a frame.
#[derive(Debug)]
enum Owed {
    /// An error known in advance. `exact`: this crate builds the message too
    /// (for all but the oversized frame, whose message the agent's
    /// connection builds).
    Error {
        id: Id,
        error: ErrorObject,
        exact: bool,
    },
    /// Whatever the handler returns, for this id.
    Answer { id: Id },
}

/// The replies a frame body earns, and whether they form a batch.
fn owed_replies(body: &[u8]) -> (Vec<Owed>, bool) {
    let owed_for = |r: Result<Request, jsonrpc::Rejected>| match r {
        Err(r) => Some(Owed::Error {
            id: r.id,
            error: r.error,
            exact: true,
        }),
        Ok(req) => {
            let id = req.id.clone()?;
            Some(match dispatch_check(&req) {
                Err(error) => Owed::Error {
                    id,
                    error,
                    exact: true,
                },
                Ok(_) => Owed::Answer { id },
            })
        }
    };
    match jsonrpc::parse_frame(body, DEFAULT_MAX_BATCH_LEN) {
        Incoming::Invalid(error) => (
            vec![Owed::Error {
                id: Id::Null,
                error,
                exact: true,
            }],
            false,
        ),
        Incoming::Single(r) => (owed_for(r).into_iter().collect(), false),
        Incoming::Batch(items) => (items.into_iter().filter_map(owed_for).collect(), true),
    }
}

/// Compare the replies owed with the reply block that follows an input.
fn check_reply(owed: &[Owed], batch: bool, reply: &Block) -> Result<(), String> {
    if matches!(kind(reply)?, Kind::NoReply) {
        return match owed {
            [] => Ok(()),
            _ => Err(format!(
                "the agent owes {owed:?}, the document says no reply"
            )),
        };
    }
    let value: Value = serde_json::from_str(&reply.body).map_err(|e| e.to_string())?;
    let replies = match (batch, value) {
        (true, Value::Array(a)) => a,
        (false, v @ Value::Object(_)) => vec![v],
        (_, v) => return Err(format!("batch {batch}, but the reply is {v}")),
    };
    if replies.len() != owed.len() {
        return Err(format!(
            "{} replies shown, {} owed",
            replies.len(),
            owed.len()
        ));
    }
    for (shown, owed) in replies.iter().zip(owed) {
        let (id, expected) = match owed {
            Owed::Answer { id } => (id, None),
            Owed::Error { id, error, exact } => (id, Some((error, exact))),
        };
        if shown["id"] != to_value(id) {
            return Err(format!("reply id {}, owed {id}", shown["id"]));
        }
        match expected {
            None if shown.get("result").is_some() => {}
            None => return Err(format!("expected a result for id {id}, got {shown}")),
            Some((error, exact)) => {
                let e = &shown["error"];
                let shown_data = e.get("data").cloned();
                if e["code"] != json!(error.code) || shown_data != error.data {
                    return Err(format!("reply error {e}, owed {}", to_value(error)));
                }
                if *exact && e["message"] != json!(error.message) {
                    return Err(format!(
                        "message {}, owed {:?}",
                        e["message"], error.message
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Split a complete frame into its body, checking the header.
fn frame_body(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    match dec.decode(bytes) {
        (used, Some(Decoded::Frame(body))) if used == bytes.len() => Ok(body),
        other => Err(format!("not exactly one frame: {other:?}")),
    }
}

fn check_hex_frame(bytes: &[u8]) -> Result<Vec<MethodName>, String> {
    let body = frame_body(bytes)?;
    if frame::encode(&body) != bytes {
        return Err("frame::encode gives other bytes".into());
    }
    check_request(&body)
}

/// The error an oversized header earns.
fn oversize_reply(bytes: &[u8]) -> Result<Vec<Owed>, String> {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    match dec.decode(bytes) {
        (_, Some(Decoded::TooLarge { len, max })) => Ok(vec![Owed::Error {
            id: Id::Null,
            error: ErrorObject::new(ErrorCode::PayloadTooLarge)
                .data(json!({ "max_frame_bytes": max, "frame_bytes": len })),
            exact: false,
        }]),
        other => Err(format!("header not reported as too large: {other:?}")),
    }
}

// ---------------------------------------------------------------------------
// Agent-to-host frames

fn check_response(body: &[u8], methods: &[String]) -> Result<Vec<MethodName>, String> {
    let responses = match jsonrpc::parse_from_agent(body).map_err(|e| e.to_string())? {
        FromAgent::Response(r) => vec![r],
        FromAgent::Batch(rs) => rs,
        FromAgent::Notification(_) => return Err("a notification, not a response".into()),
    };
    if responses.len() != methods.len() {
        return Err(format!(
            "{} responses, {} tags",
            responses.len(),
            methods.len()
        ));
    }
    let mut seen = Vec::new();
    for (r, tag) in responses.iter().zip(methods) {
        match (&r.outcome, tag.as_str()) {
            (Err(e), "error") => check_error_object(e)?,
            (Ok(_), "error") => return Err(format!("id {}: a result, tagged error", r.id)),
            (Err(e), _) => return Err(format!("id {}: error {e:?}, tagged {tag}", r.id)),
            (Ok(raw), _) => {
                let m = MethodName::from_name(tag).ok_or(format!("unknown method tag {tag}"))?;
                let result: Value = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
                with_method(m, CheckResult(&result)).map_err(|e| format!("{m} result: {e}"))?;
                check_versions(&result)?;
                if m == MethodName::GetCapabilities {
                    check_limits(&result["limits"])?;
                }
                seen.push(m);
            }
        }
    }
    Ok(seen)
}

fn check_error(body: &[u8]) -> Result<(), String> {
    match jsonrpc::parse_from_agent(body).map_err(|e| e.to_string())? {
        FromAgent::Response(jsonrpc::Response {
            outcome: Err(e), ..
        }) => check_error_object(&e),
        other => Err(format!("not one error response: {other:?}")),
    }
}

fn check_error_object(e: &ErrorObject) -> Result<(), String> {
    if e.kind().is_none() {
        return Err(format!("code {} is not in the table", e.code));
    }
    if e.message.is_empty() {
        return Err("empty message".into());
    }
    match &e.data {
        None | Some(Value::Object(_)) => Ok(()),
        Some(d) => Err(format!("data {d} is not an object")),
    }
}

fn check_notification(body: &[u8]) -> Result<(), String> {
    match jsonrpc::parse_from_agent(body).map_err(|e| e.to_string())? {
        FromAgent::Notification(n) if n.method == AGENT_READY => {
            let raw = n.params.ok_or("agent_ready without params")?;
            let params: Value = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
            round_trip::<AgentReady>(&params)?;
            check_versions(&params)
        }
        other => Err(format!("not an agent_ready notification: {other:?}")),
    }
}

/// Every `protocol_version` shown is the crate's.
fn check_versions(v: &Value) -> Result<(), String> {
    match v {
        Value::Object(o) => o.iter().try_for_each(|(k, v)| {
            if k == "protocol_version" && v != PROTOCOL_VERSION {
                return Err(format!(
                    "protocol_version {v}, the crate says {PROTOCOL_VERSION}"
                ));
            }
            check_versions(v)
        }),
        Value::Array(a) => a.iter().try_for_each(check_versions),
        _ => Ok(()),
    }
}

/// `max_chunk_bytes` follows from `max_frame_bytes` as the spec says.
fn check_limits(limits: &Value) -> Result<(), String> {
    let frame = limits["max_frame_bytes"]
        .as_u64()
        .ok_or("no max_frame_bytes")?;
    let room = (frame - 4096) * 3 / 4;
    let chunk = 1u64 << room.ilog2();
    if limits["max_chunk_bytes"] != chunk {
        return Err(format!("max_chunk_bytes should be {chunk} for {frame}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The tests

#[derive(Default)]
struct Tally {
    checked: usize,
    requests: BTreeMap<MethodName, usize>,
    responses: BTreeMap<MethodName, usize>,
    by_kind: BTreeMap<&'static str, usize>,
}

#[test]
fn every_example_matches_the_types() {
    let doc = read_doc();
    let blocks = blocks(&doc);
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    let mut expecting: Option<(Vec<Owed>, bool, usize)> = None;
    for b in &blocks {
        let kind = match kind(b) {
            Ok(k) => k,
            Err(e) => {
                failures.push(format!("line {}: {e}", b.line));
                continue;
            }
        };
        if let Some((owed, batch, input_line)) = expecting.take() {
            if let Err(e) = check_reply(&owed, batch, b) {
                failures.push(format!(
                    "line {}: reply to the input at line {input_line}: {e}",
                    b.line
                ));
            }
        }
        let body = b.body.as_bytes();
        let (name, outcome): (&'static str, Result<(), String>) = match kind {
            Kind::Request => (
                "request",
                check_request(body).map(|ms| tally.add_requests(ms)),
            ),
            Kind::HexFrame(bytes) => (
                "hex frame",
                check_hex_frame(&bytes).map(|ms| tally.add_requests(ms)),
            ),
            Kind::Response(tags) => (
                "response",
                check_response(body, &tags).map(|ms| tally.add_responses(ms)),
            ),
            Kind::Error => ("error", check_error(body)),
            Kind::Notification => ("notification", check_notification(body)),
            Kind::Malformed(input) => {
                let (owed, batch) = owed_replies(&input);
                expecting = Some((owed, batch, b.line));
                ("malformed", Ok(()))
            }
            Kind::MalformedFrame(bytes) => (
                "malformed",
                frame_body(&bytes).map(|input| {
                    let (owed, batch) = owed_replies(&input);
                    expecting = Some((owed, batch, b.line));
                }),
            ),
            Kind::Oversize(bytes) => (
                "oversize",
                oversize_reply(&bytes).map(|owed| expecting = Some((owed, false, b.line))),
            ),
            Kind::NoReply => ("noreply", Ok(())),
            // Checked by auth_example.rs.
            Kind::AuthExample(_) => continue,
            Kind::Unchecked => continue,
        };
        match outcome {
            Ok(()) => {
                tally.checked += 1;
                *tally.by_kind.entry(name).or_default() += 1;
            }
            Err(e) => failures.push(format!("line {}: {name}: {e}", b.line)),
        }
    }
    if let Some((_, _, line)) = expecting {
        failures.push(format!("line {line}: input without a reply block after it"));
    }
    for m in MethodName::ALL {
        if !tally.requests.contains_key(m) {
            failures.push(format!("no request example for {m}"));
        }
        if !tally.responses.contains_key(m) {
            failures.push(format!("no response example for {m}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("checked {} examples: {:?}", tally.checked, tally.by_kind);
    assert!(
        tally.checked >= MIN_CHECKED_EXAMPLES,
        "only {} examples checked",
        tally.checked
    );
}

impl Tally {
    fn add_requests(&mut self, ms: Vec<MethodName>) {
        for m in ms {
            *self.requests.entry(m).or_default() += 1;
        }
    }
    fn add_responses(&mut self, ms: Vec<MethodName>) {
        for m in ms {
            *self.responses.entry(m).or_default() += 1;
        }
    }
}

/// The error table, row by row: `| code | name | message | ... |`.
#[test]
fn error_table_matches_the_codes() {
    let doc = read_doc();
    let rows: Vec<(i64, String, String)> = section(&doc, "## 6. Error codes")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .trim()
                .strip_prefix('|')?
                .split('|')
                .map(|c| c.trim().trim_matches('`'))
                .collect();
            let code = cells.first()?.parse().ok()?;
            Some((code, cells.get(1)?.to_string(), cells.get(2)?.to_string()))
        })
        .collect();
    let expected: Vec<(i64, String, String)> = ErrorCode::ALL
        .iter()
        .map(|c| {
            (
                c.code().into(),
                c.name().to_owned(),
                c.default_message().to_owned(),
            )
        })
        .collect();
    assert_eq!(rows, expected);
}

/// Every method has its section, with a status line.
#[test]
fn every_method_has_a_section_with_a_status() {
    let doc = read_doc();
    for m in MethodName::ALL {
        let heading = format!("### `{m}`");
        let text = section(&doc, &heading);
        assert!(
            text.contains("Status: implemented.")
                || text.contains("Status: not implemented yet; answers -32010"),
            "{heading} has no status line"
        );
    }
}

/// §4.2 states the reason the shared decoder gives for params by position.
#[test]
fn positional_params_reason_is_the_decoders() {
    let doc = read_doc();
    let text = section(&doc, "### 4.2 Params");
    assert!(
        text.contains(&format!("`{POSITIONAL_PARAMS_REASON}`")),
        "§4.2 does not state the reason {POSITIONAL_PARAMS_REASON:?}"
    );
    let raw = RawValue::from_string("[true]".to_owned()).unwrap();
    let e = decode_params::<GetInfoMethod>(Some(&raw)).unwrap_err();
    assert_eq!(
        e,
        CallError::InvalidParams {
            method: MethodName::GetInfo,
            reason: POSITIONAL_PARAMS_REASON.to_owned()
        }
    );
}
