//! Logs go to stderr; under systemd, each line carries its syslog priority
//! prefix (`<3>`) so journald files it at the right level. A Windows
//! service has no console: there each line is an Event Log event
//! ([`init_event_log`]).

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

/// Parse a level name from the config file or command line.
pub fn parse_level(name: &str) -> Option<LevelFilter> {
    match name {
        "error" => Some(LevelFilter::Error),
        "warn" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

struct StderrLogger {
    journal: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = if self.journal {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{}\n", record.args())
        } else {
            format!(
                "kvm-manager-agent: {}: {}\n",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            )
        };
        // One write per line, so concurrent lines never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install the logger. Calling it twice keeps the first logger but applies
/// the new level.
pub fn init(level: LevelFilter) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = log::set_boxed_logger(Box::new(StderrLogger { journal }));
    log::set_max_level(level);
}

/// The event id of a log line in the Event Log (audit records use
/// [`crate::audit::eventlog::EVENT_ID`]).
#[cfg(windows)]
pub const LOG_EVENT_ID: u32 = 1;

#[cfg(windows)]
struct EventLogLogger {
    log: crate::audit::eventlog::EventLog,
}

#[cfg(windows)]
impl Log for EventLogLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        use windows_sys::Win32::System::EventLog::{
            EVENTLOG_ERROR_TYPE, EVENTLOG_INFORMATION_TYPE, EVENTLOG_WARNING_TYPE,
        };
        if !self.enabled(record.metadata()) {
            return;
        }
        let event_type = match record.level() {
            Level::Error => EVENTLOG_ERROR_TYPE,
            Level::Warn => EVENTLOG_WARNING_TYPE,
            Level::Info | Level::Debug | Level::Trace => EVENTLOG_INFORMATION_TYPE,
        };
        let line = format!("{}", record.args());
        // Nowhere else to say it if the Event Log refuses.
        let _ = self.log.report(event_type, LOG_EVENT_ID, &[&line]);
    }

    fn flush(&self) {}
}

/// Install the Event Log logger (source `kvm-manager-agent`, Application
/// log), for the Windows service. On failure to open the source, stderr.
#[cfg(windows)]
pub fn init_event_log(level: LevelFilter) {
    match crate::audit::eventlog::EventLog::register() {
        Ok(log) => {
            let _ = log::set_boxed_logger(Box::new(EventLogLogger { log }));
            log::set_max_level(level);
        }
        Err(_) => init(level),
    }
}
