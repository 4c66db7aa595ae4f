//! kvm-manager-agent: the guest side.
//!
//! A request flows top to bottom through these modules:
//!
//! 1. [`transport`]: a host connects (virtio-serial, vsock, unix socket).
//! 2. [`connection`]: bytes become frames, frames become requests, answers
//!    go back; concurrency and memory limits are enforced here.
//! 3. [`dispatch`]: the request authenticated ([`auth`], when a key is
//!    configured), method and params decoded into a typed call, the
//!    [`policy`] check and the [`audit`] record (once, for every request),
//!    then one `match` that calls the handler.
//! 4. [`handlers`]: one module per method group; OS specifics live behind
//!    [`platform`].
//!
//! [`qga`] is a second front end that speaks qemu-guest-agent's protocol
//! and reaches the same dispatcher gate and handlers.
//!
//! [`files`] holds the path rules, the race-free resolver and the handle
//! table of file transfer. [`server`] starts the transports and stops
//! cleanly on SIGTERM (or, as a Windows service, on the SCM's stop:
//! [`service`]);
//! [`config`] reads and validates the configuration file.

pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connection;
pub mod context;
pub mod dispatch;
pub mod files;
pub mod handlers;
pub mod logging;
pub mod platform;
pub mod policy;
pub mod qga;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod transport;

/// The agent's version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
