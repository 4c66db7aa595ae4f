//! One live connection: a reader task that routes responses to waiting
//! callers by id, and a writer task that owns the write half so frames never
//! interleave.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_agent_protocol::attachment::Attachment;
use kvm_agent_protocol::auth as wire_auth;
use kvm_agent_protocol::buffers;
use kvm_agent_protocol::frame::{self, Decoded, FrameDecoder};
use kvm_agent_protocol::jsonrpc::{self, FromAgent, Id, Response};
use kvm_agent_protocol::notifications::{AgentReady, AGENT_READY};
use kvm_agent_protocol::{ErrorCode, ErrorObject};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::{now_ms, random_nonce, AuthKey};
use crate::error::ClientError;
use crate::transport::BoxStream;

/// Something the agent sent that no pending call can be given.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Unmatched {
    /// An error response with a null id (a frame-level error such as
    /// "parse error" or "payload too large") while several calls were in
    /// flight, so it cannot be known which one it answers.
    ErrorResponse(ErrorObject),
    /// A frame over `max_frame_bytes` was skipped while several calls were
    /// in flight; one of them will not get its answer and will time out.
    FrameTooLarge {
        /// The length the frame header announced.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A well-formed message that fits nothing: a response with a null id
    /// carrying a result, or one whose id is not a number this client issued.
    Unexpected(String),
}

/// Receives every [`Unmatched`] event; see [`crate::ClientOptions::on_unmatched`].
pub type UnmatchedHandler = Arc<dyn Fn(Unmatched) + Send + Sync>;

/// A result and, when the agent attached bytes to it, its attachment.
pub(crate) type Answer = (Box<RawValue>, Option<Attachment>);

type Reply = Result<Answer, ClientError>;

/// A frame for the writer, and the attachment that follows it, written from
/// its own buffer.
type Outgoing = (Vec<u8>, Option<Vec<u8>>);

/// Ids whose caller gave up after the request was sent: their answers are
/// still due. Bounded so a hung agent cannot grow it without end.
const MAX_ABANDONED: usize = 4096;

/// Frames queued for the writer before callers wait.
const WRITE_QUEUE: usize = 64;

/// Size of the reader's buffer; larger frame bodies are read straight into
/// the decoder's buffer.
const READ_BUF: usize = 64 * 1024;

#[derive(Clone, Debug)]
enum CloseReason {
    Disconnected(String),
    Protocol(String),
    Authentication(String),
}

impl CloseReason {
    fn to_error(&self) -> ClientError {
        match self {
            CloseReason::Disconnected(s) => ClientError::Disconnected(s.clone()),
            CloseReason::Protocol(s) => ClientError::Protocol(s.clone()),
            CloseReason::Authentication(s) => ClientError::Authentication(s.clone()),
        }
    }
}

#[derive(Default)]
struct Calls {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// With authentication: the nonce each pending request was signed with.
    nonces: HashMap<u64, String>,
    abandoned: HashSet<u64>,
    /// The abandoned set overflowed: stop attributing null-id errors.
    abandoned_overflow: bool,
    closed: Option<CloseReason>,
}

impl Calls {
    /// The single request still unanswered on this connection, if there is
    /// exactly one. The agent answers every request frame exactly once and
    /// this client sends nothing else, so an answer that names no id must
    /// belong to it.
    fn sole_outstanding(&mut self) -> Option<oneshot::Sender<Reply>> {
        if self.pending.len() != 1 || !self.abandoned.is_empty() || self.abandoned_overflow {
            return None;
        }
        let id = *self.pending.keys().next()?;
        self.nonces.remove(&id);
        self.pending.remove(&id)
    }
}

#[derive(Clone, Debug, Default)]
struct Status {
    ready: Option<AgentReady>,
    closed: bool,
}

