//! Start-up and shutdown: bind the transports, serve connections, and stop
//! cleanly on SIGTERM or SIGINT ([`run`]), or when a stop future resolves
//! ([`run_until`]: the Windows service's STOP, SHUTDOWN and PRESHUTDOWN).

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::connection;
use crate::context::Context;
use crate::shutdown::{self, Phase, Shutdown};
use crate::transport::{Listener, SessionSource, TransportSpec};

/// How long running requests may take to finish after SIGTERM.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    /// A listening transport could not be set up.
    #[error("cannot listen on {spec}: {source}")]
    Bind {
        /// The transport.
        spec: TransportSpec,
        /// What the OS said.
        source: io::Error,
    },
    /// The transport does not exist on this platform.
    #[error("{0} is not available on this platform")]
    Unsupported(TransportSpec),
    /// The audit trail could not be set up.
    #[error("cannot open the audit trail: {0}")]
    Audit(io::Error),
    /// A key file of `[security]` is unusable.
    #[error(transparent)]
    Auth(#[from] crate::auth::KeyFileError),
    /// Signal handlers (or the stop future) could not be set up.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
}

/// Which protocol a transport speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontEnd {
    /// This agent's protocol (docs/protocol.md).
    Native,
    /// qemu-guest-agent's protocol ([`crate::qga`]).
    Qga,
}

impl FrontEnd {
    async fn serve(self, ctx: Arc<Context>, conn: crate::transport::Connection) {
        match self {
            Self::Native => connection::serve(ctx, conn).await,
            Self::Qga => crate::qga::serve(ctx, conn).await,
        }
    }
}

/// Run the agent until SIGTERM or SIGINT: this protocol on `transports`,
/// qemu-guest-agent's on `qga_transports`.
pub fn run(
    config: Config,
    transports: Vec<TransportSpec>,
    qga_transports: Vec<TransportSpec>,
) -> Result<(), ServerError> {
    run_until(config, transports, qga_transports, wait_for_signal(), || {})
}

/// Like [`run`], but stop when `stop` resolves (its `Ok` value names the
/// cause in the log, as "SIGTERM" does) instead of on signals; `ready` is
/// called once every transport is set up. The same graceful drain follows.
pub fn run_until<S, R>(
    config: Config,
    transports: Vec<TransportSpec>,
    qga_transports: Vec<TransportSpec>,
    stop: S,
    ready: R,
) -> Result<(), ServerError>
where
    S: Future<Output = io::Result<&'static str>>,
    R: FnOnce(),
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    runtime.block_on(serve(config, transports, qga_transports, stop, ready))
}

async fn serve<S, R>(
    config: Config,
    transports: Vec<TransportSpec>,
    qga_transports: Vec<TransportSpec>,
    stop: S,
    ready: R,
) -> Result<(), ServerError>
where
    S: Future<Output = io::Result<&'static str>>,
    R: FnOnce(),
{
    let (controller, shutdown) = shutdown::channel();
    let auth = crate::auth::Authenticator::from_config(&config.security)?;
    if auth.is_enabled() {
        log::info!("authentication on: every request must carry a valid HMAC");
    }
    let ctx = Context::new(config, shutdown.clone(), auth).map_err(ServerError::Audit)?;
    crate::files::tune_allocator();
    if ctx.config.security.enable_file_copy {
        // Uploads cut short by a crash: their temporaries go, off the
        // start-up path (live ones are locked and left alone).
        let roots = ctx.config.security.allowed_file_paths.clone();
        tokio::task::spawn_blocking(move || crate::files::upload::remove_stale(&roots));
    }
    let mut listeners = JoinSet::new();
    for spec in transports {
        start_transport(&ctx, spec, FrontEnd::Native, &mut listeners)?;
    }
    for spec in qga_transports {
        log::info!("qemu-guest-agent protocol on {spec}");
        start_transport(&ctx, spec, FrontEnd::Qga, &mut listeners)?;
    }
    log::info!(
        "kvm-manager-agent {} ready (protocol {})",
        crate::AGENT_VERSION,
        kvm_agent_protocol::PROTOCOL_VERSION
    );
    ready();

    let signal = stop.await.map_err(ServerError::Signals)?;
    log::info!("{signal}: finishing running requests (up to {GRACE_PERIOD:?})");
    let in_flight = |ctx: &Context| {
        ctx.config.limits.max_requests_total as usize - ctx.request_slots.available_permits()
    };
    let before = in_flight(&ctx);
    controller.advance(Phase::Draining);
    let all = ctx.config.limits.max_requests_total;
    let drained = tokio::time::timeout(GRACE_PERIOD, ctx.request_slots.acquire_many(all))
        .await
        .is_ok();
    if !drained {
        controller.advance(Phase::Cancelling);
    }
    // Give connections a moment to flush their last answers.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while listeners.join_next().await.is_some() {}
    })
    .await;
    let cancelled = ctx.stats.cancelled.load(Ordering::Relaxed);
    log::info!(
        "stopped: {} requests handled in all; of {before} running at {signal}, {} finished and {cancelled} were cancelled",
        ctx.stats.handled.load(Ordering::Relaxed),
        before as u64 - cancelled.min(before as u64),
    );
    Ok(())
}

