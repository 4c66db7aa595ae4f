//! JSON-RPC 2.0 messages: parsing what arrives, encoding what leaves.
//!
//! The agent side parses frames with [`parse_frame`] into [`Incoming`]; the
//! host side parses agent frames with [`parse_from_agent`]. Both sides encode
//! with the functions in this module, so the two cannot disagree on the wire.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::attachment::{self, Attachment};
use crate::error::{ErrorCode, ErrorObject};

/// The only JSON-RPC version spoken.
pub const JSONRPC_VERSION: &str = "2.0";

/// A request id: a number, a string, or null (discouraged by the
/// specification, but valid, and what error replies use when the request's id
/// could not be read).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    /// A JSON number. Integers round-trip exactly (up to 64 bits); other
    /// numbers are echoed as a double (`1e3` comes back as `1000.0`).
    Number(serde_json::Number),
    /// A JSON string.
    String(String),
    /// JSON null.
    Null,
}

impl Id {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Number(n) => Some(Id::Number(n)),
            Value::String(s) => Some(Id::String(s)),
            Value::Null => Some(Id::Null),
            _ => None,
        }
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Id::Number(n.into())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::String(s.to_owned())
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Number(n) => write!(f, "{n}"),
            Id::String(s) => write!(f, "{s:?}"),
            Id::Null => f.write_str("null"),
        }
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Id::Number(n) => n.serialize(s),
            Id::String(v) => v.serialize(s),
            Id::Null => s.serialize_unit(),
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Id::from_value(v)
            .ok_or_else(|| serde::de::Error::custom("id must be a number, a string or null"))
    }
}

/// A valid request, ready for dispatch.
#[derive(Debug)]
pub struct Request {
    /// `None` for a notification: it is executed and never answered.
    pub id: Option<Id>,
    /// The method name, not yet checked against the method table.
    pub method: String,
    /// The params exactly as sent, when present (always an object or array).
    pub params: Option<Box<RawValue>>,
    /// The `id` member's JSON text exactly as sent (`None` for a
    /// notification): what an authentication code covers.
    pub raw_id: Option<Box<RawValue>>,
    /// The `auth` member exactly as sent, when present (see
    /// [`crate::auth`]); not yet checked.
    pub auth: Option<Box<RawValue>>,
    /// The bytes after the JSON text, when the frame carries an attachment
    /// ([`crate::attachment`]); which methods accept one is for the
    /// receiver to check.
    pub attachment: Option<Attachment>,
}

/// A request that cannot be executed, with the error reply it earns.
#[derive(Debug, PartialEq)]
pub struct Rejected {
    /// The id to answer with: the request's own when it could be read, else null.
    pub id: Id,
    /// The reply.
    pub error: ErrorObject,
}

/// What one frame contained.
#[derive(Debug)]
pub enum Incoming {
    /// A single request object, or the reason it is not one.
    Single(Result<Request, Rejected>),
    /// A non-empty batch: one entry per element, in order.
    Batch(Vec<Result<Request, Rejected>>),
    /// The frame as a whole is unusable (not JSON, an empty or oversized
    /// batch): exactly one error reply, with a null id.
    Invalid(ErrorObject),
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default, deserialize_with = "present")]
    jsonrpc: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    method: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    params: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    auth: Option<Box<RawValue>>,
}

/// Deserialize a member that is present, even when its value is `null`
/// (plain `Option` would fold `null` into "absent").
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Parse one frame body received by the agent.
///
/// `max_batch_len` bounds the number of elements in a batch, so that one
/// frame can never earn more than that many replies. An attachment is
/// copied into the request; [`parse_frame_owned`] moves it instead.
pub fn parse_frame(frame: &[u8], max_batch_len: usize) -> Incoming {
    let (json, attached) = attachment::split(frame);
    with_attachment(
        parse_json_frame(json, max_batch_len),
        attached.is_some(),
        || Attachment::from_vec(attached.unwrap_or_default().to_vec()),
    )
}

/// [`parse_frame`], keeping an attachment in the frame's own buffer.
pub fn parse_frame_owned(frame: Vec<u8>, max_batch_len: usize) -> Incoming {
    match attachment::start(&frame) {
        None => parse_json_frame(&frame, max_batch_len),
        Some(at) => {
            let incoming = parse_json_frame(&frame[..at - 1], max_batch_len);
            with_attachment(incoming, true, || Attachment::from_frame(frame, at))
        }
    }
}

