//! Idempotency-Key: the answers a retry gets instead of a second upstream call.
//!
//! Per client and key, a POST's fingerprint (method, path and query, body: SHA-256) and its
//! fate are kept for `idempotency.ttl`:
//! - **in flight** in this process: a repeat waits for the first and shares its answer;
//! - **done**: the upstream acted or charged; the answer (status, headers, body) is replayed;
//! - **unknown**: the first attempt may have reached the upstream but its answer never came
//!   (reset, timeout after sending, or the gateway stopped mid-call): a repeat is refused, not
//!   sent again.
//!
//! Answers where nothing happened upstream (the gateway's own refusals, upstream errors at 0
//! credits) are forgotten, so a retry is forwarded anew.
//!
//! The durable part lives in an SQLite database beside the embedded ledger ([`beside`]; WAL:
//! a row is in the OS's hands before the call is forwarded, so a crash of the gateway mid-call
//! leaves it `in_flight`, read back as unknown), in the fleet's Redis in fleet mode, and in
//! memory otherwise (unit tests). Expired keys are
//! purged every minute, and at most `max_keys` are kept (the oldest go first).
//!
//! Why one file of ~860 lines: the three backings (memory, SQLite, the fleet's Redis) are the
//! branches of one state machine (in flight, done, unknown) in [`IdempotencyStore`]; split by
//! backing, each file would restate the transitions and their expiry rules. The unit tests
//! are in `idempotency/tests.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// The idempotency database beside an embedded ledger: `data/ledger.sqlite3` →
/// `data/ledger.idempotency.sqlite3`. A file of its own, so the ledger's recovery (a full disk,
/// a file lost under the gateway) never depends on another connection to its database.
pub fn beside(ledger: &Path) -> std::path::PathBuf {
    ledger.with_extension("idempotency.sqlite3")
}

/// The longest `Idempotency-Key` accepted (Stripe's limit).
pub const MAX_KEY_BYTES: usize = 255;
/// The largest answer kept for replay; a larger one is remembered as done but not replayable.
pub const MAX_STORED_BODY: usize = 1 << 20;

/// A request's fingerprint: SHA-256 over method, path and query, and body.
pub type Fingerprint = [u8; 32];

pub fn fingerprint(method: &http::Method, path_and_query: &str, body: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(path_and_query.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

/// An `Idempotency-Key` value is 1–255 printable ASCII characters.
pub fn check_key(v: &HeaderValue) -> Result<&str, String> {
    let s = v
        .to_str()
        .map_err(|_| "`Idempotency-Key` must be printable ASCII".to_string())?;
    if s.is_empty() || s.len() > MAX_KEY_BYTES {
        return Err(format!(
            "`Idempotency-Key` must be 1 to {MAX_KEY_BYTES} characters long"
        ));
    }
    if s.bytes().any(|b| !(0x21..=0x7e).contains(&b) && b != b' ') {
        return Err("`Idempotency-Key` must be printable ASCII".into());
    }
    Ok(s)
}

/// How long fates are kept, how many, and (fleet mode) how long another replica's first
/// attempt is waited for before its outcome counts as unknown.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    pub ttl: Duration,
    pub max_keys: u64,
    pub in_flight_for: Duration,
}

/// An answer kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub status: u16,
    /// Name/value pairs, as the caller got them (content-length and date left out).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl Stored {
    pub fn of(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Stored {
        let headers = headers
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    n.as_str(),
                    "content-length" | "date" | "x-request-id" | "transfer-encoding"
                )
            })
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        Stored {
            status: status.as_u16(),
            headers,
            body: body.clone(),
        }
    }

    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len() + 1);
        for (n, v) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                map.append(n, v);
            }
        }
        map
    }

    fn encode_headers(&self) -> Vec<u8> {
        let pairs: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), hex::encode(v)))
            .collect();
        serde_json::to_vec(&pairs).unwrap_or_default()
    }

    fn decode_headers(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
        serde_json::from_slice::<Vec<(String, String)>>(raw)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(n, v)| hex::decode(v).ok().map(|v| (n, v)))
            .collect()
    }
}

