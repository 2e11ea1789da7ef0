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

/// Rows per page of `/usage` (and `usage --format json`) when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 1_000;
/// The most rows one page may hold: a larger `limit` is refused, not trimmed.
pub const MAX_LIMIT: usize = 10_000;
/// A cursor longer than this is not one we wrote (five keys of at most a few hundred bytes).
const MAX_CURSOR_CHARS: usize = 16_384;

/// `limit`: a number of rows from 1 to [`MAX_LIMIT`].
pub fn parse_limit(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "limit `{s}`: expected a number of rows from 1 to {MAX_LIMIT} (follow next_cursor \
             for the rows after a page)"
        )),
    }
}

/// What a cursor holds: the query it continues and the keys of the last row it gave.
#[derive(serde::Serialize, serde::Deserialize)]
struct CursorData {
    v: u8,
    from: String,
    to: String,
    by: Vec<String>,
    after: Vec<String>,
}

const CURSOR_VERSION: u8 = 1;

/// The opaque `next_cursor` of a page: hex of a small JSON document naming the query's range,
/// its grouping and the last row's keys. Opaque to callers (the format may change); the keys
/// are never trusted beyond being compared with the ledger's keys as bound parameters.
pub fn encode_cursor(q: &UsageQuery, after: &[String]) -> String {
    let data = CursorData {
        v: CURSOR_VERSION,
        from: day_key(q.from_day),
        to: day_key(q.to_day),
        by: q.by.iter().map(|g| g.as_str().to_owned()).collect(),
        after: after.to_vec(),
    };
    hex::encode(serde_json::to_vec(&data).unwrap_or_default())
}

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub from_day: Date,
    pub to_day: Date,
    pub by: Vec<GroupBy>,
    pub after: Vec<String>,
}

/// Read a cursor written by [`encode_cursor`]; anything else is refused.
pub fn decode_cursor(s: &str) -> Result<Cursor, String> {
    let garbled = || {
        "cursor: not a cursor of /usage (pass the next_cursor of the previous page unchanged)"
            .to_string()
    };
    if s.len() > MAX_CURSOR_CHARS {
        return Err(garbled());
    }
    let bytes = hex::decode(s.trim()).map_err(|_| garbled())?;
    let data: CursorData = serde_json::from_slice(&bytes).map_err(|_| garbled())?;
    if data.v != CURSOR_VERSION {
        return Err(garbled());
    }
    let from_day = parse_day(&data.from).map_err(|_| garbled())?;
    let to_day = parse_day(&data.to).map_err(|_| garbled())?;
    let by = data
        .by
        .iter()
        .map(|g| g.parse::<GroupBy>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| garbled())?;
    let distinct = by.iter().enumerate().all(|(i, g)| !by[..i].contains(g));
    if by.is_empty() || !distinct || data.after.len() != by.len() || to_day < from_day {
        return Err(garbled());
    }
    Ok(Cursor {
        from_day,
        to_day,
        by,
        after: data.after,
    })
}

/// A query and where its page starts.
#[derive(Debug, Clone)]
pub struct PagedQuery {
    pub query: UsageQuery,
    /// The keys of the last row of the previous page (from the cursor).
    pub after: Option<Vec<String>>,
}

/// A query from optional `from`, `to`, `by` and `cursor`. With a cursor, what is omitted is
/// the cursor's (so `?cursor=C` alone is the next page), and what is given must be the same as
/// the cursor's: a cursor of another query is refused.
pub fn paged_query(
    from: Option<&str>,
    to: Option<&str>,
    by: Option<&str>,
    cursor: Option<&str>,
) -> Result<PagedQuery, String> {
    let Some(cursor) = cursor else {
        return Ok(PagedQuery {
            query: query(from, to, by)?,
            after: None,
        });
    };
    let c = decode_cursor(cursor)?;
    let from_day = from.map(parse_day).transpose()?.unwrap_or(c.from_day);
    let to_day = to.map(parse_day).transpose()?.unwrap_or(c.to_day);
    let by_list = by.map(GroupBy::parse_list).transpose()?;
    let same_by = by_list.as_ref().is_none_or(|b| *b == c.by);
    if from_day != c.from_day || to_day != c.to_day || !same_by {
        let by =
            c.by.iter()
                .map(|g| g.as_str())
                .collect::<Vec<_>>()
                .join(",");
        return Err(format!(
            "cursor: it continues another query (from={}&to={}&by={by}); ask with the same \
             from, to and by, or without a cursor to start again",
            day_key(c.from_day),
            day_key(c.to_day)
        ));
    }
    Ok(PagedQuery {
        query: UsageQuery {
            from_day,
            to_day,
            by: c.by,
        },
        after: Some(c.after),
    })
}

