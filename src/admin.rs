//! The admin listener: health, readiness, metrics and the running config (redacted).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{AccountScope, Settings};
use crate::server::Generation;
use crate::shared::Process;

pub async fn serve(
    listener: TcpListener,
    process: Arc<Process>,
    current: Arc<ArcSwap<Generation>>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let process = process.clone();
                let current = current.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = route(&req, &process, &current);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = stop.changed() => break,
        }
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), graceful.shutdown()).await;
}

fn text(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

fn route(
    req: &Request<Incoming>,
    process: &Process,
    current: &ArcSwap<Generation>,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, PLAIN, "ok\n"),
        (&Method::GET, "/readyz") => {
            if process.draining.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "draining\n")
            } else {
                text(StatusCode::OK, PLAIN, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            process.metrics.encode(),
        ),
        (&Method::GET, "/config") => {
            let v = redacted_config(&current.load().shared.settings);
            let body = serde_json::to_vec_pretty(&v).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/config") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        ),
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

/// The running config as JSON: the upstream key, key hashes and connection strings never
/// appear; where the key comes from does.
pub fn redacted_config(s: &Settings) -> serde_json::Value {
    let d = |d: std::time::Duration| format!("{}ms", d.as_millis());
    json!({
        "source": s.source.as_ref().map(|p| p.display().to_string()),
        "server": {
            "listen": s.server.listen.to_string(),
            "admin_listen": s.server.admin_listen.to_string(),
            "max_body_bytes": s.server.max_body_bytes,
            "request_timeout": d(s.server.request_timeout),
            "shutdown_grace": d(s.server.shutdown_grace),
            "max_in_flight": s.server.max_in_flight,
            "header_read_timeout": d(s.server.header_read_timeout),
            "tls": s.server.tls.as_ref().map(|t| json!({
                "cert_file": t.cert_file.display().to_string(),
                "key_file": t.key_file.display().to_string(),
                "client_ca_file": t.client_ca_file.as_ref().map(|p| p.display().to_string()),
            })),
        },
        "upstream": {
            "url": s.upstream.url,
            "api_key": "[redacted]",
            "api_key_source": s.upstream.api_key_source,
            "connect_timeout": d(s.upstream.connect_timeout),
            "ca_file": s.upstream.ca_file.as_ref().map(|p| p.display().to_string()),
        },
        "clients": s.clients.iter().map(|c| json!({
            "name": &*c.name,
            "key_sha256": "[redacted]",
            "accounts": match &c.accounts { AccountScope::Any => json!(["*"]), AccountScope::Only(l) => json!(l) },
            "paths": c.paths.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "daily_credit_budget": c.daily_credit_budget,
            "requests_per_second": c.requests_per_second,
            "shadow": c.shadow,
        })).collect::<Vec<_>>(),
        "rate_limit": {
            "per_account": s.rate_limit.per_account.to_string(),
            "burst": s.rate_limit.burst,
            "upstream_429_cooldown": d(s.rate_limit.upstream_429_cooldown),
            "shadow": s.rate_limit.shadow,
            "rules": s.rate_limit.rules.iter().map(|r| json!({
                "name": r.name, "path": r.path.as_str(), "action": r.action,
                "per_account": r.per_account.to_string(), "burst": r.burst, "shadow": r.shadow,
            })).collect::<Vec<_>>(),
        },
        "checkpoint": {"coalesce": s.checkpoint_coalesce},
        "status_cache": {"enabled": s.status_cache.enabled, "ttl": d(s.status_cache.ttl), "max_entries": s.status_cache.max_entries},
        "ledger": {
            "path": s.ledger.path.display().to_string(),
            "postgres_url": s.ledger.postgres_url.as_ref().map(|_| "[redacted]"),
            "sync": match s.ledger.sync { crate::config::LedgerSync::BeforeResponse => "before_response", crate::config::LedgerSync::Async => "async" },
            "reconcile_every": d(s.ledger.reconcile_every),
        },
        "fleet": s.fleet.as_ref().map(|f| json!({
            "redis_url": f.redis_url.as_ref().map(|_| "[redacted]"),
            "on_store_failure": {"limits": format!("{:?}", f.limits_on_failure).to_lowercase(), "budgets": format!("{:?}", f.budgets_on_failure).to_lowercase()},
        })),
        "metrics": {"per_account": s.metrics_per_account},
        "costs": {"default": s.costs.default, "by_key": s.costs.by_key},
    })
}
