//! account_limit: governor GCRA per account_id (or per client for requests that name no
//! account), with per-path/action rules (first match wins) and the upstream-429 cooldown.
//! It sits below status_cache and coalesce, so it only counts requests that will reach the
//! upstream: cache hits and coalesced followers are free.
//!
//! The decision is the shared state's [`Admission`] (`crate::admission`): this layer knows
//! account, action, client and cost, so it asks once per forwarded request, and the answer
//! holds the request's budget reservation, which travels down to `credits` (as a request
//! extension) to be settled with the charge. Where the state is shared, the one round trip
//! covers the cooldown, the limits and the reservation, all or nothing; while it cannot be
//! used, its failure policy decides. This layer does not know which it is.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::admission::{count, limit_message, limit_refusal, secs, Admitted, Decision};
use crate::config::ClientSettings;
use crate::context::RequestContext;
use crate::error::{GatewayError, RATELIMIT, RATELIMIT_POLICY};
use crate::limits::Limiter;
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

/// Does this upstream answer say RATE_LIMITED? Only 429s are looked at.
fn upstream_rate_limited(resp: &Response<Bytes>) -> bool {
    resp.status() == http::StatusCode::TOO_MANY_REQUESTS
        && UpstreamAnswer::of(resp).error_code.as_deref() == Some("RATE_LIMITED")
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
        let decision = shared
            .admission
            .admit(&shared, req.uri().path(), ctx, client, false);
        let account = ctx.account_id.clone();
        let inner = take_ready(&mut self.inner);
        match decision {
            // This process's own state: decided already, nothing awaited.
            Decision::Now(Ok(admitted)) => Box::pin(forward(shared, inner, req, account, admitted)),
            Decision::Now(Err(e)) => Box::pin(async move { Err(e) }),
            Decision::Later(decided) => Box::pin(async move {
                let admitted = decided.await?;
                forward(shared, inner, req, account, admitted).await
            }),
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
    req: Request<Bytes>,
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
    let admitted = loop {
        let decision = shared
            .admission
            .admit(&shared, req.uri().path(), &ctx, &client, true);
        match decision.wait().await {
            Ok(a) => break a,
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
    forward(shared, inner, req, ctx.account_id, admitted).await
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
    admitted: Admitted,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
{
    let mut req = req;
    // credits, below, settles it with the charge.
    req.extensions_mut().insert(admitted.reservation);
    let mut resp = inner.call(req).await?;
    if let Some((policy, state)) = admitted.passed {
        resp.headers_mut().append(RATELIMIT_POLICY, policy);
        resp.headers_mut().append(RATELIMIT, state);
    }
    if let Some(a) = account {
        if upstream_rate_limited(&resp) {
            let limits = &shared.limits;
            tracing::warn!(account = %a, cooldown_s = limits.cooldown.as_secs(), "LinkupAPI rate limited the account; holding it back");
            if let Some(shared_hold) = shared.admission.hold(&a, limits.cooldown) {
                // Wherever the state is shared, every replica holds it back; the local hold
                // covers a store outage.
                shared_hold.await;
            }
            limits.cooldowns.hold(a, limits.cooldown);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests;
