//! credits: reserve the expected cost against the caller's daily budget just before forwarding,
//! then settle it with `metadata.credits_consumed` and write the ledger row before the answer
//! goes back. Also `record_saved`, which writes the 0-credit rows of answers the gateway gave
//! itself (status cache, coalesced copies): what the gateway saved.
//!
//! The upstream call belongs to no caller: it runs in the caller's task and moves to a task of
//! its own when the caller's future is dropped (`crate::detach`). If the caller hangs up or
//! the whole-request timeout answers 504 first, the call still completes and its real charge is
//! recorded; only a call that never answers within `request_timeout` is recorded `ambiguous`
//! with its reserved cost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::admission::Reservation;
use crate::budgets::now_ms;
use crate::config::ClientSettings;
use crate::context::{AnsweredBy, RequestContext, RequestLog};
use crate::detach::Detach;
use crate::error::GatewayError;
use crate::ledger::{Outcome, Row};
use crate::metrics::{AccountLabels, ActionLabels, ClientLabels, Label, OutcomeLabels};
use crate::shared::{Process, Shared};
use crate::upstream::UpstreamAnswer;

/// Process-wide credit state: upstream exhaustion and ledger health.
#[derive(Debug, Default)]
pub struct CreditState {
    /// LinkupAPI said INSUFFICIENT_CREDITS: refuse costly requests until a probe shows a balance.
    pub upstream_exhausted: AtomicBool,
    /// A probe task is running.
    pub probing: AtomicBool,
    /// The last ledger write failed: fail closed for costly requests until one succeeds.
    pub ledger_failing: AtomicBool,
}

pub use crate::upstream::MAX_CREDITS_PER_CALL;

#[derive(Clone)]
pub struct CreditsLayer {
    shared: Arc<Shared>,
}

impl CreditsLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        CreditsLayer { shared }
    }
}

