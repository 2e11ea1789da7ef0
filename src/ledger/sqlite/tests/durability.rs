#![allow(clippy::unwrap_used)]

use super::*;

#[tokio::test]
async fn a_row_is_durable_once_record_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/ledger.sqlite3");
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    for i in 0..10 {
        ledger
            .record(with(
                row(DAY2, "crm", Some("acc"), None),
                i,
                Outcome::Settled,
            ))
            .await
            .unwrap();
    }
    // Another connection sees them while the ledger still runs...
    assert_eq!(raw_count(&path), (10, 45));
    // ...and they survive a ledger that never gets to flush or close.
    ledger.crash();
    let reopened = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    assert_eq!(reopened.totals().unwrap(), (10, 45));
}

#[tokio::test]
async fn committed_rows_are_checkpointed_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let ledger = SqliteLedger::open(&path, LedgerSync::Async).unwrap();
    let empty = std::fs::metadata(&path).unwrap().len();
    for i in 0..2_000 {
        let mut r = row(DAY2, "crm", None, None);
        r.request_id = format!("request-{i:040}");
        ledger.record(r).await.unwrap();
    }
    ledger.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&path).unwrap().len() <= empty && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(std::fs::metadata(&path).unwrap().len() > empty);
}

#[tokio::test]
async fn async_rows_are_durable_after_flush_and_after_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    let ledger = SqliteLedger::open(&path, LedgerSync::Async).unwrap();
    for _ in 0..100 {
        ledger.record(row(DAY2, "crm", None, None)).await.unwrap();
    }
    ledger.flush().await.unwrap();
    assert_eq!(raw_count(&path), (100, 100));
    ledger.crash();

    let ledger = SqliteLedger::open(&path, LedgerSync::Async).unwrap();
    for _ in 0..50 {
        ledger.record(row(DAY2, "crm", None, None)).await.unwrap();
    }
    drop(ledger);
    assert_eq!(raw_count(&path), (150, 150));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_share_few_commits() {
    let dir = tempfile::tempdir().unwrap();
    let ledger =
        Arc::new(SqliteLedger::open(&dir.path().join("l.sqlite3"), LedgerSync::PowerSafe).unwrap());
    let before = ledger.commits();
    let mut tasks = JoinSet::new();
    for i in 0..1000 {
        let ledger = ledger.clone();
        tasks.spawn(async move {
            let mut r = row(DAY2, "crm", Some("acc"), Some("invite"));
            r.request_id = format!("req-{i}");
            ledger.record(r).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    let commits = ledger.commits() - before;
    assert!(commits < 100, "1000 rows took {commits} commits");
    assert_eq!(ledger.totals().unwrap(), (1000, 1000));
}

#[tokio::test]
async fn crash_safe_rows_sqlite_never_got_are_replayed_from_the_journal_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite3");
    let ledger = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    ledger
        .record(with(
            row(DAY2, "crm", Some("a1"), None),
            2,
            Outcome::Settled,
        ))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    // SQLite cannot be written: rows are journaled (answered), kept, never committed.
    ledger.fault(Some(Fault::ReadOnlyFile));
    for i in 0..5 {
        let r = with(row(DAY2, "crm", Some("a1"), None), i, Outcome::Settled);
        // Answered before the writer has met the fault or failed closed after: journaled
        // either way.
        let _ = ledger.record(r).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while ledger.write_error().is_none() {
        assert!(Instant::now() < deadline, "the writer never met the fault");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While SQLite cannot be written, costly requests fail closed; the row is journaled.
    let err = ledger
        .record(with(
            row(DAY2, "crm", Some("a1"), None),
            5,
            Outcome::Settled,
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::ReadOnly { .. }), "{err:?}");
    assert_eq!(raw_count(&path), (1, 2));
    ledger.crash();

    let reopened = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    assert_eq!(raw_count(&path), (7, 17), "0+1+2+3+4+5 after the 2 before");
    assert_eq!(reopened.totals().unwrap(), (7, 17));
    assert_eq!(reopened.spent_on(DAY2).unwrap()["crm"], 17);
    // New rows go on numbering past the replayed ones; a clean close leaves no journal.
    reopened
        .record(with(row(DAY2, "crm", None, None), 1, Outcome::Settled))
        .await
        .unwrap();
    drop(reopened);
    assert!(journal::files(&path).is_empty());
    let again = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    assert_eq!(again.totals().unwrap(), (8, 18), "nothing replayed twice");
}

/// On a data-plane worker, the rows recorded in one turn of its loop reach the journal in
/// one write, after that turn and before any of their callers is answered; a crash right
/// after loses none of them.
#[test]
fn crash_safe_rows_of_one_worker_turn_are_journaled_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite3");
    let lines = |path: &Path| -> Vec<String> {
        journal::files(path)
            .iter()
            .flat_map(|(_, f)| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let p = path.clone();
    std::thread::spawn(move || {
        crate::workers::mark_for_test(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ledger = SqliteLedger::open(&p, LedgerSync::CrashSafe).unwrap();
            let waiting: Vec<_> = (1..=3)
                .map(|c| {
                    ledger.record(with(
                        row(DAY2, "crm", Some("a1"), None),
                        c,
                        Outcome::Settled,
                    ))
                })
                .collect();
            // Queued, not written: the batch is written by a task of this runtime.
            assert!(lines(&p).is_empty());
            for w in waiting {
                w.await.unwrap();
            }
            let written = lines(&p);
            assert_eq!(written.len(), 3, "{written:?}");
            let numbers: Vec<u64> = written
                .iter()
                .map(|l| l.split('\t').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(numbers, [numbers[0], numbers[0] + 1, numbers[0] + 2]);
            ledger.crash();
        });
    })
    .join()
    .unwrap();
    let reopened = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    assert_eq!(reopened.totals().unwrap(), (3, 6));
}

#[tokio::test]
async fn a_second_writer_of_one_ledger_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite3");
    let first = SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap();
    // Another process holds it: its pid is in the lock file.
    let mut lock_path = path.clone().into_os_string();
    lock_path.push(".lock");
    std::fs::write(&lock_path, "4242").unwrap();
    let err = SqliteLedger::open(&path, LedgerSync::CrashSafe)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("pid 4242"), "{err}");
    assert!(err.contains("exactly one"), "{err}");
    // A report may still read it beside the writer.
    first
        .record(with(row(DAY2, "crm", None, None), 3, Outcome::Settled))
        .await
        .unwrap();
    first.flush().await.unwrap();
    let report = SqliteLedger::open_read_only(&path).unwrap();
    assert_eq!(report.totals().unwrap(), (1, 3));
    drop(first);
    assert!(SqliteLedger::open(&path, LedgerSync::CrashSafe).is_ok());
}

#[tokio::test]
async fn a_read_only_file_fails_the_waiters_and_the_writer_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    ledger.record(row(DAY2, "crm", None, None)).await.unwrap();

    ledger.fault(Some(Fault::ReadOnlyFile));
    let err = ledger
        .record(row(DAY2, "crm", None, None))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::ReadOnly { .. }), "{err:?}");
    assert!(err.to_string().contains("is read-only"), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(ledger.write_error().is_some());
    assert_eq!(ledger.rows_waiting(), 1);
    assert!(ledger.flush().await.is_err());

    // The cause goes away: the kept row and new ones are written, nothing twice.
    ledger.fault(None);
    ledger.record(row(DAY2, "crm", None, None)).await.unwrap();
    assert!(ledger.write_error().is_none());
    assert_eq!(ledger.rows_waiting(), 0);
    assert_eq!(ledger.totals().unwrap(), (3, 3));
    assert_eq!(raw_count(&path), (3, 3));
}

#[tokio::test]
async fn a_full_disk_fails_async_rows_at_flush_and_they_are_retried_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let ledger = SqliteLedger::open(&path, LedgerSync::Async).unwrap();
    ledger.fault(Some(Fault::DiskFull));
    let mut big = row(DAY2, "crm", None, None);
    big.request_id = "x".repeat(64 * 1024);
    // Queued: async record only fails if the writer is gone.
    ledger.record(big).await.unwrap();
    let err = ledger.flush().await.unwrap_err();
    assert!(matches!(err, LedgerError::DiskFull { .. }), "{err:?}");
    assert!(err.to_string().contains("disk is full"), "{err}");

    ledger.fault(None);
    // No new traffic: the writer retries by itself.
    let deadline = std::time::Instant::now() + RETRY_EVERY * 10;
    while ledger.rows_waiting() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ledger.totals().unwrap(), (1, 1));
    ledger.flush().await.unwrap();
    assert!(ledger.write_error().is_none());
}

