//! Where audit records go: journald, syslog, stderr, a JSON-lines file (and,
//! on Windows, the Event Log: [`super::eventlog`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{AuditRecord, Sink};

/// Largest `KVA_DETAILS` value sent to journald or syslog; longer details
/// are cut (the JSON-lines file keeps them whole).
#[cfg(unix)]
const MAX_DETAILS: usize = 32 * 1024;

fn details_json(record: &AuditRecord, limit: usize) -> String {
    let mut s = serde_json::to_string(&record.details).unwrap_or_default();
    if s.len() > limit {
        let mut cut = limit;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...(truncated)");
    }
    s
}

/// The record as JSON with its details as one JSON string, cut past `limit`
/// bytes (the syslog and Event Log forms).
pub(super) fn flat_json(record: &AuditRecord, limit: usize) -> serde_json::Value {
    let mut rec = record.clone();
    rec.details = serde_json::Map::new();
    let mut json = serde_json::to_value(&rec).unwrap_or_default();
    if !record.details.is_empty() {
        json["details"] = serde_json::Value::String(details_json(record, limit));
    }
    json
}

/// Standard error, one line per record (under systemd, journald keeps it).
#[derive(Debug, Default)]
pub struct Stderr;

impl Sink for Stderr {
    fn name(&self) -> String {
        "stderr".into()
    }

    fn write(&self, record: &AuditRecord) -> io::Result<()> {
        let json = serde_json::to_string(record).map_err(io::Error::other)?;
        let prefix = if std::env::var_os("JOURNAL_STREAM").is_some() {
            "<5>"
        } else {
            ""
        };
        let line = format!("{prefix}kvm-manager-agent: audit: {json}\n");
        io::stderr().lock().write_all(line.as_bytes())
    }
}

/// journald's native protocol: one datagram per record, with structured
/// fields (`KVA_METHOD`, `KVA_DECISION`, ...) beside `MESSAGE`.
#[cfg(unix)]
#[derive(Debug)]
pub struct Journald(Datagram);

/// An unbound unix datagram socket sending each record to one path, with a
/// bounded wait so a stuck receiver cannot stall the agent.
#[cfg(unix)]
#[derive(Debug)]
struct Datagram {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

#[cfg(unix)]
impl Datagram {
    fn new(path: &Path) -> io::Result<Self> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(std::time::Duration::from_secs(1)))?;
        Ok(Self {
            socket,
            path: path.to_owned(),
        })
    }

    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send_to(datagram, &self.path).map(|_| ())
    }
}

/// journald's socket.
#[cfg(unix)]
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

#[cfg(unix)]
impl Journald {
    /// A sink sending to the journal socket at `path`.
    pub fn new(path: &Path) -> io::Result<Self> {
        Datagram::new(path).map(Self)
    }

    /// The datagram for a record, in journald's native format.
    pub fn encode(record: &AuditRecord) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let mut field = |name: &str, value: &str| {
            if value.contains('\n') {
                out.extend_from_slice(name.as_bytes());
                out.push(b'\n');
                out.extend_from_slice(&(value.len() as u64).to_le_bytes());
                out.extend_from_slice(value.as_bytes());
                out.push(b'\n');
            } else {
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                out.extend_from_slice(value.as_bytes());
                out.push(b'\n');
            }
        };
        field("MESSAGE", &format!("audit: {}", record.summary()));
        field(
            "PRIORITY",
            if record.error_code.is_some() {
                "5"
            } else {
                "6"
            },
        );
        field("SYSLOG_IDENTIFIER", "kvm-manager-agent");
        field("SYSLOG_FACILITY", "10");
        field("KVA_AUDIT", "1");
        field("KVA_TIME_MS", &record.time_ms.to_string());
        field("KVA_TRANSPORT", record.transport);
        field("KVA_PEER", &record.peer);
        if let Some(m) = &record.method {
            field("KVA_METHOD", m);
        }
        if let Some(id) = &record.id {
            field("KVA_ID", id);
        }
        let decision = serde_json::to_value(&record.decision).unwrap_or_default();
        field("KVA_DECISION", decision.as_str().unwrap_or_default());
        if let Some(r) = &record.reason {
            field("KVA_REASON", r);
        }
        field("KVA_OUTCOME", &record.outcome);
        if let Some(c) = record.error_code {
            field("KVA_ERROR_CODE", &c.to_string());
        }
        field("KVA_DURATION_US", &record.duration_us.to_string());
        if !record.details.is_empty() {
            field("KVA_DETAILS", &details_json(record, MAX_DETAILS));
        }
        out
    }
}

#[cfg(unix)]
impl Sink for Journald {
    fn name(&self) -> String {
        format!("journald ({})", self.0.path.display())
    }

    fn write(&self, record: &AuditRecord) -> io::Result<()> {
        self.0.send(&Self::encode(record))
    }
}

/// The local syslog socket: one RFC 3164 datagram per record, facility
/// authpriv, the record as JSON after the summary.
#[cfg(unix)]
#[derive(Debug)]
pub struct Syslog(Datagram);

/// The syslog socket.
#[cfg(unix)]
pub const SYSLOG_SOCKET: &str = "/dev/log";

#[cfg(unix)]
impl Syslog {
    /// A sink sending to the syslog socket at `path`.
    pub fn new(path: &Path) -> io::Result<Self> {
        Datagram::new(path).map(Self)
    }

