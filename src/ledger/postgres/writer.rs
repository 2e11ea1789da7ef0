//! The fleet ledger's writer thread.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::error::SqlState;

use super::connect::Target;
use super::schema::{write_rows, Conn};
use super::*;

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) target: Target,
    /// `None` after a failure: the next attempt connects afresh.
    pub(super) conn: Option<Conn>,
    /// Rows whose write failed, oldest first, their callers answered; written first.
    pub(super) kept: Vec<Pending>,
    pub(super) backoff: Duration,
    /// While rows are kept: when to try again.
    pub(super) retry_at: Option<Instant>,
    pub(super) state: Arc<WriterState>,
}

impl Writer {
    pub(super) fn run(mut self, commands: Receiver<Command>) {
        let mut batch = Vec::new();
        loop {
            let first = match self.retry_at {
                None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => commands.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let mut closing = false;
            match first {
                Ok(command) => batch.push(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = true,
            }
            // Group commit: everything that queued up meanwhile joins this transaction.
            while !closing && batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => closing = true,
                }
            }
            if closing {
                self.close(&mut batch);
                return;
            }
            match self.retry_at {
                // Still backing off: keep the new rows and answer their callers at once.
                Some(at) if Instant::now() < at => self.defer(&mut batch),
                _ => self.write(&mut batch),
            }
        }
    }

    /// Write what is queued and kept; while the server stays unreachable, retry until
    /// [`CLOSE_GRACE`] has passed, then give up on the rows (logged).
    fn close(&mut self, batch: &mut Vec<Command>) {
        let give_up = Instant::now() + CLOSE_GRACE;
        self.write(batch);
        while !self.kept.is_empty() && Instant::now() < give_up {
            let at = self.retry_at.unwrap_or_else(Instant::now).min(give_up);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            self.write(batch);
        }
        let lost = self.kept.len();
        if lost > 0 {
            self.state.lost.fetch_add(lost as u64, Ordering::Relaxed);
            tracing::error!(
                target_db = %self.target.display,
                rows = lost,
                "ledger closed with rows it could not write"
            );
        }
    }

    fn current_error(&self) -> LedgerError {
        self.state
            .error()
            .clone()
            .unwrap_or_else(|| LedgerError::Write {
                path: self.target.display.clone(),
                detail: "the server is unreachable".into(),
            })
    }

    fn defer(&mut self, batch: &mut Vec<Command>) {
        let error = self.current_error();
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
            }
        }
        self.state.kept.store(self.kept.len(), Ordering::Relaxed);
    }

    fn write(&mut self, batch: &mut Vec<Command>) {
        let mut rows = std::mem::take(&mut self.kept);
        let mut flushes = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Record(p) => rows.push(p),
                Command::Flush(done) => flushes.push(done),
            }
        }
        let result = self.commit_all(&mut rows);
        match &result {
            Ok(()) => {
                self.backoff = BACKOFF_FIRST;
                self.retry_at = None;
            }
            Err(e) => {
                for p in &mut rows {
                    if let Some(done) = p.done.take() {
                        let _ = done.send(Err(e.clone()));
                    }
                }
                self.kept = rows;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
        self.note(&result);
        for done in flushes {
            let _ = done.send(result.clone());
        }
    }

    /// Commit `rows` in transactions of at most [`MAX_BATCH`], answering each one's callers
    /// once it has committed. On failure, `rows` holds the rows not committed.
    fn commit_all(&mut self, rows: &mut Vec<Pending>) -> Result<(), LedgerError> {
        let mut start = 0;
        while start < rows.len() {
            let end = rows.len().min(start + MAX_BATCH);
            if let Err(e) = self.commit(&rows[start..end]) {
                rows.drain(..start);
                return Err(e);
            }
            for p in &mut rows[start..end] {
                if let Some(done) = p.done.take() {
                    let _ = done.send(Ok(()));
                }
            }
            self.state.pending.fetch_sub(end - start, Ordering::AcqRel);
            start = end;
        }
        rows.clear();
        Ok(())
    }

    /// One transaction. A failure on a reused connection is retried once on a fresh one (the
    /// server may have restarted while we were idle); a lost deadlock or serialization conflict is
    /// retried a few times. Rows already inserted by a commit whose acknowledgement was lost
    /// are skipped by their `row_uid`.
    fn commit(&mut self, rows: &[Pending]) -> Result<(), LedgerError> {
        let mut fresh_retry = true;
        let mut conflicts = 0;
        loop {
            let reused = self.conn.is_some();
            let mut conn = match self.conn.take() {
                Some(conn) => conn,
                None => self
                    .target
                    .connect()
                    .and_then(Conn::prepare)
                    .map_err(|e| self.target.write_error(&e))?,
            };
            match write_rows(&mut conn, rows) {
                Ok(()) => {
                    self.conn = Some(conn);
                    self.state.commits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    let conflict = matches!(
                        e.code(),
                        Some(&SqlState::T_R_DEADLOCK_DETECTED)
                            | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                    );
                    if conflict && conflicts < CONFLICT_RETRIES {
                        conflicts += 1;
                        self.conn = Some(conn);
                        continue;
                    }
                    // Otherwise the connection is dropped. One that had been idle may have
                    // died with a server restart: try once more on a fresh one at once.
                    if reused && fresh_retry {
                        fresh_retry = false;
                        continue;
                    }
                    return Err(self.target.write_error(&e));
                }
            }
        }
    }

    /// Publish the writer's health and log its changes, once each.
    fn note(&self, result: &Result<(), LedgerError>) {
        self.state.kept.store(self.kept.len(), Ordering::Relaxed);
        let mut error = self.state.error();
        match result {
            Ok(()) => {
                if error.take().is_some() {
                    tracing::info!(target_db = %self.target.display, "ledger writes recovered");
                }
            }
            Err(e) => {
                if error.is_none() {
                    tracing::error!(
                        target_db = %self.target.display,
                        error = %e,
                        rows_waiting = self.kept.len(),
                        "ledger write failed; keeping the rows and retrying"
                    );
                }
                *error = Some(e.clone());
            }
        }
    }
}
