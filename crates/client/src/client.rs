//! [`Client`]: typed, pipelined, reconnecting calls to one agent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_agent_protocol::attachment::Attachment;
use kvm_agent_protocol::frame::DEFAULT_MAX_FRAME_BYTES;
use kvm_agent_protocol::methods::core::{Capabilities, Empty, NoParams};
use kvm_agent_protocol::methods::exec::{
    ExecKillParams, ExecParams, ExecResult, ExecStartParams, ExecStarted, ExecStatus,
    ExecStatusParams,
};
use kvm_agent_protocol::methods::files::{
    CopyFromGuestParams, CopyToGuestParams, FileChunk, FileCloseParams, FileClosed, FileCommitted,
    FileContent, FileOpenParams, FileOpened, FileReadParams, FileWriteParams, FileWritten,
};
use kvm_agent_protocol::methods::info::{
    GetInfoParams, GetMetricsParams, GuestInfo, Metrics, Users,
};
use kvm_agent_protocol::methods::power::{PowerAccepted, PowerParams};
use kvm_agent_protocol::methods::{self as m, Method};
use kvm_agent_protocol::notifications::AgentReady;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::auth::AuthKey;
use crate::connection::{Answer, Connection, UnmatchedHandler};
use crate::error::ClientError;
use crate::target::Target;
use crate::transport;

/// Extra time granted to an `exec` call beyond the command's own
/// `timeout_ms`, for the agent to kill it and answer.
const EXEC_GRACE: Duration = Duration::from_secs(5);

/// How a [`Client`] behaves.
#[derive(Clone)]
pub struct ClientOptions {
    /// Limit for one call, from sending the request to receiving the answer
    /// (default 30 s). Establishing a connection is bounded separately by
    /// `connect_timeout`. Override per call with [`Client::call_with_timeout`].
    pub call_timeout: Duration,
    /// Limit for opening the stream and, with `wait_for_ready`, receiving
    /// `agent_ready` (default 10 s).
    pub connect_timeout: Duration,
    /// Wait for the agent's `agent_ready` before a connection is used
    /// (default true).
    pub wait_for_ready: bool,
    /// Largest frame body accepted from the agent and sent to it (default
    /// 16 MiB). Requests over it fail with [`ClientError::RequestTooLarge`]
    /// without being sent.
    pub max_frame_bytes: u32,
    /// Reconnect transparently on the next call after the connection was lost
    /// (default true). Without it, calls after a loss fail with
    /// [`ClientError::Disconnected`] until [`Client::reconnect`] is called.
    pub reconnect: bool,
    /// Called with every message from the agent that cannot be delivered to a
    /// caller; see [`Client`] ("Answers without an id"). Runs on the reader
    /// task: keep it short and non-blocking.
    pub on_unmatched: Option<UnmatchedHandler>,
    /// The shared key, for an agent with authentication on (default none).
    /// With it every request is signed, and every response and
    /// `agent_ready` must carry a valid MAC, else
    /// [`ClientError::Authentication`] (an unsigned -32008 reply, which the
    /// agent sends when it refuses a request's authentication, is passed on
    /// as [`ClientError::Agent`]).
    pub auth: Option<AuthKey>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            wait_for_ready: true,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            reconnect: true,
            on_unmatched: None,
            auth: None,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("call_timeout", &self.call_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_for_ready", &self.wait_for_ready)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("reconnect", &self.reconnect)
            .field("on_unmatched", &self.on_unmatched.as_ref().map(|_| ".."))
            .field("auth", &self.auth.as_ref().map(|_| "(key)"))
            .finish()
    }
}

