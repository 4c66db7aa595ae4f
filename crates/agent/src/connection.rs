//! One host connection: frames in, requests dispatched, responses out.
//!
//! ```text
//! stream ──read──▶ FrameDecoder ──▶ jsonrpc::parse_frame ──▶ dispatch::execute
//!                                                                  │
//! stream ◀─write── writer task ◀── byte-budgeted queue ◀── encoded response
//! ```
//!
//! - `ping` and `get_capabilities` (and every error found while parsing) are
//!   answered in line, so they never wait behind slow work.
//! - Other requests run as tasks; each needs a slot from this connection
//!   (`limits.max_requests_per_connection`) and from the agent
//!   (`limits.max_requests_total`), else it is answered `busy` at once.
//! - Responses queue for the writer under a byte budget: a host that stops
//!   reading stalls its own requests and then this reader, costing no CPU,
//!   and memory stays bounded.
//! - When the host goes away the writer is stopped at once, so no response
//!   of an old session can reach the next host on a virtio-serial port, and
//!   the frame decoder starts afresh with the next connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BufMut;
use kvm_agent_protocol::attachment;
use kvm_agent_protocol::auth::{self, ResponseSigner};
use kvm_agent_protocol::frame::{self, Decoded, FrameDecoder, HEADER_LEN};
use kvm_agent_protocol::jsonrpc::{self, Id, Incoming, Rejected, Request};
use kvm_agent_protocol::notifications::{AgentReady, AGENT_READY};
use kvm_agent_protocol::{ErrorCode, ErrorObject, PROTOCOL_VERSION};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::audit::{Decision, Origin};
use crate::context::Context;
use crate::dispatch::{self, Admitted, Refusal, Reply, ReplyWritten, Route};
use crate::platform;
use crate::shutdown::Phase;
use crate::transport::{Connection, Peer};
use kvm_agent_protocol::buffers;

/// Read buffer size; larger frame bodies are read straight into place.
const READ_BUF: usize = 64 * 1024;

/// One encoded frame on its way to the writer, holding its share of the
/// connection's output budget until written, and who to tell once it is
/// flushed (the calls that act after answering: shutdown, reboot).
/// A frame's attachment, when it has one, is written after it from its own
/// buffer (which then returns to the pool).
type Outgoing = (
    Vec<u8>,
    Option<Vec<u8>>,
    Option<OwnedSemaphorePermit>,
    Vec<ReplyWritten>,
);