/// What became of a first attempt, as its repeats see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Replay this answer.
    Done(Arc<Stored>),
    /// The upstream acted, but the answer was too large to keep.
    DoneUnreplayable,
    /// The first attempt may or may not have reached the upstream.
    Unknown,
    /// Nothing happened upstream: the key is free again.
    Released,
}

/// The answer to "may this request go?".
pub enum Begin {
    /// The first with this key: forward it, then [`Lead::finish`].
    Lead(Lead),
    /// Seen before with the same fingerprint.
    Seen(Fate),
    /// In flight here: wait for its fate (`None` while it runs).
    Wait(watch::Receiver<Option<Fate>>),
    /// Seen before with another request.
    Mismatch,
}

type Slot = (Arc<str>, Arc<str>);

struct Flight {
    fingerprint: Fingerprint,
    fate: watch::Sender<Option<Fate>>,
}

/// The store: flights in memory, fates in SQLite (or memory).
pub struct IdempotencyStore {
    flights: Mutex<HashMap<Slot, Flight>>,
    durable: Durable,
    /// New keys since start: every `PURGE_EVERY` of them, a purge (besides the minute's), so a
    /// flood of distinct keys stays near `max_keys`.
    inserted: std::sync::atomic::AtomicU64,
}

/// New keys between two purges triggered by inserts.
const PURGE_EVERY: u64 = 1024;

enum Durable {
    Sqlite(Arc<Mutex<Connection>>),
    Memory(Arc<Mutex<MemoryRows>>),
    /// Fleet mode: in Redis, shared by the replicas; these rows while it is down.
    Fleet(Arc<crate::fleet::Fleet>, Arc<Mutex<MemoryRows>>),
}

/// What the durable store holds for a key when a first attempt asks.
enum Found {
    /// Nothing live: this attempt is the first (its `in_flight` mark is now written).
    Fresh,
    /// Another request under the key.
    Other,
    Seen(Fate),
    /// Fleet mode: another replica's first attempt is in flight.
    Elsewhere,
}

#[derive(Default)]
struct MemoryRows {
    rows: HashMap<Slot, Row>,
}

#[derive(Clone)]
struct Row {
    fingerprint: Fingerprint,
    state: State,
    stored: Option<Arc<Stored>>,
    created_ms: i64,
    expires_ms: i64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Done,
    Unknown,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::InFlight => "in_flight",
            State::Done => "done",
            State::Unknown => "unknown",
        }
    }
    fn parse(s: &str) -> State {
        match s {
            "done" => State::Done,
            "in_flight" => State::InFlight,
            _ => State::Unknown,
        }
    }
}

/// The first attempt's handle: its fate must be told (a drop without it counts as unknown).
pub struct Lead {
    store: Arc<IdempotencyStore>,
    slot: Slot,
    fp: Fingerprint,
    ttl: Duration,
    told: bool,
    /// False while it only watches another replica's attempt: then nothing of the store's is
    /// its to write.
    owns: bool,
}

fn now_ms() -> i64 {
    crate::budgets::now_ms()
}

