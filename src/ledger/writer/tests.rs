//! The writer loop over an in-memory backend that fails while told to.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::ledger::Outcome;

/// A database in memory that fails while told to.
#[derive(Default)]
struct Db {
    failing: bool,
    /// The tags written, in order.
    written: Vec<u32>,
    /// Rows per committed transaction.
    transactions: Vec<usize>,
}

struct Fake(Arc<Mutex<Db>>);

impl Backend for Fake {
    type Tag = u32;

    fn commit(&mut self, rows: &[Pending<u32>]) -> Result<(), LedgerError> {
        let mut db = self.0.lock().unwrap();
        if db.failing {
            return Err(LedgerError::Write {
                path: "fake".into(),
                detail: "down".into(),
            });
        }
        db.written.extend(rows.iter().map(|p| p.tag));
        db.transactions.push(rows.len());
        Ok(())
    }
}

fn policy() -> Policy {
    Policy {
        max_batch: 1024,
        max_rows: 1024,
        gather: None,
        commit_window: None,
        backoff_first: Duration::from_millis(20),
        backoff_max: Duration::from_millis(40),
        defer: false,
        max_kept: None,
        close_grace: Duration::ZERO,
        bounded: false,
    }
}

fn start(policy: Policy, failing: bool) -> (Handle<u32>, Arc<Mutex<Db>>) {
    let db = Arc::new(Mutex::new(Db {
        failing,
        ..Db::default()
    }));
    let fake = db.clone();
    let handle = spawn(
        "test-writer",
        Place::File("fake".into()),
        policy,
        move |_| Ok(Fake(fake)),
    )
    .unwrap();
    (handle, db)
}

fn row() -> Row {
    Row {
        at_ms: 0,
        request_id: "r".into(),
        client: "crm".into(),
        account_id: None,
        path: "/v2/checkpoint".into(),
        action: None,
        status: 200,
        credits: 1,
        credits_known: true,
        credits_raw: None,
        outcome: Outcome::Settled,
    }
}

async fn record(handle: &Handle<u32>, tag: u32) -> Result<(), LedgerError> {
    answer(handle.record(tag, row(), true)).await
}

fn heal(db: &Arc<Mutex<Db>>) {
    db.lock().unwrap().failing = false;
}

#[tokio::test]
async fn a_failed_commit_answers_its_waiter_keeps_the_row_and_writes_it_once_healed() {
    let (handle, db) = start(policy(), true);
    assert!(matches!(
        record(&handle, 1).await,
        Err(LedgerError::Write { .. })
    ));
    assert_eq!(handle.health().rows_waiting(), 1);
    assert!(handle.health().failing());
    heal(&db);
    // The next turn (here the flush's) writes the kept row first.
    handle.flush().await.unwrap();
    record(&handle, 2).await.unwrap();
    assert_eq!(db.lock().unwrap().written, vec![1, 2]);
    assert_eq!(handle.health().rows_waiting(), 0);
    assert!(handle.health().error().is_none() && !handle.health().failing());
}

#[tokio::test]
async fn while_backing_off_new_rows_are_kept_and_answered_at_once() {
    let (handle, db) = start(
        Policy {
            defer: true,
            backoff_first: Duration::from_secs(60),
            backoff_max: Duration::from_secs(60),
            ..policy()
        },
        true,
    );
    assert!(record(&handle, 1).await.is_err());
    heal(&db);
    // The back-off has a minute to run: no new attempt, the row is kept.
    assert!(record(&handle, 2).await.is_err());
    assert!(handle.flush().await.is_err());
    assert!(db.lock().unwrap().written.is_empty());
    assert_eq!(handle.health().rows_waiting(), 2);
}

#[tokio::test]
async fn a_long_retry_is_split_into_transactions_of_max_rows() {
    let (handle, db) = start(
        Policy {
            max_rows: 3,
            ..policy()
        },
        true,
    );
    for tag in 0..7 {
        assert!(answer(handle.record(tag, row(), false)).await.is_ok());
    }
    assert!(handle.flush().await.is_err());
    heal(&db);
    handle.flush().await.unwrap();
    let db = db.lock().unwrap();
    assert_eq!(db.written, (0..7).collect::<Vec<_>>());
    assert_eq!(db.transactions, vec![3, 3, 1]);
}

#[tokio::test]
async fn beyond_max_kept_the_oldest_rows_are_dropped_and_counted() {
    let (handle, db) = start(
        Policy {
            max_kept: Some(2),
            ..policy()
        },
        true,
    );
    for tag in 0..5 {
        answer(handle.record(tag, row(), false)).await.unwrap();
    }
    assert!(handle.flush().await.is_err());
    assert_eq!(handle.health().rows_lost(), 3);
    heal(&db);
    handle.flush().await.unwrap();
    assert_eq!(db.lock().unwrap().written, vec![3, 4]);
}

#[tokio::test]
async fn closing_writes_what_is_queued_and_counts_what_it_could_not_write() {
    let (mut handle, db) = start(policy(), false);
    answer(handle.record(1, row(), false)).await.unwrap();
    let health = handle.health().clone();
    handle.close();
    assert_eq!(db.lock().unwrap().written, vec![1]);
    assert_eq!(health.rows_lost(), 0);

    let (mut handle, _db) = start(
        Policy {
            close_grace: Duration::from_millis(50),
            ..policy()
        },
        true,
    );
    answer(handle.record(1, row(), false)).await.unwrap();
    let health = handle.health().clone();
    handle.close();
    assert_eq!(health.rows_lost(), 1);
    assert!(matches!(
        handle.send(Command::Flush(oneshot::channel().0)),
        Err(LedgerError::WriterGone)
    ));
}

#[tokio::test]
async fn a_bounded_writer_refuses_rows_beyond_its_limit_until_they_are_committed() {
    let (handle, db) = start(
        Policy {
            bounded: true,
            ..policy()
        },
        true,
    );
    let health = handle.health().clone();
    health.admit(1, "fake").unwrap();
    assert!(record(&handle, 1).await.is_err());
    assert!(matches!(
        health.admit(1, "fake"),
        Err(LedgerError::BufferFull { rows: 1, .. })
    ));
    heal(&db);
    handle.flush().await.unwrap();
    health.admit(1, "fake").unwrap();
}

#[test]
fn kept_rows_are_retried_after_pauses_doubling_to_the_cap_without_end() {
    let p = Policy {
        backoff_first: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        ..policy()
    };
    let pauses: Vec<u64> = p.backoff().take(9).map(|d| d.as_millis() as u64).collect();
    assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    assert!(p.backoff().nth(10_000).is_some(), "the retries never stop");
}
