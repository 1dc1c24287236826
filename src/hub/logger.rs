//! A tiny stderr logger: one line per record,
//! `2026-12-04T10:00:00.250Z INFO uplink::hub::server: message key=value`.
//! Under journald (which stamps lines itself) the time gives way to a
//! `<N>` priority prefix: `<6>INFO uplink::hub::server: ...`.
//! Messages carry `key=value` pairs and never secrets.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    journald: bool,
}

static LOGGER: std::sync::OnceLock<Stderr> = std::sync::OnceLock::new();

impl Log for Stderr {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = r.args().to_string().replace('\n', " ");
        if self.journald {
            let prio = match r.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                _ => 7,
            };
            eprintln!("<{prio}>{} {}: {msg}", r.level(), r.target());
        } else {
            let now = crate::time::rfc3339_millis(super::clock::now_ms());
            eprintln!("{now} {} {}: {msg}", r.level(), r.target());
        }
    }
    fn flush(&self) {}
}

/// Installs the logger; `UPLINK_LOG` (error, warn, info, debug, trace)
/// sets the level, default info.
pub fn init() {
    let level = std::env::var("UPLINK_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(LevelFilter::Info);
    let logger = LOGGER.get_or_init(|| Stderr { journald: crate::time::stderr_is_journal() });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
