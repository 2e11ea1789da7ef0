//! inject_key: the caller's credentials and every hop-by-hop header are dropped, the URI is
//! rewritten onto the configured upstream, `Host` becomes the upstream's, and `x-api-key`
//! becomes the stored key (a sensitive header value). The last layer before the wire, and the
//! first on the way back: the answer keeps only the headers a caller needs, never the key.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{header, HeaderValue, Request, Response, Version};
use tower::{Layer, Service};

use crate::config::UpstreamSettings;
use crate::context::RequestLog;
use crate::error::GatewayError;

const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

#[derive(Clone)]
pub struct InjectKeyLayer {
    upstream: Arc<UpstreamSettings>,
}

impl InjectKeyLayer {
    pub fn new(upstream: Arc<UpstreamSettings>) -> Self {
        InjectKeyLayer { upstream }
    }
}

impl<S> Layer<S> for InjectKeyLayer {
    type Service = InjectKey<S>;
    fn layer(&self, inner: S) -> InjectKey<S> {
        InjectKey {
            inner,
            upstream: self.upstream.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InjectKey<S> {
    inner: S,
    upstream: Arc<UpstreamSettings>,
}

/// Turn a caller's request into the upstream request, in place.
pub fn rewrite(req: &mut Request<Bytes>, up: &UpstreamSettings) -> Result<(), GatewayError> {
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|e| GatewayError::InvalidParams(format!("cannot build the upstream URI: {e}")))?;
    *req.uri_mut() = uri;
    // The upstream connection picks its own version (ALPN); the caller's is not ours to pass.
    *req.version_mut() = Version::HTTP_11;
    let request_id = req
        .extensions()
        .get::<Arc<RequestLog>>()
        .map(|l| l.request_id.clone());
    let h = req.headers_mut();
    crate::headers::strip_hop_by_hop(h);
    h.remove("x-api-key");
    h.remove(header::AUTHORIZATION);
    h.remove(header::COOKIE);
    h.remove(header::FORWARDED);
    h.remove("x-forwarded-for");
    h.remove("x-forwarded-host");
    h.remove("x-forwarded-proto");
    h.insert(header::HOST, up.host.clone());
    h.insert(X_API_KEY, up.api_key.header().clone());
    if let Some(id) = request_id {
        h.insert(super::observe::X_REQUEST_ID, id);
    }
    if !h.contains_key(header::CONTENT_TYPE) && !req.body().is_empty() {
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok(())
}

impl<S> Service<Request<Bytes>> for InjectKey<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = super::BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        if let Err(e) = rewrite(&mut req, &self.upstream) {
            return Box::pin(async move { Err(e) });
        }
        let fut = self.inner.call(req);
        let upstream = self.upstream.clone();
        // On the way back: only the headers a caller needs, never the stored key.
        Box::pin(async move {
            let mut resp = fut.await?;
            crate::headers::answer_headers(
                resp.headers_mut(),
                upstream.api_key.expose().as_bytes(),
            );
            Ok(resp)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_onto_the_upstream_and_swaps_credentials() {
        let env = vec![("K".to_string(), "upstream-secret".to_string())];
        let s = crate::config::load_str(
            "[upstream]\nurl = \"https://api.linkupapi.com\"\napi_key_env = \"K\"\n",
            &env,
            None,
        )
        .unwrap();
        let mut req = Request::post("/v2/checkpoint?x=1")
            .header("host", "evil.example")
            .header("x-api-key", "caller-virtual-key")
            .header("authorization", "Bearer caller-virtual-key")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("x-custom", "kept")
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        rewrite(&mut req, &s.upstream).unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://api.linkupapi.com/v2/checkpoint?x=1"
        );
        let h = req.headers();
        assert_eq!(h["host"], "api.linkupapi.com");
        assert_eq!(h["x-api-key"], "upstream-secret");
        assert!(h["x-api-key"].is_sensitive());
        assert!(!h.contains_key("authorization"));
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key("connection"));
        assert_eq!(h["x-custom"], "kept");
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
    }
}
