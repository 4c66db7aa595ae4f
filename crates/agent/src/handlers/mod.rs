//! One module per method group. Handlers receive typed params that already
//! passed the policy check, and return typed results or their module's error.
//!
//! | method                                  | module              |
//! |-----------------------------------------|---------------------|
//! | `ping`                                  | [`ping`]            |
//! | `get_capabilities`                      | [`capabilities`]    |
//! | `get_info`                              | [`info`]            |
//! | `get_metrics`                           | [`metrics`]         |
//! | `get_users`                             | [`users`]           |
//! | `exec`, `exec_start`, `exec_status`, `exec_kill` | [`exec`]   |
//! | `shutdown`, `reboot`                    | [`power`]           |
//! | `copy_to_guest`, `copy_from_guest`, `file_open`, `file_read`, `file_write`, `file_close` | [`files`] |
//!
//! The other methods of the protocol have no handler yet; the dispatcher
//! answers them with `not_implemented`.

pub mod capabilities;
pub mod exec;
pub mod files;
pub mod info;
pub mod metrics;
pub mod ping;
pub mod power;
pub mod users;
