//! The credits ledger: one row per answer given on the upstream's behalf (SPEC §4 "Credits"),
//! and the aggregates `/usage`, the CLI and the dashboard read (SPEC §5).
//!
//! [`Ledger`] is the seam: the credits layer and the admin listener only see the trait.
//! [`SqliteLedger`] is the embedded default: WAL, one writer thread with group commit, daily
//! and monthly aggregate tables. [`PostgresLedger`] is the fleet's: one database every replica
//! writes to, with the same tables and semantics, rows kept in memory (up to
//! `ledger.buffer_rows`) while the server is unreachable, and a `row_uid` per row so a retried
//! batch is never counted twice. [`open`] picks one from the settings. Both write through one
//! loop, `writer` (thread, batching, retry with back-off, health, flush on drop); each keeps
//! only its schema, SQL and connections, and SQLite the work around a commit on one file.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use time::{Date, OffsetDateTime};

use crate::util::BoxFuture;

mod memory;
mod plan;
mod postgres;
mod sqlite;
mod writer;

pub use memory::MemoryLedger;
pub use postgres::PostgresLedger;
pub use sqlite::SqliteLedger;

/// The configured ledger: PostgreSQL when `ledger.postgres_url` is set, else the SQLite file
/// at `ledger.path`. Blocking (connects, migrates); callable from a runtime thread.
pub fn open(settings: &crate::config::LedgerSettings) -> Result<Arc<dyn Ledger>, LedgerError> {
    match &settings.postgres_url {
        Some(url) => Ok(Arc::new(PostgresLedger::open(
            url.expose(),
            settings.sync,
            settings.buffer_rows,
        )?)),
        None => Ok(Arc::new(SqliteLedger::open(&settings.path, settings.sync)?)),
    }
}

/// The configured ledger for a report (`usage`): opened as [`open`] does, or, while a running
/// gateway holds the SQLite file, read beside it.
pub fn open_for_report(
    settings: &crate::config::LedgerSettings,
) -> Result<Arc<dyn Ledger>, LedgerError> {
    match open(settings) {
        Err(LedgerError::Locked { .. }) if settings.postgres_url.is_none() => {
            Ok(Arc::new(SqliteLedger::open_read_only(&settings.path)?))
        }
        other => other,
    }
}

/// How an answer came about; the ledger's `outcome` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered; `credits` is its `metadata.credits_consumed`.
    Settled,
    /// The gateway answered from the status cache: 0 credits, what the gateway saved.
    Cached,
    /// The answer was shared from another caller's in-flight call: 0 credits.
    Coalesced,
    /// A stored answer replayed for a repeated `Idempotency-Key`: 0 credits, what the gateway
    /// saved.
    Replayed,
    /// A timeout or reset after the request was sent: `credits` is the reserved cost, which
    /// stays counted until reconciliation.
    Ambiguous,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Settled,
        Outcome::Cached,
        Outcome::Coalesced,
        Outcome::Replayed,
        Outcome::Ambiguous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Settled => "settled",
            Outcome::Cached => "cached",
            Outcome::Coalesced => "coalesced",
            Outcome::Replayed => "replayed",
            Outcome::Ambiguous => "ambiguous",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One ledger row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Unix epoch milliseconds (UTC).
    pub at_ms: i64,
    pub request_id: String,
    pub client: Arc<str>,
    pub account_id: Option<Arc<str>>,
    /// E.g. `/v2/checkpoint`.
    pub path: String,
    /// The body's `action`, else the upstream's `metadata.action`.
    pub action: Option<Arc<str>>,
    pub status: u16,
    /// Charged; for [`Outcome::Ambiguous`]: the reserved expected cost.
    pub credits: u64,
    /// False when `metadata.credits_consumed` was absent or not a number.
    pub credits_known: bool,
    /// `metadata.credits_consumed` as the upstream sent it (JSON text) when it was present but
    /// not a whole number from 0 to `MAX_CREDITS_PER_CALL`: the row is `unknown` and this keeps
    /// what was sent. Stored at most [`CREDITS_RAW_MAX`] bytes.
    pub credits_raw: Option<String>,
    pub outcome: Outcome,
}

/// The most bytes of a raw `credits_consumed` a row keeps.
pub const CREDITS_RAW_MAX: usize = 64;

/// `raw` cut to at most [`CREDITS_RAW_MAX`] bytes, on a character boundary.
pub(crate) fn bounded_raw(raw: &str) -> &str {
    let mut cut = raw.len().min(CREDITS_RAW_MAX);
    while !raw.is_char_boundary(cut) {
        cut -= 1;
    }
    &raw[..cut]
}

