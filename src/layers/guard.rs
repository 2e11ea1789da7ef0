//! guard: cheap refusals before anything else is spent on a request.
//! - load shedding: beyond `max_in_flight`, 503 at once (with `Retry-After`);
//! - only the upstream: `CONNECT`, absolute-form targets, paths outside `/v2/`, dot segments and
//!   encoded separators are refused, never forwarded;
//! - a declared `Content-Length` over `max_body_bytes` is 413 before a byte is read (read_body
//!   enforces the same limit on bodies without one);
//! - the whole-request timeout: 504 when it passes, upstream included.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, Version};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::error::GatewayError;
use crate::shared::Process;

#[derive(Clone)]
pub struct GuardLayer {
    process: Arc<Process>,
    max_in_flight: usize,
    max_body_bytes: usize,
    request_timeout: Duration,
}

impl GuardLayer {
    pub fn new(
        process: Arc<Process>,
        max_in_flight: usize,
        max_body_bytes: usize,
        request_timeout: Duration,
    ) -> Self {
        GuardLayer {
            process,
            max_in_flight,
            max_body_bytes,
            request_timeout,
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    cfg: GuardLayer,
}

/// One slot of `max_in_flight`, released on drop (answer, timeout or caller gone).
struct InFlight(Arc<Process>);

impl InFlight {
    fn acquire(p: &Arc<Process>, max: usize) -> Option<InFlight> {
        let prev = p.in_flight.fetch_add(1, Ordering::AcqRel);
        p.metrics.in_flight.inc();
        let slot = InFlight(p.clone());
        (prev < max).then_some(slot)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.in_flight.dec();
    }
}

/// Is this request target one the gateway may forward? `Ok` or the refusal.
pub fn check_target<B>(req: &Request<B>) -> Result<(), GatewayError> {
    if req.method() == Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed(
            "CONNECT is not supported: this gateway only forwards to LinkupAPI".into(),
        ));
    }
    // HTTP/2 always carries :authority; an HTTP/1 absolute-form target names a host to go to.
    if req.version() <= Version::HTTP_11 && req.uri().authority().is_some() {
        return Err(GatewayError::InvalidParams(
            "absolute-form request targets are refused: send the path only (/v2/...)".into(),
        ));
    }
    let path = req.uri().path();
    if !path.starts_with("/v2/") {
        return Err(GatewayError::NotFound(format!(
            "{path} is not a LinkupAPI v2 path (expected /v2/...)"
        )));
    }
    if path.contains('\\') {
        return Err(GatewayError::InvalidParams(
            "backslashes are not allowed in paths".into(),
        ));
    }
    for seg in path.split('/') {
        if seg == "." || seg == ".." {
            return Err(GatewayError::InvalidParams(
                "dot segments (. and ..) are not allowed in paths".into(),
            ));
        }
        if seg.contains('%') {
            let lower = seg.to_ascii_lowercase();
            for bad in ["%2e", "%2f", "%5c", "%00", "%25"] {
                if lower.contains(bad) {
                    return Err(GatewayError::InvalidParams(format!(
                        "encoded dots, separators, NUL or percent signs ({bad}) are not allowed in paths"
                    )));
                }
            }
        }
    }
    Ok(())
}

impl<S, B> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<Bytes>, Error = GatewayError> + Send,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(slot) = InFlight::acquire(&self.cfg.process, self.cfg.max_in_flight) else {
            let limit = self.cfg.max_in_flight;
            return Box::pin(async move { Err(GatewayError::Overloaded { limit }) });
        };
        if let Err(e) = check_target(&req) {
            return Box::pin(async move { Err(e) });
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = self.cfg.max_body_bytes;
        if declared.is_some_and(|n| n > limit as u64) {
            return Box::pin(async move { Err(GatewayError::PayloadTooLarge { limit }) });
        }
        let timeout = self.cfg.request_timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let _slot = slot;
            match crate::deadline::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn req(uri: &str) -> Request<Bytes> {
        Request::post(uri).body(Bytes::new()).unwrap()
    }

    #[test]
    fn refuses_targets_outside_the_upstream() {
        assert!(check_target(&req("/v2/checkpoint")).is_ok());
        assert!(check_target(&req("/v2/accounts/acc%20x")).is_ok());
        for bad in [
            "http://evil.example/v2/checkpoint",
            "/v1/login",
            "/v2",
            "/v2/../admin",
            "/v2/accounts/%2e%2e/x",
            "/v2/accounts/a%2Fb",
            "/v2/./checkpoint",
            "/v2/accounts/a%00",
        ] {
            assert!(check_target(&req(bad)).is_err(), "{bad}");
        }
        let mut c = req("/v2/checkpoint");
        *c.method_mut() = Method::CONNECT;
        assert_eq!(check_target(&c).unwrap_err().code(), "METHOD_NOT_ALLOWED");
    }

    #[tokio::test]
    async fn sheds_load_beyond_max_in_flight() {
        let process = Arc::new(Process::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let layer = GuardLayer::new(process.clone(), 1, 100, Duration::from_secs(5));
        let svc = layer.layer(tower::service_fn(move |_r: Request<Bytes>| {
            let rx = rx.clone();
            async move {
                let rx = rx.lock().await.take();
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                Ok::<_, GatewayError>(Response::new(Bytes::new()))
            }
        }));
        let first = tokio::spawn(svc.clone().oneshot(req("/v2/credits")));
        while process.in_flight.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        let second = svc.clone().oneshot(req("/v2/credits")).await;
        assert_eq!(second.unwrap_err().code(), "OVERLOADED");
        tx.send(()).unwrap();
        assert!(first.await.unwrap().is_ok());
        assert_eq!(process.in_flight.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_504() {
        let layer = GuardLayer::new(
            Arc::new(Process::default()),
            10,
            100,
            Duration::from_secs(1),
        );
        let svc = layer.layer(tower::service_fn(|_r: Request<Bytes>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, GatewayError>(Response::new(Bytes::new()))
        }));
        let e = svc.oneshot(req("/v2/credits")).await.unwrap_err();
        assert_eq!(e.code(), "UPSTREAM_TIMEOUT");
    }

    #[tokio::test]
    async fn declared_oversized_body_is_413() {
        let layer = GuardLayer::new(Arc::new(Process::default()), 10, 4, Duration::from_secs(1));
        let svc = layer.layer(tower::service_fn(|_r: Request<Bytes>| async {
            Ok::<_, GatewayError>(Response::new(Bytes::new()))
        }));
        let mut r = req("/v2/checkpoint");
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        assert_eq!(
            svc.oneshot(r).await.unwrap_err().code(),
            "PAYLOAD_TOO_LARGE"
        );
    }
}