/// Serve one host until it disconnects or the agent shuts down.
pub async fn serve(ctx: Arc<Context>, conn: Connection) {
    let Connection {
        stream,
        initial,
        peer,
    } = conn;
    log::debug!("serving {peer}");
    let (mut reader, writer) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut writer = tokio::spawn(write_loop(writer, rx));
    let max_frame = ctx.config.limits.max_frame_bytes;
    let out = Responder {
        tx,
        budget: Arc::new(Semaphore::new(output_budget(max_frame))),
        max_frame,
    };
    let mut session = Session {
        ctx: ctx.clone(),
        out,
        slots: Arc::new(Semaphore::new(
            ctx.config.limits.max_requests_per_connection as usize,
        )),
        tasks: JoinSet::new(),
        origin: Origin::new(&peer),
        peer,
    };
    session.announce().await;

    let mut decoder = FrameDecoder::new(max_frame);
    let mut buf = vec![0u8; READ_BUF];
    let mut pending = initial;
    let end = loop {
        if !pending.is_empty() {
            let input = std::mem::take(&mut pending);
            session.feed(&mut decoder, &input).await;
        }
        // Large bodies go straight into the frame buffer.
        let n = if decoder.body_bytes_missing().is_some_and(|m| m >= READ_BUF) {
            let missing = decoder.body_bytes_missing().unwrap_or(0);
            let body = decoder.body_spare(0).expect("in a body");
            // A pooled buffer (a file chunk's frame returns to the pool once
            // written), so large frames cost no new allocation.
            buffers::reserve_pooled(body, missing);
            // Straight into the spare capacity, never zeroed first, and never
            // past this frame's end.
            let mut spare = (&mut *body).limit(missing);
            let read = tokio::select! {
                biased;
                _ = ctx.shutdown.reached(Phase::Draining) => None,
                r = reader.read_buf(&mut spare) => Some(r),
            };
            let n = match read {
                Some(Ok(n)) => n,
                Some(Err(e)) => break End::Error(e),
                None => break End::Shutdown,
            };
            if let Some(Decoded::Frame(f)) = decoder.commit_body() {
                session.on_frame(f).await;
            }
            n
        } else {
            let read = tokio::select! {
                biased;
                _ = ctx.shutdown.reached(Phase::Draining) => None,
                r = reader.read(&mut buf) => Some(r),
            };
            match read {
                Some(Ok(n)) => {
                    pending.extend_from_slice(&buf[..n]);
                    n
                }
                Some(Err(e)) => break End::Error(e),
                None => break End::Shutdown,
            }
        };
        if n == 0 {
            break End::Disconnected;
        }
    };

    match end {
        End::Disconnected | End::Error(_) => {
            if let End::Error(e) = &end {
                log::info!("{}: read failed: {e}", session.peer);
            } else {
                log::debug!("{} disconnected", session.peer);
            }
            // Nothing more can reach this host: stop writing at once.
            writer.abort();
            if !decoder.is_idle() {
                log::info!("{}: dropped a partial frame", session.peer);
            }
            // Requests still running finish on their own; their answers
            // have nowhere to go.
            session.tasks.detach_all();
        }
        End::Shutdown => {
            // Let running requests answer (they are cancelled by the server
            // after the grace period), then flush.
            while session.tasks.join_next().await.is_some() {}
            drop(session);
            let _ = (&mut writer).await;
        }
    }
}

/// Tell a host it cannot be served now (`busy`, id null), then close.
pub async fn refuse_busy(conn: Connection, max_connections: u32) {
    let e = ErrorObject::with_message(ErrorCode::Busy, "Busy: max_connections reached")
        .data(json!({ "limit": "max_connections", "value": max_connections }));
    let framed = encode_response(&Id::Null, Err(&e), u32::MAX, None);
    let mut stream = conn.stream;
    let mut framed = framed;
    let len = (framed.len() - HEADER_LEN) as u32;
    framed[..HEADER_LEN].copy_from_slice(&frame::header(len));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(&framed).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

enum End {
    Disconnected,
    Error(std::io::Error),
    Shutdown,
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut w = BufWriter::with_capacity(READ_BUF, writer);
    // Dropped unfired when writing fails: the host is gone.
    let mut written: Vec<ReplyWritten> = Vec::new();
    while let Some((frame, attachment, permit, after)) = rx.recv().await {
        if write_frame(&mut w, &frame, attachment).await.is_err() {
            return;
        }
        drop(permit);
        written.extend(after);
        // Coalesce whatever else is ready into the same flush.
        while let Ok((frame, attachment, permit, after)) = rx.try_recv() {
            if write_frame(&mut w, &frame, attachment).await.is_err() {
                return;
            }
            drop(permit);
            written.extend(after);
        }
        if w.flush().await.is_err() {
            return;
        }
        written.drain(..).for_each(ReplyWritten::done);
    }
    let _ = w.flush().await;
}

/// Write one frame and its attachment (a large attachment bypasses the
/// write buffer: no copy), then give the attachment's buffer back.
async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    frame: &[u8],
    attachment: Option<Vec<u8>>,
) -> std::io::Result<()> {
    w.write_all(frame).await?;
    if let Some(bytes) = attachment {
        w.write_all(&bytes).await?;
        buffers::recycle(bytes);
    }
    Ok(())
}

