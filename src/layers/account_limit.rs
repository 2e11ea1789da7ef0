//! account_limit: governor GCRA per account_id (or per client for requests that name no
//! account), with per-path/action rules (first match wins) and the upstream-429 cooldown.
//! It sits below status_cache and coalesce, so it only counts requests that will reach the
//! upstream: cache hits and coalesced followers are free.
//!
//! Fleet mode: here account, action, client and cost are all known, so this is where the one
//! round trip happens: the fleet's `admit` script checks the cooldown, the account/rule limit
//! and the per-client limit, and reserves the budget, all or nothing. `credits` then takes no
//! local reservation (the `FleetReserved` extension says so) and settles in the store. While
//! the store is down, `fleet.on_store_failure.limits` decides: `local` (these per-replica
//! limiters) or `deny` (503 `STORE_UNAVAILABLE` for requests that cost credits). The
//! replica's own upstream-429 holds are looked at in the fleet path too: one learnt while the
//! store was down is in no store, and still holds the account back once the store is back.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::budgets::{now_ms, utc_day};
use crate::config::ClientSettings;
use crate::config::OnFailure;
use crate::context::RequestContext;
use crate::error::{GatewayError, RATELIMIT, RATELIMIT_POLICY};
use crate::fleet::{
    Admission, AdmitRequest, BudgetCheck, Fleet, FleetReserved, LimitCheck, Part, Unavailable,
};
use crate::layers::credits::publish_standing;
use crate::limits::{ratelimit_item, Limiter, Subject, Verdict};
use crate::metrics::{ClientLabels, Label, RateLimitedLabels};
use crate::shared::Shared;
use crate::upstream::UpstreamAnswer;

#[derive(Clone)]
pub struct AccountLimitLayer {
    shared: Arc<Shared>,
}

impl AccountLimitLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        AccountLimitLayer { shared }
    }
}

