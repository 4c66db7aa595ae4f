//! QGA commands: the table of every qemu-ga command, and the one `match`
//! that maps a served command onto a native call, sends it through the
//! dispatcher's gate (policy and audit, [`dispatch::admit_call`]) and
//! shapes the result as QEMU's schema says.
//!
//! Each served command is admitted as the native method whose data or
//! action it uses, so `security.disabled_methods`, `enable_exec`,
//! `enable_file_copy`, the exec allowlist and the file path rules apply to
//! it unchanged: `guest-get-osinfo` is admitted as `get_info`,
//! `guest-get-fsinfo` as `get_metrics`, `guest-exec` as `exec_start`, and
//! so on ([`COMMANDS`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_agent_protocol::attachment::Attachment;
use kvm_agent_protocol::codec::base64_decode;
use kvm_agent_protocol::jsonrpc::Id;
use kvm_agent_protocol::methods::core::NoParams;
use kvm_agent_protocol::methods::exec::{Encoding, ExecStartParams, ExecStatusParams, Output};
use kvm_agent_protocol::methods::files::{
    Access, FileCloseParams, FileOpenParams, FileReadParams, FileWriteParams,
};
use kvm_agent_protocol::methods::info::{GetInfoParams, GetMetricsParams, GuestInfo, Users};
use kvm_agent_protocol::methods::power::PowerParams;
use kvm_agent_protocol::methods::{exec, files, Call};
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde::Serialize;
use serde_json::{Map, Value};

use super::schema::{self, arguments, Envelope, QgaError};
use super::State;
use crate::audit::{Decision, Origin, PendingAudit};
use crate::context::Context;
use crate::dispatch::{self, Admitted};

/// How a QGA command is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Mapped onto our handlers, admitted as this native method.
    As(MethodName),
    /// `guest-shutdown`: admitted as `shutdown` or `reboot` by mode.
    Power,
    /// Not offered by this agent: answered as a disabled command.
    No,
}

/// Every command of qemu-ga 10.0, in the order its `guest-info` lists
/// them, with how this agent serves it.
pub const COMMANDS: &[(&str, Served)] = {
    use MethodName as M;
    use Served::*;
    &[
        ("guest-sync-delimited", As(M::Ping)),
        ("guest-sync", As(M::Ping)),
        ("guest-ping", As(M::Ping)),
        ("guest-get-time", As(M::GetInfo)),
        ("guest-set-time", No),
        ("guest-info", As(M::GetCapabilities)),
        ("guest-shutdown", Power),
        ("guest-file-open", As(M::FileOpen)),
        ("guest-file-close", As(M::FileClose)),
        ("guest-file-read", As(M::FileRead)),
        ("guest-file-write", As(M::FileWrite)),
        ("guest-file-seek", As(M::FileRead)),
        ("guest-file-flush", As(M::FileWrite)),
        ("guest-fsfreeze-status", No),
        ("guest-fsfreeze-freeze", No),
        ("guest-fsfreeze-freeze-list", No),
        ("guest-fsfreeze-thaw", No),
        ("guest-fstrim", No),
        ("guest-suspend-disk", No),
        ("guest-suspend-ram", No),
        ("guest-suspend-hybrid", No),
        ("guest-network-get-interfaces", As(M::GetInfo)),
        ("guest-get-vcpus", As(M::GetMetrics)),
        ("guest-set-vcpus", No),
        ("guest-get-disks", As(M::GetMetrics)),
        ("guest-get-fsinfo", As(M::GetMetrics)),
        ("guest-set-user-password", No),
        ("guest-get-memory-blocks", No),
        ("guest-set-memory-blocks", No),
        ("guest-get-memory-block-info", No),
        ("guest-exec-status", As(M::ExecStatus)),
        ("guest-exec", As(M::ExecStart)),
        ("guest-get-host-name", As(M::GetInfo)),
        ("guest-get-users", As(M::GetUsers)),
        ("guest-get-timezone", As(M::GetInfo)),
        ("guest-get-osinfo", As(M::GetInfo)),
        ("guest-ssh-get-authorized-keys", No),
        ("guest-ssh-add-authorized-keys", No),
        ("guest-ssh-remove-authorized-keys", No),
        ("guest-get-diskstats", As(M::GetMetrics)),
        ("guest-get-cpustats", As(M::GetMetrics)),
        ("guest-get-load", As(M::GetMetrics)),
        ("guest-network-get-route", No),
    ]
};

