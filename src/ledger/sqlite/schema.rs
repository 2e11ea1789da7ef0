//! The embedded ledger's schema and SQL: the versioned migrations, the row insert, the fold of
//! rows into the aggregates, and the replay of the journal at open.

use std::path::Path;

use rusqlite::{params, Connection, ErrorCode, TransactionBehavior};

use super::super::{to_i64, to_u64};
use super::super::{LedgerError, Row};
use super::journal;

/// Versioned schema: step `i` takes `PRAGMA user_version` from `i` to `i + 1`, in its own
/// transaction. Append new steps; never edit a released one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the rows, one per answer given on the upstream's behalf. `at_ms` is indexed for
    // audits by time window; it only grows, so the index costs little on insert.
    "CREATE TABLE ledger_rows (
        id            INTEGER PRIMARY KEY,
        at_ms         INTEGER NOT NULL,
        request_id    TEXT    NOT NULL,
        client        TEXT    NOT NULL,
        account_id    TEXT,
        path          TEXT    NOT NULL,
        action        TEXT,
        status        INTEGER NOT NULL,
        credits       INTEGER NOT NULL,
        credits_known INTEGER NOT NULL,
        outcome       TEXT    NOT NULL
    );
    CREATE INDEX ledger_rows_at_ms ON ledger_rows (at_ms);",
    // 2: daily aggregates, upserted with the rows, so `/usage` over a year reads thousands of
    // aggregate rows instead of millions. No account / no action is '' (key columns of a
    // WITHOUT ROWID table cannot be NULL). Backfilled from the rows already there.
    "CREATE TABLE usage_daily (
        day      TEXT    NOT NULL,
        client   TEXT    NOT NULL,
        account  TEXT    NOT NULL,
        action   TEXT    NOT NULL,
        outcome  TEXT    NOT NULL,
        requests INTEGER NOT NULL,
        credits  INTEGER NOT NULL,
        unknown  INTEGER NOT NULL,
        PRIMARY KEY (day, client, account, action, outcome)
    ) WITHOUT ROWID;
    INSERT INTO usage_daily (day, client, account, action, outcome, requests, credits, unknown)
    SELECT strftime('%Y-%m-%d', at_ms / 1000, 'unixepoch'), client, COALESCE(account_id, ''),
           COALESCE(action, ''), outcome, COUNT(*), SUM(credits), SUM(credits_known = 0)
    FROM ledger_rows
    GROUP BY 1, 2, 3, 4, 5;",
    // 3: roll-ups by month ('2026-11'), and without the account by day and by month: a query
    // reads the smallest one that answers it (a year by client reads twelve months of a few
    // hundred rows each, not 365 days of every account). Backfilled from `usage_daily`.
    "CREATE TABLE usage_monthly (
        month    TEXT    NOT NULL,
        client   TEXT    NOT NULL,
        account  TEXT    NOT NULL,
        action   TEXT    NOT NULL,
        outcome  TEXT    NOT NULL,
        requests INTEGER NOT NULL,
        credits  INTEGER NOT NULL,
        unknown  INTEGER NOT NULL,
        PRIMARY KEY (month, client, account, action, outcome)
    ) WITHOUT ROWID;
    CREATE TABLE usage_daily_no_account (
        day      TEXT    NOT NULL,
        client   TEXT    NOT NULL,
        action   TEXT    NOT NULL,
        outcome  TEXT    NOT NULL,
        requests INTEGER NOT NULL,
        credits  INTEGER NOT NULL,
        unknown  INTEGER NOT NULL,
        PRIMARY KEY (day, client, action, outcome)
    ) WITHOUT ROWID;
    CREATE TABLE usage_monthly_no_account (
        month    TEXT    NOT NULL,
        client   TEXT    NOT NULL,
        action   TEXT    NOT NULL,
        outcome  TEXT    NOT NULL,
        requests INTEGER NOT NULL,
        credits  INTEGER NOT NULL,
        unknown  INTEGER NOT NULL,
        PRIMARY KEY (month, client, action, outcome)
    ) WITHOUT ROWID;
    INSERT INTO usage_monthly
    SELECT substr(day, 1, 7), client, account, action, outcome,
           SUM(requests), SUM(credits), SUM(unknown)
    FROM usage_daily GROUP BY 1, 2, 3, 4, 5;
    INSERT INTO usage_daily_no_account
    SELECT day, client, action, outcome, SUM(requests), SUM(credits), SUM(unknown)
    FROM usage_daily GROUP BY 1, 2, 3, 4;
    INSERT INTO usage_monthly_no_account
    SELECT substr(day, 1, 7), client, action, outcome, SUM(requests), SUM(credits), SUM(unknown)
    FROM usage_daily GROUP BY 1, 2, 3, 4;",
    // 4: the aggregates are folded from the rows once a second or so, not in every commit;
    // `aggregated_through` is the last row id they count. Rows past it are folded in at the
    // next fold, whichever process makes it (a crash loses no aggregate: they are rebuilt
    // from the rows at the next open). Everything already there is counted.
    "CREATE TABLE ledger_meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO ledger_meta (key, value)
    SELECT 'aggregated_through', COALESCE(MAX(id), 0) FROM ledger_rows;
    INSERT INTO ledger_meta (key, value) VALUES ('journal_through', 0);",
    // 5: `metadata.credits_consumed` as the upstream sent it, on the rows where it was not a
    // whole number (the row is unknown): at most 64 bytes, NULL otherwise and on older rows.
    "ALTER TABLE ledger_rows ADD COLUMN credits_raw TEXT;",
];

