//! The embedded ledger: one SQLite file in WAL mode.
//!
//! Writes go through one writer thread fed by a channel. It drains everything queued into one
//! transaction (group commit) that appends the rows and nothing else. The aggregates
//! (`usage_daily`, and its roll-ups without the account by day and by month) are folded from
//! the rows about once a second, and before every read of them, in a transaction of their own
//! that moves a watermark (`ledger_meta.aggregated_through`): each row is counted exactly once,
//! and rows a crash left unfolded are folded at the next open.
//!
//! Durability (`ledger.sync`), named by what a row survives once its caller is answered:
//! `crash_safe` (default) commits with `synchronous = NORMAL`, so the row is in the OS's hands
//! (it survives a crash or SIGKILL of the gateway: sqlite.org, "WAL mode is durable across
//! application crashes") and fsyncs the WAL at least once a second; `power_safe` commits with
//! `FULL` (one fsync of the WAL per batch, under concurrency after a short commit window);
//! `async` answers once the row is queued. Flush and drop fsync. Checkpoints run on a thread
//! of their own, so a caller's commit never waits for one.
//!
//! A failed write (disk full, read-only file) answers the waiting callers with the error, keeps
//! the rows (the upstream may have charged for them) and retries them, on a fresh connection,
//! with the next batch or after [`RETRY_EVERY`]. Reads use their own connection: WAL lets
//! them run beside the writer.
//!
//! The file deleted, replaced, truncated or overwritten under the running gateway (SQLite
//! would go on committing into a WAL nobody reads again) is noticed by the writer within
//! about a second (`watch`): from then on nothing more is written or checkpointed into it,
//! the rows are kept (journal; without one, a journal file written at close), and the ledger
//! reports [`LedgerError::FileLost`] until a restart. A truncated or overwritten file is
//! refused at open, saying what to do.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, TransactionBehavior};
use time::Date;
use tokio::sync::oneshot;

use super::journal::{self, Journal};
use super::plan::{usage_row, usage_sql, Dialect};
use super::{day_key, GroupBy, Ledger, LedgerError, Row, UsagePage, UsageQuery};
use crate::config::LedgerSync;
use crate::util::BoxFuture;

