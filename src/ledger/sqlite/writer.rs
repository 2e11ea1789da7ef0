//! The embedded ledger's writer thread.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
#[cfg(test)]
use std::sync::PoisonError;
use std::sync::{Arc, TryLockError};
use std::time::Instant;

use rusqlite::Connection;

use super::super::journal::{self, Journal};
use super::super::{LedgerError, Row};
use super::connect::{no_checkpoint_on_close, open_wal, open_writer};
use super::schema::{fold, write_error, write_rows};
#[cfg(test)]
use super::Fault;
use super::*;
use crate::config::LedgerSync;

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) display: String,
    pub(super) sync: LedgerSync,
    /// `None` after a failure: the next attempt opens a fresh connection (a file made
    /// writable again is only seen by a new one).
    pub(super) conn: Option<Connection>,
    /// Rows whose write failed, oldest first; written before the next batch.
    pub(super) kept: Vec<Row>,
    /// The highest journal number among the kept rows.
    pub(super) kept_through: Option<u64>,
    pub(super) journal: Option<Arc<Journal>>,
    /// Committed with `synchronous = NORMAL` since the WAL was last fsynced.
    pub(super) unsynced: bool,
    /// The last journal number committed since the journal was last trimmed.
    pub(super) synced_through: Option<u64>,
    pub(super) synced_at: Instant,
    /// The WAL, held open for its fsync: opening it every second fails exactly when the
    /// process is short of descriptors (thousands of connections), which is no time to stop
    /// writing the ledger. Dropped with the connection, and on any error.
    pub(super) wal: Option<std::fs::File>,
    /// Rows committed since the last fold into the aggregates.
    pub(super) unfolded: bool,
    pub(super) folded_at: Instant,
    /// Told after each commit; full means a checkpoint is already due.
    pub(super) wake_checkpointer: SyncSender<()>,
    pub(super) state: Arc<WriterState>,
    /// The file opened, to notice it deleted, replaced or truncated under the gateway.
    pub(super) watch: Arc<watch::FileWatch>,
    pub(super) checked_at: Instant,
    /// Set when the file was lost (sticky): nothing more is written to it.
    pub(super) lost: Option<LedgerError>,
    /// Without a journal (power_safe, async): the rows committed since the file was last
    /// checked, kept again if the check finds the file lost (they went with it).
    pub(super) unverified: Vec<Row>,
    /// The first journal number past every row this ledger holds: rescued rows are numbered
    /// from here, so a restored copy of this ledger replays them too.
    pub(super) rescue_from: u64,
    #[cfg(test)]
    pub(super) fault: Option<Fault>,
    #[cfg(test)]
    pub(super) fault_generation: u64,
}

impl Writer {
    pub(super) fn run(mut self, commands: Receiver<Command>) {
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
