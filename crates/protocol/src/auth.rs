//! Authentication of messages with a shared key: HMAC-SHA256 over a
//! canonical form of each request, response and `agent_ready`
//! (docs/protocol.md, "Authentication").
//!
//! Shared by the agent (verify requests, sign responses and `agent_ready`)
//! and the host client (sign requests, verify responses and `agent_ready`).
//! No operating-system code: reading key files, the clock and random nonces
//! are the caller's business.
//!
//! The canonical forms cover the exact JSON text of `id`, `params`,
//! `result` and `error` as they appear in the frame, so a peer MACs exactly
//! the bytes it sends, with no canonicalisation of JSON:
//!
//! ```text
//! request:      "kvm-agent-auth-v1 request\n" method "\n" ID "\n" ts "\n" nonce "\n" PARAMS
//! response:     "kvm-agent-auth-v1 response\n" ID "\n" request-nonce "\n" ts "\n" ("result\n" RESULT | "error\n" ERROR)
//! notification: "kvm-agent-auth-v1 notification\n" method "\n" ts "\n" nonce "\n" PARAMS
//! ```

use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::error::{ErrorCode, ErrorObject};
use crate::jsonrpc::{self, Id, Request, Response, JSONRPC_VERSION};

type HmacSha256 = Hmac<Sha256>;

/// First line of a request's canonical form.
pub const REQUEST_PREFIX: &str = "kvm-agent-auth-v1 request\n";
/// First line of a response's canonical form.
pub const RESPONSE_PREFIX: &str = "kvm-agent-auth-v1 response\n";
/// First line of a notification's canonical form.
pub const NOTIFICATION_PREFIX: &str = "kvm-agent-auth-v1 notification\n";

/// Fewest key bytes accepted (64 hex digits).
pub const MIN_KEY_BYTES: usize = 32;
/// Bytes of a nonce (32 lowercase hex digits on the wire).
pub const NONCE_BYTES: usize = 16;
/// Bytes of a MAC (64 lowercase hex digits on the wire).
pub const MAC_BYTES: usize = 32;
/// The agent's default `security.hmac_max_skew_seconds`.
pub const DEFAULT_MAX_SKEW_SECONDS: u64 = 300;

/// A shared key. Cheap to clone; `Debug` never shows it.
#[derive(Clone)]
pub struct Key(Arc<[u8]>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes, redacted)", self.0.len())
    }
}

/// Why key text is not a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not hex digits (after trimming surrounding whitespace).
    #[error("the key must be written as hex digits (0-9, a-f), e.g. the output of `openssl rand -hex 32`; {0}")]
    NotHex(String),
    /// Fewer than [`MIN_KEY_BYTES`] bytes.
    #[error("the key is {0} bytes; at least {MIN_KEY_BYTES} bytes (64 hex digits) are required")]
    TooShort(usize),
}

impl Key {
    /// A key from raw bytes (at least [`MIN_KEY_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(Self(bytes.into()))
    }

    /// A key from the text of a key file: hex digits (either case), with
    /// surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyError::NotHex("the key is empty".into()));
        }
        let bytes = decode_hex(text, false).map_err(KeyError::NotHex)?;
        Self::from_bytes(&bytes)
    }

    fn hmac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// The HMAC-SHA256 of `canonical`.
    pub fn mac(&self, canonical: &[u8]) -> [u8; MAC_BYTES] {
        let mut m = self.hmac();
        m.update(canonical);
        m.finalize().into_bytes().into()
    }

    /// Whether `mac` is the HMAC-SHA256 of `canonical`, compared in
    /// constant time.
    pub fn verify(&self, canonical: &[u8], mac: &[u8]) -> bool {
        let mut m = self.hmac();
        m.update(canonical);
        m.verify_slice(mac).is_ok()
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Decode hex; `lowercase_only` refuses `A-F` (the wire form is lowercase).
fn decode_hex(text: &str, lowercase_only: bool) -> Result<Vec<u8>, String> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !lowercase_only => Some(c - b'A' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return Err(format!("odd number of hex digits ({})", bytes.len()));
    }
    bytes
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!("not a hex digit at offset {}", 2 * i)),
        })
        .collect()
}