impl<S> Layer<S> for CreditsLayer {
    type Service = Credits<S>;
    fn layer(&self, inner: S) -> Credits<S> {
        Credits {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Credits<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// The facts a ledger row needs, taken from the request before it goes down.
struct Pending {
    client: Arc<ClientSettings>,
    account: Option<Arc<str>>,
    action: Option<Arc<str>>,
    path: String,
    request_id: String,
    cost: u64,
    /// Settled with the charge once the call has ended.
    reservation: Option<Reservation>,
}

/// Replace the request's reservation by what was charged.
fn settle(shared: &Arc<Shared>, p: &Pending, charged: u64) {
    if let Some(r) = &p.reservation {
        r.settle(&shared.process, &p.client, charged);
    }
}

impl<S> Service<Request<Bytes>> for Credits<S>
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
        let Some(client) = req.extensions().get::<Arc<ClientSettings>>().cloned() else {
            return Box::pin(self.inner.call(req));
        };
        let ctx = req.extensions().get::<RequestContext>();
        let log = req.extensions().get::<Arc<RequestLog>>().cloned();
        let action = ctx.and_then(|c| c.action.clone());
        let cost = shared
            .settings
            .costs
            .expected(req.uri().path(), action.as_deref());
        let process = &shared.process;
        // account_limit's admission reserved the expected cost (none: a stack without it).
        let reservation = req.extensions().get::<Reservation>().cloned();

        if cost > 0 {
            let refusal = if process.credit_state.ledger_failing.load(Ordering::Acquire)
                || process.ledger.file_lost()
            {
                Some(GatewayError::LedgerUnavailable)
            } else if process
                .credit_state
                .upstream_exhausted
                .load(Ordering::Acquire)
            {
                Some(GatewayError::InsufficientCredits(
                    "LinkupAPI reported insufficient credits; requests that cost credits are refused until a balance shows again".into(),
                ))
            } else {
                None
            };
            if let Some(e) = refusal {
                if let Some(r) = &reservation {
                    // Give the reservation back.
                    r.settle(process, &client, 0);
                }
                return Box::pin(async move { Err(e) });
            }
        }
        let pending = Pending {
            reservation,
            account: ctx.and_then(|c| c.account_id.clone()),
            action,
            path: req.uri().path().to_owned(),
            request_id: log
                .as_ref()
                .and_then(|l| l.request_id.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            client,
            cost,
        };
        let inner = take_ready(&mut self.inner);
        let timeout = shared.settings.server.request_timeout;
        // The call belongs to no caller: it runs to the end and is recorded even when the
        // caller is gone or answered 504 first. It runs in the caller's task, and moves to a
        // task of its own only if the caller's future is dropped.
        Box::pin(Detach::new(call_and_record(
            shared, inner, req, pending, timeout, log,
        )))
    }
}

async fn call_and_record<S>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<Bytes>,
    p: Pending,
    timeout: Duration,
    log: Option<Arc<RequestLog>>,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
{
    let process = &shared.process;
    let result = match crate::deadline::timeout(timeout, inner.call(req)).await {
        Ok(r) => r,
        Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
    };
    let (status, charged, known, raw, meta_action, outcome) = match &result {
        Ok(resp) => {
            let charge = UpstreamAnswer::of(resp);
            if let Some(raw) = &charge.credits_raw {
                let request_id = log
                    .as_ref()
                    .and_then(|l| l.request_id.to_str().ok())
                    .unwrap_or("-");
                tracing::warn!(
                    request_id,
                    credits_consumed = %raw,
                    "the upstream's credits_consumed is not a whole number from 0 to {MAX_CREDITS_PER_CALL}: recorded as unknown"
                );
            }
            if resp.status() == StatusCode::PAYMENT_REQUIRED
                && charge.error_code.as_deref() == Some("INSUFFICIENT_CREDITS")
            {
                upstream_exhausted(&shared);
            }
            (
                resp.status().as_u16(),
                charge.credits.unwrap_or(0),
                charge.credits.is_some(),
                charge.credits_raw.clone(),
                // The answer's action names the row only when the request named none.
                match p.action {
                    None => charge.action.as_deref().map(Arc::from),
                    Some(_) => None,
                },
                Outcome::Settled,
            )
        }
        // Sent, then lost: the upstream may have acted and charged. Keep the reservation.
        // Answered, but the answer was dropped for memory (`upstream.max_buffered_bytes`):
        // its credits_consumed was never read. Same: keep the reservation.
        Err(GatewayError::UpstreamUnavailable {
            maybe_sent: true, ..
        })
        | Err(GatewayError::UpstreamTimeout(_))
        | Err(GatewayError::AnswerOverBudget { .. }) => {
            let status = result
                .as_ref()
                .err()
                .map(|e| e.status().as_u16())
                .unwrap_or(502);
            (status, p.cost, true, None, None, Outcome::Ambiguous)
        }
        // Never sent: nothing charged, no row.
        Err(_) => {
            settle(&shared, &p, 0);
            return result;
        }
    };
    settle(&shared, &p, charged);
    if let Some(log) = &log {
        log.set_credits(charged);
    }
    let action: Option<Arc<str>> = p.action.clone().or(meta_action);
    let m = &process.metrics;
    if charged > 0 {
        let action_label = match &action {
            Some(a) => m.action_labels.label(a),
            None => m.action_labels.label(&Arc::from("unknown")),
        };
        m.credits_consumed
            .get_or_create(&ActionLabels {
                client: Label(p.client.name.clone()),
                action: action_label,
            })
            .inc_by(charged);
        if let (true, Some(account)) = (shared.settings.metrics_per_account, &p.account) {
            m.account_credits
                .get_or_create(&AccountLabels {
                    client: Label(p.client.name.clone()),
                    account: Label(account.clone()),
                })
                .inc_by(charged);
        }
    }
    if !known {
        m.credits_unknown
            .get_or_create(&ClientLabels {
                client: Label(p.client.name.clone()),
            })
            .inc();
    }
    let row = Row {
        at_ms: now_ms(),
        request_id: p.request_id,
        client: p.client.name.clone(),
        account_id: p.account,
        path: p.path,
        action,
        status,
        credits: charged,
        credits_known: known,
        credits_raw: raw,
        outcome,
    };
    record(process, row).await;
    result
}

/// Write a ledger row and wait for it to be durable (or queued, with `sync = "async"`). A
/// failure is logged and counted, and fails closed for costly requests until a write succeeds.
pub async fn record(process: &Process, row: Row) {
    let outcome = row.outcome;
    match process.ledger.record(row).await {
        Ok(()) => {
            process
                .credit_state
                .ledger_failing
                .store(false, Ordering::Release);
            process
                .metrics
                .ledger_rows
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.as_str(),
                })
                .inc();
        }
        Err(e) => {
            process
                .credit_state
                .ledger_failing
                .store(true, Ordering::Release);
            process.metrics.ledger_errors.inc();
            tracing::error!(error = %e, "ledger write failed: refusing requests that cost credits until it recovers");
        }
    }
}

