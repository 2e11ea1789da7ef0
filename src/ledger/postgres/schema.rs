//! The fleet ledger's schema and SQL: the versioned migrations (under an advisory lock), the
//! encoding check, and the one statement that writes a batch of rows and their aggregates.

use std::fmt::Write as _;

use postgres::{Client, Statement};
use time::Date;

use super::super::plan::month_key;
use super::super::writer::Pending;
use super::super::{day_key, day_of, to_i64};
use super::connect::describe;

/// Versioned schema: step `i` takes the version recorded in `ledger_schema_migrations` from
/// `i` to `i + 1`, in its own transaction. Append new steps; never edit a released one.
/// Keys are `COLLATE "C"`: byte order, as SQLite sorts, whatever the database's locale.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the rows and the aggregates, as SQLite's schema version 3, plus `row_uid`.
    r#"CREATE TABLE ledger_rows (
        id            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        row_uid       TEXT    COLLATE "C" NOT NULL,
        at_ms         BIGINT  NOT NULL,
        request_id    TEXT    NOT NULL,
        client        TEXT    COLLATE "C" NOT NULL,
        account_id    TEXT    COLLATE "C",
        path          TEXT    NOT NULL,
        action        TEXT    COLLATE "C",
        status        INTEGER NOT NULL,
        credits       BIGINT  NOT NULL,
        credits_known BOOLEAN NOT NULL,
        outcome       TEXT    COLLATE "C" NOT NULL
    );
    CREATE UNIQUE INDEX ledger_rows_row_uid ON ledger_rows (row_uid);
    CREATE INDEX ledger_rows_at_ms ON ledger_rows (at_ms);
    CREATE TABLE usage_daily (
        day      TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        account  TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (day, client, account, action, outcome)
    );
    CREATE TABLE usage_monthly (
        month    TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        account  TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (month, client, account, action, outcome)
    );
    CREATE TABLE usage_daily_no_account (
        day      TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (day, client, action, outcome)
    );
    CREATE TABLE usage_monthly_no_account (
        month    TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (month, client, action, outcome)
    );"#,
    // 2: `metadata.credits_consumed` as the upstream sent it, on the rows where it was not a
    // whole number (unknown): at most 64 bytes, NULL otherwise and on older rows.
    "ALTER TABLE ledger_rows ADD COLUMN IF NOT EXISTS credits_raw TEXT;",
];

/// `pg_advisory_xact_lock` key serializing migrations across replicas ("linkuplg").
pub(super) const MIGRATION_LOCK: i64 = 0x6c69_6e6b_7570_6c67;

/// The aggregate tables: name, period column, whether the key has the account.
pub(super) const AGGREGATES: [(&str, &str, bool); 4] = [
    ("usage_daily", "day", true),
    ("usage_monthly", "month", true),
    ("usage_daily_no_account", "day", false),
    ("usage_monthly_no_account", "month", false),
];

/// One statement, so one round trip and one implicit transaction per batch: insert the rows
/// (arrays, one per column, plus each row's day and month keys computed by the gateway)
/// skipping any `row_uid` already there, then add only the rows actually inserted to each
/// aggregate table, their keys in sorted order (replicas lock aggregate rows in one order).
pub(super) fn write_sql() -> String {
    let mut sql = String::from(
        "WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::int4[], $9::int8[], $10::bool[],
                                 $11::text[], $12::text[], $13::text[], $14::text[])
                AS i (row_uid, at_ms, request_id, client, account_id, path, action, status,
                      credits, credits_known, outcome, day, month, credits_raw)
        ),
        ins AS (
            INSERT INTO ledger_rows (row_uid, at_ms, request_id, client, account_id, path,
                                     action, status, credits, credits_known, outcome,
                                     credits_raw)
            SELECT row_uid, at_ms, request_id, client, account_id, path, action, status,
                   credits, credits_known, outcome, credits_raw
            FROM input
            ON CONFLICT (row_uid) DO NOTHING
            RETURNING row_uid
        ),
        new AS (SELECT input.* FROM input JOIN ins USING (row_uid))",
    );
    for (table, period, with_account) in AGGREGATES {
        let (account_col, account_val, keys) = if with_account {
            ("account, ", "COALESCE(account_id, ''), ", "1, 2, 3, 4, 5")
        } else {
            ("", "", "1, 2, 3, 4")
        };
        let _ = write!(
            sql,
            ",
        {table} AS (
            INSERT INTO {table} AS t ({period}, client, {account_col}action, outcome,
                                     requests, credits, unknown)
            SELECT {period}, client, {account_val}COALESCE(action, ''), outcome, count(*),
                   sum(credits), count(*) FILTER (WHERE NOT credits_known)
            FROM new GROUP BY {keys} ORDER BY {keys}
            ON CONFLICT ({period}, client, {account_col}action, outcome) DO UPDATE SET
                requests = t.requests + excluded.requests,
                credits = t.credits + excluded.credits,
                unknown = t.unknown + excluded.unknown
        )"
        );
    }
    sql.push_str("\n        SELECT count(*) FROM ins");
    sql
}

