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
//! **Writes.** The writer drains everything queued into one statement, so one round trip and
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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Statement};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::Date;
use tokio::sync::oneshot;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::plan::{month_key, usage_row, usage_sql, Dialect};
use super::{day_key, day_of, GroupBy, Ledger, LedgerError, Row, UsagePage, UsageQuery, UsageRow};
use crate::config::LedgerSync;
use crate::util::BoxFuture;

/// Versioned schema: step `i` takes the version recorded in `ledger_schema_migrations` from
/// `i` to `i + 1`, in its own transaction. Append new steps; never edit a released one.
/// Keys are `COLLATE "C"`: byte order, as SQLite sorts, whatever the database's locale.
const MIGRATIONS: &[&str] = &[
    // 1: the rows and the aggregates, as SQLite's schema version 3, plus `row_uid`.
    r#"CREATE TABLE ledger_rows (
        id            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        row_uid       TEXT    COLLATE "C" NOT NULL,
        at_ms         BIGINT  NOT NULL,
        request_id    TEXT    NOT NULL,
        client        TEXT    COLLATE "C" NOT NULL,
        account_id    TEXT    COLLATE "C",
        path          TEXT    NOT NULL,
        action        TEXT    COLLATE "C",
        status        INTEGER NOT NULL,
        credits       BIGINT  NOT NULL,
        credits_known BOOLEAN NOT NULL,
        outcome       TEXT    COLLATE "C" NOT NULL
    );
    CREATE UNIQUE INDEX ledger_rows_row_uid ON ledger_rows (row_uid);
    CREATE INDEX ledger_rows_at_ms ON ledger_rows (at_ms);
    CREATE TABLE usage_daily (
        day      TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        account  TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (day, client, account, action, outcome)
    );
    CREATE TABLE usage_monthly (
        month    TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        account  TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (month, client, account, action, outcome)
    );
    CREATE TABLE usage_daily_no_account (
        day      TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (day, client, action, outcome)
    );
    CREATE TABLE usage_monthly_no_account (
        month    TEXT   COLLATE "C" NOT NULL,
        client   TEXT   COLLATE "C" NOT NULL,
        action   TEXT   COLLATE "C" NOT NULL,
        outcome  TEXT   COLLATE "C" NOT NULL,
        requests BIGINT NOT NULL,
        credits  BIGINT NOT NULL,
        unknown  BIGINT NOT NULL,
        PRIMARY KEY (month, client, action, outcome)
    );"#,
    // 2: `metadata.credits_consumed` as the upstream sent it, on the rows where it was not a
    // whole number (unknown): at most 64 bytes, NULL otherwise and on older rows.
    "ALTER TABLE ledger_rows ADD COLUMN IF NOT EXISTS credits_raw TEXT;",
];

/// `pg_advisory_xact_lock` key serializing migrations across replicas ("linkuplg").
const MIGRATION_LOCK: i64 = 0x6c69_6e6b_7570_6c67;

/// The aggregate tables: name, period column, whether the key has the account.
const AGGREGATES: [(&str, &str, bool); 4] = [
    ("usage_daily", "day", true),
    ("usage_monthly", "month", true),
    ("usage_daily_no_account", "day", false),
    ("usage_monthly_no_account", "month", false),
];

