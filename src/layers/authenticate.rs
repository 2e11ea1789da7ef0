//! authenticate: the caller's virtual key (`x-api-key`, or `Authorization: Bearer`) becomes a
//! `Client` in the request extensions; anything else is 403 `INVALID_API_KEY`, as the upstream
//! answers a bad key. Keys are compared by SHA-256, the only form the gateway stores.
//!
//! With mTLS, a caller that presents no virtual key may be identified by its verified client
//! certificate instead: the server puts a [`PeerIdentity`] in the request extensions and a
//! client whose `cert_subject` is one of its names is the caller. A presented key always wins.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
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

/// The names of the verified client certificate on this connection (subject CN, DNS SANs),
/// inserted by the server for every request of an mTLS connection; never from a header.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Arc<[String]>);

impl PeerIdentity {
    /// Does the certificate carry `subject` (DNS names compare case-insensitively)?
    pub fn matches(&self, subject: &str) -> bool {
        self.0.iter().any(|n| n.eq_ignore_ascii_case(subject))
    }
}

pub use crate::util::sha256;

impl Shared {
    /// Who is calling? Open local mode (no clients, loopback only) admits everyone.
    pub fn identify<B>(&self, req: &Request<B>) -> Result<Arc<ClientSettings>, GatewayError> {
        self.identify_at(req, time::OffsetDateTime::now_utc())
    }

    /// [`Shared::identify`] at a given time (keys with a `not_after` expire).
    pub fn identify_at<B>(
        &self,
        req: &Request<B>,
        now: time::OffsetDateTime,
    ) -> Result<Arc<ClientSettings>, GatewayError> {
        if let Some(anon) = &self.anonymous {
            return Ok(anon.clone());
        }
        let Some(key) = presented_key(req) else {
            return match req.extensions().get::<PeerIdentity>() {
                Some(peer) => self
                    .settings
                    .clients
                    .iter()
                    .find(|c| c.cert_subject.as_deref().is_some_and(|s| peer.matches(s)))
                    .cloned()
                    .ok_or(GatewayError::InvalidApiKey(
                        "no virtual key, and the client certificate's subject is not a configured cert_subject",
                    )),
                None => Err(GatewayError::InvalidApiKey(
                    "missing virtual key: send it in x-api-key or as Authorization: Bearer",
                )),
            };
        };
        let sha = sha256(key);
        let client = self
            .clients
            .get(&sha)
            .ok_or(GatewayError::InvalidApiKey("unknown virtual key"))?;
        if client
            .keys
            .iter()
            .any(|k| k.sha256 == sha && k.expired_at(now))
        {
            return Err(GatewayError::InvalidApiKey(
                "this virtual key has expired (its not_after has passed); use the client's new key",
            ));
        }
        Ok(client.clone())
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

    fn shared(extra: &str) -> Shared {
        crate::shared::for_tests(extra)
    }

    fn with_key(key: &str) -> Request<()> {
        Request::get("/v2/credits")
            .header("x-api-key", key)
            .body(())
            .unwrap()
    }

    fn at(s: &str) -> time::OffsetDateTime {
        crate::config::parse_not_after(s).unwrap()
    }

    #[test]
    fn both_keys_work_during_the_overlap_and_the_expired_one_is_refused_after() {
        let s = shared(&format!(
            "[[clients]]\nname = \"crm\"\nkeys = [{{ sha256 = \"{}\", not_after = \"2026-06-30T12:00:00Z\" }}, {{ sha256 = \"{}\" }}]\n",
            hex::encode(sha256(b"old")),
            hex::encode(sha256(b"new"))
        ));
        let before = at("2026-06-30T11:59:59Z");
        let after = at("2026-06-30T12:00:01Z");
        assert_eq!(
            &*s.identify_at(&with_key("old"), before).unwrap().name,
            "crm"
        );
        assert_eq!(
            &*s.identify_at(&with_key("new"), before).unwrap().name,
            "crm"
        );
        assert_eq!(
            &*s.identify_at(&with_key("new"), after).unwrap().name,
            "crm"
        );
        let e = s.identify_at(&with_key("old"), after).unwrap_err();
        assert_eq!(e.code(), "INVALID_API_KEY");
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(!e.to_string().contains("old"), "{e}");
        let e = s.identify_at(&with_key("other"), before).unwrap_err();
        assert!(e.to_string().contains("unknown"), "{e}");
    }

    #[test]
    fn a_certificate_identifies_a_client_only_without_a_key() {
        // cert_subject needs mTLS in a full config; the lookup itself is tested here.
        let mut s = shared(&format!(
            "[[clients]]\nname = \"keyed\"\nkey_sha256 = \"{}\"\n",
            hex::encode(sha256(b"k1"))
        ));
        let mut settings = (*s.settings).clone();
        let mut by_cert = (*settings.clients[0]).clone();
        by_cert.name = Arc::from("by-cert");
        by_cert.keys.clear();
        by_cert.cert_subject = Some("billing.internal".into());
        settings.clients.push(Arc::new(by_cert));
        s.settings = Arc::new(settings);
        let peer = |names: &[&str]| {
            PeerIdentity(
                names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .into(),
            )
        };
        let mut r = Request::get("/v2/credits").body(()).unwrap();
        r.extensions_mut()
            .insert(peer(&["Billing Service", "BILLING.internal"]));
        assert_eq!(&*s.identify(&r).unwrap().name, "by-cert");
        let mut r = with_key("k1");
        r.extensions_mut().insert(peer(&["billing.internal"]));
        assert_eq!(
            &*s.identify(&r).unwrap().name,
            "keyed",
            "a presented key wins"
        );
        let mut r = Request::get("/v2/credits").body(()).unwrap();
        r.extensions_mut().insert(peer(&["stranger"]));
        let e = s.identify(&r).unwrap_err();
        assert_eq!(e.code(), "INVALID_API_KEY");
        assert!(e.to_string().contains("cert_subject"), "{e}");
    }

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