/// How a command is served, if qemu-ga has it.
pub fn lookup(name: &str) -> Option<(&'static str, Served)> {
    COMMANDS.iter().copied().find(|(n, _)| *n == name)
}

/// Commands whose data only Linux sources give (else answered as disabled).
fn linux_only(name: &str) -> bool {
    matches!(
        name,
        "guest-get-vcpus"
            | "guest-get-disks"
            | "guest-get-fsinfo"
            | "guest-get-diskstats"
            | "guest-get-cpustats"
    )
}

/// Whether the command may be called now: served here and allowed by the
/// policy (what `guest-info` reports as `enabled`).
pub fn enabled(ctx: &Context, name: &str) -> bool {
    if linux_only(name) && !cfg!(target_os = "linux") {
        return false;
    }
    match lookup(name).map(|(_, s)| s) {
        Some(Served::As(m)) => ctx.policy.check_method(m).is_ok(),
        Some(Served::Power) => {
            ctx.policy.check_method(MethodName::Shutdown).is_ok()
                || ctx.policy.check_method(MethodName::Reboot).is_ok()
        }
        Some(Served::No) | None => false,
    }
}

/// What to send back for one message.
#[derive(Debug)]
pub enum Reply {
    /// `{"return": ...}`.
    Return(Value),
    /// `0xFF` then `{"return": ...}` (`guest-sync-delimited`).
    Delimited(Value),
    /// `{"error": ...}`.
    Error(QgaError),
    /// Nothing (`guest-shutdown` accepted).
    Nothing,
}

fn ret<T: Serialize>(v: T) -> Result<Value, QgaError> {
    serde_json::to_value(v).map_err(|e| QgaError::generic(format!("cannot encode the result: {e}")))
}

/// A native error as a QGA error: a refusal because the method is off
/// (disabled_methods, enable_exec, enable_file_copy) is answered as qemu-ga
/// answers a disabled command; anything else is a `GenericError` with the
/// native message.
pub fn to_qga(name: &str, e: &ErrorObject) -> QgaError {
    let disabling = e.kind() == Some(ErrorCode::Denied)
        && e.data
            .as_ref()
            .and_then(|d| d["config_key"].as_str())
            .is_some_and(|k| {
                matches!(
                    k,
                    "security.disabled_methods"
                        | "security.enable_exec"
                        | "security.enable_file_copy"
                )
            });
    if disabling {
        QgaError::disabled(name)
    } else {
        QgaError::generic(e.message.clone())
    }
}

/// Handle one message. Returns the reply and the id to echo.
pub async fn handle(
    ctx: &Arc<Context>,
    state: &State,
    origin: &Origin,
    message: &[u8],
) -> (Reply, Option<Value>) {
    let env = match schema::envelope(message) {
        Ok(env) => env,
        Err((error, id)) => {
            let native = ErrorObject::with_message(ErrorCode::InvalidRequest, error.desc.clone());
            dispatch::reject(ctx, origin, None, &native);
            return (Reply::Error(error), id);
        }
    };
    let Envelope {
        execute,
        arguments: args,
        id,
    } = env;
    let audit_id = id
        .clone()
        .and_then(|v| serde_json::from_value::<Id>(v).ok());
    let mut audit = PendingAudit::open(
        ctx.auditor.clone(),
        origin,
        Some(&execute),
        audit_id.as_ref(),
    );
    audit.detail("protocol", "qga");
    let Some((name, served)) = lookup(&execute) else {
        audit.refuse(
            Decision::Invalid,
            &ErrorObject::new(ErrorCode::MethodNotFound)
                .data(serde_json::json!({"method": execute})),
        );
        return (Reply::Error(QgaError::not_found(&execute)), id);
    };
    if served == Served::No || (linux_only(name) && !cfg!(target_os = "linux")) {
        audit.refuse(
            Decision::Invalid,
            &ErrorObject::new(ErrorCode::NotImplemented).data(serde_json::json!({"method": name})),
        );
        return (Reply::Error(QgaError::disabled(name)), id);
    }
    let reply = run(ctx, state, origin, audit, name, args).await;
    ctx.stats
        .handled
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (reply, id)
}

