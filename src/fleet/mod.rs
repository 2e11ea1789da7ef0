//! Fleet mode: the state that must be one across replicas (rate limits, budgets, the status
//! cache, checkpoint coalescing) lives in one Redis when `[fleet] redis_url` is set. Without
//! it (embedded mode) none of this runs: the layers check `Process::fleet` (an
//! `Option<Arc<Fleet>>`) once and go on with the per-process state.
//!
//! # Keys
//!
//! Every key and the one channel start with `fleet.key_prefix` (default `lgw:`), so several
//! gateways can share a Redis. One Redis, not a cluster: the scripts touch keys of different
//! accounts and clients together, so a cluster would need hash tags (`{…}`) on all of them;
//! they are not there. **Redis 7.0 or later**: the checkpoint lease is taken with `SET … NX PX
//! … GET` (`NX` with `GET` came in 7.0); on an older server every checkpoint falls back to
//! per-replica coalescing. The replica reads `INFO server` once, when it first reaches the
//! store, and logs an error naming the version when it is older.
//!
//! | key | type, TTL | what |
//! |---|---|---|
//! | `P marker` | string, none | set with the budget seed; missing = the store is new or came back empty |
//! | `P gcra:NAME:COUNT/PERIODms/BURST:a:ACCOUNT` (`:c:CLIENT`) | string, until the bucket is full | GCRA theoretical arrival time (µs, Redis clock) of an account/rule or client limit; the limit's identity is in the key, so a changed quota starts afresh, as a local reload does |
//! | `P cool:ACCOUNT` | string, `upstream_429_cooldown` | upstream RATE_LIMITED cooldown |
//! | `P budget:DAY:CLIENT` | hash `spent`, `reserved`, 3 days | daily budget (DAY: days since the epoch, UTC) |
//! | `P status:ACCOUNT` | string, `status_cache.ttl` | `connected` / `checkpoint_required` |
//! | `P lease:ACCOUNT` | string `TOKEN\t=SHA256(code)` (hex; `TOKEN\t-` without a code), `checkpoint_lease` (renewed) | the replica making the checkpoint call; the 2FA code itself is never stored (a 6-digit code's hash is easily reversed, but it is single-use and the lease lives only while the call does) |
//! | `P answer:TOKEN` | bytes, 30 s | that call's answer, for followers that subscribed late |
//! | channel `P events` | pub/sub | `s…` status changed (drop local copies), `f…` a checkpoint answer |
//!
//! # Scripts and round trips
//!
//! Scripts (see `scripts.rs`) run with `EVALSHA` (reloaded by `redis::Script` after a restart)
//! and read the server clock (`TIME`), so replica clocks do not matter.
//!
//! - A request that reaches `account_limit` (it is about to be forwarded): **1 round trip on
//!   the caller's path**, the `admit` script: upstream-429 cooldown, account/rule GCRA,
//!   per-client GCRA and the budget reservation, all or nothing (nothing is consumed when any
//!   part refuses; a refusal costs that one round trip and nothing else). After the answer,
//!   **1 more off the caller's path**, `settle`, on the call's own task (retried every 500 ms
//!   while the store is down, for up to an hour); skipped when nothing was reserved and
//!   nothing charged (a free request).
//! - An upstream RATE_LIMITED answer: 1 more (`SET cool PX`).
//! - `POST /v2/checkpoint`: the status lookup is served from the replica's local copy
//!   (`fleet.local_status_ttl`, unknown accounts included) or costs 1 `GET`; a cache hit costs
//!   that and nothing else. A checkpoint that goes upstream: the lookup, 1 for the lease
//!   (`SET NX PX GET`), the `admit` and `settle` above, 1 for what the answer teaches the
//!   status cache (`SET PX` + `PUBLISH`, pipelined), 1 to publish the answer (store, release,
//!   `PUBLISH`, one script), and 1 per renewal every lease/3 while the call runs. A follower on
//!   another replica: the lookup, the lease attempt, 1 pipelined `GET` of the stored answer
//!   and the lease, then it waits for the pub/sub message (re-reading both every lease/4,
//!   50–500 ms, to notice a dead leader). Followers on the same replica as a leader or
//!   follower cost nothing (the local `Flights` dedupe first).
//! - Requests the layers above `account_limit` answer or refuse (cache hits aside): 0.
//! - In the background, per replica: the probe (`PING` + `EXISTS marker`, pipelined) every
//!   500 ms (and `INFO server` once, for the version), and one pub/sub connection. `linkup_gateway_fleet_round_trips_total{op}` counts
//!   all of them by operation (`probe` included, so per-request figures leave it out).
//!
//! # Failure
//!
//! Every command a request waits for is bounded by `fleet.timeout`. (The connection itself
//! waits up to 5 s, so background work gets a definite answer: an `admit` answered after its
//! caller gave up has its reservation given back, and a settle is retried only after a
//! definite failure.) A failure (I/O, a dropped connection, or a server that cannot serve:
//! `LOADING`, `READONLY`, `MASTERDOWN`…) or a timeout opens a breaker; an error reply to one
//! command (`WRONGTYPE`, a script error) fails that command only and is counted in
//! `linkup_gateway_fleet_store_errors_total`, the store stays in use. While the breaker is
//! open, the store counts as down and no request pays a timeout; a background probe (`PING`
//! every 500 ms) closes it again, so replicas return to shared state by themselves. While it
//! is down, `fleet.on_store_failure` decides: `local` uses the replica's own limiters, budgets,
//! status cache and coalescing (counted in `linkup_gateway_fleet_fallbacks_total{part,
//! decision="local"}` and logged when the breaker opens); `deny` refuses requests that cost
//! credits with 503 `STORE_UNAVAILABLE` (Retry-After 1), and lets free requests go on with
//! local state. Limits default to `local`, budgets to `deny`.
//!
//! A store that comes back empty (restart without persistence, failover to an empty replica)
//! has lost its marker: `admit` and `settle` refuse to run without it, the breaker opens, and
//! the probe reseeds today's `spent` per client from the ledger (`spent_on(today)`, the ledger
//! is shared in a fleet) with HSETNX semantics and sets the marker in the same script, so only
//! one replica seeds. A reservation belongs to the store it was made in: `admit` returns the
//! marker's value, the request carries it (in its `admission::Reservation`) and `settle` passes it
//! back; a settle that finds another marker (the store was reseeded since) adds its charge to
//! `spent` and leaves `reserved` alone, since that now counts only reservations made after the
//! reseed. What stays open, for requests in flight across the restart (bounded by what they
//! cost): their reservations are lost, so requests admitted after the reseed do not see them
//! and the budget can be **overshot** by up to their cost; a settle that lands before the
//! reseed (no marker) is skipped, and its charge reaches the store only through its ledger
//! row, if the reseed read that row (if not, the charge is missing from the store for the day:
//! overshot by it); a settle that lands after the reseed whose ledger row the reseed already
//! counted is counted twice (spent early). Rate limit buckets and cooldowns start afresh, as
//! after a local restart. With per-replica SQLite
//! ledgers instead of one shared ledger, the first replica's spending wins the reseed.
//!
//! While the breaker is open, the replica's status cache is its own and starts from what it
//! learns during the outage (whatever it learned while the store was up went to the store),
//! and checkpoint coalescing is per replica (two replicas may then each make one call). The
//! `linkup_gateway_status_cache_entries` gauge counts only the replica's own entries, so in
//! fleet mode it shows what was learned during outages.