/// Give a single valid request its attachment; an attachment beside a batch
/// makes the whole frame invalid (which element would it belong to?).
fn with_attachment(
    incoming: Incoming,
    attached: bool,
    make: impl FnOnce() -> Attachment,
) -> Incoming {
    if !attached {
        return incoming;
    }
    match incoming {
        Incoming::Single(Ok(mut req)) => {
            req.attachment = Some(make());
            Incoming::Single(Ok(req))
        }
        Incoming::Batch(_) => {
            Incoming::Invalid(invalid(Id::Null, "an attachment cannot accompany a batch").error)
        }
        other => other,
    }
}

fn parse_json_frame(frame: &[u8], max_batch_len: usize) -> Incoming {
    let text = match std::str::from_utf8(frame) {
        Ok(t) => t,
        Err(e) => {
            return Incoming::Invalid(
                ErrorObject::with_message(ErrorCode::ParseError, "Parse error: invalid UTF-8")
                    .data(serde_json::json!({ "offset": e.valid_up_to() })),
            )
        }
    };
    let first = text.bytes().find(|b| !is_json_whitespace(*b));
    match first {
        None => Incoming::Invalid(
            ErrorObject::with_message(ErrorCode::ParseError, "Parse error: empty frame")
                .data(serde_json::json!({ "reason": "empty" })),
        ),
        Some(b'[') => match serde_json::from_str::<Vec<Box<RawValue>>>(text) {
            Err(e) => Incoming::Invalid(parse_error(&e)),
            Ok(items) if items.is_empty() => Incoming::Invalid(
                ErrorObject::with_message(
                    ErrorCode::InvalidRequest,
                    "Invalid Request: empty batch",
                )
                .data(serde_json::json!({ "reason": "empty batch" })),
            ),
            Ok(items) if items.len() > max_batch_len => Incoming::Invalid(
                ErrorObject::with_message(ErrorCode::PayloadTooLarge, "Batch too large").data(
                    serde_json::json!({ "max_batch_len": max_batch_len, "batch_len": items.len() }),
                ),
            ),
            Ok(items) => Incoming::Batch(items.iter().map(|i| parse_object(i.get())).collect()),
        },
        Some(_) => match parse_object(text) {
            Err(r) if r.error.code == i64::from(ErrorCode::InvalidRequest.code()) => {
                // serde stops at the first shape error; make sure the rest is
                // JSON at all before calling it a bad request.
                match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Ok(_) => Incoming::Single(Err(r)),
                    Err(e) => Incoming::Invalid(parse_error(&e)),
                }
            }
            Err(r) => Incoming::Invalid(r.error),
            ok => Incoming::Single(ok),
        },
    }
}

/// JSON's four whitespace characters (form feed is not one of them).
fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn parse_error(e: &serde_json::Error) -> ErrorObject {
    ErrorObject::with_message(ErrorCode::ParseError, "Parse error: invalid JSON").data(
        serde_json::json!({ "line": e.line(), "column": e.column(), "detail": e.to_string() }),
    )
}

fn invalid(id: Id, reason: &str) -> Rejected {
    Rejected {
        id,
        error: ErrorObject::with_message(
            ErrorCode::InvalidRequest,
            format!("Invalid Request: {reason}"),
        )
        .data(serde_json::json!({ "reason": reason })),
    }
}

/// Parse and validate one request object (a whole frame or a batch element).
fn parse_object(text: &str) -> Result<Request, Rejected> {
    let raw: RawRequest = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) if e.is_data() => {
            let reason = if text
                .trim_start_matches(|c: char| c.is_ascii() && is_json_whitespace(c as u8))
                .starts_with('{')
            {
                e.to_string()
            } else {
                "not an object".to_owned()
            };
            return Err(invalid(Id::Null, &reason));
        }
        Err(e) => {
            return Err(Rejected {
                id: Id::Null,
                error: parse_error(&e),
            })
        }
    };
    let id = match &raw.id {
        None => None,
        Some(v) => match serde_json::from_str::<Value>(v.get())
            .ok()
            .and_then(Id::from_value)
        {
            Some(id) => Some(id),
            None => return Err(invalid(Id::Null, "id must be a number, a string or null")),
        },
    };
    let reply_id = || id.clone().unwrap_or(Id::Null);
    match raw.jsonrpc.as_deref().map(|v| v.get()) {
        Some("\"2.0\"") => {}
        Some(other) if serde_json::from_str::<String>(other).is_ok_and(|v| v == "2.0") => {}
        Some(_) => return Err(invalid(reply_id(), "jsonrpc must be \"2.0\"")),
        None => return Err(invalid(reply_id(), "jsonrpc member missing")),
    }
    let method = match &raw.method {
        None => return Err(invalid(reply_id(), "method member missing")),
        Some(m) => match serde_json::from_str::<String>(m.get()) {
            Ok(m) => m,
            Err(_) => return Err(invalid(reply_id(), "method must be a string")),
        },
    };
    if let Some(p) = &raw.params {
        if !matches!(p.get().as_bytes().first(), Some(b'{') | Some(b'[')) {
            return Err(invalid(reply_id(), "params must be an object or an array"));
        }
    }
    Ok(Request {
        id,
        method,
        params: raw.params,
        raw_id: raw.id,
        auth: raw.auth,
        attachment: None,
    })
}