/// Versioned schema: step `i` takes `PRAGMA user_version` from `i` to `i + 1`, in its own
/// transaction. Append new steps; never edit a released one.
const MIGRATIONS: &[&str] = &[
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

mod group;
mod watch;

const INSERT_ROW: &str = "INSERT INTO ledger_rows
    (at_ms, request_id, client, account_id, path, action, status, credits, credits_known, outcome,
     credits_raw)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Fold rows `(?1, ?2]` into the aggregates: group them once into a temporary table, then one
/// upsert per aggregate table and key, and move the watermark, in one transaction.
const FOLD: [&str; 6] = [
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

/// Most commands one transaction takes: bounds the latency of the first waiter in a batch.
const MAX_BATCH: usize = 16_384;
/// Under concurrency (the previous commit held at least [`BUSY_BATCH`] rows), the writer waits
/// up to this long for more rows before committing, as PostgreSQL's `commit_delay` does: one
/// fsync and one round of aggregate upserts then serve more callers. A lone caller (a batch
/// of fewer rows) never waits.
/// Only where each commit is an fsync (`power_safe`).
const COMMIT_WINDOW: Duration = Duration::from_micros(300);
/// `crash_safe` and `async`: how long rows gather before a commit.
const GATHER: Duration = Duration::from_millis(10);
/// `crash_safe`: commits reach the OS before their callers are answered; the WAL is fsynced
/// at most this long after (Redis's `appendfsync everysec`).
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// The aggregates are folded from the rows at most this long after they are committed, and
/// before any read of them.
const FOLD_EVERY: Duration = Duration::from_secs(1);
const BUSY_BATCH: usize = 4;
/// How often the writer checks that the ledger file is still the one it opened, whole (see
/// `watch`); also before the journal is trimmed and after a failed write.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long the writer waits before retrying kept rows when no new row arrives.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Rows kept for retry while writes fail; beyond, the oldest are dropped (and logged), so a
/// long outage cannot exhaust memory.
const MAX_KEPT: usize = 100_000;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an open waits for a lock this process still holds (a gateway restarted in place,
/// its old state still being dropped).
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// At most one checkpoint per this long: the WAL holds about this much writing.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// A WAL longer than this many frames (~64 MB of 4 KB pages; its mapped index ~128 KB) is
/// rewound. Passive checkpoints on their own thread copy frames but never rewind a WAL that a
/// busy writer keeps appending to, so under constant load it would grow without end, and the
/// WAL index (mapped, counted in RSS) with it. So the writer itself, between two commits, runs
/// one passive checkpoint: nothing is being written then, so it copies the last frames and the
/// next commit starts the WAL from its beginning, overwriting the file in place. The pause is
/// those frames and one fsync, once per this many frames.
const WAL_REWIND_FRAMES: i64 = 16_384;

/// The embedded ledger. Dropping it writes what is queued, fsyncs, and joins the writer.
pub struct SqliteLedger {
    path: PathBuf,
    display: String,
    sync: LedgerSync,
    /// `None` only while dropping: closing the channel tells the writer to finish.
    commands: Option<Sender<Command>>,
    writer: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    state: Arc<WriterState>,
    /// crash_safe: callers append their rows here (see `journal`).
    journal: Option<Arc<Journal>>,
    /// crash_safe on a data-plane worker: rows appended a batch per turn of its loop.
    group: Option<Arc<group::Sink>>,
    /// The exclusive lock on `<ledger>.lock`, held while this ledger is open.
    _lock: Option<File>,
}

enum Command {
    Record {
        /// The row's journal number (crash_safe).
        seq: Option<u64>,
        row: Row,
        /// `None` with `sync = "async"`: nobody waits for this row.
        done: Option<oneshot::Sender<Result<(), LedgerError>>>,
    },
    Flush(oneshot::Sender<Result<(), LedgerError>>),
    /// Fold every committed row into the aggregates now (before a read of them).
    Fold(SyncSender<()>),
}

#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Open the file read-only, as SQLite does when the file is not writable.
    ReadOnlyFile,
    /// Cap the file at its current size: the next page it needs fails with SQLITE_FULL.
    DiskFull,
}

/// What the writer shares with the handle.
#[derive(Default)]
struct WriterState {
    commits: AtomicU64,
    /// Set by the checkpointer when the WAL is long: the writer rewinds it between commits.
    wal_long: AtomicBool,
    kept: AtomicUsize,
    lost: AtomicU64,
    /// The last write's error while rows wait for a retry.
    error: Mutex<Option<LedgerError>>,
    /// `error` is set: read on every journaled record without taking the lock.
    failing: AtomicBool,
    /// The file was deleted, replaced, truncated or overwritten (sticky): no connection may
    /// checkpoint into it any more, not even when it closes.
    file_lost: AtomicBool,
    /// Held while a checkpoint runs (the checkpointer's, the writer's rewind): a checkpoint
    /// writes page 1, with the new page count, before the pages that extend the file, so
    /// the file's size is compared with its header only under this lock.
    checkpoint_lock: Mutex<()>,
    /// Tests: the fault the writer's next connection has, and a generation that tells the
    /// writer to drop its current one.
    #[cfg(test)]
    fault: Mutex<(u64, Option<Fault>)>,
}

impl WriterState {
    fn error(&self) -> MutexGuard<'_, Option<LedgerError>> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkpoint_lock(&self) -> MutexGuard<'_, ()> {
        self.checkpoint_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl SqliteLedger {
    /// Create parent directories, open (or create) the file, run migrations, start the writer.
    pub fn open(path: &Path, sync: LedgerSync) -> Result<SqliteLedger, LedgerError> {
        let display = path.display().to_string();
        let fail = |reason: String| LedgerError::Open {
            path: display.clone(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
        }
        let lock = lock(path)?;
        // A file truncated or overwritten while no gateway ran is refused here, clearly,
        // rather than by SQLite later ("file is not a database", "malformed").
        let suspect = watch::check_before_open(path).map_err(&fail)?;
        let mut conn = open_writer(path, sync).map_err(|e| fail(e.to_string()))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| fail(format!("cannot switch to WAL: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(format!(
                "WAL mode is unavailable here (journal_mode stays `{mode}`)"
            )));
        }
        if let Some(detail) = suspect {
            // Shorter than its header says, with a WAL beside it: a crash during a
            // checkpoint leaves it so (the WAL completes it), and so does a truncation. SQLite
            // tells them apart now that it has read the WAL.
            let verdict = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get::<_, String>(0))
                .unwrap_or_else(|e| e.to_string());
            if verdict != "ok" {
                return Err(fail(watch::refusal(
                    path,
                    watch::Problem::Truncated,
                    &format!("{detail}; SQLite's quick_check: {verdict}"),
                )));
            }
            tracing::warn!(path = %path.display(), detail = %detail, "the ledger file is shorter than its header says, but its WAL completes it (a crash during a checkpoint) and SQLite's quick_check passes");
        }
        migrate(&mut conn).map_err(fail)?;
        // Rows a crash left in the journal go into SQLite, made durable, before the journal
        // files are removed; then rows left unfolded are counted in the aggregates before
        // anything reads them.
        let next = replay_journal(&conn, path).map_err(fail)?;
        fold(&conn).map_err(|e| fail(format!("cannot bring the aggregates up to date: {e}")))?;
        let journal = match sync {
            LedgerSync::CrashSafe => {
                Some(Arc::new(Journal::start(path, next).map_err(|e| {
                    fail(format!("cannot create the journal beside the ledger: {e}"))
                })?))
            }
            _ => None,
        };
        let file_watch = Arc::new(
            watch::FileWatch::open(path)
                .map_err(|e| fail(format!("cannot open the file to watch it: {e}")))?,
        );
        let reader = open_reader(path).map_err(|e| fail(e.to_string()))?;
        let checkpoints = open_checkpointer(path).map_err(|e| fail(e.to_string()))?;
        let state = Arc::new(WriterState::default());
        let (wake_checkpointer, wake) = mpsc::sync_channel(1);
        let checkpointer_display = display.clone();
        let checkpointer_state = state.clone();
        let checkpointer_watch = file_watch.clone();
        let checkpointer = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || {
                run_checkpoints(
                    checkpoints,
                    wake,
                    &checkpointer_display,
                    &checkpointer_state,
                    &checkpointer_watch,
                )
            })
            .map_err(|e| fail(format!("cannot start the checkpoint thread: {e}")))?;

        let (commands, rx) = mpsc::channel();
        let writer = Writer {
            path: path.to_path_buf(),
            display: display.clone(),
            sync,
            conn: Some(conn),
            kept: Vec::new(),
            kept_through: None,
            journal: journal.clone(),
            unsynced: false,
            synced_through: None,
            synced_at: Instant::now(),
            // Held from the start, while descriptors are plentiful.
            wal: open_wal(path).ok(),
            unfolded: false,
            folded_at: Instant::now(),
            wake_checkpointer,
            state: state.clone(),
            watch: file_watch,
            checked_at: Instant::now(),
            lost: None,
            unverified: Vec::new(),
            rescue_from: next,
            #[cfg(test)]
            fault: None,
            #[cfg(test)]
            fault_generation: 0,
        };
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        let group = journal.as_ref().map(|j| {
            Arc::new(group::Sink::new(
                j.clone(),
                commands.clone(),
                state.clone(),
                path.to_path_buf(),
            ))
        });
        Ok(SqliteLedger {
            path: path.to_path_buf(),
            display,
            sync,
            commands: Some(commands),
            writer: Some(handle),
            checkpointer: Some(checkpointer),
            reader: Mutex::new(reader),
            state,
            journal,
            group,
            _lock: Some(lock),
        })
    }

    /// Read the ledger another process (the running gateway) writes: `usage` while it runs.
    /// No writer, no journal replay, no fold: the aggregates may lag the rows of the last
    /// second or so, which the writer folds in.
    pub fn open_read_only(path: &Path) -> Result<SqliteLedger, LedgerError> {
        let display = path.display().to_string();
        let reader = open_reader(path).map_err(|e| LedgerError::Open {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        Ok(SqliteLedger {
            path: path.to_path_buf(),
            display,
            sync: LedgerSync::Async,
            commands: None,
            writer: None,
            checkpointer: None,
            reader: Mutex::new(reader),
            state: Arc::new(WriterState::default()),
            journal: None,
            group: None,
            _lock: None,
        })
    }

    /// Transactions committed so far: with group commit, far fewer than rows.
    pub fn commits(&self) -> u64 {
        self.state.commits.load(Ordering::Relaxed)
    }

    /// Rows whose write failed and that wait for a retry.
    pub fn rows_waiting(&self) -> usize {
        self.state.kept.load(Ordering::Relaxed)
    }

    /// Rows dropped because writes kept failing while more than 100,000 rows waited.
    pub fn rows_lost(&self) -> u64 {
        self.state.lost.load(Ordering::Relaxed)
    }

    fn send(&self, command: Command) -> Result<(), LedgerError> {
        self.commands
            .as_ref()
            .ok_or(LedgerError::WriterGone)?
            .send(command)
            .map_err(|_| LedgerError::WriterGone)
    }

    /// Ask the writer to fold every committed row into the aggregates, and wait (bounded) for
    /// it: reads of the aggregates then count every row recorded before them. Blocking: the
    /// reads run on blocking threads.
    fn fold_now(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.send(Command::Fold(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable.
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn query_error(&self, e: rusqlite::Error) -> LedgerError {
        LedgerError::Query {
            path: self.display.clone(),
            detail: e.to_string(),
        }
    }

    /// Tests: the process dies here (nothing flushed, closed or joined); only the lock goes,
    /// as the kernel releases it with a dead process.
    #[cfg(test)]
    fn crash(mut self) {
        drop(self._lock.take());
        std::mem::forget(self);
    }

    /// Tests: from the next write on, fail as a read-only file or a full disk would.
    #[cfg(test)]
    fn fault(&self, fault: Option<Fault>) {
        let mut current = self
            .state
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *current = (current.0 + 1, fault);
    }
}

impl Ledger for SqliteLedger {
    fn record(&self, row: Row) -> BoxFuture<Result<(), LedgerError>> {
        // On a data-plane worker: joins the rows of this turn of its loop, one write for all.
        let mut slot = Some(row);
        if let Some(group) = &self.group {
            if let Some(appended) = group::append(group, &mut slot) {
                return Box::pin(appended);
            }
        }
        let Some(row) = slot else {
            return Box::pin(std::future::ready(Err(LedgerError::WriterGone)));
        };
        if let Some(journal) = &self.journal {
            // crash_safe: the caller appends its own row to the journal (in the OS's hands
            // when this returns) and nobody waits for SQLite.
            thread_local! {
                static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            let mut sent = Err(LedgerError::WriterGone);
            let appended = LINE.with(|line| {
                let mut line = line.take();
                line.clear();
                journal::encode(&row, &mut line);
                let r = journal.append(&line, |seq| {
                    sent = self.send(Command::Record {
                        seq: Some(seq),
                        row,
                        done: None,
                    });
                });
                LINE.set(line);
                r
            });
            let result = match appended {
                Err(e) => Err(journal::write_error(&self.path, &e)),
                // While SQLite cannot be written, costly requests fail closed, as in the
                // other modes (the row itself is journaled and kept).
                Ok(()) => sent.and_then(|()| {
                    if !self.state.failing.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    self.state.error().clone().map_or(Ok(()), Err)
                }),
            };
            return Box::pin(std::future::ready(result));
        }
        match self.sync {
            LedgerSync::Async | LedgerSync::CrashSafe => {
                Box::pin(std::future::ready(self.send(Command::Record {
                    seq: None,
                    row,
                    done: None,
                })))
            }
            LedgerSync::PowerSafe => {
                let (tx, rx) = oneshot::channel();
                if let Err(e) = self.send(Command::Record {
                    seq: None,
                    row,
                    done: Some(tx),
                }) {
                    return Box::pin(std::future::ready(Err(e)));
                }
                Box::pin(async move { rx.await.unwrap_or(Err(LedgerError::WriterGone)) })
            }
        }
    }

    fn spent_on(&self, day: Date) -> Result<HashMap<String, u64>, LedgerError> {
        self.fold_now();
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached(
                "SELECT client, SUM(credits) FROM usage_daily_no_account WHERE day = ?1 \
                 GROUP BY client",
            )
            .map_err(|e| self.query_error(e))?;
        let rows = stmt
            .query_map([day_key(day)], |r| {
                Ok((r.get::<_, String>(0)?, to_u64(r.get::<_, i64>(1)?)))
            })
            .map_err(|e| self.query_error(e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| self.query_error(e))
    }

    fn usage_page(
        &self,
        q: &UsageQuery,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<UsagePage, LedgerError> {
        let limit = limit.max(1);
        let mut by: Vec<GroupBy> = Vec::with_capacity(q.by.len());
        for key in &q.by {
            if !by.contains(key) {
                by.push(*key);
            }
        }
        let after = match after {
            // Keys of another shape cannot come from a page of this query.
            Some(a) if a.len() != by.len() || by.is_empty() => {
                return Ok(UsagePage {
                    rows: Vec::new(),
                    next: None,
                })
            }
            other => other,
        };
        let (sql, mut params) = usage_sql(
            &by,
            q.from_day,
            q.to_day,
            Dialect::SQLITE,
            after.is_some(),
            limit,
        );
        params.extend(after.into_iter().flatten().cloned());
        self.fold_now();
        // The reader is held for this one statement (at most `limit + 1` rows), on the caller's
        // blocking thread; the writer has its own connection (WAL: readers never block it).
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.query_error(e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(&params), |r| {
                let keys = (0..by.len())
                    .map(|i| r.get::<_, String>(i))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(usage_row(&by, keys, r.get(by.len())?, r.get(by.len() + 1)?))
            })
            .map_err(|e| self.query_error(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.query_error(e))?;
        Ok(UsagePage::from_rows(rows, &by, limit))
    }

    fn flush(&self) -> BoxFuture<Result<(), LedgerError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.send(Command::Flush(tx)) {
            return Box::pin(std::future::ready(Err(e)));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(LedgerError::WriterGone)) })
    }

    fn totals(&self) -> Result<(u64, u64), LedgerError> {
        // Folded just now, the aggregates count every committed row, and the monthly roll-up
        // is a few hundred rows per month to sum rather than millions.
        self.fold_now();
        self.reader()
            .query_row(
                "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(credits), 0) \
                 FROM usage_monthly_no_account",
                [],
                |r| Ok((to_u64(r.get(0)?), to_u64(r.get(1)?))),
            )
            .map_err(|e| self.query_error(e))
    }

    fn write_error(&self) -> Option<LedgerError> {
        self.state.error().clone()
    }

    fn file_lost(&self) -> bool {
        self.state.file_lost.load(Ordering::Acquire)
    }
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        // Closing the channel makes the writer commit what is queued, fsync, and return.
        if let Some(group) = &self.group {
            group.close();
        }
        drop(self.commands.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.display, "the ledger writer thread panicked");
            }
        }
        // Every journaled row is in SQLite (and fsynced) once the writer closed with nothing
        // kept: the journal files can go.
        if let Some(journal) = &self.journal {
            if self.state.kept.load(Ordering::Relaxed) == 0 && self.state.error().is_none() {
                journal.remove_all();
            }
        }
        // The writer's end of its channel is gone now, so the checkpointer returns too.
        if let Some(checkpointer) = self.checkpointer.take() {
            if checkpointer.join().is_err() {
                tracing::error!(path = %self.display, "the ledger checkpoint thread panicked");
            }
        }
        // The reader closes last: it must not copy the WAL into a damaged file either.
        if self.state.file_lost.load(Ordering::Acquire) {
            no_checkpoint_on_close(&self.reader());
        }
    }
}

/// Closing `conn` must not checkpoint the WAL into the database file (the file was lost:
/// copying the WAL into a truncated file would make it look whole but be malformed).
fn no_checkpoint_on_close(conn: &Connection) {
    let _ = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn open_wal(path: &Path) -> std::io::Result<std::fs::File> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::File::open(wal)
}

fn open_writer(path: &Path, sync: LedgerSync) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL with NORMAL: a commit is in the OS's hands when it returns (it survives a crash of
    // the process, not of the machine); FULL adds an fsync of the WAL to every commit.
    let level = match sync {
        LedgerSync::PowerSafe => "FULL",
        LedgerSync::CrashSafe | LedgerSync::Async => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS fold_batch (
            day TEXT, client TEXT, account TEXT, action TEXT, outcome TEXT,
            requests INTEGER, credits INTEGER, unknown INTEGER)",
    )?;
    // Checkpoints run on their own thread (see `run_checkpoints`), not inside a commit that
    // callers are waiting for.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The WAL file is never cut at a rewind (cutting it there cost p99 ~40 ms under load): it
    // stays at its high-water mark, about WAL_REWIND_FRAMES pages, and is overwritten in place.
    conn.pragma_update(None, "journal_size_limit", -1)?;
    Ok(conn)
}

fn open_checkpointer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// Copy committed WAL frames into the database file, beside the writer: a passive checkpoint
/// takes no lock that a commit needs, so its two fsyncs never delay a caller's row. Runs after
/// a commit, at most once per [`CHECKPOINT_EVERY`]; returns when the writer has gone.
fn run_checkpoints(
    conn: Connection,
    wake: Receiver<()>,
    path: &str,
    state: &WriterState,
    watch: &watch::FileWatch,
) {
    checkpoint_until_closed(&conn, &wake, path, state, watch);
    if state.file_lost.load(Ordering::Acquire) {
        no_checkpoint_on_close(&conn);
    }
}

fn checkpoint_until_closed(
    conn: &Connection,
    wake: &Receiver<()>,
    path: &str,
    state: &WriterState,
    watch: &watch::FileWatch,
) {
    while wake.recv().is_ok() {
        let checkpointed = {
            // A checkpoint writes page 1 (the page count) before the pages that extend the
            // file: the writer's check must not look at the size meanwhile.
            let _checkpointing = state.checkpoint_lock();
            // Never copy the WAL into a file that is not the one opened, or not whole any
            // more (it would look whole and be malformed); the writer's own check says why.
            if state.file_lost.load(Ordering::Acquire) || watch.check(true).is_some() {
                None
            } else {
                // (busy, frames in the WAL, frames copied)
                Some(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)))
            }
        };
        let Some(checkpointed) = checkpointed else {
            no_checkpoint_on_close(conn);
            continue;
        };
        match checkpointed {
            // Everything but the last frames is copied by now: the writer rewinds the WAL
            // between two commits (see WAL_REWIND_FRAMES).
            Ok(frames) if frames >= WAL_REWIND_FRAMES => {
                state.wal_long.store(true, Ordering::Release);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(path, error = %e, "ledger checkpoint failed; will retry"),
        }
        let until = Instant::now() + CHECKPOINT_EVERY;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Err(RecvTimeoutError::Disconnected) = wake.recv_timeout(left) {
                return;
            }
        }
    }
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

/// Bring the schema to the last version, one step per transaction. `IMMEDIATE` takes the write
/// lock before reading the version, so two processes opening one file cannot both migrate.
fn migrate(conn: &mut Connection) -> Result<(), String> {
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
fn write_error(path: &str, e: &rusqlite::Error) -> LedgerError {
    let path = path.to_string();
    let detail = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => LedgerError::DiskFull { path, detail },
        Some(ErrorCode::ReadOnly) => LedgerError::ReadOnly { path, detail },
        _ => LedgerError::Write { path, detail },
    }
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    display: String,
    sync: LedgerSync,
    /// `None` after a failure: the next attempt opens a fresh connection (a file made
    /// writable again is only seen by a new one).
    conn: Option<Connection>,
    /// Rows whose write failed, oldest first; written before the next batch.
    kept: Vec<Row>,
    /// The highest journal number among the kept rows.
    kept_through: Option<u64>,
    journal: Option<Arc<Journal>>,
    /// Committed with `synchronous = NORMAL` since the WAL was last fsynced.
    unsynced: bool,
    /// The last journal number committed since the journal was last trimmed.
    synced_through: Option<u64>,
    synced_at: Instant,
    /// The WAL, held open for its fsync: opening it every second fails exactly when the
    /// process is short of descriptors (thousands of connections), which is no time to stop
    /// writing the ledger. Dropped with the connection, and on any error.
    wal: Option<std::fs::File>,
    /// Rows committed since the last fold into the aggregates.
    unfolded: bool,
    folded_at: Instant,
    /// Told after each commit; full means a checkpoint is already due.
    wake_checkpointer: SyncSender<()>,
    state: Arc<WriterState>,
    /// The file opened, to notice it deleted, replaced or truncated under the gateway.
    watch: Arc<watch::FileWatch>,
    checked_at: Instant,
    /// Set when the file was lost (sticky): nothing more is written to it.
    lost: Option<LedgerError>,
    /// Without a journal (power_safe, async): the rows committed since the file was last
    /// checked, kept again if the check finds the file lost (they went with it).
    unverified: Vec<Row>,
    /// The first journal number past every row this ledger holds: rescued rows are numbered
    /// from here, so a restored copy of this ledger replays them too.
    rescue_from: u64,
    #[cfg(test)]
    fault: Option<Fault>,
    #[cfg(test)]
    fault_generation: u64,
}

impl Writer {
    fn run(mut self, commands: Receiver<Command>) {
        let mut batch = Vec::new();
        let mut last_batch = 0usize;
        loop {
            // Block for the first command; with rows to retry, a WAL to fsync or rows to fold,
            // only until that is due.
            let first = match self.next_due() {
                None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(due) => commands.recv_timeout(due.saturating_duration_since(Instant::now())),
            };
            let mut closing = false;
            match first {
                Ok(command) => batch.push(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = true,
            }
            // Group commit: everything that queued up meanwhile joins this transaction, and
            // under concurrency what arrives within the commit window too.
            let window_ends = (self.sync == LedgerSync::PowerSafe && last_batch >= BUSY_BATCH)
                .then(|| Instant::now() + COMMIT_WINDOW);
            // Nobody waits for a row's commit in crash_safe (journaled) and async: let rows
            // gather for a moment, so one commit, and one wake-up of this thread, serves many
            // (senders do not wake a thread that is not blocked on the channel).
            if self.sync != LedgerSync::PowerSafe
                && !closing
                && matches!(batch.first(), Some(Command::Record { .. }))
            {
                std::thread::sleep(GATHER);
            }
            while !closing && batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(TryRecvError::Disconnected) => closing = true,
                    Err(TryRecvError::Empty) => {
                        let left = window_ends
                            .map(|end| end.saturating_duration_since(Instant::now()))
                            .unwrap_or_default();
                        if left.is_zero() {
                            break;
                        }
                        match commands.recv_timeout(left) {
                            Ok(command) => batch.push(command),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => closing = true,
                        }
                    }
                }
            }
            last_batch = batch.len();
            self.write(&mut batch, closing);
            if self.lost.is_none() && self.checked_at.elapsed() >= WATCH_EVERY {
                self.check_file();
            }
            if closing {
                // Closing checkpoints the WAL into the file: not if it is lost.
                self.check_file();
                if self.lost.is_some() {
                    self.rescue();
                }
                let kept = self.kept.len();
                if kept > 0 {
                    tracing::error!(
                        path = %self.display,
                        rows = kept,
                        "ledger closed with rows it could not write"
                    );
                }
                return;
            }
        }
    }

    fn write(&mut self, batch: &mut Vec<Command>, closing: bool) {
        let mut rows = std::mem::take(&mut self.kept);
        let mut through = self.kept_through.take();
        let mut waiters = Vec::new();
        let mut flushes = Vec::new();
        let mut folds = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Record { seq, row, done } => {
                    rows.push(row);
                    through = through.max(seq);
                    waiters.extend(done);
                }
                Command::Flush(done) => flushes.push(done),
                Command::Fold(done) => folds.push(done),
            }
        }

        let committed = if rows.is_empty() {
            Ok(())
        } else {
            self.commit(&rows, through)
        };
        match &committed {
            Err(_) => {
                // Rows the file check just took back (`lose`) come first.
                let mut all = std::mem::take(&mut self.kept);
                all.extend(rows);
                self.keep(all);
                self.kept_through = through;
            }
            Ok(()) if self.journal.is_none() => self.unverified.extend(rows),
            Ok(()) => {}
        }
        // Flush and close promise durability: one fsync of the WAL; crash_safe also fsyncs
        // it once SYNC_EVERY has passed since the last.
        let synced = committed.clone().and_then(|()| {
            let due = self.sync == LedgerSync::CrashSafe && self.synced_at.elapsed() >= SYNC_EVERY;
            if self.unsynced && (closing || !flushes.is_empty() || due) {
                self.sync_wal()
            } else {
                Ok(())
            }
        });
        // Journal files whose rows SQLite now holds durably can go, once the file is checked
        // to be still there and whole: rows committed into a lost file stay journaled.
        if synced.is_ok() && !self.unsynced && self.synced_through.is_some() {
            self.check_file();
            if let (Some(journal), None) = (&self.journal, &self.lost) {
                if let Some(through) = self.synced_through.take() {
                    journal.trim(through);
                }
            }
        }
        let synced = match &self.lost {
            Some(lost) => Err(lost.clone()),
            None => synced,
        };
        // Publish the health before answering, so a caller that sees an error sees it here too.
        self.note(&synced);
        for done in waiters {
            let _ = done.send(committed.clone());
        }
        if self.unfolded
            && (closing
                || !flushes.is_empty()
                || !folds.is_empty()
                || self.folded_at.elapsed() >= FOLD_EVERY)
        {
            self.fold();
        }
        for done in flushes {
            let _ = done.send(synced.clone());
        }
        for done in folds {
            let _ = done.send(());
        }
        if self.state.wal_long.swap(false, Ordering::AcqRel) {
            self.rewind_wal();
        }
    }

    /// When the writer must wake without a command: rows to retry, a WAL to fsync
    /// (crash_safe), rows to fold.
    fn next_due(&self) -> Option<Instant> {
        let retry = (!self.kept.is_empty()).then(|| Instant::now() + RETRY_EVERY);
        let sync = (self.unsynced && self.sync == LedgerSync::CrashSafe)
            .then(|| self.synced_at + SYNC_EVERY);
        let fold = self.unfolded.then(|| self.folded_at + FOLD_EVERY);
        let watch = self.lost.is_none().then(|| self.checked_at + WATCH_EVERY);
        [retry, sync, fold, watch].into_iter().flatten().min()
    }

    /// Fold committed rows into the aggregates. A failure leaves the rows unfolded and is
    /// retried at the next fold: the rows are safe either way.
    fn fold(&mut self) {
        if self.lost.is_some() {
            return;
        }
        let Some(conn) = &self.conn else { return };
        match fold(conn) {
            Ok(()) => {
                self.unfolded = false;
                self.folded_at = Instant::now();
            }
            Err(e) => {
                self.folded_at = Instant::now();
                tracing::warn!(path = %self.display, error = %e, "folding ledger rows into the usage aggregates failed; will retry");
            }
        }
    }

    /// One passive checkpoint on the writer's own connection, between two commits: it copies
    /// the frames the checkpointer has not, so the next commit starts the WAL afresh. Busy
    /// (the checkpointer is mid-way) is fine: it asks again next time.
    fn rewind_wal(&mut self) {
        let state = self.state.clone();
        let _checkpointing = match state.checkpoint_lock.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // The checkpointer is at it: ask again after the next commit.
            Err(TryLockError::WouldBlock) => {
                self.state.wal_long.store(true, Ordering::Release);
                return;
            }
        };
        self.check_file_while(true);
        if self.lost.is_some() {
            return;
        }
        if let Some(conn) = &self.conn {
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(path = %self.display, error = %e, "ledger WAL rewind failed; will retry");
            }
        }
    }

    fn commit(&mut self, rows: &[Row], through: Option<u64>) -> Result<(), LedgerError> {
        #[cfg(test)]
        {
            let (generation, fault) = *self
                .state
                .fault
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if generation != self.fault_generation {
                self.fault_generation = generation;
                self.fault = fault;
                self.conn = None;
            }
        }
        if let Some(lost) = &self.lost {
            return Err(lost.clone());
        }
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                self.wal = None;
                self.reopen().map_err(|e| write_error(&self.display, &e))?
            }
        };
        match write_rows(&conn, rows, through) {
            Ok(()) => {
                if through.is_some() {
                    self.synced_through = through;
                }
                self.conn = Some(conn);
                if self.wal.is_none() {
                    self.wal = open_wal(&self.path).ok();
                }
                self.state.commits.fetch_add(1, Ordering::Relaxed);
                let _ = self.wake_checkpointer.try_send(());
                self.unsynced |= self.sync != LedgerSync::PowerSafe;
                self.unfolded = true;
                Ok(())
            }
            // The connection is dropped: the next attempt starts afresh. A lost file
            // explains the failure better than SQLite's error does.
            Err(e) => {
                let error = write_error(&self.display, &e);
                if self.lost.is_none() {
                    self.check_file();
                }
                if let Some(lost) = &self.lost {
                    drop(conn);
                    return Err(lost.clone());
                }
                Err(error)
            }
        }
    }

    /// Is the file still the one opened, whole? If not, the ledger is lost (see `lose`).
    fn check_file(&mut self) {
        if self.lost.is_some() {
            return;
        }
        // The size is only compared with the header's page count when no checkpoint runs
        // (see `checkpoint_lock`); never waited for.
        let state = self.state.clone();
        let checkpoint = match state.checkpoint_lock.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        self.check_file_while(checkpoint.is_some());
    }

    /// [`Writer::check_file`], comparing the size with the header only if `no_checkpoint`
    /// (the caller holds `checkpoint_lock`).
    fn check_file_while(&mut self, no_checkpoint: bool) {
        if self.lost.is_some() {
            return;
        }
        self.checked_at = Instant::now();
        match self.watch.check(no_checkpoint) {
            None => self.unverified.clear(),
            Some((problem, detail)) => self.lose(problem, detail),
        }
    }

    /// The file was deleted, replaced, truncated or overwritten: stop writing it (SQLite would
    /// go on committing into the WAL of a file nobody will read), keep every row not known
    /// to be in a sound file, fail closed, and say so.
    fn lose(&mut self, problem: watch::Problem, detail: String) {
        let error = LedgerError::FileLost {
            path: self.display.clone(),
            reason: problem.reason(),
            what: problem.what(),
            detail: detail.clone(),
        };
        self.state.file_lost.store(true, Ordering::Release);
        if let Some(conn) = &self.conn {
            no_checkpoint_on_close(conn);
        }
        let mut rows = std::mem::take(&mut self.unverified);
        rows.append(&mut self.kept);
        self.keep(rows);
        let kept_where = if self.journal.is_some() {
            "they are in the journal beside it"
        } else {
            "they are written to a journal file beside it when the gateway stops"
        };
        tracing::error!(
            path = %self.display,
            reason = problem.reason(),
            detail = %detail,
            rows_waiting = self.kept.len(),
            "ledger file {} under the running gateway ({detail}): requests that cost credits \
             are refused and /readyz is not ready; rows are not written to it any more \
             ({kept_where}, and the next start writes them into the ledger it opens). Restore \
             the file from a backup and restart the gateway, or restart it to start a new ledger",
            problem.what()
        );
        {
            let mut state_error = self.state.error();
            *state_error = Some(error.clone());
        }
        self.state.failing.store(true, Ordering::Release);
        self.lost = Some(error);
    }

    /// Closing with a lost file and no journal (power_safe, async): the rows it could not
    /// write go to a journal file beside the ledger, which the next start replays into
    /// whichever ledger it opens (numbered past every row this ledger ever held).
    fn rescue(&mut self) {
        if self.journal.is_some() || self.kept.is_empty() {
            return;
        }
        let mut lines = Vec::new();
        let mut ends = Vec::with_capacity(self.kept.len());
        for row in &self.kept {
            journal::encode(row, &mut lines);
            ends.push(lines.len());
        }
        let written = Journal::start(&self.path, self.rescue_from)
            .and_then(|j| j.append_many(&lines, &ends, |_, _| {}));
        match written {
            Ok(()) => {
                tracing::warn!(
                    path = %self.display,
                    rows = self.kept.len(),
                    "wrote the ledger rows the lost file could not take to a journal file beside it: the next start writes them into the ledger it opens"
                );
                self.kept.clear();
                self.state.kept.store(0, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(
                path = %self.display,
                rows = self.kept.len(),
                error = %e,
                "cannot save the rows the lost ledger file could not take: they are lost"
            ),
        }
    }

    fn reopen(&self) -> rusqlite::Result<Connection> {
        #[cfg(test)]
        if let Some(fault) = self.fault {
            return fault.open(&self.path, self.sync);
        }
        open_writer(&self.path, self.sync)
    }

    /// fsync the WAL, making every commit so far durable (what `synchronous = FULL` does at
    /// each commit). Any descriptor of the file will do.
    fn sync_wal(&mut self) -> Result<(), LedgerError> {
        let synced = match &self.wal {
            Some(f) => f.sync_all(),
            None => open_wal(&self.path).and_then(|f| {
                f.sync_all()?;
                self.wal = Some(f);
                Ok(())
            }),
        };
        match synced {
            Ok(()) => {}
            // No WAL: everything is checkpointed into the (synced) database file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                self.wal = None;
                return Err(LedgerError::Write {
                    path: self.display.clone(),
                    detail: format!("fsync of the WAL failed: {e}"),
                });
            }
        }
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.sync() {
                tracing::warn!(path = %self.display, error = %e, "fsync of the ledger journal failed");
            }
        }
        self.unsynced = false;
        self.synced_at = Instant::now();
        Ok(())
    }

    fn keep(&mut self, mut rows: Vec<Row>) {
        if rows.len() > MAX_KEPT {
            let lost = rows.len() - MAX_KEPT;
            rows.drain(..lost);
            self.state.lost.fetch_add(lost as u64, Ordering::Relaxed);
            tracing::error!(
                path = %self.display,
                rows = lost,
                "ledger writes have failed for too long: dropped the oldest unwritten rows"
            );
        }
        self.state.kept.store(rows.len(), Ordering::Relaxed);
        self.kept = rows;
    }

    /// Publish the writer's health and log its changes, once each.
    fn note(&self, result: &Result<(), LedgerError>) {
        let mut error = self.state.error();
        match result {
            Ok(()) => {
                self.state.kept.store(self.kept.len(), Ordering::Relaxed);
                if self.kept.is_empty() && error.take().is_some() {
                    tracing::info!(path = %self.display, "ledger writes recovered");
                }
            }
            Err(e) => {
                if error.is_none() {
                    tracing::error!(
                        path = %self.display,
                        error = %e,
                        rows_waiting = self.kept.len(),
                        "ledger write failed; keeping the rows and retrying"
                    );
                }
                *error = Some(e.clone());
            }
        }
        self.state.failing.store(error.is_some(), Ordering::Release);
    }
}