mod admit;
mod idempotency;
mod lease;
mod scripts;
mod status;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;
use tokio::sync::watch;

use crate::config::{FleetSettings, OnFailure};
use crate::layers::status_cache::CachedStatus;
use crate::ledger::Ledger;
use crate::metrics::{FleetMetrics, OpLabels, PartLabels};

pub use admit::{Admission, AdmitRequest, BudgetCheck, LimitCheck, Part, Shadowed};
pub use lease::{FlightRole, LeaderLease, RemoteAnswer};

/// How often the probe looks at the store (and at its marker).
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Budget hashes outlive their day by this much (a request in flight across midnight settles
/// into yesterday's hash).
const BUDGET_TTL_SECS: u64 = 3 * 86_400;
/// How long background work (settles) waits for the store's answer before it counts as
/// failed and is retried.
const PATIENCE: Duration = Duration::from_secs(5);
/// How long a published checkpoint answer stays readable for late followers.
const ANSWER_TTL: Duration = Duration::from_secs(30);

/// The store could not be used for this operation (down, timed out, or empty and not yet
/// reseeded): the caller falls back as `fleet.on_store_failure` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the fleet store is unavailable")]
pub struct Unavailable;

/// Shared state of a fleet of replicas, in Redis. See the module docs.
pub struct Fleet {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    /// `fleet.on_store_failure.limits`.
    pub limits_on_failure: OnFailure,
    /// `fleet.on_store_failure.budgets`.
    pub budgets_on_failure: OnFailure,
    lease: Duration,
    up: AtomicBool,
    /// The pub/sub subscriber is subscribed (status copies are invalidated as they change).
    subscribed: AtomicBool,
    pub metrics: FleetMetrics,
    ledger: Arc<dyn Ledger>,
    /// Short local copies of account statuses (`None`: known to be unknown), dropped on a
    /// pub/sub message from another replica.
    local_status: moka::future::Cache<Arc<str>, Option<CachedStatus>>,
    /// Bumped on every status invalidation: a `GET` that raced with one does not keep its
    /// (possibly stale) answer as the local copy.
    status_epoch: AtomicU64,
    /// Followers waiting for a checkpoint answer, by the leader's token.
    flights: Mutex<HashMap<String, watch::Sender<Option<Bytes>>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// This replica's id in pub/sub messages (its own messages are skipped).
    instance: String,
    reseeding: tokio::sync::Mutex<()>,
    /// Settles spawned and not yet done (see [`Fleet::drain`]).
    pending_settles: Arc<std::sync::atomic::AtomicUsize>,
    /// The server's version was read (once, see [`Fleet::check_version`]).
    version_checked: AtomicBool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish()
    }
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Fleet {
    /// Connect to `fleet.redis_url` and start the probe and the pub/sub subscriber (they end
    /// when the `Fleet` is dropped, or on [`Fleet::shutdown`]). An unreachable Redis is not an
    /// error: the fleet starts down (local or deny, as configured) and the probe brings it up.
    /// Err only for a missing or malformed URL; the message never holds the URL.
    pub async fn connect(
        settings: &FleetSettings,
        ledger: Arc<dyn Ledger>,
    ) -> Result<Arc<Fleet>, String> {
        let url = settings
            .redis_url
            .as_ref()
            .ok_or_else(|| "fleet.redis_url is not set".to_string())?;
        let client = redis::Client::open(url.expose())
            .map_err(|_| "fleet.redis_url is not a valid Redis URL".to_string())?;
        let timeout = settings.timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            // Callers stop waiting after `fleet.timeout` (see `run`); the connection itself
            // waits longer, so work that must not be repeated blindly (a settle, a reservation
            // given back) gets a definite answer from a slow store instead of an ambiguous
            // timeout.
            .set_response_timeout(Some(PATIENCE.max(timeout)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("cannot set up the fleet store connection: {:?}", e.kind()))?;
        let local_ttl = settings.local_status_ttl.max(Duration::from_millis(1));
        let fleet = Arc::new(Fleet {
            conn,
            prefix: settings.key_prefix.clone(),
            timeout,
            limits_on_failure: settings.on_store_failure.limits,
            budgets_on_failure: settings.on_store_failure.budgets,
            lease: settings.checkpoint_lease,
            up: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            metrics: FleetMetrics::default(),
            ledger,
            local_status: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(local_ttl)
                .build(),
            status_epoch: AtomicU64::new(0),
            flights: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            instance: random_hex(8),
            reseeding: tokio::sync::Mutex::new(()),
            pending_settles: Arc::default(),
            version_checked: AtomicBool::new(false),
        });
        // Up at once when the store answers, so the first requests use it.
        fleet.probe_once().await;
        let probe = tokio::spawn(probe_loop(Arc::downgrade(&fleet)));
        let sub = tokio::spawn(subscriber(Arc::downgrade(&fleet), client));
        fleet
            .lock_tasks()
            .extend([probe.abort_handle(), sub.abort_handle()]);
        Ok(fleet)
    }

    /// Wait (up to `within`) until every settle spawned so far has reached the store, and
    /// every admit still running has been answered (its reservation given back if nobody took
    /// it): call it on shutdown after the last request, before the process exits. True when
    /// none is left.
    pub async fn drain(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = self.pending_settles.load(Ordering::Acquire);
            if left == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    settles = left,
                    "fleet: settles still waiting for the store at shutdown; their reservations stay held until the day ends"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop the background tasks (also done on drop).
    pub fn shutdown(&self) {
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
    }

    fn lock_tasks(&self) -> MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Is the store in use (breaker closed)?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Is the pub/sub subscriber subscribed? While it is not, local status copies may miss
    /// another replica's change for up to `fleet.local_status_ttl`.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// `fleet.checkpoint_lease`.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + kind.len() + rest.len() + 1);
        k.push_str(&self.prefix);
        k.push_str(kind);
        if !rest.is_empty() {
            k.push(':');
            k.push_str(rest);
        }
        k
    }

    fn marker_key(&self) -> String {
        self.key("marker", "")
    }

    fn channel(&self) -> String {
        self.key("events", "")
    }

    /// Count a fallback to local state (or a denial) for `part`.
    pub fn fell_back(&self, part: &'static str, decision: OnFailure) {
        self.metrics
            .fallbacks
            .get_or_create(&PartLabels {
                part,
                decision: match decision {
                    OnFailure::Local => "local",
                    OnFailure::Deny => "deny",
                },
            })
            .inc();
    }

    fn mark_down(&self, op: &'static str, why: &str) {
        self.metrics
            .store_errors
            .get_or_create(&OpLabels { op })
            .inc();
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.store_up.set(0);
            tracing::warn!(
                op,
                error = why,
                limits = ?self.limits_on_failure,
                budgets = ?self.budgets_on_failure,
                "fleet store down: limits, budgets, status cache and coalescing fall back as fleet.on_store_failure says until the probe sees it again"
            );
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.store_up.set(1);
            tracing::info!("fleet store up: back to shared state");
        }
    }

    /// One operation against the store: refused at once while the breaker is open, bounded by
    /// `fleet.timeout`, counted; a failure opens the breaker.
    async fn run<T, F>(&self, op: &'static str, fut: F) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(Unavailable);
        }
        self.raw(op, fut).await
    }

    /// As [`Fleet::run`], without looking at the breaker (the probe, the reseed).
    async fn raw<T, F>(&self, op: &'static str, fut: F) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        self.bounded(op, fut, self.timeout).await
    }

    async fn bounded<T, F>(
        &self,
        op: &'static str,
        fut: F,
        within: Duration,
    ) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        self.metrics
            .round_trips
            .get_or_create(&OpLabels { op })
            .inc();
        match tokio::time::timeout(within, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if !store_failure(&e) => {
                // The store answered: this command is wrong, the store is not down.
                self.metrics
                    .store_errors
                    .get_or_create(&OpLabels { op })
                    .inc();
                tracing::warn!(op, error = %e, "fleet store refused a command (the store stays in use)");
                Err(Unavailable)
            }
            Ok(Err(e)) => {
                self.mark_down(op, &e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.mark_down(op, "timed out");
                Err(Unavailable)
            }
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// PING and look for the marker; reseed when it is gone; close the breaker when all is
    /// well.
    async fn probe_once(&self) {
        let mut pipe = redis::pipe();
        pipe.cmd("PING").ignore().exists(self.marker_key());
        let mut c = self.conn();
        let r: Result<(bool,), _> = self.raw("probe", pipe.query_async(&mut c)).await;
        if r.is_ok() && !self.version_checked.load(Ordering::Acquire) {
            self.check_version().await;
        }
        match r {
            Ok((true,)) => self.mark_up(),
            Ok((false,)) => {
                if self.reseed().await.is_ok() {
                    self.mark_up();
                }
            }
            Err(Unavailable) => {}
        }
    }

    /// Read the server's version once (`INFO server`) and say so loudly when it is older than
    /// 7.0, which the checkpoint lease needs (`SET NX PX GET`).
    async fn check_version(&self) {
        let mut c = self.conn();
        let info: Result<String, _> = self
            .raw("info", redis::cmd("INFO").arg("server").query_async(&mut c))
            .await;
        let Ok(info) = info else { return };
        self.version_checked.store(true, Ordering::Release);
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::trim);
        match version.map(|v| (v, v.split('.').next().and_then(|m| m.parse::<u32>().ok()))) {
            Some((v, Some(major))) if major < 7 => tracing::error!(
                redis_version = v,
                "fleet store is Redis {v}: fleet mode needs Redis 7.0 or later (the checkpoint lease uses SET NX PX GET); checkpoint coalescing across replicas will not work"
            ),
            Some((v, _)) => tracing::debug!(redis_version = v, "fleet store version"),
            None => tracing::warn!(
                "fleet store did not report redis_version in INFO server; fleet mode needs Redis 7.0 or later"
            ),
        }
    }

    /// The store is new or came back empty: seed today's spending from the ledger and set the
    /// marker (only the first replica to get here writes; see the module docs).
    async fn reseed(&self) -> Result<(), Unavailable> {
        let _one = self.reseeding.lock().await;
        let now = crate::budgets::now_ms();
        let day = crate::budgets::utc_day(now);
        let ledger = self.ledger.clone();
        let date = crate::ledger::day_of(now);
        let spent = match tokio::task::spawn_blocking(move || ledger.spent_on(date)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "fleet store is empty but the ledger cannot be read to reseed budgets; staying down");
                return Err(Unavailable);
            }
            Err(_) => return Err(Unavailable),
        };
        let mut inv = scripts::reseed().prepare_invoke();
        inv.key(self.marker_key());
        inv.arg(format!("{} {}", self.instance, now))
            .arg(BUDGET_TTL_SECS);
        for (client, credits) in &spent {
            inv.key(self.budget_key(day, client));
            inv.arg(*credits);
        }
        let mut c = self.conn();
        let seeded: i64 = self.raw("reseed", inv.invoke_async(&mut c)).await?;
        if seeded == 1 {
            self.metrics.reseeds.inc();
            tracing::warn!(
                clients = spent.len(),
                credits = spent.values().sum::<u64>(),
                "fleet store had no marker (new, or restarted empty): reseeded today's budgets from the ledger"
            );
        }
        Ok(())
    }

    fn budget_key(&self, day: i64, client: &str) -> String {
        self.key("budget", &format!("{day}:{client}"))
    }

    async fn on_message(&self, payload: &[u8]) {
        match payload.split_first() {
            Some((b's', rest)) => {
                let Ok(text) = std::str::from_utf8(rest) else {
                    return;
                };
                let Some((instance, account)) = text.split_once('\n') else {
                    return;
                };
                if instance != self.instance {
                    self.status_epoch.fetch_add(1, Ordering::AcqRel);
                    self.metrics.status_invalidations.inc();
                    self.local_status.invalidate(account).await;
                }
            }
            Some((b'f', rest)) => {
                let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                    return;
                };
                let Ok(token) = std::str::from_utf8(&rest[..nl]) else {
                    return;
                };
                let answer = Bytes::copy_from_slice(&rest[nl + 1..]);
                if let Some(tx) = self.lock_flights().get(token) {
                    tx.send_replace(Some(answer));
                }
            }
            _ => {}
        }
    }

    fn lock_flights(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Option<Bytes>>>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Does this error mean the store cannot be used (open the breaker), rather than that one
/// command was refused?
fn store_failure(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    !matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::ResponseError
                | ServerErrorKind::ExecAbort
                | ServerErrorKind::NoScript
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NotBusy
                | ServerErrorKind::NoSub
        ) | ErrorKind::Extension
            | ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
    )
}

