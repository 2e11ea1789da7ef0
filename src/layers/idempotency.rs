//! idempotency: a POST with an `Idempotency-Key` is sent upstream once per client and key.
//! A repeat gets the stored answer (`Idempotent-Replayed: true`, 0 credits, ledger outcome
//! `replayed`), waits for a first still in flight, is 422 with another body, and is 409 when
//! the first one's outcome is unknown: never sent a second time. The store is
//! `crate::idempotency`; the first attempt runs on a task of its own, so its fate is kept even
//! when its caller hangs up or times out.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::config::ClientSettings;
use crate::context::{AnsweredBy, RequestContext, RequestLog};
use crate::error::GatewayError;
use crate::idempotency::{check_key, fingerprint, Begin, Fate, Keep, Stored, MAX_STORED_BODY};
use crate::shared::Shared;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl IdempotencyLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        IdempotencyLayer { shared }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Bytes>> for Idempotency<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    /// Requests without a key are the inner future itself.
    type Future = Either<S::Future, BoxFuture<Result<Response<Bytes>, GatewayError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let settings = &self.shared.settings.idempotency;
        if !settings.enabled || req.method() != Method::POST {
            return Either::Left(self.inner.call(req));
        }
        let key = match req.headers().get(IDEMPOTENCY_KEY) {
            Some(v) => match check_key(v) {
                Ok(k) => Arc::<str>::from(k),
                Err(why) => {
                    return Either::Right(Box::pin(
                        async move { Err(GatewayError::InvalidParams(why)) },
                    ))
                }
            },
            // The common case: no key, nothing required.
            None if settings.require.is_empty() => return Either::Left(self.inner.call(req)),
            None => {
                let action = req
                    .extensions()
                    .get::<RequestContext>()
                    .and_then(|c| c.action.as_deref());
                if settings.required(req.uri().path(), action) {
                    let what = match action {
                        Some(a) => format!("{} `{a}`", req.uri().path()),
                        None => req.uri().path().to_owned(),
                    };
                    return Either::Right(Box::pin(async move {
                        Err(GatewayError::InvalidParams(format!(
                            "{what} requires an `Idempotency-Key` header (idempotency.require)"
                        )))
                    }));
                }
                return Either::Left(self.inner.call(req));
            }
        };
        let Some(client) = req.extensions().get::<Arc<ClientSettings>>().cloned() else {
            return Either::Left(self.inner.call(req));
        };
        let fp = fingerprint(
            req.method(),
            req.uri().path_and_query().map_or("", |p| p.as_str()),
            req.body(),
        );
        let inner = take_ready(&mut self.inner);
        let shared = self.shared.clone();
        Either::Right(Box::pin(keyed(inner, shared, client, key, fp, req)))
    }
}

