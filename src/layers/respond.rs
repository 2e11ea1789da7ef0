//! respond: the only place a `GatewayError` becomes a response (the upstream's envelope with
//! `"source": "gateway"`). Everything below it returns errors as values.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::context::{RequestContext, RequestLog};
use crate::error::GatewayError;
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner }
    }
}

#[derive(Clone)]
pub struct Respond<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Respond<S>
where
    S: Service<Request<B>, Response = Response<Bytes>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Bytes>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The layers below never fail readiness (limits are checked in `call`).
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // `metadata.action` of a gateway error: the body's action when classify got that far,
        // else the route's name (`checkpoint`, `profiles`, ...).
        let log = req.extensions().get::<Arc<RequestLog>>().cloned();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => Ok(resp),
                Err(e) => {
                    let level_warn = e.blame() != crate::error::Blame::Caller;
                    if level_warn {
                        tracing::warn!(request_id = request_id(&log), code = e.code(), message = %e, "gateway error");
                    } else {
                        tracing::debug!(request_id = request_id(&log), code = e.code(), message = %e, "refused");
                    }
                    let action = log.as_ref().map(|l| match l.context.get() {
                        Some(RequestContext {
                            action: Some(a), ..
                        }) => a.to_string(),
                        _ => l.route.as_str().to_owned(),
                    });
                    let action = action.as_deref().unwrap_or("other");
                    Ok(e.into_response(action))
                }
            }
        })
    }
}

fn request_id(log: &Option<Arc<RequestLog>>) -> &str {
    log.as_ref()
        .and_then(|l| l.request_id.to_str().ok())
        .unwrap_or("-")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn errors_become_envelopes() {
        let svc = RespondLayer.layer(tower::service_fn(|_r: Request<Bytes>| async {
            Err::<Response<Bytes>, _>(GatewayError::Forbidden("no".into()))
        }));
        let mut req = Request::post("/v2/checkpoint").body(Bytes::new()).unwrap();
        let log = RequestLog::new(
            http::HeaderValue::from_static("id"),
            crate::context::Route::Checkpoint,
        );
        req.extensions_mut().insert(Arc::new(log));
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 403);
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["error"]["code"], "FORBIDDEN");
        assert_eq!(v["metadata"]["action"], "checkpoint");
    }
}
