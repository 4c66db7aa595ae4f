//! `exec`, `exec_start`, `exec_status` and `exec_kill`.
//!
//! The policy has already allowed the command (in `dispatch::admit`); each
//! start asks it again for the grant (path and user), so what starts is what
//! passed the check at that moment. No shell: the resolved path is executed
//! with the request's arguments, as a [`platform::ProcessTree`] (Linux: a
//! session of its own, whose process group timeouts and `exec_kill` signal
//! as a whole; Windows: a job object of its own, terminated as a whole),
//! with a clean environment: `PATH` (the fixed search path), `HOME`, `USER`,
//! `LOGNAME`, plus the request's `env` (names limited by
//! `security.exec_env`).
//!
//! Exit is watched with waitpid on the child itself, separately from its
//! pipes: `exited` is reported when the command exits even if a background
//! process it started still holds its output open.
//!
//! Memory stays bounded whatever the command writes:
//! - `exec` keeps `max_output_bytes` per stream and reads and discards the
//!   rest (so the command never blocks on a full pipe);
//! - `exec_start` buffers at most `limits.max_exec_buffer_bytes` per stream
//!   (counting from the offset of the host's last `exec_status`); at the cap
//!   the agent stops reading that pipe, so the command blocks in write()
//!   until the host reads: nothing is lost.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_agent_protocol::codec::{base64_decode, base64_encode};
use kvm_agent_protocol::methods::core::Empty;
use kvm_agent_protocol::methods::exec::{
    Encoding, ExecKillParams, ExecParams, ExecResult, ExecStartParams, ExecStarted, ExecStatus,
    ExecStatusParams, Output,
};
use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::audit::PendingAudit;
use crate::context::Context;
use crate::platform::{self, PlatformError};
#[cfg(not(windows))]
use crate::policy::commands::SEARCH_PATH_ENV;
use crate::policy::PolicyError;

/// After the command exits, how long `exec` keeps reading output that
/// processes it left in the background still write.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// Pipe read size.
const READ_CHUNK: usize = 64 * 1024;

/// Why an exec method failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The allowlist refused the command at start.
    #[error(transparent)]
    Denied(#[from] PolicyError),
    /// Bad params the types cannot express.
    #[error("{method}: {reason}")]
    InvalidParams {
        /// The method.
        method: MethodName,
        /// What is wrong.
        reason: String,
    },
    /// The working directory does not exist.
    #[error("working directory {0} not found")]
    CwdNotFound(String),
    /// The `run_as` user is not in /etc/passwd.
    #[error("user {0} not found")]
    UserNotFound(String),
    /// `limits.max_processes` commands run already.
    #[error("max_processes ({0}) reached")]
    Busy(u32),
    /// No such handle (never given, or released).
    #[error("no exec handle {0}")]
    HandleNotFound(u64),
    /// The process could not be started.
    #[error("cannot start {path}: {error}")]
    Spawn {
        /// The program.
        path: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The platform cannot do it (a signal, run_as).
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

impl From<&ExecError> for ErrorObject {
    fn from(e: &ExecError) -> Self {
        match e {
            ExecError::Denied(p) => p.into(),
            ExecError::InvalidParams { method, reason } => ErrorObject::with_message(
                ErrorCode::InvalidParams,
                format!("Invalid params: {reason}"),
            )
            .data(json!({ "method": method.as_str(), "reason": reason })),
            ExecError::CwdNotFound(p) => {
                ErrorObject::new(ErrorCode::NotFound).data(json!({ "path": p }))
            }
            ExecError::UserNotFound(u) => {
                ErrorObject::new(ErrorCode::NotFound).data(json!({ "user": u }))
            }
            ExecError::Busy(n) => {
                ErrorObject::with_message(ErrorCode::Busy, "Busy: max_processes reached")
                    .data(json!({ "limit": "max_processes", "value": n }))
            }
            ExecError::HandleNotFound(h) => {
                ErrorObject::new(ErrorCode::NotFound).data(json!({ "handle": h }))
            }
            ExecError::Spawn { path, error } => ErrorObject::new(ErrorCode::Io).data(json!({
                "path": path,
                "os_error": error.raw_os_error(),
                "detail": error.to_string(),
            })),
            ExecError::Platform(p) => p.to_error_object(),
        }
    }
}

/// Output bytes as an [`Output`]: `utf-8` when they are UTF-8 and their
/// JSON string is no longer than base64 would be (text with few control
/// characters), else `base64`.
pub fn output(bytes: &[u8]) -> Output {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let escaped: usize = text
            .bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                0..=0x1f => 6,
                _ => 1,
            })
            .sum();
        if escaped <= bytes.len().div_ceil(3) * 4 {
            return Output {
                encoding: Encoding::Utf8,
                data: text.to_owned(),
            };
        }
    }
    Output {
        encoding: Encoding::Base64,
        data: base64_encode(bytes),
    }
}

