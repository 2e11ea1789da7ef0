//! Limits and budgets in the store: the one-round-trip `admit`, `settle`, and the upstream-429
//! cooldown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{scripts, Fleet, Unavailable, BUDGET_TTL_SECS, PATIENCE, PROBE_EVERY};
use crate::budgets::Standing;
use crate::limits::{Limiter, Subject};

/// One GCRA limit to check: the limiter (quota, burst, name) and whose bucket.
#[derive(Debug, Clone, Copy)]
pub struct LimitCheck<'a> {
    pub limiter: &'a Limiter,
    pub subject: &'a Subject,
    /// Count and log, never refuse.
    pub shadow: bool,
}

/// A budget reservation: `cost` against the client's `budget` for UTC `day` (days since the
/// epoch). `budget` None: unlimited, only tracked. `enforce` false (shadow): reserved even
/// over the budget, and reported.
#[derive(Debug, Clone, Copy)]
pub struct BudgetCheck<'a> {
    pub client: &'a str,
    pub cost: u64,
    pub budget: Option<u64>,
    pub enforce: bool,
    pub day: i64,
}

/// Everything one request needs checked and taken, in one round trip.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitRequest<'a> {
    /// The account's upstream-429 cooldown, and whether it is shadow.
    pub cooldown: Option<(&'a str, bool)>,
    /// The account/rule limit (or the per-client bucket of requests without an account).
    pub limit: Option<LimitCheck<'a>>,
    /// The per-client `requests_per_second`.
    pub client: Option<LimitCheck<'a>>,
    pub budget: Option<BudgetCheck<'a>>,
}

/// Which part refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cooldown,
    Limit,
    Client,
    Budget,
}

/// Shadow parts that would have refused (the request went on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shadowed {
    pub cooldown: bool,
    pub limit: bool,
    pub client: bool,
    pub budget: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Every part allowed and took its cell and reservation. `limit`: the remaining cells and
    /// time to a full bucket of the account/rule limit (for the `RateLimit` header), when it
    /// was checked and allowed. `standing`: the client's budget after the reservation.
    /// `marker`: the store's marker value at the reservation; pass it to the settle.
    Allowed {
        limit: Option<(u32, Duration)>,
        shadowed: Shadowed,
        standing: Standing,
        marker: Arc<str>,
    },
    /// `part` refused; nothing was taken. `wait`: Retry-After (zero for the budget);
    /// `standing`: the budget when `part` is `Budget`.
    Refused {
        part: Part,
        wait: Duration,
        standing: Standing,
    },
}