#[derive(Serialize)]
struct OutResponse<'a> {
    jsonrpc: &'static str,
    id: &'a Id,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorObject>,
}

/// Append the JSON of a response to `out`.
pub fn write_response(out: &mut Vec<u8>, id: &Id, outcome: Result<&RawValue, &ErrorObject>) {
    let (result, error) = match outcome {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let msg = OutResponse {
        jsonrpc: JSONRPC_VERSION,
        id,
        result,
        error,
    };
    serde_json::to_writer(out, &msg).expect("serializing to a Vec cannot fail");
}

#[derive(Serialize)]
struct OutRequest<'a, P: Serialize> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Id>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a P>,
}

/// Append the JSON of a request (or, with `id: None`, a notification) to `out`.
pub fn write_request<P: Serialize>(
    out: &mut Vec<u8>,
    id: Option<&Id>,
    method: &str,
    params: Option<&P>,
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(
        out,
        &OutRequest {
            jsonrpc: JSONRPC_VERSION,
            id,
            method,
            params,
        },
    )
}

/// A response as the host receives it.
#[derive(Debug)]
pub struct Response {
    /// The id of the request it answers (null for frame-level errors).
    pub id: Id,
    /// The result, or the error.
    pub outcome: Result<Box<RawValue>, ErrorObject>,
    /// The `error` member's JSON text exactly as received, for an error
    /// response (what its authentication code covers).
    pub raw_error: Option<Box<RawValue>>,
    /// The `auth` member exactly as received, when present.
    pub auth: Option<Box<RawValue>>,
    /// The bytes after the JSON text, when the frame carries an attachment
    /// (only results may: see [`crate::attachment`]).
    pub attachment: Option<Attachment>,
}

/// A notification as the host receives it (agent to host).
#[derive(Debug)]
pub struct Notification {
    /// The notification's name, e.g. `agent_ready`.
    pub method: String,
    /// Its params, when present.
    pub params: Option<Box<RawValue>>,
    /// The `auth` member exactly as received, when present.
    pub auth: Option<Box<RawValue>>,
}

/// One frame from the agent.
#[derive(Debug)]
pub enum FromAgent {
    /// The answer to one request.
    Response(Response),
    /// The answers to a batch, in the order the agent produced them.
    Batch(Vec<Response>),
    /// An unsolicited message.
    Notification(Notification),
}

/// Why a frame from the agent could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum FromAgentError {
    /// The frame is not JSON.
    #[error("the agent sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The frame is JSON, but not a JSON-RPC 2.0 response or notification.
    #[error("the agent sent a malformed message: {0}")]
    Malformed(&'static str),
}

#[derive(Deserialize)]
struct RawFromAgent {
    #[serde(default, deserialize_with = "present")]
    jsonrpc: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Box<RawValue>>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default, deserialize_with = "present")]
    params: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    auth: Option<Box<RawValue>>,
}

/// Parse one frame received by the host. An attachment is copied into the
/// response; [`parse_from_agent_owned`] moves it instead.
pub fn parse_from_agent(frame: &[u8]) -> Result<FromAgent, FromAgentError> {
    let (json, attached) = attachment::split(frame);
    let parsed = parse_agent_json(json)?;
    match attached {
        None => Ok(parsed),
        Some(bytes) => attach_to_result(parsed, || Attachment::from_vec(bytes.to_vec())),
    }
}

/// [`parse_from_agent`], keeping an attachment in the frame's own buffer.
pub fn parse_from_agent_owned(frame: Vec<u8>) -> Result<FromAgent, FromAgentError> {
    match attachment::start(&frame) {
        None => parse_agent_json(&frame),
        Some(at) => {
            let parsed = parse_agent_json(&frame[..at - 1])?;
            attach_to_result(parsed, || Attachment::from_frame(frame, at))
        }
    }
}

