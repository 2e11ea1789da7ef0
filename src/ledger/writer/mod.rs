//! The ledger's one writer loop, shared by SQLite and PostgreSQL: a thread of its own fed by a
//! channel, batching (group commit), keeping and retrying rows whose write failed (with
//! back-off), the health the handle reports (`/readyz`, metrics), and the flush when the
//! ledger is dropped. A backend ([`Backend`]) brings only what differs: how one batch is
//! committed (schema, SQL, connections), and, for SQLite, what happens around a commit (WAL
//! fsync, folding the aggregates, checkpoints, watching the file).
//!
//! One turn of the loop: block for the first command (or until a retry or the backend's own
//! work is due); take everything queued meanwhile, up to [`Policy::max_batch`] commands (after
//! a short gather, or within a commit window under concurrency, if the policy says so);
//! commit the rows kept from failed writes first, then the new ones, in transactions of at
//! most [`Policy::max_rows`]; publish the health; answer the callers; let the backend settle.
//!
//! A failed commit answers its waiting callers with the error (the credits layer then fails
//! closed for costly requests), keeps the rows (the upstream may have charged for them; at
//! most [`Policy::max_kept`], the oldest dropped beyond) and retries them with the next batch
//! or once the back-off has passed. With [`Policy::defer`], rows arriving while it backs off
//! are kept at once and their callers answered with the current error, without a new attempt.
//! Closing (the channel closed by [`Handle::close`]) writes what is queued and kept, retrying
//! for up to [`Policy::close_grace`], and logs what it could not write.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::oneshot;

use super::{LedgerError, Row};
use crate::util::BoxFuture;

/// How a caller waiting for its row, or for a flush, is answered.
pub(super) type Reply = oneshot::Sender<Result<(), LedgerError>>;

/// A row on its way to the database.
pub(super) struct Pending<T> {
    /// What the backend needs to write the row exactly once: SQLite's journal number,
    /// PostgreSQL's `row_uid`.
    pub(super) tag: T,
    pub(super) row: Row,
    /// `None` when nobody waits for the commit, and once the caller has been answered.
    pub(super) done: Option<Reply>,
}

pub(super) enum Command<T> {
    Record(Pending<T>),
    /// Answered once every row recorded before it is durable (or with why not).
    Flush(Reply),
    /// Answered once the committed rows are folded into the aggregates, for a backend that
    /// folds them after the commit (SQLite); at once otherwise.
    Fold(SyncSender<()>),
}

/// Where the ledger lives, as its logs name it: a file (`path`) or a database (`target_db`,
/// the URL without its password).
#[derive(Clone)]
pub(super) enum Place {
    File(String),
    Database(String),
}

impl Place {
    pub(super) fn display(&self) -> &str {
        match self {
            Place::File(d) | Place::Database(d) => d,
        }
    }
}

/// A log line naming the ledger under the field its backend has always used.
macro_rules! say {
    ($level:ident, $place:expr, $($rest:tt)*) => {
        match $place {
            Place::File(path) => tracing::$level!(path = %path, $($rest)*),
            Place::Database(target_db) => tracing::$level!(target_db = %target_db, $($rest)*),
        }
    };
}

/// What the writer publishes to the handle: read by `/readyz`, metrics and the credits layer.
#[derive(Default)]
pub(super) struct Health {
    commits: AtomicU64,
    /// Rows accepted and not committed yet (queued or kept), when the backend bounds them
    /// ([`Policy::bounded`], PostgreSQL's `buffer_rows`).
    pending: AtomicUsize,
    kept: AtomicUsize,
    lost: AtomicU64,
    /// The last write's error while rows wait for a retry (or the backend's sticky one).
    error: Mutex<Option<LedgerError>>,
    /// `error` is set: read on every journaled record without taking the lock.
    failing: AtomicBool,
}