    /// The datagram for a record.
    pub fn encode(record: &AuditRecord) -> Vec<u8> {
        // authpriv (10) * 8 + notice (5) or info (6)
        let pri = 80 + if record.error_code.is_some() { 5 } else { 6 };
        let json = flat_json(record, MAX_DETAILS);
        format!(
            "<{pri}>kvm-manager-agent[{}]: audit: {} {}",
            std::process::id(),
            record.summary(),
            json
        )
        .into_bytes()
    }
}

#[cfg(unix)]
impl Sink for Syslog {
    fn name(&self) -> String {
        format!("syslog ({})", self.0.path.display())
    }

    fn write(&self, record: &AuditRecord) -> io::Result<()> {
        self.0.send(&Self::encode(record))
    }
}

/// A JSON-lines file, one record per line, rotated by size: when the next
/// line would take it past `max_bytes`, `PATH` becomes `PATH.1` (`PATH.1`
/// becomes `PATH.2`, ... up to `keep` old files) and a new `PATH` starts.
/// Created with mode 0600.
#[derive(Debug)]
pub struct JsonLines {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Mutex<(File, u64)>,
}

impl JsonLines {
    /// Open (append to) the file at `path`.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            keep,
            file: Mutex::new((file, size)),
        })
    }

    fn rotate(&self) -> io::Result<File> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            std::fs::remove_file(numbered(self.keep)).or_else(ignore_missing)?;
            for n in (1..self.keep).rev() {
                std::fs::rename(numbered(n), numbered(n + 1)).or_else(ignore_missing)?;
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        open_append(&self.path)
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
    }
    options.open(path)
}

impl Sink for JsonLines {
    fn name(&self) -> String {
        format!("JSON lines ({})", self.path.display())
    }

    fn write(&self, record: &AuditRecord) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.1 > 0 && guard.1 + line.len() as u64 > self.max_bytes {
            let fresh = self.rotate()?;
            *guard = (fresh, 0);
        }
        // One write per record: an append is never interleaved.
        guard.0.write_all(&line)?;
        guard.1 += line.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Decision;

    fn record(method: &str) -> AuditRecord {
        AuditRecord {
            time_ms: 1_790_000_000_000,
            transport: "vsock",
            peer: "vsock cid 2 port 1025".into(),
            method: Some(method.into()),
            id: Some("7".into()),
            decision: Decision::Allowed,
            reason: None,
            outcome: "ok".into(),
            error_code: None,
            duration_us: 42,
            details: serde_json::json!({"argv": ["/usr/bin/systemctl", "status\nx"]})
                .as_object()
                .unwrap()
                .clone(),
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kva-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[cfg(unix)]
    #[test]
    fn journald_datagram_has_structured_fields() {
        let mut rec = record("exec");
        rec.reason = Some("first line\nsecond line".into());
        let d = Journald::encode(&rec);
        let text = String::from_utf8_lossy(&d);
        assert!(text.starts_with("MESSAGE=audit: exec 7 from vsock cid 2 port 1025: allowed"));
        assert!(text.contains("\nKVA_METHOD=exec\n"));
        assert!(text.contains("\nKVA_DECISION=allowed\n"));
        assert!(text.contains("\nKVA_TRANSPORT=vsock\n"));
        assert!(text.contains(r#"KVA_DETAILS={"argv":["/usr/bin/systemctl","status\nx"]}"#));
        // A value holding a newline takes the binary-safe, length-prefixed form.
        let at = d.windows(11).position(|w| w == b"KVA_REASON\n").unwrap();
        let len = u64::from_le_bytes(d[at + 11..at + 19].try_into().unwrap()) as usize;
        assert_eq!(&d[at + 19..at + 19 + len], b"first line\nsecond line");
        assert_eq!(d[at + 19 + len], b'\n');
    }

    #[cfg(unix)]
    #[test]
    fn journald_and_syslog_sinks_send_to_their_sockets() {
        let dir = scratch("sockets");
        for (kind, path) in [
            ("journald", dir.join("journal")),
            ("syslog", dir.join("log")),
        ] {
            let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
            let sink: Box<dyn Sink> = if kind == "journald" {
                Box::new(Journald::new(&path).unwrap())
            } else {
                Box::new(Syslog::new(&path).unwrap())
            };
            sink.write(&record("ping")).unwrap();
            let mut buf = vec![0u8; 65536];
            let n = server.recv(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(
                text.contains("ping 7 from vsock cid 2 port 1025"),
                "{kind}: {text}"
            );
            if kind == "syslog" {
                assert!(text.starts_with("<86>kvm-manager-agent["), "{text}");
            }
        }
        // No listener: the write fails, which the auditor reports.
        let gone = Journald::new(&dir.join("absent")).unwrap();
        assert!(gone.write(&record("ping")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_lines_rotate_by_size() {
        let dir = scratch("jsonl");
        let path = dir.join("audit.jsonl");
        let sink = JsonLines::open(&path, 1000, 2).unwrap();
        for _ in 0..20 {
            sink.write(&record("ping")).unwrap();
        }
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        let current = lines(&path);
        let one = lines(&dir.join("audit.jsonl.1"));
        let two = lines(&dir.join("audit.jsonl.2"));
        assert!(!dir.join("audit.jsonl.3").exists());
        assert!(current >= 1 && one >= 1 && two >= 1);
        for p in [path.clone(), dir.join("audit.jsonl.1")] {
            assert!(std::fs::metadata(&p).unwrap().len() <= 1000);
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["method"], "ping");
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        // Closed first: Windows does not remove a folder with an open file.
        drop(sink);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