async fn probe_loop(fleet: Weak<Fleet>) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(f) = fleet.upgrade() else { return };
        f.probe_once().await;
    }
}

/// The pub/sub subscriber: status invalidations and checkpoint answers. Reconnects by itself;
/// each (re)connection drops every local status copy, since messages may have been missed.
async fn subscriber(fleet: Weak<Fleet>, client: redis::Client) {
    loop {
        let Some((channel, timeout)) = fleet.upgrade().map(|f| (f.channel(), f.timeout)) else {
            return;
        };
        let connected = tokio::time::timeout(timeout.max(Duration::from_secs(1)), async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            RedisResult::Ok(ps)
        })
        .await;
        if let Ok(Ok(ps)) = connected {
            if let Some(f) = fleet.upgrade() {
                f.status_epoch.fetch_add(1, Ordering::AcqRel);
                f.local_status.invalidate_all();
                f.subscribed.store(true, Ordering::Release);
            }
            let mut stream = ps.into_on_message();
            let mut check = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        let Some(f) = fleet.upgrade() else { return };
                        f.on_message(msg.get_payload_bytes()).await;
                    }
                    _ = check.tick() => {
                        // A breaker opened by a command failure: the subscription may be dead
                        // too (a half-open connection never ends the stream).
                        let Some(f) = fleet.upgrade() else { return };
                        if !f.is_up() {
                            break;
                        }
                    }
                }
            }
        }
        match fleet.upgrade() {
            Some(f) => {
                f.subscribed.store(false, Ordering::Release);
                f.status_epoch.fetch_add(1, Ordering::AcqRel);
                f.local_status.invalidate_all();
            }
            None => return,
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