impl Health {
    pub(super) fn error(&self) -> MutexGuard<'_, Option<LedgerError>> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last write failed (one atomic load); [`Health::error`] says why.
    pub(super) fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// A failure that stays until a restart (SQLite's lost file): set before the writer's
    /// next [`Health`] update, which keeps it as long as writes fail with it.
    pub(super) fn fail(&self, error: LedgerError) {
        *self.error() = Some(error);
        self.failing.store(true, Ordering::Release);
    }

    /// Transactions committed so far: with group commit, far fewer than rows.
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Rows whose write failed and that wait for a retry.
    pub(super) fn rows_waiting(&self) -> usize {
        self.kept.load(Ordering::Relaxed)
    }

    /// Rows dropped: beyond [`Policy::max_kept`], or not written when the ledger closed.
    pub(super) fn rows_lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Count a row against `limit` rows accepted and not committed, or refuse it.
    pub(super) fn admit(&self, limit: usize, path: &str) -> Result<(), LedgerError> {
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(LedgerError::BufferFull {
                path: path.to_string(),
                rows: before,
            });
        }
        Ok(())
    }

    /// An admitted row that never reached the writer.
    pub(super) fn release(&self, rows: usize) {
        self.pending.fetch_sub(rows, Ordering::AcqRel);
    }
}

/// The timing and bounds of one backend's writer.
#[derive(Clone, Copy)]
pub(super) struct Policy {
    /// Most commands one turn takes: bounds the latency of the first waiter in a batch.
    pub(super) max_batch: usize,
    /// Most rows one transaction takes (a long retry after an outage is split).
    pub(super) max_rows: usize,
    /// Nobody waits for a commit: after the first row, let rows gather this long, so one
    /// commit, and one wake-up of the thread, serves many.
    pub(super) gather: Option<Duration>,
    /// `(window, busy)`: when the previous batch held at least `busy` commands, wait up to
    /// `window` for more before committing (PostgreSQL's `commit_delay`).
    pub(super) commit_window: Option<(Duration, usize)>,
    /// The first pause before kept rows are retried, doubled after each failure up to
    /// `backoff_max`.
    pub(super) backoff_first: Duration,
    pub(super) backoff_max: Duration,
    /// While backing off, keep new rows and answer their callers with the error at once.
    pub(super) defer: bool,
    /// Most rows kept for retry; beyond, the oldest are dropped (and logged).
    pub(super) max_kept: Option<usize>,
    /// How long closing keeps retrying rows it could not write yet.
    pub(super) close_grace: Duration,
    /// Rows are counted against a limit by [`Health::admit`] and released once committed.
    pub(super) bounded: bool,
}

impl Policy {
    /// The pauses before kept rows are retried: `backoff_first`, doubled after each failure
    /// up to `backoff_max`, without jitter (one writer per process, nothing to spread) and
    /// without end.
    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.backoff_first)
            .with_max_delay(self.backoff_max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }
}

/// What a backend brings to the loop. Only `commit` is required; the rest are the hooks the
/// SQLite backend needs around a commit.
pub(super) trait Backend: Send + 'static {
    type Tag: Send + 'static;

    /// Write `rows` in one transaction, all or none. Called with at most
    /// [`Policy::max_rows`] rows, oldest first.
    fn commit(&mut self, rows: &[Pending<Self::Tag>]) -> Result<(), LedgerError>;

    /// Rows just committed, their waiters taken (answered once the health is published).
    fn committed(&mut self, _rows: Vec<Pending<Self::Tag>>) {}

    /// After a turn's commits: make them durable if due (`closing`, a flush was asked). The
    /// result answers the flushes and is the health published.
    fn settle(
        &mut self,
        committed: Result<(), LedgerError>,
        _closing: bool,
        _flush: bool,
    ) -> Result<(), LedgerError> {
        committed
    }

    /// After the turn's callers are answered, before its flushes and folds are: `asked` when
    /// one of them was.
    fn after_write(&mut self, _closing: bool, _asked: bool) {}

    /// At the end of every turn.
    fn tend(&mut self) {}

    /// When the loop must wake without a command for the backend's own work.
    fn next_due(&self) -> Option<Instant> {
        None
    }

    /// Rows once committed that turned out not to be durable (SQLite: committed into a file
    /// since lost): they are kept again, first.
    fn take_back(&mut self) -> Vec<Pending<Self::Tag>> {
        Vec::new()
    }

    /// Closing with `kept` rows still unwritten: the backend's last chance to save them.
    fn close(&mut self, _kept: &mut Vec<Pending<Self::Tag>>) {}
}