/// One statement, so one round trip and one implicit transaction per batch: insert the rows
/// (arrays, one per column, plus each row's day and month keys computed by the gateway)
/// skipping any `row_uid` already there, then add only the rows actually inserted to each
/// aggregate table, their keys in sorted order (replicas lock aggregate rows in one order).
fn write_sql() -> String {
    let mut sql = String::from(
        "WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::int4[], $9::int8[], $10::bool[],
                                 $11::text[], $12::text[], $13::text[], $14::text[])
                AS i (row_uid, at_ms, request_id, client, account_id, path, action, status,
                      credits, credits_known, outcome, day, month, credits_raw)
        ),
        ins AS (
            INSERT INTO ledger_rows (row_uid, at_ms, request_id, client, account_id, path,
                                     action, status, credits, credits_known, outcome,
                                     credits_raw)
            SELECT row_uid, at_ms, request_id, client, account_id, path, action, status,
                   credits, credits_known, outcome, credits_raw
            FROM input
            ON CONFLICT (row_uid) DO NOTHING
            RETURNING row_uid
        ),
        new AS (SELECT input.* FROM input JOIN ins USING (row_uid))",
    );
    for (table, period, with_account) in AGGREGATES {
        let (account_col, account_val, keys) = if with_account {
            ("account, ", "COALESCE(account_id, ''), ", "1, 2, 3, 4, 5")
        } else {
            ("", "", "1, 2, 3, 4")
        };
        let _ = write!(
            sql,
            ",
        {table} AS (
            INSERT INTO {table} AS t ({period}, client, {account_col}action, outcome,
                                     requests, credits, unknown)
            SELECT {period}, client, {account_val}COALESCE(action, ''), outcome, count(*),
                   sum(credits), count(*) FILTER (WHERE NOT credits_known)
            FROM new GROUP BY {keys} ORDER BY {keys}
            ON CONFLICT ({period}, client, {account_col}action, outcome) DO UPDATE SET
                requests = t.requests + excluded.requests,
                credits = t.credits + excluded.credits,
                unknown = t.unknown + excluded.unknown
        )"
        );
    }
    sql.push_str("\n        SELECT count(*) FROM ins");
    sql
}

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

/// The fleet ledger. Dropping it writes what is queued (retrying for up to 5 s while the
/// server is unreachable) and joins its threads.
pub struct PostgresLedger {
    target: String,
    sync: LedgerSync,
    buffer_rows: usize,
    /// `None` only while dropping: closing the channel tells the writer to finish.
    commands: Option<Sender<Command>>,
    reads: Option<Sender<Read>>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    state: Arc<WriterState>,
}

type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

struct Pending {
    uid: String,
    row: Row,
    /// `None` with `sync = "async"`, and once the caller has been answered.
    done: Option<Reply<()>>,
}

enum Command {
    Record(Pending),
    Flush(Reply<()>),
}

enum Read {
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

/// What the writer shares with the handle.
#[derive(Default)]
struct WriterState {
    commits: AtomicU64,
    /// Rows accepted by `record` and not committed yet (queued or kept): at most
    /// `buffer_rows`.
    pending: AtomicUsize,
    /// Rows that waited after a failed write and are still not written.
    kept: AtomicUsize,
    lost: AtomicU64,
    /// The last write's error while rows wait for a retry.
    error: Mutex<Option<LedgerError>>,
}

impl WriterState {
    fn error(&self) -> MutexGuard<'_, Option<LedgerError>> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where and how to connect; `display` is what errors and logs name.
#[derive(Clone)]
struct Target {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    display: String,
    sync: LedgerSync,
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

