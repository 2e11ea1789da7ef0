//! authenticate: the caller's virtual key (`x-api-key`, or `Authorization: Bearer`) becomes a
//! `Client` in the request extensions; anything else is 403 `INVALID_API_KEY`, as the upstream
//! answers a bad key. Keys are compared by SHA-256, the only form the gateway stores.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::config::ClientSettings;
use crate::context::RequestLog;
use crate::error::GatewayError;
use crate::shared::Shared;

#[derive(Clone)]
pub struct AuthenticateLayer {
    shared: Arc<Shared>,
}

impl AuthenticateLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        AuthenticateLayer { shared }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// The presented virtual key, if any.
fn presented_key<B>(req: &Request<B>) -> Option<&[u8]> {
    if let Some(v) = req.headers().get("x-api-key") {
        return Some(v.as_bytes());
    }
    let auth = req.headers().get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = auth.split_at(auth.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

pub fn sha256(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Shared {
    /// Who is calling? Open local mode (no clients, loopback only) admits everyone.
    pub fn identify<B>(&self, req: &Request<B>) -> Result<Arc<ClientSettings>, GatewayError> {
        if let Some(anon) = &self.anonymous {
            return Ok(anon.clone());
        }
        let key = presented_key(req).ok_or(GatewayError::InvalidApiKey(
            "missing virtual key: send it in x-api-key or as Authorization: Bearer",
        ))?;
        self.clients
            .get(&sha256(key))
            .cloned()
            .ok_or(GatewayError::InvalidApiKey("unknown virtual key"))
    }
}

impl<S, B> Service<Request<B>> for Authenticate<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.shared.identify(&req) {
            Ok(client) => {
                if let Some(log) = req.extensions().get::<Arc<RequestLog>>() {
                    let _ = log.client.set(client.clone());
                }
                req.extensions_mut().insert(client);
                Box::pin(self.inner.call(req))
            }
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_from_x_api_key_or_bearer() {
        let r = Request::get("/v2/credits")
            .header("x-api-key", "k1")
            .body(())
            .unwrap();
        assert_eq!(presented_key(&r), Some(&b"k1"[..]));
        let r = Request::get("/v2/credits")
            .header("authorization", "Bearer  k2 ")
            .body(())
            .unwrap();
        assert_eq!(presented_key(&r), Some(&b"k2"[..]));
        let r = Request::get("/v2/credits")
            .header("authorization", "Basic abc")
            .body(())
            .unwrap();
        assert_eq!(presented_key(&r), None);
        let r = Request::get("/v2/credits").body(()).unwrap();
        assert_eq!(presented_key(&r), None);
    }
}