/// Bytes of encoded responses a connection may have queued for its writer:
/// one maximal frame plus room for small answers. A host that stops reading
/// holds at most this much agent memory (plus the requests still running).
fn output_budget(max_frame: u32) -> usize {
    max_frame as usize + (1 << 20)
}

/// Sends encoded frames to the writer.
#[derive(Clone)]
struct Responder {
    tx: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<Semaphore>,
    max_frame: u32,
}

impl Responder {
    /// Queue a frame body (header added here), waiting for budget.
    async fn send_body(&self, framed: Vec<u8>) {
        self.send_body_then(framed, None, Vec::new()).await;
    }

    /// Queue a frame body and its attachment (which `framed` ends with the
    /// separator for), and fire `after` once it is flushed.
    async fn send_body_then(
        &self,
        mut framed: Vec<u8>,
        attachment: Option<Vec<u8>>,
        after: Vec<ReplyWritten>,
    ) {
        let attached = attachment.as_ref().map_or(0, Vec::len);
        let body_len = framed.len() - HEADER_LEN + attached;
        framed[..HEADER_LEN].copy_from_slice(&frame::header(body_len as u32));
        let cost = (framed.len() + attached).min(output_budget(self.max_frame)) as u32;
        let permit = self.budget.clone().acquire_many_owned(cost).await.ok();
        // A closed channel means the host is gone; the answer is dropped.
        let _ = self.tx.send((framed, attachment, permit, after));
    }

    /// Encode and queue one response, signed when `signer` is given.
    async fn respond(
        &self,
        id: &Id,
        outcome: Result<&RawValue, &ErrorObject>,
        signer: Option<&ResponseSigner>,
        after: Option<ReplyWritten>,
    ) {
        self.send_body_then(
            encode_response(id, outcome, self.max_frame, signer),
            None,
            after.into_iter().collect(),
        )
        .await;
    }

    /// Encode and queue a call's answer, with its attachment when it has
    /// one (replaced by a `payload_too_large` error when the whole would
    /// exceed the frame limit).
    async fn answer(
        &self,
        id: &Id,
        outcome: Result<Reply, ErrorObject>,
        signer: Option<&ResponseSigner>,
        after: Option<ReplyWritten>,
    ) {
        let after = after.into_iter().collect();
        match outcome {
            Ok(Reply {
                result,
                attachment: Some(bytes),
            }) => {
                let mut framed = encode_response(id, Ok(&result), self.max_frame, signer);
                let len = framed.len() - HEADER_LEN + 1 + bytes.len();
                if len > self.max_frame as usize {
                    buffers::recycle(bytes);
                    let e =
                        ErrorObject::with_message(ErrorCode::PayloadTooLarge, "Response too large")
                            .data(
                                json!({ "max_frame_bytes": self.max_frame, "response_bytes": len }),
                            );
                    let framed = encode_response(id, Err(&e), self.max_frame, signer);
                    self.send_body_then(framed, None, after).await;
                } else {
                    framed.push(attachment::SEPARATOR);
                    self.send_body_then(framed, Some(bytes), after).await;
                }
            }
            Ok(reply) => {
                let framed = encode_response(id, Ok(&reply.result), self.max_frame, signer);
                self.send_body_then(framed, None, after).await;
            }
            Err(e) => {
                let framed = encode_response(id, Err(&e), self.max_frame, signer);
                self.send_body_then(framed, None, after).await;
            }
        }
    }
}

/// Append a response: with an `auth` member when `signer` is given (the
/// request was authenticated), else plain.
fn write_outcome(
    out: &mut Vec<u8>,
    id: &Id,
    outcome: Result<&RawValue, &ErrorObject>,
    signer: Option<&ResponseSigner>,
) {
    match signer {
        Some(s) => auth::write_signed_response(out, id, outcome, s, crate::auth::now_ms()),
        None => jsonrpc::write_response(out, id, outcome),
    }
}

