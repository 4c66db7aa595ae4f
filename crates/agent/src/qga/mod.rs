//! The qemu-guest-agent front end: qemu-ga's protocol on qemu-ga's port, so
//! that libvirt, Proxmox and other hosts wired to qemu-ga work unchanged,
//! under this agent's policy and audit trail (docs/qga-compat.md).
//!
//! ```text
//! stream ──read──▶ stream::Splitter ──▶ schema::envelope ──▶ commands::handle
//!                                                               │ dispatch::admit_call
//! stream ◀─write── one compact JSON line per reply ◀────────────┘ (policy, audit)
//! ```
//!
//! - Requests are served one at a time, in order, as qemu-ga does: replies
//!   carry no mandatory id, so hosts match them by order. While a request
//!   runs or its reply waits for the host to read, nothing more is read:
//!   a host that stops reading stalls its own connection, at no CPU cost,
//!   and memory stays bounded by the message size limit. A running request
//!   holds one of the agent's request slots (`limits.max_requests_total`).
//! - Each connection starts with a fresh parser (unlike qemu-ga, a half
//!   request left by an earlier host does not garble the next one).
//! - Invalid input earns one error per bad message; after
//!   [`MAX_CONSECUTIVE_ERRORS`] errors in a row without a valid request,
//!   further errors are not sent until the host resynchronises (0xFF, or a
//!   valid request), so garbage can never make the agent write more than a
//!   bounded amount.
//! - Handles of `guest-exec` and `guest-file-open` are agent-wide, as with
//!   qemu-ga: a host may reconnect and carry on ([`State`]).

pub mod commands;
pub mod schema;
pub mod stream;
#[cfg(target_os = "linux")]
pub mod sysinfo;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_agent_protocol::codec::base64_encode;
use kvm_agent_protocol::methods::exec::ExecStatus as NativeExecStatus;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::audit::Origin;
use crate::context::Context;
use crate::shutdown::Phase;
use crate::transport::Connection;
use commands::{Capture, Reply};
use schema::QgaError;
use stream::{Event, Splitter};

/// qemu-ga's virtio-serial port name.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";

/// Errors answered in a row, without a valid request between them, before
/// the agent stops answering errors until the host resynchronises.
pub const MAX_CONSECUTIVE_ERRORS: u32 = 16;

const READ_BUF: usize = 64 * 1024;

/// Agent-wide QGA state: what `guest-exec` and `guest-file-open` handed out.
#[derive(Debug, Default)]
pub struct State {
    exec: Mutex<HashMap<i64, ExecJob>>,
    files: Mutex<HashMap<i64, FileState>>,
}

/// A `guest-exec` process as the QGA front end follows it.
#[derive(Clone, Debug, Default)]
pub struct ExecJob {
    /// The native `exec_start` handle.
    pub handle: u64,
    /// Output offsets to ask the native `exec_status` for next.
    pub next: [u64; 2],
    capture: Capture,
    out: [Vec<u8>; 2],
    truncated: [bool; 2],
    serial: u64,
}

#[derive(Clone, Copy, Debug)]
struct FileState {
    pos: u64,
    /// Reading: the size when opened. Writing: the end written so far.
    size: u64,
    write: bool,
}

/// Most `guest-exec` processes followed at once (finished ones whose
/// status the host never asked for are forgotten first).
const MAX_EXEC_JOBS: usize = 1024;
/// Most file handles followed at once.
const MAX_FILES: usize = 4096;

impl State {
    fn exec_started(&self, pid: i64, handle: u64, capture: Capture) {
        let mut jobs = self.exec.lock().unwrap();
        let serial = jobs.values().map(|j| j.serial).max().unwrap_or(0) + 1;
        if jobs.len() >= MAX_EXEC_JOBS {
            if let Some(oldest) = jobs.iter().min_by_key(|(_, j)| j.serial).map(|(p, _)| *p) {
                jobs.remove(&oldest);
            }
        }
        jobs.insert(
            pid,
            ExecJob {
                handle,
                capture,
                serial,
                ..ExecJob::default()
            },
        );
    }

    fn exec_job(&self, pid: i64) -> Option<ExecJob> {
        self.exec.lock().unwrap().get(&pid).cloned()
    }