/// An asynchronous client for one agent.
///
/// Cheap to clone: clones share the connection. Calls may run concurrently
/// from many tasks; they are pipelined on one connection, a single writer
/// task keeps frames whole, and a reader task hands each answer to its caller
/// by id (ids are `u64`s counted by the client, unique across reconnects).
///
/// # Connection loss and reconnection
///
/// When the connection drops (agent restarted, guest rebooted), every call in
/// flight fails with [`ClientError::Disconnected`]: the request may or may not
/// have run, so it is never retried automatically. With
/// [`ClientOptions::reconnect`] the next call opens a new connection (bounded
/// by `connect_timeout`) and, with `wait_for_ready`, waits for the new
/// `agent_ready` before sending. [`Client::agent_ready`] then shows the new
/// boot id if the guest rebooted.
///
/// A message the agent sends that is not valid JSON-RPC closes the
/// connection: the calls in flight fail with [`ClientError::Protocol`] (a
/// peer that sends garbage cannot be trusted to keep answering).
///
/// # Answers without an id
///
/// The agent answers with a null id when it could not read the request's id:
/// the frame was over its size limit, or was not JSON. Such an answer names no
/// caller. The client handles it as follows:
///
/// - It never sends a frame over its own `max_frame_bytes`
///   ([`ClientError::RequestTooLarge`]) and always sends valid JSON, so with an
///   agent using the same limit these answers do not occur.
/// - When exactly one request is outstanding on the connection (in flight, or
///   abandoned after a timeout but not yet answered), the answer must be for
///   it, since the agent answers every request exactly once: that call fails
///   with [`ClientError::Agent`].
/// - Otherwise no call is failed (failing all of them would fail calls that
///   will still be answered); the error goes to
///   [`ClientOptions::on_unmatched`], and the call it belonged to ends with
///   [`ClientError::Timeout`].
///
/// A frame from the agent over `max_frame_bytes` is skipped and handled the
/// same way, failing the sole outstanding call with
/// [`ClientError::FrameTooLarge`].
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    options: ClientOptions,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
    latest_ready: Arc<Mutex<Option<AgentReady>>>,
}

impl Client {
    /// Connect to `target`. With `wait_for_ready` (the default) this returns
    /// once the agent's `agent_ready` has arrived, within `connect_timeout`.
    pub async fn connect(target: Target, options: ClientOptions) -> Result<Self, ClientError> {
        let client = Self::lazy(target, options);
        client.connection().await?;
        Ok(client)
    }