async fn keyed<S>(
    inner: S,
    shared: Arc<Shared>,
    client: Arc<ClientSettings>,
    key: Arc<str>,
    fp: crate::idempotency::Fingerprint,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError> + Send + 'static,
    S::Future: Send + 'static,
{
    let store = shared.process.idempotency.clone();
    let settings = &shared.settings;
    let metrics = &shared.process.metrics;
    let log = req.extensions().get::<Arc<RequestLog>>().cloned();
    // A repeat that waited for a first attempt which left nothing behind tries again (at most
    // a few times: each round is another caller's attempt ending).
    for _ in 0..8 {
        let begin = store
            .begin(
                &client.name,
                &key,
                fp,
                Keep {
                    ttl: settings.idempotency.ttl,
                    max_keys: settings.idempotency.max_keys,
                    // A first attempt ends within request_timeout; the margin covers clocks
                    // and the store's round trips.
                    in_flight_for: settings.server.request_timeout + Duration::from_secs(10),
                },
            )
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "idempotency store unavailable");
                GatewayError::LedgerUnavailable
            })?;
        let fate = match begin {
            Begin::Lead(lead) => {
                // The first attempt: on its own task, so its fate is kept whatever its caller
                // does; the caller waits for it.
                let first_log = log.clone();
                let task = tokio::spawn(async move {
                    let mut inner = inner;
                    let result = inner.call(req).await;
                    let fate = fate_of(&result, first_log.as_deref());
                    lead.finish(fate).await;
                    result
                });
                return task.await.unwrap_or_else(|e| {
                    Err(GatewayError::UpstreamUnavailable {
                        message: format!("the request's task failed: {e}"),
                        maybe_sent: true,
                    })
                });
            }
            Begin::Mismatch => {
                metrics.idempotency_conflicts.inc();
                return Err(GatewayError::IdempotencyKeyReused(format!(
                    "this Idempotency-Key was used for another request (method, path or body \
                     differ) within {} s (idempotency.ttl); use a new key for a new request",
                    settings.idempotency.ttl.as_secs()
                )));
            }
            Begin::Seen(fate) => fate,
            Begin::Wait(mut rx) => {
                metrics.idempotency_waits.inc();
                let waited = tokio::time::timeout(settings.server.request_timeout, async {
                    loop {
                        if let Some(f) = rx.borrow_and_update().clone() {
                            return Some(f);
                        }
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                })
                .await;
                match waited {
                    Ok(Some(f)) => f,
                    Ok(None) => Fate::Released,
                    Err(_) => {
                        metrics.idempotency_conflicts.inc();
                        return Err(GatewayError::IdempotencyInFlight(
                            "the first request with this Idempotency-Key is still in flight; \
                             retry shortly with the same key"
                                .into(),
                        ));
                    }
                }
            }
        };
        match fate {
            Fate::Released => continue,
            Fate::Done(stored) => {
                metrics.idempotency_replays.inc();
                if let Some(log) = &log {
                    log.set_credits(0);
                }
                return Ok(replay(&stored));
            }
            Fate::DoneUnreplayable => {
                metrics.idempotency_conflicts.inc();
                return Err(GatewayError::IdempotencyOutcomeUnknown(
                    "the first request with this Idempotency-Key was carried out, but its \
                     answer was too large to keep; it is not sent again (a new key sends it again)"
                        .into(),
                ));
            }
            Fate::Unknown => {
                metrics.idempotency_conflicts.inc();
                return Err(GatewayError::IdempotencyOutcomeUnknown(
                    "the outcome of the first request with this Idempotency-Key is unknown (it \
                     may have reached LinkupAPI, but its answer never came back); it is not sent \
                     again: check its effect, and use a new Idempotency-Key to send it again"
                        .into(),
                ));
            }
        }
    }
    Err(GatewayError::IdempotencyInFlight(
        "the requests with this Idempotency-Key keep ending without an answer; retry shortly"
            .into(),
    ))
}

/// What a first attempt leaves for its repeats.
fn fate_of(result: &Result<Response<Bytes>, GatewayError>, log: Option<&RequestLog>) -> Fate {
    match result {
        Ok(resp) => {
            if matches!(
                resp.extensions().get::<AnsweredBy>(),
                Some(AnsweredBy::Cache | AnsweredBy::Coalesced | AnsweredBy::Replayed)
            ) {
                // The gateway answered (nothing was sent for this request).
                return Fate::Released;
            }
            let credits = log.and_then(RequestLog::credits).unwrap_or(0);
            if !resp.status().is_success() && credits == 0 {
                // An upstream error that cost nothing: nothing happened, a retry goes again.
                return Fate::Released;
            }
            if resp.body().len() > MAX_STORED_BODY {
                return Fate::DoneUnreplayable;
            }
            Fate::Done(Arc::new(Stored::of(
                resp.status(),
                resp.headers(),
                resp.body(),
            )))
        }
        // The request may have been carried out, but its answer is lost (or, over the answer
        // budget, was not kept).
        Err(GatewayError::UpstreamTimeout(_))
        | Err(GatewayError::AnswerOverBudget { .. })
        | Err(GatewayError::UpstreamUnavailable {
            maybe_sent: true, ..
        }) => Fate::Unknown,
        Err(_) => Fate::Released,
    }
}

fn replay(stored: &Stored) -> Response<Bytes> {
    let mut resp = Response::new(stored.body.clone());
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    *resp.headers_mut() = stored.header_map();
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp.extensions_mut().insert(AnsweredBy::Replayed);
    resp
}
