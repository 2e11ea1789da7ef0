#![allow(clippy::unwrap_used)]

use super::*;

#[tokio::test]
async fn usage_groups_by_each_key_and_by_several() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&dir.path().join("l"), LedgerSync::PowerSafe).unwrap();
    sample(&ledger).await;

    assert_eq!(
        usage(&ledger, DAY1, DAY3, ""),
        [r#"{"requests":6,"credits":11}"#]
    );
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "client"),
        [
            r#"{"client":"crm","requests":3,"credits":5}"#,
            r#"{"client":"ops","requests":3,"credits":6}"#,
        ]
    );
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "account"),
        [
            r#"{"account":"","requests":1,"credits":5}"#,
            r#"{"account":"a1","requests":2,"credits":5}"#,
            r#"{"account":"a2","requests":3,"credits":1}"#,
        ]
    );
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "action"),
        [
            r#"{"action":"","requests":3,"credits":1}"#,
            r#"{"action":"invite","requests":2,"credits":5}"#,
            r#"{"action":"search","requests":1,"credits":5}"#,
        ]
    );
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "day"),
        [
            r#"{"day":"2026-11-24","requests":1,"credits":2}"#,
            r#"{"day":"2026-11-25","requests":3,"credits":8}"#,
            r#"{"day":"2026-11-26","requests":2,"credits":1}"#,
        ]
    );
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "outcome"),
        [
            r#"{"outcome":"ambiguous","requests":1,"credits":5}"#,
            r#"{"outcome":"cached","requests":1,"credits":0}"#,
            r#"{"outcome":"coalesced","requests":1,"credits":0}"#,
            r#"{"outcome":"settled","requests":3,"credits":6}"#,
        ]
    );
    // Sorted by the keys in the order asked for.
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "day,client"),
        [
            r#"{"client":"crm","day":"2026-11-24","requests":1,"credits":2}"#,
            r#"{"client":"crm","day":"2026-11-25","requests":2,"credits":3}"#,
            r#"{"client":"ops","day":"2026-11-25","requests":1,"credits":5}"#,
            r#"{"client":"ops","day":"2026-11-26","requests":2,"credits":1}"#,
        ]
    );
    assert_eq!(
        usage(&ledger, DAY1, DAY3, "client,outcome,day"),
        [
            r#"{"client":"crm","day":"2026-11-25","outcome":"cached","requests":1,"credits":0}"#,
            r#"{"client":"crm","day":"2026-11-24","outcome":"settled","requests":1,"credits":2}"#,
            r#"{"client":"crm","day":"2026-11-25","outcome":"settled","requests":1,"credits":3}"#,
            r#"{"client":"ops","day":"2026-11-25","outcome":"ambiguous","requests":1,"credits":5}"#,
            r#"{"client":"ops","day":"2026-11-26","outcome":"coalesced","requests":1,"credits":0}"#,
            r#"{"client":"ops","day":"2026-11-26","outcome":"settled","requests":1,"credits":1}"#,
        ]
    );
}

#[tokio::test]
async fn usage_date_ranges_are_inclusive() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&dir.path().join("l"), LedgerSync::PowerSafe).unwrap();
    sample(&ledger).await;
    // The last millisecond of a day belongs to it.
    let mut late = row(DAY1, "crm", None, None);
    late.at_ms = at(DAY2, 0) - 1;
    ledger.record(late).await.unwrap();

    assert_eq!(
        usage(&ledger, DAY1, DAY1, "day"),
        [r#"{"day":"2026-11-24","requests":2,"credits":3}"#]
    );
    assert_eq!(
        usage(&ledger, DAY2, DAY3, "day"),
        [
            r#"{"day":"2026-11-25","requests":3,"credits":8}"#,
            r#"{"day":"2026-11-26","requests":2,"credits":1}"#,
        ]
    );
    assert!(usage(
        &ledger,
        date!(2026 - 12 - 01),
        date!(2026 - 12 - 31),
        "client"
    )
    .is_empty());
    assert!(usage(&ledger, DAY3, DAY1, "client").is_empty());
}