pub(super) const INSERT_ROW: &str = "INSERT INTO ledger_rows
    (at_ms, request_id, client, account_id, path, action, status, credits, credits_known, outcome,
     credits_raw)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Fold rows `(?1, ?2]` into the aggregates: group them once into a temporary table, then one
/// upsert per aggregate table and key, and move the watermark, in one transaction.
pub(super) const FOLD: [&str; 6] = [
    "DELETE FROM temp.fold_batch",
    "INSERT INTO temp.fold_batch
     SELECT strftime('%Y-%m-%d', at_ms / 1000, 'unixepoch'), client, COALESCE(account_id, ''),
            COALESCE(action, ''), outcome, COUNT(*), SUM(credits), SUM(credits_known = 0)
     FROM ledger_rows WHERE id > ?1 AND id <= ?2
     GROUP BY 1, 2, 3, 4, 5",
    "INSERT INTO usage_daily (day, client, account, action, outcome, requests, credits, unknown)
     SELECT day, client, account, action, outcome, requests, credits, unknown
     FROM temp.fold_batch WHERE true
     ON CONFLICT (day, client, account, action, outcome) DO UPDATE SET
        requests = requests + excluded.requests,
        credits = credits + excluded.credits,
        unknown = unknown + excluded.unknown",
    "INSERT INTO usage_monthly (month, client, account, action, outcome, requests, credits, unknown)
     SELECT substr(day, 1, 7), client, account, action, outcome,
            SUM(requests), SUM(credits), SUM(unknown)
     FROM temp.fold_batch GROUP BY 1, 2, 3, 4, 5
     ON CONFLICT (month, client, account, action, outcome) DO UPDATE SET
        requests = requests + excluded.requests,
        credits = credits + excluded.credits,
        unknown = unknown + excluded.unknown",
    "INSERT INTO usage_daily_no_account (day, client, action, outcome, requests, credits, unknown)
     SELECT day, client, action, outcome, SUM(requests), SUM(credits), SUM(unknown)
     FROM temp.fold_batch GROUP BY 1, 2, 3, 4
     ON CONFLICT (day, client, action, outcome) DO UPDATE SET
        requests = requests + excluded.requests,
        credits = credits + excluded.credits,
        unknown = unknown + excluded.unknown",
    "INSERT INTO usage_monthly_no_account (month, client, action, outcome, requests, credits, unknown)
     SELECT substr(day, 1, 7), client, action, outcome, SUM(requests), SUM(credits), SUM(unknown)
     FROM temp.fold_batch GROUP BY 1, 2, 3, 4
     ON CONFLICT (month, client, action, outcome) DO UPDATE SET
        requests = requests + excluded.requests,
        credits = credits + excluded.credits,
        unknown = unknown + excluded.unknown",
];

/// Bring the schema to the last version, one step per transaction. `IMMEDIATE` takes the write
/// lock before reading the version, so two processes opening one file cannot both migrate.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), String> {
    let known = MIGRATIONS.len();
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| format!("cannot lock the schema: {e}"))?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| format!("cannot read the schema version: {e}"))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version == known {
            return Ok(());
        }
        let Some(step) = MIGRATIONS.get(version) else {
            return Err(format!(
                "the file has schema version {version}, newer than this gateway knows \
                 ({known}); was it written by a newer release?"
            ));
        };
        let next = version + 1;
        tx.execute_batch(step)
            .and_then(|()| tx.pragma_update(None, "user_version", next))
            .and_then(|()| tx.commit())
            .map_err(|e| format!("schema migration to version {next} failed: {e}"))?;
    }
}