/// The running and finished `exec_start` commands.
#[derive(Debug)]
pub struct ExecTable {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    running: Arc<Semaphore>,
    max_processes: u32,
}

impl ExecTable {
    /// A table allowing `max_processes` running commands.
    pub fn new(max_processes: u32) -> Self {
        Self {
            next: AtomicU64::new(1),
            jobs: Mutex::default(),
            running: Arc::new(Semaphore::new(max_processes as usize)),
            max_processes,
        }
    }

    fn get(&self, handle: u64) -> Result<Arc<Job>, ExecError> {
        self.jobs
            .lock()
            .unwrap()
            .get(&handle)
            .cloned()
            .ok_or(ExecError::HandleNotFound(handle))
    }

    /// Drop finished handles past their time, and the oldest finished ones
    /// beyond the number kept.
    fn collect(&self, keep: u32, keep_for: Duration) {
        let mut jobs = self.jobs.lock().unwrap();
        let mut finished: Vec<(Instant, u64)> = jobs
            .iter()
            .filter_map(|(h, j)| j.state.lock().unwrap().exited_at.map(|t| (t, *h)))
            .collect();
        finished.sort();
        let excess = finished.len().saturating_sub(keep as usize);
        for (i, (at, h)) in finished.into_iter().enumerate() {
            if i < excess || at.elapsed() > keep_for {
                if let Some(job) = jobs.remove(&h) {
                    job.stop_pumps();
                }
            }
        }
    }
}

#[derive(Debug)]
struct Job {
    /// The command and what it started (its process group, its job object).
    tree: platform::ProcessTree,
    state: Mutex<JobState>,
    /// Wakes pumps waiting for room.
    room: Notify,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl Job {
    fn stop_pumps(&self) {
        for p in self.pumps.lock().unwrap().drain(..) {
            p.abort();
        }
    }
}

#[derive(Debug, Default)]
struct JobState {
    /// (exit code, signal), once the command exited.
    exit: Option<(Option<i32>, Option<i32>)>,
    exited_at: Option<Instant>,
    duration_ms: u64,
    timed_out: bool,
    exit_audited: bool,
    streams: [Stream; 2],
}

#[derive(Debug, Default)]
struct Stream {
    /// Offset of `buf[0]`.
    start: u64,
    buf: VecDeque<u8>,
    eof: bool,
}

impl Stream {
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
}

/// What a start needs, common to `exec` and `exec_start`.
struct Spec<'a> {
    method: MethodName,
    command: &'a str,
    args: &'a [String],
    env: &'a BTreeMap<String, String>,
    cwd: Option<&'a str>,
    stdin_base64: Option<&'a str>,
    timeout_ms: Option<u64>,
}

struct Started {
    child: tokio::process::Child,
    pid: u32,
    tree: platform::ProcessTree,
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    permit: OwnedSemaphorePermit,
    timeout: Duration,
    started: Instant,
}

fn invalid(method: MethodName, reason: impl Into<String>) -> ExecError {
    ExecError::InvalidParams {
        method,
        reason: reason.into(),
    }
}