impl<S> Layer<S> for AccountLimitLayer {
    type Service = AccountLimit<S>;
    fn layer(&self, inner: S) -> AccountLimit<S> {
        AccountLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccountLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn secs(d: Duration) -> u128 {
    d.as_millis().div_ceil(1000).max(1)
}

/// Does this upstream answer say RATE_LIMITED? Only 429s are looked at.
fn upstream_rate_limited(resp: &Response<Bytes>) -> bool {
    resp.status() == http::StatusCode::TOO_MANY_REQUESTS
        && UpstreamAnswer::of(resp).error_code.as_deref() == Some("RATE_LIMITED")
}

/// A request that passed: the `RateLimit-Policy` and `RateLimit` items to add, if any.
type Passed = Option<(HeaderValue, HeaderValue)>;

fn count(shared: &Shared, client: &ClientSettings, reason: Arc<str>, shadow: bool) {
    shared
        .process
        .metrics
        .rate_limited
        .get_or_create(&RateLimitedLabels {
            client: Label(client.name.clone()),
            reason: Label(reason),
            shadow,
        })
        .inc();
}

fn cooldown_refusal(shared: &Shared, account: &str, left: Duration) -> GatewayError {
    GatewayError::RateLimited {
        message: format!(
            "account {account} was rate limited by LinkupAPI and is held back for {} s; retry in {} s",
            shared.limits.cooldown.as_secs(),
            secs(left)
        ),
        retry_after: left,
        policy: None,
        state: None,
    }
}

fn limit_message(
    limiter: &Limiter,
    account: Option<&Arc<str>>,
    client: &ClientSettings,
    wait: Duration,
) -> String {
    let who = match account {
        Some(a) => format!("account {a}"),
        None => format!("client `{}` (requests without an account)", client.name),
    };
    let rule = match &*limiter.name {
        "account" => String::new(),
        name => format!(" by rule `{name}`"),
    };
    format!(
        "{who} is limited to {}{rule}; retry in {} s",
        limiter.quota,
        secs(wait)
    )
}

fn limit_refusal(limiter: &Limiter, message: String, wait: Duration) -> GatewayError {
    GatewayError::RateLimited {
        message,
        retry_after: wait,
        policy: Some(limiter.policy.clone()),
        state: Some(ratelimit_item(limiter, 0, wait)),
    }
}

/// The per-replica check (embedded mode, and fleet mode while the store is down with
/// `limits = "local"`).
fn check_local(
    shared: &Shared,
    path: &str,
    ctx: &RequestContext,
    client: &ClientSettings,
    paced: bool,
) -> Result<Passed, GatewayError> {
    let limits = &shared.limits;
    let account = ctx.account_id.as_ref();
    let (limiter, shadow) = limits.for_request(path, ctx.action.as_deref());
    if let Some(a) = account {
        if let Some(left) = limits.cooldowns.remaining(a) {
            if paced && !limits.default_shadow {
                // A paced request waits this out; only a final refusal is counted.
                return Err(cooldown_refusal(shared, a, left));
            }
            count(shared, client, Arc::from("cooldown"), limits.default_shadow);
            if limits.default_shadow {
                tracing::info!(account = %a, shadow = true, "would refuse: upstream 429 cooldown");
            } else {
                return Err(cooldown_refusal(shared, a, left));
            }
        }
    }
    let subject = match account {
        Some(a) => Subject::Account(a.clone()),
        None => Subject::Client(client.name.clone()),
    };
    match limiter.check(&subject) {
        Verdict::Allow { remaining, reset } => Ok(Some((
            limiter.policy.clone(),
            ratelimit_item(limiter, remaining, reset),
        ))),
        Verdict::Deny { wait } => {
            let message = limit_message(limiter, account, client, wait);
            if paced && !shadow {
                return Err(limit_refusal(limiter, message, wait));
            }
            count(shared, client, limiter.name.clone(), shadow);
            if shadow {
                tracing::info!(shadow = true, "would refuse: {message}");
                Ok(None)
            } else {
                Err(limit_refusal(limiter, message, wait))
            }
        }
    }
}

/// Fleet mode: the whole decision in one round trip (cooldown, account/rule limit, per-client
/// limit, budget reservation; all or nothing), and the store's marker value the reservation
/// was made under. `Err(Unavailable)`: the store cannot be used.
async fn check_fleet(
    shared: &Shared,
    fleet: &Arc<Fleet>,
    path: &str,
    ctx: &RequestContext,
    client: &ClientSettings,
    (cost, day): (u64, i64),
    paced: bool,
) -> Result<Result<(Passed, Arc<str>), GatewayError>, Unavailable> {
    let limits = &shared.limits;
    let account = ctx.account_id.as_ref();
    let (limiter, shadow) = limits.for_request(path, ctx.action.as_deref());
    // This replica's own hold: set with the store's, and the only one when the upstream
    // RATE_LIMITED answer came while the store was down (the store never heard of it).
    let local_cooldown = account.and_then(|a| limits.cooldowns.remaining(a).map(|l| (a, l)));
    if let (Some((a, left)), false) = (local_cooldown, limits.default_shadow) {
        if !paced {
            count(shared, client, Arc::from("cooldown"), false);
        }
        return Ok(Err(cooldown_refusal(shared, a, left)));
    }
    let subject = match account {
        Some(a) => Subject::Account(a.clone()),
        None => Subject::Client(client.name.clone()),
    };
    let client_subject = Subject::Client(client.name.clone());
    let client_limiter = limits.clients.get(&client.name);
    let r = AdmitRequest {
        cooldown: account.map(|a| (&**a, limits.default_shadow)),
        limit: Some(LimitCheck {
            limiter,
            subject: &subject,
            shadow,
        }),
        client: client_limiter.map(|l| LimitCheck {
            limiter: l,
            subject: &client_subject,
            shadow: client.shadow,
        }),
        budget: Some(BudgetCheck {
            client: &client.name,
            cost,
            budget: client.daily_credit_budget,
            enforce: !client.shadow,
            day,
        }),
    };
    let admission = fleet.admit(&r).await?;
    let m = &shared.process.metrics;
    Ok(match admission {
        Admission::Allowed {
            limit,
            shadowed,
            standing,
            marker,
        } => {
            if shadowed.cooldown || local_cooldown.is_some() {
                count(shared, client, Arc::from("cooldown"), true);
                tracing::info!(account = ?account, shadow = true, "would refuse: upstream 429 cooldown");
            }
            if shadowed.limit {
                count(shared, client, limiter.name.clone(), true);
                tracing::info!(
                    shadow = true,
                    "would refuse: {}",
                    limit_message(limiter, account, client, Duration::ZERO)
                );
            }
            if shadowed.client {
                count(shared, client, Arc::from("client"), true);
                tracing::info!(client = %client.name, shadow = true, "would refuse: client rate limit");
            }
            if shadowed.budget {
                m.budget_shadow_refusals
                    .get_or_create(&ClientLabels {
                        client: Label(client.name.clone()),
                    })
                    .inc();
                tracing::info!(client = %client.name, spent = standing.spent, reserved = standing.reserved, cost, shadow = true, "would refuse: daily credit budget");
            }
            publish_standing(&shared.process, client, standing);
            let passed = limit.map(|(remaining, reset)| {
                (
                    limiter.policy.clone(),
                    ratelimit_item(limiter, remaining, reset),
                )
            });
            Ok((passed, marker))
        }
        Admission::Refused {
            part,
            wait,
            standing,
        } => Err(match part {
            Part::Cooldown => {
                if !paced {
                    count(shared, client, Arc::from("cooldown"), false);
                }
                let a = account.map(|a| &**a).unwrap_or("");
                cooldown_refusal(shared, a, wait)
            }
            Part::Limit => {
                if !paced {
                    count(shared, client, limiter.name.clone(), false);
                }
                limit_refusal(limiter, limit_message(limiter, account, client, wait), wait)
            }
            Part::Client => {
                count(shared, client, Arc::from("client"), false);
                let l = client_limiter.unwrap_or(limiter);
                GatewayError::RateLimited {
                    message: format!(
                        "client `{}` is limited to {}; retry in {} s",
                        client.name,
                        l.quota,
                        secs(wait)
                    ),
                    retry_after: wait,
                    policy: Some(l.policy.clone()),
                    state: Some(ratelimit_item(l, 0, wait)),
                }
            }
            Part::Budget => {
                publish_standing(&shared.process, client, standing);
                GatewayError::InsufficientCredits(format!(
                    "client `{}` has a daily budget of {} credits; {} spent and {} reserved today, and this request would cost {cost}",
                    client.name,
                    client.daily_credit_budget.unwrap_or(0),
                    standing.spent,
                    standing.reserved
                ))
            }
        }),
    })
}

impl<S> Service<Request<Bytes>> for AccountLimit<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let shared = self.shared.clone();
        let (Some(ctx), Some(client)) = (
            req.extensions().get::<RequestContext>(),
            req.extensions().get::<Arc<ClientSettings>>(),
        ) else {
            // Not classified (a test stack without classify): nothing to key on.
            return Box::pin(self.inner.call(req));
        };
        if shared.limits.paces {
            if let (Some(account), Some(rule)) = (
                &ctx.account_id,
                shared
                    .limits
                    .rule_for(req.uri().path(), ctx.action.as_deref()),
            ) {
                if let (Some(max_delay), false) = (rule.pacing, rule.shadow) {
                    let pace = Pace {
                        limiter: rule.limiter.clone(),
                        account: account.clone(),
                        max_delay,
                    };
                    let (ctx, client) = (ctx.clone(), client.clone());
                    let inner = take_ready(&mut self.inner);
                    return Box::pin(paced(shared, inner, req, ctx, client, pace));
                }
            }
        }
        if shared.process.fleet.is_none() {
            // Embedded mode: nothing of fleet mode on this path, and nothing awaited.
            let passed = match check_local(&shared, req.uri().path(), ctx, client, false) {
                Ok(p) => p,
                Err(e) => return Box::pin(async move { Err(e) }),
            };
            let account = ctx.account_id.clone();
            let inner = take_ready(&mut self.inner);
            return Box::pin(forward(shared, inner, req, account, passed));
        }
        let (ctx, client) = (ctx.clone(), client.clone());
        let inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let mut req = req;
            let passed = decide(&shared, &mut req, &ctx, &client, false).await?;
            forward(shared, inner, req, ctx.account_id, passed).await
        })
    }
}