/// A response frame (header space reserved), replaced by a
/// `payload_too_large` error when it would exceed the frame limit.
fn encode_response(
    id: &Id,
    outcome: Result<&RawValue, &ErrorObject>,
    max_frame: u32,
    signer: Option<&ResponseSigner>,
) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    write_outcome(&mut out, id, outcome, signer);
    let len = out.len() - HEADER_LEN;
    if len > max_frame as usize {
        out.truncate(HEADER_LEN);
        let e = ErrorObject::with_message(ErrorCode::PayloadTooLarge, "Response too large")
            .data(json!({ "max_frame_bytes": max_frame, "response_bytes": len }));
        write_outcome(&mut out, id, Err(&e), signer);
    }
    out
}

struct Session {
    ctx: Arc<Context>,
    out: Responder,
    slots: Arc<Semaphore>,
    tasks: JoinSet<()>,
    origin: Origin,
    peer: Peer,
}

impl Session {
    /// First message of every connection; when authentication is on, signed
    /// with the current key (and the previous one, during a rollover).
    async fn announce(&self) {
        let ready = AgentReady {
            agent_version: crate::AGENT_VERSION.to_owned(),
            protocol_version: PROTOCOL_VERSION.to_owned(),
            boot_id: self.ctx.boot_id.clone(),
            os_family: platform::OS_FAMILY,
        };
        let mut out = vec![0u8; HEADER_LEN];
        match self.ctx.auth.keys() {
            [] => jsonrpc::write_request(&mut out, None, AGENT_READY, Some(&ready))
                .expect("AgentReady serializes"),
            keys => auth::write_signed_notification(
                &mut out,
                keys,
                AGENT_READY,
                Some(&ready),
                crate::auth::now_ms(),
                &crate::auth::random_nonce(),
            )
            .expect("AgentReady serializes"),
        }
        self.out.send_body(out).await;
    }

    async fn feed(&mut self, decoder: &mut FrameDecoder, mut input: &[u8]) {
        while !input.is_empty() {
            let (used, event) = decoder.decode(input);
            input = &input[used..];
            match event {
                Some(Decoded::Frame(f)) => self.on_frame(f).await,
                Some(Decoded::TooLarge { len, max }) => {
                    let e =
                        ErrorObject::with_message(ErrorCode::PayloadTooLarge, "Frame too large")
                            .data(json!({ "max_frame_bytes": max, "frame_bytes": len }));
                    log::info!(
                        "{}: skipping a frame of {len} bytes (limit {max})",
                        self.peer
                    );
                    self.reject(&Id::Null, &e).await;
                }
                None => {}
            }
        }
    }

    async fn on_frame(&mut self, frame: Vec<u8>) {
        self.reap_finished();
        let max_batch = self.ctx.config.limits.max_batch_len as usize;
        // An attachment stays in the frame's buffer on its way to the
        // handler, which gives the buffer back to the pool.
        let incoming = jsonrpc::parse_frame_owned(frame, max_batch);
        match incoming {
            Incoming::Invalid(e) => self.reject(&Id::Null, &e).await,
            Incoming::Single(Err(Rejected { id, error })) => self.reject(&id, &error).await,
            Incoming::Single(Ok(req)) => self.start(req).await,
            Incoming::Batch(items) => self.start_batch(items),
        }
    }

    /// Release the tasks that have finished. A `JoinSet` keeps each finished
    /// task (its allocation and output) until it is joined: without this,
    /// every request run as a task stayed in memory for as long as its
    /// connection (about 2 KiB per `get_info`, `get_metrics` or batch; one
    /// virtio-serial connection lasts as long as the agent). Their answers
    /// are already sent; a panic became an internal error in `run_task`.
    fn reap_finished(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }

