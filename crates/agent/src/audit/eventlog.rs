//! The Windows Event Log: one event per record in the Application log, from
//! the source `kvm-manager-agent`.
//!
//! Each event carries two strings: the one-line summary and the record as
//! JSON (details as one JSON string, cut like the syslog form), and is an
//! information event when the request succeeded, a warning otherwise. The
//! source is registered by the installer (the MSI of the Windows packaging);
//! without that registration Windows still stores the events, and Event
//! Viewer shows the strings under a "description cannot be found" notice.

use std::io;

use windows_sys::Win32::Foundation::HANDLE;
use windows_sys::Win32::System::EventLog::{
    DeregisterEventSource, RegisterEventSourceW, ReportEventW, EVENTLOG_INFORMATION_TYPE,
    EVENTLOG_WARNING_TYPE,
};

use super::{sinks, AuditRecord, Sink};

/// The event source name.
pub const SOURCE: &str = "kvm-manager-agent";

/// The event id of every audit record.
pub const EVENT_ID: u32 = 1000;

/// Longest string ReportEvent accepts, in UTF-16 units.
const MAX_STRING_UNITS: usize = 31_839;

/// Details longer than this are cut in the JSON string (whole in the
/// JSON-lines file).
const MAX_DETAILS: usize = 16 * 1024;

/// A registered event source.
#[derive(Debug)]
pub struct EventLog {
    handle: HANDLE,
}

// SAFETY: an event source handle is not tied to the thread that opened it,
// and ReportEventW may be called on it from several threads at once.
unsafe impl Send for EventLog {}
// SAFETY: as above; the handle is never changed after registration.
unsafe impl Sync for EventLog {}

impl EventLog {
    /// Open the `kvm-manager-agent` source on this computer.
    pub fn register() -> io::Result<Self> {
        let name = wide(SOURCE);
        // SAFETY: a null server name means this computer; `name` is a
        // NUL-terminated UTF-16 string that outlives the call.
        let handle = unsafe { RegisterEventSourceW(std::ptr::null(), name.as_ptr()) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { handle })
    }

    /// The event type for a record: a warning when the request did not
    /// succeed (refused, failed or cancelled), else information.
    pub fn event_type(record: &AuditRecord) -> u16 {
        if record.error_code.is_some() || record.outcome != "ok" {
            EVENTLOG_WARNING_TYPE
        } else {
            EVENTLOG_INFORMATION_TYPE
        }
    }

    /// The event's strings: the summary, then the record as JSON.
    pub fn strings(record: &AuditRecord) -> [String; 2] {
        let json = sinks::flat_json(record, MAX_DETAILS).to_string();
        [
            cap_units(format!("audit: {}", record.summary())),
            cap_units(json),
        ]
    }
}

impl Sink for EventLog {
    fn name(&self) -> String {
        format!("Windows Event Log (source {SOURCE})")
    }

    fn write(&self, record: &AuditRecord) -> io::Result<()> {
        let [summary, json] = Self::strings(record);
        self.report(Self::event_type(record), EVENT_ID, &[&summary, &json])
    }
}