/// The ledger's end of its writer: the channel, the thread and its health.
pub(super) struct Handle<T> {
    /// `None` once closing: closing the channel tells the writer to finish.
    commands: Option<Sender<Command<T>>>,
    thread: Option<JoinHandle<()>>,
    health: Arc<Health>,
    place: Place,
}

/// Start a writer thread named `name` that builds its backend with `make` (on the thread:
/// PostgreSQL's blocking client connects there, never on a runtime thread), and wait until it
/// has. The health is shared with the backend.
pub(super) fn spawn<B, F>(
    name: &str,
    place: Place,
    policy: Policy,
    make: F,
) -> Result<Handle<B::Tag>, String>
where
    B: Backend,
    F: FnOnce(Arc<Health>) -> Result<B, String> + Send + 'static,
{
    let health = Arc::new(Health::default());
    let (commands, rx) = mpsc::channel();
    let (ready_tx, ready) = mpsc::sync_channel(1);
    let writer_health = health.clone();
    let writer_place = place.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let backend = match make(writer_health.clone()) {
                Ok(backend) => backend,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            Writer {
                backend,
                policy,
                health: writer_health,
                place: writer_place,
                kept: Vec::new(),
                backoff: policy.backoff(),
                retry_at: None,
            }
            .run(rx);
        })
        .map_err(|e| format!("cannot start the writer thread: {e}"))?;
    let opened = ready
        .recv()
        .unwrap_or_else(|_| Err("the writer thread stopped while opening".into()));
    if let Err(reason) = opened {
        let _ = thread.join();
        return Err(reason);
    }
    Ok(Handle {
        commands: Some(commands),
        thread: Some(thread),
        health,
        place,
    })
}

impl<T: Send + 'static> Handle<T> {
    pub(super) fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Another sender into the writer's channel (SQLite's per-worker journal batches).
    pub(super) fn sender(&self) -> Option<Sender<Command<T>>> {
        self.commands.clone()
    }

    pub(super) fn send(&self, command: Command<T>) -> Result<(), LedgerError> {
        self.commands
            .as_ref()
            .ok_or(LedgerError::WriterGone)?
            .send(command)
            .map_err(|_| LedgerError::WriterGone)
    }

    /// Queue a row; with `wait`, the future resolves once its commit does.
    pub(super) fn record(
        &self,
        tag: T,
        row: Row,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), LedgerError>>>, LedgerError> {
        let (done, answer) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.send(Command::Record(Pending { tag, row, done }))?;
        Ok(answer)
    }

    pub(super) fn flush(&self) -> BoxFuture<Result<(), LedgerError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.send(Command::Flush(tx)) {
            return Box::pin(std::future::ready(Err(e)));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(LedgerError::WriterGone)) })
    }
}

/// The answer to a recorded row: at once, or once its commit is.
pub(super) fn answer(
    recorded: Result<Option<oneshot::Receiver<Result<(), LedgerError>>>, LedgerError>,
) -> BoxFuture<Result<(), LedgerError>> {
    match recorded {
        Err(e) => Box::pin(std::future::ready(Err(e))),
        Ok(None) => Box::pin(std::future::ready(Ok(()))),
        Ok(Some(rx)) => Box::pin(async move { rx.await.unwrap_or(Err(LedgerError::WriterGone)) }),
    }
}