    /// Take what the native `exec_status` returned: keep the captured
    /// output (up to `cap` bytes per stream, the rest counted as
    /// truncated) and answer `exited` once the process exited and all of
    /// its output has been read.
    fn exec_progress(&self, pid: i64, st: NativeExecStatus, cap: u64) -> schema::ExecStatus {
        let mut jobs = self.exec.lock().unwrap();
        let Some(job) = jobs.get_mut(&pid) else {
            return schema::ExecStatus::default();
        };
        let captured = [job.capture.0, job.capture.1];
        for (i, piece) in [&st.stdout, &st.stderr].into_iter().enumerate() {
            if !captured[i] {
                continue;
            }
            let bytes = commands::output_bytes(piece);
            let room = (cap as usize).saturating_sub(job.out[i].len());
            if bytes.len() > room {
                job.truncated[i] = true;
            }
            job.out[i].extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        job.next = [st.stdout_next_offset, st.stderr_next_offset];
        if !(st.exited && st.output_complete) {
            return schema::ExecStatus::default();
        }
        let job = jobs.remove(&pid).unwrap_or_default();
        let data = |i: usize| captured[i].then(|| base64_encode(&job.out[i]));
        let truncated = |i: usize| job.truncated[i].then_some(true);
        schema::ExecStatus {
            exited: true,
            exitcode: st.exit_code.map(i64::from),
            signal: st.signal.map(i64::from),
            out_data: data(0),
            err_data: data(1),
            out_truncated: truncated(0),
            err_truncated: truncated(1),
        }
    }

    fn file_opened(&self, handle: u64, write: bool, size: Option<u64>) {
        let mut files = self.files.lock().unwrap();
        if files.len() >= MAX_FILES {
            if let Some(oldest) = files.keys().min().copied() {
                files.remove(&oldest);
            }
        }
        files.insert(
            handle as i64,
            FileState {
                pos: 0,
                size: size.unwrap_or(0),
                write,
            },
        );
    }

    fn file_pos(&self, handle: i64) -> Option<u64> {
        self.files.lock().unwrap().get(&handle).map(|f| f.pos)
    }

    fn file_advance(&self, handle: i64, n: u64) {
        if let Some(f) = self.files.lock().unwrap().get_mut(&handle) {
            f.pos += n;
            if f.write {
                f.size = f.size.max(f.pos);
            }
        }
    }

    fn file_seek(
        &self,
        handle: i64,
        offset: i64,
        whence: i64,
    ) -> Result<schema::FileSeek, QgaError> {
        let mut files = self.files.lock().unwrap();
        let f = files
            .get_mut(&handle)
            .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))?;
        let base = match whence {
            0 => 0,
            1 => f.pos as i64,
            _ => f.size as i64,
        };
        let pos = base
            .checked_add(offset)
            .filter(|p| *p >= 0)
            .ok_or_else(|| QgaError::generic("failed to seek file: Invalid argument"))?;
        f.pos = pos as u64;
        Ok(schema::FileSeek {
            position: f.pos,
            eof: !f.write && f.pos >= f.size,
        })
    }

    fn file_closed(&self, handle: i64) {
        self.files.lock().unwrap().remove(&handle);
    }
}

/// Serve one host in qemu-ga's protocol until it disconnects or the agent
/// shuts down.
pub async fn serve(ctx: Arc<Context>, conn: Connection) {
    let Connection {
        stream,
        initial,
        peer,
    } = conn;
    log::debug!("serving {peer} (qemu-guest-agent protocol)");
    let origin = Origin::new(&peer);
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut splitter = Splitter::new(ctx.config.limits.max_frame_bytes as usize);
    let mut errors = 0u32;
    let mut buf = vec![0u8; READ_BUF];
    let mut pending = initial;
    loop {
        let mut input = &pending[..];
        while !input.is_empty() {
            let (used, event) = splitter.push(input);
            // A 0xFF resynchronises: errors may be answered again.
            if input[..used].contains(&0xFF) {
                errors = 0;
            }
            input = &input[used..];
            let Some(event) = event else { continue };
            let (reply, id) = match event {
                Event::Message(m) => {
                    // Each request holds one of the agent's request slots
                    // while it runs (so that shutdown waits for it and
                    // `max_requests_total` counts it); with none free, it
                    // waits for one, as the host waits for its reply.
                    let slot = tokio::select! {
                        biased;
                        _ = ctx.shutdown.reached(Phase::Draining) => return,
                        s = ctx.request_slots.clone().acquire_owned() => s,
                    };
                    let Ok(slot) = slot else { return };
                    let answer = commands::handle(&ctx, &ctx.qga, &origin, &m).await;
                    drop(slot);
                    answer
                }
                Event::BadRun => (
                    Reply::Error(QgaError::generic("JSON parse error, expecting value")),
                    None,
                ),
                Event::TooDeep => (
                    Reply::Error(QgaError::generic("JSON nesting depth limit exceeded")),
                    None,
                ),
                Event::TooLarge { limit } => {
                    log::info!("{peer}: skipping a message larger than {limit} bytes");
                    (
                        Reply::Error(QgaError::generic(format!(
                            "JSON message larger than {limit} bytes (limits.max_frame_bytes)"
                        ))),
                        None,
                    )
                }
            };
            if matches!(reply, Reply::Error(_)) {
                errors += 1;
                if errors == MAX_CONSECUTIVE_ERRORS + 1 {
                    log::info!("{peer}: {MAX_CONSECUTIVE_ERRORS} errors in a row; not answering errors until the host resynchronises");
                }
                if errors > MAX_CONSECUTIVE_ERRORS {
                    continue;
                }
            } else {
                errors = 0;
            }
            let Some(bytes) = encode(&reply, id.as_ref()) else {
                continue;
            };
            let wrote = tokio::select! {
                biased;
                _ = ctx.shutdown.reached(Phase::Cancelling) => return,
                w = async { writer.write_all(&bytes).await?; writer.flush().await } => w,
            };
            if let Err(e) = wrote {
                log::debug!("{peer}: write failed: {e}");
                return;
            }
        }
        pending.clear();
        let read = tokio::select! {
            biased;
            _ = ctx.shutdown.reached(Phase::Draining) => return,
            r = reader.read(&mut buf) => r,
        };
        match read {
            Ok(0) => {
                if !splitter.is_idle() {
                    log::info!("{peer}: dropped a partial message");
                }
                log::debug!("{peer} disconnected");
                return;
            }
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) => {
                log::info!("{peer}: read failed: {e}");
                return;
            }
        }
    }
}

