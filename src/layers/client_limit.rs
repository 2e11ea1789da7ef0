//! client_limit: the per-client `requests_per_second`, checked right after authentication and
//! before the body is read or parsed, so a flood of malformed bodies is limited too.
//!
//! Fleet mode: the global per-client limit is checked in the store by `account_limit`'s one
//! round trip (where the body has been read and the account is known); this layer stays as a
//! per-replica pre-filter, with no round trip. It can only refuse what the global limit would
//! refuse too: a replica's traffic is a subset of the fleet's, so with the same quota and burst
//! its bucket is never fuller than the fleet's (one caveat: a cell this pre-filter took for a
//! request that the store then refused for another reason stays taken here; that slack is at
//! most one emission interval per such refusal). Requests that never reach
//! `account_limit` (cache hits, coalesced followers, malformed bodies) are limited only per
//! replica.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::config::ClientSettings;
use crate::error::GatewayError;
use crate::limits::{Subject, Verdict};
use crate::metrics::{Label, RateLimitedLabels};
use crate::shared::Shared;

#[derive(Clone)]
pub struct ClientLimitLayer {
    shared: Arc<Shared>,
}

impl ClientLimitLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        ClientLimitLayer { shared }
    }
}

impl<S> Layer<S> for ClientLimitLayer {
    type Service = ClientLimit<S>;
    fn layer(&self, inner: S) -> ClientLimit<S> {
        ClientLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ClientLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Request<B>> for ClientLimit<S>
where
    S: Service<Request<B>, Response = Response<Bytes>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let client = req.extensions().get::<Arc<ClientSettings>>();
        let limiter = client.and_then(|c| Some((c, self.shared.limits.clients.get(&c.name)?)));
        if let Some((client, limiter)) = limiter {
            if let Verdict::Deny { wait } = limiter.check(&Subject::Client(client.name.clone())) {
                self.shared
                    .process
                    .metrics
                    .rate_limited
                    .get_or_create(&RateLimitedLabels {
                        client: Label(client.name.clone()),
                        reason: Label(Arc::from("client")),
                        shadow: client.shadow,
                    })
                    .inc();
                if client.shadow {
                    tracing::info!(client = %client.name, limit = %limiter.quota, shadow = true, "would refuse: client rate limit");
                } else {
                    let e = GatewayError::RateLimited {
                        message: format!(
                            "client `{}` is limited to {}; retry in {} s",
                            client.name,
                            limiter.quota,
                            wait.as_millis().div_ceil(1000).max(1)
                        ),
                        retry_after: wait,
                        policy: Some(limiter.policy.clone()),
                        state: Some(crate::limits::ratelimit_item(limiter, 0, wait)),
                    };
                    return Box::pin(async move { Err(e) });
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    /// A client `crm`, with `client` config after it.
    fn shared(client: &str) -> Arc<Shared> {
        Arc::new(crate::shared::for_tests(&format!(
            "[[clients]]
name = \"crm\"
key_sha256 = \"{}\"
{client}
",
            "ab".repeat(32)
        )))
    }

    fn req(shared: &Shared) -> Request<()> {
        let mut r = Request::post("/v2/profiles").body(()).unwrap();
        r.extensions_mut()
            .insert(shared.settings.clients[0].clone());
        r
    }

    async fn call(shared: &Arc<Shared>, calls: &Arc<AtomicUsize>) -> Result<(), GatewayError> {
        let c = calls.clone();
        ClientLimitLayer::new(shared.clone())
            .layer(tower::service_fn(move |_r: Request<()>| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, GatewayError>(Response::new(Bytes::new())) }
            }))
            .oneshot(req(shared))
            .await
            .map(|_| ())
    }

    fn counted(shared: &Shared, shadow: bool) -> u64 {
        shared
            .process
            .metrics
            .rate_limited
            .get_or_create(&RateLimitedLabels {
                client: Label(Arc::from("crm")),
                reason: Label(Arc::from("client")),
                shadow,
            })
            .get()
    }

    #[tokio::test(start_paused = true)]
    async fn over_its_rate_a_client_is_refused_before_anything_below_runs() {
        let s = shared("requests_per_second = 2\nburst = 2");
        let calls = Arc::new(AtomicUsize::new(0));
        call(&s, &calls).await.unwrap();
        call(&s, &calls).await.unwrap();
        let e = call(&s, &calls).await.unwrap_err();
        assert_eq!(e.code(), "RATE_LIMITED");
        assert!(e.to_string().contains("client `crm` is limited to"), "{e}");
        let r = e.into_response("profiles");
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(r.headers().contains_key("ratelimit-policy"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the refusal went no further"
        );
        assert_eq!(counted(&s, false), 1);
        // The bucket refills with time.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        call(&s, &calls).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shadow_client_is_counted_not_refused_and_an_unlimited_one_is_not_counted() {
        let s = shared("requests_per_second = 1\nburst = 1\nshadow = true");
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            call(&s, &calls).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(counted(&s, true), 2);
        let s = shared("");
        for _ in 0..50 {
            call(&s, &calls).await.unwrap();
        }
        assert_eq!(counted(&s, false) + counted(&s, true), 0);
    }
}
