//! The checkpoint thread: copies committed WAL frames into the database file beside the
//! writer, so a caller's commit never waits for a checkpoint.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use rusqlite::Connection;

use super::connect::no_checkpoint_on_close;
use super::{watch, FileState, CHECKPOINT_EVERY, WAL_REWIND_FRAMES};

/// Copy committed WAL frames into the database file, beside the writer: a passive checkpoint
/// takes no lock that a commit needs, so its two fsyncs never delay a caller's row. Runs after
/// a commit, at most once per [`CHECKPOINT_EVERY`]; returns when the writer has gone.
pub(super) fn run_checkpoints(
    conn: Connection,
    wake: Receiver<()>,
    path: &str,
    state: &FileState,
    watch: &watch::FileWatch,
) {
    checkpoint_until_closed(&conn, &wake, path, state, watch);
    if state.file_lost.load(Ordering::Acquire) {
        no_checkpoint_on_close(&conn);
    }
}

pub(super) fn checkpoint_until_closed(
    conn: &Connection,
    wake: &Receiver<()>,
    path: &str,
    state: &FileState,
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