/// One transaction: the rows, and the last journal number they bring in. Their aggregates are
/// folded in later, by [`fold`].
fn write_rows(conn: &Connection, rows: &[Row], through: Option<u64>) -> rusqlite::Result<()> {
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
                r.credits_raw.as_deref().map(super::bounded_raw),
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
fn replay_journal(conn: &Connection, path: &Path) -> Result<u64, String> {
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

/// Take the exclusive lock on `<ledger>.lock` and write this process's id into it: exactly one
/// gateway writes a ledger (two would each enforce the whole budget, and replay each other's
/// journal). A lock still held by this process (a gateway restarted in place) is waited for
/// briefly; another process's is refused, naming it.
fn lock(path: &Path) -> Result<File, LedgerError> {
    let display = path.display().to_string();
    let fail = |reason: String| LedgerError::Open {
        path: display.clone(),
        reason,
    };
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", lock_path.display())))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let holder = holder.trim();
                let ours = holder == std::process::id().to_string();
                if !ours || Instant::now() >= deadline {
                    return Err(LedgerError::Locked {
                        path: display,
                        holder: if holder.is_empty() {
                            "unknown".into()
                        } else {
                            holder.to_owned()
                        },
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(fail(format!("cannot lock {}: {e}", lock_path.display())))
            }
        }
    }
    use std::io::{Seek, Write};
    let _ = file.set_len(0);
    let _ = file.seek(std::io::SeekFrom::Start(0));
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

/// Fold every row past the watermark into the aggregates and move the watermark, in one
/// transaction: the aggregates count each row exactly once, whoever folds (the writer, or a
/// process opening the file after a crash).
fn fold(conn: &Connection) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let through: i64 = tx.query_row(
        "SELECT value FROM ledger_meta WHERE key = 'aggregated_through'",
        [],
        |r| r.get(0),
    )?;
    let last: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM ledger_rows", [], |r| {
        r.get(0)
    })?;
    if last > through {
        for (i, sql) in FOLD.iter().enumerate() {
            let mut stmt = tx.prepare_cached(sql)?;
            if i == 1 {
                stmt.execute(params![through, last])?;
            } else {
                stmt.execute([])?;
            }
        }
        tx.prepare_cached("UPDATE ledger_meta SET value = ?1 WHERE key = 'aggregated_through'")?
            .execute([last])?;
        tx.execute("DELETE FROM temp.fold_batch", [])?;
    }
    tx.commit()
}

#[cfg(test)]
impl Fault {
    fn open(self, path: &Path, sync: LedgerSync) -> rusqlite::Result<Connection> {
        match self {
            Fault::ReadOnlyFile => Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            ),
            Fault::DiskFull => {
                let conn = open_writer(path, sync)?;
                let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
                conn.pragma_update(None, "max_page_count", pages)?;
                Ok(conn)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ledger::{day_of, Outcome};
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
        while std::fs::metadata(&path).unwrap().len() <= empty
            && std::time::Instant::now() < deadline
        {
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
        let ledger = Arc::new(
            SqliteLedger::open(&dir.path().join("l.sqlite3"), LedgerSync::PowerSafe).unwrap(),
        );
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
            for (i, (client, credits, known)) in
                [("crm", 2, true), ("crm", 0, false), ("ops", 4, true)]
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
            let account =
                [None, Some("a1"), Some("a2"), Some("a3")][usize::try_from(i % 4).unwrap()];
            let action =
                [None, Some("invite"), Some("search")][usize::try_from(i % 5 % 3).unwrap()];
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
            let action =
                [None, Some("invite"), Some("search")][usize::try_from(i % 5 % 3).unwrap()];
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
}