fn expiry(now: i64, ttl: Duration) -> i64 {
    now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS idempotency (
    client      TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL,
    state       TEXT    NOT NULL,
    status      INTEGER,
    headers     BLOB,
    body        BLOB,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    PRIMARY KEY (client, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires_ms);";

impl IdempotencyStore {
    pub fn in_memory() -> IdempotencyStore {
        IdempotencyStore {
            flights: Mutex::default(),
            durable: Durable::Memory(Arc::default()),
            inserted: Default::default(),
        }
    }

    /// Fleet mode: in the fleet's Redis, shared by the replicas (in memory while it is down).
    pub fn fleet(fleet: Arc<crate::fleet::Fleet>) -> IdempotencyStore {
        IdempotencyStore {
            flights: Mutex::default(),
            durable: Durable::Fleet(fleet, Arc::default()),
            inserted: Default::default(),
        }
    }

    /// In the SQLite database at `path` ([`beside`] the embedded ledger).
    pub fn sqlite(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL with NORMAL: a commit is in the OS's hands when it returns (it survives a crash
        // of the process), as the ledger's rows are by default.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(IdempotencyStore {
            flights: Mutex::default(),
            durable: Durable::Sqlite(Arc::new(Mutex::new(conn))),
            inserted: Default::default(),
        })
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<Slot, Flight>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of requests in flight under a key (metrics, tests).
    pub fn in_flight(&self) -> usize {
        self.flights().len()
    }

    /// May this request go? `client`'s `key`, the request's `fp`, kept as `keep` says.
    pub async fn begin(
        self: &Arc<Self>,
        client: &Arc<str>,
        key: &str,
        fp: Fingerprint,
        keep: Keep,
    ) -> Result<Begin, String> {
        let Keep {
            ttl,
            max_keys,
            in_flight_for,
        } = keep;
        let slot: Slot = (client.clone(), Arc::from(key));
        {
            let mut flights = self.flights();
            if let Some(f) = flights.get(&slot) {
                return Ok(if f.fingerprint == fp {
                    Begin::Wait(f.fate.subscribe())
                } else {
                    Begin::Mismatch
                });
            }
            let (tx, _) = watch::channel(None);
            flights.insert(
                slot.clone(),
                Flight {
                    fingerprint: fp,
                    fate: tx,
                },
            );
        }
        // This task holds the flight: repeats now wait on it while the durable row is read
        // and, for a first, written.
        let mut lead = Lead {
            store: self.clone(),
            slot: slot.clone(),
            fp,
            ttl,
            told: false,
            owns: true,
        };
        let now = now_ms();
        let expires = expiry(now, ttl);
        let until = expiry(now, in_flight_for);
        match self
            .durable_begin(slot.clone(), fp, now, (expires, until))
            .await
        {
            Ok(Found::Fresh) => {
                let n = self
                    .inserted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n % PURGE_EVERY == PURGE_EVERY - 1 {
                    let store = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.purge(max_keys).await {
                            tracing::warn!(error = %e, "idempotency store: purge failed");
                        }
                    });
                }
                Ok(Begin::Lead(lead))
            }
            Ok(Found::Other) => {
                lead.release(None);
                Ok(Begin::Mismatch)
            }
            Ok(Found::Seen(fate)) => {
                lead.release(Some(fate.clone()));
                Ok(Begin::Seen(fate))
            }
            Ok(Found::Elsewhere) => {
                // This replica's repeats wait on the local flight, which watches the store
                // until the other replica's attempt has a fate (or its mark lapses: unknown).
                lead.owns = false;
                let rx = match self.flights().get(&slot) {
                    Some(f) => f.fate.subscribe(),
                    None => return Ok(Begin::Seen(Fate::Unknown)),
                };
                tokio::spawn(lead.watch_elsewhere());
                Ok(Begin::Wait(rx))
            }
            Err(e) => {
                lead.release(None);
                Err(e)
            }
        }
    }

    /// The durable row of a first attempt's key (see [`Found`]).
    async fn durable_begin(
        &self,
        slot: Slot,
        fp: Fingerprint,
        now: i64,
        (expires, until): (i64, i64),
    ) -> Result<Found, String> {
        let seen = move |row: &Row| -> Result<Fate, ()> {
            if row.fingerprint != fp {
                return Err(());
            }
            Ok(match (row.state, &row.stored) {
                (State::Done, Some(s)) => Fate::Done(s.clone()),
                (State::Done, None) => Fate::DoneUnreplayable,
                // A row in flight with no flight here: the gateway stopped mid-call.
                _ => Fate::Unknown,
            })
        };
        let fresh = Row {
            fingerprint: fp,
            state: State::InFlight,
            stored: None,
            created_ms: now,
            expires_ms: expires,
        };
        let found = |r: Result<Fate, ()>| r.map_or(Found::Other, Found::Seen);
        let memory = |rows: &Mutex<MemoryRows>, slot: Slot, fresh: Row| {
            let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(row) = rows.rows.get(&slot).filter(|r| r.expires_ms > now) {
                return found(seen(row));
            }
            rows.rows.insert(slot, fresh);
            Found::Fresh
        };
        match &self.durable {
            Durable::Memory(rows) => Ok(memory(rows, slot, fresh)),
            Durable::Fleet(fleet, rows) => {
                let k = fleet.idempotency_key(&slot.0, &slot.1);
                let mark = remote::encode(b'I', &fp, until, None);
                let ttl = Duration::from_millis(u64::try_from(expires - now).unwrap_or(1));
                match fleet.idempotency_claim(&k, &mark, ttl).await {
                    Ok(None) => Ok(Found::Fresh),
                    Ok(Some(v)) => Ok(match remote::decode(&v) {
                        Some(r) if r.fingerprint != fp => Found::Other,
                        Some(r) if r.state == State::InFlight && r.until_ms > now => {
                            Found::Elsewhere
                        }
                        Some(r) => found(seen(&r.row())),
                        // Unreadable: whatever it was, its outcome is not known here.
                        None => Found::Seen(Fate::Unknown),
                    }),
                    Err(_) => {
                        fleet.fell_back("idempotency", crate::config::OnFailure::Local);
                        Ok(memory(rows, slot, fresh))
                    }
                }
            }
            Durable::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                    let row = read_row(&conn, &slot, now)?;
                    if let Some(row) = row {
                        return Ok(found(seen(&row)));
                    }
                    write_row(&conn, &slot, &fresh)?;
                    Ok(Found::Fresh)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e: rusqlite::Error| e.to_string())
            }
        }
    }

    async fn durable_finish(
        &self,
        slot: Slot,
        fp: Fingerprint,
        fate: Option<Fate>,
        ttl: Duration,
    ) -> Result<(), String> {
        let expires = expiry(now_ms(), ttl);
        let released = matches!(fate, Some(Fate::Released));
        let for_rows = fate.clone();
        let update = move |row: &mut Row| match &for_rows {
            Some(Fate::Done(s)) => {
                row.state = State::Done;
                row.stored = Some(s.clone());
                row.expires_ms = expires;
            }
            Some(Fate::DoneUnreplayable) => {
                row.state = State::Done;
                row.stored = None;
                row.expires_ms = expires;
            }
            _ => {
                row.state = State::Unknown;
                row.expires_ms = expires;
            }
        };
        let memory = |rows: &Mutex<MemoryRows>, slot: &Slot| {
            let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
            if released {
                rows.rows.remove(slot);
            } else if let Some(row) = rows.rows.get_mut(slot) {
                update(row);
            }
        };
        match &self.durable {
            Durable::Memory(rows) => {
                memory(rows, &slot);
                Ok(())
            }
            Durable::Fleet(fleet, rows) => {
                // The local rows hold it if the first attempt began while the store was down.
                memory(rows, &slot);
                let k = fleet.idempotency_key(&slot.0, &slot.1);
                let r = match &fate {
                    Some(Fate::Released) | None => fleet.idempotency_del(&k).await,
                    Some(Fate::Done(s)) => {
                        let v = remote::encode(b'D', &fp, 0, Some(s));
                        fleet.idempotency_put(&k, &v, ttl).await
                    }
                    Some(Fate::DoneUnreplayable) => {
                        let v = remote::encode(b'D', &fp, 0, None);
                        fleet.idempotency_put(&k, &v, ttl).await
                    }
                    Some(Fate::Unknown) => {
                        let v = remote::encode(b'U', &fp, 0, None);
                        fleet.idempotency_put(&k, &v, ttl).await
                    }
                };
                r.map_err(|_| "the fleet store is unavailable".to_string())
            }
            Durable::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                    if released {
                        conn.execute(
                            "DELETE FROM idempotency WHERE client = ?1 AND key = ?2",
                            params![&*slot.0, &*slot.1],
                        )?;
                        return Ok(());
                    }
                    if let Some(mut row) = read_row(&conn, &slot, i64::MIN)? {
                        update(&mut row);
                        write_row(&conn, &slot, &row)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e: rusqlite::Error| e.to_string())
            }
        }
    }

    /// Expired keys out, and the oldest beyond `max_keys`. Returns how many went.
    pub async fn purge(&self, max_keys: u64) -> Result<usize, String> {
        let now = now_ms();
        let max = max_keys;
        match &self.durable {
            Durable::Memory(rows) | Durable::Fleet(_, rows) => {
                // (Fleet mode: Redis expires its keys itself; these are the outage's rows.)
                let mut rows = rows.lock().unwrap_or_else(PoisonError::into_inner);
                let before = rows.rows.len();
                rows.rows
                    .retain(|_, r| r.expires_ms > now || r.state == State::InFlight);
                let over = rows.rows.len().saturating_sub(max as usize);
                if over > 0 {
                    let mut by_age: Vec<(i64, Slot)> = rows
                        .rows
                        .iter()
                        .filter(|(_, r)| r.state != State::InFlight)
                        .map(|(s, r)| (r.created_ms, s.clone()))
                        .collect();
                    by_age.sort();
                    for (_, s) in by_age.into_iter().take(over) {
                        rows.rows.remove(&s);
                    }
                }
                Ok(before - rows.rows.len())
            }
            Durable::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                    let mut n = conn.execute(
                        "DELETE FROM idempotency WHERE expires_ms <= ?1 AND state <> 'in_flight'",
                        [now],
                    )?;
                    let count: i64 =
                        conn.query_row("SELECT count(*) FROM idempotency", [], |r| r.get(0))?;
                    let over = count.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
                    if over > 0 {
                        n += conn.execute(
                            "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency
                             WHERE state <> 'in_flight' ORDER BY created_ms LIMIT ?1)",
                            [over],
                        )?;
                    }
                    Ok(n)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e: rusqlite::Error| e.to_string())
            }
        }
    }

    /// Keys kept (tests, metrics).
    pub async fn keys_kept(&self) -> usize {
        match &self.durable {
            Durable::Memory(rows) | Durable::Fleet(_, rows) => rows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .rows
                .len(),
            Durable::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                    conn.query_row("SELECT count(*) FROM idempotency", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .unwrap_or(0)
                })
                .await
                .map_or(0, |n| usize::try_from(n).unwrap_or(0))
            }
        }
    }
}

