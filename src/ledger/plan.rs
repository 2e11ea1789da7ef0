//! How a usage query is answered from the aggregate tables, shared by both backends (the
//! tables are the same; only the SQL dialect differs).

use time::Date;

use super::{day_key, GroupBy, UsageQuery, UsageRow};

/// What differs between SQLite and PostgreSQL in the usage SQL.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dialect {
    /// Placeholder prefix: `?1` or `$1`.
    placeholder: char,
    /// Appended to each sum (PostgreSQL's SUM of BIGINT is NUMERIC).
    sum_cast: &'static str,
    /// A derived table needs an alias in PostgreSQL.
    alias: &'static str,
}

impl Dialect {
    pub(super) const SQLITE: Dialect = Dialect {
        placeholder: '?',
        sum_cast: "",
        alias: "",
    };
    pub(super) const POSTGRES: Dialect = Dialect {
        placeholder: '$',
        sum_cast: "::BIGINT",
        alias: " AS u",
    };
}

/// A page's grouping keys (each of `q.by` once, in order) and the keys it starts after; `None`
/// when `after` has another shape, which no page of this query has: the page is empty.
pub(super) fn page_keys<'a>(
    q: &UsageQuery,
    after: Option<&'a [String]>,
) -> Option<(Vec<GroupBy>, Option<&'a [String]>)> {
    let mut by: Vec<GroupBy> = Vec::with_capacity(q.by.len());
    for key in &q.by {
        if !by.contains(key) {
            by.push(*key);
        }
    }
    match after {
        Some(a) if a.len() != by.len() || by.is_empty() => None,
        other => Some((by, other)),
    }
}

/// The SQL of one page of a usage query and its bounds: the smallest aggregates that can answer
/// it. Grouping by account needs the tables with the account, otherwise the roll-ups without it
/// serve; grouping by day needs a daily table, otherwise whole months come from a monthly
/// table and the days before and after them from the daily one.
///
/// Pages are read by keyset: with `after`, only keys after the cursor's (`by.len()` more
/// parameters, bound after the returned bounds) are read, in every source table before they are
/// grouped, and at most `limit + 1` groups come back (the one past `limit` tells that more
/// follow). Never OFFSET, which would read and drop every row of the pages before.
pub(super) fn usage_sql(
    by: &[GroupBy],
    from: Date,
    to: Date,
    d: Dialect,
    after: bool,
    limit: usize,
) -> (String, Vec<String>) {
    // Column names come from the enum, never from the caller's text.
    let keys = by.iter().map(|g| column(*g)).collect::<Vec<_>>().join(", ");
    let (select, group) = if by.is_empty() {
        (String::new(), String::new())
    } else {
        (
            format!("{keys}, "),
            // Byte order in both backends (SQLite's default; PostgreSQL's key columns are
            // `COLLATE "C"`), and the cursor below compares in that same order.
            format!(" GROUP BY {keys} ORDER BY {keys} LIMIT {}", limit + 1),
        )
    };
    let cast = d.sum_cast;
    let sql = |source: &str| {
        format!(
            "SELECT {select}COALESCE(SUM(requests), 0){cast}, \
             COALESCE(SUM(credits), 0){cast} FROM {source}{group}"
        )
    };
    let p = |i: usize| format!("{}{i}", d.placeholder);
    let (daily, monthly) = if by.contains(&GroupBy::Account) {
        ("usage_daily", "usage_monthly")
    } else {
        ("usage_daily_no_account", "usage_monthly_no_account")
    };
    let months = if by.contains(&GroupBy::Day) {
        None
    } else {
        whole_months(from, to)
    };
    // `AND (keys) > (cursor)`, its parameters numbered after the `bounds` ones.
    let keyset = |bounds: usize| {
        if !after || by.is_empty() {
            return String::new();
        }
        let params = (1..=by.len())
            .map(|i| p(bounds + i))
            .collect::<Vec<_>>()
            .join(", ");
        format!(" AND ({keys}) > ({params})")
    };
    let Some((first, last)) = months else {
        return (
            sql(&format!(
                "{daily} WHERE day BETWEEN {} AND {}{}",
                p(1),
                p(2),
                keyset(2)
            )),
            vec![day_key(from), day_key(to)],
        );
    };
    // An empty text range: no day sorts between "9" and "0".
    let none = || ["9".to_string(), "0".to_string()];
    let head = match first.previous_day() {
        Some(before) if from < first => [day_key(from), day_key(before)],
        _ => none(),
    };
    let tail = match last.next_day() {
        Some(after) if last < to => [day_key(after), day_key(to)],
        _ => none(),
    };
    let k = keyset(6);
    let source = format!(
        "(SELECT {select}requests, credits FROM {daily} WHERE day BETWEEN {} AND {}{k} \
         UNION ALL SELECT {select}requests, credits FROM {daily} WHERE day BETWEEN {} AND {}{k} \
         UNION ALL SELECT {select}requests, credits FROM {monthly} \
             WHERE month BETWEEN {} AND {}{k}){}",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        d.alias
    );
    let mut bounds = Vec::with_capacity(6);
    bounds.extend(head);
    bounds.extend(tail);
    bounds.push(month_key(first));
    bounds.push(month_key(last));
    (sql(&source), bounds)
}