/// Decoded arguments, or the refusal (recorded) they earn.
fn decode<T: serde::de::DeserializeOwned>(
    ctx: &Context,
    audit: PendingAudit,
    name: &str,
    policy: MethodName,
    args: Map<String, Value>,
) -> Result<(T, PendingAudit), QgaError> {
    match arguments::<T>(args) {
        Ok(t) => Ok((t, audit)),
        Err(e) => Err(refuse_args(ctx, audit, name, policy, e)),
    }
}

fn refuse_args(
    ctx: &Context,
    audit: PendingAudit,
    name: &str,
    policy: MethodName,
    e: QgaError,
) -> QgaError {
    let native = ErrorObject::with_message(ErrorCode::InvalidParams, e.desc.clone());
    let answered = dispatch::refuse_undecodable(ctx, audit, policy, native);
    if answered.kind() == Some(ErrorCode::Denied) {
        to_qga(name, &answered)
    } else {
        e
    }
}

/// Through the gate with `call`.
fn admit(
    ctx: &Context,
    origin: &Origin,
    audit: PendingAudit,
    name: &str,
    call: Call,
) -> Result<Admitted, QgaError> {
    dispatch::admit_call(ctx, origin, audit, None, None, Ok(call))
        .map_err(|r| to_qga(name, &r.error))
}

/// Run an admitted call natively and decode its result as `T`.
async fn native<T: serde::de::DeserializeOwned>(
    ctx: &Context,
    name: &str,
    admitted: Admitted,
) -> Result<T, QgaError> {
    let (_, result) = admitted.run(ctx).await;
    let raw = result.map_err(|e| to_qga(name, &e))?;
    serde_json::from_str(raw.result.get())
        .map_err(|e| QgaError::generic(format!("cannot read the handler's result: {e}")))
}

async fn run(
    ctx: &Arc<Context>,
    state: &State,
    origin: &Origin,
    audit: PendingAudit,
    name: &'static str,
    args: Map<String, Value>,
) -> Reply {
    let r = run_inner(ctx, state, origin, audit, name, args).await;
    match r {
        Ok(reply) => reply,
        Err(e) => Reply::Error(e),
    }
}