/// The fleet store's value: state (`I`n flight, `D`one, `U`nknown), fingerprint, the in-flight
/// mark's end (ms), then a done answer in the coalescing codec.
mod remote {
    use super::*;
    use crate::fleet::RemoteAnswer;

    pub struct Remote {
        pub state: State,
        pub fingerprint: Fingerprint,
        pub until_ms: i64,
        pub stored: Option<Arc<Stored>>,
    }

    impl Remote {
        pub fn row(&self) -> Row {
            Row {
                fingerprint: self.fingerprint,
                state: self.state,
                stored: self.stored.clone(),
                created_ms: 0,
                expires_ms: i64::MAX,
            }
        }
    }

    pub fn encode(state: u8, fp: &Fingerprint, until_ms: i64, stored: Option<&Stored>) -> Vec<u8> {
        let mut out = Vec::with_capacity(41 + stored.map_or(0, |s| s.body.len() + 64));
        out.push(state);
        out.extend_from_slice(fp);
        out.extend_from_slice(&until_ms.to_be_bytes());
        if let Some(s) = stored {
            let answer = RemoteAnswer::Answer {
                status: StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK),
                headers: s.header_map(),
                body: s.body.clone(),
            };
            out.extend_from_slice(&answer.encode());
        }
        out
    }

    pub fn decode(v: &[u8]) -> Option<Remote> {
        if v.len() < 41 {
            return None;
        }
        let state = match v[0] {
            b'I' => State::InFlight,
            b'D' => State::Done,
            b'U' => State::Unknown,
            _ => return None,
        };
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&v[1..33]);
        let until_ms = i64::from_be_bytes(v[33..41].try_into().ok()?);
        let stored = if v.len() > 41 {
            match RemoteAnswer::decode(&v[41..])? {
                RemoteAnswer::Answer {
                    status,
                    headers,
                    body,
                } => Some(Arc::new(Stored::of(status, &headers, &body))),
                RemoteAnswer::Failed { .. } => None,
            }
        } else {
            None
        };
        Some(Remote {
            state,
            fingerprint,
            until_ms,
            stored,
        })
    }
}