struct Shared {
    calls: Mutex<Calls>,
    status: watch::Sender<Status>,
    latest_ready: Arc<Mutex<Option<AgentReady>>>,
    on_unmatched: Option<UnmatchedHandler>,
    auth: Option<AuthKey>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; recover anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Mark the connection dead and fail every pending call.
    fn close(&self, reason: CloseReason) {
        let drained: Vec<_> = {
            let mut calls = lock(&self.calls);
            if calls.closed.is_some() {
                return;
            }
            calls.closed = Some(reason.clone());
            calls.abandoned.clear();
            calls.nonces.clear();
            calls.pending.drain().map(|(_, tx)| tx).collect()
        };
        for tx in drained {
            let _ = tx.send(Err(reason.to_error()));
        }
        self.status.send_modify(|s| s.closed = true);
    }

    fn unmatched(&self, event: Unmatched) {
        if let Some(handler) = &self.on_unmatched {
            handler(event);
        }
    }

    /// Handle one frame; `Err` means the connection must be closed.
    fn on_frame(&self, body: Vec<u8>) -> Result<(), CloseReason> {
        match jsonrpc::parse_from_agent_owned(body) {
            Err(e) => Err(CloseReason::Protocol(e.to_string())),
            Ok(FromAgent::Notification(n)) => {
                if n.method == AGENT_READY {
                    if let Some(key) = &self.auth {
                        wire_auth::verify_notification(&key.0, &n).map_err(|e| {
                            CloseReason::Authentication(format!(
                                "agent_ready: {e} (is authentication on in the agent?)"
                            ))
                        })?;
                    }
                    let params = n.params.as_deref().map_or("null", RawValue::get);
                    let ready: AgentReady = serde_json::from_str(params).map_err(|e| {
                        CloseReason::Protocol(format!("agent_ready with invalid params: {e}"))
                    })?;
                    *lock(&self.latest_ready) = Some(ready.clone());
                    self.status.send_modify(|s| s.ready = Some(ready));
                }
                // Other notifications are newer than this client: ignore them.
                Ok(())
            }
            Ok(FromAgent::Response(r)) => self.route(r),
            Ok(FromAgent::Batch(rs)) => rs.into_iter().try_for_each(|r| self.route(r)),
        }
    }

    /// Hand a response to its caller. With authentication, a response
    /// without a valid MAC fails its call and closes the connection.
    fn route(&self, r: Response) -> Result<(), CloseReason> {
        match r.id {
            Id::Number(ref n) if n.as_u64().is_some() => {
                let id = n.as_u64().unwrap_or_default();
                let (tx, nonce) = {
                    let mut calls = lock(&self.calls);
                    calls.abandoned.remove(&id);
                    (calls.pending.remove(&id), calls.nonces.remove(&id))
                };
                // No sender: the caller timed out or went away; drop the answer.
                let Some(tx) = tx else { return Ok(()) };
                if let Some(key) = &self.auth {
                    let nonce = nonce.unwrap_or_default();
                    let refused_auth = r.auth.is_none()
                        && matches!(&r.outcome, Err(e) if e.kind() == Some(ErrorCode::AuthenticationFailed));
                    if !refused_auth {
                        if let Err(e) =
                            wire_auth::verify_response(&key.0, &id.to_string(), &nonce, &r)
                        {
                            let msg = format!("the response to request {id}: {e}");
                            let _ = tx.send(Err(ClientError::Authentication(msg.clone())));
                            return Err(CloseReason::Authentication(msg));
                        }
                    }
                }
                let attachment = r.attachment;
                let _ = tx.send(
                    r.outcome
                        .map(|result| (result, attachment))
                        .map_err(ClientError::Agent),
                );
            }
            Id::Null => match r.outcome {
                Err(e) => {
                    let sole = lock(&self.calls).sole_outstanding();
                    match sole {
                        Some(tx) => {
                            let _ = tx.send(Err(ClientError::Agent(e)));
                        }
                        None => self.unmatched(Unmatched::ErrorResponse(e)),
                    }
                }
                Ok(v) => self.unmatched(Unmatched::Unexpected(format!(
                    "a result with a null id: {}",
                    v.get()
                ))),
            },
            other => self.unmatched(Unmatched::Unexpected(format!(
                "a response with id {other}, which this client never issued"
            ))),
        }
        Ok(())
    }