        let state = Arc::new(WriterState::default());
        let (commands, rx) = mpsc::channel();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let writer_target = target.clone();
        let writer_state = state.clone();
        let writer = std::thread::Builder::new()
            .name("ledger-pg-writer".into())
            .spawn(move || {
                let conn = match connect_with_retry(&writer_target).and_then(|mut client| {
                    check_encoding(&mut client)?;
                    migrate(&mut client)?;
                    Conn::prepare(client).map_err(|e| {
                        format!("cannot prepare the ledger's statements: {}", describe(&e))
                    })
                }) {
                    Ok(conn) => conn,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                Writer {
                    target: writer_target,
                    conn: Some(conn),
                    kept: Vec::new(),
                    backoff: BACKOFF_FIRST,
                    retry_at: None,
                    state: writer_state,
                }
                .run(rx);
            })
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        let opened = ready
            .recv()
            .unwrap_or_else(|_| Err("the writer thread stopped while opening".into()));
        if let Err(reason) = opened {
            let _ = writer.join();
            return Err(fail(reason));
        }

        // Past this point, dropping `ledger` joins the writer if the reader cannot start.
        let mut ledger = PostgresLedger {
            target: display.clone(),
            sync,
            buffer_rows,
            commands: Some(commands),
            reads: None,
            writer: Some(writer),
            reader: None,
            state,
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
        self.state.commits.load(Ordering::Relaxed)
    }

    /// Rows whose write failed and that wait for a retry.
    pub fn rows_waiting(&self) -> usize {
        self.state.kept.load(Ordering::Relaxed)
    }

    /// Rows dropped because they could not be written before the ledger closed.
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

    /// Count a row against `buffer_rows`, or refuse it.
    fn admit(&self) -> Result<(), LedgerError> {
        let before = self.state.pending.fetch_add(1, Ordering::AcqRel);
        if before >= self.buffer_rows {
            self.state.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(LedgerError::BufferFull {
                path: self.target.clone(),
                rows: before,
            });
        }
        Ok(())
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
        if let Err(e) = self.admit() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let row = without_nul(row);
        let uid = format!("{:032x}", rand::random::<u128>());
        let (done, answer) = match self.sync {
            LedgerSync::Async => (None, None),
            // A commit acknowledged by PostgreSQL outlives the gateway: crash_safe waits for
            // it as power_safe does.
            LedgerSync::CrashSafe | LedgerSync::PowerSafe => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        if let Err(e) = self.send(Command::Record(Pending { uid, row, done })) {
            self.state.pending.fetch_sub(1, Ordering::AcqRel);
            return Box::pin(std::future::ready(Err(e)));
        }
        match answer {
            None => Box::pin(std::future::ready(Ok(()))),
            Some(rx) => Box::pin(async move { rx.await.unwrap_or(Err(LedgerError::WriterGone)) }),
        }
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
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.send(Command::Flush(tx)) {
            return Box::pin(std::future::ready(Err(e)));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(LedgerError::WriterGone)) })
    }

    fn totals(&self) -> Result<(u64, u64), LedgerError> {
        self.read(Read::Totals)
    }

    fn write_error(&self) -> Option<LedgerError> {
        self.state.error().clone()
    }
}

impl Drop for PostgresLedger {
    fn drop(&mut self) {
        drop(self.commands.take());
        drop(self.reads.take());
        for (thread, name) in [
            (self.writer.take(), "writer"),
            (self.reader.take(), "reader"),
        ] {
            if let Some(thread) = thread {
                if thread.join().is_err() {
                    tracing::error!(target_db = %self.target, "the ledger {name} thread panicked");
                }
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

impl Target {
    fn parse(url: &str, sync: LedgerSync) -> Result<Target, LedgerError> {
        let open_error = |reason: String| LedgerError::Open {
            path: "ledger.postgres_url".into(),
            reason,
        };
        let (url, root_file) = split_tls_params(url).map_err(open_error)?;
        let mut config = postgres::Config::from_str(&url)
            .map_err(|e| open_error(format!("invalid URL: {}", describe(&e))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("linkup-gateway");
        }
        // A server that vanishes without closing the connection (host down, network cut) is
        // noticed within about half a minute, not the kernel's default of many minutes.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(15));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(STUCK_AFTER);
        }
        let display = display(&config);
        let tls = tls(root_file.as_ref()).map_err(|reason| LedgerError::Open {
            path: display.clone(),
            reason,
        })?;
        Ok(Target {
            config,
            tls,
            display,
            sync,
        })
    }

    fn connect(&self) -> Result<Client, postgres::Error> {
        let mut client = self.config.connect(self.tls.clone())?;
        // A statement stuck on a lock fails (its rows are kept and retried) instead of
        // holding every caller.
        client.batch_execute(&format!(
            "SET statement_timeout = {}",
            STUCK_AFTER.as_millis()
        ))?;
        // Committed must mean durable, whatever the server's default.
        if self.sync != LedgerSync::Async {
            client.batch_execute("SET synchronous_commit = on")?;
        }
        Ok(client)
    }

    fn write_error(&self, e: &postgres::Error) -> LedgerError {
        LedgerError::Write {
            path: self.display.clone(),
            detail: describe(e),
        }
    }

    fn query_error(&self, e: &postgres::Error) -> LedgerError {
        LedgerError::Query {
            path: self.display.clone(),
            detail: describe(e),
        }
    }
}

/// Take libpq's TLS parameters the `postgres` crate does not know out of a URL: `sslmode`
/// `verify-ca` / `verify-full` (kept as `require`: certificates are always verified) and
/// `sslrootcert`. Other URLs and parameters pass through untouched.
fn split_tls_params(url: &str) -> Result<(String, Option<PathBuf>), String> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_string(), None));
    };
    let mut kept = Vec::new();
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("the URL's `{key}` is not UTF-8"))?;
        match key {
            "sslmode" if value == "verify-ca" || value == "verify-full" => {
                kept.push("sslmode=require".to_string());
            }
            "sslrootcert" => root = Some(PathBuf::from(value.as_ref())),
            _ => kept.push(pair.to_string()),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, root))
}

