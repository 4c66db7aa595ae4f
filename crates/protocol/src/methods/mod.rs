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
use serde_json::value::RawValue;

use crate::error::{ErrorCode, ErrorObject};

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

        /// A request decoded into its method and typed params: what the agent
        /// executes, with one `match`.
        #[derive(Debug, Clone)]
        pub enum Call {
            $( $(#[$doc])* $variant($params), )*
        }

        impl Call {
            /// The method called.
            pub fn method(&self) -> MethodName {
                match self { $( Call::$variant(_) => MethodName::$variant, )* }
            }

            /// Decode a request's method and params (see [`decode_params`]).
            pub fn decode(method: &str, params: Option<&RawValue>) -> Result<Call, CallError> {
                match MethodName::from_name(method) {
                    $( Some(MethodName::$variant) => decode_params::<$ty>(params).map(Call::$variant), )*
                    None => Err(CallError::UnknownMethod(method.to_owned())),
                }
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

/// Why a request's method and params do not make a [`Call`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No method by that name: -32601.
    #[error("no method named {0:?}")]
    UnknownMethod(String),
    /// The params do not fit the method: -32602.
    #[error("invalid params for {method}: {reason}")]
    InvalidParams {
        /// The method.
        method: MethodName,
        /// The first problem, naming the member when there is one.
        reason: String,
    },
}

impl From<&CallError> for ErrorObject {
    fn from(e: &CallError) -> Self {
        match e {
            CallError::UnknownMethod(name) => ErrorObject::new(ErrorCode::MethodNotFound)
                .data(serde_json::json!({ "method": name })),
            CallError::InvalidParams { method, reason } => ErrorObject::with_message(
                ErrorCode::InvalidParams,
                format!("Invalid params: {reason}"),
            )
            .data(serde_json::json!({ "method": method.as_str(), "reason": reason })),
        }
    }
}

/// `data.reason` when params are given by position.
pub const POSITIONAL_PARAMS_REASON: &str = "params must be given by name, as an object";

/// Decode params for `M`. Absent params and `[]` mean "no params"; other
/// arrays are refused (params are by name); unknown members are refused by
/// the params types. The reason names the first problem, without a position.
pub fn decode_params<M: Method>(params: Option<&RawValue>) -> Result<M::Params, CallError> {
    let invalid = |reason: String| CallError::InvalidParams {
        method: M::ID,
        reason,
    };
    let text = match params {
        None => "{}",
        Some(p) if p.get().starts_with('[') => {
            match serde_json::from_str::<Vec<serde::de::IgnoredAny>>(p.get()) {
                Ok(items) if items.is_empty() => "{}",
                _ => return Err(invalid(POSITIONAL_PARAMS_REASON.to_owned())),
            }
        }
        Some(p) => p.get(),
    };
    serde_json::from_str(text).map_err(|e| {
        let mut reason = e.to_string();
        if let Some(at) = reason.rfind(" at line ") {
            reason.truncate(at);
        }
        invalid(reason)
    })
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

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn calls_decode_with_typed_params() {
        let c = Call::decode("get_info", Some(&raw(r#"{"all_interfaces":true}"#))).unwrap();
        assert_eq!(c.method(), MethodName::GetInfo);
        assert!(matches!(c, Call::GetInfo(p) if p.all_interfaces));
        assert!(matches!(Call::decode("ping", None), Ok(Call::Ping(_))));
        assert!(matches!(
            Call::decode("ping", Some(&raw("[ ]"))),
            Ok(Call::Ping(_))
        ));
        for m in MethodName::ALL {
            // Every method decodes or names what is missing; none panics.
            let _ = Call::decode(m.as_str(), None);
        }
    }

    #[test]
    fn call_errors() {
        assert_eq!(
            Call::decode("guest-ping", None).unwrap_err(),
            CallError::UnknownMethod("guest-ping".into())
        );
        let e = Call::decode("get_info", Some(&raw("[true]"))).unwrap_err();
        assert_eq!(
            e,
            CallError::InvalidParams {
                method: MethodName::GetInfo,
                reason: POSITIONAL_PARAMS_REASON.into()
            }
        );
        let e = Call::decode("shutdown", Some(&raw(r#"{"confrim":true}"#))).unwrap_err();
        let CallError::InvalidParams { reason, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(reason.starts_with("unknown field `confrim`"), "{reason}");
        assert!(!reason.contains(" at line "), "{reason}");
        let wire = ErrorObject::from(&e);
        assert_eq!(wire.kind(), Some(ErrorCode::InvalidParams));
        assert_eq!(wire.data.unwrap()["method"], "shutdown");
        let e = Call::decode("exec", Some(&raw("{}"))).unwrap_err();
        assert!(e.to_string().contains("command"), "{e}");
    }
}
