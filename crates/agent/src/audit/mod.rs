//! The audit trail: exactly one record per request, whatever became of it.
//!
//! The dispatcher opens a [`PendingAudit`] for every request it admits and
//! closes it with the outcome; a request refused earlier (invalid, denied,
//! busy, failed authentication) gets its record at once. A pending record that
//! is dropped without an outcome (the request was abandoned at shutdown) is
//! written as `cancelled`, so no request escapes the trail.
//!
//! Records carry what was asked and what happened, never file contents,
//! standard input, environment values or keys.
//!
//! Destinations ([`sinks`]): journald with structured fields, else syslog,
//! else stderr (`destination = "auto"` on Linux); the Event Log on Windows
//! ([`eventlog`]); and optionally a JSON-lines file with size-based
//! rotation. When a destination fails the agent says so loudly and,
//! unless configured otherwise, refuses privileged requests until it works
//! again.

#[cfg(windows)]
pub mod eventlog;
pub mod sinks;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_agent_protocol::jsonrpc::Id;
use kvm_agent_protocol::{ErrorCode, ErrorObject};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::transport::Peer;

/// What the dispatcher decided about a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// It ran.
    Allowed,
    /// Not a valid request (unparsable frame, bad envelope, unknown method,
    /// bad params).
    Invalid,
    /// Authentication missing, wrong, stale or replayed.
    Unauthenticated,
    /// The policy refused it.
    Denied,
    /// A concurrency limit refused it.
    Busy,
}

/// One audit record.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// When the request arrived, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `virtio-serial`, `vsock` or `unix`.
    pub transport: &'static str,
    /// The peer, as text (`vsock cid 2 port 1234`, `unix pid 7 uid 0`).
    pub peer: String,
    /// The method asked for, when the request got that far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request id as JSON text; absent for notifications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What the dispatcher decided.
    pub decision: Decision,
    /// Why, when not allowed (or why it failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `ok`, an error name (`not_found`), or `cancelled`.
    pub outcome: String,
    /// The error code sent, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
    /// From arrival to answer, microseconds.
    pub duration_us: u64,
    /// Method-specific facts: argv and exit status for exec, resolved path,
    /// bytes and sha256 for files.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

impl AuditRecord {
    /// One line for people (the journald `MESSAGE`, the syslog text).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {} from {}: {}",
            self.method.as_deref().unwrap_or("(no method)"),
            self.id.as_deref().unwrap_or("(notification)"),
            self.peer,
            serde_json::to_value(&self.decision)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        );
        if let Some(r) = &self.reason {
            s.push_str(&format!(" ({r})"));
        }
        s.push_str(&format!(", {} in {} us", self.outcome, self.duration_us));
        // One line, whatever the request contained.
        s.replace(|c: char| c.is_control(), " ")
    }
}

/// A place records go.
pub trait Sink: Send + Sync {
    /// Name for messages about this sink.
    fn name(&self) -> String;
    /// Write one record durably enough for this kind of destination.
    fn write(&self, record: &AuditRecord) -> std::io::Result<()>;
}

/// Fans records out to the configured sinks and tracks their health.
pub struct Auditor {
    sinks: Vec<Box<dyn Sink>>,
    healthy: AtomicBool,
    written: AtomicU64,
    require_for_privileged: bool,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field(
                "sinks",
                &self.sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field("healthy", &self.healthy)
            .finish()
    }
}

impl Auditor {
    /// An auditor writing to `sinks`.
    pub fn new(sinks: Vec<Box<dyn Sink>>, require_for_privileged: bool) -> Self {
        Self {
            sinks,
            healthy: AtomicBool::new(true),
            written: AtomicU64::new(0),
            require_for_privileged,
        }
    }

    /// Write a record to every sink.
    pub fn write(&self, record: &AuditRecord) {
        let mut ok = true;
        for sink in &self.sinks {
            if let Err(e) = sink.write(record) {
                ok = false;
                if self.healthy.swap(false, Ordering::Relaxed) {
                    log::error!(
                        "AUDIT FAILURE: cannot write to {}: {e}; privileged requests are {} until it works again",
                        sink.name(),
                        if self.require_for_privileged { "refused" } else { "still served, unaudited" }
                    );
                }
            }
        }
        if ok {
            self.written.fetch_add(1, Ordering::Relaxed);
            if !self.healthy.swap(true, Ordering::Relaxed) {
                log::warn!("audit trail writable again");
            }
        }
    }

    /// Whether privileged requests may run: the trail works, or the
    /// configuration accepts running them unaudited.
    pub fn permits_privileged(&self) -> bool {
        !self.require_for_privileged || self.healthy.load(Ordering::Relaxed)
    }

