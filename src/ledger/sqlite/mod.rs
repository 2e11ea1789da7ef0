//! The embedded ledger: one SQLite file in WAL mode.
//!
//! Writes go through the ledger's one writer loop (`super::writer`: a thread fed by a channel,
//! batching, retries, health, flush on drop), with [`policy`] as its settings and
//! `backend::SqliteBackend` as what it calls. It drains everything queued into one
//! transaction (group commit) that appends the rows and nothing else. The aggregates
//! (`usage_daily`, and its roll-ups without the account by day and by month) are folded from
//! the rows every five seconds, and before every read of them, in a transaction of their own
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
//!
//! The room: this file is the handle ([`SqliteLedger`]: open, record, reads, drop);
//! `backend` the writer's side of a commit; `schema` the migrations and SQL; `connect` the
//! connections, the WAL file and the lock; `checkpoint` the checkpoint thread; `journal` the
//! crash_safe row journal and `group` its appends grouped per worker; `watch` the file's
//! identity; `tests` the tests.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use time::Date;

use super::plan::{page_keys, usage_row, usage_sql, Dialect};
use super::to_u64;
use super::writer::{self, Handle, Health, Pending, Place, Policy};
use super::{day_key, Ledger, LedgerError, Row, UsagePage, UsageQuery};
use crate::config::LedgerSync;
use crate::util::BoxFuture;
use backend::SqliteBackend;
use checkpoint::run_checkpoints;
use connect::{
    lock, no_checkpoint_on_close, open_checkpointer, open_reader, open_wal, open_writer,
};
use journal::Journal;
use schema::{fold, migrate, replay_journal};

mod backend;
mod checkpoint;
mod connect;
mod group;
mod journal;
mod schema;
mod tally;
#[cfg(test)]
mod tests;
mod watch;

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
/// before any read of them. A fold upserts every key its rows touch: with thousands of
/// accounts at work each second, folding every second re-upserted nearly the same keys each
/// time (the writer's CPU per request 3.8 → 2.2 µs at 5 s, `benches/load.sh`, BENCHMARKS.md).
const FOLD_EVERY: Duration = Duration::from_secs(5);
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

/// The shared writer loop's settings here: rows gather for [`GATHER`] where nobody waits for
/// a commit (crash_safe, async); under concurrency power_safe waits [`COMMIT_WINDOW`] for more;
/// kept rows are retried with every batch, or after [`RETRY_EVERY`] when none comes; at most
/// [`MAX_KEPT`] of them; one transaction per batch; no grace at close (the rows left are in the
/// journal, or saved to one when the file was lost).
fn policy(sync: LedgerSync) -> Policy {
    Policy {
        max_batch: MAX_BATCH,
        max_rows: usize::MAX,
        gather: (sync != LedgerSync::PowerSafe).then_some(GATHER),
        commit_window: (sync == LedgerSync::PowerSafe).then_some((COMMIT_WINDOW, BUSY_BATCH)),
        backoff_first: RETRY_EVERY,
        backoff_max: RETRY_EVERY,
        defer: false,
        max_kept: Some(MAX_KEPT),
        close_grace: Duration::ZERO,
        bounded: false,
    }
}

/// The embedded ledger. Dropping it writes what is queued, fsyncs, and joins the writer.
pub struct SqliteLedger {
    path: PathBuf,
    display: String,
    sync: LedgerSync,
    /// `None` when read-only, and once dropping has closed it.
    writer: Option<Handle<Option<u64>>>,
    health: Arc<Health>,
    checkpointer: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    state: Arc<FileState>,
    /// crash_safe: callers append their rows here (see `journal`).
    journal: Option<Arc<Journal>>,
    /// crash_safe on a data-plane worker: rows appended a batch per turn of its loop.
    group: Option<Arc<group::Sink>>,
    /// The exclusive lock on `<ledger>.lock`, held while this ledger is open.
    _lock: Option<File>,
}

/// A row on its way to the writer carries its journal number (crash_safe).
type Command = writer::Command<Option<u64>>;

#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Open the file read-only, as SQLite does when the file is not writable.
    ReadOnlyFile,
    /// Cap the file at its current size: the next page it needs fails with SQLITE_FULL.
    DiskFull,
}