/// A write failure as the callers see it.
pub(super) fn write_error(path: &str, e: &rusqlite::Error) -> LedgerError {
    let path = path.to_string();
    let detail = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => LedgerError::DiskFull { path, detail },
        Some(ErrorCode::ReadOnly) => LedgerError::ReadOnly { path, detail },
        _ => LedgerError::Write { path, detail },
    }
}

/// One transaction: the rows, and the last journal number they bring in. Their aggregates are
/// folded in later, by [`fold`].
pub(super) fn write_rows<'a>(
    conn: &Connection,
    rows: impl IntoIterator<Item = &'a Row>,
    through: Option<u64>,
) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(INSERT_ROW)?;
        for r in rows {
            insert.execute(params![
                r.at_ms,
                r.request_id,
                &*r.client,
                r.account_id.as_deref(),
                r.path,
                r.action.as_deref(),
                r.status,
                to_i64(r.credits),
                r.credits_known,
                r.outcome.as_str(),
                r.credits_raw.as_deref().map(super::super::bounded_raw),
            ])?;
        }
    }
    if let Some(through) = through {
        tx.prepare_cached(
            "UPDATE ledger_meta SET value = MAX(value, ?1) WHERE key = 'journal_through'",
        )?
        .execute([to_i64(through)])?;
    }
    tx.commit()
}

/// Write the journaled rows SQLite does not have yet (a crash left them), fsync, and remove
/// the journal files. Returns the number the next journaled row gets.
pub(super) fn replay_journal(conn: &Connection, path: &Path) -> Result<u64, String> {
    let through: i64 = conn
        .query_row(
            "SELECT value FROM ledger_meta WHERE key = 'journal_through'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("cannot read the journal mark: {e}"))?;
    let through = to_u64(through);
    let (rows, last) = journal::replay(path, through)
        .map_err(|e| format!("cannot read the ledger journal: {e}"))?;
    if !rows.is_empty() {
        let count = rows.len();
        let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
        write_rows(conn, &rows, Some(last))
            .map_err(|e| format!("cannot write the journaled rows: {e}"))?;
        tracing::warn!(
            path = %path.display(),
            rows = count,
            "wrote the ledger rows a crash left in the journal"
        );
    }
    // Durable in SQLite before the journal goes.
    conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))
        .map_err(|e| format!("cannot checkpoint the journaled rows: {e}"))?;
    for (_, file) in journal::files(path) {
        std::fs::remove_file(&file)
            .map_err(|e| format!("cannot remove {}: {e}", file.display()))?;
    }
    Ok(last + 1)
}

/// Fold every row past the watermark into the aggregates and move the watermark, in one
/// transaction: the aggregates count each row exactly once, whoever folds (the writer, or a
/// process opening the file after a crash).
pub(super) fn fold(conn: &Connection) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let (through, last) = read_marks(&tx)?;
    fold_range(&tx, through, last)?;
    tx.commit()
}

/// The watermark (the last row the aggregates count) and the last row.
pub(super) fn read_marks(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let through: i64 = conn.query_row(
        "SELECT value FROM ledger_meta WHERE key = 'aggregated_through'",
        [],
        |r| r.get(0),
    )?;
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM ledger_rows", [], |r| {
        r.get(0)
    })?;
    Ok((through, last))
}

/// Within a transaction: fold rows `(through, last]` by SQL and move the watermark to `last`.
pub(super) fn fold_range(conn: &Connection, through: i64, last: i64) -> rusqlite::Result<()> {
    if last > through {
        for (i, sql) in FOLD.iter().enumerate() {
            let mut stmt = conn.prepare_cached(sql)?;
            if i == 1 {
                stmt.execute(params![through, last])?;
            } else {
                stmt.execute([])?;
            }
        }
        conn.prepare_cached("UPDATE ledger_meta SET value = ?1 WHERE key = 'aggregated_through'")?
            .execute([last])?;
        conn.execute("DELETE FROM temp.fold_batch", [])?;
    }
    Ok(())
}
