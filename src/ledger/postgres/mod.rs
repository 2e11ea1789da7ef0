//! The fleet ledger: one PostgreSQL database that every replica writes its rows to.
//!
//! Same tables and semantics as [`super::SqliteLedger`]: the rows (`ledger_rows`) and the
//! aggregates upserted in the rows' transaction (`usage_daily`, `usage_monthly` and their
//! roll-ups without the account), so `/usage` on any replica sees the whole fleet.
//!
//! The `postgres` crate blocks (and panics when its blocking calls run on a tokio worker), so
//! it only ever runs on two threads this module owns: the writer and the reader. Callers talk
//! to them over channels; [`PostgresLedger::open`] works from sync code and from inside a
//! runtime alike.
//!
//! **Writes** go through the ledger's one writer loop (`super::writer`), with [`POLICY`] as
//! its settings and `backend::PostgresBackend` committing each batch. The writer drains everything queued into one statement, so one round trip and
//! one (implicit) transaction per batch (group commit): the rows as arrays, one per column,
//! `UNNEST`ed into `ledger_rows`, and, in data-modifying CTEs of the same statement, the sums
//! of the rows actually inserted upserted into each aggregate table with their keys sorted
//! (replicas lock aggregate rows in one order). Each row carries a `row_uid` (128 random bits
//! made when the row is queued) under a UNIQUE index; rows go in with `ON CONFLICT (row_uid)
//! DO NOTHING RETURNING row_uid` and only those returned are summed, so a batch retried after
//! a lost commit acknowledgement is never counted twice. Day and month keys are computed by
//! the gateway (UTC), as SQLite's are. A deadlock or serialization failure is retried at once.
//! With `sync = "crash_safe"` or `"power_safe"` a caller is answered once the transaction has committed
//! (the writer's session runs with `synchronous_commit = on`: committed is durable); with
//! `"async"` once the row is queued, and [`Ledger::flush`] waits for the commits.
//!
//! **Failures.** When the server is unreachable or restarts, the writer keeps the rows in
//! memory, answers the waiting callers with the error (the credits layer then fails closed
//! for costly requests), reconnects with backoff (100 ms doubling to 5 s) and writes the kept
//! rows once the server is back: never lost, never doubled. While it backs off, new rows are
//! kept and their callers answered with the error at once. At most `buffer_rows` rows wait
//! (queued or kept); beyond, [`Ledger::record`] fails at once with
//! [`LedgerError::BufferFull`]. A failure on a connection that had been idle (the server
//! restarted meanwhile) is retried once on a fresh connection before anyone sees an error. A
//! statement running 30 s (`statement_timeout`), or data the server leaves unacknowledged as
//! long (`tcp_user_timeout`, keepalives), fails like an outage. Dropping the ledger writes
//! what is queued, retrying for up to 5 s, and logs the rows it could not write.
//! Text a row carries is stored as is, except NUL (PostgreSQL text cannot hold it), which
//! becomes U+FFFD; the database must be UTF8 (checked at open).
//!
//! **Reads** run on the reader thread's own connection, reconnecting on failure; while the
//! server is down they return [`LedgerError::Query`] (at once when connections are refused,
//! after the connect timeout, 5 s by default, when the host does not answer).
//!
//! **Opening** connects both threads and migrates the schema (versioned steps in
//! `ledger_schema_migrations`, each in a transaction under `pg_advisory_xact_lock`, so replicas
//! starting together migrate once). A server that refuses connections is retried for up to
//! 3 s (replicas and their database often start together), then opening fails with
//! [`LedgerError::Open`]; authentication and SQL errors fail at once.
//!
//! **TLS** goes through rustls (ring) with certificate and host name verification, always:
//! `sslmode=disable` connects in clear, `prefer` (the default) uses TLS when the server
//! offers it, `require`, `verify-ca` and `verify-full` insist on it. The roots are the Mozilla
//! set, or the PEM file named by `sslrootcert=`. Unlike libpq, `prefer` and `require` verify
//! the certificate too. Client certificates are not supported yet.
//!
//! The URL may hold a password: errors and logs name the host, port and database only.
//!
//! The room: this file is the handle ([`PostgresLedger`]: open, record, reads, drop);
//! `backend` the commit of one batch; `schema` the migrations and the batch's statement;
//! `connect` the URL, TLS and connections; `reader` the reader thread and its queries.

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use time::Date;