/// Check, record and start a command.
fn start(ctx: &Context, spec: Spec<'_>, audit: &mut PendingAudit) -> Result<Started, ExecError> {
    let method = spec.method;
    let grant = ctx
        .policy
        .check_command(method, spec.command, spec.args, spec.env.keys())?;
    let path = grant.path.to_string_lossy().into_owned();
    let argv: Vec<&str> = std::iter::once(spec.command)
        .chain(spec.args.iter().map(String::as_str))
        .collect();
    audit.detail("argv", argv);
    // Names only: values may be secrets.
    audit.detail("env_names", spec.env.keys().cloned().collect::<Vec<_>>());
    let default_cwd = default_cwd();
    audit.detail("cwd", spec.cwd.unwrap_or(&default_cwd));
    audit.detail("path", path.clone());
    audit.detail("allowed_by", grant.entry.clone());
    if let Some(u) = &grant.run_as {
        audit.detail("run_as", u.clone());
    }
    if spec.args.iter().any(|a| a.contains('\0'))
        || spec
            .env
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Err(invalid(
            method,
            "arguments and environment cannot contain NUL",
        ));
    }
    let stdin = spec
        .stdin_base64
        .map(|s| base64_decode(s.as_bytes()))
        .transpose()
        .map_err(|e| invalid(method, format!("stdin_base64: {e}")))?;
    let cwd = spec.cwd.unwrap_or(&default_cwd);
    if !Path::new(cwd).is_absolute() || !Path::new(cwd).is_dir() {
        return Err(ExecError::CwdNotFound(cwd.to_owned()));
    }
    let user = match &grant.run_as {
        Some(name) => Some(
            platform::lookup_user(name)?.ok_or_else(|| ExecError::UserNotFound(name.clone()))?,
        ),
        None => None,
    };
    let me = match &user {
        Some(_) => None,
        None => platform::lookup_uid(platform::current_uid()),
    };
    let (name, home) = user
        .as_ref()
        .or(me.as_ref())
        .map(|u| (u.name.clone(), u.home.clone()))
        .unwrap_or_else(|| ("root".into(), "/".into()));
    let limits = &ctx.config.exec;
    let timeout = Duration::from_millis(
        spec.timeout_ms
            .unwrap_or(limits.default_timeout_ms)
            .clamp(1, limits.max_timeout_ms),
    );
    let permit = ctx
        .exec
        .running
        .clone()
        .try_acquire_owned()
        .map_err(|_| ExecError::Busy(ctx.exec.max_processes))?;

    let mut cmd = std::process::Command::new(&grant.path);
    cmd.args(spec.args).env_clear();
    base_env(&mut cmd);
    cmd.env("HOME", &home)
        .env("USER", &name)
        .env("LOGNAME", &name)
        .envs(spec.env)
        .current_dir(cwd)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    platform::isolate(&mut cmd, user.as_ref());
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|error| ExecError::Spawn {
            path: path.clone(),
            error,
        })?;
    let started = Instant::now();
    let tree = match platform::ProcessTree::adopt(&child) {
        Ok(t) => t,
        Err(e) => {
            // Not started for real (on Windows still suspended, in no job).
            let _ = child.start_kill();
            return Err(e.into());
        }
    };
    let pid = tree.id();
    audit.detail("pid", pid);
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that does not read its input gets EPIPE here; fine.
        tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
        });
    }
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    Ok(Started {
        child,
        pid,
        tree,
        stdout,
        stderr,
        permit,
        timeout,
        started,
    })
}

/// The working directory when the request names none: `/`; on Windows
/// the root of the system drive (`C:\`).
fn default_cwd() -> String {
    #[cfg(windows)]
    if let Some(root) = crate::policy::commands::windows::system_directory()
        .as_deref()
        .and_then(|d| d.ancestors().last())
    {
        return root.to_string_lossy().into_owned();
    }
    "/".to_owned()
}

