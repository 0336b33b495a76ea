//! Logging through the `log` facade: to the journal (with fields such as `LOCK_ID`) when stderr
//! is connected to it, else readable lines on stderr. Level: `LOCKBRIDGE_LOG` if set, else the
//! configured `log.level`, else info. Nothing secret is ever passed to the logger: keys and
//! certificates are never formatted, only lock ids, command ids and public facts.

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level() && !is_embedded_broker(metadata.target())
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{:<5} {}",
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// The demo's embedded MQTT broker (rumqttd) traces every packet, at error level among others,
/// through `tracing`'s log records; none of it is for the person running the demo.
fn is_embedded_broker(target: &str) -> bool {
    target.starts_with("rumqttd") || target.starts_with("tracing::span")
}

fn level(configured: Option<&str>) -> log::LevelFilter {
    std::env::var("LOCKBRIDGE_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| configured.and_then(|v| v.parse().ok()))
        .unwrap_or(log::LevelFilter::Info)
}

/// Readable lines on stderr (for the CLI and tools).
pub fn init_stderr() {
    init_stderr_at("info");
}

/// Readable lines on stderr at `default` unless `LOCKBRIDGE_LOG` says otherwise.
pub fn init_stderr_at(default: &str) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level(Some(default)));
    }
}

/// The daemon's logger: the journal when stderr is the journal, else stderr.
pub fn init_daemon(configured_level: &str) {
    let level = level(Some(configured_level));
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            let logger = logger.with_extra_fields(vec![("SYSLOG_IDENTIFIER", "lockbridge")]);
            if logger.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    } else {
        // Already installed (for example by the CLI before the config was read).
        log::set_max_level(level);
    }
}
