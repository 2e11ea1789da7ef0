//! Credit usage from the ledger, for `GET /usage`, `linkup-gateway usage` and the dashboard:
//! query parsing and the JSON, CSV and table renderings.

use std::fmt::Write;

use time::Date;

use crate::ledger::{day_key, GroupBy, UsageQuery, UsageRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Table,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "table" => Ok(Format::Table),
            other => Err(format!("format `{other}`: expected json, csv or table")),
        }
    }
}

pub fn today() -> Date {
    time::OffsetDateTime::now_utc().date()
}

/// `YYYY-MM-DD` (UTC days), or `today`.
pub fn parse_day(s: &str) -> Result<Date, String> {
    if s == "today" {
        return Ok(today());
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &fmt).map_err(|_| format!("`{s}` is not a date (YYYY-MM-DD)"))
}

/// A query from optional `from`, `to` and `by` strings; the default range is today (UTC).
pub fn query(from: Option<&str>, to: Option<&str>, by: Option<&str>) -> Result<UsageQuery, String> {
    let from_day = from.map(parse_day).transpose()?.unwrap_or_else(today);
    let to_day = match to {
        Some(t) => parse_day(t)?,
        None if from.is_some() => today().max(from_day),
        None => today(),
    };
    if to_day < from_day {
        return Err(format!(
            "`to` ({}) is before `from` ({})",
            day_key(to_day),
            day_key(from_day)
        ));
    }
    Ok(UsageQuery {
        from_day,
        to_day,
        by: GroupBy::parse_list(by.unwrap_or("client"))?,
    })
}

fn keys(r: &UsageRow, by: &[GroupBy]) -> Vec<String> {
    by.iter()
        .map(|g| {
            match g {
                GroupBy::Client => &r.client,
                GroupBy::Account => &r.account,
                GroupBy::Action => &r.action,
                GroupBy::Day => &r.day,
                GroupBy::Outcome => &r.outcome,
            }
            .clone()
            .unwrap_or_default()
        })
        .collect()
}

pub fn json(rows: &[UsageRow]) -> String {
    serde_json::to_string(&serde_json::json!({ "rows": rows })).unwrap_or_default()
}

/// A cell a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first: OWASP's
/// CSV injection list) gets a leading `'`, which spreadsheets show and never evaluate.
fn neutralised(s: &str) -> std::borrow::Cow<'_, str> {
    match s.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{s}").into(),
        _ => s.into(),
    }
}

/// CSV (RFC 4180 quoting by the `csv` crate), one line per row, text cells neutralised.
pub fn csv(rows: &[UsageRow], by: &[GroupBy]) -> String {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut header: Vec<&str> = by.iter().map(|g| g.as_str()).collect();
    header.extend(["requests", "credits"]);
    // Writing to a Vec cannot fail.
    let _ = w.write_record(&header);
    for r in rows {
        let mut fields: Vec<String> = keys(r, by)
            .iter()
            .map(|k| neutralised(k).into_owned())
            .collect();
        fields.push(r.requests.to_string());
        fields.push(r.credits.to_string());
        let _ = w.write_record(&fields);
    }
    w.into_inner()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A readable table with a total line.
pub fn table(rows: &[UsageRow], by: &[GroupBy]) -> String {
    let mut header: Vec<String> = by.iter().map(|g| g.as_str().to_owned()).collect();
    header.extend(["requests".into(), "credits".into()]);
    let mut lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut l = keys(r, by);
            l.push(r.requests.to_string());
            l.push(r.credits.to_string());
            l
        })
        .collect();
    let (req, cred) = rows
        .iter()
        .fold((0u64, 0u64), |(a, b), r| (a + r.requests, b + r.credits));
    let mut total = vec![String::new(); by.len()];
    if let Some(first) = total.first_mut() {
        *first = "TOTAL".into();
    }
    total.push(req.to_string());
    total.push(cred.to_string());
    let width: Vec<usize> = (0..header.len())
        .map(|i| {
            std::iter::once(&header)
                .chain(lines.iter())
                .chain(std::iter::once(&total))
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric_from = by.len();
    let render = |l: &Vec<String>, out: &mut String| {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i >= numeric_from {
                    format!("{c:>w$}", w = width[i])
                } else {
                    format!("{c:<w$}", w = width[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    let mut out = String::new();
    render(&header, &mut out);
    let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "{}", rule.join("  "));
    for l in lines.drain(..) {
        render(&l, &mut out);
    }
    let _ = writeln!(out, "{}", rule.join("  "));
    render(&total, &mut out);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(client: &str, day: &str, requests: u64, credits: u64) -> UsageRow {
        UsageRow {
            client: Some(client.into()),
            account: None,
            action: None,
            day: Some(day.into()),
            outcome: None,
            requests,
            credits,
        }
    }

    #[test]
    fn query_defaults_to_today_and_checks_order() {
        let q = query(None, None, None).unwrap();
        assert_eq!((q.from_day, q.to_day), (today(), today()));
        assert_eq!(q.by, vec![GroupBy::Client]);
        let q = query(
            Some("2026-01-01"),
            Some("2026-01-31"),
            Some("day,action,day"),
        )
        .unwrap();
        assert_eq!(q.by, vec![GroupBy::Day, GroupBy::Action]);
        assert!(query(Some("2026-02-01"), Some("2026-01-01"), None).is_err());
        assert!(query(Some("yesterday-ish"), None, None).is_err());
        assert!(query(None, None, Some("client,colour")).is_err());
    }

    #[test]
    fn csv_and_table_render_with_totals() {
        let rows = vec![
            row("crm", "2026-11-24", 3, 5),
            row("a,b", "2026-11-25", 1, 1),
        ];
        let by = [GroupBy::Client, GroupBy::Day];
        let c = csv(&rows, &by);
        assert_eq!(
            c,
            "client,day,requests,credits\ncrm,2026-11-24,3,5\n\"a,b\",2026-11-25,1,1\n"
        );
        let t = table(&rows, &by);
        assert!(t.lines().last().unwrap().starts_with("TOTAL"));
        assert!(t.lines().last().unwrap().ends_with('6'));
        // Formula cells are neutralised; quoting stays RFC 4180.
        let rows = vec![
            row("=HYPERLINK(\"http://x\",\"y\")", "2026-11-24", 1, 1),
            row("+1", "2026-11-24", 1, 1),
            row("@SUM(A1)", "2026-11-24", 1, 1),
            row("-2", "2026-11-24", 1, 1),
            row("\tx", "2026-11-24", 1, 1),
        ];
        let c = csv(&rows, &by);
        let cells: Vec<&str> = c
            .lines()
            .skip(1)
            .map(|l| l.rsplitn(4, ',').last().unwrap())
            .collect();
        assert_eq!(
            cells,
            [
                "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"",
                "'+1",
                "'@SUM(A1)",
                "'-2",
                "'\tx"
            ]
        );
        let rows = vec![row("crm", "2026-11-24", 3, 5)];
        let j: serde_json::Value = serde_json::from_str(&json(&rows)).unwrap();
        assert_eq!(j["rows"][0]["credits"], 5);
        assert!(j["rows"][0].get("account").is_none());
    }
}
