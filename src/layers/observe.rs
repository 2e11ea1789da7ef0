//! observe: request id, metrics and the one access-log line per request (`crate::access_log`).
//! Outermost, so it sees every answer, refusals included.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::context::RequestLog;
use crate::error::GatewayAnswered;
use crate::metrics::{Label, RefusalLabels, RequestLabels, RouteLabels};
use crate::shared::Process;

/// A `HeaderName` constant, not a `&str`: inserting a non-standard name given as text copies
/// it into a new allocation on every request.
pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

#[derive(Clone)]
pub struct ObserveLayer {
    process: Arc<Process>,
}

impl ObserveLayer {
    pub fn new(process: Arc<Process>) -> Self {
        ObserveLayer { process }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            process: self.process.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    process: Arc<Process>,
}

impl<S, B, RB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<RB>, std::convert::Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if crate::util::acceptable_request_id(v) => v.clone(),
            _ => self.process.request_ids.next(),
        };
        let route = crate::layers::classify::route_name(req.method(), req.uri().path());
        let log = Arc::new(RequestLog::new(request_id.clone(), route));
        req.extensions_mut().insert(log.clone());
        let method = req.method().clone();
        // No tracing span per request: entering and leaving one on every poll costs more than
        // the rest of this layer. Log lines that concern a request carry its id as a field.
        let fut = self.inner.call(req);
        let process = self.process.clone();
        Box::pin(async move {
            let Ok(mut resp) = fut.await;
            resp.headers_mut().insert(X_REQUEST_ID, request_id);
            let elapsed = started.elapsed();
            let status = resp.status().as_u16();
            let ctx = log.context.get();
            let route = log.route;
            let client = log
                .client_name()
                .cloned()
                .unwrap_or_else(|| Arc::from("unauthenticated"));
            let m = &process.metrics;
            m.requests
                .get_or_create(&RequestLabels {
                    client: Label(client.clone()),
                    route,
                    status,
                })
                .inc();
            m.request_duration
                .get_or_create(&RouteLabels { route })
                .observe(elapsed.as_secs_f64());
            let refused = resp.extensions().get::<GatewayAnswered>().map(|g| g.0);
            if let Some(code) = refused {
                m.refusals.get_or_create(&RefusalLabels { code }).inc();
            }
            crate::access_log::log(&crate::access_log::Entry {
                request_id: log_id(&log.request_id),
                client: &client,
                method: method.as_str(),
                route: route.as_str(),
                account: ctx.and_then(|c| c.account_id.as_deref()).unwrap_or(""),
                action: ctx.and_then(|c| c.action.as_deref()).unwrap_or(""),
                status,
                error: refused.unwrap_or(""),
                credits: log.credits().map(|c| c as i64).unwrap_or(-1),
                duration_us: elapsed.as_micros() as u64,
                upstream_us: log.upstream_micros().map(|u| u as i64).unwrap_or(-1),
            });
            Ok(resp)
        })
    }
}

fn log_id(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("-")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::context::Route;
    use crate::metrics::{RefusalLabels, RequestLabels};
    use bytes::Bytes;
    use tower::ServiceExt;

    /// Observe over a stub that answers `status`, as the gateway's refusal `code` if given.
    async fn call(
        process: &Arc<Process>,
        req: Request<()>,
        status: u16,
        code: Option<&'static str>,
    ) -> Response<Bytes> {
        ObserveLayer::new(process.clone())
            .layer(tower::service_fn(move |r: Request<()>| async move {
                // Every layer below finds the request's log.
                assert!(r.extensions().get::<Arc<RequestLog>>().is_some());
                let mut resp = Response::new(Bytes::new());
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                if let Some(c) = code {
                    resp.extensions_mut().insert(GatewayAnswered(c));
                }
                Ok::<_, std::convert::Infallible>(resp)
            }))
            .oneshot(req)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_answer_gets_a_request_id_and_is_counted_refusals_by_code() {
        let process = Arc::new(Process::default());
        // A caller's acceptable id is kept; otherwise one is made.
        let r = Request::post("/v2/profiles")
            .header("x-request-id", "caller-id-1")
            .body(())
            .unwrap();
        let resp = call(&process, r, 200, None).await;
        assert_eq!(resp.headers()[X_REQUEST_ID], "caller-id-1");
        let r = Request::post("/v2/profiles")
            .header("x-request-id", "bad id\twith a tab")
            .body(())
            .unwrap();
        let made = call(&process, r, 200, None).await.headers()[X_REQUEST_ID].clone();
        assert_ne!(made, "bad id\twith a tab");
        assert!(!made.is_empty());
        // A refusal by the gateway is counted by its code, under its route and status.
        let r = Request::get("/v2/credits").body(()).unwrap();
        call(&process, r, 429, Some("RATE_LIMITED")).await;
        let m = &process.metrics;
        let profiles = m
            .requests
            .get_or_create(&RequestLabels {
                client: Label(Arc::from("unauthenticated")),
                route: Route::Profiles,
                status: 200,
            })
            .get();
        let credits = m
            .requests
            .get_or_create(&RequestLabels {
                client: Label(Arc::from("unauthenticated")),
                route: Route::Credits,
                status: 429,
            })
            .get();
        assert_eq!((profiles, credits), (2, 1));
        assert_eq!(
            m.refusals
                .get_or_create(&RefusalLabels {
                    code: "RATE_LIMITED"
                })
                .get(),
            1
        );
    }
}