#[tokio::test]
async fn spent_on_restores_each_clients_day_with_ambiguous_reservations() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&dir.path().join("l"), LedgerSync::PowerSafe).unwrap();
    sample(&ledger).await;
    let spent = ledger.spent_on(DAY2).unwrap();
    assert_eq!(
        spent,
        HashMap::from([("crm".to_string(), 3), ("ops".to_string(), 5)])
    );
    assert!(ledger.spent_on(date!(2026 - 01 - 01)).unwrap().is_empty());
    assert_eq!(ledger.totals().unwrap(), (6, 11));
}

/// Every way of reading the aggregates (daily and monthly, with and without the account,
/// whole months with partial days on either side) agrees with summing the rows.
#[tokio::test]
async fn usage_agrees_with_the_rows_across_month_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&dir.path().join("l"), LedgerSync::Async).unwrap();
    let start = date!(2026 - 01 - 20);
    let mut rows = Vec::new();
    for i in 0..2_000u64 {
        let day = start + time::Duration::days(i64::try_from(i % 111).unwrap());
        let client = ["crm", "ops", "bi"][usize::try_from(i % 3).unwrap()];
        let account = [None, Some("a1"), Some("a2"), Some("a3")][usize::try_from(i % 4).unwrap()];
        let action = [None, Some("invite"), Some("search")][usize::try_from(i % 5 % 3).unwrap()];
        let mut r = with(
            row(day, client, account, action),
            i % 4,
            Outcome::ALL[usize::try_from(i % 7 % 4).unwrap()],
        );
        r.at_ms += i64::try_from(i).unwrap();
        rows.push(r.clone());
        ledger.record(r).await.unwrap();
        if i % 100 == 99 {
            // Many transactions, so the upserts meet the keys earlier ones wrote.
            ledger.flush().await.unwrap();
        }
    }
    ledger.flush().await.unwrap();

    let ranges = [
        (date!(2026 - 01 - 20), date!(2026 - 05 - 10)),
        (date!(2026 - 02 - 01), date!(2026 - 03 - 31)),
        (date!(2026 - 02 - 01), date!(2026 - 02 - 28)),
        (date!(2026 - 01 - 31), date!(2026 - 03 - 01)),
        (date!(2026 - 02 - 02), date!(2026 - 02 - 27)),
        (date!(2026 - 01 - 01), date!(2026 - 12 - 31)),
        (date!(2026 - 03 - 15), date!(2026 - 03 - 15)),
        (date!(2026 - 03 - 15), date!(2026 - 03 - 14)),
    ];
    let groupings = [
        "",
        "client",
        "action,outcome",
        "account",
        "day",
        "client,outcome",
        "outcome,action,client",
        "day,account",
    ];
    for (from, to) in ranges {
        for by in groupings {
            let by = GroupBy::parse_list(by).unwrap();
            let mut expected: std::collections::BTreeMap<Vec<String>, (u64, u64)> =
                Default::default();
            if by.is_empty() {
                expected.insert(Vec::new(), (0, 0));
            }
            for r in rows
                .iter()
                .filter(|r| (from..=to).contains(&day_of(r.at_ms)))
            {
                let key = by
                    .iter()
                    .map(|g| match g {
                        GroupBy::Client => r.client.to_string(),
                        GroupBy::Account => r.account_id.as_deref().unwrap_or("").to_string(),
                        GroupBy::Action => r.action.as_deref().unwrap_or("").to_string(),
                        GroupBy::Day => day_key(day_of(r.at_ms)),
                        GroupBy::Outcome => r.outcome.as_str().to_string(),
                    })
                    .collect();
                let sums = expected.entry(key).or_default();
                sums.0 += 1;
                sums.1 += r.credits;
            }
            let got: Vec<(Vec<String>, (u64, u64))> = ledger
                .usage(&UsageQuery {
                    from_day: from,
                    to_day: to,
                    by: by.clone(),
                })
                .unwrap()
                .into_iter()
                .map(|u| {
                    let key = by
                        .iter()
                        .map(|g| {
                            match g {
                                GroupBy::Client => u.client.clone(),
                                GroupBy::Account => u.account.clone(),
                                GroupBy::Action => u.action.clone(),
                                GroupBy::Day => u.day.clone(),
                                GroupBy::Outcome => u.outcome.clone(),
                            }
                            .unwrap()
                        })
                        .collect();
                    (key, (u.requests, u.credits))
                })
                .collect();
            let expected: Vec<_> = expected.into_iter().collect();
            assert_eq!(got, expected, "{from}..={to} by {by:?}");
        }
    }
}