/// Why a message cannot have a canonical form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// The method name holds a control character (it would make the
    /// line-separated canonical form ambiguous).
    #[error("the method name contains a control character")]
    ControlCharacterInMethod,
    /// No key to sign with.
    #[error("no key to sign with")]
    NoKey,
}

fn check_method(method: &str) -> Result<(), CanonicalError> {
    if method.chars().any(char::is_control) {
        return Err(CanonicalError::ControlCharacterInMethod);
    }
    Ok(())
}

/// The bytes a request's MAC covers. `raw_id` and `params` are the exact
/// JSON text of those members as sent (`None` when absent: a notification,
/// no params).
pub fn request_canonical(
    method: &str,
    raw_id: Option<&str>,
    ts: u64,
    nonce: &str,
    params: Option<&str>,
) -> Result<Vec<u8>, CanonicalError> {
    check_method(method)?;
    let params = params.unwrap_or("");
    let mut out = Vec::with_capacity(REQUEST_PREFIX.len() + method.len() + params.len() + 80);
    out.extend_from_slice(REQUEST_PREFIX.as_bytes());
    for field in [method, raw_id.unwrap_or(""), &ts.to_string(), nonce] {
        out.extend_from_slice(field.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(params.as_bytes());
    Ok(out)
}

/// The bytes a response's MAC covers: `raw_id` is the request's id as the
/// host sent it, `request_nonce` the request's nonce, `outcome` the exact
/// JSON text of the `result` (`Ok`) or `error` (`Err`) member as sent.
pub fn response_canonical(
    raw_id: &str,
    request_nonce: &str,
    ts: u64,
    outcome: Result<&str, &str>,
) -> Vec<u8> {
    let (tag, body) = match outcome {
        Ok(r) => ("result", r),
        Err(e) => ("error", e),
    };
    let mut out = Vec::with_capacity(RESPONSE_PREFIX.len() + body.len() + 80);
    out.extend_from_slice(RESPONSE_PREFIX.as_bytes());
    for field in [raw_id, request_nonce, &ts.to_string(), tag] {
        out.extend_from_slice(field.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(body.as_bytes());
    out
}

/// The bytes a notification's MAC covers (`agent_ready`).
pub fn notification_canonical(
    method: &str,
    ts: u64,
    nonce: &str,
    params: Option<&str>,
) -> Result<Vec<u8>, CanonicalError> {
    check_method(method)?;
    let params = params.unwrap_or("");
    let mut out = Vec::with_capacity(NOTIFICATION_PREFIX.len() + params.len() + 80);
    out.extend_from_slice(NOTIFICATION_PREFIX.as_bytes());
    for field in [method, &ts.to_string(), nonce] {
        out.extend_from_slice(field.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(params.as_bytes());
    Ok(out)
}

/// The `auth` member of a request (or of a notification from the host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageAuth {
    /// Sender's clock, milliseconds since the Unix epoch.
    pub ts: u64,
    /// 16 random bytes, 32 lowercase hex digits; never reused.
    pub nonce: String,
    /// HMAC-SHA256 of the canonical form, 64 lowercase hex digits.
    pub mac: String,
}

/// The `auth` member of a notification from the agent (`agent_ready`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationAuth {
    /// The agent's clock, milliseconds since the Unix epoch.
    pub ts: u64,
    /// 16 random bytes, 32 lowercase hex digits.
    pub nonce: String,
    /// HMAC-SHA256 of the canonical form with the current key.
    pub mac: String,
    /// During a key rollover only: the same with the previous key, so that
    /// hosts still on it can trust `agent_ready` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_previous: Option<String>,
}

/// The `auth` member of a response (its nonce is the request's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseAuth {
    /// The agent's clock when it signed, milliseconds since the Unix epoch.
    pub ts: u64,
    /// HMAC-SHA256 of the canonical form, 64 lowercase hex digits.
    pub mac: String,
}

/// 16 bytes unique to this call, for a nonce: std's randomly keyed SipHash
/// (its keys come from the operating system's random source, once per
/// thread) over a process-wide counter and the clock. A nonce must be unique,
/// not secret; this needs no platform code.
pub fn random_nonce() -> [u8; NONCE_BYTES] {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut out = [0u8; NONCE_BYTES];
    for (half, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_usize(half);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// Milliseconds since the Unix epoch, as `ts` carries them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A nonce as sent: 32 lowercase hex digits.
pub fn nonce_hex(bytes: &[u8; NONCE_BYTES]) -> String {
    to_hex(bytes)
}

/// Why a request fails authentication: `data.reason` of the -32008 reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No `auth` member.
    Missing,
    /// `auth` is not `{"ts": <integer>, "nonce": <32 lowercase hex>, "mac":
    /// <64 lowercase hex>}`, or the method name holds a control character.
    Malformed,
    /// The MAC is not the one of any accepted key.
    BadMac,
    /// `ts` is outside the agent's clock ± the allowed skew.
    Stale,
    /// The nonce was already used within the window.
    Replayed,
}

impl Failure {
    /// The `data.reason` string.
    pub const fn reason(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::BadMac => "bad_mac",
            Failure::Stale => "stale",
            Failure::Replayed => "replayed",
        }
    }

    /// The -32008 reply.
    pub fn error(self) -> ErrorObject {
        ErrorObject::with_message(
            ErrorCode::AuthenticationFailed,
            format!("Authentication failed: {}", self.reason()),
        )
        .data(serde_json::json!({ "reason": self.reason() }))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// Parse an `auth` member of a request or notification.
pub fn parse_message_auth(raw: &RawValue) -> Result<(MessageAuth, [u8; MAC_BYTES]), Failure> {
    let auth: MessageAuth = serde_json::from_str(raw.get()).map_err(|_| Failure::Malformed)?;
    let nonce_ok = auth.nonce.len() == 2 * NONCE_BYTES && decode_hex(&auth.nonce, true).is_ok();
    let mac = match decode_hex(&auth.mac, true) {
        Ok(m) if nonce_ok => <[u8; MAC_BYTES]>::try_from(m).map_err(|_| Failure::Malformed)?,
        _ => return Err(Failure::Malformed),
    };
    Ok((auth, mac))
}

/// A request that passed the stateless checks: the caller still checks the
/// nonce against its replay cache.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Index in the key list of the key that verified it.
    pub key_index: usize,
    /// The request's `ts`.
    pub ts: u64,
    /// The request's nonce (lowercase hex).
    pub nonce: String,
}

/// Check a request's `auth` against `keys` (tried in order) and the clock:
/// missing, malformed, bad MAC, then stale (`|ts - now_ms| > max_skew_ms`).
pub fn verify_request(
    keys: &[Key],
    req: &Request,
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<Verified, Failure> {
    let raw = req.auth.as_deref().ok_or(Failure::Missing)?;
    let (auth, mac) = parse_message_auth(raw)?;
    let canonical = request_canonical(
        &req.method,
        req.raw_id.as_deref().map(RawValue::get),
        auth.ts,
        &auth.nonce,
        req.params.as_deref().map(RawValue::get),
    )
    .map_err(|_| Failure::Malformed)?;
    let key_index = keys
        .iter()
        .position(|k| k.verify(&canonical, &mac))
        .ok_or(Failure::BadMac)?;
    if auth.ts.abs_diff(now_ms) > max_skew_ms {
        return Err(Failure::Stale);
    }
    Ok(Verified {
        key_index,
        ts: auth.ts,
        nonce: auth.nonce,
    })
}

/// What the agent needs to sign the response to an authenticated request.
/// Cheap to clone (one pointer).
#[derive(Clone, Debug)]
pub struct ResponseSigner(Arc<SignerInner>);

#[derive(Debug)]
struct SignerInner {
    key: Key,
    raw_id: String,
    nonce: String,
}

impl ResponseSigner {
    /// Sign with `key` the response to the request whose id text was
    /// `raw_id` and whose nonce was `nonce`.
    pub fn new(key: Key, raw_id: String, nonce: String) -> Self {
        Self(Arc::new(SignerInner { key, raw_id, nonce }))
    }

    /// The `auth` member for a response with this exact `result` (`Ok`) or
    /// `error` (`Err`) text, signed at `ts`.
    pub fn sign(&self, ts: u64, outcome: Result<&str, &str>) -> ResponseAuth {
        let canonical = response_canonical(&self.0.raw_id, &self.0.nonce, ts, outcome);
        ResponseAuth {
            ts,
            mac: to_hex(&self.0.key.mac(&canonical)),
        }
    }
}

#[derive(Serialize)]
struct OutSigned<'a> {
    jsonrpc: &'static str,
    id: &'a Id,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    auth: &'a ResponseAuth,
}

/// Append the JSON of a response carrying an `auth` member:
/// `{"jsonrpc":"2.0","id":..,"result"|"error":..,"auth":{"ts":..,"mac":..}}`.
pub fn write_signed_response(
    out: &mut Vec<u8>,
    id: &Id,
    outcome: Result<&RawValue, &ErrorObject>,
    signer: &ResponseSigner,
    ts: u64,
) {
    let error_text;
    let (result, error) = match outcome {
        Ok(r) => (Some(r), None),
        Err(e) => {
            error_text =
                serde_json::value::to_raw_value(e).expect("an error object always serializes");
            (None, Some(&*error_text))
        }
    };
    let auth = signer.sign(
        ts,
        match (result, error) {
            (Some(r), _) => Ok(r.get()),
            (None, Some(e)) => Err(e.get()),
            (None, None) => unreachable!("one of result and error"),
        },
    );
    let msg = OutSigned {
        jsonrpc: JSONRPC_VERSION,
        id,
        result,
        error,
        auth: &auth,
    };
    serde_json::to_writer(out, &msg).expect("serializing to a Vec cannot fail");
}

#[derive(Serialize)]
struct OutSignedRequest<'a, A: Serialize> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Id>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a RawValue>,
    auth: &'a A,
}

/// Append the JSON of a signed request (or, with `id: None`, a signed
/// notification): `{"jsonrpc":"2.0","id":..,"method":..,"params":..,"auth":{..}}`.
/// `nonce` must be fresh: 16 random bytes, never used before.
pub fn write_signed_request<P: Serialize>(
    out: &mut Vec<u8>,
    key: &Key,
    id: Option<&Id>,
    method: &str,
    params: Option<&P>,
    ts: u64,
    nonce: &[u8; NONCE_BYTES],
) -> Result<(), SignError> {
    let params = params.map(serde_json::value::to_raw_value).transpose()?;
    let raw_id = id.map(serde_json::to_string).transpose()?;
    let nonce = nonce_hex(nonce);
    let canonical = request_canonical(
        method,
        raw_id.as_deref(),
        ts,
        &nonce,
        params.as_deref().map(RawValue::get),
    )?;
    let auth = MessageAuth {
        ts,
        mac: to_hex(&key.mac(&canonical)),
        nonce,
    };
    let msg = OutSignedRequest {
        jsonrpc: JSONRPC_VERSION,
        id,
        method,
        params: params.as_deref(),
        auth: &auth,
    };
    serde_json::to_writer(out, &msg)?;
    Ok(())
}

/// Why a message could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The params (or id) do not serialize.
    #[error("cannot encode the message: {0}")]
    Json(#[from] serde_json::Error),
    /// The method name cannot be signed.
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
}

/// Append the JSON of a signed notification from the agent
/// (`agent_ready`): `{"jsonrpc":"2.0","method":..,"params":..,"auth":{..}}`,
/// `mac` with `keys[0]` (the current key) and, when there is a `keys[1]`
/// (the previous key, during a rollover), `mac_previous` with it.
pub fn write_signed_notification<P: Serialize>(
    out: &mut Vec<u8>,
    keys: &[Key],
    method: &str,
    params: Option<&P>,
    ts: u64,
    nonce: &[u8; NONCE_BYTES],
) -> Result<(), SignError> {
    let params = params.map(serde_json::value::to_raw_value).transpose()?;
    let nonce = nonce_hex(nonce);
    let canonical =
        notification_canonical(method, ts, &nonce, params.as_deref().map(RawValue::get))?;
    let key = keys.first().ok_or(CanonicalError::NoKey)?;
    let auth = NotificationAuth {
        ts,
        mac: to_hex(&key.mac(&canonical)),
        mac_previous: keys.get(1).map(|k| to_hex(&k.mac(&canonical))),
        nonce,
    };
    let msg = OutSignedRequest {
        jsonrpc: JSONRPC_VERSION,
        id: None,
        method,
        params: params.as_deref(),
        auth: &auth,
    };
    serde_json::to_writer(out, &msg)?;
    Ok(())
}

/// Why a message from the agent is not authentic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseFailure {
    /// No `auth` member.
    #[error("it carries no auth member")]
    Missing,
    /// The `auth` member is not of the documented shape.
    #[error("its auth member is malformed")]
    Malformed,
    /// The MAC does not match.
    #[error("its MAC does not match")]
    BadMac,
}

/// Check a response from the agent to the request whose id text was
/// `raw_id` and nonce `nonce`.
pub fn verify_response(
    key: &Key,
    raw_id: &str,
    nonce: &str,
    response: &Response,
) -> Result<ResponseAuth, ResponseFailure> {
    let raw = response.auth.as_deref().ok_or(ResponseFailure::Missing)?;
    let auth: ResponseAuth =
        serde_json::from_str(raw.get()).map_err(|_| ResponseFailure::Malformed)?;
    let mac = decode_hex(&auth.mac, true)
        .ok()
        .filter(|m| m.len() == MAC_BYTES)
        .ok_or(ResponseFailure::Malformed)?;
    let outcome = match (&response.outcome, &response.raw_error) {
        (Ok(r), _) => Ok(r.get()),
        (Err(_), Some(e)) => Err(e.get()),
        (Err(_), None) => return Err(ResponseFailure::Malformed),
    };
    let canonical = response_canonical(raw_id, nonce, auth.ts, outcome);
    if !key.verify(&canonical, &mac) {
        return Err(ResponseFailure::BadMac);
    }
    Ok(auth)
}

/// Check a notification from the agent (`agent_ready`): `key` must verify
/// `mac` or, during a rollover, `mac_previous`.
pub fn verify_notification(
    key: &Key,
    notification: &jsonrpc::Notification,
) -> Result<NotificationAuth, ResponseFailure> {
    let raw = notification
        .auth
        .as_deref()
        .ok_or(ResponseFailure::Missing)?;
    let auth: NotificationAuth =
        serde_json::from_str(raw.get()).map_err(|_| ResponseFailure::Malformed)?;
    let mac_bytes = |m: &str| {
        decode_hex(m, true)
            .ok()
            .filter(|b| b.len() == MAC_BYTES)
            .ok_or(ResponseFailure::Malformed)
    };
    let nonce_ok = auth.nonce.len() == 2 * NONCE_BYTES && decode_hex(&auth.nonce, true).is_ok();
    if !nonce_ok {
        return Err(ResponseFailure::Malformed);
    }
    let mut macs = vec![mac_bytes(&auth.mac)?];
    if let Some(prev) = &auth.mac_previous {
        macs.push(mac_bytes(prev)?);
    }
    let canonical = notification_canonical(
        &notification.method,
        auth.ts,
        &auth.nonce,
        notification.params.as_deref().map(RawValue::get),
    )
    .map_err(|_| ResponseFailure::Malformed)?;
    if !macs.iter().any(|m| key.verify(&canonical, m)) {
        return Err(ResponseFailure::BadMac);
    }
    Ok(auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc::{parse_frame, parse_from_agent, FromAgent, Incoming};

    const NOW: u64 = 1_700_000_000_000;
    const SKEW: u64 = 300_000;
    const NONCE: [u8; 16] = [
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae,
        0xaf,
    ];

    fn key(first: u8) -> Key {
        Key::from_bytes(&(first..first + 32).collect::<Vec<u8>>()).unwrap()
    }

    fn request(text: &[u8]) -> Request {
        match parse_frame(text, 16) {
            Incoming::Single(Ok(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn signed(
        k: &Key,
        id: u64,
        method: &str,
        params: Option<&serde_json::Value>,
        ts: u64,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        write_signed_request(&mut out, k, Some(&Id::from(id)), method, params, ts, &NONCE).unwrap();
        out
    }

    #[test]
    fn hex_and_keys() {
        assert_eq!(to_hex(&[0, 1, 0xab, 0xff]), "0001abff");
        assert_eq!(decode_hex("0001ABff", false).unwrap(), [0, 1, 0xab, 0xff]);
        assert!(decode_hex("AB", true).is_err());
        assert!(decode_hex("abc", false).is_err());
        let hex = to_hex(&(0u8..32).collect::<Vec<_>>());
        assert!(Key::from_hex(&format!("  {hex}\n")).is_ok());
        assert_eq!(
            Key::from_hex(&hex[..62]).unwrap_err(),
            KeyError::TooShort(31)
        );
        assert!(matches!(Key::from_hex("zz"), Err(KeyError::NotHex(_))));
        assert!(matches!(Key::from_hex(" \n"), Err(KeyError::NotHex(_))));
        assert!(
            !format!("{:?}", key(0)).contains("00"),
            "Debug shows no key bytes"
        );
    }

    #[test]
    fn canonical_forms_are_line_separated_fields() {
        let c = request_canonical("ping", Some("7"), 12, "ab", Some("{}")).unwrap();
        assert_eq!(c, b"kvm-agent-auth-v1 request\nping\n7\n12\nab\n{}");
        let c = request_canonical("ping", None, 12, "ab", None).unwrap();
        assert_eq!(c, b"kvm-agent-auth-v1 request\nping\n\n12\nab\n");
        assert_eq!(
            request_canonical("pi\nng", None, 1, "ab", None),
            Err(CanonicalError::ControlCharacterInMethod)
        );
        let c = response_canonical("\"x\"", "ab", 5, Err("{\"code\":1}"));
        assert_eq!(
            c,
            b"kvm-agent-auth-v1 response\n\"x\"\nab\n5\nerror\n{\"code\":1}"
        );
        let c = notification_canonical("agent_ready", 5, "ab", Some("{}")).unwrap();
        assert_eq!(c, b"kvm-agent-auth-v1 notification\nagent_ready\n5\nab\n{}");
    }

    #[test]
    fn good_request_verifies_with_the_key_that_signed_it() {
        let params = serde_json::json!({"all_interfaces": true});
        let frame = signed(&key(0), 7, "get_info", Some(&params), NOW);
        let req = request(&frame);
        assert_eq!(req.raw_id.as_deref().unwrap().get(), "7");
        let v = verify_request(&[key(0)], &req, NOW, SKEW).unwrap();
        assert_eq!((v.key_index, v.ts), (0, NOW));
        assert_eq!(v.nonce, "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf");
        // Rotation: the old key is accepted second in the list.
        let v = verify_request(&[key(100), key(0)], &req, NOW, SKEW).unwrap();
        assert_eq!(v.key_index, 1);
    }

    #[test]
    fn wrong_key_and_flipped_bits_are_bad_macs() {
        let params = serde_json::json!({"all_interfaces": true});
        let frame = signed(&key(0), 7, "get_info", Some(&params), NOW);
        let req = request(&frame);
        assert_eq!(
            verify_request(&[key(1)], &req, NOW, SKEW).unwrap_err(),
            Failure::BadMac
        );
        // One bit of the params ("true" -> "truE" is not JSON; flip the
        // member name instead: 'a' ^ 0x01 = '`').
        let text = String::from_utf8(frame.clone()).unwrap();
        let flipped = text.replacen("all_interfaces", "`ll_interfaces", 1);
        let req = request(flipped.as_bytes());
        assert_eq!(
            verify_request(&[key(0)], &req, NOW, SKEW).unwrap_err(),
            Failure::BadMac
        );
        // The id, the method, the timestamp: each is covered.
        for (from, to) in [
            ("\"id\":7", "\"id\":6"),
            ("get_info", "get_infp"),
            (&format!("\"ts\":{NOW}"), &format!("\"ts\":{}", NOW + 1)),
            ("\"nonce\":\"a0", "\"nonce\":\"a1"),
        ] {
            let req = request(text.replacen(from, to, 1).as_bytes());
            assert_eq!(
                verify_request(&[key(0)], &req, NOW, SKEW).unwrap_err(),
                Failure::BadMac,
                "{from} -> {to}"
            );
        }
        // Re-spacing the params changes the text MAC'd.
        let spaced = text.replacen("{\"all_interfaces\":true}", "{ \"all_interfaces\":true}", 1);
        assert_ne!(spaced, text);
        let req = request(spaced.as_bytes());
        assert_eq!(
            verify_request(&[key(0)], &req, NOW, SKEW).unwrap_err(),
            Failure::BadMac
        );
    }

    #[test]
    fn stale_and_future_timestamps() {
        let frame = signed(&key(0), 1, "ping", None, NOW);
        let req = request(&frame);
        assert!(verify_request(&[key(0)], &req, NOW + SKEW, SKEW).is_ok());
        assert!(verify_request(&[key(0)], &req, NOW - SKEW, SKEW).is_ok());
        assert_eq!(
            verify_request(&[key(0)], &req, NOW + SKEW + 1, SKEW).unwrap_err(),
            Failure::Stale
        );
        assert_eq!(
            verify_request(&[key(0)], &req, NOW - SKEW - 1, SKEW).unwrap_err(),
            Failure::Stale
        );
    }

    #[test]
    fn missing_and_malformed_auth() {
        let req = request(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
        assert_eq!(
            verify_request(&[key(0)], &req, NOW, SKEW).unwrap_err(),
            Failure::Missing
        );
        let good_nonce = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
        let good_mac = "00".repeat(32);
        for auth in [
            "null".to_owned(),
            "{}".to_owned(),
            "\"x\"".to_owned(),
            format!(r#"{{"ts":1,"nonce":"{good_nonce}"}}"#),
            format!(r#"{{"ts":1,"mac":"{good_mac}"}}"#),
            format!(r#"{{"nonce":"{good_nonce}","mac":"{good_mac}"}}"#),
            format!(r#"{{"ts":-1,"nonce":"{good_nonce}","mac":"{good_mac}"}}"#),
            format!(r#"{{"ts":1.5,"nonce":"{good_nonce}","mac":"{good_mac}"}}"#),
            format!(r#"{{"ts":"1","nonce":"{good_nonce}","mac":"{good_mac}"}}"#),
            format!(r#"{{"ts":1,"nonce":"xyz","mac":"{good_mac}"}}"#),
            format!(
                r#"{{"ts":1,"nonce":"{}","mac":"{good_mac}"}}"#,
                good_nonce.to_uppercase()
            ),
            format!(
                r#"{{"ts":1,"nonce":"{good_nonce}","mac":"{}"}}"#,
                "0".repeat(63)
            ),
            format!(
                r#"{{"ts":1,"nonce":"{good_nonce}","mac":"{}"}}"#,
                "0g".repeat(32)
            ),
            format!(
                r#"{{"ts":1,"nonce":"{good_nonce}","mac":"{}"}}"#,
                "00".repeat(33)
            ),
            format!(r#"{{"ts":1,"nonce":"{good_nonce}","mac":"{good_mac}","x":1}}"#),
        ] {
            let text = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ping","auth":{auth}}}"#);
            let req = request(text.as_bytes());
            assert_eq!(
                verify_request(&[key(0)], &req, NOW, SKEW).unwrap_err(),
                Failure::Malformed,
                "{auth}"
            );
        }
        // A well-formed auth on a method with a control character.
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"pi\nng","auth":{{"ts":1,"nonce":"{good_nonce}","mac":"{good_mac}"}}}}"#
        );
        let req = request(text.as_bytes());
        assert_eq!(
            verify_request(&[key(0)], &req, NOW, SKEW).unwrap_err(),
            Failure::Malformed
        );
    }

    #[test]
    fn failures_are_32008_with_a_reason() {
        let e = Failure::Replayed.error();
        assert_eq!(e.kind(), Some(ErrorCode::AuthenticationFailed));
        assert_eq!(e.data.unwrap()["reason"], "replayed");
    }

    #[test]
    fn signed_responses_verify_and_tampering_fails() {
        let signer = ResponseSigner::new(key(0), "7".into(), "ab".repeat(16));
        let result = RawValue::from_string(r#"{"a":1}"#.into()).unwrap();
        let mut out = Vec::new();
        write_signed_response(&mut out, &Id::from(7), Ok(&result), &signer, NOW);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                r#"{"jsonrpc":"2.0","id":7,"result":{"a":1},"auth":{"ts":1700000000000,"mac":""#
            ),
            "{text}"
        );
        let parse = |t: &str| match parse_from_agent(t.as_bytes()).unwrap() {
            FromAgent::Response(r) => r,
            other => panic!("{other:?}"),
        };
        let r = parse(&text);
        assert!(verify_response(&key(0), "7", &"ab".repeat(16), &r).is_ok());
        assert_eq!(
            verify_response(&key(1), "7", &"ab".repeat(16), &r).unwrap_err(),
            ResponseFailure::BadMac
        );
        assert_eq!(
            verify_response(&key(0), "8", &"ab".repeat(16), &r).unwrap_err(),
            ResponseFailure::BadMac,
            "bound to the request id"
        );
        assert_eq!(
            verify_response(&key(0), "7", &"cd".repeat(16), &r).unwrap_err(),
            ResponseFailure::BadMac,
            "bound to the request nonce"
        );
        let tampered = parse(&text.replacen(r#""a":1"#, r#""a":2"#, 1));
        assert_eq!(
            verify_response(&key(0), "7", &"ab".repeat(16), &tampered).unwrap_err(),
            ResponseFailure::BadMac
        );
        let unsigned = parse(r#"{"jsonrpc":"2.0","id":7,"result":{"a":1}}"#);
        assert_eq!(
            verify_response(&key(0), "7", &"ab".repeat(16), &unsigned).unwrap_err(),
            ResponseFailure::Missing
        );
        // Errors are signed over their exact text.
        let mut out = Vec::new();
        let e = ErrorObject::new(ErrorCode::NotFound).data(serde_json::json!({"path": "/x"}));
        write_signed_response(&mut out, &Id::from(7), Err(&e), &signer, NOW);
        let r = parse(std::str::from_utf8(&out).unwrap());
        assert!(verify_response(&key(0), "7", &"ab".repeat(16), &r).is_ok());
        let text = String::from_utf8(out).unwrap().replacen("/x", "/y", 1);
        assert_eq!(
            verify_response(&key(0), "7", &"ab".repeat(16), &parse(&text)).unwrap_err(),
            ResponseFailure::BadMac
        );
    }

    /// An agent_ready signed with `keys`, as the host receives it.
    fn signed_ready(keys: &[Key]) -> crate::jsonrpc::Notification {
        let mut out = Vec::new();
        let params = serde_json::json!({"boot_id": "b"});
        write_signed_notification(&mut out, keys, "agent_ready", Some(&params), NOW, &NONCE)
            .unwrap();
        match parse_from_agent(&out).unwrap() {
            FromAgent::Notification(n) => n,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signed_notifications_verify() {
        let n = signed_ready(&[key(0)]);
        assert!(verify_notification(&key(0), &n).is_ok());
        assert_eq!(
            verify_notification(&key(1), &n).unwrap_err(),
            ResponseFailure::BadMac
        );
        // During a rollover, hosts on either key can check it.
        let n = signed_ready(&[key(0), key(1)]);
        assert!(verify_notification(&key(0), &n).is_ok());
        assert!(verify_notification(&key(1), &n).is_ok());
        assert_eq!(
            verify_notification(&key(2), &n).unwrap_err(),
            ResponseFailure::BadMac
        );
    }
}
