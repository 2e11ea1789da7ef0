//! The writer's running tally of the rows it commits, for the fold into the aggregates.
//!
//! The fold regrouped every row since the watermark in SQL (`strftime` per row, a sort of the
//! rows by five columns into a temporary table): under load most of the writer thread's time,
//! and, folding every five seconds, a sort of that many rows' worth of memory at once (the slow
//! scenario of `benches/load.sh`: peak RSS 150 → 164 MB). The writer has each row in hand
//! when it commits it, so it adds the row to a map keyed like the aggregates, and the fold
//! only upserts one row per key.
//!
//! The watermark still decides (`ledger_meta.aggregated_through`): the tally covers the rows
//! `(base, last]`, and a fold writes it only if the file agrees that the watermark is `base`,
//! the last row is `last` and the tally counted every row between. Anything else (a commit
//! whose outcome the writer could not know, rows written some other way) folds by SQL from
//! the watermark, as a process opening the file after a crash does; either way each row is
//! counted exactly once.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, Connection, TransactionBehavior};

use super::super::{to_i64, Outcome, Row};
use super::schema::{fold_range, read_marks};

#[derive(PartialEq, Eq, Hash)]
struct Key {
    /// Days since the Unix epoch (UTC), as SQLite's `strftime('%Y-%m-%d', at_ms / 1000,
    /// 'unixepoch')` counts them.
    day: i64,
    client: Arc<str>,
    account: Option<Arc<str>>,
    action: Option<Arc<str>>,
    outcome: Outcome,
}

#[derive(Default, Clone, Copy)]
struct Sums {
    requests: i64,
    credits: i64,
    unknown: i64,
}

impl Sums {
    fn add(&mut self, o: Sums) {
        self.requests += o.requests;
        self.credits = self.credits.saturating_add(o.credits);
        self.unknown += o.unknown;
    }
}

pub(super) struct Tally {
    /// The watermark the tally starts from; `None`: not known (the next fold is by SQL).
    base: Option<i64>,
    /// The id of the last row counted.
    last: i64,
    /// Rows counted: the tally covers `(base, last]` only if it counted `last - base` of them
    /// (ids are unique and grow, so no row of the range is missing then).
    count: i64,
    groups: HashMap<Key, Sums>,
}

/// The aggregate tables: name, the column of their period, whether they keep the account.
const TABLES: [(&str, &str, bool); 4] = [
    ("usage_daily", "day", true),
    ("usage_monthly", "month", true),
    ("usage_daily_no_account", "day", false),
    ("usage_monthly_no_account", "month", false),
];

/// The upsert of one group into `table` (the same sums as the SQL fold's).
fn upsert_sql(table: &str, period: &str, with_account: bool) -> String {
    let keys = if with_account {
        format!("{period}, client, account, action, outcome")
    } else {
        format!("{period}, client, action, outcome")
    };
    let values = if with_account {
        "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8"
    } else {
        "?1, ?2, ?3, ?4, ?5, ?6, ?7"
    };
    format!(
        "INSERT INTO {table} ({keys}, requests, credits, unknown) VALUES ({values})
         ON CONFLICT ({keys}) DO UPDATE SET
            requests = requests + excluded.requests,
            credits = credits + excluded.credits,
            unknown = unknown + excluded.unknown"
    )
}

/// `YYYY-MM-DD` of a day counted from the Unix epoch.
fn day_text(day: i64) -> String {
    let julian = i32::try_from(day.saturating_add(2_440_588)).unwrap_or(i32::MAX);
    match time::Date::from_julian_day(julian) {
        Ok(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        Err(_) => String::new(),
    }
}

/// `YYYY-MM` of a `YYYY-MM-DD`.
fn month_of(day: &str) -> &str {
    day.get(..7).unwrap_or(day)
}

impl Tally {
    /// A tally from the file's marks: exact when every row is folded already.
    pub(super) fn start(conn: &Connection) -> Tally {
        let base = read_marks(conn)
            .ok()
            .and_then(|(through, last)| (through == last).then_some(last));
        Tally {
            base,
            last: base.unwrap_or(0),
            count: 0,
            groups: HashMap::new(),
        }
    }

    /// Counts `rows`, just committed in one transaction whose last row got id `last`.
    pub(super) fn add<'a>(&mut self, rows: impl IntoIterator<Item = &'a Row>, last: i64) {
        for r in rows {
            let key = Key {
                day: (r.at_ms / 1000).div_euclid(86_400),
                client: r.client.clone(),
                account: r.account_id.clone(),
                action: r.action.clone(),
                outcome: r.outcome,
            };
            self.groups.entry(key).or_default().add(Sums {
                requests: 1,
                credits: to_i64(r.credits),
                unknown: i64::from(!r.credits_known),
            });
            self.count += 1;
        }
        self.last = last;
    }

    /// Folds every committed row into the aggregates and moves the watermark, in one
    /// transaction. On failure nothing is written and the tally is kept for the next try.
    pub(super) fn fold(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let (through, last) = read_marks(&tx)?;
        if self.base == Some(through) && self.last == last && self.count == last - through {
            if last > through {
                self.upsert(&tx)?;
                tx.prepare_cached(
                    "UPDATE ledger_meta SET value = ?1 WHERE key = 'aggregated_through'",
                )?
                .execute([last])?;
            }
        } else {
            fold_range(&tx, through, last)?;
        }
        tx.commit()?;
        self.base = Some(last);
        self.last = last;
        self.count = 0;
        self.groups.clear();
        Ok(())
    }

    fn upsert(&self, tx: &Connection) -> rusqlite::Result<()> {
        let days: HashMap<i64, String> = self
            .groups
            .keys()
            .map(|k| (k.day, day_text(k.day)))
            .collect();
        type Group<'a> = (&'a str, &'a str, &'a str, &'a str, Outcome);
        for (table, period, with_account) in TABLES {
            // The tally's groups, cut to the table's period and keys ("" for no account).
            let mut groups: HashMap<Group<'_>, Sums> = HashMap::new();
            for (k, s) in &self.groups {
                let day = days.get(&k.day).map_or("", String::as_str);
                let when = if period == "month" {
                    month_of(day)
                } else {
                    day
                };
                let account = match with_account {
                    true => k.account.as_deref().unwrap_or(""),
                    false => "",
                };
                let action = k.action.as_deref().unwrap_or("");
                groups
                    .entry((when, &k.client, account, action, k.outcome))
                    .or_default()
                    .add(*s);
            }
            let mut stmt = tx.prepare_cached(&upsert_sql(table, period, with_account))?;
            for ((when, client, account, action, outcome), s) in &groups {
                let (outcome, r, c, u) = (outcome.as_str(), s.requests, s.credits, s.unknown);
                if with_account {
                    stmt.execute(params![when, client, account, action, outcome, r, c, u])?;
                } else {
                    stmt.execute(params![when, client, action, outcome, r, c, u])?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn day_text_is_sqlites_utc_day() {
        let conn = Connection::open_in_memory().unwrap();
        for at_ms in [
            0i64,
            86_399_999,
            86_400_000,
            951_782_400_000, // 2000-02-29
            1_764_547_199_999,
            1_764_547_200_000,
            4_102_444_800_000, // 2100-01-01
        ] {
            let sqlite: String = conn
                .query_row(
                    "SELECT strftime('%Y-%m-%d', ?1 / 1000, 'unixepoch')",
                    [at_ms],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(
                day_text((at_ms / 1000).div_euclid(86_400)),
                sqlite,
                "{at_ms}"
            );
        }
    }
}