/// A grouping key of `/usage?by=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupBy {
    Client,
    Account,
    Action,
    Day,
    Outcome,
}

impl GroupBy {
    pub const ALL: [GroupBy; 5] = [
        GroupBy::Client,
        GroupBy::Account,
        GroupBy::Action,
        GroupBy::Day,
        GroupBy::Outcome,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Client => "client",
            GroupBy::Account => "account",
            GroupBy::Action => "action",
            GroupBy::Day => "day",
            GroupBy::Outcome => "outcome",
        }
    }

    /// A comma-separated list (`client,day`); empty items are skipped, duplicates kept once.
    pub fn parse_list(s: &str) -> Result<Vec<GroupBy>, String> {
        let mut by = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let key = item.parse::<GroupBy>()?;
            if !by.contains(&key) {
                by.push(key);
            }
        }
        Ok(by)
    }
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<GroupBy, String> {
        GroupBy::ALL
            .into_iter()
            .find(|g| g.as_str() == s)
            .ok_or_else(|| {
                format!("unknown grouping `{s}`: expected client, account, action, day or outcome")
            })
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub from_day: Date,
    /// Inclusive.
    pub to_day: Date,
    /// Grouping keys, in the order rows are sorted by. Empty: one row with the totals.
    pub by: Vec<GroupBy>,
}

/// One aggregate row: the grouping keys asked for, and the sums. A row without an account
/// (or an action) groups under `""`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `2026-11-25`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    pub requests: u64,
    pub credits: u64,
}

/// Rows per ledger read when a caller wants them all ([`Ledger::usage`], streamed CSV).
pub const USAGE_READ_PAGE: usize = 10_000;

/// One page of [`Ledger::usage_page`].
#[derive(Debug, Clone, PartialEq)]
pub struct UsagePage {
    pub rows: Vec<UsageRow>,
    /// The keys of the last row when more rows follow it; `None` on the last page.
    pub next: Option<Vec<String>>,
}

impl UsagePage {
    /// From up to `limit + 1` rows read in key order: the first `limit`, and whether more follow.
    pub(crate) fn from_rows(mut rows: Vec<UsageRow>, by: &[GroupBy], limit: usize) -> UsagePage {
        if rows.len() <= limit {
            return UsagePage { rows, next: None };
        }
        rows.truncate(limit);
        let next = rows.last().map(|r| r.keys(by));
        UsagePage { rows, next }
    }
}

impl UsageRow {
    /// The row's grouping keys in `by`'s order (`""` for a key it lacks).
    pub fn keys(&self, by: &[GroupBy]) -> Vec<String> {
        by.iter()
            .map(|g| {
                match g {
                    GroupBy::Client => &self.client,
                    GroupBy::Account => &self.account,
                    GroupBy::Action => &self.action,
                    GroupBy::Day => &self.day,
                    GroupBy::Outcome => &self.outcome,
                }
                .clone()
                .unwrap_or_default()
            })
            .collect()
    }
}

/// `Clone` so one failed group commit can answer every caller waiting on it.
#[derive(Debug, thiserror::Error, Clone)]
pub enum LedgerError {
    #[error("cannot open the ledger at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("the ledger at {path} cannot grow: the disk is full ({detail})")]
    DiskFull { path: String, detail: String },
    #[error("the ledger at {path} is read-only ({detail})")]
    ReadOnly { path: String, detail: String },
    #[error("writing the ledger at {path} failed: {detail}")]
    Write { path: String, detail: String },
    #[error(
        "another linkup-gateway (pid {holder}) has the ledger at {path} open; exactly one may \
         write it (its lock: {path}.lock)"
    )]
    Locked { path: String, holder: String },
    /// The embedded ledger's file is no longer the one the gateway opened (deleted, replaced)
    /// or lost what was written to it (truncated, overwritten). Sticky until a restart.
    #[error(
        "the ledger file at {path} {what} under the running gateway ({detail}); rows are kept, \
         not written, until an operator restores the file or restarts the gateway"
    )]
    FileLost {
        path: String,
        /// `deleted`, `replaced`, `truncated` or `overwritten`: the metric's label.
        reason: &'static str,
        /// `was deleted`, ...: for the message.
        what: &'static str,
        detail: String,
    },
    #[error("the ledger writer has stopped; rows cannot be recorded")]
    WriterGone,
    #[error("reading the ledger at {path} failed: {detail}")]
    Query { path: String, detail: String },
    #[error(
        "the ledger at {path} cannot take more rows: {rows} already wait in memory for the \
         database (ledger.buffer_rows)"
    )]
    BufferFull { path: String, rows: usize },
}