/// One reply line (`None`: no reply).
fn encode(reply: &Reply, id: Option<&Value>) -> Option<Vec<u8>> {
    let mut obj = serde_json::Map::new();
    let mut out = Vec::new();
    match reply {
        Reply::Nothing => return None,
        Reply::Return(v) => {
            obj.insert("return".into(), v.clone());
        }
        Reply::Delimited(v) => {
            out.push(0xFF);
            obj.insert("return".into(), v.clone());
        }
        Reply::Error(e) => {
            obj.insert(
                "error".into(),
                serde_json::to_value(e).unwrap_or(Value::Null),
            );
        }
    }
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    serde_json::to_writer(&mut out, &obj).ok()?;
    out.push(b'\n');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_agent_protocol::methods::exec::{Encoding, Output};
    use serde_json::json;

    #[test]
    fn replies_are_one_line_with_the_id() {
        let r = encode(&Reply::Return(json!({})), Some(&json!("a"))).unwrap();
        assert_eq!(r, b"{\"id\":\"a\",\"return\":{}}\n");
        let r = encode(&Reply::Delimited(json!(7)), None).unwrap();
        assert_eq!(r, b"\xff{\"return\":7}\n");
        let r = encode(&Reply::Error(QgaError::not_found("x")), None).unwrap();
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["error"]["class"], "CommandNotFound");
        assert!(encode(&Reply::Nothing, None).is_none());
    }

    fn native(out: &str, exited: bool, complete: bool, next: u64) -> NativeExecStatus {
        let o = |s: &str| Output {
            encoding: Encoding::Utf8,
            data: s.into(),
        };
        NativeExecStatus {
            exited,
            exit_code: exited.then_some(3),
            signal: None,
            timed_out: false,
            stdout: o(out),
            stderr: o(""),
            stdout_next_offset: next,
            stderr_next_offset: 0,
            output_complete: complete,
        }
    }

    #[test]
    fn exec_output_is_gathered_capped_and_given_once_complete() {
        let s = State::default();
        s.exec_started(10, 1, (true, false));
        let st = s.exec_progress(10, native("abcd", false, false, 4), 6);
        assert!(!st.exited);
        assert_eq!(s.exec_job(10).unwrap().next, [4, 0]);
        let st = s.exec_progress(10, native("efgh", true, true, 8), 6);
        assert!(st.exited);
        assert_eq!(st.exitcode, Some(3));
        assert_eq!(
            st.out_data.as_deref(),
            Some(base64_encode(b"abcdef").as_str())
        );
        assert_eq!(st.out_truncated, Some(true));
        assert_eq!(st.err_data, None, "stderr was not captured");
        assert!(s.exec_job(10).is_none(), "released once complete");
    }

    #[test]
    fn file_positions_and_seek() {
        let s = State::default();
        s.file_opened(5, false, Some(10));
        s.file_advance(5, 4);
        assert_eq!(s.file_pos(5), Some(4));
        let r = s.file_seek(5, -1, 2).unwrap();
        assert_eq!((r.position, r.eof), (9, false));
        let r = s.file_seek(5, 1, 1).unwrap();
        assert_eq!((r.position, r.eof), (10, true));
        assert!(s.file_seek(5, -11, 1).is_err());
        assert!(s.file_seek(6, 0, 0).is_err());
        s.file_closed(5);
        assert_eq!(s.file_pos(5), None);
    }
}
