//! Logs go to stderr; under systemd, each line carries its syslog priority
//! prefix (`<3>`) so journald files it at the right level.

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
