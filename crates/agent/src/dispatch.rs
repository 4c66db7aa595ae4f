//! From a decoded request to its result: method lookup, the policy check
//! (once, here, for every method), then one `match` that calls the handler.

use kvm_agent_protocol::methods::{self, Method};
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde_json::value::RawValue;

use crate::context::Context;
use crate::handlers;
use crate::policy::PolicyError;

/// Why a request produced no result.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No method by that name.
    #[error("no method named {0:?}")]
    MethodNotFound(String),
    /// The params do not fit the method.
    #[error("invalid params for {method}: {detail}")]
    InvalidParams {
        /// The method.
        method: MethodName,
        /// What is wrong, naming the member when there is one.
        detail: String,
    },
    /// The policy refuses the method.
    #[error(transparent)]
    Denied(#[from] PolicyError),
    /// Part of the protocol, but this agent has no handler for it yet.
    #[error("{0} is not implemented by this agent yet")]
    NotImplemented(MethodName),
    /// The result could not be encoded (a bug).
    #[error("cannot encode the result of {method}: {detail}")]
    Encode {
        /// The method.
        method: MethodName,
        /// serde's message.
        detail: String,
    },
}

impl From<&DispatchError> for ErrorObject {
    fn from(e: &DispatchError) -> Self {
        use serde_json::json;
        match e {
            DispatchError::MethodNotFound(name) => {
                ErrorObject::new(ErrorCode::MethodNotFound).data(json!({ "method": name }))
            }
            DispatchError::InvalidParams { method, detail } => ErrorObject::with_message(
                ErrorCode::InvalidParams,
                format!("Invalid params: {detail}"),
            )
            .data(json!({ "method": method.as_str(), "detail": detail })),
            DispatchError::Denied(p) => p.into(),
            DispatchError::NotImplemented(m) => ErrorObject::with_message(
                ErrorCode::NotImplemented,
                format!("Not implemented: {m} has no handler in this agent version"),
            )
            .data(json!({ "method": m.as_str() })),
            DispatchError::Encode { method, .. } => ErrorObject::new(ErrorCode::InternalError)
                .data(json!({ "method": method.as_str() })),
        }
    }
}

/// How a method is run by the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Cheap and non-blocking: answered in line, never waits for a slot.
    Inline,
    /// Run as a task holding a request slot.
    Task,
}

/// How `method` is run. Unknown methods are answered in line.
pub fn route(method: Option<MethodName>) -> Route {
    match method {
        None | Some(MethodName::Ping) | Some(MethodName::GetCapabilities) => Route::Inline,
        Some(_) => Route::Task,
    }
}

/// Whether this agent has a handler for `method` (else it answers
/// `not_implemented`). Must agree with the `match` in [`execute`]; a test
/// checks it.
pub fn is_implemented(method: MethodName) -> bool {
    matches!(method, MethodName::Ping | MethodName::GetCapabilities)
}

/// Run one request to its result.
pub async fn execute(
    ctx: &Context,
    method: &str,
    params: Option<&RawValue>,
) -> Result<Box<RawValue>, DispatchError> {
    let method = MethodName::from_name(method)
        .ok_or_else(|| DispatchError::MethodNotFound(method.to_owned()))?;
    ctx.policy.check(method)?;
    match method {
        MethodName::Ping => encode::<methods::PingMethod>(handlers::ping::ping(decode::<
            methods::PingMethod,
        >(params)?)),
        MethodName::GetCapabilities => encode::<methods::GetCapabilitiesMethod>(
            handlers::capabilities::get(ctx, decode::<methods::GetCapabilitiesMethod>(params)?),
        ),
        MethodName::GetInfo
        | MethodName::GetMetrics
        | MethodName::GetUsers
        | MethodName::Shutdown
        | MethodName::Reboot
        | MethodName::Exec
        | MethodName::ExecStart
        | MethodName::ExecStatus
        | MethodName::ExecKill
        | MethodName::CopyToGuest
        | MethodName::CopyFromGuest
        | MethodName::FileOpen
        | MethodName::FileRead
        | MethodName::FileWrite
        | MethodName::FileClose => Err(DispatchError::NotImplemented(method)),
    }
}