fn tls(root_file: Option<&PathBuf>) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    match root_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| format!("sslrootcert: cannot read {}: {e}", file.display()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("sslrootcert: bad PEM in {}: {e}", file.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert: bad certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert: no certificate in {}", file.display()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `postgres://host:port/db`: the URL without its user and password.
fn display(config: &postgres::Config) -> String {
    let mut out = String::from("postgres://");
    let ports = config.get_ports();
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match host {
            postgres::config::Host::Tcp(h) => out.push_str(h),
            #[cfg(unix)]
            postgres::config::Host::Unix(p) => out.push_str(&p.display().to_string()),
        }
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let _ = write!(out, ":{port}");
    }
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    let _ = write!(out, "/{db}");
    out
}

/// An error with its causes: the `postgres` crate's `Display` omits them.
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// A connection and the writer's statement, prepared on it.
struct Conn {
    client: Client,
    write: Statement,
}

impl Conn {
    fn prepare(mut client: Client) -> Result<Conn, postgres::Error> {
        let write = client.prepare(&write_sql())?;
        Ok(Conn { client, write })
    }
}

/// Connect, retrying refused connections for [`OPEN_RETRY`].
fn connect_with_retry(target: &Target) -> Result<Client, String> {
    let deadline = Instant::now() + OPEN_RETRY;
    let mut pause = Duration::from_millis(50);
    loop {
        match target.connect() {
            Ok(client) => return Ok(client),
            Err(e) if e.as_db_error().is_none() && Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("cannot connect: {}", describe(&e))),
        }
    }
}

/// Rows carry any Unicode text (client names, actions): a database that cannot store it would
/// fail batches forever, so refuse it at startup.
fn check_encoding(client: &mut Client) -> Result<(), String> {
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| format!("cannot read the server encoding: {}", describe(&e)))?;
    if encoding.eq_ignore_ascii_case("UTF8") {
        Ok(())
    } else {
        Err(format!(
            "the database's encoding is {encoding}; the ledger needs UTF8 \
             (CREATE DATABASE ... ENCODING 'UTF8')"
        ))
    }
}

