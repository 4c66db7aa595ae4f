//! [`ClientError`]: everything a call can fail with.

use std::io;
use std::time::Duration;

use kvm_agent_protocol::{ErrorCode, ErrorObject};

use crate::target::{Target, TargetParseError};

/// Why a client operation failed.
///
/// The variants fall into four groups, which [`ClientError::kind`] names:
/// the agent answered with an error ([`ClientError::Agent`]); the connection
/// could not be made, was lost or timed out; the agent sent something this
/// client cannot understand; or the request was refused locally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection to the target could not be established (including a
    /// failed hybrid-vsock `CONNECT` handshake).
    #[error("could not connect to {target}: {source}")]
    Connect {
        /// Where the client tried to connect.
        target: Target,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A local I/O error outside connection set-up.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// No answer in time. `waiting_for` says what was awaited.
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What the client was waiting for.
        waiting_for: String,
        /// The limit that expired.
        after: Duration,
    },
    /// The connection closed (agent restarted, guest rebooted, socket
    /// error) before the answer arrived. The request may or may not have been
    /// executed by the agent.
    #[error("connection to the agent lost: {0}")]
    Disconnected(String),
    /// The agent answered with a JSON-RPC error.
    #[error("the agent answered with an error: {0}")]
    Agent(ErrorObject),
    /// The agent sent a message that is not valid JSON-RPC, or a result that
    /// does not have the shape the method promises.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// With [`crate::ClientOptions::auth`]: a response or `agent_ready`
    /// without a valid MAC. The connection is closed: what arrives on it
    /// cannot be trusted.
    #[error("response authentication failed: {0}")]
    Authentication(String),
    /// The agent sent a frame longer than the client's `max_frame_bytes`; it
    /// was skipped.
    #[error("the agent sent a frame of {len} bytes, over the limit of {max} bytes")]
    FrameTooLarge {
        /// The length the frame header announced.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The request would not fit in one frame of `max_frame_bytes`; it was
    /// not sent.
    #[error("the request is {len} bytes, over the frame limit of {max} bytes; it was not sent")]
    RequestTooLarge {
        /// The encoded request's length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The target string could not be parsed.
    #[error("invalid target: {0}")]
    InvalidTarget(#[from] TargetParseError),
    /// The transport does not exist on this platform (vsock off Linux).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// The broad class of a [`ClientError`], for mapping to exit codes or retry
/// decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The agent answered with a JSON-RPC error.
    Agent,
    /// Could not connect, connection lost, or timed out.
    Connection,
    /// The agent sent something malformed or oversized.
    Protocol,
    /// Refused before anything was sent: bad target, request too large,
    /// unsupported transport, local I/O.
    Local,
}

impl ClientError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Agent(_) => ErrorKind::Agent,
            ClientError::Connect { .. } | ClientError::Timeout { .. } => ErrorKind::Connection,
            ClientError::Disconnected(_) => ErrorKind::Connection,
            ClientError::Protocol(_)
            | ClientError::Authentication(_)
            | ClientError::FrameTooLarge { .. } => ErrorKind::Protocol,
            ClientError::Io(_)
            | ClientError::RequestTooLarge { .. }
            | ClientError::InvalidTarget(_)
            | ClientError::Unsupported(_) => ErrorKind::Local,
        }
    }

    /// True when the agent answered with a JSON-RPC error.
    pub fn is_agent_error(&self) -> bool {
        matches!(self, ClientError::Agent(_))
    }

    /// True for connect failures, lost connections and timeouts.
    pub fn is_connection_error(&self) -> bool {
        self.kind() == ErrorKind::Connection
    }

    /// True when the agent sent something malformed or oversized.
    pub fn is_protocol_error(&self) -> bool {
        self.kind() == ErrorKind::Protocol
    }

    /// The agent's error object, when the agent answered with an error.
    pub fn agent_error(&self) -> Option<&ErrorObject> {
        match self {
            ClientError::Agent(e) => Some(e),
            _ => None,
        }
    }

    /// The numeric JSON-RPC error code, when the agent answered with an error.
    pub fn code(&self) -> Option<i64> {
        self.agent_error().map(|e| e.code)
    }

    /// The typed error code, when the agent answered with one this protocol
    /// defines.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.agent_error().and_then(ErrorObject::kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_expose_their_code() {
        let e = ClientError::Agent(ErrorObject::new(ErrorCode::NotImplemented));
        assert!(e.is_agent_error());
        assert_eq!(e.code(), Some(-32010));
        assert_eq!(e.error_code(), Some(ErrorCode::NotImplemented));
        assert_eq!(e.kind(), ErrorKind::Agent);
        let e = ClientError::Disconnected("eof".into());
        assert!(!e.is_agent_error());
        assert!(e.is_connection_error());
        assert_eq!(e.code(), None);
        assert!(ClientError::Protocol("x".into()).is_protocol_error());
    }
}
