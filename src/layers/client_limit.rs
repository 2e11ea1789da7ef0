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