/// A connection and the writer's statement, prepared on it.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) write: Statement,
}

impl Conn {
    pub(super) fn prepare(mut client: Client) -> Result<Conn, postgres::Error> {
        let write = client.prepare(&write_sql())?;
        Ok(Conn { client, write })
    }
}

/// Rows carry any Unicode text (client names, actions): a database that cannot store it would
/// fail batches forever, so refuse it at startup.
pub(super) fn check_encoding(client: &mut Client) -> Result<(), String> {
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| format!("cannot read the server encoding: {}", describe(&e)))?;
    if encoding.eq_ignore_ascii_case("UTF8") {
        Ok(())
    } else {
        Err(format!(
            "the database's encoding is {encoding}; the ledger needs UTF8 \
             (CREATE DATABASE ... ENCODING 'UTF8')"
        ))
    }
}

/// Bring the schema to the last version, one step per transaction, each under an advisory
/// lock: replicas starting together wait for each other, and the second finds the work done.
pub(super) fn migrate(client: &mut Client) -> Result<(), String> {
    let known = MIGRATIONS.len();
    loop {
        let mut tx = client
            .transaction()
            .map_err(|e| format!("cannot start the migration: {}", describe(&e)))?;
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS ledger_schema_migrations (
                 version    INTEGER     PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        ))
        .map_err(|e| format!("cannot lock the schema: {}", describe(&e)))?;
        let version: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM ledger_schema_migrations",
                &[],
            )
            .and_then(|r| r.try_get(0))
            .map_err(|e| format!("cannot read the schema version: {}", describe(&e)))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version == known {
            return tx
                .commit()
                .map_err(|e| format!("cannot finish the migration: {}", describe(&e)));
        }
        let Some(step) = MIGRATIONS.get(version) else {
            return Err(format!(
                "the database has ledger schema version {version}, newer than this gateway \
                 knows ({known}); was it written by a newer release?"
            ));
        };
        let next = i32::try_from(version + 1).unwrap_or(i32::MAX);
        tx.batch_execute(step)
            .and_then(|()| {
                tx.execute(
                    "INSERT INTO ledger_schema_migrations (version) VALUES ($1)",
                    &[&next],
                )
            })
            .and_then(|_| tx.commit())
            .map_err(|e| {
                format!(
                    "schema migration to version {next} failed: {}",
                    describe(&e)
                )
            })?;
    }
}

/// One statement (an implicit transaction): the rows not yet in the table, and the sums of
/// those in the aggregates.
pub(super) fn write_rows(conn: &mut Conn, rows: &[Pending<String>]) -> Result<(), postgres::Error> {
    let uids: Vec<&str> = rows.iter().map(|p| p.tag.as_str()).collect();
    let at_ms: Vec<i64> = rows.iter().map(|p| p.row.at_ms).collect();
    let request_ids: Vec<&str> = rows.iter().map(|p| p.row.request_id.as_str()).collect();
    let clients: Vec<&str> = rows.iter().map(|p| &*p.row.client).collect();
    let accounts: Vec<Option<&str>> = rows.iter().map(|p| p.row.account_id.as_deref()).collect();
    let paths: Vec<&str> = rows.iter().map(|p| p.row.path.as_str()).collect();
    let actions: Vec<Option<&str>> = rows.iter().map(|p| p.row.action.as_deref()).collect();
    let statuses: Vec<i32> = rows.iter().map(|p| i32::from(p.row.status)).collect();
    let credits: Vec<i64> = rows.iter().map(|p| to_i64(p.row.credits)).collect();
    let known: Vec<bool> = rows.iter().map(|p| p.row.credits_known).collect();
    let outcomes: Vec<&str> = rows.iter().map(|p| p.row.outcome.as_str()).collect();
    let days: Vec<Date> = rows.iter().map(|p| day_of(p.row.at_ms)).collect();
    let day_keys: Vec<String> = days.iter().map(|d| day_key(*d)).collect();
    let month_keys: Vec<String> = days.iter().map(|d| month_key(*d)).collect();
    let raws: Vec<Option<&str>> = rows
        .iter()
        .map(|p| p.row.credits_raw.as_deref().map(super::super::bounded_raw))
        .collect();
    conn.client.query_one(
        &conn.write,
        &[
            &uids,
            &at_ms,
            &request_ids,
            &clients,
            &accounts,
            &paths,
            &actions,
            &statuses,
            &credits,
            &known,
            &outcomes,
            &day_keys,
            &month_keys,
            &raws,
        ],
    )?;
    Ok(())
}