    /// A client that connects on its first call.
    pub fn lazy(target: Target, options: ClientOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                target,
                options,
                conn: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
                latest_ready: Arc::new(Mutex::new(None)),
            }),
        }
    }

    /// The target this client talks to.
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The options in force.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The latest `agent_ready` received on any connection of this client.
    pub fn agent_ready(&self) -> Option<AgentReady> {
        self.inner
            .latest_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wait until the current connection has received `agent_ready`
    /// (connecting first if there is no live connection) and return it.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<AgentReady, ClientError> {
        let fut = async {
            let conn = self.connection().await?;
            conn.ready().await
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    waiting_for: "agent_ready".into(),
                    after: timeout,
                })
            })
    }

    /// Drop the current connection (failing its calls in flight with
    /// [`ClientError::Disconnected`]) and open a new one, whatever
    /// [`ClientOptions::reconnect`] says.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        let mut slot = self.inner.conn.lock().await;
        *slot = None;
        *slot = Some(self.establish().await?);
        Ok(())
    }

    /// True while a connection is open.
    pub async fn is_connected(&self) -> bool {
        self.inner
            .conn
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| !c.is_closed())
    }

    /// The live connection, opening one if allowed.
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
            if !self.inner.options.reconnect {
                return Err(ClientError::Disconnected(
                    "the connection was lost and reconnect is off".into(),
                ));
            }
        }
        *slot = None;
        let conn = self.establish().await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn establish(&self) -> Result<Arc<Connection>, ClientError> {
        let opts = &self.inner.options;
        let fut = async {
            let stream = transport::connect(&self.inner.target).await?;
            let conn = Arc::new(Connection::start(
                stream,
                opts.max_frame_bytes,
                self.inner.latest_ready.clone(),
                opts.on_unmatched.clone(),
                opts.auth.clone(),
            ));
            if opts.wait_for_ready {
                conn.ready().await?;
            }
            Ok(conn)
        };
        tokio::time::timeout(opts.connect_timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    waiting_for: if opts.wait_for_ready {
                        format!("the connection to {} and agent_ready", self.inner.target)
                    } else {
                        format!("the connection to {}", self.inner.target)
                    },
                    after: opts.connect_timeout,
                })
            })
    }

    async fn request_raw<P: Serialize>(
        &self,
        method: &str,
        params: Option<&P>,
        timeout: Duration,
    ) -> Result<Box<RawValue>, ClientError> {
        let (result, attachment) = self.request_attached(method, params, None, timeout).await?;
        match attachment {
            None => Ok(result),
            Some(_) => Err(ClientError::Protocol(format!(
                "the result of {method} came with an attachment it never asked for"
            ))),
        }
    }

    async fn request_attached<P: Serialize>(
        &self,
        method: &str,
        params: Option<&P>,
        attachment: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let conn = self.connection().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(timeout, conn.request(id, method, params, attachment))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    waiting_for: format!("the answer to {method}"),
                    after: timeout,
                })
            })
    }

    /// Whether requests are signed (a key is configured): the agent then
    /// takes no attachments.
    pub fn authenticates(&self) -> bool {
        self.inner.options.auth.is_some()
    }

    fn decode<R: DeserializeOwned>(method: &str, raw: &RawValue) -> Result<R, ClientError> {
        serde_json::from_str(raw.get()).map_err(|e| {
            ClientError::Protocol(format!(
                "the result of {method} has an unexpected shape: {e}"
            ))
        })
    }

    /// Call `method` with params the caller encoded itself (a JSON object),
    /// with the default call timeout, and return the raw `result`: for bulk
    /// data (file chunks), so that nothing is encoded or copied twice.
    pub async fn call_json(
        &self,
        method: &str,
        params: &RawValue,
    ) -> Result<Box<RawValue>, ClientError> {
        self.request_raw(method, Some(&params), self.inner.options.call_timeout)
            .await
    }

    /// [`Client::call_json`] with bytes attached to the request and/or
    /// accepted with the result (protocol 1.1, `file_write` and `file_read`;
    /// see `kvm_agent_protocol::attachment`): file chunks then cross the
    /// wire as they are, without base64.
    pub async fn call_json_attached(
        &self,
        method: &str,
        params: &RawValue,
        attachment: Option<Vec<u8>>,
    ) -> Result<(Box<RawValue>, Option<Attachment>), ClientError> {
        self.request_attached(
            method,
            Some(&params),
            attachment,
            self.inner.options.call_timeout,
        )
        .await
    }

    /// Call a typed method with the default call timeout.
    pub async fn call<M: Method>(&self, params: &M::Params) -> Result<M::Result, ClientError> {
        self.call_with_timeout::<M>(params, self.inner.options.call_timeout)
            .await
    }

    /// Call a typed method with its own timeout.
    pub async fn call_with_timeout<M: Method>(
        &self,
        params: &M::Params,
        timeout: Duration,
    ) -> Result<M::Result, ClientError> {
        let raw = self.request_raw(M::NAME, Some(params), timeout).await?;
        Self::decode(M::NAME, &raw)
    }

    /// Call any method by name; `params` must be an object or an array when
    /// present. Returns the raw `result`.
    pub async fn call_raw(
        &self,
        method: &str,
        params: Option<Value>,
    ) -> Result<Value, ClientError> {
        self.call_raw_with_timeout(method, params, self.inner.options.call_timeout)
            .await
    }

    /// [`Client::call_raw`] with its own timeout.
    pub async fn call_raw_with_timeout(
        &self,
        method: &str,
        params: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let raw = self.request_raw(method, params.as_ref(), timeout).await?;
        Self::decode(method, &raw)
    }

    /// `ping`: returns the round-trip time of the call.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        // Connect first so that connection set-up is not counted.
        self.connection().await?;
        let start = Instant::now();
        let _: Empty = self.call::<m::PingMethod>(&NoParams {}).await?;
        Ok(start.elapsed())
    }

    /// `get_capabilities`.
    pub async fn get_capabilities(&self) -> Result<Capabilities, ClientError> {
        self.call::<m::GetCapabilitiesMethod>(&NoParams {}).await
    }

    /// `get_info`.
    pub async fn get_info(&self, params: &GetInfoParams) -> Result<GuestInfo, ClientError> {
        self.call::<m::GetInfoMethod>(params).await
    }

    /// `get_metrics`.
    pub async fn get_metrics(&self, params: &GetMetricsParams) -> Result<Metrics, ClientError> {
        self.call::<m::GetMetricsMethod>(params).await
    }

    /// `get_users`.
    pub async fn get_users(&self) -> Result<Users, ClientError> {
        self.call::<m::GetUsersMethod>(&NoParams {}).await
    }

    /// `shutdown`. Without `confirm: true` the agent answers
    /// `confirmation_required`.
    pub async fn shutdown(&self, params: &PowerParams) -> Result<PowerAccepted, ClientError> {
        self.call::<m::ShutdownMethod>(params).await
    }

    /// `reboot`. Without `confirm: true` the agent answers
    /// `confirmation_required`.
    pub async fn reboot(&self, params: &PowerParams) -> Result<PowerAccepted, ClientError> {
        self.call::<m::RebootMethod>(params).await
    }

    /// `exec`: run a command to completion. The call's timeout is the larger
    /// of the default call timeout and the command's `timeout_ms` plus a few
    /// seconds of grace.
    pub async fn exec(&self, params: &ExecParams) -> Result<ExecResult, ClientError> {
        let mut timeout = self.inner.options.call_timeout;
        if let Some(ms) = params.timeout_ms {
            timeout = timeout.max(Duration::from_millis(ms).saturating_add(EXEC_GRACE));
        }
        self.call_with_timeout::<m::ExecMethod>(params, timeout)
            .await
    }

    /// `exec_start`.
    pub async fn exec_start(&self, params: &ExecStartParams) -> Result<ExecStarted, ClientError> {
        self.call::<m::ExecStartMethod>(params).await
    }

    /// `exec_status`.
    pub async fn exec_status(&self, params: &ExecStatusParams) -> Result<ExecStatus, ClientError> {
        self.call::<m::ExecStatusMethod>(params).await
    }

    /// `exec_kill`.
    pub async fn exec_kill(&self, params: &ExecKillParams) -> Result<(), ClientError> {
        let _: Empty = self.call::<m::ExecKillMethod>(params).await?;
        Ok(())
    }

    /// `copy_to_guest`.
    pub async fn copy_to_guest(
        &self,
        params: &CopyToGuestParams,
    ) -> Result<FileCommitted, ClientError> {
        self.call::<m::CopyToGuestMethod>(params).await
    }

    /// `copy_from_guest`.
    pub async fn copy_from_guest(
        &self,
        params: &CopyFromGuestParams,
    ) -> Result<FileContent, ClientError> {
        self.call::<m::CopyFromGuestMethod>(params).await
    }

    /// `file_open`.
    pub async fn file_open(&self, params: &FileOpenParams) -> Result<FileOpened, ClientError> {
        self.call::<m::FileOpenMethod>(params).await
    }

    /// `file_read`.
    pub async fn file_read(&self, params: &FileReadParams) -> Result<FileChunk, ClientError> {
        self.call::<m::FileReadMethod>(params).await
    }

    /// `file_write`.
    pub async fn file_write(&self, params: &FileWriteParams) -> Result<FileWritten, ClientError> {
        self.call::<m::FileWriteMethod>(params).await
    }

    /// `file_close`.
    pub async fn file_close(&self, params: &FileCloseParams) -> Result<FileClosed, ClientError> {
        self.call::<m::FileCloseMethod>(params).await
    }
}