/// The one `match` over served commands.
async fn run_inner(
    ctx: &Arc<Context>,
    state: &State,
    origin: &Origin,
    audit: PendingAudit,
    name: &'static str,
    args: Map<String, Value>,
) -> Result<Reply, QgaError> {
    use MethodName as M;
    let info = GetInfoParams::default;
    let metrics = || Call::GetMetrics(GetMetricsParams::default());
    let no_args = |audit, policy| {
        decode::<schema::NoArgs>(ctx, audit, name, policy, args.clone()).map(|(_, a)| a)
    };
    Ok(match name {
        "guest-sync" | "guest-sync-delimited" => {
            let (a, audit) = decode::<schema::SyncArgs>(ctx, audit, name, M::Ping, args)?;
            let admitted = admit(ctx, origin, audit, name, Call::Ping(NoParams {}))?;
            let _: Value = native(ctx, name, admitted).await?;
            if name == "guest-sync" {
                Reply::Return(a.id.into())
            } else {
                Reply::Delimited(a.id.into())
            }
        }
        "guest-ping" => {
            let audit = no_args(audit, M::Ping)?;
            let admitted = admit(ctx, origin, audit, name, Call::Ping(NoParams {}))?;
            let _: Value = native(ctx, name, admitted).await?;
            Reply::Return(Value::Object(Map::new()))
        }
        "guest-info" => {
            let audit = no_args(audit, M::GetCapabilities)?;
            let admitted = admit(ctx, origin, audit, name, Call::GetCapabilities(NoParams {}))?;
            let info = schema::AgentInfo {
                version: crate::AGENT_VERSION.to_owned(),
                supported_commands: COMMANDS
                    .iter()
                    .map(|(n, _)| schema::CommandInfo {
                        name: n,
                        enabled: enabled(ctx, n),
                        // As in QEMU's schema: these reply nothing on success.
                        success_response: !matches!(
                            *n,
                            "guest-shutdown"
                                | "guest-suspend-disk"
                                | "guest-suspend-ram"
                                | "guest-suspend-hybrid"
                        ),
                    })
                    .collect(),
            };
            Reply::Return(
                admitted
                    .run_instead(async {
                        ret(info).map_err(|e| {
                            ErrorObject::with_message(ErrorCode::InternalError, e.desc)
                        })
                    })
                    .await
                    .map_err(|e| to_qga(name, &e))?,
            )
        }
        "guest-get-osinfo"
        | "guest-get-host-name"
        | "guest-get-timezone"
        | "guest-network-get-interfaces" => {
            let audit = no_args(audit, M::GetInfo)?;
            let admitted = admit(ctx, origin, audit, name, Call::GetInfo(info()))?;
            let g: GuestInfo = native(ctx, name, admitted).await?;
            Reply::Return(match name {
                "guest-get-osinfo" => ret(osinfo(&g))?,
                "guest-get-host-name" => ret(schema::HostName {
                    host_name: g.hostname,
                })?,
                "guest-get-timezone" => ret(schema::Timezone {
                    zone: g.timezone.name,
                    offset: i64::from(g.timezone.utc_offset_seconds),
                })?,
                _ => ret(interfaces(g))?,
            })
        }
        "guest-get-time" => {
            let audit = no_args(audit, M::GetInfo)?;
            let admitted = admit(ctx, origin, audit, name, Call::GetInfo(info()))?;
            let ns = admitted
                .run_instead(async {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i64)
                        .map_err(|e| {
                            ErrorObject::with_message(
                                ErrorCode::Io,
                                format!("the clock is before 1970: {e}"),
                            )
                        })
                })
                .await
                .map_err(|e| to_qga(name, &e))?;
            Reply::Return(ns.into())
        }
        "guest-get-users" => {
            let audit = no_args(audit, M::GetUsers)?;
            let admitted = admit(ctx, origin, audit, name, Call::GetUsers(NoParams {}))?;
            let u: Users = native(ctx, name, admitted).await?;
            Reply::Return(ret(users(u))?)
        }
        "guest-get-load"
        | "guest-get-vcpus"
        | "guest-get-cpustats"
        | "guest-get-diskstats"
        | "guest-get-disks"
        | "guest-get-fsinfo" => {
            let audit = no_args(audit, M::GetMetrics)?;
            let admitted = admit(ctx, origin, audit, name, metrics())?;
            let ctx2 = ctx.clone();
            let work = tokio::task::spawn_blocking(move || system_report(&ctx2, name));
            let v = admitted
                .run_instead(async {
                    match work.await {
                        Ok(r) => r,
                        Err(e) => Err(ErrorObject::with_message(
                            ErrorCode::InternalError,
                            format!("worker failed: {e}"),
                        )),
                    }
                })
                .await
                .map_err(|e| to_qga(name, &e))?;
            Reply::Return(v)
        }
        "guest-shutdown" => {
            let (a, audit) = decode::<schema::ShutdownArgs>(ctx, audit, name, M::Shutdown, args)?;
            let params = PowerParams {
                confirm: true,
                ..PowerParams::default()
            };
            let call = match a.mode.as_deref().unwrap_or("powerdown") {
                "powerdown" | "halt" => Call::Shutdown(params),
                "reboot" => Call::Reboot(params),
                other => {
                    let e = QgaError::generic(format!("Invalid parameter '{other}'"));
                    return Err(refuse_args(ctx, audit, name, M::Shutdown, e));
                }
            };
            let mut admitted = admit(ctx, origin, audit, name, call)?;
            // No reply is sent on success: nothing to wait for.
            drop(admitted.reply_written.take());
            let _: Value = native(ctx, name, admitted).await?;
            Reply::Nothing
        }
        "guest-exec" => {
            let (a, audit) = decode::<schema::ExecArgs>(ctx, audit, name, M::ExecStart, args)?;
            let (params, capture) = match exec_params(a) {
                Ok(p) => p,
                Err(e) => return Err(refuse_args(ctx, audit, name, M::ExecStart, e)),
            };
            let admitted = admit(ctx, origin, audit, name, Call::ExecStart(params))?;
            let started: exec::ExecStarted = native(ctx, name, admitted).await?;
            let pid = i64::from(started.pid);
            state.exec_started(pid, started.handle, capture);
            Reply::Return(ret(schema::ExecStarted { pid })?)
        }
        "guest-exec-status" => {
            let (a, audit) =
                decode::<schema::ExecStatusArgs>(ctx, audit, name, M::ExecStatus, args)?;
            let job = state.exec_job(a.pid);
            let params = ExecStatusParams {
                handle: job.as_ref().map_or(0, |j| j.handle),
                stdout_offset: job.as_ref().map_or(0, |j| j.next[0]),
                stderr_offset: job.as_ref().map_or(0, |j| j.next[1]),
                max_bytes: None,
            };
            let admitted = admit(ctx, origin, audit, name, Call::ExecStatus(params))?;
            if job.is_none() {
                let e = ErrorObject::with_message(
                    ErrorCode::NotFound,
                    format!("PID {} does not exist", a.pid),
                );
                let e = admitted
                    .run_instead(async { Err::<(), _>(e) })
                    .await
                    .unwrap_err();
                return Err(to_qga(name, &e));
            }
            let st: exec::ExecStatus = native(ctx, name, admitted).await?;
            Reply::Return(ret(state.exec_progress(
                a.pid,
                st,
                ctx.config.limits.max_exec_output_bytes(),
            ))?)
        }
        "guest-file-open" => {
            let (a, audit) = decode::<schema::FileOpenArgs>(ctx, audit, name, M::FileOpen, args)?;
            let access = match a.mode.as_deref().unwrap_or("r") {
                "r" | "rb" => Access::Read,
                "w" | "wb" => Access::Write,
                other => {
                    let e = QgaError::generic(format!(
                        "mode '{other}' is not supported by this agent: use r, rb, w or wb"
                    ));
                    return Err(refuse_args(ctx, audit, name, M::FileOpen, e));
                }
            };
            let params = FileOpenParams {
                path: a.path,
                access,
                overwrite: access == Access::Write,
                mode: None,
                create_parents: false,
                uid: None,
                gid: None,
                resume: false,
            };
            let admitted = admit(ctx, origin, audit, name, Call::FileOpen(params))?;
            let opened: files::FileOpened = native(ctx, name, admitted).await?;
            state.file_opened(opened.handle, access == Access::Write, opened.size);
            Reply::Return(opened.handle.into())
        }
        "guest-file-read" => {
            let (a, audit) = decode::<schema::FileReadArgs>(ctx, audit, name, M::FileRead, args)?;
            let count = a.count.unwrap_or(4096);
            if !(0..=48 << 20).contains(&count) {
                let e = QgaError::generic(format!("value '{count}' is invalid for argument count"));
                return Err(refuse_args(ctx, audit, name, M::FileRead, e));
            }
            let pos = state.file_pos(a.handle);
            let params = FileReadParams {
                handle: handle_u64(a.handle),
                offset: pos.unwrap_or(0),
                length: (count as u64).min(u64::from(ctx.config.limits.max_chunk_bytes())) as u32,
                attachment: false,
            };
            let admitted = admit(ctx, origin, audit, name, Call::FileRead(params))?;
            if pos.is_none() {
                return Err(unknown_handle(admitted, a.handle).await);
            }
            let chunk: files::FileChunk = native(ctx, name, admitted).await?;
            let buf_b64 = chunk.data_base64.unwrap_or_default();
            let n = decoded_len(&buf_b64);
            state.file_advance(a.handle, n);
            Reply::Return(ret(schema::FileRead {
                count: n,
                buf_b64,
                eof: chunk.eof,
            })?)
        }
        "guest-file-write" => {
            let (a, audit) = decode::<schema::FileWriteArgs>(ctx, audit, name, M::FileWrite, args)?;
            let mut data = match base64_decode(a.buf_b64.as_bytes()) {
                Ok(d) => d,
                Err(e) => {
                    let e = QgaError::generic(format!("Invalid base64 data: {e}"));
                    return Err(refuse_args(ctx, audit, name, M::FileWrite, e));
                }
            };
            // The decoded bytes go to the handler as they are (an
            // attachment of the native call), not encoded again.
            match a.count {
                None => {}
                Some(c) if c >= 0 && (c as u64) <= data.len() as u64 => data.truncate(c as usize),
                Some(c) => {
                    let e = QgaError::generic(format!("value '{c}' is invalid for argument count"));
                    return Err(refuse_args(ctx, audit, name, M::FileWrite, e));
                }
            };
            let pos = state.file_pos(a.handle);
            let params = FileWriteParams {
                handle: handle_u64(a.handle),
                offset: pos.unwrap_or(0),
                data_base64: None,
                attachment: Some(Attachment::from_vec(data)),
            };
            let admitted = admit(ctx, origin, audit, name, Call::FileWrite(params))?;
            if pos.is_none() {
                return Err(unknown_handle(admitted, a.handle).await);
            }
            let w: files::FileWritten = native(ctx, name, admitted).await?;
            state.file_advance(a.handle, w.written);
            Reply::Return(ret(schema::FileWrite {
                count: w.written,
                eof: false,
            })?)
        }
        "guest-file-seek" => {
            let (a, audit) = decode::<schema::FileSeekArgs>(ctx, audit, name, M::FileRead, args)?;
            let whence = match &a.whence {
                Value::Number(n) if n.as_i64().is_some_and(|w| (0..=2).contains(&w)) => {
                    n.as_i64().unwrap_or(0)
                }
                Value::String(s) if s == "set" => 0,
                Value::String(s) if s == "cur" => 1,
                Value::String(s) if s == "end" => 2,
                other => {
                    let e = QgaError::generic(format!("Invalid parameter 'whence': {other}"));
                    return Err(refuse_args(ctx, audit, name, M::FileRead, e));
                }
            };
            let call = Call::FileRead(FileReadParams {
                handle: handle_u64(a.handle),
                offset: 0,
                length: 0,
                attachment: false,
            });
            let admitted = admit(ctx, origin, audit, name, call)?;
            let r = state.file_seek(a.handle, a.offset, whence);
            let r = admitted
                .run_instead(async {
                    r.map_err(|e| ErrorObject::with_message(ErrorCode::InvalidParams, e.desc))
                })
                .await
                .map_err(|e| QgaError::generic(e.message))?;
            Reply::Return(ret(r)?)
        }
        "guest-file-flush" => {
            let (a, audit) = decode::<schema::HandleArgs>(ctx, audit, name, M::FileWrite, args)?;
            let call = Call::FileWrite(FileWriteParams {
                handle: handle_u64(a.handle),
                offset: 0,
                data_base64: Some(String::new()),
                attachment: None,
            });
            let admitted = admit(ctx, origin, audit, name, call)?;
            if state.file_pos(a.handle).is_none() {
                return Err(unknown_handle(admitted, a.handle).await);
            }
            // Writes reach the file as they come; the file is committed
            // (renamed into place) at guest-file-close.
            admitted
                .run_instead(async { Ok(()) })
                .await
                .map_err(|e| to_qga(name, &e))?;
            Reply::Return(Value::Object(Map::new()))
        }
        "guest-file-close" => {
            let (a, audit) = decode::<schema::HandleArgs>(ctx, audit, name, M::FileClose, args)?;
            let known = state.file_pos(a.handle).is_some();
            let call = Call::FileClose(FileCloseParams {
                handle: handle_u64(a.handle),
                abort: false,
                size: None,
                sha256: None,
            });
            let admitted = admit(ctx, origin, audit, name, call)?;
            if !known {
                return Err(unknown_handle(admitted, a.handle).await);
            }
            let closed: Result<files::FileClosed, QgaError> = native(ctx, name, admitted).await;
            state.file_closed(a.handle);
            closed?;
            Reply::Return(Value::Object(Map::new()))
        }
        other => {
            // Every served command has an arm; the table test checks it.
            let e = ErrorObject::new(ErrorCode::NotImplemented);
            audit.refuse(Decision::Invalid, &e);
            return Err(QgaError::disabled(other));
        }
    })
}