/// LinkupAPI is out of credits: refuse costly requests, and probe `GET /v2/credits` (free)
/// until it shows a balance again.
fn upstream_exhausted(shared: &Arc<Shared>) {
    let state = &shared.process.credit_state;
    state.upstream_exhausted.store(true, Ordering::Release);
    if state.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    tracing::warn!("LinkupAPI answered INSUFFICIENT_CREDITS: refusing requests that cost credits until a balance shows");
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            match crate::reconcile::balance(&shared).await {
                Ok(b) if b > 0 => {
                    tracing::info!(balance = b, "LinkupAPI shows credits again");
                    break;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "credits probe failed"),
            }
        }
        let state = &shared.process.credit_state;
        state.upstream_exhausted.store(false, Ordering::Release);
        state.probing.store(false, Ordering::Release);
    });
}

/// record_saved: the ledger rows of answers the gateway gave itself (0 credits): it sits just
/// above status_cache and coalesce, which mark their answers with `AnsweredBy`.
#[derive(Clone)]
pub struct RecordSavedLayer {
    process: Arc<Process>,
}

impl RecordSavedLayer {
    pub fn new(process: Arc<Process>) -> Self {
        RecordSavedLayer { process }
    }
}

impl<S> Layer<S> for RecordSavedLayer {
    type Service = RecordSaved<S>;
    fn layer(&self, inner: S) -> RecordSaved<S> {
        RecordSaved {
            inner,
            process: self.process.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RecordSaved<S> {
    inner: S,
    process: Arc<Process>,
}

impl<S> Service<Request<Bytes>> for RecordSaved<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        // Most answers are the upstream's and record nothing here: keep only the request's
        // log (a reference count) and its URI (shared bytes), and build the row in the rare
        // case. The request's context and client are in the log.
        let log = req.extensions().get::<Arc<RequestLog>>().cloned();
        let uri = req.uri().clone();
        let process = self.process.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let outcome = match resp.extensions().get::<AnsweredBy>() {
                Some(AnsweredBy::Cache) => Outcome::Cached,
                Some(AnsweredBy::Coalesced) => Outcome::Coalesced,
                Some(AnsweredBy::Replayed) => Outcome::Replayed,
                _ => return Ok(resp),
            };
            let Some(log) = log else { return Ok(resp) };
            if let Some(client) = log.client.get() {
                let ctx = log.context.get();
                let action = ctx
                    .and_then(|c| c.action.clone())
                    .or_else(|| UpstreamAnswer::of(&resp).action.as_deref().map(Arc::from));
                let row = Row {
                    at_ms: now_ms(),
                    request_id: log.request_id.to_str().unwrap_or_default().to_owned(),
                    client: client.name.clone(),
                    account_id: ctx.and_then(|c| c.account_id.clone()),
                    path: uri.path().to_owned(),
                    action,
                    status: resp.status().as_u16(),
                    credits: 0,
                    credits_known: true,
                    credits_raw: None,
                    outcome,
                };
                record(&process, row).await;
            }
            Ok(resp)
        })
    }
}
