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
        eprint!("{}", line(self.journald, r.level(), r.target(), &r.args().to_string(), super::clock::now_ms()));
    }
    fn flush(&self) {}
}

/// One line; see the module docs.
fn line(journald: bool, level: Level, target: &str, msg: &str, now_ms: i64) -> String {
    let msg = msg.replace('\n', " ");
    if journald {
        let prio = match level {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            _ => 7,
        };
        format!("<{prio}>{level} {target}: {msg}\n")
    } else {
        format!("{} {level} {target}: {msg}\n", crate::time::rfc3339_millis(now_ms))
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_time_unless_the_journal_stamps_it() {
        use log::Level;
        let t = 1_796_378_400_250;
        assert_eq!(
            super::line(false, Level::Info, "uplink::hub::server", "stopped", t),
            "2026-12-04T10:00:00.250Z INFO uplink::hub::server: stopped\n"
        );
        assert_eq!(super::line(true, Level::Error, "x", "a\nb", t), "<3>ERROR x: a b\n");
    }
}