/// One result row of [`usage_sql`]: the grouping keys in `by`'s order, then the two sums.
pub(super) fn usage_row(
    by: &[GroupBy],
    keys: Vec<String>,
    requests: i64,
    credits: i64,
) -> UsageRow {
    let mut row = UsageRow {
        client: None,
        account: None,
        action: None,
        day: None,
        outcome: None,
        requests: u64::try_from(requests).unwrap_or(0),
        credits: u64::try_from(credits).unwrap_or(0),
    };
    for (key, value) in by.iter().zip(keys) {
        let slot = match key {
            GroupBy::Client => &mut row.client,
            GroupBy::Account => &mut row.account,
            GroupBy::Action => &mut row.action,
            GroupBy::Day => &mut row.day,
            GroupBy::Outcome => &mut row.outcome,
        };
        *slot = Some(value);
    }
    row
}

/// The first and last day of the whole calendar months inside `from..=to`, if any.
pub(super) fn whole_months(from: Date, to: Date) -> Option<(Date, Date)> {
    let first = if from.day() == 1 {
        from
    } else {
        last_of_month(from).next_day()?
    };
    let last = if to == last_of_month(to) {
        to
    } else {
        to.replace_day(1).ok()?.previous_day()?
    };
    (first <= last).then_some((first, last))
}

fn last_of_month(day: Date) -> Date {
    day.replace_day(day.month().length(day.year()))
        .unwrap_or(day)
}

/// `2026-11`: the monthly roll-up's key.
pub(super) fn month_key(day: Date) -> String {
    format!("{:04}-{:02}", day.year(), u8::from(day.month()))
}

fn column(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Client => "client",
        GroupBy::Account => "account",
        GroupBy::Action => "action",
        GroupBy::Day => "day",
        GroupBy::Outcome => "outcome",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn pages_are_read_by_keyset_in_every_source_never_by_offset() {
        let by = [GroupBy::Client, GroupBy::Account];
        // Days only: one source.
        let (sql, bounds) = usage_sql(
            &by,
            date!(2026 - 01 - 02),
            date!(2026 - 01 - 03),
            Dialect::SQLITE,
            true,
            50,
        );
        assert_eq!(bounds.len(), 2);
        assert!(sql.contains("AND (client, account) > (?3, ?4)"), "{sql}");
        assert!(sql.ends_with("ORDER BY client, account LIMIT 51"), "{sql}");
        assert!(!sql.to_uppercase().contains("OFFSET"));
        // Whole months and days around them: the cursor bounds each of the three sources.
        let (sql, bounds) = usage_sql(
            &by,
            date!(2026 - 01 - 20),
            date!(2026 - 03 - 10),
            Dialect::POSTGRES,
            true,
            10,
        );
        assert_eq!(bounds.len(), 6);
        let keyset = "AND (client, account) > ($7, $8)";
        assert_eq!(sql.matches(keyset).count(), 3, "{sql}");
        assert!(sql.ends_with("ORDER BY client, account LIMIT 11"), "{sql}");
        // The first page: no cursor.
        let (sql, _) = usage_sql(
            &by,
            date!(2026 - 01 - 02),
            date!(2026 - 01 - 03),
            Dialect::SQLITE,
            false,
            10,
        );
        assert!(!sql.contains(" > ("), "{sql}");
    }

    #[test]
    fn whole_months_are_found_inside_a_range() {
        assert_eq!(
            whole_months(date!(2026 - 01 - 20), date!(2026 - 05 - 10)),
            Some((date!(2026 - 02 - 01), date!(2026 - 04 - 30)))
        );
        assert_eq!(
            whole_months(date!(2028 - 02 - 01), date!(2028 - 02 - 29)),
            Some((date!(2028 - 02 - 01), date!(2028 - 02 - 29)))
        );
        assert_eq!(
            whole_months(date!(2026 - 02 - 02), date!(2026 - 02 - 28)),
            None
        );
        assert_eq!(
            whole_months(date!(2026 - 01 - 31), date!(2026 - 02 - 27)),
            None
        );
    }
}
