//! read_body: collect the request body once, bounded by `max_body_bytes`. It sits below
//! authenticate and client_limit so that an unknown or throttled caller never makes the
//! gateway read its body; everything below works on `Request<Bytes>`.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::error::GatewayError;

#[derive(Clone)]
pub struct ReadBodyLayer {
    limit: usize,
}

impl ReadBodyLayer {
    pub fn new(limit: usize) -> Self {
        ReadBodyLayer { limit }
    }
}

impl<S> Layer<S> for ReadBodyLayer {
    type Service = ReadBody<S>;
    fn layer(&self, inner: S) -> ReadBody<S> {
        ReadBody {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct ReadBody<S> {
    inner: S,
    limit: usize,
}

impl<S, B> Service<Request<B>> for ReadBody<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let limit = self.limit;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e)
                    if e.is::<http_body_util::LengthLimitError>()
                        || e.is::<crate::body::BodyTooLarge>() =>
                {
                    return Err(GatewayError::PayloadTooLarge { limit })
                }
                Err(e) => {
                    return Err(GatewayError::InvalidParams(format!(
                        "could not read the request body: {e}"
                    )))
                }
            };
            inner.call(Request::from_parts(parts, bytes)).await
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tower::ServiceExt;

    #[tokio::test]
    async fn body_over_the_limit_is_413_and_never_reaches_inner() {
        let svc = ReadBodyLayer::new(4).layer(tower::service_fn(|_r: Request<Bytes>| async {
            panic!("must not be called");
            #[allow(unreachable_code)]
            Ok::<_, GatewayError>(Response::new(Bytes::new()))
        }));
        let r = Request::post("/v2/checkpoint")
            .body(Full::new(Bytes::from_static(b"12345")))
            .unwrap();
        assert_eq!(
            svc.oneshot(r).await.unwrap_err().code(),
            "PAYLOAD_TOO_LARGE"
        );
    }

    #[tokio::test]
    async fn body_within_the_limit_is_passed_whole() {
        let svc = ReadBodyLayer::new(5).layer(tower::service_fn(|r: Request<Bytes>| async move {
            Ok::<_, GatewayError>(Response::new(r.into_body()))
        }));
        let r = Request::post("/v2/checkpoint")
            .body(Full::new(Bytes::from_static(b"12345")))
            .unwrap();
        assert_eq!(
            svc.oneshot(r).await.unwrap().body(),
            &Bytes::from_static(b"12345")
        );
    }
}