/// Handles are positive in QGA; anything else matches no handle.
fn handle_u64(h: i64) -> u64 {
    u64::try_from(h).unwrap_or(u64::MAX)
}

/// A handle the front end never handed out (or already closed): qemu-ga's
/// error, recorded as the admitted call's outcome.
async fn unknown_handle(admitted: Admitted, handle: i64) -> QgaError {
    let desc = format!("handle '{handle}' has not been found");
    let e = ErrorObject::with_message(ErrorCode::NotFound, desc);
    let e = admitted
        .run_instead(async { Err::<(), _>(e) })
        .await
        .unwrap_err();
    QgaError::generic(e.message)
}

/// Bytes a standard base64 text decodes to.
fn decoded_len(b64: &str) -> u64 {
    let pad = b64.bytes().rev().take_while(|b| *b == b'=').count() as u64;
    (b64.len() as u64 / 4 * 3).saturating_sub(pad)
}

/// On Windows `id` is `mswindows`, as qemu-ga's Windows build says.
fn osinfo(g: &GuestInfo) -> schema::OsInfo {
    let os = &g.os;
    let windows = os.family == kvm_agent_protocol::methods::core::OsFamily::Windows;
    schema::OsInfo {
        kernel_release: Some(os.kernel_release.clone()),
        kernel_version: crate::platform::kernel_version(),
        machine: Some(os.machine.clone()),
        id: if windows {
            Some("mswindows".into())
        } else {
            os.id.clone()
        },
        name: os.name.clone(),
        pretty_name: os.pretty_name.clone(),
        version: os.version.clone(),
        version_id: os.version_id.clone(),
    }
}