impl EventLog {
    /// Write one event of `event_type` (`EVENTLOG_*_TYPE`) and `event_id`
    /// with these strings (each cut to what one event string may hold).
    /// The service's log lines use it too ([`crate::logging`]).
    pub fn report(&self, event_type: u16, event_id: u32, strings: &[&str]) -> io::Result<()> {
        let strings: Vec<Vec<u16>> = strings
            .iter()
            .map(|s| wide(&cap_units((*s).to_owned())))
            .collect();
        let pointers: Vec<*const u16> = strings.iter().map(|s| s.as_ptr()).collect();
        let count = u16::try_from(pointers.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many event strings"))?;
        // SAFETY: `handle` is a live event source; `pointers` holds `count`
        // NUL-terminated UTF-16 strings that outlive the call; no user SID
        // and no raw data.
        let ok = unsafe {
            ReportEventW(
                self.handle,
                event_type,
                0,
                event_id,
                std::ptr::null_mut(),
                count,
                0,
                pointers.as_ptr(),
                std::ptr::null(),
            )
        };
        if ok == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        // SAFETY: the handle came from RegisterEventSourceW and is closed once.
        unsafe { DeregisterEventSource(self.handle) };
    }
}

/// `s` as a NUL-terminated UTF-16 string.
fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// Cut `s` to what one ReportEvent string may hold.
fn cap_units(mut s: String) -> String {
    const MARK: &str = "...(truncated)";
    if s.encode_utf16().count() <= MAX_STRING_UNITS {
        return s;
    }
    let mut units = 0;
    let mut cut = 0;
    for (i, c) in s.char_indices() {
        units += c.len_utf16();
        if units > MAX_STRING_UNITS - MARK.len() {
            break;
        }
        cut = i + c.len_utf8();
    }
    s.truncate(cut);
    s.push_str(MARK);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Decision;

    fn record(outcome: &str, error_code: Option<i64>) -> AuditRecord {
        AuditRecord {
            time_ms: 1_790_000_000_000,
            transport: "virtio-serial",
            peer: "virtio-serial host".into(),
            method: Some("exec".into()),
            id: Some("7".into()),
            decision: Decision::Allowed,
            reason: None,
            outcome: outcome.into(),
            error_code,
            duration_us: 42,
            details: serde_json::json!({"argv": ["C:\\Windows\\System32\\whoami.exe"]})
                .as_object()
                .unwrap()
                .clone(),
        }
    }

    #[test]
    fn strings_and_event_types() {
        let ok = record("ok", None);
        let [summary, json] = EventLog::strings(&ok);
        assert!(
            summary.starts_with("audit: exec 7 from virtio-serial host: allowed"),
            "{summary}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["method"], "exec");
        assert_eq!(
            v["details"],
            r#"{"argv":["C:\\Windows\\System32\\whoami.exe"]}"#
        );
        assert_eq!(EventLog::event_type(&ok), EVENTLOG_INFORMATION_TYPE);
        assert_eq!(
            EventLog::event_type(&record("error", Some(-32003))),
            EVENTLOG_WARNING_TYPE
        );
        assert_eq!(
            EventLog::event_type(&record("cancelled", None)),
            EVENTLOG_WARNING_TYPE
        );
    }

    #[test]
    fn long_strings_fit_one_event_string() {
        let mut r = record("ok", None);
        r.details.insert("big".into(), "é".repeat(100_000).into());
        let [_, json] = EventLog::strings(&r);
        assert!(json.encode_utf16().count() <= MAX_STRING_UNITS);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["details"].as_str().unwrap().ends_with("...(truncated)"));
        // A string past the limit is cut on a character boundary, marked.
        let capped = cap_units("😀".repeat(20_000));
        assert!(capped.encode_utf16().count() <= MAX_STRING_UNITS);
        assert!(capped.ends_with("😀...(truncated)"));
        assert_eq!(cap_units("short".into()), "short");
    }

    /// Registers the source and reports one information and one warning
    /// event. Under Wine 8.0 (where `cargo xtask test windows` runs this),
    /// RegisterEventSourceW, ReportEventW and DeregisterEventSource are
    /// stubs: a placeholder handle, success, and nothing stored; ReportEventW
    /// only prints the strings on Wine's `eventlog` debug channel (trace for
    /// information, warn for warning), which the xtask step checks. So this
    /// shows the calls and their arguments are accepted, not that an event
    /// reached a log: reading it back needs a real Windows.
    #[test]
    fn records_reach_report_event() {
        let sink = EventLog::register().expect("RegisterEventSourceW");
        sink.write(&record("ok", None))
            .expect("ReportEventW (information)");
        sink.write(&record("error", Some(-32003)))
            .expect("ReportEventW (warning)");
        assert_eq!(sink.name(), "Windows Event Log (source kvm-manager-agent)");
    }
}