    /// Records written to every sink so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// The auditor a configuration describes. Fails when the JSON-lines file
/// cannot be opened.
pub fn from_config(config: &crate::config::AuditSection) -> std::io::Result<Auditor> {
    use crate::config::AuditDestination;
    let mut out: Vec<Box<dyn Sink>> = Vec::new();
    #[cfg(unix)]
    {
        use std::path::Path;
        let journald = Path::new(sinks::JOURNALD_SOCKET);
        let syslog = Path::new(sinks::SYSLOG_SOCKET);
        match config.destination {
            AuditDestination::Journald => out.push(Box::new(sinks::Journald::new(journald)?)),
            AuditDestination::Syslog => out.push(Box::new(sinks::Syslog::new(syslog)?)),
            AuditDestination::Stderr => out.push(Box::new(sinks::Stderr)),
            AuditDestination::None => {}
            AuditDestination::Auto if journald.exists() => {
                out.push(Box::new(sinks::Journald::new(journald)?))
            }
            AuditDestination::Auto if syslog.exists() => {
                out.push(Box::new(sinks::Syslog::new(syslog)?))
            }
            AuditDestination::Auto => out.push(Box::new(sinks::Stderr)),
            AuditDestination::Eventlog => return Err(wrong_platform("eventlog")),
        }
    }
    #[cfg(windows)]
    match config.destination {
        AuditDestination::Auto | AuditDestination::Eventlog => {
            out.push(Box::new(eventlog::EventLog::register()?))
        }
        AuditDestination::Stderr => out.push(Box::new(sinks::Stderr)),
        AuditDestination::None => {}
        AuditDestination::Journald => return Err(wrong_platform("journald")),
        AuditDestination::Syslog => return Err(wrong_platform("syslog")),
    }
    if let Some(path) = &config.jsonl_path {
        out.push(Box::new(sinks::JsonLines::open(
            path,
            config.jsonl_max_bytes,
            config.jsonl_keep,
        )?));
    }
    let auditor = Auditor::new(out, config.require_for_privileged);
    log::info!(
        "audit trail: {}",
        auditor
            .sinks
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(auditor)
}

/// A destination of another platform (validation refuses it first).
#[cfg(any(unix, windows))]
fn wrong_platform(destination: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("audit destination \"{destination}\" does not exist on this platform"),
    )
}

/// Who sent a request, for its record.
#[derive(Clone, Debug)]
pub struct Origin {
    transport: &'static str,
    peer: String,
    connection: u64,
}

impl Origin {
    /// The origin of requests from `peer`.
    pub fn new(peer: &Peer) -> Self {
        let transport = match peer {
            Peer::VirtioSerial { .. } => "virtio-serial",
            Peer::Vsock { .. } => "vsock",
            Peer::Unix { .. } => "unix",
            Peer::Pipe { .. } => "pipe",
            Peer::Com { .. } => "com",
        };
        static CONNECTIONS: AtomicU64 = AtomicU64::new(1);
        Self {
            transport,
            peer: peer.to_string(),
            connection: CONNECTIONS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A number unique to this origin (one per connection), for limits
    /// that count per connection.
    pub fn connection(&self) -> u64 {
        self.connection
    }
}

/// The record of a request in progress. Finish it with
/// [`PendingAudit::finish`] or [`PendingAudit::refuse`]; dropping it
/// unfinished records the request as cancelled.
#[derive(Debug)]
pub struct PendingAudit {
    auditor: Arc<Auditor>,
    record: Option<AuditRecord>,
    started: Instant,
    connection: u64,
}

impl PendingAudit {
    /// Open a record for a request that arrived now.
    pub fn open(
        auditor: Arc<Auditor>,
        origin: &Origin,
        method: Option<&str>,
        id: Option<&Id>,
    ) -> Self {
        Self {
            auditor,
            record: Some(AuditRecord {
                time_ms: kvm_agent_protocol::auth::now_ms(),
                transport: origin.transport,
                peer: origin.peer.clone(),
                method: method.map(str::to_owned),
                id: id.map(|i| serde_json::to_string(i).unwrap_or_default()),
                decision: Decision::Allowed,
                reason: None,
                outcome: "ok".to_owned(),
                error_code: None,
                duration_us: 0,
                details: Map::new(),
            }),
            started: Instant::now(),
            connection: origin.connection,
        }
    }

    /// The connection the request came on ([`Origin::connection`]).
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// Add a method-specific fact.
    pub fn detail(&mut self, key: &str, value: impl Into<Value>) {
        if let Some(r) = &mut self.record {
            r.details.insert(key.to_owned(), value.into());
        }
    }

    /// The request was not run: record why, with the error sent.
    pub fn refuse(mut self, decision: Decision, error: &ErrorObject) {
        if let Some(r) = &mut self.record {
            r.decision = decision;
            r.reason = Some(error.message.clone());
        }
        self.close(Some(error));
    }

    /// The request ran: record its outcome.
    pub fn finish(mut self, result: Result<(), &ErrorObject>) {
        if let (Err(e), Some(r)) = (&result, &mut self.record) {
            r.reason = Some(e.message.clone());
        }
        self.close(result.err());
    }

    fn close(&mut self, error: Option<&ErrorObject>) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        if let Some(e) = error {
            record.error_code = Some(e.code);
            record.outcome = e.kind().map(ErrorCode::name).unwrap_or("error").to_owned();
        }
        record.duration_us = self.started.elapsed().as_micros() as u64;
        self.auditor.write(&record);
    }
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        if self.record.is_some() {
            // Abandoned: the request was cancelled, or its handler panicked.
            let code = if std::thread::panicking() {
                ErrorCode::InternalError
            } else {
                ErrorCode::Cancelled
            };
            self.close(Some(&ErrorObject::new(code)));
        }
    }
}

/// Record a request refused before a method could be determined or run.
pub fn refused(
    auditor: &Arc<Auditor>,
    origin: &Origin,
    method: Option<&str>,
    id: Option<&Id>,
    decision: Decision,
    error: &ErrorObject,
) {
    PendingAudit::open(auditor.clone(), origin, method, id).refuse(decision, error);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that keeps records in memory, for tests.
    #[derive(Clone, Default)]
    pub(crate) struct Memory(pub Arc<Mutex<Vec<AuditRecord>>>, pub Arc<AtomicBool>);

    impl Sink for Memory {
        fn name(&self) -> String {
            "memory".into()
        }
        fn write(&self, record: &AuditRecord) -> std::io::Result<()> {
            if self.1.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("broken on purpose"));
            }
            self.0.lock().unwrap().push(record.clone());
            Ok(())
        }
    }

    fn origin() -> Origin {
        Origin::new(&Peer::Unix {
            pid: Some(1),
            uid: Some(0),
        })
    }

    #[test]
    fn finished_refused_and_dropped_records() {
        let mem = Memory::default();
        let auditor = Arc::new(Auditor::new(vec![Box::new(mem.clone())], true));
        let mut p =
            PendingAudit::open(auditor.clone(), &origin(), Some("exec"), Some(&Id::from(1)));
        p.detail("argv", serde_json::json!(["/bin/true"]));
        p.finish(Ok(()));
        PendingAudit::open(auditor.clone(), &origin(), Some("exec"), Some(&Id::from(2)))
            .refuse(Decision::Denied, &ErrorObject::new(ErrorCode::Denied));
        drop(PendingAudit::open(
            auditor.clone(),
            &origin(),
            Some("get_info"),
            None,
        ));
        let recs = mem.0.lock().unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(
            (recs[0].decision.clone(), recs[0].outcome.as_str()),
            (Decision::Allowed, "ok")
        );
        assert_eq!(recs[0].details["argv"], serde_json::json!(["/bin/true"]));
        assert_eq!(recs[0].transport, "unix");
        assert_eq!(recs[1].decision, Decision::Denied);
        assert_eq!(recs[1].error_code, Some(-32000));
        assert_eq!(recs[2].outcome, "cancelled");
        assert_eq!(recs[2].id, None);
        assert!(recs[0]
            .summary()
            .starts_with("exec 1 from unix pid 1 uid 0: allowed"));
    }

    #[test]
    fn a_failing_sink_blocks_privileged_requests_until_it_recovers() {
        let mem = Memory::default();
        let auditor = Arc::new(Auditor::new(vec![Box::new(mem.clone())], true));
        assert!(auditor.permits_privileged());
        mem.1.store(true, Ordering::Relaxed);
        drop(PendingAudit::open(
            auditor.clone(),
            &origin(),
            Some("ping"),
            None,
        ));
        assert!(!auditor.permits_privileged());
        mem.1.store(false, Ordering::Relaxed);
        drop(PendingAudit::open(
            auditor.clone(),
            &origin(),
            Some("ping"),
            None,
        ));
        assert!(auditor.permits_privileged());

        let lenient = Auditor::new(
            vec![Box::new(Memory(
                Default::default(),
                Arc::new(AtomicBool::new(true)),
            ))],
            false,
        );
        lenient.write(&mem.0.lock().unwrap()[0]);
        assert!(lenient.permits_privileged());
    }
}