/// Bring the schema to the last version, one step per transaction, each under an advisory
/// lock: replicas starting together wait for each other, and the second finds the work done.
fn migrate(client: &mut Client) -> Result<(), String> {
    let known = MIGRATIONS.len();
    loop {
        let mut tx = client
            .transaction()
            .map_err(|e| format!("cannot start the migration: {}", describe(&e)))?;
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS ledger_schema_migrations (
                 version    INTEGER     PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        ))
        .map_err(|e| format!("cannot lock the schema: {}", describe(&e)))?;
        let version: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM ledger_schema_migrations",
                &[],
            )
            .and_then(|r| r.try_get(0))
            .map_err(|e| format!("cannot read the schema version: {}", describe(&e)))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version == known {
            return tx
                .commit()
                .map_err(|e| format!("cannot finish the migration: {}", describe(&e)));
        }
        let Some(step) = MIGRATIONS.get(version) else {
            return Err(format!(
                "the database has ledger schema version {version}, newer than this gateway \
                 knows ({known}); was it written by a newer release?"
            ));
        };
        let next = i32::try_from(version + 1).unwrap_or(i32::MAX);
        tx.batch_execute(step)
            .and_then(|()| {
                tx.execute(
                    "INSERT INTO ledger_schema_migrations (version) VALUES ($1)",
                    &[&next],
                )
            })
            .and_then(|_| tx.commit())
            .map_err(|e| {
                format!(
                    "schema migration to version {next} failed: {}",
                    describe(&e)
                )
            })?;
    }
}

/// The writer thread's state.
struct Writer {
    target: Target,
    /// `None` after a failure: the next attempt connects afresh.
    conn: Option<Conn>,
    /// Rows whose write failed, oldest first, their callers answered; written first.
    kept: Vec<Pending>,
    backoff: Duration,
    /// While rows are kept: when to try again.
    retry_at: Option<Instant>,
    state: Arc<WriterState>,
}