    /// Take a task slot from this connection and from the agent, or say
    /// which limit is reached.
    fn take_slot(&self) -> Result<Slot, ErrorObject> {
        let busy = |limit: &str, value: u32| {
            ErrorObject::with_message(ErrorCode::Busy, format!("Busy: {limit} reached"))
                .data(json!({ "limit": limit, "value": value }))
        };
        let limits = &self.ctx.config.limits;
        let conn = self.slots.clone().try_acquire_owned().map_err(|_| {
            busy(
                "max_requests_per_connection",
                limits.max_requests_per_connection,
            )
        })?;
        let total = self
            .ctx
            .request_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy("max_requests_total", limits.max_requests_total))?;
        Ok(Slot {
            _conn: conn,
            _total: total,
        })
    }

    /// Admit a request (the dispatcher decodes it, checks the policy and
    /// opens its audit record) and find room for it: the admitted call, and
    /// the slot it holds when it runs as a task (`None`: answered in line).
    fn admit(&self, req: Request) -> Result<(Admitted, Option<Slot>), Refusal> {
        let admitted = dispatch::admit(&self.ctx, &self.origin, req)?;
        match admitted.route() {
            Route::Inline => Ok((admitted, None)),
            Route::Task => match self.take_slot() {
                Ok(slot) => Ok((admitted, Some(slot))),
                Err(busy) => Err(admitted.refuse_busy(busy)),
            },
        }
    }

    /// Answer a request refused before it ran (notifications get nothing).
    async fn refuse(&self, refusal: Refusal) {
        if let Some(id) = &refusal.id {
            self.out
                .respond(id, Err(&refusal.error), refusal.signer.as_ref(), None)
                .await;
        }
    }

    /// Answer a frame-level error, recording it in the audit trail.
    async fn reject(&self, id: &Id, error: &ErrorObject) {
        dispatch::reject(&self.ctx, &self.origin, Some(id), error);
        self.out.respond(id, Err(error), None, None).await;
    }

    async fn start(&mut self, req: Request) {
        match self.admit(req) {
            Err(refusal) => self.refuse(refusal).await,
            Ok((mut admitted, None)) => {
                let signer = admitted.signer.take();
                let written = admitted.reply_written.take();
                let (id, result) = run(&self.ctx, admitted).await;
                if let Some(id) = &id {
                    self.out.answer(id, result, signer.as_ref(), written).await;
                }
            }
            Ok((mut admitted, Some(slot))) => {
                let ctx = self.ctx.clone();
                let out = self.out.clone();
                let signer = admitted.signer.take();
                let written = admitted.reply_written.take();
                self.tasks.spawn(async move {
                    let (id, result) = run_task(ctx, admitted).await;
                    drop(slot);
                    if let Some(id) = &id {
                        out.answer(id, result, signer.as_ref(), written).await;
                    }
                });
            }
        }
    }

    /// A batch runs as one task; its members are admitted here, one by one,
    /// and run concurrently.
    fn start_batch(&mut self, items: Vec<Result<Request, Rejected>>) {
        let mut members = JoinSet::new();
        let mut answers: Vec<Option<Vec<u8>>> = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            answers.push(None);
            let req = match item {
                Err(Rejected { id, error }) => {
                    dispatch::reject(&self.ctx, &self.origin, Some(&id), &error);
                    answers[i] = Some(encode_member(&id, Err(&error), None));
                    continue;
                }
                Ok(req) => req,
            };
            let admitted = self.admit(req).and_then(|(admitted, slot)| {
                if admitted.wants_attachment() {
                    let e = ErrorObject::with_message(
                        ErrorCode::InvalidRequest,
                        "Invalid Request: a batch cannot carry an attachment",
                    )
                    .data(json!({ "reason": "attachment in a batch" }));
                    return Err(admitted.refuse(Decision::Invalid, e));
                }
                Ok((admitted, slot))
            });
            let (mut admitted, slot) = match admitted {
                Ok(admitted) => admitted,
                Err(Refusal { id, error, signer }) => {
                    answers[i] = id
                        .as_ref()
                        .map(|id| encode_member(id, Err(&error), signer.as_ref()));
                    continue;
                }
            };
            let signer = admitted.signer.take();
            let written = admitted.reply_written.take();
            let ctx = self.ctx.clone();
            members.spawn(async move {
                let (id, result) = match slot {
                    None => run(&ctx, admitted).await,
                    Some(slot) => {
                        let r = run_task(ctx, admitted).await;
                        drop(slot);
                        r
                    }
                };
                (
                    i,
                    id.map(|id| {
                        let outcome = result.as_ref().map(|r| &*r.result);
                        encode_member(&id, outcome, signer.as_ref())
                    }),
                    written,
                )
            });
        }
        let out = self.out.clone();
        self.tasks.spawn(async move {
            let mut after = Vec::new();
            while let Some(done) = members.join_next().await {
                match done {
                    Ok((i, answer, written)) => {
                        answers[i] = answer;
                        after.extend(written);
                    }
                    Err(e) => log::error!("a batch member failed: {e}"),
                }
            }
            let parts: Vec<Vec<u8>> = answers.into_iter().flatten().collect();
            if parts.is_empty() {
                return; // only notifications: no reply at all
            }
            let mut framed = vec![0u8; HEADER_LEN];
            framed.push(b'[');
            for (k, part) in parts.iter().enumerate() {
                if k > 0 {
                    framed.push(b',');
                }
                framed.extend_from_slice(part);
            }
            framed.push(b']');
            let len = framed.len() - HEADER_LEN;
            if len > out.max_frame as usize {
                let e = ErrorObject::with_message(ErrorCode::PayloadTooLarge, "Response too large")
                    .data(json!({ "max_frame_bytes": out.max_frame, "response_bytes": len }));
                framed = encode_response(&Id::Null, Err(&e), out.max_frame, None);
            }
            out.send_body_then(framed, None, after).await;
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Tasks of a finished session may run on, but never write anywhere.
        self.tasks.detach_all();
    }
}

