//! The typed values users type on the command line: NAMEs, durations and sizes,
//! parsed once here so that nothing downstream reads raw strings.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// The longest duration any option takes: 100 years. Every deadline is a start plus
/// at most two of these (a timeout and its grace), far inside what `Instant` and
/// `SystemTime` hold, and a ttl in milliseconds fits a `u64` with room to spare.
pub const MAX_DURATION: Duration = Duration::from_secs(DURATION_LIMIT_DAYS * 86_400);
const DURATION_LIMIT_DAYS: u64 = 36_500;

/// The longest NAME: one lock file and one result per NAME must fit any file system.
const NAME_MAX_LEN: usize = 128;

/// A validated NAME: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, so it is always one safe
/// file name component.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn parse(value: &str) -> Result<Name, String> {
        let mut chars = value.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if first_ok && rest_ok && value.len() <= NAME_MAX_LEN {
            Ok(Name(value.to_owned()))
        } else {
            Err(format!(
                "invalid NAME {value:?}: use 1 to {NAME_MAX_LEN} letters, digits, '.', '_' or '-', \
                 starting with a letter or digit"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `500ms`, `30s`, `5m`, `1h`, `1h30m`, or a bare number of seconds (`30`, `0.5`).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let bad = || {
        format!("invalid duration {value:?}: use e.g. 500ms, 30s, 5m, 1h30m or a number of seconds")
    };
    if value.starts_with('-') {
        return Err(format!(
            "invalid duration {value:?}: durations are not negative"
        ));
    }
    let duration = if value.starts_with(|c: char| c.is_ascii_digit())
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        let seconds: f64 = value.parse().map_err(|_| bad())?;
        Duration::try_from_secs_f64(seconds).map_err(|_| bad())?
    } else {
        humantime::parse_duration(value).map_err(|_| bad())?
    };
    if duration > MAX_DURATION {
        return Err(format!(
            "duration {value:?} is too long: the limit is {DURATION_LIMIT_DAYS}d (100 years)"
        ));
    }
    Ok(duration)
}

/// `--timeout`: a duration, where `0`, `off` and `none` mean no limit (as `timeout 0`
/// does), held as [`MAX_DURATION`] so that every deadline formed from it still fits.
pub fn parse_timeout(value: &str) -> Result<Duration, String> {
    if matches!(value.trim(), "off" | "none") {
        return Ok(MAX_DURATION);
    }
    let duration = parse_duration(value)?;
    Ok(if duration.is_zero() {
        MAX_DURATION
    } else {
        duration
    })
}

/// `start + duration`, or `None` where that is past what an `Instant` holds (never,
/// for durations within [`MAX_DURATION`]; a value from a file or from etcd may be
/// anything). `None` means "no deadline".
pub fn deadline(start: Instant, duration: Duration) -> Option<Instant> {
    start.checked_add(duration)
}

/// `start + duration`, at most [`MAX_DURATION`] later: for deadlines that must be an
/// `Instant` (a lease's expiry, renewed long before), formed from values that are not
/// ours to bound (etcd's answer).
pub fn later(start: Instant, duration: Duration) -> Instant {
    start
        .checked_add(duration.min(MAX_DURATION))
        .unwrap_or(start)
}

/// The moment `ms` milliseconds after the Unix epoch, or `None` past what a
/// `SystemTime` holds (a damaged or hostile timestamp in a file).
pub fn epoch_ms(ms: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A duration in whole milliseconds, saturating (a `u128` would not fit a record).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `16MiB`, `64KiB`, `1GiB`, `500KB`, `1000` (bytes). Binary units are powers of 1024,
/// decimal ones (`KB`, `MB`, `GB`) powers of 1000; `K`, `M`, `G` are binary.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let bad =
        || format!("invalid size {value:?}: use e.g. 64KiB, 16MiB, 1GiB or a number of bytes");
    let trimmed = value.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = number * multiplier as f64;
    if bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64 {
        Ok(bytes as u64)
    } else {
        Err(bad())
    }
}

/// A short human form of a duration: `850ms`, `41s`, `5m12s`, `2h3m`, `3d4h`.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    let s = duration.as_secs();
    match s {
        _ if s < 1 => format!("{ms}ms"),
        0..60 if !ms.is_multiple_of(1000) && s < 10 => format!("{:.1}s", duration.as_secs_f64()),
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A short human form of a size: `0B`, `512B`, `10.0KiB`, `16.0MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// `--refresher-lease=LEASE:TOKEN` (internal): the etcd lock a `--background` caller
/// hands to its refresher: the lease id in hex (as etcd prints it) and the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseHandover {
    pub lease: i64,
    pub token: i64,
}

impl LeaseHandover {
    pub fn parse(value: &str) -> Result<LeaseHandover, String> {
        let bad = || format!("invalid lease handover {value:?}: expected LEASE:TOKEN");
        let (lease, token) = value.split_once(':').ok_or_else(bad)?;
        Ok(LeaseHandover {
            // etcd prints lease ids as unsigned hex; the API's int64 may be negative.
            lease: u64::from_str_radix(lease, 16).map_err(|_| bad())? as i64,
            token: token.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for LeaseHandover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{}", self.lease as u64, self.token)
    }
}

/// The lock a detached refresher was handed by its `--background` caller.
#[derive(Clone, Copy, Debug)]
pub enum Refresher {
    /// The locked lock file, open as this file descriptor (the cache dir backend).
    Fd(i32),
    /// The etcd lease that holds the lock, and its fencing token.
    Lease(LeaseHandover),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "ccusage", "A.b_c-9", &"x".repeat(128)] {
            assert!(Name::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "sp ace",
            "é",
            &"x".repeat(129),
        ] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("30s"), Ok(ms(30_000)));
        assert_eq!(parse_duration("5m"), Ok(ms(300_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1h30m"), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("30"), Ok(ms(30_000)));
        assert_eq!(parse_duration("0.5"), Ok(ms(500)));
        assert_eq!(parse_duration("0"), Ok(ms(0)));
        for bad in ["", "abc", "30x", "-1", "1..2", "s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        for huge in ["36500d 1s", "10000000000000000000", "1000000y"] {
            let err = parse_duration(huge).unwrap_err();
            assert!(err.contains("the limit is 36500d"), "{err}");
        }
    }

    #[test]
    fn deadlines_never_overflow() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::MAX), None);
        assert!(later(now, Duration::MAX) > now);
        // Whatever a file says, no panic.
        let _ = epoch_ms(u64::MAX);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500KB"), Ok(500_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        for bad in ["", "KiB", "0", "10XB", "-5", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(format_duration(Duration::from_secs(41)), "41s");
        assert_eq!(format_duration(Duration::from_secs(312)), "5m12s");
        assert_eq!(format_size(10 * 1024), "10.0KiB");
        assert_eq!(format_size(12), "12B");
    }

    #[test]
    fn lease_handovers_round_trip() {
        let handover = LeaseHandover {
            lease: 0x694d_8b2a_1c3f_0a11,
            token: 42,
        };
        assert_eq!(handover.to_string(), "694d8b2a1c3f0a11:42");
        assert_eq!(LeaseHandover::parse(&handover.to_string()), Ok(handover));
        let negative = LeaseHandover {
            lease: -2,
            token: 7,
        };
        assert_eq!(negative.to_string(), "fffffffffffffffe:7");
        assert_eq!(LeaseHandover::parse("fffffffffffffffe:7"), Ok(negative));
        for bad in ["", "12", "x:1", "1:y", ":", "1:"] {
            assert!(LeaseHandover::parse(bad).is_err(), "{bad}");
        }
    }
}