fn interfaces(g: GuestInfo) -> Vec<schema::NetworkInterface> {
    let counters = crate::platform::net_counters().unwrap_or_default();
    g.interfaces
        .into_iter()
        .map(|i| {
            let statistics =
                counters
                    .iter()
                    .find(|c| c.name == i.name)
                    .map(|c| schema::NetworkStats {
                        rx_bytes: c.rx_bytes,
                        rx_packets: c.rx_packets,
                        rx_errs: c.rx_errors,
                        rx_dropped: c.rx_dropped,
                        tx_bytes: c.tx_bytes,
                        tx_packets: c.tx_packets,
                        tx_errs: c.tx_errors,
                        tx_dropped: c.tx_dropped,
                    });
            let ips: Vec<schema::IpAddress> = i
                .addresses
                .iter()
                .map(|a| schema::IpAddress {
                    ip_address: a.address.to_string(),
                    ip_address_type: if a.address.is_ipv4() { "ipv4" } else { "ipv6" },
                    prefix: i64::from(a.prefix_len),
                })
                .collect();
            schema::NetworkInterface {
                name: i.name,
                hardware_address: i.mac,
                ip_addresses: (!ips.is_empty()).then_some(ips),
                statistics,
            }
        })
        .collect()
}

fn users(u: Users) -> Vec<schema::User> {
    // One entry per user, with the earliest login, as qemu-ga reports.
    let mut first: BTreeMap<String, i64> = BTreeMap::new();
    for s in u.users {
        let t = first.entry(s.user).or_insert(s.login_time_epoch);
        *t = (*t).min(s.login_time_epoch);
    }
    first
        .into_iter()
        .map(|(user, t)| schema::User {
            user,
            login_time: t as f64,
        })
        .collect()
}