pub trait Ledger: Send + Sync + 'static {
    /// Append a row. With sync = crash_safe the future resolves once the row is committed (in
    /// the OS's hands), with power_safe once it is fsynced too; with async once queued. Errors are returned, never
    /// swallowed: with async, a failed write surfaces through [`Ledger::flush`] and
    /// [`Ledger::write_error`].
    ///
    /// A row whose write failed is kept by the ledger and written once the cause is gone (the
    /// upstream may have charged for it): do not record it again.
    fn record(&self, row: Row) -> BoxFuture<Result<(), LedgerError>>;

    /// Credits per client for one UTC day (all outcomes; ambiguous rows count their reserved
    /// cost): used at startup to restore today's budgets.
    fn spent_on(&self, day: Date) -> Result<HashMap<String, u64>, LedgerError>;

    /// One page of the aggregates for /usage, the CLI and the dashboard: at most `limit` rows
    /// (at least one is asked for), sorted by their keys (byte order), the first ones after
    /// `after` (the keys of the last row of the previous page, in `q.by`'s order). Read by
    /// keyset (`WHERE (keys) > (after) ORDER BY keys LIMIT limit + 1`): a page costs the same
    /// wherever it is, and no more than `limit + 1` rows are ever held.
    fn usage_page(
        &self,
        q: &UsageQuery,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<UsagePage, LedgerError>;

    /// Every aggregate row of a query, read page by page. Holds them all: for small groupings
    /// (tests, benches); answers to callers go through [`Ledger::usage_page`].
    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        let mut rows = Vec::new();
        let mut after: Option<Vec<String>> = None;
        loop {
            let page = self.usage_page(q, after.as_deref(), USAGE_READ_PAGE)?;
            rows.extend(page.rows);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(rows),
            }
        }
    }

    /// Wait until every row recorded so far is durable (SIGTERM, async mode).
    fn flush(&self) -> BoxFuture<Result<(), LedgerError>>;

    /// Rows written and their total credits, for reconciliation and tests.
    fn totals(&self) -> Result<(u64, u64), LedgerError>;

    /// The last write's error while rows are waiting to be retried; `None` when healthy
    /// (for `/readyz` and logs).
    fn write_error(&self) -> Option<LedgerError> {
        None
    }

    /// The ledger's file was found deleted, replaced, truncated or overwritten under the
    /// running gateway ([`LedgerError::FileLost`]): one atomic load, read by the credits
    /// layer before it forwards a costly request. Sticky until a restart.
    fn file_lost(&self) -> bool {
        false
    }
}

/// A count read back from the database (never negative there).
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A count or credit amount as the databases' signed 64-bit integers store it.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The UTC day of a unix timestamp in milliseconds.
pub fn day_of(at_ms: i64) -> Date {
    OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000))
        .map(OffsetDateTime::date)
        .unwrap_or(Date::MIN)
}

/// `2026-11-25`: the ledger's day keys, sortable as text.
pub fn day_key(day: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn outcomes_and_groupings_round_trip_through_their_names() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            assert_eq!(
                serde_json::to_string(&o).unwrap(),
                format!("\"{}\"", o.as_str())
            );
        }
        for g in GroupBy::ALL {
            assert_eq!(g.as_str().parse::<GroupBy>(), Ok(g));
        }
        assert_eq!(
            GroupBy::parse_list("client, day,,client").unwrap(),
            vec![GroupBy::Client, GroupBy::Day]
        );
        assert!(GroupBy::parse_list("client,week")
            .unwrap_err()
            .contains("`week`"));
    }

    #[test]
    fn days_are_utc_and_keyed_as_sortable_text() {
        // 2026-11-25T23:59:59.999Z and one millisecond later.
        let last_ms = 1_795_651_199_999;
        assert_eq!(day_of(last_ms), date!(2026 - 11 - 25));
        assert_eq!(day_of(last_ms + 1), date!(2026 - 11 - 26));
        assert_eq!(day_key(date!(2026 - 01 - 05)), "2026-01-05");
    }

    #[test]
    fn usage_rows_serialize_only_their_keys() {
        let row = UsageRow {
            client: Some("crm".into()),
            account: None,
            action: None,
            day: Some("2026-11-25".into()),
            outcome: None,
            requests: 3,
            credits: 2,
        };
        assert_eq!(
            serde_json::to_string(&row).unwrap(),
            r#"{"client":"crm","day":"2026-11-25","requests":3,"credits":2}"#
        );
    }
}
