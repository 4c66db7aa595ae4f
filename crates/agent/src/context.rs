//! What every connection and request can see: configuration, policy, limits
//! and the shutdown signal. Built once at start-up.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use kvm_agent_protocol::methods::core::Limits;
use tokio::sync::Semaphore;

use crate::audit::{self, Auditor};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::handlers::exec::ExecTable;
use crate::handlers::metrics::MetricsState;
use crate::handlers::power::PowerControl;
use crate::platform;
use crate::policy::Policy;
use crate::shutdown::Shutdown;

/// Shared agent state.
#[derive(Debug)]
pub struct Context {
    /// The configuration in force.
    pub config: Config,
    /// The policy derived from it.
    pub policy: Policy,
    /// The audit trail.
    pub auditor: Arc<Auditor>,
    /// Request authentication (keys, replay cache); off without a key.
    pub auth: Authenticator,
    /// This boot's id, read once.
    pub boot_id: String,
    /// Permits for requests running as tasks, across all connections.
    pub request_slots: Arc<Semaphore>,
    /// The shutdown signal.
    pub shutdown: Shutdown,
    /// Counters reported at exit.
    pub stats: Stats,
    /// The previous `get_metrics` sample, agent-wide.
    pub metrics: MetricsState,
    /// Commands started by `exec_start`, and the process limit.
    pub exec: ExecTable,
    /// What carries out `shutdown` and `reboot`.
    pub power: PowerControl,
    /// What the qemu-guest-agent front end handed out (exec pids, file
    /// handles and positions).
    pub qga: crate::qga::State,
    /// Open file handles (`file_open`).
    pub files: Arc<crate::files::table::FileTable>,
}

/// Counters reported when the agent stops.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests executed (answered, or notifications run).
    pub handled: AtomicU64,
    /// Requests abandoned at shutdown.
    pub cancelled: AtomicU64,
}

impl Context {
    /// Build the shared state with the audit trail the configuration asks
    /// for and `auth` (loaded from the configuration's key files by
    /// [`Authenticator::from_config`]).
    pub fn new(
        config: Config,
        shutdown: Shutdown,
        auth: Authenticator,
    ) -> std::io::Result<Arc<Self>> {
        let auditor = Arc::new(audit::from_config(&config.audit)?);
        Ok(Self::with_auditor_and_auth(config, shutdown, auditor, auth))
    }

    /// Build the shared state around a given auditor, with authentication
    /// off whatever the configuration says (for tests).
    pub fn with_auditor(config: Config, shutdown: Shutdown, auditor: Arc<Auditor>) -> Arc<Self> {
        Self::with_auditor_and_auth(config, shutdown, auditor, Authenticator::off())
    }

    /// Build the shared state around a given auditor and authenticator.
    pub fn with_auditor_and_auth(
        config: Config,
        shutdown: Shutdown,
        auditor: Arc<Auditor>,
        auth: Authenticator,
    ) -> Arc<Self> {
        let files = crate::files::table::FileTable::new(crate::files::table::TableLimits {
            per_connection: config.limits.max_file_handles_per_connection,
            total: config.limits.max_file_handles_total,
            idle: std::time::Duration::from_secs(config.limits.file_handle_idle_seconds),
        });
        let exec = ExecTable::new(config.limits.max_processes);
        Arc::new(Self {
            auditor,
            auth,
            policy: Policy::from_config(&config),
            boot_id: platform::boot_id(),
            request_slots: Arc::new(Semaphore::new(config.limits.max_requests_total as usize)),
            config,
            shutdown,
            stats: Stats::default(),
            metrics: MetricsState::with_baseline(),
            exec,
            power: PowerControl::from_env(),
            qga: crate::qga::State::default(),
            files,
        })
    }

    /// The limits as advertised to hosts.
    pub fn limits(&self) -> Limits {
        let l = &self.config.limits;
        Limits {
            max_frame_bytes: l.max_frame_bytes,
            max_chunk_bytes: l.max_chunk_bytes(),
            max_batch_len: l.max_batch_len,
            max_requests_per_connection: l.max_requests_per_connection,
        }
    }
}