fn read_row(conn: &Connection, slot: &Slot, now: i64) -> rusqlite::Result<Option<Row>> {
    conn.prepare_cached(
        "SELECT fingerprint, state, status, headers, body, created_ms, expires_ms
         FROM idempotency WHERE client = ?1 AND key = ?2 AND expires_ms > ?3",
    )?
    .query_row(params![&*slot.0, &*slot.1, now], |r| {
        let fp: Vec<u8> = r.get(0)?;
        let state: String = r.get(1)?;
        let status: Option<u16> = r.get(2)?;
        let headers: Option<Vec<u8>> = r.get(3)?;
        let body: Option<Vec<u8>> = r.get(4)?;
        let mut fingerprint = [0u8; 32];
        if fp.len() == 32 {
            fingerprint.copy_from_slice(&fp);
        }
        let stored = match (status, body) {
            (Some(status), Some(body)) => Some(Arc::new(Stored {
                status,
                headers: Stored::decode_headers(headers.as_deref().unwrap_or(b"[]")),
                body: Bytes::from(body),
            })),
            _ => None,
        };
        Ok(Row {
            fingerprint,
            state: State::parse(&state),
            stored,
            created_ms: r.get(5)?,
            expires_ms: r.get(6)?,
        })
    })
    .optional()
}

