//! The embedded ledger's side of the shared writer loop (`super::super::writer`): a batch is
//! one transaction on the writer's connection, and around it the work only SQLite has, which
//! the loop calls through the [`Backend`] hooks: the WAL fsynced at least once a second
//! (`crash_safe`) and at flush and close, the journal trimmed once its rows are durable, the
//! aggregates folded from the rows every five seconds, the WAL rewound between two commits,
//! and the file watched (deleted, replaced, truncated, overwritten), after which nothing more
//! is written to it and the rows committed since the last check are kept again.
//!
//! These stay here rather than in the loop because they are about one file on one disk: the
//! PostgreSQL server fsyncs, folds (in the rows' statement) and keeps its own files.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
#[cfg(test)]
use std::sync::PoisonError;
use std::sync::{Arc, TryLockError};
use std::time::Instant;

use rusqlite::Connection;

use super::super::writer::{Backend, Health, Pending};
use super::super::LedgerError;
use super::connect::{no_checkpoint_on_close, open_wal, open_writer};
use super::journal::{self, Journal};
use super::schema::{write_error, write_rows};
#[cfg(test)]
use super::Fault;
use super::{watch, FileState, FOLD_EVERY, SYNC_EVERY, WATCH_EVERY};
use crate::config::LedgerSync;

/// The SQLite side of the writer thread: its connection, the WAL's fsync, the fold into the
/// aggregates, the journal's trim and the file's watch.
pub(super) struct SqliteBackend {
    pub(super) path: PathBuf,
    pub(super) display: String,
    pub(super) sync: LedgerSync,
    /// `None` after a failure: the next attempt opens a fresh connection (a file made
    /// writable again is only seen by a new one).
    pub(super) conn: Option<Connection>,
    /// The highest journal number among the rows whose write failed (kept by the loop, or
    /// dropped from it since).
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
    /// The rows committed since the last fold, grouped as the aggregates are.
    pub(super) tally: super::tally::Tally,
    /// Told after each commit; full means a checkpoint is already due.
    pub(super) wake_checkpointer: SyncSender<()>,
    pub(super) state: Arc<FileState>,
    pub(super) health: Arc<Health>,
    /// The file opened, to notice it deleted, replaced or truncated under the gateway.
    pub(super) watch: Arc<watch::FileWatch>,
    pub(super) checked_at: Instant,
    /// Set when the file was lost (sticky): nothing more is written to it.
    pub(super) lost: Option<LedgerError>,
    /// Without a journal (power_safe, async): the rows committed since the file was last
    /// checked, kept again if the check finds the file lost (they went with it).
    pub(super) unverified: Vec<Pending<Option<u64>>>,
    /// Rows the loop must keep again (the file was lost): handed over by `take_back`.
    pub(super) taken_back: Vec<Pending<Option<u64>>>,
    /// The first journal number past every row this ledger holds: rescued rows are numbered
    /// from here, so a restored copy of this ledger replays them too.
    pub(super) rescue_from: u64,
    #[cfg(test)]
    pub(super) fault: Option<Fault>,
    #[cfg(test)]
    pub(super) fault_generation: u64,
}

impl Backend for SqliteBackend {
    type Tag = Option<u64>;

    fn commit(&mut self, rows: &[Pending<Option<u64>>]) -> Result<(), LedgerError> {
        // The last journal number the rows bring in, counting rows kept and since dropped.
        let through = rows
            .iter()
            .filter_map(|p| p.tag)
            .max()
            .max(self.kept_through.take());
        let committed = self.commit_rows(rows, through);
        if committed.is_err() {
            self.kept_through = through;
        }
        committed
    }

    fn committed(&mut self, rows: Vec<Pending<Option<u64>>>) {
        // Without a journal, rows committed into a file that is then found lost went with it.
        if self.journal.is_none() {
            self.unverified.extend(rows);
        }
    }

    /// Flush and close promise durability: one fsync of the WAL; crash_safe also fsyncs it
    /// once SYNC_EVERY has passed since the last. Journal files whose rows SQLite now holds
    /// durably can go, once the file is checked to be still there and whole: rows committed
    /// into a lost file stay journaled.
    fn settle(
        &mut self,
        committed: Result<(), LedgerError>,
        closing: bool,
        flush: bool,
    ) -> Result<(), LedgerError> {
        let synced = committed.and_then(|()| {
            let due = self.sync == LedgerSync::CrashSafe && self.synced_at.elapsed() >= SYNC_EVERY;
            if self.unsynced && (closing || flush || due) {
                self.sync_wal()
            } else {
                Ok(())
            }
        });
        if synced.is_ok() && !self.unsynced && self.synced_through.is_some() {
            self.check_file();
            if let (Some(journal), None) = (&self.journal, &self.lost) {
                if let Some(through) = self.synced_through.take() {
                    journal.trim(through);
                }
            }
        }
        match &self.lost {
            Some(lost) => Err(lost.clone()),
            None => synced,
        }
    }