/// Every page of a query, walked with `limit` rows at a time.
fn walk(ledger: &dyn Ledger, q: &UsageQuery, limit: usize) -> Vec<crate::ledger::UsageRow> {
    let mut all = Vec::new();
    let mut after: Option<Vec<String>> = None;
    let mut pages = 0;
    loop {
        let page = ledger.usage_page(q, after.as_deref(), limit).unwrap();
        assert!(page.rows.len() <= limit);
        pages += 1;
        match page.next {
            Some(next) => {
                // A page with a cursor after it is full, and the cursor is its last row.
                assert_eq!(page.rows.len(), limit);
                assert_eq!(page.rows.last().unwrap().keys(&q.by), next);
                all.extend(page.rows);
                after = Some(next);
            }
            None => {
                all.extend(page.rows);
                break;
            }
        }
        assert!(pages < 100_000, "the walk does not end");
    }
    all
}

#[tokio::test]
async fn usage_pages_by_keyset_give_every_row_once_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&dir.path().join("l.sqlite3"), LedgerSync::Async).unwrap();
    let memory = crate::ledger::MemoryLedger::default();
    // Keys that sort in byte order differently from a locale's: case, non-ASCII, empty,
    // commas and quotes; days across a month boundary (the roll-up tables answer part).
    let accounts = ["", "Zeta", "a,b", "ämter", "acc\"q", "=1+2"];
    let start = date!(2026 - 01 - 25);
    for i in 0..3_000u64 {
        let day = start + time::Duration::days(i64::try_from(i % 40).unwrap());
        let account = format!(
            "{}{:04}",
            accounts[usize::try_from(i % 6).unwrap()],
            i % 1_500
        );
        let client = ["crm", "Ops", "bi"][usize::try_from(i % 3).unwrap()];
        let action = [None, Some("invite"), Some("search")][usize::try_from(i % 5 % 3).unwrap()];
        let r = with(
            row(day, client, Some(&account), action),
            i % 4,
            Outcome::ALL[usize::try_from(i % 7 % 4).unwrap()],
        );
        memory.record(r.clone()).await.unwrap();
        ledger.record(r).await.unwrap();
    }
    ledger.flush().await.unwrap();
    for (from, to) in [
        (date!(2026 - 01 - 20), date!(2026 - 03 - 10)),
        (date!(2026 - 02 - 01), date!(2026 - 02 - 28)),
        (date!(2026 - 02 - 03), date!(2026 - 02 - 03)),
    ] {
        for by in [
            "account",
            "client,account",
            "account,day",
            "outcome,action,client",
            "day",
            "action",
        ] {
            let q = UsageQuery {
                from_day: from,
                to_day: to,
                by: GroupBy::parse_list(by).unwrap(),
            };
            let want = memory.usage(&q).unwrap();
            let keys: Vec<Vec<String>> = want.iter().map(|r| r.keys(&q.by)).collect();
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "memory order");
            // Small pages only where they are few (each is a query of its own).
            let small = if want.len() <= 100 { 1 } else { 97 };
            for limit in [small, 1_000, 10_000] {
                let got = walk(&ledger, &q, limit);
                assert_eq!(got, want, "{from}..={to} by {by} limit {limit}");
                assert_eq!(walk(&memory, &q, limit), want);
            }
        }
    }
    // After the last key: nothing; a cursor of another shape: nothing.
    let q = UsageQuery {
        from_day: start,
        to_day: date!(2026 - 03 - 10),
        by: vec![GroupBy::Account],
    };
    let page = ledger
        .usage_page(&q, Some(&["\u{10FFFF}".to_string()]), 10)
        .unwrap();
    assert!(page.rows.is_empty() && page.next.is_none());
    let page = ledger
        .usage_page(&q, Some(&["a".to_string(), "b".to_string()]), 10)
        .unwrap();
    assert!(page.rows.is_empty() && page.next.is_none());
}

