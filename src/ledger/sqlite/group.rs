//! `crash_safe` journal appends grouped per data-plane worker: one `writev(2)` per turn of the
//! worker's event loop instead of one per request.
//!
//! A worker is one thread running one single-threaded runtime (`crate::workers`). The first row
//! recorded on it opens a batch in a thread-local and spawns a task that writes it; every row
//! recorded before that task runs (the other requests answered in the same turn of the loop)
//! joins the batch. The task appends the whole batch to the journal at once, hands the rows to
//! the SQLite writer in number order, and wakes every caller. A caller is answered only after
//! its row is in the OS's hands, exactly as with a write of its own. Off the workers (tests,
//! background tasks) rows are appended one by one, as before.

use std::cell::RefCell;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use super::super::writer::{Health, Pending};
use super::super::{LedgerError, Row};
use super::journal::{self, Journal};
use super::Command;

/// Rows per batch at most; a row beyond waits for the next batch (written one by one).
const MAX_BATCH: usize = 256;

/// What a batch needs to be written: shared by the ledger and its pending batches.
pub(super) struct Sink {
    journal: Arc<Journal>,
    /// `None` once the ledger closes: the writer must see its channel close.
    commands: Mutex<Option<Sender<Command>>>,
    health: Arc<Health>,
    path: PathBuf,
}

impl Sink {
    pub(super) fn new(
        journal: Arc<Journal>,
        commands: Sender<Command>,
        health: Arc<Health>,
        path: PathBuf,
    ) -> Sink {
        Sink {
            journal,
            commands: Mutex::new(Some(commands)),
            health,
            path,
        }
    }

    /// Let go of the writer's channel (the ledger is closing).
    pub(super) fn close(&self) {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// The outcome of one batch (once written), and who waits for it.
#[derive(Default)]
struct SlotState {
    result: Option<Result<(), LedgerError>>,
    wakers: Vec<Waker>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

impl Slot {
    fn complete(&self, result: Result<(), LedgerError>) {
        let wakers = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.result = Some(result);
            std::mem::take(&mut s.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }
}

struct Batch {
    sink: Arc<Sink>,
    lines: Vec<u8>,
    ends: Vec<usize>,
    rows: Vec<Row>,
    slot: Arc<Slot>,
}

thread_local! {
    static OPEN: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// A row's place in a batch: resolves once the batch is in the journal.
pub(super) struct Appended(Arc<Slot>);

impl Future for Appended {
    type Output = Result<(), LedgerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &s.result {
            Some(r) => Poll::Ready(r.clone()),
            None => {
                if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    s.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// Add the row in `slot` to this worker's open batch (opening one if there is none), taking
/// it out of `slot`; it stays there when it cannot join (not on a worker, the batch is full or
/// belongs to another ledger). (An `Option` rather than a `Result` giving the row back: a
/// `Row` is too large an error value.)
pub(super) fn append(sink: &Arc<Sink>, slot: &mut Option<Row>) -> Option<Appended> {
    // Only on a data-plane worker.
    crate::workers::current()?;
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        match &mut *open {
            Some(b) if Arc::ptr_eq(&b.sink, sink) && b.rows.len() < MAX_BATCH => {
                let row = slot.take()?;
                journal::encode(&row, &mut b.lines);
                b.ends.push(b.lines.len());
                b.rows.push(row);
                Some(Appended(b.slot.clone()))
            }
            Some(_) => None,
            None => {
                let row = slot.take()?;
                let mut lines = Vec::with_capacity(4096);
                journal::encode(&row, &mut lines);
                let done = Arc::new(Slot::default());
                *open = Some(Batch {
                    sink: sink.clone(),
                    ends: vec![lines.len()],
                    lines,
                    rows: vec![row],
                    slot: done.clone(),
                });
                // Runs on this worker's runtime (its only thread), after the tasks already
                // ready in this turn: they join the batch meanwhile.
                tokio::spawn(async { write_open_batch() });
                Some(Appended(done))
            }
        }
    })
}

/// Write this thread's open batch: one append to the journal, the rows to the writer in
/// number order, every caller woken with the outcome.
fn write_open_batch() {
    let Some(batch) = OPEN.with(|open| open.borrow_mut().take()) else {
        return;
    };
    let Batch {
        sink,
        lines,
        ends,
        rows,
        slot,
    } = batch;
    let commands = sink
        .commands
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut rows = rows.into_iter();
    let mut sent = Ok(());
    let appended = sink.journal.append_many(&lines, &ends, |_, seq| {
        let Some(row) = rows.next() else { return };
        let command = Command::Record(Pending {
            tag: Some(seq),
            row,
            done: None,
        });
        let delivered = match &commands {
            Some(c) => c.send(command).is_ok(),
            None => false,
        };
        if !delivered {
            sent = Err(LedgerError::WriterGone);
        }
    });
    let result = match appended {
        Err(e) => Err(journal::write_error(&sink.path, &e)),
        // While SQLite cannot be written, costly requests fail closed, as with one row.
        Ok(()) => sent.and_then(|()| {
            if !sink.health.failing() {
                return Ok(());
            }
            sink.health.error().clone().map_or(Ok(()), Err)
        }),
    };
    slot.complete(result);
}
