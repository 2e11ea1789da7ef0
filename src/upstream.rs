//! The pooled upstream client (hyper-util legacy client over hyper-rustls) and the `upstream`
//! layer at the bottom of the stack: send once, collect the answer, map failures to
//! `GatewayError`. Nothing is retried once the request may have reached the upstream; hyper
//! only re-sends a request that was never written (a pooled connection closed under it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tower::Service;

use crate::config::UpstreamSettings;
use crate::context::RequestLog;
use crate::error::GatewayError;
use crate::metrics::{KindLabels, RouteLabels};
use crate::shared::Process;

/// Upstream answers are small JSON; a body beyond this is a broken upstream, not data.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The upstream pools: one per data-plane worker, so a worker's requests ride connections
/// whose tasks run on that worker's own runtime (no cross-thread wake-up per request), and one
/// for everything else (the admin listener's probe, background tasks).
#[derive(Clone)]
pub struct UpstreamClient {
    pools: Arc<[Pool]>,
    /// What the pool was built from: a reload with the same values keeps the warm pool.
    /// Shared: the client is cloned with the stack on every request.
    identity: Arc<(String, Duration, Option<std::path::PathBuf>)>,
}

impl UpstreamClient {
    /// `workers`: the data-plane workers that get a pool of their own.
    pub fn new(s: &UpstreamSettings, workers: usize) -> Result<UpstreamClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &s.ca_file {
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("upstream.ca_file: cannot read {}: {e}", ca.display()))?;
            let mut n = 0;
            for cert in certs {
                let cert = cert
                    .map_err(|e| format!("upstream.ca_file: bad PEM in {}: {e}", ca.display()))?;
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
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("upstream TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(s.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let pools = (0..=workers)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(4096)
                    // Upstream answers are small JSON: read them 4 KB at a time instead of
                    // hyper's adaptive 8 KB+ per connection (thousands of slow calls in
                    // flight each hold one connection; a larger answer takes more reads).
                    .http1_read_buf_exact_size(4096)
                    .build(https.clone())
            })
            .collect();
        Ok(UpstreamClient {
            pools,
            identity: Arc::new((s.url.clone(), s.connect_timeout, s.ca_file.clone())),
        })
    }

    /// The pool of the worker this runs on; the shared one off the data plane.
    fn pool(&self) -> &Pool {
        let i = crate::workers::current().map_or(0, |w| w + 1);
        &self.pools[i.min(self.pools.len() - 1)]
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
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert("x-api-key", s.api_key.header().clone());
        let resp = self.pool().request(req).await.map_err(|e| root_cause(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// Keep this client (and its warm pool) for new settings when nothing it depends on changed.
    pub fn reuse_for(&self, s: &UpstreamSettings, workers: usize) -> bool {
        self.pools.len() == workers + 1
            && *self.identity == (s.url.clone(), s.connect_timeout, s.ca_file.clone())
    }
}

/// The bottom of the stack: one upstream call.
#[derive(Clone)]
pub struct Upstream {
    client: UpstreamClient,
    process: Arc<Process>,
}

impl Upstream {
    pub fn new(client: UpstreamClient, process: Arc<Process>) -> Upstream {
        Upstream { client, process }
    }
}

impl Service<Request<Bytes>> for Upstream {
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let client = self.client.pool().clone();
        let process = self.process.clone();
        Box::pin(async move {
            let log = req.extensions().get::<Arc<RequestLog>>().cloned();
            let route = log.as_ref().map(|l| l.route).unwrap_or("other");
            let (parts, body) = req.into_parts();
            let req = Request::from_parts(parts, Full::new(body));
            let started = Instant::now();
            let fail = |kind: &'static str, message: String, maybe_sent: bool| {
                let err = GatewayError::UpstreamUnavailable {
                    message,
                    maybe_sent,
                };
                process
                    .metrics
                    .upstream_errors
                    .get_or_create(&KindLabels { kind })
                    .inc();
                let request_id = log
                    .as_ref()
                    .and_then(|l| l.request_id.to_str().ok())
                    .unwrap_or("-");
                tracing::warn!(request_id, kind, error = %err, "upstream call failed");
                err
            };
            let resp = match client.request(req).await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    return Err(fail(
                        "connect",
                        format!("cannot connect: {}", root_cause(&e)),
                        false,
                    ))
                }
                Err(e) => {
                    return Err(fail(
                        "reset",
                        format!(
                            "connection failed after the request was sent: {}",
                            root_cause(&e)
                        ),
                        true,
                    ))
                }
            };
            let (mut parts, body) = resp.into_parts();
            let body = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Err(fail(
                        "body",
                        format!("the response body broke off: {e}"),
                        true,
                    ))
                }
            };
            let elapsed = started.elapsed();
            process
                .metrics
                .upstream_duration
                .get_or_create(&RouteLabels { route })
                .observe(elapsed.as_secs_f64());
            if let Some(log) = &log {
                log.set_upstream_micros(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
            }
            crate::headers::strip_hop_by_hop(&mut parts.headers);
            parts.extensions = http::Extensions::new();
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// The innermost error message (hyper's outer errors say little: "client error (Connect)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
