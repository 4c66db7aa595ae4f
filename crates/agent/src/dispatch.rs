//! From a decoded request to its result: method lookup, the policy check
//! (once, here, for every method), then one `match` that calls the handler.

use kvm_agent_protocol::attachment::Attachment;
use kvm_agent_protocol::auth::ResponseSigner;
use kvm_agent_protocol::jsonrpc::{Id, Request};
use kvm_agent_protocol::methods::files::Access;
use kvm_agent_protocol::methods::power::PowerAccepted;
use kvm_agent_protocol::methods::{self, Call, CallError, Method};
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::audit::{self, Decision, Origin, PendingAudit};
use crate::auth::Refused;
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
    /// A privileged call while the audit trail cannot be written.
    #[error("{0} refused: the audit trail cannot be written")]
    AuditUnavailable(MethodName),
    /// `get_info` failed.
    #[error(transparent)]
    Info(#[from] handlers::info::InfoError),
    /// `get_metrics` failed.
    #[error(transparent)]
    Metrics(#[from] handlers::metrics::MetricsError),
    /// `get_users` failed.
    #[error(transparent)]
    Users(#[from] handlers::users::UsersError),
    /// An exec method failed.
    #[error(transparent)]
    Exec(#[from] handlers::exec::ExecError),
    /// `shutdown` or `reboot` refused.
    #[error(transparent)]
    Power(#[from] handlers::power::PowerError),
    /// A file method failed.
    #[error(transparent)]
    Files(#[from] crate::files::FileError),
    /// Part of the protocol, but this agent has no handler for it yet.
    #[error("{0} is not implemented by this agent yet")]
    NotImplemented(MethodName),
    /// An attachment where none may be: with a method other than
    /// `file_write`, or on an authenticated request (a MAC does not cover
    /// attachments).
    #[error("{method}: {reason}")]
    Attachment {
        /// The method.
        method: String,
        /// Why the attachment is refused.
        reason: &'static str,
    },
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
            DispatchError::Exec(e) => e.into(),
            DispatchError::Power(e) => e.into(),
            DispatchError::Files(e) => e.into(),
            DispatchError::AuditUnavailable(m) => ErrorObject::with_message(
                ErrorCode::Denied,
                "Denied: the audit trail cannot be written",
            )
            .data(json!({
                "method": m.as_str(),
                "config_key": "audit.require_for_privileged",
                "reason": "audit unavailable",
            })),
            DispatchError::NotImplemented(m) => {
                ErrorObject::new(ErrorCode::NotImplemented).data(json!({ "method": m.as_str() }))
            }
            DispatchError::Attachment { method, reason } => ErrorObject::with_message(
                ErrorCode::InvalidParams,
                format!("Invalid params: {reason}"),
            )
            .data(json!({ "method": method, "reason": reason })),
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

/// A call's result, and the bytes that follow it in the response frame as
/// its attachment (`file_read` with `attachment`; see
/// [`kvm_agent_protocol::attachment`]).
#[derive(Debug)]
pub struct Reply {
    /// The result's JSON.
    pub result: Box<RawValue>,
    /// Bytes sent after the result.
    pub attachment: Option<Vec<u8>>,
}

impl From<Box<RawValue>> for Reply {
    fn from(result: Box<RawValue>) -> Self {
        Self {
            result,
            attachment: None,
        }
    }
}

/// Why an attachment cannot go with this request, if it cannot: only
/// `file_write` takes one, and only unauthenticated (an authentication code
/// covers the JSON text alone).
fn attachment_refused(call: &Call, authenticated: bool) -> Option<&'static str> {
    match call {
        Call::FileWrite(_) if authenticated => {
            Some("attachments are not covered by authentication: send data_base64")
        }
        Call::FileWrite(_) => None,
        _ => Some("only file_write takes an attachment"),
    }
}

/// Decode a request into a typed call and check it against the policy.
pub fn prepare(
    ctx: &Context,
    method: &str,
    params: Option<&RawValue>,
) -> Result<Call, DispatchError> {
    let call = Call::decode(method, params)?;
    ctx.policy.check(&call)?;
    Ok(call)
}

/// A request that passed decoding and the policy, with its audit record
/// open. It either runs ([`Admitted::run`]) or is refused for want of a slot
/// ([`Admitted::refuse_busy`]); either way its record is written once.
#[derive(Debug)]
pub struct Admitted {
    /// The request id (`None` for a notification).
    pub id: Option<Id>,
    /// The typed call.
    pub call: Call,
    /// Signs the response when the request was authenticated (`None`:
    /// authentication is off). Take it before [`Admitted::run`].
    pub signer: Option<ResponseSigner>,
    /// For calls that act after answering (`shutdown`, `reboot`): the
    /// connection takes it before [`Admitted::run`] and fires it once the
    /// response is written to the transport (dropping it says there is no
    /// response to wait for).
    pub reply_written: Option<ReplyWritten>,
    audit: PendingAudit,
    written: Option<oneshot::Receiver<()>>,
}

/// Tells a call that acts after answering that its response has been
/// written (see [`Admitted::reply_written`]).
#[derive(Debug)]
pub struct ReplyWritten(oneshot::Sender<()>);

impl ReplyWritten {
    /// The response has been written and flushed.
    pub fn done(self) {
        let _ = self.0.send(());
    }
}

/// A request that will not run, with the reply it earns.
#[derive(Debug)]
pub struct Refusal {
    /// The id to answer (`None`: a notification, no answer).
    pub id: Option<Id>,
    /// The error.
    pub error: ErrorObject,
    /// Signs the reply when the request was authenticated; `None` when
    /// authentication is off or failed (-32008 replies are never signed).
    pub signer: Option<ResponseSigner>,
}

/// The one gate every request passes: open the request's audit record,
/// authenticate the request (when a key is configured) before anything else
/// is looked at, decode the method and params, check the policy, and refuse
/// privileged calls while the audit trail is down.
pub fn admit(ctx: &Context, origin: &Origin, req: Request) -> Result<Admitted, Refusal> {
    let audit = PendingAudit::open(
        ctx.auditor.clone(),
        origin,
        Some(&req.method),
        req.id.as_ref(),
    );
    let signer = match ctx.auth.check(&req) {
        Ok(signer) => signer,
        Err(refused) => {
            let error = refused.error();
            log::info!("{origin:?}: {}: {}", req.method, error.message);
            let (decision, signer) = match refused {
                Refused::Failed(_) => (Decision::Unauthenticated, None),
                Refused::CacheFull(signer) => (Decision::Busy, Some(signer)),
            };
            audit.refuse(decision, &error);
            return Err(Refusal {
                id: req.id,
                error,
                signer,
            });
        }
    };
    let Request {
        id,
        method,
        params,
        attachment,
        ..
    } = req;
    let decoded = Call::decode(&method, params.as_deref())
        .map_err(DispatchError::from)
        .and_then(|call| attach(call, attachment, signer.is_some()));
    admit_call(ctx, origin, audit, id, signer, decoded)
}

/// Give a decoded call its request's attachment, where one may go (see
/// [`attachment_refused`]); a `file_read` asking for an attachment must not
/// be authenticated either.
fn attach(
    mut call: Call,
    attachment: Option<Attachment>,
    authenticated: bool,
) -> Result<Call, DispatchError> {
    let refused = |call: &Call, reason| DispatchError::Attachment {
        method: call.method().as_str().to_owned(),
        reason,
    };
    if let Some(bytes) = attachment {
        if let Some(reason) = attachment_refused(&call, authenticated) {
            return Err(refused(&call, reason));
        }
        if let Call::FileWrite(p) = &mut call {
            p.attachment = Some(bytes);
        }
    }
    if matches!(&call, Call::FileRead(p) if p.attachment && authenticated) {
        let reason = "attachments are not covered by authentication: read without attachment";
        return Err(refused(&call, reason));
    }
    Ok(call)
}

/// The part of the gate every front end shares (this protocol's
/// [`admit`], and the qemu-guest-agent front end, [`crate::qga`]): given a
/// request's open audit record and its call (or why it could not be
/// decoded), check the policy, refuse privileged calls while the audit
/// trail is down, and record any refusal. Native requests reach it after
/// authentication.
pub fn admit_call(
    ctx: &Context,
    origin: &Origin,
    audit: PendingAudit,
    id: Option<Id>,
    signer: Option<ResponseSigner>,
    decoded: Result<Call, DispatchError>,
) -> Result<Admitted, Refusal> {
    let refuse = |audit: PendingAudit, decision: Decision, e: &DispatchError| {
        log::debug!("{origin:?}: {e}");
        let error = ErrorObject::from(e);
        audit.refuse(decision, &error);
        Refusal {
            id: id.clone(),
            error,
            signer: signer.clone(),
        }
    };
    let checked = decoded.and_then(|call| match ctx.policy.check(&call) {
        Ok(()) => Ok(call),
        Err(e) => Err(DispatchError::Denied(e)),
    });
    let call = match checked {
        Ok(call) => call,
        Err(e) => {
            let mut audit = audit;
            if let DispatchError::Denied(p) = &e {
                if let Some(argv) = p.argv() {
                    audit.detail("argv", argv);
                }
                if let Some((path, reason)) = p.path_refusal() {
                    audit.detail("path", path);
                    audit.detail("reason", reason.as_str());
                }
            }
            let decision = match e {
                DispatchError::Denied(_) => Decision::Denied,
                _ => Decision::Invalid,
            };
            return Err(refuse(audit, decision, &e));
        }
    };
    if is_privileged(&call) && !ctx.auditor.permits_privileged() {
        return Err(refuse(
            audit,
            Decision::Denied,
            &DispatchError::AuditUnavailable(call.method()),
        ));
    }
    let (reply_written, written) = match call {
        Call::Shutdown(_) | Call::Reboot(_) => {
            let (tx, rx) = oneshot::channel();
            (Some(ReplyWritten(tx)), Some(rx))
        }
        _ => (None, None),
    };
    Ok(Admitted {
        id,
        call,
        signer,
        reply_written,
        audit,
        written,
    })
}

/// For a front end whose requests can be malformed in ways this protocol's
/// decoder never sees (the qemu-guest-agent front end's arguments): refuse
/// a request for `method` whose arguments do not decode. A method the
/// policy disables is refused as denied first (as qemu-ga checks whether a
/// command is enabled before its arguments); either way the refusal is
/// recorded once.
pub fn refuse_undecodable(
    ctx: &Context,
    audit: PendingAudit,
    method: MethodName,
    error: ErrorObject,
) -> ErrorObject {
    match ctx.policy.check_method(method) {
        Err(p) => {
            let error = ErrorObject::from(&p);
            audit.refuse(Decision::Denied, &error);
            error
        }
        Ok(()) => {
            audit.refuse(Decision::Invalid, &error);
            error
        }
    }
}

/// Record a request that failed before it could be admitted (a frame that is
/// not a valid request), with the error it is answered with.
pub fn reject(ctx: &Context, origin: &Origin, id: Option<&Id>, error: &ErrorObject) {
    audit::refused(&ctx.auditor, origin, None, id, Decision::Invalid, error);
}

/// Calls that change the guest: refused while the audit trail is down.
pub fn is_privileged(call: &Call) -> bool {
    match call {
        Call::Shutdown(_)
        | Call::Reboot(_)
        | Call::Exec(_)
        | Call::ExecStart(_)
        | Call::ExecKill(_)
        | Call::CopyToGuest(_)
        | Call::FileWrite(_) => true,
        // Opening for writing creates a temporary file; closing a write
        // handle commits it (closing a read handle is refused too while the
        // trail is down: it expires on its own).
        Call::FileOpen(p) => p.access == Access::Write,
        Call::FileClose(_) => true,
        _ => false,
    }
}

impl Admitted {
    /// How this call is run.
    pub fn route(&self) -> Route {
        route(&self.call)
    }

    /// No slot was free: record it and answer with `error`.
    pub fn refuse_busy(self, error: ErrorObject) -> Refusal {
        self.refuse(Decision::Busy, error)
    }

    /// Whether the response will carry an attachment (which a batch's
    /// array cannot hold).
    pub fn wants_attachment(&self) -> bool {
        matches!(&self.call, Call::FileRead(p) if p.attachment)
    }

    /// The call will not run after all: record `decision` and answer with
    /// `error`.
    pub fn refuse(self, decision: Decision, error: ErrorObject) -> Refusal {
        self.audit.refuse(decision, &error);
        Refusal {
            id: self.id,
            error,
            signer: self.signer,
        }
    }

    /// For another front end's command that needs this call's admission
    /// but computes its answer itself (the qemu-guest-agent front end's
    /// `guest-get-vcpus`, say, admitted as `get_metrics`): run `work` in
    /// place of the handler and record its outcome as [`Admitted::run`]
    /// would.
    pub async fn run_instead<T>(
        self,
        work: impl std::future::Future<Output = Result<T, ErrorObject>>,
    ) -> Result<T, ErrorObject> {
        let result = work.await;
        self.audit.finish(result.as_ref().map(|_| ()));
        result
    }

    /// Run the call and record its outcome. Returns the id and the result.
    pub async fn run(self, ctx: &Context) -> (Option<Id>, Result<Reply, ErrorObject>) {
        let Admitted {
            id,
            call,
            mut audit,
            written,
            ..
        } = self;
        let method = call.method();
        let message = match &call {
            Call::Shutdown(p) | Call::Reboot(p) => p.message.clone(),
            _ => None,
        };
        let result = execute(ctx, call, &mut audit).await.map_err(|e| {
            log::debug!("{method}: {e}");
            ErrorObject::from(&e)
        });
        // The record is written before anything acts.
        audit.finish(result.as_ref().map(|_| ()));
        if let (Ok(raw), Some(written)) = (&result, written) {
            // Only shutdown and reboot carry `written`; their result says
            // what was accepted.
            if let Ok(accepted) = serde_json::from_str::<PowerAccepted>(raw.result.get()) {
                handlers::power::schedule(&ctx.power, &accepted, message, written);
            }
        }
        (id, result)
    }
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
            | MethodName::FileClose
    )
}

/// Run a prepared call to its result. Handlers add their facts (paths,
/// sizes, hashes, exit codes) to the request's audit record.
pub async fn execute(
    ctx: &Context,
    call: Call,
    audit: &mut PendingAudit,
) -> Result<Reply, DispatchError> {
    use handlers::exec;
    use handlers::files;
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
        Call::CopyToGuest(p) => {
            encode::<methods::CopyToGuestMethod>(files::copy_to_guest(ctx, p, audit).await?)
        }
        Call::CopyFromGuest(p) => Ok(files::copy_from_guest(ctx, p, audit).await?.into()),
        Call::FileOpen(p) => encode::<methods::FileOpenMethod>(files::open(ctx, p, audit).await?),
        Call::FileRead(p) => Ok(files::read(ctx, p, audit).await?),
        Call::FileWrite(p) => {
            encode::<methods::FileWriteMethod>(files::write(ctx, p, audit).await?)
        }
        Call::FileClose(p) => {
            encode::<methods::FileCloseMethod>(files::close(ctx, p, audit).await?)
        }
        Call::Shutdown(p) => encode::<methods::ShutdownMethod>(handlers::power::request(
            MethodName::Shutdown,
            &p,
            audit,
        )?),
        Call::Reboot(p) => encode::<methods::RebootMethod>(handlers::power::request(
            MethodName::Reboot,
            &p,
            audit,
        )?),
        Call::Exec(p) => encode::<methods::ExecMethod>(exec::exec(ctx, p, audit).await?),
        Call::ExecStart(p) => {
            encode::<methods::ExecStartMethod>(exec::start_job(ctx, p, audit).await?)
        }
        Call::ExecStatus(p) => encode::<methods::ExecStatusMethod>(exec::status(ctx, p, audit)?),
        Call::ExecKill(p) => encode::<methods::ExecKillMethod>(exec::kill(ctx, p, audit)?),
    }
}

fn encode<M: Method>(result: M::Result) -> Result<Reply, DispatchError> {
    serde_json::value::to_raw_value(&result)
        .map(Reply::from)
        .map_err(|e| DispatchError::Encode {
            method: M::ID,
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::Memory;
    use crate::config::Config;

    fn ctx(config: &str) -> std::sync::Arc<Context> {
        ctx_with_trail(config).0
    }

    fn ctx_with_trail(config: &str) -> (std::sync::Arc<Context>, Memory) {
        let (_ctl, shutdown) = crate::shutdown::channel();
        let trail = Memory::default();
        let auditor = std::sync::Arc::new(crate::audit::Auditor::new(
            vec![Box::new(trail.clone())],
            true,
        ));
        let config = Config::parse(config, "t.toml".as_ref()).unwrap();
        (Context::with_auditor(config, shutdown, auditor), trail)
    }

    fn request(text: &str) -> Request {
        match kvm_agent_protocol::jsonrpc::parse_frame(text.as_bytes(), 16) {
            kvm_agent_protocol::jsonrpc::Incoming::Single(Ok(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_admitted_or_refused_request_leaves_one_record() {
        let (ctx, trail) = ctx_with_trail("");
        let origin = Origin::new(&crate::transport::Peer::Unix {
            pid: Some(9),
            uid: Some(0),
        });
        block_on(async {
            let ok = admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            )
            .unwrap();
            let (_, result) = ok.run(&ctx).await;
            assert!(result.is_ok());
            let r = admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","id":2,"method":"exec","params":{"command":"id"}}"#),
            )
            .unwrap_err();
            assert_eq!(r.error.kind(), Some(ErrorCode::Denied));
            let r = admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","id":3,"method":"nope"}"#),
            )
            .unwrap_err();
            assert_eq!(r.error.kind(), Some(ErrorCode::MethodNotFound));
            let busy = admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","id":4,"method":"get_users"}"#),
            )
            .unwrap();
            let r = busy.refuse_busy(ErrorObject::new(ErrorCode::Busy));
            assert_eq!(r.id, Some(Id::from(4)));
            let abandoned = admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","method":"get_capabilities"}"#),
            )
            .unwrap();
            drop(abandoned);
            reject(
                &ctx,
                &origin,
                Some(&Id::Null),
                &ErrorObject::new(ErrorCode::ParseError),
            );
        });
        let recs = trail.0.lock().unwrap();
        let summary: Vec<(Option<&str>, Decision, &str)> = recs
            .iter()
            .map(|r| (r.method.as_deref(), r.decision.clone(), r.outcome.as_str()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("ping"), Decision::Allowed, "ok"),
                (Some("exec"), Decision::Denied, "denied"),
                (Some("nope"), Decision::Invalid, "method_not_found"),
                (Some("get_users"), Decision::Busy, "busy"),
                (Some("get_capabilities"), Decision::Allowed, "cancelled"),
                (None, Decision::Invalid, "parse_error"),
            ]
        );
        assert!(recs
            .iter()
            .all(|r| r.peer == "unix pid 9 uid 0" && r.transport == "unix"));
        assert_eq!(recs[4].id, None, "a notification has no id");
    }

    #[test]
    fn authentication_comes_first_and_refusals_are_recorded_unauthenticated() {
        use kvm_agent_protocol::auth::{self, Key};
        let (_ctl, shutdown) = crate::shutdown::channel();
        let trail = Memory::default();
        let auditor = std::sync::Arc::new(crate::audit::Auditor::new(
            vec![Box::new(trail.clone())],
            true,
        ));
        let key = Key::from_bytes(&[7u8; 32]).unwrap();
        let ctx = Context::with_auditor_and_auth(
            Config::default(),
            shutdown,
            auditor,
            crate::auth::Authenticator::with_keys(vec![key.clone()], 300),
        );
        let origin = Origin::new(&crate::transport::Peer::Unix {
            pid: None,
            uid: None,
        });
        let signed = |id: u64, method: &str, nonce: u8| {
            let mut out = Vec::new();
            auth::write_signed_request::<serde_json::Value>(
                &mut out,
                &key,
                Some(&Id::from(id)),
                method,
                None,
                crate::auth::now_ms(),
                &[nonce; 16],
            )
            .unwrap();
            request(std::str::from_utf8(&out).unwrap())
        };
        // Unknown method without auth: -32008, not -32601.
        let r = admit(
            &ctx,
            &origin,
            request(r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#),
        )
        .unwrap_err();
        assert_eq!(r.error.kind(), Some(ErrorCode::AuthenticationFailed));
        assert_eq!(r.error.data.as_ref().unwrap()["reason"], "missing");
        assert!(r.signer.is_none(), "-32008 is never signed");
        // Authenticated: past the gate, to -32601, signed.
        let r = admit(&ctx, &origin, signed(2, "nope", 1)).unwrap_err();
        assert_eq!(r.error.kind(), Some(ErrorCode::MethodNotFound));
        assert!(r.signer.is_some());
        let ok = admit(&ctx, &origin, signed(3, "ping", 2)).unwrap();
        assert!(ok.signer.is_some());
        drop(ok);
        let r = admit(&ctx, &origin, signed(3, "ping", 2)).unwrap_err();
        assert_eq!(r.error.data.as_ref().unwrap()["reason"], "replayed");
        let recs = trail.0.lock().unwrap();
        let decisions: Vec<Decision> = recs.iter().map(|r| r.decision.clone()).collect();
        assert_eq!(
            decisions,
            [
                Decision::Unauthenticated,
                Decision::Invalid,
                Decision::Allowed,
                Decision::Unauthenticated
            ]
        );
        assert_eq!(recs[0].outcome, "authentication_failed");
        assert_eq!(recs[0].method.as_deref(), Some("nope"));
    }

    // exec of a Unix command; on Windows exec is refused by its trust check.
    #[cfg(unix)]
    #[test]
    fn privileged_calls_are_refused_while_the_trail_is_down() {
        let (ctx, trail) =
            ctx_with_trail("[security]\nenable_exec = true\nallowed_commands = [\"true\"]\n");
        let origin = Origin::new(&crate::transport::Peer::Unix {
            pid: None,
            uid: None,
        });
        trail.1.store(true, std::sync::atomic::Ordering::Relaxed);
        // The failed write of this record marks the trail down.
        drop(
            admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            )
            .unwrap(),
        );
        let r = admit(
            &ctx,
            &origin,
            request(r#"{"jsonrpc":"2.0","id":2,"method":"exec","params":{"command":"true"}}"#),
        )
        .unwrap_err();
        assert_eq!(r.error.kind(), Some(ErrorCode::Denied));
        assert_eq!(
            r.error.data.as_ref().unwrap()["reason"],
            "audit unavailable"
        );
        // Reading is still allowed.
        assert!(admit(
            &ctx,
            &origin,
            request(r#"{"jsonrpc":"2.0","id":3,"method":"get_capabilities"}"#)
        )
        .is_ok());
        trail.1.store(false, std::sync::atomic::Ordering::Relaxed);
        drop(
            admit(
                &ctx,
                &origin,
                request(r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#),
            )
            .unwrap(),
        );
        assert!(admit(
            &ctx,
            &origin,
            request(r#"{"jsonrpc":"2.0","id":5,"method":"exec","params":{"command":"true"}}"#)
        )
        .is_ok());
    }

    async fn run(ctx: &Context, method: &str, params: Option<&str>) -> Result<String, ErrorObject> {
        let raw = params.map(|p| RawValue::from_string(p.to_owned()).unwrap());
        let call = prepare(ctx, method, raw.as_deref()).map_err(|e| ErrorObject::from(&e))?;
        let origin = Origin::new(&crate::transport::Peer::Unix {
            pid: None,
            uid: None,
        });
        let mut audit = PendingAudit::open(ctx.auditor.clone(), &origin, Some(method), None);
        execute(ctx, call, &mut audit)
            .await
            .map(|r| r.result.get().to_owned())
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
            let outside = if cfg!(windows) {
                r#"{"path":"C:\\Windows\\System32\\config\\SAM"}"#
            } else {
                r#"{"path":"/etc/shadow"}"#
            };
            let e = run(&ctx, "copy_from_guest", Some(outside))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), Some(ErrorCode::Denied));
            assert_eq!(e.data.unwrap()["reason"], "outside_allowed");
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
                    "get_users",
                    "shutdown",
                    "reboot",
                    "copy_to_guest",
                    "copy_from_guest",
                    "file_open",
                    "file_read",
                    "file_write",
                    "file_close"
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