impl Writer {
    fn run(mut self, commands: Receiver<Command>) {
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

/// One statement (an implicit transaction): the rows not yet in the table, and the sums of
/// those in the aggregates.
fn write_rows(conn: &mut Conn, rows: &[Pending]) -> Result<(), postgres::Error> {
    let uids: Vec<&str> = rows.iter().map(|p| p.uid.as_str()).collect();
    let at_ms: Vec<i64> = rows.iter().map(|p| p.row.at_ms).collect();
    let request_ids: Vec<&str> = rows.iter().map(|p| p.row.request_id.as_str()).collect();
    let clients: Vec<&str> = rows.iter().map(|p| &*p.row.client).collect();
    let accounts: Vec<Option<&str>> = rows.iter().map(|p| p.row.account_id.as_deref()).collect();
    let paths: Vec<&str> = rows.iter().map(|p| p.row.path.as_str()).collect();
    let actions: Vec<Option<&str>> = rows.iter().map(|p| p.row.action.as_deref()).collect();
    let statuses: Vec<i32> = rows.iter().map(|p| i32::from(p.row.status)).collect();
    let credits: Vec<i64> = rows.iter().map(|p| to_i64(p.row.credits)).collect();
    let known: Vec<bool> = rows.iter().map(|p| p.row.credits_known).collect();
    let outcomes: Vec<&str> = rows.iter().map(|p| p.row.outcome.as_str()).collect();
    let days: Vec<Date> = rows.iter().map(|p| day_of(p.row.at_ms)).collect();
    let day_keys: Vec<String> = days.iter().map(|d| day_key(*d)).collect();
    let month_keys: Vec<String> = days.iter().map(|d| month_key(*d)).collect();
    let raws: Vec<Option<&str>> = rows
        .iter()
        .map(|p| p.row.credits_raw.as_deref().map(super::bounded_raw))
        .collect();
    conn.client.query_one(
        &conn.write,
        &[
            &uids,
            &at_ms,
            &request_ids,
            &clients,
            &accounts,
            &paths,
            &actions,
            &statuses,
            &credits,
            &known,
            &outcomes,
            &day_keys,
            &month_keys,
            &raws,
        ],
    )?;
    Ok(())
}

/// The reader thread's connection.
struct ReadConn {
    target: Target,
    client: Option<Client>,
}

impl ReadConn {
    fn run(mut self, reads: Receiver<Read>) {
        while let Ok(read) = reads.recv() {
            match read {
                Read::SpentOn(day, reply) => {
                    let _ = reply.send(self.query(|c| spent_on(c, day)));
                }
                Read::Usage {
                    q,
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(self.query(|c| usage(c, &q, after.as_deref(), limit)));
                }
                Read::Totals(reply) => {
                    let _ = reply.send(self.query(totals));
                }
            }
        }
    }

    /// Run a query, connecting first if needed; a failure on a reused connection is retried
    /// once on a fresh one.
    fn query<T>(
        &mut self,
        mut run: impl FnMut(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, LedgerError> {
        let mut fresh_retry = true;
        loop {
            let reused = self.client.is_some();
            let mut client = match self.client.take() {
                Some(c) => c,
                None => self
                    .target
                    .connect()
                    .map_err(|e| self.target.query_error(&e))?,
            };
            match run(&mut client) {
                Ok(v) => {
                    self.client = Some(client);
                    return Ok(v);
                }
                // The connection is dropped; one that had been idle may have died with a
                // server restart: try once more on a fresh one.
                Err(_) if reused && fresh_retry => fresh_retry = false,
                Err(e) => return Err(self.target.query_error(&e)),
            }
        }
    }
}

fn spent_on(client: &mut Client, day: Date) -> Result<HashMap<String, u64>, postgres::Error> {
    let rows = client.query(
        "SELECT client, SUM(credits)::BIGINT FROM usage_daily_no_account WHERE day = $1 \
         GROUP BY client",
        &[&day_key(day)],
    )?;
    rows.iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, to_u64(r.try_get(1)?))))
        .collect()
}

fn totals(client: &mut Client) -> Result<(u64, u64), postgres::Error> {
    // The aggregates are written in the rows' transaction, so they count the same.
    let r = client.query_one(
        "SELECT COALESCE(SUM(requests), 0)::BIGINT, COALESCE(SUM(credits), 0)::BIGINT \
         FROM usage_monthly_no_account",
        &[],
    )?;
    Ok((to_u64(r.try_get(0)?), to_u64(r.try_get(1)?)))
}

fn usage(
    client: &mut Client,
    q: &UsageQuery,
    after: Option<&[String]>,
    limit: usize,
) -> Result<UsagePage, postgres::Error> {
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
    let (sql, bounds) = usage_sql(
        &by,
        q.from_day,
        q.to_day,
        Dialect::POSTGRES,
        after.is_some(),
        limit,
    );
    let params: Vec<&(dyn ToSql + Sync)> = bounds
        .iter()
        .chain(after.into_iter().flatten())
        .map(|b| b as &(dyn ToSql + Sync))
        .collect();
    // At most `limit + 1` rows (the SQL's LIMIT).
    let rows = client.query(&sql, &params)?;
    let rows = rows
        .iter()
        .map(|r| {
            let keys = (0..by.len())
                .map(|i| r.try_get::<_, String>(i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(usage_row(
                &by,
                keys,
                r.try_get(by.len())?,
                r.try_get(by.len() + 1)?,
            ))
        })
        .collect::<Result<Vec<UsageRow>, postgres::Error>>()?;
    Ok(UsagePage::from_rows(rows, &by, limit))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_database_never_the_password() {
        let t = Target::parse(
            "postgres://gw:s3cret@db.example:6543/linkup?sslmode=verify-full",
            LedgerSync::PowerSafe,
        )
        .unwrap();
        assert_eq!(t.display, "postgres://db.example:6543/linkup");
        assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Require);
        let e = PostgresLedger::open(
            "postgres://gw:s3cret@db.example:6543/linkup?bogus=1",
            LedgerSync::PowerSafe,
            10,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn tls_parameters_libpq_knows_are_taken_out_of_the_url() {
        let (url, root) = split_tls_params(
            "postgresql://h/db?sslrootcert=%2Fetc%2Fca.pem&sslmode=verify-ca&options=-c%20x=1",
        )
        .unwrap();
        assert_eq!(url, "postgresql://h/db?sslmode=require&options=-c%20x=1");
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            split_tls_params("host=h dbname=d").unwrap(),
            ("host=h dbname=d".to_string(), None)
        );
    }
}
