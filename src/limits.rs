//! Rate-limit state: GCRA limiters (governor) keyed by account_id (or by client for requests
//! that name no account), per-client limiters, and the upstream-429 cooldowns.
//!
//! Limiters outlive a config generation: a SIGHUP reload reuses every limiter whose identity
//! (name, quota, burst) did not change, so a reload neither resets a bucket nor lets a burst
//! through. Idle keys are evicted on a timer, so millions of accounts over time cost memory
//! only while they are active.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::RateLimiter;
use http::HeaderValue;

use crate::config::{PathPattern, Quota, Settings};

/// governor's clock on tokio's time: limits follow `tokio::time::pause`/`advance` in tests,
/// and cost one `Instant::now()` per check in production.
#[derive(Clone, Debug)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

/// Whose bucket: an account, or a client for requests that name no account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Account(Arc<str>),
    Client(Arc<str>),
}

impl Hash for Subject {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Subject::Account(a) => {
                state.write_u8(0);
                a.hash(state)
            }
            Subject::Client(c) => {
                state.write_u8(1);
                c.hash(state)
            }
        }
    }
}

type Keyed =
    RateLimiter<Subject, DefaultKeyedStateStore<Subject>, TokioClock, StateInformationMiddleware>;

/// What a check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `remaining` cells of burst are left, and the bucket is full again in `reset`.
    Allow { remaining: u32, reset: Duration },
    /// Refused; retry after `wait`.
    Deny { wait: Duration },
}

/// One limit: a quota and burst, and the buckets of every subject it has seen.
pub struct Limiter {
    /// `account` for the default, the rule's name, or `client`.
    pub name: Arc<str>,
    pub quota: Quota,
    pub burst: u32,
    /// `RateLimit-Policy` item for this limit, built once.
    pub policy: HeaderValue,
    /// `"name"` as a `RateLimit` item starts, built once.
    item_name: Box<str>,
    emission: Duration,
    keyed: Keyed,
    clock: TokioClock,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("burst", &self.burst)
            .finish()
    }
}

/// Identity of a limiter's state: a reload keeps the buckets when all of this is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Identity {
    name: String,
    count: u32,
    period: Duration,
    burst: u32,
}

impl Limiter {
    pub fn new(name: &str, quota: Quota, burst: u32) -> Limiter {
        let emission = (quota.period / quota.count.max(1)).max(Duration::from_nanos(1));
        let burst = burst.max(1);
        let gq = governor::Quota::with_period(emission)
            .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let clock = TokioClock::default();
        let keyed: Keyed = RateLimiter::new(gq, DefaultKeyedStateStore::default(), clock.clone());
        let item_name = format!("\"{}\"", name.replace(['"', '\\'], ""));
        let policy = format!(
            "{item_name};q={};w={}",
            quota.count,
            quota.period.as_secs().max(1)
        );
        Limiter {
            name: Arc::from(name),
            quota,
            burst,
            policy: HeaderValue::from_str(&policy)
                .unwrap_or_else(|_| HeaderValue::from_static("\"limit\"")),
            item_name: item_name.into_boxed_str(),
            emission,
            keyed,
            clock,
        }
    }

