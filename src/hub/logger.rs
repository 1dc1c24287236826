//! A tiny stderr logger: one line per record,
//! `2026-12-04T10:00:00Z INFO uplink::hub::server: message key=value`.
//! Messages carry `key=value` pairs and never secrets.

use log::{LevelFilter, Log, Metadata, Record};

struct Stderr;

static LOGGER: Stderr = Stderr;

impl Log for Stderr {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{} {} {}: {}", super::clock::rfc3339(super::clock::now_ms()), r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Installs the logger; `UPLINK_LOG` (error, warn, info, debug, trace)
/// sets the level, default info.
pub fn init() {
    let level = std::env::var("UPLINK_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
