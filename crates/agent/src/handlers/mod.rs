//! One module per method group. Handlers receive typed params that already
//! passed the policy check, and return typed results or their module's error.
//!
//! | method                                  | module              |
//! |-----------------------------------------|---------------------|
//! | `ping`                                  | [`ping`]            |
//! | `get_capabilities`                      | [`capabilities`]    |
//!
//! The other methods of the protocol have no handler yet; the dispatcher
//! answers them with `not_implemented`.

pub mod capabilities;
pub mod ping;