use super::{Ledger, LedgerError, Row, UsagePage, UsageQuery};
use crate::config::LedgerSync;
use crate::util::BoxFuture;
use connect::{connect_with_retry, describe, Target};
use reader::ReadConn;
use schema::{check_encoding, migrate, Conn};

mod backend;
mod connect;
mod reader;
mod schema;

use super::writer::{self, Handle, Place, Policy};
use backend::PostgresBackend;

/// Most rows one transaction takes: bounds the latency of the first waiter in a batch, and
/// how much one retry after an outage writes at once.
const MAX_BATCH: usize = 16_384;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long opening retries a server that refuses connections.
const OPEN_RETRY: Duration = Duration::from_secs(3);
/// A connection attempt's deadline, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A statement running, or data unacknowledged by the server, this long fails (and its rows
/// are retried).
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// How long dropping the ledger keeps retrying rows it could not write yet.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Retries of a transaction that lost a deadlock or serialization conflict.
const CONFLICT_RETRIES: usize = 3;

/// The shared writer loop's settings here: no gathering (callers wait for their commit), a
/// retry after an outage split into transactions of [`MAX_BATCH`] rows, back-off from 100 ms
/// to 5 s during which new rows are kept and answered with the error at once, rows bounded by
/// `buffer_rows` rather than a count of kept ones, and [`CLOSE_GRACE`] at close.
const POLICY: Policy = Policy {
    max_batch: MAX_BATCH,
    max_rows: MAX_BATCH,
    gather: None,
    commit_window: None,
    backoff_first: BACKOFF_FIRST,
    backoff_max: BACKOFF_MAX,
    defer: true,
    max_kept: None,
    close_grace: CLOSE_GRACE,
    bounded: true,
};

/// The fleet ledger. Dropping it writes what is queued (retrying for up to 5 s while the
/// server is unreachable) and joins its threads.
pub struct PostgresLedger {
    target: String,
    sync: LedgerSync,
    buffer_rows: usize,
    writer: Handle<String>,
    /// `None` only while dropping: closing the channel tells the reader to finish.
    reads: Option<Sender<Read>>,
    reader: Option<JoinHandle<()>>,
}

pub(super) enum Read {
    SpentOn(
        Date,
        mpsc::SyncSender<Result<HashMap<String, u64>, LedgerError>>,
    ),
    Usage {
        q: UsageQuery,
        after: Option<Vec<String>>,
        limit: usize,
        reply: mpsc::SyncSender<Result<UsagePage, LedgerError>>,
    },
    Totals(mpsc::SyncSender<Result<(u64, u64), LedgerError>>),
}