/// Held by a request task: one slot of the connection, one of the agent.
struct Slot {
    _conn: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

fn encode_member(
    id: &Id,
    outcome: Result<&RawValue, &ErrorObject>,
    signer: Option<&ResponseSigner>,
) -> Vec<u8> {
    let mut out = Vec::new();
    write_outcome(&mut out, id, outcome, signer);
    out
}

type Answer = (Option<Id>, Result<Reply, ErrorObject>);

/// Run an admitted call in line.
async fn run(ctx: &Context, admitted: Admitted) -> Answer {
    let answer = admitted.run(ctx).await;
    ctx.stats.handled.fetch_add(1, Ordering::Relaxed);
    answer
}

/// Run a task-routed call in its own task, so that a panicking handler
/// becomes an internal error for that request alone; abandon it with
/// `cancelled` when the shutdown grace period ends (its audit record then
/// says so too).
async fn run_task(ctx: Arc<Context>, admitted: Admitted) -> Answer {
    let method = admitted.call.method();
    let id = admitted.id.clone();
    let mut handle = tokio::spawn({
        let ctx = ctx.clone();
        async move { run(&ctx, admitted).await }
    });
    tokio::select! {
        joined = &mut handle => joined.unwrap_or_else(|e| {
            log::error!("handler of {method} failed: {e}");
            let error = ErrorObject::new(ErrorCode::InternalError).data(json!({ "method": method.as_str() }));
            (id, Err(error))
        }),
        _ = ctx.shutdown.reached(Phase::Cancelling) => {
            handle.abort();
            ctx.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            let error = ErrorObject::new(ErrorCode::Cancelled).data(json!({ "method": method.as_str() }));
            (id, Err(error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_response_becomes_an_error_for_the_same_id() {
        let big = serde_json::value::to_raw_value(&"x".repeat(5000)).unwrap();
        let framed = encode_response(&Id::from(3), Ok(&big), 4096, None);
        let v: serde_json::Value = serde_json::from_slice(&framed[HEADER_LEN..]).unwrap();
        assert_eq!(v["id"], 3);
        assert_eq!(v["error"]["code"], -32005);
        assert_eq!(v["error"]["data"]["max_frame_bytes"], 4096);
    }
}