/// What the writer, the checkpointer and the handle share about the file (the loop's own
/// health is in [`Health`]).
#[derive(Default)]
struct FileState {
    /// Set by the checkpointer when the WAL is long: the writer rewinds it between commits.
    wal_long: AtomicBool,
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

impl FileState {
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
        let state = Arc::new(FileState::default());
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

        let tally = tally::Tally::start(&conn);
        let backend = SqliteBackend {
            path: path.to_path_buf(),
            display: display.clone(),
            sync,
            conn: Some(conn),
            kept_through: None,
            journal: journal.clone(),
            unsynced: false,
            synced_through: None,
            synced_at: Instant::now(),
            // Held from the start, while descriptors are plentiful.
            wal: open_wal(path).ok(),
            unfolded: false,
            folded_at: Instant::now(),
            tally,
            wake_checkpointer,
            state: state.clone(),
            health: Arc::default(),
            watch: file_watch,
            checked_at: Instant::now(),
            lost: None,
            unverified: Vec::new(),
            taken_back: Vec::new(),
            rescue_from: next,
            #[cfg(test)]
            fault: None,
            #[cfg(test)]
            fault_generation: 0,
        };
        let writer = writer::spawn(
            "ledger-writer",
            Place::File(display.clone()),
            policy(sync),
            move |health| Ok(SqliteBackend { health, ..backend }),
        )
        .map_err(&fail)?;
        let health = writer.health().clone();
        let group = match (&journal, writer.sender()) {
            (Some(j), Some(commands)) => Some(Arc::new(group::Sink::new(
                j.clone(),
                commands,
                health.clone(),
                path.to_path_buf(),
            ))),
            _ => None,
        };
        Ok(SqliteLedger {
            path: path.to_path_buf(),
            display,
            sync,
            writer: Some(writer),
            health,
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
    /// five seconds (`FOLD_EVERY`), which the writer folds in.
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
            writer: None,
            health: Arc::default(),
            checkpointer: None,
            reader: Mutex::new(reader),
            state: Arc::new(FileState::default()),
            journal: None,
            group: None,
            _lock: None,
        })
    }

    /// Transactions committed so far: with group commit, far fewer than rows.
    pub fn commits(&self) -> u64 {
        self.health.commits()
    }

    /// Rows whose write failed and that wait for a retry.
    pub fn rows_waiting(&self) -> usize {
        self.health.rows_waiting()
    }

    /// Rows dropped because writes kept failing while more than 100,000 rows waited.
    pub fn rows_lost(&self) -> u64 {
        self.health.rows_lost()
    }

    fn send(&self, command: Command) -> Result<(), LedgerError> {
        self.writer
            .as_ref()
            .ok_or(LedgerError::WriterGone)?
            .send(command)
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
                    sent = self.send(Command::Record(Pending {
                        tag: Some(seq),
                        row,
                        done: None,
                    }));
                });
                LINE.set(line);
                r
            });
            let result = match appended {
                Err(e) => Err(journal::write_error(&self.path, &e)),
                // While SQLite cannot be written, costly requests fail closed, as in the
                // other modes (the row itself is journaled and kept).
                Ok(()) => sent.and_then(|()| {
                    if !self.health.failing() {
                        return Ok(());
                    }
                    self.health.error().clone().map_or(Ok(()), Err)
                }),
            };
            return Box::pin(std::future::ready(result));
        }
        let Some(writer) = &self.writer else {
            return Box::pin(std::future::ready(Err(LedgerError::WriterGone)));
        };
        writer::answer(writer.record(None, row, self.sync == LedgerSync::PowerSafe))
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
        let Some((by, after)) = page_keys(q, after) else {
            return Ok(UsagePage {
                rows: Vec::new(),
                next: None,
            });
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
        match &self.writer {
            Some(writer) => writer.flush(),
            None => Box::pin(std::future::ready(Err(LedgerError::WriterGone))),
        }
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
        self.health.error().clone()
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
        if let Some(mut writer) = self.writer.take() {
            writer.close();
        }
        // Every journaled row is in SQLite (and fsynced) once the writer closed with nothing
        // kept: the journal files can go.
        if let Some(journal) = &self.journal {
            if self.health.rows_waiting() == 0 && self.health.error().is_none() {
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