/// Decode params for `M`: absent and `[]` mean "no params", other arrays are
/// refused (params are by name), unknown members are refused by the types.
fn decode<M: Method>(params: Option<&RawValue>) -> Result<M::Params, DispatchError> {
    let invalid = |detail: String| DispatchError::InvalidParams {
        method: M::ID,
        detail,
    };
    let text = match params {
        None => "{}",
        Some(p) if p.get().starts_with('[') => {
            match serde_json::from_str::<Vec<serde::de::IgnoredAny>>(p.get()) {
                Ok(items) if items.is_empty() => "{}",
                _ => {
                    return Err(invalid(
                        "params must be an object (by name), not an array".into(),
                    ))
                }
            }
        }
        Some(p) => p.get(),
    };
    serde_json::from_str(text).map_err(|e| invalid(e.to_string()))
}

fn encode<M: Method>(result: M::Result) -> Result<Box<RawValue>, DispatchError> {
    serde_json::value::to_raw_value(&result).map_err(|e| DispatchError::Encode {
        method: M::ID,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn ctx(config: &str) -> std::sync::Arc<Context> {
        let (_ctl, shutdown) = crate::shutdown::channel();
        Context::new(Config::parse(config, "t.toml".as_ref()).unwrap(), shutdown)
    }

    async fn run(ctx: &Context, method: &str, params: Option<&str>) -> Result<String, ErrorObject> {
        let raw = params.map(|p| RawValue::from_string(p.to_owned()).unwrap());
        execute(ctx, method, raw.as_deref())
            .await
            .map(|r| r.get().to_owned())
            .map_err(|e| ErrorObject::from(&e))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn is_implemented_agrees_with_the_match() {
        let ctx = ctx("[security]\nenable_exec = true\n");
        block_on(async {
            for m in MethodName::ALL {
                let r = run(&ctx, m.as_str(), None).await;
                let not_impl = matches!(&r, Err(e) if e.kind() == Some(ErrorCode::NotImplemented));
                assert_eq!(is_implemented(*m), !not_impl, "{m}: {r:?}");
            }
        });
    }

    #[test]
    fn params_rules() {
        let ctx = ctx("");
        block_on(async {
            assert_eq!(run(&ctx, "ping", None).await.unwrap(), "{}");
            assert_eq!(run(&ctx, "ping", Some("{}")).await.unwrap(), "{}");
            assert_eq!(run(&ctx, "ping", Some("[ ]")).await.unwrap(), "{}");
            let e = run(&ctx, "ping", Some("[1]")).await.unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::InvalidParams));
            let e = run(&ctx, "ping", Some(r#"{"confrim":true}"#))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::InvalidParams));
            assert!(e.message.contains("confrim"), "{}", e.message);
        });
    }

    #[test]
    fn unknown_denied_and_not_implemented_are_told_apart() {
        let ctx = ctx("[security]\ndisabled_methods = [\"get_info\"]\n");
        block_on(async {
            let e = run(&ctx, "guest-ping", None).await.unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::MethodNotFound));
            let e = run(&ctx, "get_info", None).await.unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::Denied));
            let e = run(&ctx, "exec", Some(r#"{"command":"true"}"#))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::Denied), "exec is off by default");
            let e = run(&ctx, "get_metrics", None).await.unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::NotImplemented));
            assert_eq!(e.data.unwrap()["method"], "get_metrics");
        });
    }

    #[test]
    fn capabilities_list_what_policy_and_handlers_allow() {
        let ctx = ctx("");
        block_on(async {
            let caps: serde_json::Value =
                serde_json::from_str(&run(&ctx, "get_capabilities", None).await.unwrap()).unwrap();
            assert_eq!(
                caps["methods"],
                serde_json::json!(["ping", "get_capabilities"])
            );
            assert_eq!(caps["limits"]["max_frame_bytes"], 16 * 1024 * 1024);
            assert_eq!(
                caps["protocol_version"],
                kvm_agent_protocol::PROTOCOL_VERSION
            );
        });
        let ctx = super::tests::ctx("[security]\ndisabled_methods = [\"get_capabilities\"]\n");
        block_on(async {
            let e = run(&ctx, "get_capabilities", None).await.unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::Denied));
        });
    }
}