/// The admission decision, embedded or fleet (with the store's failure policy). `paced`: a
/// limit or cooldown refusal is not counted (the caller will wait and ask again).
async fn decide(
    shared: &Shared,
    req: &mut Request<Bytes>,
    ctx: &RequestContext,
    client: &ClientSettings,
    paced: bool,
) -> Result<Passed, GatewayError> {
    let Some(fleet) = shared.process.fleet.clone() else {
        return check_local(shared, req.uri().path(), ctx, client, paced);
    };
    let path = req.uri().path().to_owned();
    let cost = shared.settings.costs.expected(&path, ctx.action.as_deref());
    let day = utc_day(now_ms());
    let decided = if fleet.is_up() {
        check_fleet(shared, &fleet, &path, ctx, client, (cost, day), paced).await
    } else {
        Err(Unavailable)
    };
    match decided {
        Ok(Ok((passed, marker))) => {
            req.extensions_mut()
                .insert(FleetReserved { cost, day, marker });
            Ok(passed)
        }
        Ok(Err(refusal)) => Err(refusal),
        Err(Unavailable) => {
            if cost > 0 && fleet.budgets_on_failure == OnFailure::Deny {
                // Refused before a local limit cell is taken for it.
                fleet.fell_back("budgets", OnFailure::Deny);
                return Err(GatewayError::StoreUnavailable(
                    "the shared budget store is unavailable and fleet.on_store_failure.budgets is \"deny\"; requests that cost credits are refused until it is back; retry shortly".into(),
                ));
            }
            if cost > 0 && fleet.limits_on_failure == OnFailure::Deny {
                fleet.fell_back("limits", OnFailure::Deny);
                return Err(GatewayError::StoreUnavailable(
                    "the shared rate-limit store is unavailable and fleet.on_store_failure.limits is \"deny\"; retry shortly".into(),
                ));
            }
            fleet.fell_back("limits", OnFailure::Local);
            // The per-client limit was already checked per replica (client_limit).
            check_local(shared, &path, ctx, client, paced)
        }
    }
}