async fn wait_for_signal() -> io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}

fn start_transport(
    ctx: &Arc<Context>,
    spec: TransportSpec,
    front: FrontEnd,
    tasks: &mut JoinSet<()>,
) -> Result<(), ServerError> {
    let shutdown = ctx.shutdown.clone();
    let bind_error = |source| ServerError::Bind {
        spec: spec.clone(),
        source,
    };
    match &spec {
        #[cfg(unix)]
        TransportSpec::Unix(path) => {
            let t = crate::transport::unix::UnixTransport::bind(path).map_err(bind_error)?;
            log::info!("listening on {spec}");
            tasks.spawn(serve_listener(ctx.clone(), shutdown, spec, front, t));
            Ok(())
        }
        #[cfg(target_os = "linux")]
        TransportSpec::Vsock(port) => {
            let t = crate::transport::vsock::VsockTransport::bind(*port).map_err(bind_error)?;
            log::info!("listening on {spec}");
            tasks.spawn(serve_listener(ctx.clone(), shutdown, spec, front, t));
            Ok(())
        }
        #[cfg(target_os = "linux")]
        TransportSpec::VirtioSerial(name) => {
            let t = crate::transport::virtio_serial::VirtioSerialTransport::new(name);
            tasks.spawn(serve_sessions(ctx.clone(), shutdown, spec, front, t));
            Ok(())
        }
        #[cfg(windows)]
        TransportSpec::VirtioSerial(name) => {
            let t = crate::transport::windows_port::PortTransport::virtio_serial(name);
            tasks.spawn(serve_sessions(ctx.clone(), shutdown, spec, front, t));
            Ok(())
        }
        #[cfg(windows)]
        TransportSpec::Com(port) => {
            let t = crate::transport::windows_port::PortTransport::com(port);
            tasks.spawn(serve_sessions(ctx.clone(), shutdown, spec, front, t));
            Ok(())
        }
        #[cfg(windows)]
        TransportSpec::Pipe(name) => {
            let t = crate::transport::named_pipe::PipeTransport::bind(name).map_err(bind_error)?;
            log::info!("listening on {spec}");
            tasks.spawn(serve_listener(ctx.clone(), shutdown, spec, front, t));
            Ok(())
        }
        #[allow(unreachable_patterns)]
        _ => Err(ServerError::Unsupported(spec)),
    }
}

/// One host at a time (a virtio-serial or serial port): serve each session
/// to its end, then wait for the next, until shutdown.
async fn serve_sessions<S: SessionSource>(
    ctx: Arc<Context>,
    shutdown: Shutdown,
    spec: TransportSpec,
    front: FrontEnd,
    mut source: S,
) {
    loop {
        let conn = tokio::select! {
            biased;
            _ = shutdown.reached(Phase::Draining) => return,
            c = source.accept() => c,
        };
        match conn {
            Ok(conn) => front.serve(ctx.clone(), conn).await,
            Err(e) => {
                log::error!("{spec}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Accept connections until shutdown, serving each in its own task, at most
/// `limits.max_connections` at once (beyond: one `busy` error, then close).
async fn serve_listener<L: Listener>(
    ctx: Arc<Context>,
    shutdown: Shutdown,
    spec: TransportSpec,
    front: FrontEnd,
    listener: L,
) {
    let slots = Arc::new(Semaphore::new(ctx.config.limits.max_connections as usize));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.reached(Phase::Draining) => break,
            a = listener.accept() => a,
            // Reap finished connections as we go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        match accepted {
            Ok(conn) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let ctx = ctx.clone();
                    connections.spawn(async move {
                        front.serve(ctx, conn).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    log::warn!(
                        "{spec}: refusing {}: limits.max_connections reached",
                        conn.peer
                    );
                    if front == FrontEnd::Native {
                        connections.spawn(connection::refuse_busy(
                            conn,
                            ctx.config.limits.max_connections,
                        ));
                    }
                }
            },
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                log::error!("{spec}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    while connections.join_next().await.is_some() {}
}