/// The system figures of the `get_metrics`-admitted commands (blocking).
fn system_report(ctx: &Context, name: &str) -> Result<Value, ErrorObject> {
    let io = |e: String| ErrorObject::with_message(ErrorCode::Io, e);
    match name {
        "guest-get-load" => {
            let l = crate::platform::load_average()
                .map_err(|e| e.to_error_object())?
                .ok_or_else(|| io("this system has no load average".into()))?;
            to_value(schema::Load {
                load1m: l[0],
                load5m: l[1],
                load15m: l[2],
            })
        }
        #[cfg(target_os = "linux")]
        _ => linux_report(ctx, name).map_err(|e| io(e.to_string())),
        #[cfg(not(target_os = "linux"))]
        _ => {
            let _ = ctx;
            Err(ErrorObject::with_message(
                ErrorCode::Unsupported,
                format!("{name} is not supported on this platform"),
            ))
        }
    }
}

#[cfg(target_os = "linux")]
fn linux_report(ctx: &Context, name: &str) -> Result<Value, super::sysinfo::SysinfoError> {
    use super::sysinfo;
    let enc = |r: Result<Value, ErrorObject>| r.unwrap_or(Value::Null);
    Ok(match name {
        "guest-get-vcpus" => enc(to_value(sysinfo::vcpus()?)),
        "guest-get-cpustats" => enc(to_value(sysinfo::cpu_stats()?)),
        "guest-get-diskstats" => enc(to_value(sysinfo::disk_stats()?)),
        "guest-get-disks" => enc(to_value(sysinfo::disks()?)),
        _ => enc(to_value(fsinfo(ctx))),
    })
}

