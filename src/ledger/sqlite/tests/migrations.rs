#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn an_empty_file_migrates_to_the_last_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    drop(SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap());
    let conn = Connection::open(&path).unwrap();
    let version: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len());
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // Opening again is a no-op.
    drop(SqliteLedger::open(&path, LedgerSync::Async).unwrap());
}

#[tokio::test]
async fn a_version_1_file_migrates_and_backfills_the_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite3");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        for (i, (client, credits, known)) in [("crm", 2, true), ("crm", 0, false), ("ops", 4, true)]
            .into_iter()
            .enumerate()
        {
            conn.execute(
                INSERT_ROW_V1,
                params![
                    at(DAY2, i64::try_from(i).unwrap()),
                    "r",
                    client,
                    "a1",
                    "/v2/network",
                    "invite",
                    200,
                    credits,
                    known,
                    "settled"
                ],
            )
            .unwrap();
        }
    }
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    assert_eq!(ledger.totals().unwrap(), (3, 6));
    assert_eq!(
        usage(&ledger, DAY2, DAY2, "client,day,account,action"),
        [
            r#"{"client":"crm","account":"a1","action":"invite","day":"2026-11-25","requests":2,"credits":2}"#,
            r#"{"client":"ops","account":"a1","action":"invite","day":"2026-11-25","requests":1,"credits":4}"#,
        ]
    );
    // New rows land on the backfilled aggregates.
    ledger
        .record(row(DAY2, "crm", Some("a1"), Some("invite")))
        .await
        .unwrap();
    assert_eq!(ledger.spent_on(DAY2).unwrap()["crm"], 3);
    let unknown: i64 = ledger
        .reader()
        .query_row("SELECT SUM(unknown) FROM usage_daily", [], |r| r.get(0))
        .unwrap();
    assert_eq!(unknown, 1);
}

#[tokio::test]
async fn a_version_2_file_gets_the_roll_ups_backfilled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.sqlite3");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute(
            "INSERT INTO usage_daily
             (day, client, account, action, outcome, requests, credits, unknown)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params!["2026-10-31", "crm", "a1", "invite", "settled", 4, 7, 0],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO usage_daily
             (day, client, account, action, outcome, requests, credits, unknown)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params!["2026-10-31", "crm", "a2", "invite", "settled", 1, 1, 1],
        )
        .unwrap();
    }
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    assert_eq!(ledger.totals().unwrap(), (5, 8));
    assert_eq!(ledger.spent_on(date!(2026 - 10 - 31)).unwrap()["crm"], 8);
    assert_eq!(
        usage(
            &ledger,
            date!(2026 - 10 - 01),
            date!(2026 - 10 - 31),
            "client"
        ),
        [r#"{"client":"crm","requests":5,"credits":8}"#]
    );
    assert_eq!(
        usage(
            &ledger,
            date!(2026 - 10 - 01),
            date!(2026 - 10 - 31),
            "account"
        ),
        [
            r#"{"account":"a1","requests":4,"credits":7}"#,
            r#"{"account":"a2","requests":1,"credits":1}"#,
        ]
    );
}

/// A ledger written by the release before `credits_raw` (schema version 4, its rows and
/// journal lines without the column) opens, keeps its rows, and stores the raw value of
/// new unknown rows; rows with a known value keep NULL.
#[tokio::test]
async fn a_version_4_file_gets_the_raw_credits_column_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v4.sqlite3");
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        for step in &MIGRATIONS[..4] {
            conn.execute_batch(step).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        conn.execute(
            INSERT_ROW_V1,
            params![
                at(DAY2, 1),
                "old",
                "crm",
                "a1",
                "/v2/x",
                "get",
                200,
                3,
                true,
                "settled"
            ],
        )
        .unwrap();
    }
    let ledger = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    assert_eq!(ledger.totals().unwrap(), (1, 3));
    let mut unknown = with(row(DAY2, "crm", None, None), 0, Outcome::Settled);
    unknown.request_id = "odd".into();
    unknown.credits_known = false;
    unknown.credits_raw = Some(format!("\"{}\"", "é".repeat(100)));
    ledger.record(unknown).await.unwrap();
    ledger.flush().await.unwrap();
    drop(ledger);
    let conn = Connection::open(&path).unwrap();
    let raws: Vec<(String, Option<String>)> = conn
        .prepare("SELECT request_id, credits_raw FROM ledger_rows ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(raws[0], ("old".to_string(), None));
    assert_eq!(raws[1].0, "odd");
    let raw = raws[1].1.as_deref().unwrap();
    assert!(raw.len() <= crate::ledger::CREDITS_RAW_MAX, "{raw}");
    assert!(raw.starts_with("\"éé"), "{raw}");
    let version: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len());
}

#[test]
fn a_file_from_a_newer_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    drop(SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap());
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteLedger::open(&path, LedgerSync::PowerSafe)
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("schema version 99"), "{message}");
}

#[test]
fn an_unopenable_path_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let path = file.join("ledger.sqlite3");
    let err = SqliteLedger::open(&path, LedgerSync::PowerSafe)
        .err()
        .unwrap();
    assert!(matches!(err, LedgerError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}
