//! The small parsers of config values: durations, quotas and key expiry dates.

use std::time::Duration;

use super::settings::Quota;

/// `"250ms"`, `"30s"`, `"10m"`, `"2h"`, `"1d"`, and the rest of humantime's forms (`"1h 30m"`,
/// `"1.5s"`, `"2min"`, `"1week"`).
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    match humantime::parse_duration(v) {
        Ok(d) => Ok(d),
        Err(humantime::DurationError::NumberOverflow) => saturated(v)
            .ok_or_else(|| format!("`{v}` is not a duration (it is too large to be represented)")),
        Err(e) => Err(format!(
            "`{v}` is not a duration ({e}; examples: \"250ms\", \"30s\", \"10m\", \"1h 30m\")"
        )),
    }
}

/// What the parser before humantime made of a count with one unit that overflows humantime's
/// arithmetic (more than about 584 years, or that many milliseconds): the same duration, or
/// the longest one (it saturated). Kept so that every file that loaded still loads alike.
fn saturated(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = |per: u64| Duration::from_secs(n.saturating_mul(per));
    Some(match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => return None,
    })
}

/// `"30/min"`, `"500/day"`, `"100/week"`, `"5/sec"`, `"1000/hour"`.
pub fn parse_quota(v: &str) -> Result<Quota, String> {
    let err = || format!("`{v}` is not a quota (examples: \"30/min\", \"500/day\", \"100/week\")");
    let (n, unit) = v.trim().split_once('/').ok_or_else(err)?;
    let count: u32 = n.trim().parse().map_err(|_| err())?;
    if count == 0 {
        return Err(format!("`{v}`: the count must be at least 1"));
    }
    let secs = match unit.trim() {
        "s" | "sec" | "second" => 1,
        "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86400,
        "w" | "week" => 604800,
        _ => return Err(err()),
    };
    Ok(Quota {
        count,
        period: Duration::from_secs(secs),
    })
}

pub fn parse_not_after(v: &str) -> Result<time::OffsetDateTime, String> {
    let v = v.trim();
    if let Ok(t) = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339) {
        return Ok(t.to_offset(time::UtcOffset::UTC));
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    match time::Date::parse(v, &date_format) {
        Ok(d) => Ok(d
            .with_time(time::macros::time!(23:59:59.999_999_999))
            .assume_utc()),
        Err(_) => Err(format!(
            "`{v}` is not an RFC 3339 date-time or date (examples: \"2026-12-31T00:00:00Z\", \"2026-12-31\")"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_the_parser_before_humantime_took_parses_alike() {
        let secs = Duration::from_secs;
        for (text, want) in [
            ("250ms", Duration::from_millis(250)),
            ("30s", secs(30)),
            ("10m", secs(600)),
            ("2h", secs(7200)),
            ("1d", secs(86400)),
            ("0s", Duration::ZERO),
            (" 30 s ", secs(30)),
            ("007s", secs(7)),
            // Past humantime's range: exact or saturated, as before.
            ("18446744073709551615ms", Duration::from_millis(u64::MAX)),
            ("18446744073709551615s", secs(u64::MAX)),
            ("999999999999999999d", secs(u64::MAX)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for text in [
            "",
            "10",
            "-1s",
            "s",
            "5 fortnights",
            "1.5x",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        // humantime's forms, new.
        assert_eq!(parse_duration("1h 30m"), Ok(secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2min"), Ok(secs(120)));
        // The form /config shows durations in reads back.
        assert_eq!(parse_duration("60000ms"), Ok(secs(60)));
    }

    #[test]
    fn durations_and_quotas_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        let q = parse_quota("100/week").unwrap();
        assert_eq!((q.count, q.period.as_secs()), (100, 604800));
        assert_eq!(q.to_string(), "100/week");
        assert!(parse_quota("0/min").is_err());
        assert!(parse_quota("5/fortnight").is_err());
    }
}
