//! RFC 3339 date-times as Unix milliseconds, without a date crate: the
//! hub writes them (activation expiry, API answers, logs) and the agent
//! reads the activation's expiry.
//!
//! Only what uplink exchanges: formatting is always UTC (`Z`) in whole
//! seconds; parsing takes fractions and numeric offsets and says which
//! offset was written, so a caller may insist on UTC.
//!
//! Also the durations operators write in flags (`5s`, `500ms`, `2m`).
//!
//! Not here: clocks (callers pass the time in), time zones, leap-second
//! arithmetic (`:60` is taken as the next second).

/// A parsed date-time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Milliseconds since the Unix epoch (fractions past milliseconds are
    /// dropped).
    pub unix_ms: i64,
    /// The offset as written, in seconds east of UTC (`Z` is 0).
    pub offset_secs: i64,
}

/// `2026-12-04T10:00:00Z` (UTC, whole seconds).
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `2026-12-04T10:00:00.250Z` (UTC, milliseconds): log lines.
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let s = rfc3339(unix_ms);
    format!("{}.{:03}Z", &s[..s.len() - 1], unix_ms.rem_euclid(1000))
}

/// Milliseconds since the Unix epoch, now: the one clock read here, for
/// log lines.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Whether stderr goes to the systemd journal, which stamps each line
/// itself: `JOURNAL_STREAM` names the stream systemd connected (the check
/// `sd_journal_stream_fd` users make), so log lines then carry no time of
/// their own and a `<N>` priority prefix instead.
pub fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Parses `YYYY-MM-DD(T|t| )HH:MM:SS[.frac](Z|z|+HH:MM|-HH:MM)`, the
/// whole string.
pub fn parse_rfc3339(s: &str) -> Option<DateTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) { t.parse().ok() } else { None }
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0;
    if b[i] == b'.' {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let kept = digits.min(3);
        frac_ms = num(i + 1..i + 1 + kept)? * 10i64.pow(3 - kept as u32);
        i += 1 + digits;
    }
    let offset_secs = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let local = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se;
    Some(DateTime { unix_ms: (local - offset_secs) * 1000 + frac_ms, offset_secs })
}

// Howard Hinnant's civil calendar algorithms (public domain).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses a duration as operators write it in flags: a number with an
/// optional unit, `ms`, `s` (the default), `m` or `h`: `500ms`, `5`,
/// `1.5s`, `2m`. Negative, non-finite and absurd (over a day) values are
/// refused.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    let secs = num
        .trim()
        .parse::<f64>()
        .ok()
        .map(|n| n * scale)
        .filter(|v| v.is_finite() && *v >= 0.0 && *v <= 86_400.0)
        .ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 5s or 2m"))?;
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_fractions() {
        let t = |ms, off| Some(DateTime { unix_ms: ms, offset_secs: off });
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00Z"), t(1_796_378_400_000, 0));
        assert_eq!(parse_rfc3339("2026-12-04T12:00:00.1239+02:00"), t(1_796_378_400_123, 7200));
        assert_eq!(parse_rfc3339("2026-12-04t09:30:00-00:30"), t(1_796_378_400_000, -1800));
        assert_eq!(parse_rfc3339("1969-12-31 23:59:59z"), t(-1000, 0));
        for bad in ["2026-12-04T10:00:00", "2026-12-04T10:00:00.Z", "2026-12-04T10:00:00+0200", "2026-12-04T10:00:00Zx"]
        {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(rfc3339(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration(" 2m ").unwrap(), Duration::from_secs(120));
        assert_eq!(rfc3339_millis(1_796_378_400_250), "2026-12-04T10:00:00.250Z");
        for bad in ["", "-1s", "5x", "ms", "NaN", "2d", "100000h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