/// `guest-get-fsinfo`: local filesystems (as `get_metrics` chooses them,
/// network ones left out: they may hang) with sizes and disk addresses.
#[cfg(target_os = "linux")]
fn fsinfo(ctx: &Context) -> Vec<schema::FilesystemInfo> {
    let _ = ctx;
    let mounts = crate::platform::mounts().unwrap_or_default();
    let mounts = crate::handlers::metrics::select_mounts(mounts, false);
    mounts
        .into_iter()
        .filter(|m| m.device.starts_with("/dev/"))
        .map(|m| {
            let stats = crate::platform::fs_stats(&m.mount_point).ok();
            let name = std::fs::canonicalize(&m.device)
                .ok()
                .and_then(|p| p.file_name()?.to_str().map(str::to_owned))
                .unwrap_or_else(|| m.device.trim_start_matches("/dev/").to_owned());
            schema::FilesystemInfo {
                disk: super::sysinfo::addresses_of_device(&m.device),
                name,
                mountpoint: m.mount_point,
                fs_type: m.fs_type,
                used_bytes: stats.map(|s| s.used_bytes),
                total_bytes: stats.map(|s| s.used_bytes + s.available_bytes),
                total_bytes_privileged: stats.map(|s| s.total_bytes),
            }
        })
        .collect()
}

fn to_value<T: Serialize>(v: T) -> Result<Value, ErrorObject> {
    serde_json::to_value(v)
        .map_err(|e| ErrorObject::with_message(ErrorCode::InternalError, e.to_string()))
}

/// What to capture of a `guest-exec`'s output: (stdout, stderr).
pub type Capture = (bool, bool);

fn exec_params(a: schema::ExecArgs) -> Result<(ExecStartParams, Capture), QgaError> {
    let mut env = BTreeMap::new();
    for e in a.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| QgaError::generic(format!("env entry '{e}' is not NAME=VALUE")))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let capture = match &a.capture_output {
        None | Some(Value::Bool(false)) => (false, false),
        Some(Value::Bool(true)) => (true, true),
        Some(Value::String(s)) => match s.as_str() {
            "none" => (false, false),
            "stdout" => (true, false),
            "stderr" => (false, true),
            "separated" => (true, true),
            other => {
                return Err(QgaError::generic(format!(
                    "capture-output '{other}' is not supported by this agent: use none, stdout, stderr or separated"
                )))
            }
        },
        Some(other) => return Err(QgaError::generic(format!("Invalid parameter 'capture-output': {other}"))),
    };
    Ok((
        ExecStartParams {
            command: a.path,
            args: a.arg,
            env,
            cwd: None,
            stdin_base64: a.input_data,
            timeout_ms: None,
        },
        capture,
    ))
}

/// Bytes of a native output piece.
pub fn output_bytes(o: &Output) -> Vec<u8> {
    match o.encoding {
        Encoding::Utf8 => o.data.as_bytes().to_vec(),
        Encoding::Base64 => base64_decode(o.data.as_bytes()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_qemu_gas_list_and_each_served_command_has_an_arm() {
        assert_eq!(COMMANDS.len(), 43);
        let mut names: Vec<&str> = COMMANDS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 43);
        let src = include_str!("commands.rs");
        for (n, s) in COMMANDS {
            if *s != Served::No {
                assert!(
                    src.contains(&format!("\"{n}\" =>"))
                        || src.contains(&format!("\"{n}\" |"))
                        || src.contains(&format!("| \"{n}\"")),
                    "{n} has no arm"
                );
            }
        }
    }

    #[test]
    fn base64_lengths() {
        for n in 0..10 {
            let data = vec![7u8; n];
            assert_eq!(
                decoded_len(&kvm_agent_protocol::codec::base64_encode(&data)),
                n as u64
            );
        }
    }

    #[test]
    fn exec_arguments() {
        let a: schema::ExecArgs = serde_json::from_value(serde_json::json!({
            "path": "echo", "arg": ["a"], "env": ["LANG=C"], "capture-output": "stdout"
        }))
        .unwrap();
        let (p, c) = exec_params(a).unwrap();
        assert_eq!(
            (p.command.as_str(), p.args.len(), p.env["LANG"].as_str(), c),
            ("echo", 1, "C", (true, false))
        );
        let a: schema::ExecArgs =
            serde_json::from_value(serde_json::json!({"path": "x", "capture-output": "merged"}))
                .unwrap();
        assert!(exec_params(a).is_err());
    }
}