/// A JSON page: `{"rows": [...], "next_cursor": "..." | null}`.
pub fn json_page(rows: &[UsageRow], next_cursor: Option<&str>) -> String {
    serde_json::to_string(&serde_json::json!({ "rows": rows, "next_cursor": next_cursor }))
        .unwrap_or_default()
}

/// A cell a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first: OWASP's
/// CSV injection list) gets a leading `'`, which spreadsheets show and never evaluate.
fn neutralised(s: &str) -> std::borrow::Cow<'_, str> {
    match s.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{s}").into(),
        _ => s.into(),
    }
}

/// The CSV header line.
pub fn csv_header(by: &[GroupBy]) -> Vec<u8> {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut header: Vec<&str> = by.iter().map(|g| g.as_str()).collect();
    header.extend(["requests", "credits"]);
    // Writing to a Vec cannot fail.
    let _ = w.write_record(&header);
    w.into_inner().unwrap_or_default()
}

/// CSV lines (RFC 4180 quoting by the `csv` crate), one per row, text cells neutralised; no
/// header, so pages can follow one another in one stream.
pub fn csv_rows(rows: &[UsageRow], by: &[GroupBy]) -> Vec<u8> {
    let mut w = ::csv::Writer::from_writer(Vec::with_capacity(rows.len() * 48));
    for r in rows {
        let mut fields: Vec<String> = r
            .keys(by)
            .iter()
            .map(|k| neutralised(k).into_owned())
            .collect();
        fields.push(r.requests.to_string());
        fields.push(r.credits.to_string());
        let _ = w.write_record(&fields);
    }
    w.into_inner().unwrap_or_default()
}

/// CSV with its header.
pub fn csv(rows: &[UsageRow], by: &[GroupBy]) -> String {
    let mut out = csv_header(by);
    out.extend(csv_rows(rows, by));
    String::from_utf8_lossy(&out).into_owned()
}

/// A readable table with a total line, written page by page: the header comes with the first
/// page, and a column is as wide as its widest cell so far (widths only grow, so a later page
/// with a longer key shifts the columns after it), the total after the last page.
pub struct TableWriter {
    by: Vec<GroupBy>,
    widths: Vec<usize>,
    requests: u64,
    credits: u64,
    started: bool,
}

impl TableWriter {
    pub fn new(by: &[GroupBy]) -> TableWriter {
        let mut widths: Vec<usize> = by.iter().map(|g| g.as_str().len()).collect();
        widths.extend(["requests".len(), "credits".len()]);
        if let Some(first) = widths.first_mut() {
            *first = (*first).max("TOTAL".len());
        }
        TableWriter {
            by: by.to_vec(),
            widths,
            requests: 0,
            credits: 0,
            started: false,
        }
    }

    fn header(&self) -> Vec<String> {
        let mut header: Vec<String> = self.by.iter().map(|g| g.as_str().to_owned()).collect();
        header.extend(["requests".into(), "credits".into()]);
        header
    }

    fn render(&self, l: &[String], out: &mut String) {
        let numeric_from = self.by.len();
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let w = self.widths.get(i).copied().unwrap_or(0);
                if i >= numeric_from {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }

    fn rule(&self, out: &mut String) {
        let rule: Vec<String> = self.widths.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "{}", rule.join("  "));
    }

    fn widen(&mut self, l: &[String]) {
        for (w, c) in self.widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }

    /// The lines of one page (with the header before the first).
    pub fn page(&mut self, rows: &[UsageRow]) -> String {
        let lines: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let mut l = r.keys(&self.by);
                l.push(r.requests.to_string());
                l.push(r.credits.to_string());
                l
            })
            .collect();
        for r in rows {
            self.requests = self.requests.saturating_add(r.requests);
            self.credits = self.credits.saturating_add(r.credits);
        }
        for l in &lines {
            self.widen(l);
        }
        let total = self.total_line("TOTAL");
        self.widen(&total);
        let mut out = String::new();
        if !self.started {
            self.started = true;
            self.render(&self.header(), &mut out);
            self.rule(&mut out);
        }
        for l in &lines {
            self.render(l, &mut out);
        }
        out
    }

    fn total_line(&self, label: &str) -> Vec<String> {
        let mut total = vec![String::new(); self.by.len()];
        if let Some(first) = total.first_mut() {
            *first = label.into();
        }
        total.push(self.requests.to_string());
        total.push(self.credits.to_string());
        total
    }

    /// The closing rule and the total line, labelled `label` (`TOTAL`).
    pub fn finish(mut self, label: &str) -> String {
        let mut out = if self.started {
            String::new()
        } else {
            self.page(&[])
        };
        let total = self.total_line(label);
        self.widen(&total);
        self.rule(&mut out);
        self.render(&total, &mut out);
        out
    }
}