/// An `on_limit = "delay"` rule's request: its limiter, account and longest wait.
struct Pace {
    limiter: Arc<Limiter>,
    account: Arc<str>,
    max_delay: Duration,
}

/// Wait for the slot, first come first served per account and rule: the head of the queue
/// asks, and sleeps until its slot, while the rest wait their turn behind it. A request whose
/// slot is beyond `max_delay` is refused at once (429, as without pacing); one whose caller
/// hangs up leaves the queue (and takes no slot); while draining, one whose slot falls after
/// `shutdown_grace` is answered 503. No credit is reserved while waiting (credits is below).
async fn paced<S>(
    shared: Arc<Shared>,
    inner: S,
    mut req: Request<Bytes>,
    ctx: RequestContext,
    client: Arc<ClientSettings>,
    pace: Pace,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
{
    let m = &shared.process.metrics;
    let queues = shared.limits.queues.clone();
    let place = queues.join(&pace.limiter.name, &pace.account);
    let _queued = QueuedGauge::new(&shared);
    let start = tokio::time::Instant::now();
    let refuse = |wait: Duration| {
        count(&shared, &client, pace.limiter.name.clone(), false);
        limit_refusal(
            &pace.limiter,
            limit_message(&pace.limiter, Some(&pace.account), &client, wait),
            wait,
        )
    };
    let queued = queues.waiting.load(std::sync::atomic::Ordering::Relaxed);
    if queued > shared.settings.rate_limit.max_queued {
        count(&shared, &client, pace.limiter.name.clone(), false);
        let wait = pace.limiter.emission();
        return Err(GatewayError::RateLimited {
            message: format!(
                "{queued} requests are already waiting for paced slots (rate_limit.max_queued); retry in {} s",
                secs(wait)
            ),
            retry_after: wait,
            policy: Some(pace.limiter.policy.clone()),
            state: None,
        });
    }
    // The ones ahead each take one slot first.
    let ahead = pace
        .limiter
        .emission()
        .saturating_mul(u32::try_from(place.ahead).unwrap_or(u32::MAX));
    if ahead > pace.max_delay {
        return Err(refuse(ahead));
    }
    // Behind the head of the queue; at drain, one whose slot is past the grace is answered.
    let turn = {
        let lock = place.gate.turn.lock();
        tokio::pin!(lock);
        let drain = shared.process.drain_started.notified();
        tokio::pin!(drain);
        drain.as_mut().enable();
        let grace = shared.settings.server.shutdown_grace;
        let draining = || {
            shared
                .process
                .draining
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        // Its own slot is at most one interval after the last of those ahead of it.
        let own = ahead.saturating_add(pace.limiter.emission());
        if draining() && own > grace {
            return Err(draining_refusal(own));
        }
        tokio::select! {
            t = &mut lock => t,
            _ = &mut drain => {
                if own > grace {
                    return Err(draining_refusal(own));
                }
                lock.await
            }
        }
    };
    let passed = loop {
        match decide(&shared, &mut req, &ctx, &client, true).await {
            Ok(p) => break p,
            Err(GatewayError::RateLimited { retry_after, .. }) => {
                let waited = start.elapsed();
                if waited + retry_after > pace.max_delay {
                    return Err(refuse(retry_after));
                }
                let drain = shared.process.drain_started.notified();
                tokio::pin!(drain);
                drain.as_mut().enable();
                if shared
                    .process
                    .draining
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    if retry_after > shared.settings.server.shutdown_grace {
                        return Err(draining_refusal(retry_after));
                    }
                    tokio::time::sleep(retry_after).await;
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry_after) => {}
                    _ = &mut drain => {
                        let left = retry_after.saturating_sub(start.elapsed() - waited);
                        if left > shared.settings.server.shutdown_grace {
                            return Err(draining_refusal(left));
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
    };
    drop(turn);
    drop(place);
    m.rate_limit_waited.inc_by(start.elapsed().as_secs_f64());
    forward(shared, inner, req, ctx.account_id, passed).await
}

fn draining_refusal(wait: Duration) -> GatewayError {
    GatewayError::Draining(format!(
        "the gateway is shutting down and this request's slot is {} s away, after its shutdown grace; retry on another instance",
        secs(wait)
    ))
}

/// `linkup_gateway_rate_limit_queued`: one while a paced request waits.
struct QueuedGauge(prometheus_client::metrics::gauge::Gauge);

impl QueuedGauge {
    fn new(shared: &Shared) -> QueuedGauge {
        let g = shared.process.metrics.rate_limit_queued.clone();
        g.inc();
        QueuedGauge(g)
    }
}

impl Drop for QueuedGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn forward<S>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<Bytes>,
    account: Option<Arc<str>>,
    passed: Passed,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
{
    let mut resp = inner.call(req).await?;
    if let Some((policy, state)) = passed {
        resp.headers_mut().append(RATELIMIT_POLICY, policy);
        resp.headers_mut().append(RATELIMIT, state);
    }
    if let Some(a) = account {
        if upstream_rate_limited(&resp) {
            let limits = &shared.limits;
            tracing::warn!(account = %a, cooldown_s = limits.cooldown.as_secs(), "LinkupAPI rate limited the account; holding it back");
            if let Some(fleet) = &shared.process.fleet {
                // Every replica holds it back; the local hold covers a store outage.
                let _ = fleet.hold(&a, limits.cooldown).await;
            }
            limits.cooldowns.hold(a, limits.cooldown);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests;