    fn after_write(&mut self, closing: bool, asked: bool) {
        if self.unfolded && (closing || asked || self.folded_at.elapsed() >= FOLD_EVERY) {
            self.fold();
        }
    }

    fn tend(&mut self) {
        if self.state.wal_long.swap(false, Ordering::AcqRel) {
            self.rewind_wal();
        }
        if self.lost.is_none() && self.checked_at.elapsed() >= WATCH_EVERY {
            self.check_file();
        }
    }

    /// A WAL to fsync (crash_safe), rows to fold, the file to check.
    fn next_due(&self) -> Option<Instant> {
        let sync = (self.unsynced && self.sync == LedgerSync::CrashSafe)
            .then(|| self.synced_at + SYNC_EVERY);
        let fold = self.unfolded.then(|| self.folded_at + FOLD_EVERY);
        let watch = self.lost.is_none().then(|| self.checked_at + WATCH_EVERY);
        [sync, fold, watch].into_iter().flatten().min()
    }

    fn take_back(&mut self) -> Vec<Pending<Option<u64>>> {
        std::mem::take(&mut self.taken_back)
    }

    /// Closing checkpoints the WAL into the file: not if it is lost. Then the rows it could
    /// not take are saved (`rescue`).
    fn close(&mut self, kept: &mut Vec<Pending<Option<u64>>>) {
        self.check_file();
        let mut rows = std::mem::take(&mut self.taken_back);
        if !rows.is_empty() {
            rows.append(kept);
            *kept = rows;
        }
        if self.lost.is_some() {
            self.rescue(kept);
        }
    }
}

impl SqliteBackend {
    /// One transaction of `rows`, bringing the journal up to `through`.
    fn commit_rows(
        &mut self,
        rows: &[Pending<Option<u64>>],
        through: Option<u64>,
    ) -> Result<(), LedgerError> {
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
        match write_rows(&conn, rows.iter().map(|p| &p.row), through) {
            Ok(()) => {
                if !rows.is_empty() {
                    self.tally
                        .add(rows.iter().map(|p| &p.row), conn.last_insert_rowid());
                }
                if through.is_some() {
                    self.synced_through = through;
                }
                self.conn = Some(conn);
                if self.wal.is_none() {
                    self.wal = open_wal(&self.path).ok();
                }
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

    /// Fold committed rows into the aggregates. A failure leaves the rows unfolded and is
    /// retried at the next fold: the rows are safe either way.
    fn fold(&mut self) {
        if self.lost.is_some() {
            return;
        }
        let Some(conn) = &self.conn else { return };
        match self.tally.fold(conn) {
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

    /// [`SqliteBackend::check_file`], comparing the size with the header only if `no_checkpoint`
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
        // Every row not known to be in a sound file is kept again, first.
        let mut rows = std::mem::take(&mut self.unverified);
        rows.append(&mut self.taken_back);
        self.taken_back = rows;
        let kept_where = if self.journal.is_some() {
            "they are in the journal beside it"
        } else {
            "they are written to a journal file beside it when the gateway stops"
        };
        tracing::error!(
            path = %self.display,
            reason = problem.reason(),
            detail = %detail,
            rows_waiting = self.health.rows_waiting() + self.taken_back.len(),
            "ledger file {} under the running gateway ({detail}): requests that cost credits \
             are refused and /readyz is not ready; rows are not written to it any more \
             ({kept_where}, and the next start writes them into the ledger it opens). Restore \
             the file from a backup and restart the gateway, or restart it to start a new ledger",
            problem.what()
        );
        self.health.fail(error.clone());
        self.lost = Some(error);
    }

    /// Closing with a lost file and no journal (power_safe, async): the rows it could not
    /// write go to a journal file beside the ledger, which the next start replays into
    /// whichever ledger it opens (numbered past every row this ledger ever held).
    fn rescue(&self, kept: &mut Vec<Pending<Option<u64>>>) {
        if self.journal.is_some() || kept.is_empty() {
            return;
        }
        let mut lines = Vec::new();
        let mut ends = Vec::with_capacity(kept.len());
        for p in kept.iter() {
            journal::encode(&p.row, &mut lines);
            ends.push(lines.len());
        }
        let written = Journal::start(&self.path, self.rescue_from)
            .and_then(|j| j.append_many(&lines, &ends, |_, _| {}));
        match written {
            Ok(()) => {
                tracing::warn!(
                    path = %self.display,
                    rows = kept.len(),
                    "wrote the ledger rows the lost file could not take to a journal file beside it: the next start writes them into the ledger it opens"
                );
                kept.clear();
            }
            Err(e) => tracing::error!(
                path = %self.display,
                rows = kept.len(),
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
}
