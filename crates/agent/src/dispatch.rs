//! From a decoded request to its result: method lookup, the policy check
//! (once, here, for every method), then one `match` that calls the handler.

use kvm_agent_protocol::methods::{self, Call, CallError, Method};
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde_json::value::RawValue;

use crate::context::Context;
use crate::handlers;
use crate::policy::PolicyError;

/// Why a request produced no result.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// Unknown method, or params that do not fit it.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The policy refuses the request.
    #[error(transparent)]
    Denied(#[from] PolicyError),
    /// `get_info` failed.
    #[error(transparent)]
    Info(#[from] handlers::info::InfoError),
    /// `get_metrics` failed.
    #[error(transparent)]
    Metrics(#[from] handlers::metrics::MetricsError),
    /// `get_users` failed.
    #[error(transparent)]
    Users(#[from] handlers::users::UsersError),
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
            DispatchError::Call(c) => c.into(),
            DispatchError::Denied(p) => p.into(),
            DispatchError::Info(e) => e.into(),
            DispatchError::Metrics(e) => e.into(),
            DispatchError::Users(e) => e.into(),
            DispatchError::NotImplemented(m) => {
                ErrorObject::new(ErrorCode::NotImplemented).data(json!({ "method": m.as_str() }))
            }
            DispatchError::Encode { method, .. } => ErrorObject::new(ErrorCode::InternalError)
                .data(json!({ "method": method.as_str() })),
        }
    }
}

/// How a call is run by the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Cheap and non-blocking: answered in line, never waits for a slot.
    Inline,
    /// Run as a task holding a request slot.
    Task,
}

/// How `call` is run.
pub fn route(call: &Call) -> Route {
    match call {
        Call::Ping(_) | Call::GetCapabilities(_) => Route::Inline,
        _ => Route::Task,
    }
}

/// Decode a request into a typed call and check it against the policy: the
/// one place every request passes before anything runs.
pub fn prepare(
    ctx: &Context,
    method: &str,
    params: Option<&RawValue>,
) -> Result<Call, DispatchError> {
    let call = Call::decode(method, params)?;
    ctx.policy.check(&call)?;
    Ok(call)
}

/// Whether this agent has a handler for `method` (else it answers
/// `not_implemented`). Must agree with the `match` in [`execute`]; a test
/// checks it.
pub fn is_implemented(method: MethodName) -> bool {
    matches!(
        method,
        MethodName::Ping
            | MethodName::GetCapabilities
            | MethodName::GetInfo
            | MethodName::GetMetrics
            | MethodName::GetUsers
    )
}

/// Run a prepared call to its result.
pub async fn execute(ctx: &Context, call: Call) -> Result<Box<RawValue>, DispatchError> {
    match call {
        Call::Ping(p) => encode::<methods::PingMethod>(handlers::ping::ping(p)),
        Call::GetCapabilities(p) => {
            encode::<methods::GetCapabilitiesMethod>(handlers::capabilities::get(ctx, p))
        }
        Call::GetInfo(p) => encode::<methods::GetInfoMethod>(handlers::info::get(ctx, p).await?),
        Call::GetMetrics(p) => {
            encode::<methods::GetMetricsMethod>(handlers::metrics::get(ctx, p).await?)
        }
        Call::GetUsers(p) => encode::<methods::GetUsersMethod>(handlers::users::get(ctx, p).await?),
        Call::Shutdown(_)
        | Call::Reboot(_)
        | Call::Exec(_)
        | Call::ExecStart(_)
        | Call::ExecStatus(_)
        | Call::ExecKill(_)
        | Call::CopyToGuest(_)
        | Call::CopyFromGuest(_)
        | Call::FileOpen(_)
        | Call::FileRead(_)
        | Call::FileWrite(_)
        | Call::FileClose(_) => Err(DispatchError::NotImplemented(call.method())),
    }
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
        let call = prepare(ctx, method, raw.as_deref()).map_err(|e| ErrorObject::from(&e))?;
        execute(ctx, call)
            .await
            .map(|r| r.get().to_owned())
            .map_err(|e| ErrorObject::from(&e))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn is_implemented_agrees_with_the_match() {
        let ctx = ctx("[security]\nenable_exec = true\n");
        block_on(async {
            for m in MethodName::ALL {
                let params = required_params(*m);
                let r = run(&ctx, m.as_str(), Some(params)).await;
                let not_impl = matches!(&r, Err(e) if e.kind() == Some(ErrorCode::NotImplemented));
                assert_eq!(is_implemented(*m), !not_impl, "{m}: {r:?}");
            }
        });
    }

    /// The smallest valid params of each method.
    fn required_params(m: MethodName) -> &'static str {
        match m {
            MethodName::Exec | MethodName::ExecStart => r#"{"command":"true"}"#,
            MethodName::ExecStatus | MethodName::ExecKill => r#"{"handle":1}"#,
            MethodName::CopyToGuest => r#"{"path":"/tmp/x","content_base64":""}"#,
            MethodName::CopyFromGuest => r#"{"path":"/tmp/x"}"#,
            MethodName::FileOpen => r#"{"path":"/tmp/x","access":"read"}"#,
            MethodName::FileRead => r#"{"handle":1,"offset":0,"length":1}"#,
            MethodName::FileWrite => r#"{"handle":1,"offset":0,"data_base64":""}"#,
            MethodName::FileClose => r#"{"handle":1}"#,
            _ => "{}",
        }
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
            // Params are checked before the policy: a denied method with bad
            // params is told about its params.
            let e = run(&ctx, "exec", Some("{}")).await.unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::InvalidParams));
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
            let e = run(&ctx, "copy_from_guest", Some(r#"{"path":"/tmp/x"}"#))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::NotImplemented));
            assert_eq!(e.data.unwrap()["method"], "copy_from_guest");
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
                serde_json::json!([
                    "ping",
                    "get_capabilities",
                    "get_info",
                    "get_metrics",
                    "get_users"
                ])
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