fn emission(l: &Limiter) -> Duration {
    (l.quota.period / l.quota.count.max(1)).max(Duration::from_nanos(1))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn nonneg(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `ADMIT`'s reply: code, part, wait_us, remaining, spent, reserved, shadow bits, marker.
type AdmitReply = (i64, i64, i64, i64, i64, i64, i64, String);

/// Counts a settle (or an admit whose reservation may have to be given back) from spawn to
/// end, whatever the end.
struct PendingSettle(Arc<AtomicUsize>);

impl PendingSettle {
    fn new(n: &Arc<AtomicUsize>) -> PendingSettle {
        n.fetch_add(1, Ordering::AcqRel);
        PendingSettle(n.clone())
    }
}

impl Drop for PendingSettle {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Fleet {
    fn gcra_key(&self, l: &Limiter, subject: &Subject) -> String {
        let (kind, who) = match subject {
            Subject::Account(a) => ("a", a),
            Subject::Client(c) => ("c", c),
        };
        self.key(
            "gcra",
            &format!(
                "{}:{}/{}ms/{}:{kind}:{who}",
                l.name,
                l.quota.count,
                l.quota.period.as_millis(),
                l.burst
            ),
        )
    }

    fn cooldown_key(&self, account: &str) -> String {
        self.key("cool", account)
    }

    /// The one round trip of a forwarded request: cooldown, limit, client limit and budget
    /// reservation, all or nothing.
    ///
    /// Cancellation-safe: the script runs on its own task; when nobody takes its answer (the
    /// caller went away, or `fleet.timeout` passed while the script still ran), a reservation
    /// it made is given back, so a slow store or a hung-up caller never leaks budget.
    pub async fn admit(self: &Arc<Self>, r: &AdmitRequest<'_>) -> Result<Admission, Unavailable> {
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut inv = scripts::admit().prepare_invoke();
        inv.key(self.marker_key());
        inv.key(match r.cooldown {
            Some((a, _)) => self.cooldown_key(a),
            None => self.key("cool", ""),
        });
        let lim_args = |c: Option<LimitCheck<'_>>| -> (String, u64, u64, bool) {
            match c {
                Some(c) => {
                    let t = emission(c.limiter);
                    let tau = t.saturating_mul(c.limiter.burst.max(1) - 1);
                    (
                        self.gcra_key(c.limiter, c.subject),
                        micros(t),
                        u64::try_from(tau.as_micros()).unwrap_or(u64::MAX),
                        c.shadow,
                    )
                }
                None => (self.key("gcra", ""), 1, 0, false),
            }
        };
        let (lk, lt, ltau, lshadow) = lim_args(r.limit);
        let (ck, ct, ctau, cshadow) = lim_args(r.client);
        inv.key(lk).key(ck);
        inv.key(match r.budget {
            Some(b) => self.budget_key(b.day, b.client),
            None => self.key("budget", ""),
        });
        inv.arg(flag(r.cooldown.is_some()))
            .arg(flag(r.cooldown.is_some_and(|c| c.1)))
            .arg(flag(r.limit.is_some()))
            .arg(lt)
            .arg(ltau)
            .arg(flag(lshadow))
            .arg(flag(r.client.is_some()))
            .arg(ct)
            .arg(ctau)
            .arg(flag(cshadow))
            .arg(flag(r.budget.is_some()))
            .arg(r.budget.map_or(0, |b| b.cost))
            .arg(
                r.budget
                    .and_then(|b| b.budget)
                    .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            )
            .arg(flag(r.budget.is_some_and(|b| b.enforce)))
            .arg(BUDGET_TTL_SECS);
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut c = self.conn();
        let (tx, rx) = tokio::sync::oneshot::channel::<redis::RedisResult<AdmitReply>>();
        let unclaimed = r
            .budget
            .filter(|b| b.cost > 0)
            .map(|b| (Arc::<str>::from(b.client), b.day, b.cost));
        let weak = Arc::downgrade(self);
        // A reservation that may have to be given back counts as a pending settle from now
        // on, so `drain` waits for the script's answer (and the give-back it may start).
        let pending = unclaimed
            .as_ref()
            .map(|_| PendingSettle::new(&self.pending_settles));
        tokio::spawn(async move {
            let _pending = pending;
            let res: redis::RedisResult<AdmitReply> = inv.invoke_async(&mut c).await;
            if let Err(Ok(v)) = tx.send(res) {
                let reserved = v.0 == 0;
                if let (true, Some((client, day, cost)), Some(f)) =
                    (reserved, unclaimed, weak.upgrade())
                {
                    tracing::debug!(client = %client, cost, "fleet admit answered after its caller left; giving the reservation back");
                    f.settle_eventually(client, day, cost, 0, Arc::from(v.7), |_| {});
                }
            }
        });
        let v: AdmitReply = self
            .run("admit", async {
                rx.await.unwrap_or_else(|_| {
                    Err(redis::RedisError::from(std::io::Error::other(
                        "the admit task ended without an answer",
                    )))
                })
            })
            .await?;
        let (code, part, wait_us, remaining, spent, reserved, bits, marker) = v;
        let standing = Standing {
            spent: nonneg(spent),
            reserved: nonneg(reserved),
        };
        match code {
            0 => {
                let limit = r.limit.filter(|_| bits & 2 == 0).map(|l| {
                    let remaining = u32::try_from(remaining.max(0)).unwrap_or(0);
                    let used = l.limiter.burst.saturating_sub(remaining);
                    (remaining, emission(l.limiter).saturating_mul(used))
                });
                Ok(Admission::Allowed {
                    limit,
                    shadowed: Shadowed {
                        cooldown: bits & 1 != 0,
                        limit: bits & 2 != 0,
                        client: bits & 4 != 0,
                        budget: bits & 8 != 0,
                    },
                    standing,
                    marker: Arc::from(marker),
                })
            }
            1 => {
                let part = match part {
                    1 => Part::Cooldown,
                    2 => Part::Limit,
                    3 => Part::Client,
                    _ => Part::Budget,
                };
                Ok(Admission::Refused {
                    part,
                    wait: Duration::from_micros(nonneg(wait_us)),
                    standing,
                })
            }
            _ => {
                // The store came back empty: no reservation before the budgets are reseeded.
                self.mark_down("admit", "the store lost its marker (restarted empty)");
                Err(Unavailable)
            }
        }
    }

    /// Replace a reservation made by [`Fleet::admit`] by what was charged. `marker`: the one
    /// [`Admission::Allowed`] carried; when the store was reseeded since, only the charge is
    /// added (the reservation went with the old store). `Ok(None)`: the store came back empty
    /// since and is not reseeded yet (the reservation is gone with it).
    pub async fn settle(
        &self,
        client: &str,
        day: i64,
        reserved: u64,
        charged: u64,
        marker: &str,
    ) -> Result<Option<Standing>, Unavailable> {
        self.settle_within(client, day, reserved, charged, marker, self.timeout)
            .await
    }

    async fn settle_within(
        &self,
        client: &str,
        day: i64,
        reserved: u64,
        charged: u64,
        marker: &str,
        within: Duration,
    ) -> Result<Option<Standing>, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut inv = scripts::settle().prepare_invoke();
        inv.key(self.marker_key())
            .key(self.budget_key(day, client))
            .arg(reserved)
            .arg(charged)
            .arg(BUDGET_TTL_SECS)
            .arg(marker);
        let mut c = self.conn();
        let v: Vec<i64> = self
            .bounded("settle", inv.invoke_async(&mut c), within)
            .await?;
        match (v.first().copied(), v.get(1).copied()) {
            (Some(spent), Some(reserved)) if spent >= 0 => Ok(Some(Standing {
                spent: nonneg(spent),
                reserved: nonneg(reserved),
            })),
            _ => Ok(None),
        }
    }

    /// [`Fleet::settle`], retried every probe interval while the store is down (for up to an
    /// hour; the budget hash outlives its day), so a reservation is never left held because
    /// the store blinked. Returns at once; the standing comes to `done` when it settles.
    ///
    /// Each attempt waits up to 5 s for the store's answer (not `fleet.timeout`), so a slow
    /// store gives a definite answer rather than an ambiguous timeout; only a connection lost
    /// with the script in flight, or a store slower than 5 s, can make a retry settle twice
    /// (spent counted twice, and the reserved count lowered twice, which can free another
    /// request's reservation early: off by that request's cost until it settles).
    pub fn settle_eventually(
        self: &Arc<Self>,
        client: Arc<str>,
        day: i64,
        reserved: u64,
        charged: u64,
        marker: Arc<str>,
        done: impl FnOnce(Option<Standing>) + Send + 'static,
    ) {
        if reserved == 0 && charged == 0 {
            // Nothing to move (a free request): no round trip.
            done(None);
            return;
        }
        let weak: Weak<Fleet> = Arc::downgrade(self);
        let pending = PendingSettle::new(&self.pending_settles);
        tokio::spawn(async move {
            let _pending = pending;
            let give_up = tokio::time::Instant::now() + Duration::from_secs(3600);
            loop {
                let Some(f) = weak.upgrade() else { return };
                if f.is_up() {
                    // Patient: a timeout here would be ambiguous (the script may have run),
                    // and a retry could then settle twice.
                    let settled = f
                        .settle_within(&client, day, reserved, charged, &marker, PATIENCE)
                        .await;
                    if let Ok(s) = settled {
                        done(s);
                        return;
                    }
                }
                drop(f);
                if tokio::time::Instant::now() > give_up {
                    tracing::error!(client = %client, reserved, charged, "fleet settle gave up after an hour: the reservation stays held in the store until the day ends");
                    return;
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        });
    }

    /// Hold `account` back for `for_` on every replica (upstream RATE_LIMITED).
    pub async fn hold(&self, account: &str, for_: Duration) -> Result<(), Unavailable> {
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return Ok(());
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.cooldown_key(account)).arg(1).arg("PX").arg(ms);
        let mut c = self.conn();
        self.run("cooldown", cmd.query_async::<()>(&mut c)).await
    }

    /// The client's budget today in the store (tests, `/usage`-like views).
    pub async fn standing(&self, client: &str, day: i64) -> Result<Standing, Unavailable> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.budget_key(day, client))
            .arg("spent")
            .arg("reserved");
        let mut c = self.conn();
        let (spent, reserved): (Option<u64>, Option<u64>) =
            self.run("standing", cmd.query_async(&mut c)).await?;
        Ok(Standing {
            spent: spent.unwrap_or(0),
            reserved: reserved.unwrap_or(0),
        })
    }
}
