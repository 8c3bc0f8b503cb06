//! Wall-clock time as data.
//!
//! The core never reads a clock: every transition receives `now` as Unix milliseconds. State
//! outlives processes, so a monotonic `Instant` would be meaningless after a reload. All
//! arithmetic saturates, because `now` may move backwards (clock steps, a replayed input).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }
    pub fn plus_ms(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }
    pub fn plus_secs(self, secs: u64) -> Self {
        self.plus_ms(secs.saturating_mul(1000))
    }
    /// Milliseconds from `self` until `later`, zero when `later` is not after `self`.
    pub fn until(self, later: Timestamp) -> u64 {
        later.0.saturating_sub(self.0)
    }
    /// Formats as a FHIR instant with millisecond precision, e.g. `2026-11-26T15:32:51.000Z`.
    pub fn to_fhir_instant(self) -> String {
        let secs = self.0 / 1000;
        let ms = self.0 % 1000;
        let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
        let sod = secs % 86_400;
        format!(
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_fhir_instant())
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a FHIR `instant` (`YYYY-MM-DDThh:mm:ss[.fff…](Z|±hh:mm)`), as used by `_since` and
/// a manifest's `transactionTime`. Returns the instant as Unix milliseconds.
pub fn parse_fhir_instant(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let y = digits(s.get(0..4)?)? as i64;
    let mo = digits(s.get(5..7)?)?;
    let d = digits(s.get(8..10)?)?;
    let h = digits(s.get(11..13)?)?;
    let mi = digits(s.get(14..16)?)?;
    let sec = digits(s.get(17..19)?)?;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 {
        return None;
    }
    if sec > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut ms = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let end = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        if end == 0 {
            return None;
        }
        let f = &frac[..end];
        let padded: String = f.chars().chain("000".chars()).take(3).collect();
        ms = u64::from(digits(&padded)?);
        rest = &frac[end..];
    }
    let offset_min: i64 = match rest {
        "Z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || (rb[0] != b'+' && rb[0] != b'-') || rb[3] != b':' {
                return None;
            }
            let oh = digits(rest.get(1..3)?)? as i64;
            let om = digits(rest.get(4..6)?)? as i64;
            if oh > 14 || om > 59 {
                return None;
            }
            let sign = if rb[0] == b'-' { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec.min(59))
        - offset_min * 60;
    if secs < 0 {
        return None;
    }
    Some(Timestamp((secs as u64) * 1000 + ms))
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the HTTP-date form of
/// `Retry-After`. Obsolete forms are rare enough to treat as unparseable.
pub fn parse_http_date(s: &str) -> Option<Timestamp> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || !parts[0].ends_with(',') || parts[5] != "GMT" {
        return None;
    }
    let d = digits(parts[1])?;
    let mo = match parts[2] {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let y = digits(parts[3])? as i64;
    let hms: Vec<&str> = parts[4].split(':').collect();
    if hms.len() != 3 || y < 1970 || d == 0 || d > days_in_month(y, mo) {
        return None;
    }
    let (h, mi, sec) = (digits(hms[0])?, digits(hms[1])?, digits(hms[2])?);
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(sec.min(59));
    u64::try_from(secs).ok().map(Timestamp::from_secs)
}

/// A numeric `Retry-After` at least this large is an absolute epoch time, not a delay: one
/// real server (the SMART reference server) sends epoch seconds. 10^9 s is 2001 as an epoch
/// and 31 years as a delay, so the two readings cannot be confused in practice.
const EPOCH_THRESHOLD_SECS: u64 = 1_000_000_000;
/// ... and a number at least this large is epoch *milliseconds* (the same server's 429 answers
/// carry `Date.now()`): 10^12 s would be the year 33,658, 10^12 ms is 2001.
const EPOCH_THRESHOLD_MS: u64 = 1_000_000_000_000;

/// Interprets a `Retry-After` header value at `now`: delta seconds, an HTTP-date, or an
/// absolute epoch number in seconds or milliseconds. Returns the delay in milliseconds (zero
/// for times in the past), or `None` when the value is unparseable — an unreadable hint is
/// ignored, not fatal.
pub fn retry_after_delay_ms(value: &str, now: Timestamp) -> Option<u64> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // An absurdly long number saturates to "as late as possible"; the caller clamps.
        let n = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(if n >= EPOCH_THRESHOLD_MS {
            now.until(Timestamp(n))
        } else if n >= EPOCH_THRESHOLD_SECS {
            now.until(Timestamp::from_secs(n))
        } else {
            n.saturating_mul(1000)
        });
    }
    parse_http_date(v).map(|t| now.until(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instant_round_trips_and_accepts_offsets() {
        let t = parse_fhir_instant("2026-11-26T15:32:51.123Z").unwrap();
        assert_eq!(t.to_fhir_instant(), "2026-11-26T15:32:51.123Z");
        let with_offset = parse_fhir_instant("2026-11-26T17:32:51.123+02:00").unwrap();
        assert_eq!(with_offset, t);
        assert_eq!(
            parse_fhir_instant("2026-11-26T15:32:51Z").unwrap().0,
            t.0 - 123
        );
    }

    #[test]
    fn instant_rejects_malformed_values() {
        for bad in [
            "",
            "2026-11-26",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-26T15:32:51",
            "2026-11-26T15:32:51.Z",
            "2026-11-26T25:00:00Z",
            "yesterday",
            "2026-11-26T15:32:51+2:00",
        ] {
            assert_eq!(parse_fhir_instant(bad), None, "{bad}");
        }
    }

    #[test]
    fn http_date_parses() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.to_fhir_instant(), "1994-11-06T08:49:37.000Z");
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }

    #[test]
    fn retry_after_understands_all_three_forms() {
        let now = parse_fhir_instant("2026-11-26T00:00:00Z").unwrap();
        assert_eq!(retry_after_delay_ms("120", now), Some(120_000));
        assert_eq!(
            retry_after_delay_ms("Thu, 26 Nov 2026 00:00:30 GMT", now),
            Some(30_000)
        );
        let epoch = now.0 / 1000 + 45;
        assert_eq!(retry_after_delay_ms(&epoch.to_string(), now), Some(45_000));
        assert_eq!(retry_after_delay_ms("1000000000", now), Some(0));
        assert_eq!(retry_after_delay_ms("soon", now), None);
        assert_eq!(retry_after_delay_ms("-5", now), None);
    }

    #[test]
    fn retry_after_epoch_milliseconds_are_not_read_as_seconds() {
        // The SMART reference server's 429: `Retry-After: <Date.now() + 5 min>` in ms.
        let now = parse_fhir_instant("2026-11-30T10:00:00Z").unwrap();
        let in_five_minutes = now.0 + 300_000;
        assert_eq!(
            retry_after_delay_ms(&in_five_minutes.to_string(), now),
            Some(300_000)
        );
        assert_eq!(retry_after_delay_ms("1000000000000", now), Some(0));
    }
}