/// A readable table with a total line.
pub fn table(rows: &[UsageRow], by: &[GroupBy]) -> String {
    let mut t = TableWriter::new(by);
    let mut out = t.page(rows);
    out.push_str(&t.finish("TOTAL"));
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
    fn limits_are_bounded() {
        assert_eq!(parse_limit("1"), Ok(1));
        assert_eq!(parse_limit("10000"), Ok(MAX_LIMIT));
        for bad in ["0", "10001", "-1", "ten", "", "1e3"] {
            assert!(
                parse_limit(bad).unwrap_err().contains("1 to 10000"),
                "{bad}"
            );
        }
    }

    #[test]
    fn cursors_round_trip_and_belong_to_their_query() {
        let q = query(
            Some("2026-01-01"),
            Some("2026-01-31"),
            Some("client,account"),
        )
        .unwrap();
        let after = vec!["crm".to_string(), "acc,\"ä\u{0}".to_string()];
        let c = encode_cursor(&q, &after);
        assert!(c.bytes().all(|b| b.is_ascii_hexdigit()), "{c}");
        let d = decode_cursor(&c).unwrap();
        assert_eq!((d.from_day, d.to_day), (q.from_day, q.to_day));
        assert_eq!(
            (d.by.clone(), d.after.clone()),
            (q.by.clone(), after.clone())
        );
        // Alone, the cursor is the query; with the same parameters too.
        for (from, to, by) in [
            (None, None, None),
            (
                Some("2026-01-01"),
                Some("2026-01-31"),
                Some("client,account"),
            ),
        ] {
            let p = paged_query(from, to, by, Some(&c)).unwrap();
            assert_eq!(p.query.by, q.by);
            assert_eq!((p.query.from_day, p.query.to_day), (q.from_day, q.to_day));
            assert_eq!(p.after.as_deref(), Some(&after[..]));
        }
        // Another query's cursor is refused.
        for (from, to, by) in [
            (Some("2026-01-02"), None, None),
            (None, Some("2026-02-01"), None),
            (None, None, Some("account,client")),
            (None, None, Some("client")),
        ] {
            let e = paged_query(from, to, by, Some(&c)).unwrap_err();
            assert!(e.contains("another query"), "{e}");
        }
        // Garbled, truncated, foreign or hand-made: refused.
        let mut flipped = c.clone().into_bytes();
        flipped[3] = if flipped[3] == b'0' { b'1' } else { b'0' };
        let hand = hex::encode(
            br#"{"v":1,"from":"2026-01-01","to":"2026-01-31","by":["client"],"after":["a","b"]}"#,
        );
        for bad in [
            "",
            "zz",
            "not a cursor",
            &c[..c.len() - 2],
            &String::from_utf8(flipped).unwrap(),
            &hand,
            &hex::encode(b"{}"),
            &"ab".repeat(10_000),
        ] {
            let e = paged_query(None, None, None, Some(bad)).unwrap_err();
            assert!(e.starts_with("cursor:"), "{bad}: {e}");
        }
        let p = paged_query(None, None, Some("day"), None).unwrap();
        assert!(p.after.is_none());
    }

    #[test]
    fn a_table_written_page_by_page_keeps_one_header_and_the_total() {
        let by = [GroupBy::Client, GroupBy::Day];
        let mut t = TableWriter::new(&by);
        let mut out = t.page(&[row("crm", "2026-11-24", 3, 5)]);
        out.push_str(&t.page(&[row("a-much-longer-name", "2026-11-25", 1, 1)]));
        out.push_str(&t.finish("TOTAL"));
        assert_eq!(out.matches("client").count(), 1, "{out}");
        let last = out.lines().last().unwrap();
        assert!(last.starts_with("TOTAL") && last.ends_with('6'), "{out}");
        let empty = TableWriter::new(&by).finish("TOTAL");
        assert!(empty.starts_with("client") && empty.lines().last().unwrap().ends_with('0'));
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
        let j: serde_json::Value = serde_json::from_str(&json_page(&rows, None)).unwrap();
        assert_eq!(j["rows"][0]["credits"], 5);
        assert!(j["next_cursor"].is_null());
        assert!(j["rows"][0].get("account").is_none());
    }
}
