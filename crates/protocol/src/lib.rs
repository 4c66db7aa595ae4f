//! The wire protocol of kvm-manager-agent, shared by the agent and the host
//! client. No operating-system code lives here.
//!
//! - [`buffers`]: chunk-sized byte buffers reused between file chunks.
//! - [`auth`]: HMAC-SHA256 authentication of requests, responses and
//!   `agent_ready` (canonical forms, signing, verification).
//! - [`codec`]: base64 and SHA-256 of file contents.
//! - [`frame`]: length-prefixed framing and its decoder.
//! - [`jsonrpc`]: JSON-RPC 2.0 request and response handling.
//! - [`error`]: the error codes that reach the wire.
//! - [`methods`]: every method's name, params and result.
//! - [`notifications`]: what the agent sends unasked.
//!
//! docs/protocol.md is the specification; its examples are checked against
//! these types by `tests/spec_examples.rs`.

pub mod attachment;
pub mod auth;
pub mod buffers;
pub mod codec;
pub mod error;
pub mod frame;
pub mod jsonrpc;
pub mod methods;
pub mod notifications;

pub use error::{ErrorCode, ErrorObject};
pub use methods::{Method, MethodName};

/// Protocol version, `MAJOR.MINOR`: the minor grows with additive changes,
/// the major with incompatible ones.
pub const PROTOCOL_VERSION: &str = "1.1";
