//! The protocol's methods: their names, and for each one the params it takes
//! and the result it returns.
//!
//! Each method is a unit type implementing [`Method`], which pairs its params
//! type with its result type at compile time; the host client is typed through
//! it, and the agent's dispatcher decodes params with the same types.
//! Params reject unknown members, so a misspelt option (`"confrim"`) is an
//! `invalid params` error rather than silently ignored.

pub mod core;
pub mod exec;
pub mod files;
pub mod info;
pub mod power;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A protocol method: its wire name and its params and result types.
pub trait Method {
    /// The JSON-RPC method name.
    const NAME: &'static str;
    /// The method's id in the method table.
    const ID: MethodName;
    /// What the request's `params` holds.
    type Params: Serialize + DeserializeOwned;
    /// What a successful response's `result` holds.
    type Result: Serialize + DeserializeOwned;
}

macro_rules! methods {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal => $ty:ident ($params:ty) -> $result:ty; )*) => {
        /// Every method of the protocol.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum MethodName {
            $( $(#[$doc])* $variant, )*
        }

        impl MethodName {
            /// Every method, in the order of docs/protocol.md.
            pub const ALL: &'static [MethodName] = &[ $( MethodName::$variant, )* ];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self { $( MethodName::$variant => $name, )* }
            }

            /// The method with this wire name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $( $name => Some(MethodName::$variant), )* _ => None }
            }
        }

        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy)]
            pub struct $ty;
            impl Method for $ty {
                const NAME: &'static str = $name;
                const ID: MethodName = MethodName::$variant;
                type Params = $params;
                type Result = $result;
            }
        )*
    };
}

methods! {
    /// Liveness check; answers at once.
    Ping = "ping" => PingMethod (core::NoParams) -> core::Empty;
    /// Versions, OS family, the methods allowed by the current policy, limits.
    GetCapabilities = "get_capabilities" => GetCapabilitiesMethod (core::NoParams) -> core::Capabilities;
    /// OS, hostname, interfaces and addresses, boot id, uptime, timezone.
    GetInfo = "get_info" => GetInfoMethod (info::GetInfoParams) -> info::GuestInfo;
    /// CPU, memory, disk, network and filesystem figures.
    GetMetrics = "get_metrics" => GetMetricsMethod (info::GetMetricsParams) -> info::Metrics;
    /// Logged-in users.
    GetUsers = "get_users" => GetUsersMethod (core::NoParams) -> info::Users;
    /// Power the guest off.
    Shutdown = "shutdown" => ShutdownMethod (power::PowerParams) -> power::PowerAccepted;
    /// Restart the guest.
    Reboot = "reboot" => RebootMethod (power::PowerParams) -> power::PowerAccepted;
    /// Run an allowed command to completion.
    Exec = "exec" => ExecMethod (exec::ExecParams) -> exec::ExecResult;
    /// Start an allowed command and return a handle.
    ExecStart = "exec_start" => ExecStartMethod (exec::ExecStartParams) -> exec::ExecStarted;
    /// Read a started command's output and state.
    ExecStatus = "exec_status" => ExecStatusMethod (exec::ExecStatusParams) -> exec::ExecStatus;
    /// Send a signal to a started command.
    ExecKill = "exec_kill" => ExecKillMethod (exec::ExecKillParams) -> core::Empty;
    /// Write a whole file in one message.
    CopyToGuest = "copy_to_guest" => CopyToGuestMethod (files::CopyToGuestParams) -> files::FileCommitted;
    /// Read a whole file in one message.
    CopyFromGuest = "copy_from_guest" => CopyFromGuestMethod (files::CopyFromGuestParams) -> files::FileContent;
    /// Open a file for chunked reading or writing.
    FileOpen = "file_open" => FileOpenMethod (files::FileOpenParams) -> files::FileOpened;
    /// Read one chunk.
    FileRead = "file_read" => FileReadMethod (files::FileReadParams) -> files::FileChunk;
    /// Write one chunk.
    FileWrite = "file_write" => FileWriteMethod (files::FileWriteParams) -> files::FileWritten;
    /// Close a handle; for writes, verify and commit the file.
    FileClose = "file_close" => FileCloseMethod (files::FileCloseParams) -> files::FileClosed;
}

impl std::fmt::Display for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MethodName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        MethodName::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown method {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(MethodName::ALL.len(), 17);
        for m in MethodName::ALL {
            assert_eq!(MethodName::from_name(m.as_str()), Some(*m));
        }
        assert_eq!(MethodName::from_name("guest-ping"), None);
        assert_eq!(<PingMethod as Method>::NAME, "ping");
    }
}