    /// Take one cell for `subject`.
    pub fn check(&self, subject: &Subject) -> Verdict {
        match self.keyed.check_key(subject) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = self.burst.saturating_sub(remaining);
                Verdict::Allow {
                    remaining,
                    reset: self.emission.saturating_mul(used),
                }
            }
            Err(not_until) => Verdict::Deny {
                wait: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// Forget subjects whose buckets are full again (indistinguishable from new ones).
    /// The time one request takes of the quota (period / count).
    pub fn emission(&self) -> Duration {
        self.emission
    }

    pub fn evict_idle(&self) {
        self.keyed.retain_recent();
        self.keyed.shrink_to_fit();
    }

    pub fn tracked(&self) -> usize {
        self.keyed.len()
    }

    fn identity(&self) -> Identity {
        Identity {
            name: self.name.to_string(),
            count: self.quota.count,
            period: self.quota.period,
            burst: self.burst,
        }
    }
}

/// A `[[rate_limit.rules]]` entry: what it matches and its limiter.
#[derive(Debug)]
pub struct Rule {
    pub path: PathPattern,
    pub action: Option<String>,
    pub limiter: Arc<Limiter>,
    pub shadow: bool,
    /// `on_limit = "delay"`: the longest wait for a slot.
    pub pacing: Option<Duration>,
}

/// Pacing queues: one per (rule, account) with requests waiting for their slot, first come
/// first served (a fair `tokio` mutex: the head of the queue holds it while it waits). An
/// entry lives while someone waits on it; reloads keep them.
/// A pacing queue's rule name and account.
type QueueKey = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
pub struct Queues {
    gates: std::sync::Mutex<HashMap<QueueKey, Arc<Gate>>>,
    /// Requests waiting now, over every queue.
    pub waiting: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
pub struct Gate {
    pub turn: tokio::sync::Mutex<()>,
    /// Requests in this queue, the one at its head included.
    pub queued: std::sync::atomic::AtomicUsize,
}

/// A place in a pacing queue; leaving it (answered, refused or hung up) gives it back.
pub struct Place {
    queues: Arc<Queues>,
    key: QueueKey,
    pub gate: Arc<Gate>,
    /// How many were queued ahead when it joined.
    pub ahead: usize,
}

impl Queues {
    /// Join the queue of `rule` for `account`.
    pub fn join(self: &Arc<Self>, rule: &Arc<str>, account: &Arc<str>) -> Place {
        use std::sync::atomic::Ordering;
        let key = (rule.clone(), account.clone());
        // Counted under the map's lock, so a last leaver never removes a queue just joined.
        let (gate, ahead) = {
            let mut gates = self
                .gates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let gate = gates.entry(key.clone()).or_default().clone();
            let ahead = gate.queued.fetch_add(1, Ordering::AcqRel);
            (gate, ahead)
        };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Place {
            queues: self.clone(),
            key,
            gate,
            ahead,
        }
    }

    /// Queues with someone in them (tests).
    pub fn len(&self) -> usize {
        self.gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.queues.waiting.fetch_sub(1, Ordering::Relaxed);
        if self.gate.queued.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut gates = self
                .queues
                .gates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Nobody joined since: the queue goes.
            if self.gate.queued.load(Ordering::Acquire) == 0 {
                gates.remove(&self.key);
            }
        }
    }
}

/// Accounts held back after the upstream said RATE_LIMITED. Rare, so a lock is fine, and the
/// common case (no cooldown anywhere) never takes it.
#[derive(Debug, Default)]
pub struct Cooldowns {
    active: AtomicUsize,
    until: RwLock<HashMap<Arc<str>, tokio::time::Instant>>,
}

impl Cooldowns {
    /// Time left on `account`'s cooldown, if any.
    pub fn remaining(&self, account: &str) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) == 0 {
            return None;
        }
        let until = *self.until.read().ok()?.get(account)?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }

    pub fn hold(&self, account: Arc<str>, for_: Duration) {
        if for_.is_zero() {
            return;
        }
        if let Ok(mut m) = self.until.write() {
            m.insert(account, tokio::time::Instant::now() + for_);
            self.active.store(m.len(), Ordering::Release);
        }
    }

    fn evict_expired(&self) {
        if self.active.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Ok(mut m) = self.until.write() {
            let now = tokio::time::Instant::now();
            m.retain(|_, until| *until > now);
            m.shrink_to_fit();
            self.active.store(m.len(), Ordering::Release);
        }
    }

    pub fn len(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every limit of one config generation.
#[derive(Debug)]
pub struct Limits {
    pub default: Arc<Limiter>,
    pub default_shadow: bool,
    pub rules: Vec<Rule>,
    /// Per-client limiters by client name (`requests_per_second`).
    pub clients: HashMap<Arc<str>, Arc<Limiter>>,
    pub cooldowns: Arc<Cooldowns>,
    pub cooldown: Duration,
    pub queues: Arc<Queues>,
    /// Some rule paces (`on_limit = "delay"`).
    pub paces: bool,
}

impl Limits {
    /// Build the limits of `settings`, reusing the buckets of `previous` where a limiter's
    /// identity is unchanged.
    pub fn build(settings: &Settings, previous: Option<&Limits>) -> Limits {
        let mut old: HashMap<Identity, Arc<Limiter>> = HashMap::new();
        if let Some(p) = previous {
            for l in p.all() {
                old.insert(l.identity(), l.clone());
            }
        }
        let mut make = |name: &str, quota: Quota, burst: u32| -> Arc<Limiter> {
            let fresh = Limiter::new(name, quota, burst);
            match old.remove(&fresh.identity()) {
                Some(kept) => kept,
                None => Arc::new(fresh),
            }
        };
        let rl = &settings.rate_limit;
        let default = make("account", rl.per_account, rl.burst);
        let rules = rl
            .rules
            .iter()
            .map(|r| Rule {
                path: r.path.clone(),
                action: r.action.clone(),
                limiter: make(&r.name, r.per_account, r.burst),
                shadow: r.shadow,
                pacing: r.pacing,
            })
            .collect();
        let mut clients = HashMap::new();
        for c in &settings.clients {
            if let Some(rps) = c.requests_per_second {
                // Quotas are whole counts per period: 2.5/s is 5 per 2 s.
                let (count, period) = if rps >= 1.0 && rps.fract() == 0.0 {
                    (rps as u32, Duration::from_secs(1))
                } else {
                    let period = Duration::from_secs_f64((1.0 / rps).max(1e-6));
                    (1, period)
                };
                let quota = Quota { count, period };
                let name = format!("client {}", c.name);
                clients.insert(c.name.clone(), make(&name, quota, c.burst));
            }
        }
        Limits {
            default,
            default_shadow: rl.shadow,
            rules,
            clients,
            cooldowns: previous.map(|p| p.cooldowns.clone()).unwrap_or_default(),
            cooldown: rl.upstream_429_cooldown,
            queues: previous.map(|p| p.queues.clone()).unwrap_or_default(),
            paces: rl.rules.iter().any(|r| r.pacing.is_some()),
        }
    }

    /// The limiter for a request: the first rule matching path (and action), else the default.
    pub fn for_request(&self, path: &str, action: Option<&str>) -> (&Arc<Limiter>, bool) {
        match self.rule_for(path, action) {
            Some(r) => (&r.limiter, r.shadow),
            None => (&self.default, self.default_shadow),
        }
    }

    /// The first rule matching path (and action).
    pub fn rule_for(&self, path: &str, action: Option<&str>) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            let action_ok = match (&r.action, action) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
            };
            action_ok && r.path.matches(path)
        })
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Limiter>> {
        std::iter::once(&self.default)
            .chain(self.rules.iter().map(|r| &r.limiter))
            .chain(self.clients.values())
    }

    /// Drop idle buckets and expired cooldowns; returns the subjects still tracked.
    pub fn evict_idle(&self) -> usize {
        self.cooldowns.evict_expired();
        self.all()
            .map(|l| {
                l.evict_idle();
                l.tracked()
            })
            .sum()
    }
}