/// Only a single successful response may carry an attachment.
fn attach_to_result(
    parsed: FromAgent,
    make: impl FnOnce() -> Attachment,
) -> Result<FromAgent, FromAgentError> {
    match parsed {
        FromAgent::Response(mut r) if r.outcome.is_ok() => {
            r.attachment = Some(make());
            Ok(FromAgent::Response(r))
        }
        _ => Err(FromAgentError::Malformed(
            "only a single result may carry an attachment",
        )),
    }
}

fn parse_agent_json(frame: &[u8]) -> Result<FromAgent, FromAgentError> {
    let first = frame.iter().find(|b| !is_json_whitespace(**b));
    if first == Some(&b'[') {
        let items: Vec<Box<RawValue>> = serde_json::from_slice(frame)?;
        let responses = items
            .iter()
            .map(|i| match parse_agent_object(i.get().as_bytes())? {
                FromAgent::Response(r) => Ok(r),
                _ => Err(FromAgentError::Malformed("a batch may hold only responses")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(FromAgent::Batch(responses));
    }
    parse_agent_object(frame)
}

fn parse_agent_object(frame: &[u8]) -> Result<FromAgent, FromAgentError> {
    let raw: RawFromAgent = serde_json::from_slice(frame)?;
    if raw.jsonrpc.as_deref().map(|v| v.get()) != Some("\"2.0\"") {
        return Err(FromAgentError::Malformed("jsonrpc must be \"2.0\""));
    }
    if let Some(method) = raw.method {
        if raw.id.is_some() {
            return Err(FromAgentError::Malformed(
                "the agent never sends requests, only notifications",
            ));
        }
        return Ok(FromAgent::Notification(Notification {
            method,
            params: raw.params,
            auth: raw.auth,
        }));
    }
    let id: Id = match raw.id {
        Some(v) => serde_json::from_str(v.get())?,
        None => return Err(FromAgentError::Malformed("response without id")),
    };
    let mut raw_error = None;
    let outcome = match (raw.result, raw.error) {
        (Some(r), None) => Ok(r),
        (None, Some(e)) => {
            let error = serde_json::from_str::<ErrorObject>(e.get())?;
            raw_error = Some(e);
            Err(error)
        }
        (Some(_), Some(_)) => {
            return Err(FromAgentError::Malformed(
                "response carries both result and error",
            ))
        }
        (None, None) => {
            return Err(FromAgentError::Malformed(
                "response carries neither result nor error",
            ))
        }
    };
    Ok(FromAgent::Response(Response {
        id,
        outcome,
        raw_error,
        auth: raw.auth,
        attachment: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(text: &str) -> Result<Request, Rejected> {
        match parse_frame(text.as_bytes(), 16) {
            Incoming::Single(r) => r,
            other => panic!("expected a single request, got {other:?}"),
        }
    }

    fn frame_error(text: &[u8]) -> ErrorObject {
        match parse_frame(text, 16) {
            Incoming::Invalid(e) => e,
            other => panic!("expected a frame-level error, got {other:?}"),
        }
    }

    fn code(e: &ErrorObject) -> ErrorCode {
        e.kind().expect("known code")
    }

    #[test]
    fn valid_request_with_each_id_kind() {
        let r = single(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#).unwrap();
        assert_eq!(r.id, Some(Id::from(7)));
        assert_eq!(r.method, "ping");
        assert!(r.params.is_none());
        let r = single(r#"{"jsonrpc":"2.0","id":"abc","method":"ping","params":{}}"#).unwrap();
        assert_eq!(r.id, Some(Id::from("abc")));
        assert_eq!(r.params.unwrap().get(), "{}");
        let r = single(r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#).unwrap();
        assert_eq!(r.id, Some(Id::Null));
        let r = single(r#"{"jsonrpc":"2.0","method":"ping"}"#).unwrap();
        assert_eq!(r.id, None, "no id means notification");
        let r = single(r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#).unwrap();
        assert_eq!(r.id.unwrap().to_string(), "1.5");
    }

    #[test]
    fn escaped_version_string_is_still_2_0() {
        assert!(single(r#"{"jsonrpc":"\u0032.0","id":1,"method":"ping"}"#).is_ok());
    }

    #[test]
    fn parse_errors() {
        assert_eq!(code(&frame_error(b"")), ErrorCode::ParseError);
        assert_eq!(code(&frame_error(b"  \n")), ErrorCode::ParseError);
        assert_eq!(code(&frame_error(b"{\"jsonrpc\"")), ErrorCode::ParseError);
        assert_eq!(code(&frame_error(b"garbage")), ErrorCode::ParseError);
        assert_eq!(code(&frame_error(b"[1,2")), ErrorCode::ParseError);
        assert_eq!(code(&frame_error(b"42 }")), ErrorCode::ParseError);
        let e = frame_error(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"p\xffng\"}");
        assert_eq!(code(&e), ErrorCode::ParseError);
        assert_eq!(e.data.unwrap()["offset"], 35);
        // Invalid UTF-8 in a member the parser would otherwise skip.
        let e = frame_error(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\xc3\"}");
        assert_eq!(code(&e), ErrorCode::ParseError);
    }

    #[test]
    fn invalid_requests_keep_their_id_when_readable() {
        let r = single(r#"{"jsonrpc":"1.0","id":3,"method":"ping"}"#).unwrap_err();
        assert_eq!(
            (r.id, code(&r.error)),
            (Id::from(3), ErrorCode::InvalidRequest)
        );
        let r = single(r#"{"jsonrpc":"2.0","id":4}"#).unwrap_err();
        assert_eq!(
            (r.id, code(&r.error)),
            (Id::from(4), ErrorCode::InvalidRequest)
        );
        let r = single(r#"{"jsonrpc":"2.0","id":5,"method":1}"#).unwrap_err();
        assert_eq!(r.id, Id::from(5));
        let r = single(r#"{"jsonrpc":"2.0","id":6,"method":"ping","params":"x"}"#).unwrap_err();
        assert_eq!(
            (r.id, code(&r.error)),
            (Id::from(6), ErrorCode::InvalidRequest)
        );
        let r = single(r#"{"jsonrpc":"2.0","id":7,"method":"ping","params":null}"#).unwrap_err();
        assert_eq!(r.id, Id::from(7));
        let r = single(r#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#).unwrap_err();
        assert_eq!(
            (r.id, code(&r.error)),
            (Id::Null, ErrorCode::InvalidRequest)
        );
        let r = single(r#"{"method":"ping","id":8}"#).unwrap_err();
        assert_eq!(r.id, Id::from(8));
        let r = single(r#"42"#).unwrap_err();
        assert_eq!(
            (r.id, code(&r.error)),
            (Id::Null, ErrorCode::InvalidRequest)
        );
        let r = single(r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#).unwrap_err();
        assert_eq!(code(&r.error), ErrorCode::InvalidRequest);
    }

    #[test]
    fn batches() {
        match parse_frame(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, 1, {"jsonrpc":"2.0","method":"x"}]"#,
            16,
        ) {
            Incoming::Batch(items) => {
                assert_eq!(items.len(), 3);
                assert!(items[0].is_ok());
                assert_eq!(
                    code(&items[1].as_ref().unwrap_err().error),
                    ErrorCode::InvalidRequest
                );
                assert_eq!(items[2].as_ref().unwrap().id, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(code(&frame_error(b"[]")), ErrorCode::InvalidRequest);
        assert_eq!(code(&frame_error(b" [ ] ")), ErrorCode::InvalidRequest);
        let e = frame_error(&[b"[", &b"1,".repeat(16)[..], b"1]"].concat());
        assert_eq!(code(&e), ErrorCode::PayloadTooLarge);
        assert_eq!(e.data.unwrap()["max_batch_len"], 16);
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        let result = RawValue::from_string("{\"a\":1}".into()).unwrap();
        write_response(&mut out, &Id::from(9), Ok(&result));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"jsonrpc":"2.0","id":9,"result":{"a":1}}"#
        );
        match parse_from_agent(&out).unwrap() {
            FromAgent::Response(r) => {
                assert_eq!(r.id, Id::from(9));
                assert_eq!(r.outcome.unwrap().get(), "{\"a\":1}");
            }
            other => panic!("{other:?}"),
        }
        out.clear();
        write_response(
            &mut out,
            &Id::Null,
            Err(&ErrorObject::new(ErrorCode::ParseError)),
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#
        );
    }

    #[test]
    fn host_rejects_malformed_responses() {
        for bad in [
            r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","result":1}"#,
            r#"{"jsonrpc":"1.0","id":1,"result":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x"}"#,
        ] {
            assert!(parse_from_agent(bad.as_bytes()).is_err(), "{bad}");
        }
        // A null result is a result.
        assert!(parse_from_agent(br#"{"jsonrpc":"2.0","id":1,"result":null}"#).is_ok());
    }

    #[test]
    fn requests_encode_as_the_spec_shows() {
        let mut out = Vec::new();
        write_request::<Value>(&mut out, Some(&Id::from(1)), "ping", None).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#
        );
    }
}