#[tokio::test]
async fn a_file_truncated_while_no_gateway_ran_is_refused_at_open_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite3");
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    for i in 0..200 {
        let mut r = row(DAY2, "crm", None, None);
        r.request_id = format!("request-{i:0100}");
        ledger.record(r).await.unwrap();
    }
    drop(ledger);
    assert!(std::fs::metadata(&path).unwrap().len() > 4 * 4096);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 * 4096)
        .unwrap();
    let err = SqliteLedger::open(&path, LedgerSync::PowerSafe)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("was truncated"), "{err}");
    assert!(err.contains("its header says"), "{err}");
    assert!(err.contains("Move"), "{err}");
    // A few bytes of garbage: refused as well.
    std::fs::write(&path, "not a ledger ".repeat(20)).unwrap();
    let err = SqliteLedger::open(&path, LedgerSync::PowerSafe)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("overwritten"), "{err}");
}

/// power_safe has no journal: rows the lost file could not take, and those committed into
/// it since its last check, are saved to a journal file when the ledger closes, and the
/// next open writes them into the new ledger.
#[tokio::test]
async fn power_safe_rows_a_deleted_file_could_not_take_are_replayed_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite3");
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    let named = |id: &str| {
        let mut r = row(DAY2, "crm", None, None);
        r.request_id = id.into();
        r
    };
    ledger.record(named("before")).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    // Into the deleted file before the check, or refused after it: kept either way.
    let _ = ledger.record(named("between")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(ledger.write_error(), Some(LedgerError::FileLost { .. })) {
        assert!(Instant::now() < deadline, "the deletion was never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = ledger.record(named("after")).await.unwrap_err();
    assert!(err.to_string().contains("was deleted"), "{err}");
    assert!(ledger.flush().await.is_err());
    drop(ledger);
    assert!(!journal::files(&path).is_empty(), "no rescue journal");

    let reopened = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    let ids: Vec<String> = reopened
        .reader()
        .prepare("SELECT request_id FROM ledger_rows ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(ids.contains(&"between".to_string()), "{ids:?}");
    assert!(ids.contains(&"after".to_string()), "{ids:?}");
    assert!(reopened.write_error().is_none());
    assert!(journal::files(&path).is_empty());
}

/// The file grows under checkpoints while the writer and the checkpointer check it: a
/// busy ledger is never taken for a lost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_growing_ledger_is_never_taken_for_a_lost_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite3");
    let ledger = Arc::new(SqliteLedger::open(&path, LedgerSync::CrashSafe).unwrap());
    let until = Instant::now() + WATCH_EVERY * 3;
    let mut tasks = JoinSet::new();
    for t in 0..4 {
        let ledger = ledger.clone();
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < until {
                let mut r = row(DAY2, "crm", None, None);
                r.request_id = format!("{t}-{i:0200}");
                ledger.record(r).await.unwrap();
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    ledger.flush().await.unwrap();
    assert!(ledger.write_error().is_none(), "{:?}", ledger.write_error());
    assert!(!ledger.file_lost());
    assert!(std::fs::metadata(&path).unwrap().len() > 64 * 1024);
}

#[tokio::test]
async fn rows_queued_before_a_drop_are_written_and_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let ledger = SqliteLedger::open(&path, LedgerSync::PowerSafe).unwrap();
    let pending = ledger.record(row(DAY2, "crm", None, None));
    drop(ledger);
    // The row was queued before the drop: it is written, and its waiter answered.
    pending.await.unwrap();
    assert_eq!(raw_count(&path), (1, 1));
}