fn write_row(conn: &Connection, slot: &Slot, row: &Row) -> rusqlite::Result<()> {
    let (status, headers, body) = match &row.stored {
        Some(s) => (
            Some(s.status),
            Some(s.encode_headers()),
            Some(s.body.to_vec()),
        ),
        None => (None, None, None),
    };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO idempotency
         (client, key, fingerprint, state, status, headers, body, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        &*slot.0,
        &*slot.1,
        &row.fingerprint[..],
        row.state.as_str(),
        status,
        headers,
        body,
        row.created_ms,
        row.expires_ms
    ])?;
    Ok(())
}

impl Lead {
    /// Tell the first attempt's fate: kept durably, then every waiting repeat is released.
    pub async fn finish(mut self, fate: Fate) {
        self.told = true;
        let store = self.store.clone();
        if let Err(e) = store
            .durable_finish(self.slot.clone(), self.fp, Some(fate.clone()), self.ttl)
            .await
        {
            tracing::error!(error = %e, "idempotency store: the first attempt's fate could not be kept");
        }
        self.release(Some(fate));
    }

    /// Fleet mode: another replica's first attempt is in flight; watch the store until it has
    /// a fate, then tell this replica's waiters. A mark that lapses without one is unknown.
    async fn watch_elsewhere(mut self) {
        let Durable::Fleet(fleet, _) = &self.store.durable else {
            self.release(Some(Fate::Unknown));
            return;
        };
        let fleet = fleet.clone();
        let k = fleet.idempotency_key(&self.slot.0, &self.slot.1);
        let mut every = tokio::time::interval(Duration::from_millis(50));
        loop {
            every.tick().await;
            let now = now_ms();
            let Ok(v) = fleet.idempotency_get(&k).await else {
                continue;
            };
            let fate = match v.as_deref().map(remote::decode) {
                // Gone: the first attempt left nothing behind; the waiters try again.
                None => Some(Fate::Released),
                Some(None) => Some(Fate::Unknown),
                Some(Some(r)) if r.fingerprint != self.fp => Some(Fate::Released),
                Some(Some(r)) if r.state == State::InFlight => {
                    (r.until_ms <= now).then_some(Fate::Unknown)
                }
                Some(Some(r)) => match (r.state, r.stored) {
                    (State::Done, Some(s)) => Some(Fate::Done(s)),
                    (State::Done, None) => Some(Fate::DoneUnreplayable),
                    _ => Some(Fate::Unknown),
                },
            };
            if let Some(f) = fate {
                self.release(Some(f));
                return;
            }
        }
    }

    /// Drop the flight and tell the waiters (`None`: they look again).
    fn release(&mut self, fate: Option<Fate>) {
        self.told = true;
        if let Some(f) = self.store.flights().remove(&self.slot) {
            let _ = f.fate.send(Some(fate.unwrap_or(Fate::Released)));
        }
    }
}

impl Drop for Lead {
    /// A first attempt dropped before its fate was told (its task was cancelled): unknown.
    fn drop(&mut self) {
        if !self.told {
            let store = self.store.clone();
            let (slot, fp, ttl) = (self.slot.clone(), self.fp, self.ttl);
            self.release(Some(Fate::Unknown));
            if !self.owns {
                return;
            }
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store
                        .durable_finish(slot, fp, Some(Fate::Unknown), ttl)
                        .await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