/// `PATH` (the fixed search path); on Windows the system directory, and
/// `SystemRoot`, `SystemDrive` and `windir` from the agent's own
/// environment (many Windows programs fail without them).
fn base_env(cmd: &mut std::process::Command) {
    #[cfg(windows)]
    {
        if let Some(dir) = crate::policy::commands::windows::system_directory() {
            cmd.env("PATH", dir);
        }
        for name in ["SystemRoot", "SystemDrive", "windir"] {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
    }
    #[cfg(not(windows))]
    cmd.env("PATH", SEARCH_PATH_ENV);
}

fn describe_exit(
    audit: &mut PendingAudit,
    exit: (Option<i32>, Option<i32>),
    timed_out: bool,
    ms: u64,
) {
    audit.detail("exit_code", exit.0);
    audit.detail("signal", exit.1);
    audit.detail("timed_out", timed_out);
    audit.detail("duration_ms", ms);
}

/// `exec`: run to completion.
pub async fn exec(
    ctx: &Context,
    p: ExecParams,
    audit: &mut PendingAudit,
) -> Result<ExecResult, ExecError> {
    let max = p
        .max_output_bytes
        .unwrap_or(ctx.config.exec.default_max_output_bytes)
        .min(ctx.config.limits.max_exec_output_bytes()) as usize;
    let Started {
        mut child,
        pid,
        tree,
        stdout,
        stderr,
        permit,
        timeout,
        started,
    } = start(
        ctx,
        Spec {
            method: MethodName::Exec,
            command: &p.command,
            args: &p.args,
            env: &p.env,
            cwd: p.cwd.as_deref(),
            stdin_base64: p.stdin_base64.as_deref(),
            timeout_ms: p.timeout_ms,
        },
        audit,
    )?;
    let out = Arc::new(Mutex::new((Vec::new(), false)));
    let err = Arc::new(Mutex::new((Vec::new(), false)));
    let mut readers = [
        tokio::spawn(keep_first(stdout, max, out.clone())),
        tokio::spawn(keep_first(stderr, max, err.clone())),
    ];
    let mut timed_out = false;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = tokio::time::sleep(timeout) => {
            timed_out = true;
            let _ = tree.signal(platform::SIGKILL);
            child.wait().await
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    drop(permit);
    let exit = match status {
        Ok(s) => platform::exit_parts(s),
        Err(e) => {
            log::error!("exec: waiting for {pid}: {e}");
            (None, None)
        }
    };
    // Output still in the pipes, and what processes left in the background
    // write within the grace period.
    let grace = tokio::time::Instant::now() + OUTPUT_GRACE;
    for r in &mut readers {
        if tokio::time::timeout_at(grace, &mut *r).await.is_err() {
            r.abort();
        }
    }
    describe_exit(audit, exit, timed_out, duration_ms);
    let (out, out_cut) = std::mem::take(&mut *out.lock().unwrap());
    let (err, err_cut) = std::mem::take(&mut *err.lock().unwrap());
    audit.detail("stdout_bytes", out.len());
    audit.detail("stderr_bytes", err.len());
    Ok(ExecResult {
        exit_code: exit.0,
        signal: exit.1,
        stdout: output(&out),
        stderr: output(&err),
        stdout_truncated: out_cut,
        stderr_truncated: err_cut,
        timed_out,
        duration_ms,
    })
}

/// Keep the first `max` bytes, read and drop the rest.
async fn keep_first(
    mut pipe: impl AsyncRead + Unpin,
    max: usize,
    into: Arc<Mutex<(Vec<u8>, bool)>>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut kept = into.lock().unwrap();
                let room = max - kept.0.len().min(max);
                kept.0.extend_from_slice(&buf[..n.min(room)]);
                if n > room {
                    kept.1 = true;
                }
            }
        }
    }
}

