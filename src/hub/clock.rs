//! Wall-clock time as Unix milliseconds, and RFC 3339 (UTC, `Z`) text
//! (from [`crate::time`]).
//!
//! Small on purpose: the hub stores integers and only formats at the edge.

pub use crate::time::rfc3339;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|+00:00)`; other offsets are
/// refused rather than guessed at.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    crate::time::parse_rfc3339(s).filter(|t| t.offset_secs == 0).map(|t| t.unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for ms in [0, 951_782_400_000, 1_796_378_400_000, 4_102_444_799_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{}", rfc3339(ms));
        }
        assert_eq!(rfc3339(1_796_378_400_000), "2026-12-04T10:00:00Z");
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00.5Z"), Some(1_796_378_400_500));
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00+02:00"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