    fn on_too_large(&self, len: u32, max: u32) {
        let sole = lock(&self.calls).sole_outstanding();
        match sole {
            Some(tx) => {
                let _ = tx.send(Err(ClientError::FrameTooLarge {
                    len: len.into(),
                    max,
                }));
            }
            None => self.unmatched(Unmatched::FrameTooLarge { len, max }),
        }
    }
}

/// A live connection to the agent.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    frames: mpsc::Sender<Outgoing>,
    max_frame_bytes: u32,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closed", &self.is_closed())
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.shared.close(CloseReason::Disconnected(
            "the connection was replaced or the client dropped".into(),
        ));
    }
}

impl Connection {
    /// Start the reader and writer tasks on `stream`.
    pub(crate) fn start(
        stream: BoxStream,
        max_frame_bytes: u32,
        latest_ready: Arc<Mutex<Option<AgentReady>>>,
        on_unmatched: Option<UnmatchedHandler>,
        auth: Option<AuthKey>,
    ) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            calls: Mutex::new(Calls::default()),
            status: watch::Sender::new(Status::default()),
            latest_ready,
            on_unmatched,
            auth,
        });
        let (frames, rx) = mpsc::channel(WRITE_QUEUE);
        let reader = tokio::spawn(read_loop(rd, shared.clone(), max_frame_bytes));
        let writer = tokio::spawn(write_loop(wr, rx, shared.clone()));
        Self {
            shared,
            frames,
            max_frame_bytes,
            reader,
            writer,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.shared.calls).closed.is_some()
    }

    /// The `agent_ready` of this connection, waiting for it if need be.
    pub(crate) async fn ready(&self) -> Result<AgentReady, ClientError> {
        let mut rx = self.shared.status.subscribe();
        let status = rx
            .wait_for(|s| s.ready.is_some() || s.closed)
            .await
            .map(|s| s.clone())
            .unwrap_or_default();
        match status.ready {
            Some(r) => Ok(r),
            None => Err(self.close_error()),
        }
    }

    fn close_error(&self) -> ClientError {
        lock(&self.shared.calls)
            .closed
            .as_ref()
            .map(CloseReason::to_error)
            .unwrap_or_else(|| ClientError::Disconnected("the connection closed".into()))
    }

    /// Send one request and wait for its answer. Cancel-safe: a dropped
    /// future leaves no half-written frame and no entry in the pending map.
    ///
    /// `attachment`: bytes sent after the request's JSON in the same frame
    /// (protocol 1.1: only `file_write` takes them, and only without
    /// authentication).
    pub(crate) async fn request<P: Serialize>(
        &self,
        id: u64,
        method: &str,
        params: Option<&P>,
        attachment: Option<Vec<u8>>,
    ) -> Reply {
        let mut buf = vec![0u8; frame::HEADER_LEN];
        let mut nonce = None;
        match &self.shared.auth {
            None => jsonrpc::write_request(&mut buf, Some(&Id::from(id)), method, params).map_err(
                |e| ClientError::Protocol(format!("could not encode the params of {method}: {e}")),
            )?,
            Some(key) => {
                let fresh = random_nonce();
                wire_auth::write_signed_request(
                    &mut buf,
                    &key.0,
                    Some(&Id::from(id)),
                    method,
                    params,
                    now_ms(),
                    &fresh,
                )
                .map_err(|e| {
                    ClientError::Protocol(format!("could not encode the request {method}: {e}"))
                })?;
                nonce = Some(wire_auth::nonce_hex(&fresh));
            }
        }
        if attachment.is_some() {
            buf.push(kvm_agent_protocol::attachment::SEPARATOR);
        }
        let len = buf.len() - frame::HEADER_LEN + attachment.as_ref().map_or(0, Vec::len);
        if len > self.max_frame_bytes as usize {
            return Err(ClientError::RequestTooLarge {
                len: len as u64,
                max: self.max_frame_bytes,
            });
        }
        buf[..frame::HEADER_LEN].copy_from_slice(&frame::header(len as u32));

        let (tx, rx) = oneshot::channel();
        {
            let mut calls = lock(&self.shared.calls);
            if let Some(reason) = &calls.closed {
                return Err(reason.to_error());
            }
            calls.pending.insert(id, tx);
            if let Some(nonce) = nonce {
                calls.nonces.insert(id, nonce);
            }
        }
        let mut guard = PendingGuard {
            shared: &self.shared,
            id,
            sent: false,
        };
        if self.frames.send((buf, attachment)).await.is_err() {
            return Err(self.close_error());
        }
        guard.sent = true;
        // Once answered, the router has already removed the entry, so the
        // guard's drop is a no-op.
        rx.await.unwrap_or_else(|_| Err(self.close_error()))
    }
}