/// Every aggregate table, sorted.
fn aggregate_tables(conn: &Connection) -> Vec<Vec<String>> {
    [
        "SELECT day || '|' || client || '|' || account || '|' || action || '|' || outcome || '|' || requests || '|' || credits || '|' || unknown FROM usage_daily ORDER BY 1",
        "SELECT month || '|' || client || '|' || account || '|' || action || '|' || outcome || '|' || requests || '|' || credits || '|' || unknown FROM usage_monthly ORDER BY 1",
        "SELECT day || '|' || client || '|' || action || '|' || outcome || '|' || requests || '|' || credits || '|' || unknown FROM usage_daily_no_account ORDER BY 1",
        "SELECT month || '|' || client || '|' || action || '|' || outcome || '|' || requests || '|' || credits || '|' || unknown FROM usage_monthly_no_account ORDER BY 1",
    ]
    .iter()
    .map(|sql| {
        let mut stmt = conn.prepare(sql).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    })
    .collect()
}

#[tokio::test]
async fn the_writers_tally_folds_exactly_what_sql_folds_from_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let ledger = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    // Rows across a month's end and midnights, several clients, accounts, actions, outcomes
    // and unknown charges, in many transactions and several folds (each read folds).
    let start = date!(2026 - 01 - 30);
    for i in 0..3_000u64 {
        let day = start + time::Duration::days(i64::try_from(i % 5).unwrap());
        let client = ["crm", "ops"][usize::try_from(i % 2).unwrap()];
        let account = [None, Some("a1"), Some("a2")][usize::try_from(i % 3).unwrap()];
        let action = [None, Some("invite")][usize::try_from(i % 4 % 2).unwrap()];
        let mut r = with(
            row(day, client, account, action),
            i % 3,
            Outcome::ALL[usize::try_from(i % 5).unwrap()],
        );
        r.at_ms = at(day, 86_400 - 2) + i64::try_from(i % 4).unwrap() * 1000;
        r.credits_known = i % 11 != 0;
        ledger.record(r).await.unwrap();
        if i % 500 == 499 {
            ledger.flush().await.unwrap();
            let _ = usage(&ledger, start, DAY3, "client");
        }
    }
    ledger.flush().await.unwrap();
    let _ = usage(&ledger, start, DAY3, "client");
    drop(ledger);

    let conn = Connection::open(&path).unwrap();
    let tallied = aggregate_tables(&conn);
    assert!(tallied.iter().all(|t| !t.is_empty()));
    // The same aggregates folded by SQL from the rows alone.
    conn.execute_batch(
        "DELETE FROM usage_daily; DELETE FROM usage_monthly; DELETE FROM usage_daily_no_account;
         DELETE FROM usage_monthly_no_account;
         UPDATE ledger_meta SET value = 0 WHERE key = 'aggregated_through';
         CREATE TEMP TABLE IF NOT EXISTS fold_batch (day TEXT, client TEXT, account TEXT,
             action TEXT, outcome TEXT, requests INTEGER, credits INTEGER, unknown INTEGER);",
    )
    .unwrap();
    super::schema::fold(&conn).unwrap();
    assert_eq!(aggregate_tables(&conn), tallied);
}

#[tokio::test]
async fn rows_the_writer_did_not_commit_itself_are_folded_from_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let ledger = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    ledger
        .record(row(DAY1, "crm", Some("a1"), None))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    // A row that reaches the file some other way: the writer's tally does not cover it, so
    // the fold goes by SQL from the watermark and counts every row once.
    let other = Connection::open(&path).unwrap();
    let r = row(DAY1, "crm", Some("a1"), None);
    other
        .execute(
            super::schema::INSERT_ROW,
            params![
                r.at_ms,
                r.request_id,
                &*r.client,
                r.account_id.as_deref(),
                r.path,
                r.action.as_deref(),
                r.status,
                1,
                true,
                r.outcome.as_str(),
                None::<String>
            ],
        )
        .unwrap();
    ledger
        .record(row(DAY1, "crm", Some("a1"), None))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(
        usage(&ledger, DAY1, DAY1, "account"),
        [r#"{"account":"a1","requests":3,"credits":3}"#]
    );
    // And the tally is exact again after that fold.
    ledger
        .record(row(DAY1, "crm", Some("a1"), None))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(
        usage(&ledger, DAY1, DAY1, "account"),
        [r#"{"account":"a1","requests":4,"credits":4}"#]
    );
}