/// `exec_start`: start and return a handle.
pub async fn start_job(
    ctx: &Context,
    p: ExecStartParams,
    audit: &mut PendingAudit,
) -> Result<ExecStarted, ExecError> {
    let e = &ctx.config.exec;
    ctx.exec.collect(
        e.keep_finished,
        Duration::from_secs(e.keep_finished_seconds),
    );
    let Started {
        mut child,
        pid,
        tree,
        stdout,
        stderr,
        permit,
        timeout,
        started,
    } = start(
        ctx,
        Spec {
            method: MethodName::ExecStart,
            command: &p.command,
            args: &p.args,
            env: &p.env,
            cwd: p.cwd.as_deref(),
            stdin_base64: p.stdin_base64.as_deref(),
            timeout_ms: p.timeout_ms,
        },
        audit,
    )?;
    let handle = ctx.exec.next.fetch_add(1, Ordering::Relaxed);
    audit.detail("handle", handle);
    let job = Arc::new(Job {
        tree,
        state: Mutex::default(),
        room: Notify::new(),
        pumps: Mutex::default(),
    });
    let cap = ctx.config.limits.max_exec_buffer_bytes as usize;
    *job.pumps.lock().unwrap() = vec![
        tokio::spawn(pump(job.clone(), 0, stdout, cap)),
        tokio::spawn(pump(job.clone(), 1, stderr, cap)),
    ];
    ctx.exec.jobs.lock().unwrap().insert(handle, job.clone());
    let deadline = tokio::time::Instant::from_std(started + timeout);
    tokio::spawn(async move {
        let mut timed_out = false;
        let status = tokio::select! {
            s = child.wait() => s,
            _ = tokio::time::sleep_until(deadline) => {
                timed_out = true;
                let _ = job.tree.signal(platform::SIGKILL);
                child.wait().await
            }
        };
        let exit = match status {
            Ok(s) => platform::exit_parts(s),
            Err(e) => {
                log::error!("exec_start: waiting for {pid}: {e}");
                (None, None)
            }
        };
        drop(permit);
        log::info!("exec handle {handle}: pid {pid} ended: {exit:?}, timed out: {timed_out}");
        {
            let mut s = job.state.lock().unwrap();
            s.exit = Some(exit);
            s.exited_at = Some(Instant::now());
            s.duration_ms = started.elapsed().as_millis() as u64;
            s.timed_out = timed_out;
        }
        // Processes it left in its group that still hold its output are
        // killed at the timeout too.
        tokio::time::sleep_until(deadline).await;
        let open = {
            let s = job.state.lock().unwrap();
            !(s.streams[0].eof && s.streams[1].eof)
        };
        if open && job.tree.alive() {
            let _ = job.tree.signal(platform::SIGKILL);
        }
    });
    Ok(ExecStarted { handle, pid })
}

/// Read a pipe into a stream's buffer while it has room.
async fn pump(job: Arc<Job>, i: usize, mut pipe: impl AsyncRead + Unpin, cap: usize) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let room = loop {
            let notified = job.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let used = job.state.lock().unwrap().streams[i].buf.len();
            if used < cap {
                break cap - used;
            }
            notified.await;
        };
        let n = match pipe.read(&mut buf[..room.min(READ_CHUNK)]).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let mut s = job.state.lock().unwrap();
        if n == 0 {
            s.streams[i].eof = true;
            return;
        }
        s.streams[i].buf.extend(&buf[..n]);
    }
}

/// `exec_status`: state and output from the offsets asked for. Output
/// before those offsets is released.
pub fn status(
    ctx: &Context,
    p: ExecStatusParams,
    audit: &mut PendingAudit,
) -> Result<ExecStatus, ExecError> {
    let e = &ctx.config.exec;
    ctx.exec.collect(
        e.keep_finished,
        Duration::from_secs(e.keep_finished_seconds),
    );
    audit.detail("handle", p.handle);
    let job = ctx.exec.get(p.handle)?;
    let max = p
        .max_bytes
        .unwrap_or(u64::MAX)
        .min(ctx.config.limits.max_exec_output_bytes());
    let mut s = job.state.lock().unwrap();
    let mut chunks = [Vec::new(), Vec::new()];
    let mut next = [0u64; 2];
    let mut released = false;
    for (i, (name, offset)) in [
        ("stdout_offset", p.stdout_offset),
        ("stderr_offset", p.stderr_offset),
    ]
    .into_iter()
    .enumerate()
    {
        let st = &mut s.streams[i];
        if offset < st.start {
            return Err(invalid(
                MethodName::ExecStatus,
                format!(
                    "{name} {offset} was released: output before the offsets of an exec_status is dropped (oldest kept: {})",
                    st.start
                ),
            ));
        }
        if offset > st.end() {
            return Err(invalid(
                MethodName::ExecStatus,
                format!("{name} {offset} is beyond the output so far ({})", st.end()),
            ));
        }
        let drop_n = (offset - st.start) as usize;
        if drop_n > 0 {
            st.buf.drain(..drop_n);
            st.start = offset;
            released = true;
        }
        let take = (st.buf.len() as u64).min(max) as usize;
        let (a, b) = st.buf.as_slices();
        let mut chunk = Vec::with_capacity(take);
        chunk.extend_from_slice(&a[..take.min(a.len())]);
        chunk.extend_from_slice(&b[..take - take.min(a.len())]);
        // Do not split a UTF-8 character across answers when more follows.
        if take < st.buf.len() || !st.eof {
            if let Err(e) = std::str::from_utf8(&chunk) {
                if e.error_len().is_none() && e.valid_up_to() > 0 {
                    chunk.truncate(e.valid_up_to());
                }
            }
        }
        next[i] = offset + chunk.len() as u64;
        chunks[i] = chunk;
    }
    let exited = s.exit.is_some();
    let (exit_code, signal) = s.exit.unwrap_or((None, None));
    let complete = exited && (0..2).all(|i| s.streams[i].eof && next[i] == s.streams[i].end());
    if exited && !s.exit_audited {
        s.exit_audited = true;
        describe_exit(audit, (exit_code, signal), s.timed_out, s.duration_ms);
    }
    let timed_out = s.timed_out;
    drop(s);
    if released {
        job.room.notify_waiters();
    }
    if complete {
        ctx.exec.jobs.lock().unwrap().remove(&p.handle);
        audit.detail("released", true);
    }
    let [out, err] = chunks;
    Ok(ExecStatus {
        exited,
        exit_code,
        signal,
        timed_out,
        stdout: output(&out),
        stderr: output(&err),
        stdout_next_offset: next[0],
        stderr_next_offset: next[1],
        output_complete: complete,
    })
}

