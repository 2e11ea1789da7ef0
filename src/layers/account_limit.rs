//! account_limit: governor GCRA per account_id (or per client for requests that name no
//! account), with per-path/action rules (first match wins) and the upstream-429 cooldown.
//! It sits below status_cache and coalesce, so it only counts requests that will reach the
//! upstream: cache hits and coalesced followers are free.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use serde::Deserialize;
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::config::ClientSettings;
use crate::context::RequestContext;
use crate::error::{GatewayError, RATELIMIT, RATELIMIT_POLICY};
use crate::limits::{ratelimit_item, Subject, Verdict};
use crate::metrics::{Label, RateLimitedLabels};
use crate::shared::Shared;

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

/// Does this upstream answer say RATE_LIMITED? Only 429s are parsed.
fn upstream_rate_limited(resp: &Response<Bytes>) -> bool {
    #[derive(Deserialize)]
    struct Envelope {
        error: Option<ErrorBody>,
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        code: Option<String>,
    }
    resp.status() == http::StatusCode::TOO_MANY_REQUESTS
        && serde_json::from_slice::<Envelope>(resp.body())
            .ok()
            .and_then(|e| e.error?.code)
            .is_some_and(|c| c == "RATE_LIMITED")
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
        let limits = &shared.limits;
        let (Some(ctx), Some(client)) = (
            req.extensions().get::<RequestContext>(),
            req.extensions().get::<Arc<ClientSettings>>(),
        ) else {
            // Not classified (a test stack without classify): nothing to key on.
            return Box::pin(self.inner.call(req));
        };
        let count = |reason: Arc<str>, shadow: bool| {
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
        };
        let account = ctx.account_id.clone();
        let (limiter, shadow) = limits.for_request(req.uri().path(), ctx.action.as_deref());

        if let Some(a) = &account {
            if let Some(left) = limits.cooldowns.remaining(a) {
                count(Arc::from("cooldown"), limits.default_shadow);
                if limits.default_shadow {
                    tracing::info!(account = %a, shadow = true, "would refuse: upstream 429 cooldown");
                } else {
                    let e = GatewayError::RateLimited {
                        message: format!(
                            "account {a} was rate limited by LinkupAPI and is held back for {} s; retry in {} s",
                            limits.cooldown.as_secs(),
                            secs(left)
                        ),
                        retry_after: left,
                        policy: None,
                        state: None,
                    };
                    return Box::pin(async move { Err(e) });
                }
            }
        }

        let subject = match &account {
            Some(a) => Subject::Account(a.clone()),
            None => Subject::Client(client.name.clone()),
        };
        let headers = match limiter.check(&subject) {
            Verdict::Allow { remaining, reset } => Some(ratelimit_item(limiter, remaining, reset)),
            Verdict::Deny { wait } => {
                count(limiter.name.clone(), shadow);
                let who = match &account {
                    Some(a) => format!("account {a}"),
                    None => format!("client `{}` (requests without an account)", client.name),
                };
                let rule = match &*limiter.name {
                    "account" => String::new(),
                    name => format!(" by rule `{name}`"),
                };
                let message = format!(
                    "{who} is limited to {}{rule}; retry in {} s",
                    limiter.quota,
                    secs(wait)
                );
                if shadow {
                    tracing::info!(shadow = true, "would refuse: {message}");
                    None
                } else {
                    let e = GatewayError::RateLimited {
                        message,
                        retry_after: wait,
                        policy: Some(limiter.policy.clone()),
                        state: Some(ratelimit_item(limiter, 0, wait)),
                    };
                    return Box::pin(async move { Err(e) });
                }
            }
        };
        let policy = limiter.policy.clone();
        let mut inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let mut resp = inner.call(req).await?;
            if let Some(state) = headers {
                resp.headers_mut().append(RATELIMIT_POLICY, policy);
                resp.headers_mut().append(RATELIMIT, state);
            }
            if let Some(a) = account {
                if upstream_rate_limited(&resp) {
                    let limits = &shared.limits;
                    tracing::warn!(account = %a, cooldown_s = limits.cooldown.as_secs(), "LinkupAPI rate limited the account; holding it back");
                    limits.cooldowns.hold(a, limits.cooldown);
                }
            }
            Ok(resp)
        })
    }
}