/// Removes a call from the pending map when its caller gives up.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    sent: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut calls = lock(&self.shared.calls);
        calls.nonces.remove(&self.id);
        if calls.pending.remove(&self.id).is_some() && self.sent && calls.closed.is_none() {
            // The request is on the wire and its answer is still due.
            if calls.abandoned.len() < MAX_ABANDONED {
                calls.abandoned.insert(self.id);
            } else {
                calls.abandoned_overflow = true;
            }
        }
    }
}

async fn read_loop(mut rd: ReadHalf<BoxStream>, shared: Arc<Shared>, max_frame_bytes: u32) {
    let mut dec = FrameDecoder::new(max_frame_bytes);
    let mut buf = vec![0u8; READ_BUF];
    let eof = || CloseReason::Disconnected("the agent closed the connection".into());
    let reason = 'outer: loop {
        // A large body is read straight into the decoder's buffer.
        if let Some(missing) = dec.body_bytes_missing().filter(|m| *m > READ_BUF) {
            let want = missing.min(4 * 1024 * 1024);
            let Some(spare) = dec.body_spare(0) else {
                continue;
            };
            // A pooled buffer (a downloaded chunk's buffer returns to the
            // pool once written), so large frames cost no new allocation,
            // page faults or zeroing.
            buffers::reserve_pooled(spare, missing);
            match (&mut rd).take(want as u64).read_buf(spare).await {
                Ok(0) => break eof(),
                Ok(_) => {}
                Err(e) => break CloseReason::Disconnected(format!("read failed: {e}")),
            }
            if let Some(Decoded::Frame(body)) = dec.commit_body() {
                if let Err(r) = shared.on_frame(body) {
                    break r;
                }
            }
            continue;
        }
        let n = match rd.read(&mut buf).await {
            Ok(0) => break eof(),
            Ok(n) => n,
            Err(e) => break CloseReason::Disconnected(format!("read failed: {e}")),
        };
        let mut input = &buf[..n];
        while !input.is_empty() {
            let (used, event) = dec.decode(input);
            input = &input[used..];
            match event {
                Some(Decoded::Frame(body)) => {
                    if let Err(r) = shared.on_frame(body) {
                        break 'outer r;
                    }
                }
                Some(Decoded::TooLarge { len, max }) => shared.on_too_large(len, max),
                None => {}
            }
        }
    };
    shared.close(reason);
}

async fn write_loop(
    mut wr: WriteHalf<BoxStream>,
    mut frames: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut status = shared.status.subscribe();
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let Some((frame, attachment)) = frame else { break };
                let mut written = wr.write_all(&frame).await;
                if let Some(bytes) = attachment {
                    if written.is_ok() {
                        written = wr.write_all(&bytes).await;
                    }
                    // An uploaded chunk's buffer serves the next chunk.
                    buffers::recycle(bytes);
                }
                if let Err(e) = written {
                    shared.close(CloseReason::Disconnected(format!("write failed: {e}")));
                    break;
                }
            }
            _ = async { let _ = status.wait_for(|s| s.closed).await; } => break,
        }
    }
    let _ = wr.shutdown().await;
}