/// `exec_kill`: signal the command's process group.
pub fn kill(
    ctx: &Context,
    p: ExecKillParams,
    audit: &mut PendingAudit,
) -> Result<Empty, ExecError> {
    audit.detail("handle", p.handle);
    audit.detail("signal", format!("{:?}", p.signal));
    let job = ctx.exec.get(p.handle)?;
    let sig = platform::signal_number(p.signal)?;
    let alive = {
        let s = job.state.lock().unwrap();
        // After the command exited, its group is signalled only while
        // something still holds its output (a process left behind).
        s.exit.is_none() || !(s.streams[0].eof && s.streams[1].eof)
    };
    if alive {
        if let Err(e) = job.tree.signal(sig) {
            log::debug!("exec_kill {}: {e}", p.handle);
        }
    }
    Ok(Empty {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_encoding() {
        assert_eq!(output(b"hello\n").encoding, Encoding::Utf8);
        assert_eq!(output(b"hello\n").data, "hello\n");
        let bin = output(&[0xff, 0xfe]);
        assert_eq!(bin.encoding, Encoding::Base64);
        assert_eq!(bin.data, "//4=");
        // Valid UTF-8 but all NULs: base64 is shorter than \u0000 escapes.
        assert_eq!(output(&[0u8; 30]).encoding, Encoding::Base64);
        assert_eq!(output(b"").encoding, Encoding::Utf8);
    }
}

/// The exec handlers on Windows, under Wine in CI: the test executable
/// itself is the allowlisted command (with a role in the environment).
#[cfg(all(test, windows))]
mod windows_tests {
    use super::*;
    use crate::audit::{Auditor, Origin};
    use crate::config::Config;
    use crate::platform::test_support::{ends_within, libtest_name, open_process};
    use kvm_agent_protocol::methods::exec::Signal;

    const ROLE: &str = "KVA_TEST_EXEC_ROLE";
    const WHOAMI: &str = r"C:\Windows\System32\whoami.exe";

    fn test_path(name: &str) -> String {
        libtest_name(module_path!(), name)
    }

    /// The tests below run this test executable through exec, filtered to
    /// the test itself, with a role in the environment (`exit3`: output on
    /// both streams, `USER` included, exit code 3; `flood`: 100000 bytes;
    /// `tree`: start a grandchild, print its pid, wait for it; `sleep`: a
    /// minute). In such a process, play the part and return true: the test's
    /// own body runs only in the process the harness started.
    fn play_role(test: &str) -> bool {
        use std::io::Write;
        match std::env::var(ROLE).as_deref() {
            Ok("exit3") => {
                let user = std::env::var("USER").unwrap_or_default();
                print!("to stdout as {user}");
                eprint!("to stderr");
                std::process::exit(3);
            }
            Ok("flood") => {
                let mut out = std::io::stdout().lock();
                out.write_all(&[b'x'; 100_000]).unwrap();
                out.flush().unwrap();
                std::process::exit(0);
            }
            Ok("tree") => {
                let mut grandchild = std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", &test_path(test), "--nocapture"])
                    .env(ROLE, "sleep")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                println!("\ngrandchild={}", grandchild.id());
                let _ = grandchild.wait();
                true
            }
            Ok("sleep") => {
                std::thread::sleep(Duration::from_secs(60));
                true
            }
            _ => false,
        }
    }

    /// This test executable as an allowlisted command: a copy in a folder
    /// of its own on drive C: (the Wine prefix's), because the allowlist's
    /// trust check walks every folder above a program, and the build tree
    /// may lie below one anybody can write (a clone in /tmp is `Z:\tmp\...`
    /// under Wine). The copy is this executable: it runs the tests' roles.
    fn me() -> String {
        static COPY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        COPY.get_or_init(|| {
            // Unique per run: Wine reuses small process ids, and an
            // executable of an earlier run may still be running.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::path::PathBuf::from(format!(
                r"C:\kva-exec-tests\{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let exe = dir.join("exec-tests.exe");
            std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
            exe.to_string_lossy().into_owned()
        })
        .clone()
    }

    fn context() -> Arc<Context> {
        let text = format!(
            "[security]\nenable_exec = true\nexec_env = [\"{ROLE}\"]\n\
             allowed_commands = ['{}', '{WHOAMI}', 'C:\\Windows\\System32\\no-such-program.exe']\n\
             [[security.commands]]\npath = 'hostname.exe'\nrun_as = 'Administrator'\n",
            me()
        );
        let config = Config::parse(&text, Path::new("agent.toml")).unwrap();
        let (_controller, shutdown) = crate::shutdown::channel();
        Context::with_auditor(config, shutdown, Arc::new(Auditor::new(Vec::new(), false)))
    }

    fn audit(ctx: &Context) -> PendingAudit {
        let origin = Origin::new(&crate::transport::Peer::Unix {
            pid: None,
            uid: None,
        });
        PendingAudit::open(ctx.auditor.clone(), &origin, Some("exec"), None)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Exec parameters; `role`: (test, part) to run this test executable
    /// as that test in that part.
    fn params(
        command: &str,
        role: Option<(&str, &str)>,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut p = json!({ "command": command });
        if let Some((test, role)) = role {
            p["args"] = json!(["--exact", test_path(test), "--nocapture"]);
            p["env"] = json!({ ROLE: role });
        }
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    async fn run(ctx: &Context, p: serde_json::Value) -> Result<ExecResult, ExecError> {
        exec(ctx, serde_json::from_value(p).unwrap(), &mut audit(ctx)).await
    }

    fn code(e: &ExecError) -> i64 {
        ErrorObject::from(e).code
    }

    /// Whether process `pid` is gone (or ends within 10 s).
    fn gone(pid: u32) -> bool {
        open_process(pid).is_none_or(|h| ends_within(&h, 10_000))
    }

    fn grandchild(stdout: &str) -> u32 {
        stdout
            .split_once("grandchild=")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no grandchild pid in {stdout:?}"))
    }

    #[test]
    fn a_command_runs_with_its_output_and_exit_code() {
        const NAME: &str = "a_command_runs_with_its_output_and_exit_code";
        if play_role(NAME) {
            return;
        }
        let ctx = context();
        runtime().block_on(async {
            let r = run(&ctx, params(&me(), Some((NAME, "exit3")), json!({})))
                .await
                .unwrap();
            assert_eq!((r.exit_code, r.signal, r.timed_out), (Some(3), None, false));
            let me = platform::lookup_uid(platform::current_uid()).unwrap();
            let line = format!("to stdout as {}", me.name);
            assert!(r.stdout.data.contains(&line), "{:?}", r.stdout);
            assert!(r.stderr.data.contains("to stderr"), "{:?}", r.stderr);
            // A system program, named in another case than the allowlist's.
            let r = run(
                &ctx,
                params(r"c:\windows\system32\WHOAMI.EXE", None, json!({})),
            )
            .await
            .unwrap();
            assert_eq!(r.exit_code, Some(0), "{r:?}");
            assert!(!r.stdout.data.trim().is_empty(), "{r:?}");
        });
    }

    #[test]
    fn a_timeout_kills_the_whole_tree() {
        const NAME: &str = "a_timeout_kills_the_whole_tree";
        if play_role(NAME) {
            return;
        }
        let ctx = context();
        runtime().block_on(async {
            let started = Instant::now();
            let r = run(
                &ctx,
                params(&me(), Some((NAME, "tree")), json!({"timeout_ms": 2000})),
            )
            .await
            .unwrap();
            assert!(r.timed_out, "{r:?}");
            assert_eq!(r.exit_code, Some(platform::KILLED_EXIT_CODE as i32));
            assert!(started.elapsed() < Duration::from_secs(20));
            assert!(gone(grandchild(&r.stdout.data)), "the grandchild survived");
        });
    }

    #[test]
    fn exec_kill_ends_the_whole_tree() {
        const NAME: &str = "exec_kill_ends_the_whole_tree";
        if play_role(NAME) {
            return;
        }
        let ctx = context();
        runtime().block_on(async {
            let p = serde_json::from_value(params(&me(), Some((NAME, "tree")), json!({}))).unwrap();
            let started = start_job(&ctx, p, &mut audit(&ctx)).await.unwrap();
            let status = |ctx: &Context| {
                status(
                    ctx,
                    ExecStatusParams {
                        handle: started.handle,
                        stdout_offset: 0,
                        stderr_offset: 0,
                        max_bytes: None,
                    },
                    &mut audit(ctx),
                )
                .unwrap()
            };
            let t = Instant::now();
            let out = loop {
                let s = status(&ctx);
                if s.stdout.data.contains("grandchild=") && s.stdout.data.ends_with('\n') {
                    break s.stdout.data;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "no output: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let pid = grandchild(&out);
            let term = kill(
                &ctx,
                ExecKillParams {
                    handle: started.handle,
                    signal: Signal::Term,
                },
                &mut audit(&ctx),
            )
            .unwrap_err();
            assert_eq!(code(&term), -32006);
            assert!(!status(&ctx).exited);
            kill(
                &ctx,
                ExecKillParams {
                    handle: started.handle,
                    signal: Signal::Kill,
                },
                &mut audit(&ctx),
            )
            .unwrap();
            let t = Instant::now();
            let s = loop {
                let s = status(&ctx);
                if s.exited {
                    break s;
                }
                assert!(t.elapsed() < Duration::from_secs(10), "still running");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(s.exit_code, Some(platform::KILLED_EXIT_CODE as i32));
            assert!(!s.timed_out);
            assert!(gone(pid), "the grandchild survived");
        });
    }

    #[test]
    fn output_is_cut_at_the_limit() {
        const NAME: &str = "output_is_cut_at_the_limit";
        if play_role(NAME) {
            return;
        }
        let ctx = context();
        runtime().block_on(async {
            let r = run(
                &ctx,
                params(
                    &me(),
                    Some((NAME, "flood")),
                    json!({"max_output_bytes": 1000}),
                ),
            )
            .await
            .unwrap();
            assert_eq!(r.exit_code, Some(0));
            assert_eq!(r.stdout.data.len(), 1000);
            assert!(r.stdout_truncated && !r.stderr_truncated);
        });
    }

    #[test]
    fn refusals() {
        let ctx = context();
        runtime().block_on(async {
            // Allowed, but not on this system.
            let missing = r"C:\Windows\System32\no-such-program.exe";
            let e = run(&ctx, params(missing, None, json!({})))
                .await
                .unwrap_err();
            assert_eq!(code(&e), i64::from(ErrorCode::NotFound.code()), "{e}");
            assert!(ErrorObject::from(&e).data.unwrap()["reason"]
                .as_str()
                .unwrap()
                .contains("not found"));
            // Not allowed; without the extension; a batch file.
            for name in [
                r"C:\Windows\System32\ipconfig.exe",
                r"C:\Windows\System32\whoami",
                r"C:\Windows\System32\x.bat",
            ] {
                let e = run(&ctx, params(name, None, json!({}))).await.unwrap_err();
                assert_eq!(code(&e), -32000, "{name}: {e}");
            }
            // run_as is not supported on Windows.
            let e = run(&ctx, params("hostname.exe", None, json!({})))
                .await
                .unwrap_err();
            assert_eq!(code(&e), -32006, "{e}");
            // Nothing refused holds a process slot.
            assert_eq!(
                ctx.exec.running.available_permits(),
                ctx.config.limits.max_processes as usize
            );
        });
    }
}
