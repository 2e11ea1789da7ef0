//! The small parsers of config values: durations, quotas and key expiry dates.

use std::time::Duration;

use super::settings::Quota;

/// `"250ms"`, `"30s"`, `"10m"`, `"2h"`, `"1d"`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a duration (examples: \"250ms\", \"30s\", \"10m\")"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
                "`{v}` is not a duration (units: ms, s, m, h, d; examples: \"250ms\", \"30s\")"
            ))
        }
    };
    Ok(d)
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
