//! Host-side client for kvm-manager-agent.
//!
//! Connect to an agent through a [`Target`] (`unix:PATH`, `vsock:CID:PORT`
//! or `hvsock:PATH:PORT`) and call its methods with a [`Client`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvm_agent_client::ClientError> {
//! use kvm_agent_client::{Client, ClientOptions, Target};
//!
//! let target: Target = "unix:/run/vm1/agent.sock".parse()?;
//! let client = Client::connect(target, ClientOptions::default()).await?;
//! println!("agent {:?}", client.agent_ready());
//! let rtt = client.ping().await?;
//! let caps = client.get_capabilities().await?;
//! println!("{rtt:?} {:?}", caps.methods);
//! # Ok(()) }
//! ```
//!
//! The wire format (4-byte big-endian length, then UTF-8 JSON-RPC 2.0) and
//! every method's types come from [`kvm_agent_protocol`], re-exported as
//! [`protocol`].

mod auth;
mod client;
mod connection;
mod error;
pub mod files;
mod target;
mod transport;

pub use auth::{AuthKey, AuthKeyError};
pub use client::{Client, ClientOptions};
pub use connection::{Unmatched, UnmatchedHandler};
pub use error::{ClientError, ErrorKind};
pub use kvm_agent_protocol as protocol;
pub use target::{Target, TargetParseError};

// Against a fake agent on a unix socket: not built on other hosts.
#[cfg(all(test, unix))]
mod tests;
