//! Error codes that travel on the wire, and the JSON-RPC error object.
//!
//! The table in docs/protocol.md ("Error codes") lists the same codes; a test
//! checks that the two agree.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every error code this protocol uses: the five JSON-RPC 2.0 codes and the
/// application codes in -32000..-32099.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// -32700: the frame is not valid UTF-8 JSON (this includes an empty frame).
    ParseError,
    /// -32600: valid JSON, but not a valid JSON-RPC 2.0 request object.
    InvalidRequest,
    /// -32601: no method by that name.
    MethodNotFound,
    /// -32602: the method exists but its params are wrong.
    InvalidParams,
    /// -32603: a fault inside the agent; the request may be retried.
    InternalError,
    /// -32000: the local policy does not allow this request.
    Denied,
    /// -32001: the named object (file, handle, user) does not exist.
    NotFound,
    /// -32002: the target exists and the request did not allow replacing it.
    AlreadyExists,
    /// -32003: an operating-system I/O call failed.
    Io,
    /// -32004: the operation did not finish within its time limit.
    Timeout,
    /// -32005: a frame, batch or payload is larger than the advertised limit.
    PayloadTooLarge,
    /// -32006: the method or option does not exist on this guest's platform.
    Unsupported,
    /// -32007: a destructive request lacked `"confirm": true`.
    ConfirmationRequired,
    /// -32008: the request's authentication was missing, wrong, stale or replayed.
    AuthenticationFailed,
    /// -32009: a concurrency or resource limit is reached; retry later.
    Busy,
    /// -32010: the method is part of the protocol but not implemented by this agent yet.
    NotImplemented,
    /// -32011: the agent is shutting down and abandoned the request.
    Cancelled,
}

impl ErrorCode {
    /// Every code, in table order.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::MethodNotFound,
        ErrorCode::InvalidParams,
        ErrorCode::InternalError,
        ErrorCode::Denied,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::Io,
        ErrorCode::Timeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Unsupported,
        ErrorCode::ConfirmationRequired,
        ErrorCode::AuthenticationFailed,
        ErrorCode::Busy,
        ErrorCode::NotImplemented,
        ErrorCode::Cancelled,
    ];

    /// The integer sent on the wire.
    pub const fn code(self) -> i32 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::InternalError => -32603,
            ErrorCode::Denied => -32000,
            ErrorCode::NotFound => -32001,
            ErrorCode::AlreadyExists => -32002,
            ErrorCode::Io => -32003,
            ErrorCode::Timeout => -32004,
            ErrorCode::PayloadTooLarge => -32005,
            ErrorCode::Unsupported => -32006,
            ErrorCode::ConfirmationRequired => -32007,
            ErrorCode::AuthenticationFailed => -32008,
            ErrorCode::Busy => -32009,
            ErrorCode::NotImplemented => -32010,
            ErrorCode::Cancelled => -32011,
        }
    }

    /// The code for an integer, if it is one of ours.
    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| i64::from(c.code()) == code)
    }

    /// The short snake_case name used in logs and audit records.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MethodNotFound => "method_not_found",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::Denied => "denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Io => "io_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::ConfirmationRequired => "confirmation_required",
            ErrorCode::AuthenticationFailed => "authentication_failed",
            ErrorCode::Busy => "busy",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::Cancelled => "cancelled",
        }
    }

    /// The default `message` of an error with this code.
    pub const fn default_message(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "Parse error",
            ErrorCode::InvalidRequest => "Invalid Request",
            ErrorCode::MethodNotFound => "Method not found",
            ErrorCode::InvalidParams => "Invalid params",
            ErrorCode::InternalError => "Internal error",
            ErrorCode::Denied => "Denied by policy",
            ErrorCode::NotFound => "Not found",
            ErrorCode::AlreadyExists => "Already exists",
            ErrorCode::Io => "I/O error",
            ErrorCode::Timeout => "Timed out",
            ErrorCode::PayloadTooLarge => "Payload too large",
            ErrorCode::Unsupported => "Unsupported on this platform",
            ErrorCode::ConfirmationRequired => "Confirmation required",
            ErrorCode::AuthenticationFailed => "Authentication failed",
            ErrorCode::Busy => "Busy: limit reached",
            ErrorCode::NotImplemented => "Not implemented",
            ErrorCode::Cancelled => "Cancelled: the agent is shutting down",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// The JSON-RPC `error` member of a response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct ErrorObject {
    /// The numeric code; see [`ErrorCode`].
    pub code: i64,
    /// One sentence for people.
    pub message: String,
    /// Machine-readable detail: the offending path, the limit, the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    /// An error with the code's default message and no data.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code: code.code().into(),
            message: code.default_message().to_owned(),
            data: None,
        }
    }

    /// An error with its own message.
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code().into(),
            message: message.into(),
            data: None,
        }
    }

    /// Attach machine-readable detail.
    pub fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The typed code, when it is one this protocol defines.
    pub fn kind(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(self.code)
    }
}

impl From<ErrorCode> for ErrorObject {
    fn from(code: ErrorCode) -> Self {
        Self::new(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {c}");
            assert_eq!(ErrorCode::from_code(c.code().into()), Some(c));
            let standard = (-32768..=-32600).contains(&c.code());
            let application = (-32099..=-32000).contains(&c.code());
            assert!(standard || application, "{c} outside the reserved ranges");
        }
    }

    #[test]
    fn error_object_omits_absent_data() {
        let e = ErrorObject::new(ErrorCode::MethodNotFound);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":-32601,"message":"Method not found"}"#
        );
    }
}