/// `RateLimit` header item (IETF draft): remaining cells and seconds until the bucket is full.
pub fn ratelimit_item(limiter: &Limiter, remaining: u32, reset: Duration) -> HeaderValue {
    use std::io::Write;
    let secs = reset.as_millis().div_ceil(1000);
    // On every answer that passed a limit: written on the stack, one allocation (the value).
    let mut buf = [0u8; 320];
    let mut w = std::io::Cursor::new(&mut buf[..]);
    let fits = write!(w, "{};r={remaining};t={secs}", limiter.item_name).is_ok();
    let len = usize::try_from(w.position()).unwrap_or(0);
    let value = match fits {
        true => HeaderValue::from_bytes(&buf[..len]),
        // A rule name too long for the buffer.
        false => HeaderValue::from_str(&format!("{};r={remaining};t={secs}", limiter.item_name)),
    };
    value.unwrap_or_else(|_| HeaderValue::from_static("\"limit\";r=0;t=0"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{load_str, parse_quota};

    fn settings(extra: &str) -> Settings {
        let text =
            format!("[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n{extra}");
        load_str(&text, &[("K".into(), "k".into())], None).unwrap()
    }

    fn acc(a: &str) -> Subject {
        Subject::Account(Arc::from(a))
    }

    #[tokio::test(start_paused = true)]
    async fn fourth_request_within_3_per_min_is_refused_then_allowed_again() {
        let l = Limiter::new("account", parse_quota("3/min").unwrap(), 3);
        for i in 0..3 {
            assert!(
                matches!(l.check(&acc("a")), Verdict::Allow { .. }),
                "request {i}"
            );
        }
        let Verdict::Deny { wait } = l.check(&acc("a")) else {
            panic!("4th must be refused")
        };
        assert_eq!(wait, Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(
            l.check(&acc("a")),
            Verdict::Allow { remaining: 0, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn accounts_have_independent_buckets() {
        let l = Limiter::new("account", parse_quota("1/min").unwrap(), 1);
        assert!(matches!(l.check(&acc("a")), Verdict::Allow { .. }));
        assert!(matches!(l.check(&acc("a")), Verdict::Deny { .. }));
        assert!(matches!(l.check(&acc("b")), Verdict::Allow { .. }));
        assert!(matches!(
            l.check(&Subject::Client(Arc::from("a"))),
            Verdict::Allow { .. }
        ));
    }

    #[test]
    fn remaining_and_reset_count_down() {
        let l = Limiter::new("account", parse_quota("60/min").unwrap(), 10);
        let Verdict::Allow { remaining, reset } = l.check(&acc("a")) else {
            panic!()
        };
        assert_eq!(remaining, 9);
        assert_eq!(reset, Duration::from_secs(1));
        assert_eq!(l.policy, "\"account\";q=60;w=60");
        assert_eq!(ratelimit_item(&l, 9, reset), "\"account\";r=9;t=1");
        // A rule name longer than the stack buffer still gets its own item.
        let long = "r".repeat(400);
        let l = Limiter::new(&format!("{long}\"x"), parse_quota("60/min").unwrap(), 10);
        assert_eq!(
            ratelimit_item(&l, 3, Duration::from_millis(1500)),
            format!("\"{long}x\";r=3;t=2").as_str()
        );
    }

    #[test]
    fn first_matching_rule_wins_and_action_must_match() {
        let s = settings(
            "[[rate_limit.rules]]\nname = \"invites\"\npath = \"/v2/network\"\naction = \"invite\"\nper_account = \"100/week\"\nburst = 5\n\
             [[rate_limit.rules]]\npath = \"/v2/network\"\nper_account = \"5/min\"\n",
        );
        let limits = Limits::build(&s, None);
        assert_eq!(
            &*limits.for_request("/v2/network", Some("invite")).0.name,
            "invites"
        );
        assert_eq!(
            &*limits.for_request("/v2/network", Some("accept")).0.name,
            "/v2/network"
        );
        assert_eq!(
            &*limits.for_request("/v2/network", None).0.name,
            "/v2/network"
        );
        assert_eq!(
            &*limits.for_request("/v2/profiles", Some("get")).0.name,
            "account"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reload_keeps_unchanged_buckets_and_resets_changed_ones() {
        let s1 = settings("[rate_limit]\nper_account = \"1/min\"\nburst = 1\n[[rate_limit.rules]]\nname = \"r\"\npath = \"/v2/network\"\nper_account = \"1/min\"\nburst = 1\n");
        let l1 = Limits::build(&s1, None);
        assert!(matches!(l1.default.check(&acc("a")), Verdict::Allow { .. }));
        assert!(matches!(
            l1.rules[0].limiter.check(&acc("a")),
            Verdict::Allow { .. }
        ));
        // Same default, changed rule quota.
        let s2 = settings("[rate_limit]\nper_account = \"1/min\"\nburst = 1\n[[rate_limit.rules]]\nname = \"r\"\npath = \"/v2/network\"\nper_account = \"2/min\"\nburst = 1\n");
        let l2 = Limits::build(&s2, Some(&l1));
        assert!(Arc::ptr_eq(&l1.default, &l2.default));
        assert!(
            matches!(l2.default.check(&acc("a")), Verdict::Deny { .. }),
            "kept"
        );
        assert!(
            matches!(l2.rules[0].limiter.check(&acc("a")), Verdict::Allow { .. }),
            "fresh"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cooldowns_expire() {
        let c = Cooldowns::default();
        assert_eq!(c.remaining("a"), None);
        c.hold(Arc::from("a"), Duration::from_secs(60));
        assert_eq!(c.remaining("a"), Some(Duration::from_secs(60)));
        assert_eq!(c.remaining("b"), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(c.remaining("a"), None);
        c.evict_expired();
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_subjects_are_evicted() {
        let l = Limiter::new("account", parse_quota("60/min").unwrap(), 10);
        for i in 0..1000 {
            l.check(&acc(&format!("acc_{i}")));
        }
        assert_eq!(l.tracked(), 1000);
        l.evict_idle();
        assert_eq!(l.tracked(), 1000, "recently used buckets stay");
        tokio::time::advance(Duration::from_secs(11)).await;
        l.evict_idle();
        assert_eq!(l.tracked(), 0, "full buckets are forgotten");
    }

    #[test]
    fn client_quotas_from_requests_per_second() {
        let s = settings(&format!(
            "[[clients]]\nname = \"a\"\nkey_sha256 = \"{}\"\nrequests_per_second = 2.5\n[[clients]]\nname = \"b\"\nkey_sha256 = \"{}\"\nrequests_per_second = 50\n",
            "1".repeat(64),
            "2".repeat(64)
        ));
        let l = Limits::build(&s, None);
        let a = &l.clients[&Arc::from("a")];
        assert_eq!(a.quota.period, Duration::from_millis(400));
        assert_eq!(a.burst, 3);
        let b = &l.clients[&Arc::from("b")];
        assert_eq!((b.quota.count, b.burst), (50, 50));
    }
}
