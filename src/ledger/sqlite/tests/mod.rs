//! The embedded ledger's tests: durability and failures (`durability`), the aggregates and their
//! reads (`aggregates`), and schema migrations (`migrations`). The shared rows and helpers are here.

#![allow(clippy::unwrap_used)]

mod aggregates;
mod durability;
mod migrations;

use rusqlite::params;

use super::schema::MIGRATIONS;

use super::*;
use crate::ledger::{day_of, GroupBy, Outcome};
use time::macros::date;
use tokio::task::JoinSet;

fn at(day: Date, seconds: i64) -> i64 {
    (day.midnight().assume_utc().unix_timestamp() + seconds) * 1000
}

fn row(day: Date, client: &str, account: Option<&str>, action: Option<&str>) -> Row {
    Row {
        at_ms: at(day, 3600),
        request_id: "req-1".into(),
        client: client.into(),
        account_id: account.map(Into::into),
        path: "/v2/checkpoint".into(),
        action: action.map(Into::into),
        status: 200,
        credits: 1,
        credits_known: true,
        credits_raw: None,
        outcome: Outcome::Settled,
    }
}

fn with(mut r: Row, credits: u64, outcome: Outcome) -> Row {
    r.credits = credits;
    r.outcome = outcome;
    r
}

fn raw_count(path: &Path) -> (i64, i64) {
    Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(credits), 0) FROM ledger_rows",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// The row insert of schema versions 1 to 4 (before `credits_raw`).
const INSERT_ROW_V1: &str = "INSERT INTO ledger_rows
    (at_ms, request_id, client, account_id, path, action, status, credits, credits_known,
     outcome)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

const DAY1: Date = date!(2026 - 11 - 24);
const DAY2: Date = date!(2026 - 11 - 25);
const DAY3: Date = date!(2026 - 11 - 26);

async fn sample(ledger: &SqliteLedger) {
    let rows = [
        with(
            row(DAY1, "crm", Some("a1"), Some("invite")),
            2,
            Outcome::Settled,
        ),
        with(
            row(DAY2, "crm", Some("a1"), Some("invite")),
            3,
            Outcome::Settled,
        ),
        with(row(DAY2, "crm", Some("a2"), None), 0, Outcome::Cached),
        with(
            row(DAY2, "ops", None, Some("search")),
            5,
            Outcome::Ambiguous,
        ),
        with(row(DAY3, "ops", Some("a2"), None), 0, Outcome::Coalesced),
        with(row(DAY3, "ops", Some("a2"), None), 1, Outcome::Settled),
    ];
    for r in rows {
        ledger.record(r).await.unwrap();
    }
}

fn usage(ledger: &SqliteLedger, from: Date, to: Date, by: &str) -> Vec<String> {
    let q = UsageQuery {
        from_day: from,
        to_day: to,
        by: GroupBy::parse_list(by).unwrap(),
    };
    ledger
        .usage(&q)
        .unwrap()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect()
}
