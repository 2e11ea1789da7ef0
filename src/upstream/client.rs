//! The upstream client: per data-plane worker, an HTTP/1.1 pool (over plain TCP our own,
//! [`super::h1`], spoken in the caller's task; over TLS hyper-util's pooled client over
//! hyper-rustls) and, when the upstream speaks HTTP/2 (`upstream.protocol`), a pool of
//! several multiplexed HTTP/2 connections ([`super::h2`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::h1::{H1Body, H1Pool};
use super::h2::{H2Body, H2Pool, Lease, Sent};
use super::{root_cause, CallError, MAX_RESPONSE_BYTES};
use crate::config::{UpstreamProtocol, UpstreamSettings};

type Http1 = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long a pooled connection may carry nothing before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One worker's connections to the upstream.
struct Pools {
    /// HTTP/1.1 over TLS (hyper-util).
    http1: Http1,
    /// HTTP/1.1 over plain TCP, in the caller's task ([`super::h1`]); `None` for https.
    plain: Option<Arc<H1Pool>>,
    /// `None`: the upstream is spoken to over HTTP/1.1 only.
    h2: Option<Arc<H2Pool>>,
}

/// What a client was built from: a reload with the same values keeps the warm pools.
#[derive(PartialEq)]
struct Identity {
    url: String,
    connect_timeout: Duration,
    ca_file: Option<PathBuf>,
    protocol: UpstreamProtocol,
    http2_max_streams: usize,
}

impl Identity {
    fn of(s: &UpstreamSettings) -> Identity {
        Identity {
            url: s.url.clone(),
            connect_timeout: s.connect_timeout,
            ca_file: s.ca_file.clone(),
            protocol: s.protocol,
            http2_max_streams: s.http2_max_streams,
        }
    }
}

/// The upstream pools: one per data-plane worker, so a worker's requests ride connections
/// whose tasks run on that worker's own runtime (no cross-thread wake-up per request), and one
/// for everything else (the admin listener's probe, background tasks).
#[derive(Clone)]
pub struct UpstreamClient {
    pools: Arc<[Pools]>,
    /// Shared: the client is cloned with the stack on every request.
    identity: Arc<Identity>,
}

/// An upstream answer, with its call's place on an HTTP/2 connection held until it is dropped
/// (after its body has been read).
pub(crate) struct Answer {
    pub response: Response<UpstreamBody>,
    pub lease: Option<Lease>,
}

impl UpstreamClient {
    /// `workers`: the data-plane workers that get a pool of their own.
    pub fn new(s: &UpstreamSettings, workers: usize) -> Result<UpstreamClient, String> {
        let tls = tls_config(s)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(s.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let builder = || {
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
        };
        // HTTP/1.1 calls offer only http/1.1 in the TLS handshake: HTTP/2 is the other pool's.
        let http1_connector = builder().enable_http1().wrap_connector(http.clone());
        let https = s.scheme == Scheme::HTTPS;
        let h2_connector = match (s.protocol, https) {
            (UpstreamProtocol::Http1, _) | (UpstreamProtocol::Auto, false) => None,
            (UpstreamProtocol::Auto, true) => {
                Some(builder().enable_all_versions().wrap_connector(http.clone()))
            }
            (UpstreamProtocol::Http2, _) => Some(builder().enable_http2().wrap_connector(http)),
        };
        let target = http::Uri::builder()
            .scheme(s.scheme.clone())
            .authority(s.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream.url: {e}"))?;
        let plain_addr = format!(
            "{}:{}",
            s.authority.host(),
            s.authority.port_u16().unwrap_or(80)
        );
        let pools = (0..=workers)
            .map(|_| Pools {
                plain: (!https).then(|| {
                    Arc::new(H1Pool::new(
                        plain_addr.clone(),
                        s.host.clone(),
                        s.connect_timeout,
                    ))
                }),
                http1: Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(IDLE_TIMEOUT)
                    .pool_max_idle_per_host(4096)
                    // Upstream answers are small JSON: read them 4 KB at a time instead of
                    // hyper's adaptive 8 KB+ per connection (thousands of slow calls in
                    // flight each hold one connection; a larger answer takes more reads).
                    .http1_read_buf_exact_size(4096)
                    .build(http1_connector.clone()),
                h2: h2_connector.as_ref().map(|c| {
                    Arc::new(H2Pool::new(
                        c.clone(),
                        target.clone(),
                        s.protocol == UpstreamProtocol::Auto,
                        s.http2_max_streams,
                        s.connect_timeout,
                        IDLE_TIMEOUT,
                    ))
                }),
            })
            .collect();
        Ok(UpstreamClient {
            pools,
            identity: Arc::new(Identity::of(s)),
        })
    }

    /// The pools of the worker this runs on; the shared ones off the data plane.
    fn pools(&self) -> &Pools {
        let i = crate::workers::current().map_or(0, |w| w + 1);
        &self.pools[i.min(self.pools.len() - 1)]
    }

    /// Sends one request: on an HTTP/2 connection when the upstream speaks it, else HTTP/1.1.
    /// Nothing is re-sent once it may have reached the upstream.
    pub(crate) async fn send(&self, req: Request<Bytes>) -> Result<Answer, CallError> {
        let pools = self.pools();
        let req = match &pools.h2 {
            Some(h2) => match h2.send(req).await {
                Sent::Answer(a) => {
                    return a.map(|(response, lease)| Answer {
                        response: response.map(UpstreamBody::H2),
                        lease: Some(lease),
                    })
                }
                Sent::Http1(req) => req,
            },
            None => req,
        };
        if let Some(plain) = &pools.plain {
            return plain.send(req).await.map(|response| Answer {
                response: response.map(UpstreamBody::Plain),
                lease: None,
            });
        }
        match pools.http1.request(req.map(Full::new)).await {
            Ok(response) => Ok(Answer {
                response: response.map(UpstreamBody::Http1),
                lease: None,
            }),
            Err(e) if e.is_connect() => Err(CallError::Connect(root_cause(&e))),
            Err(e) => Err(CallError::Sent(root_cause(&e))),
        }
    }

    /// A request the gateway makes on its own behalf (the `/v2/credits` probe), with the
    /// stored key; the whole answer, bounded.
    pub async fn get(
        &self,
        s: &UpstreamSettings,
        path: &'static str,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let uri = http::Uri::builder()
            .scheme(s.scheme.clone())
            .authority(s.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(Bytes::new());
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert("x-api-key", s.api_key.header().clone());
        let answer = self.send(req).await.map_err(|e| match e {
            CallError::Connect(m) | CallError::Sent(m) => m,
        })?;
        let status = answer.response.status();
        let body = Limited::new(answer.response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// Keep this client (and its warm pool) for new settings when nothing it depends on changed.
    pub fn reuse_for(&self, s: &UpstreamSettings, workers: usize) -> bool {
        self.pools.len() == workers + 1 && *self.identity == Identity::of(s)
    }
}

/// The webpki roots, plus `upstream.ca_file` when set.
fn tls_config(s: &UpstreamSettings) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &s.ca_file {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("upstream.ca_file: cannot read {}: {e}", ca.display()))?;
        let mut n = 0;
        for cert in certs {
            let cert =
                cert.map_err(|e| format!("upstream.ca_file: bad PEM in {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("upstream.ca_file: bad certificate: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "upstream.ca_file: no certificate in {}",
                ca.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An upstream answer's body, from either pool.
pub(crate) enum UpstreamBody {
    Http1(Incoming),
    Plain(H1Body),
    H2(H2Body),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Plain(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpstreamBody::H2(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Plain(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Plain(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}