impl PostgresLedger {
    /// Connect, migrate, start the writer and reader threads. Blocking; callable from sync code
    /// and from a runtime thread (the database work runs on the ledger's own threads).
    pub fn open(
        url: &str,
        sync: LedgerSync,
        buffer_rows: usize,
    ) -> Result<PostgresLedger, LedgerError> {
        let target = Target::parse(url, sync)?;
        let display = target.display.clone();
        let fail = |reason: String| LedgerError::Open {
            path: display.clone(),
            reason,
        };

        let writer_target = target.clone();
        let writer = writer::spawn(
            "ledger-pg-writer",
            Place::Database(display.clone()),
            POLICY,
            move |_| {
                let conn = connect_with_retry(&writer_target).and_then(|mut client| {
                    check_encoding(&mut client)?;
                    migrate(&mut client)?;
                    Conn::prepare(client).map_err(|e| {
                        format!("cannot prepare the ledger's statements: {}", describe(&e))
                    })
                })?;
                Ok(PostgresBackend {
                    target: writer_target,
                    conn: Some(conn),
                })
            },
        )
        .map_err(&fail)?;

        // Past this point, dropping `ledger` joins the writer if the reader cannot start.
        let mut ledger = PostgresLedger {
            target: display.clone(),
            sync,
            buffer_rows,
            writer,
            reads: None,
            reader: None,
        };
        let (reads, rx) = mpsc::channel();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let reader = std::thread::Builder::new()
            .name("ledger-pg-reader".into())
            .spawn(move || match connect_with_retry(&target) {
                Ok(client) => {
                    let _ = ready_tx.send(Ok(()));
                    ReadConn {
                        target,
                        client: Some(client),
                    }
                    .run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| fail(format!("cannot start the reader thread: {e}")))?;
        let opened = ready
            .recv()
            .unwrap_or_else(|_| Err("the reader thread stopped while opening".into()));
        ledger.reader = Some(reader);
        opened.map_err(fail)?;
        ledger.reads = Some(reads);
        Ok(ledger)
    }

    /// Transactions committed so far: with group commit, far fewer than rows.
    pub fn commits(&self) -> u64 {
        self.writer.health().commits()
    }

    /// Rows whose write failed and that wait for a retry.
    pub fn rows_waiting(&self) -> usize {
        self.writer.health().rows_waiting()
    }

    /// Rows dropped because they could not be written before the ledger closed.
    pub fn rows_lost(&self) -> u64 {
        self.writer.health().rows_lost()
    }

    fn read<T>(
        &self,
        make: impl FnOnce(mpsc::SyncSender<Result<T, LedgerError>>) -> Read,
    ) -> Result<T, LedgerError> {
        let gone = || LedgerError::Query {
            path: self.target.clone(),
            detail: "the reader thread has stopped".into(),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        self.reads
            .as_ref()
            .ok_or_else(gone)?
            .send(make(tx))
            .map_err(|_| gone())?;
        rx.recv().unwrap_or_else(|_| Err(gone()))
    }
}

impl Ledger for PostgresLedger {
    fn record(&self, row: Row) -> BoxFuture<Result<(), LedgerError>> {
        let health = self.writer.health();
        if let Err(e) = health.admit(self.buffer_rows, &self.target) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let row = without_nul(row);
        let uid = format!("{:032x}", rand::random::<u128>());
        // A commit acknowledged by PostgreSQL outlives the gateway: crash_safe waits for it as
        // power_safe does.
        let wait = self.sync != LedgerSync::Async;
        let recorded = self.writer.record(uid, row, wait);
        if recorded.is_err() {
            health.release(1);
        }
        writer::answer(recorded)
    }

    fn spent_on(&self, day: Date) -> Result<HashMap<String, u64>, LedgerError> {
        self.read(|tx| Read::SpentOn(day, tx))
    }

    fn usage_page(
        &self,
        q: &UsageQuery,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<UsagePage, LedgerError> {
        self.read(|reply| Read::Usage {
            q: q.clone(),
            after: after.map(<[String]>::to_vec),
            limit,
            reply,
        })
    }

    fn flush(&self) -> BoxFuture<Result<(), LedgerError>> {
        self.writer.flush()
    }

    fn totals(&self) -> Result<(u64, u64), LedgerError> {
        self.read(Read::Totals)
    }

    fn write_error(&self) -> Option<LedgerError> {
        self.writer.health().error().clone()
    }
}

impl Drop for PostgresLedger {
    fn drop(&mut self) {
        // The writer writes what is queued (retrying for up to CLOSE_GRACE) and returns.
        drop(self.reads.take());
        self.writer.close();
        if let Some(thread) = self.reader.take() {
            if thread.join().is_err() {
                tracing::error!(target_db = %self.target, "the ledger reader thread panicked");
            }
        }
    }
}

/// PostgreSQL text cannot hold NUL: a row carrying one (a caller's `action`, say) would fail
/// its batch on every retry and wedge the ledger. NUL becomes U+FFFD instead.
fn without_nul(mut row: Row) -> Row {
    fn clean(s: &str) -> Option<String> {
        s.contains('\0').then(|| s.replace('\0', "\u{FFFD}"))
    }
    fn clean_arc(s: &mut Arc<str>) {
        if let Some(c) = clean(s) {
            *s = c.into();
        }
    }
    if let Some(c) = clean(&row.request_id) {
        row.request_id = c;
    }
    if let Some(c) = clean(&row.path) {
        row.path = c;
    }
    clean_arc(&mut row.client);
    if let Some(a) = row.account_id.as_mut() {
        clean_arc(a);
    }
    if let Some(a) = row.action.as_mut() {
        clean_arc(a);
    }
    row
}