impl<T> Handle<T> {
    /// Close the channel and wait for the writer to write what is queued and return.
    pub(super) fn close(&mut self) {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                say!(error, &self.place, "the ledger writer thread panicked");
            }
        }
    }
}

impl<T> Drop for Handle<T> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's state.
struct Writer<B: Backend> {
    backend: B,
    policy: Policy,
    health: Arc<Health>,
    place: Place,
    /// Rows whose write failed, oldest first, their callers answered; written first.
    kept: Vec<Pending<B::Tag>>,
    /// The pauses between retries of kept rows; started afresh after a commit.
    backoff: ExponentialBackoff,
    /// While rows are kept: when to try again.
    retry_at: Option<Instant>,
}

impl<B: Backend> Writer<B> {
    fn run(mut self, commands: Receiver<Command<B::Tag>>) {
        let mut batch = Vec::new();
        let mut last_batch = 0usize;
        loop {
            // Block for the first command; with rows to retry or backend work due, only
            // until then.
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
            let window_ends = self
                .policy
                .commit_window
                .filter(|(_, busy)| last_batch >= *busy)
                .map(|(window, _)| Instant::now() + window);
            if let Some(gather) = self.policy.gather {
                if !closing && matches!(batch.first(), Some(Command::Record(_))) {
                    std::thread::sleep(gather);
                }
            }
            while !closing && batch.len() < self.policy.max_batch {
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
            if closing {
                self.close(&mut batch);
                return;
            }
            match self.retry_at {
                // Still backing off: keep the new rows and answer their callers at once.
                Some(at) if self.policy.defer && Instant::now() < at => self.defer(&mut batch),
                _ => self.write(&mut batch, false),
            }
            self.backend.tend();
            self.reclaim();
        }
    }

    /// When the loop must wake without a command: rows to retry, backend work.
    fn next_due(&self) -> Option<Instant> {
        let retry = (!self.kept.is_empty()).then(|| {
            self.retry_at
                .unwrap_or_else(|| Instant::now() + self.policy.backoff_first)
        });
        [retry, self.backend.next_due()].into_iter().flatten().min()
    }

    /// Write what is queued and kept; while writes keep failing, retry until the close grace
    /// has passed; then give the backend its last chance, and log the rows not written.
    fn close(&mut self, batch: &mut Vec<Command<B::Tag>>) {
        let give_up = Instant::now() + self.policy.close_grace;
        self.write(batch, true);
        while !self.kept.is_empty() && Instant::now() < give_up {
            let at = self.retry_at.unwrap_or_else(Instant::now).min(give_up);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            self.write(batch, true);
        }
        self.backend.tend();
        self.reclaim();
        self.backend.close(&mut self.kept);
        self.health.kept.store(self.kept.len(), Ordering::Relaxed);
        let lost = self.kept.len();
        if lost > 0 {
            self.health.lost.fetch_add(lost as u64, Ordering::Relaxed);
            say!(
                error,
                &self.place,
                rows = lost,
                "ledger closed with rows it could not write"
            );
        }
    }

    fn defer(&mut self, batch: &mut Vec<Command<B::Tag>>) {
        let error = self
            .health
            .error()
            .clone()
            .unwrap_or_else(|| LedgerError::Write {
                path: self.place.display().to_string(),
                detail: "the server is unreachable".into(),
            });
        for command in batch.drain(..) {
            match command {
                Command::Record(mut p) => {
                    if let Some(done) = p.done.take() {
                        let _ = done.send(Err(error.clone()));
                    }
                    self.kept.push(p);
                }
                Command::Flush(done) => {
                    let _ = done.send(Err(error.clone()));
                }
                Command::Fold(done) => {
                    let _ = done.send(());
                }
            }
        }
        self.health.kept.store(self.kept.len(), Ordering::Relaxed);
    }

    fn write(&mut self, batch: &mut Vec<Command<B::Tag>>, closing: bool) {
        let mut rows = std::mem::take(&mut self.kept);
        let mut flushes = Vec::new();
        let mut folds = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Record(p) => rows.push(p),
                Command::Flush(done) => flushes.push(done),
                Command::Fold(done) => folds.push(done),
            }
        }
        let mut answered = Vec::new();
        let committed = self.commit_all(&mut rows, &mut answered);
        match &committed {
            Ok(()) => {
                self.backoff = self.policy.backoff();
                self.retry_at = None;
            }
            Err(_) => {
                // Rows the backend just took back (a lost file) come first.
                let mut all = self.backend.take_back();
                all.append(&mut rows);
                self.keep(all);
                // Unbounded in count: kept rows are retried until written.
                let pause = self.backoff.next().unwrap_or(self.policy.backoff_max);
                self.retry_at = Some(Instant::now() + pause);
            }
        }
        let synced = self
            .backend
            .settle(committed.clone(), closing, !flushes.is_empty());
        self.reclaim();
        // Publish the health before answering, so a caller that sees an error sees it here
        // too.
        self.note(&synced);
        for done in answered {
            let _ = done.send(Ok(()));
        }
        if let Err(e) = &committed {
            for p in &mut self.kept {
                if let Some(done) = p.done.take() {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
        self.backend
            .after_write(closing, !flushes.is_empty() || !folds.is_empty());
        for done in flushes {
            let _ = done.send(synced.clone());
        }
        for done in folds {
            let _ = done.send(());
        }
    }

    /// Commit `rows` in transactions of at most [`Policy::max_rows`], collecting the waiters
    /// of each one committed. On failure, `rows` holds the rows not committed.
    fn commit_all(
        &mut self,
        rows: &mut Vec<Pending<B::Tag>>,
        answered: &mut Vec<Reply>,
    ) -> Result<(), LedgerError> {
        while !rows.is_empty() {
            let n = rows.len().min(self.policy.max_rows);
            self.backend.commit(&rows[..n])?;
            self.health.commits.fetch_add(1, Ordering::Relaxed);
            if self.policy.bounded {
                self.health.release(n);
            }
            let mut done = if n == rows.len() {
                std::mem::take(rows)
            } else {
                rows.drain(..n).collect()
            };
            answered.extend(done.iter_mut().filter_map(|p| p.done.take()));
            self.backend.committed(done);
        }
        Ok(())
    }

    /// Keep the rows the backend took back, before the others.
    fn reclaim(&mut self) {
        let mut back = self.backend.take_back();
        if back.is_empty() {
            return;
        }
        back.append(&mut self.kept);
        self.keep(back);
    }

    fn keep(&mut self, mut rows: Vec<Pending<B::Tag>>) {
        if let Some(max) = self.policy.max_kept.filter(|max| rows.len() > *max) {
            let lost = rows.len() - max;
            rows.drain(..lost);
            self.health.lost.fetch_add(lost as u64, Ordering::Relaxed);
            say!(
                error,
                &self.place,
                rows = lost,
                "ledger writes have failed for too long: dropped the oldest unwritten rows"
            );
        }
        self.health.kept.store(rows.len(), Ordering::Relaxed);
        self.kept = rows;
    }

    /// Publish the writer's health and log its changes, once each.
    fn note(&self, result: &Result<(), LedgerError>) {
        let mut error = self.health.error();
        match result {
            Ok(()) => {
                self.health.kept.store(self.kept.len(), Ordering::Relaxed);
                if self.kept.is_empty() && error.take().is_some() {
                    say!(info, &self.place, "ledger writes recovered");
                }
            }
            Err(e) => {
                if error.is_none() {
                    say!(
                        error,
                        &self.place,
                        error = %e,
                        rows_waiting = self.kept.len(),
                        "ledger write failed; keeping the rows and retrying"
                    );
                }
                *error = Some(e.clone());
            }
        }
        self.health
            .failing
            .store(error.is_some(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
