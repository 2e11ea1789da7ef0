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
use crate::layers::status_cache::StatusStore;
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
                    let (process, current) = (process.clone(), current.clone());
                    async move {
                        if let Some(resp) = refuse_without_token(&req, &current) {
                            return Ok::<_, Infallible>(resp);
                        }
                        if let Some(resp) = purge_cache(&req, &current).await {
                            return Ok::<_, Infallible>(resp);
                        }
                        if req.method() == Method::GET {
                            match req.uri().path() {
                                "/usage" => return Ok(usage(req.uri().query(), &process).await),
                                "/dashboard" => return Ok(dashboard(&process, &current).await),
                                _ => {}
                            }
                        }
                        Ok::<_, Infallible>(route(&req, &process, &current))
                    }
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

/// `DELETE /cache/accounts/{id}`: forget an account's cached status. 204 whether or not it was
/// cached (and when the cache is off): afterwards it is not, which is what the caller asked.
/// `None`: not this route.
async fn purge_cache(
    req: &Request<Incoming>,
    current: &ArcSwap<Generation>,
) -> Option<Response<Full<Bytes>>> {
    let id = req.uri().path().strip_prefix("/cache/accounts/")?;
    const PLAIN: &str = "text/plain; charset=utf-8";
    if id.is_empty() || id.contains('/') {
        return Some(text(StatusCode::NOT_FOUND, PLAIN, "not found\n"));
    }
    if req.method() != Method::DELETE {
        return Some(text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        ));
    }
    let Ok(id) = percent_encoding::percent_decode_str(id).decode_utf8() else {
        return Some(text(
            StatusCode::BAD_REQUEST,
            PLAIN,
            "the account id is not UTF-8\n",
        ));
    };
    let store = current.load().shared.status_store.clone();
    let forgotten = match store {
        Some(store) => store.forget(&id).await,
        None => false,
    };
    tracing::info!(account = %id, forgotten, "status cache entry purged");
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Some(resp)
}

/// With `admin_token_*` set, every admin route but the probes (`/healthz`, `/readyz`, which
/// tell nothing) wants `Authorization: Bearer TOKEN`. Tokens are compared as SHA-256 digests.
fn refuse_without_token(
    req: &Request<Incoming>,
    current: &ArcSwap<Generation>,
) -> Option<Response<Full<Bytes>>> {
    let want = current.load().shared.settings.server.admin_token_sha256?;
    if matches!(req.uri().path(), "/healthz" | "/readyz") {
        return None;
    }
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| crate::layers::authenticate::sha256(t.trim().as_bytes()));
    if presented == Some(want) {
        return None;
    }
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "text/plain; charset=utf-8",
        "the admin listener wants Authorization: Bearer <admin token>\n",
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"linkup-gateway admin\""),
    );
    Some(r)
}

/// Run a ledger read off the async threads.
async fn read_ledger<T: Send + 'static>(
    process: &Process,
    f: impl FnOnce(&dyn crate::ledger::Ledger) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
) -> Result<T, String> {
    let ledger = process.ledger.clone();
    match tokio::task::spawn_blocking(move || f(ledger.as_ref())).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `GET /usage?from=&to=&by=&format=json|csv`: ledger aggregates; default range today (UTC).
async fn usage(query: Option<&str>, process: &Process) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let params: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let format = match get("format").map(crate::usage::Format::parse).transpose() {
        Ok(Some(crate::usage::Format::Table)) => crate::usage::Format::Csv,
        Ok(f) => f.unwrap_or(crate::usage::Format::Json),
        Err(e) => return text(StatusCode::BAD_REQUEST, PLAIN, format!("{e}\n")),
    };
    let q = match crate::usage::query(get("from"), get("to"), get("by")) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, PLAIN, format!("{e}\n")),
    };
    let by = q.by.clone();
    match read_ledger(process, move |l| l.usage(&q)).await {
        Ok(rows) => match format {
            crate::usage::Format::Csv => text(
                StatusCode::OK,
                "text/csv; charset=utf-8",
                crate::usage::csv(&rows, &by),
            ),
            _ => text(
                StatusCode::OK,
                "application/json",
                crate::usage::json(&rows),
            ),
        },
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{e}\n")),
    }
}

/// `GET /dashboard`: the last 30 days of credits, and today's budgets.
async fn dashboard(process: &Process, current: &ArcSwap<Generation>) -> Response<Full<Bytes>> {
    use crate::ledger::{GroupBy, UsageQuery};
    let to_day = crate::usage::today();
    let from_day = to_day.saturating_sub(time::Duration::days(29));
    let days: Vec<String> = (0..30)
        .map(|i| crate::ledger::day_key(from_day.saturating_add(time::Duration::days(i))))
        .collect();
    let q = |by: Vec<GroupBy>| UsageQuery {
        from_day,
        to_day,
        by,
    };
    let (a, b, c) = (
        q(vec![GroupBy::Client, GroupBy::Day]),
        q(vec![GroupBy::Action, GroupBy::Day]),
        q(vec![GroupBy::Outcome]),
    );
    let result = read_ledger(process, move |l| {
        Ok((l.usage(&a)?, l.usage(&b)?, l.usage(&c)?))
    })
    .await;
    let (by_client, by_action, by_outcome) = match result {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            )
        }
    };
    let settings = current.load().shared.settings.clone();
    let day = crate::budgets::utc_day(crate::budgets::now_ms());
    let budgets: Vec<crate::dashboard::BudgetLine> = settings
        .clients
        .iter()
        .map(|c| {
            let st = process.budgets.standing(&c.name, day);
            crate::dashboard::BudgetLine {
                client: c.name.to_string(),
                budget: c.daily_credit_budget,
                spent: st.spent,
                reserved: st.reserved,
            }
        })
        .collect();
    let html = crate::dashboard::render(&days, &by_client, &by_action, &by_outcome, &budgets);
    text(StatusCode::OK, "text/html; charset=utf-8", html)
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
            } else if let Some(e @ crate::ledger::LedgerError::FileLost { .. }) =
                process.ledger.write_error()
            {
                // Not ready until an operator restores the file or restarts the gateway.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("ledger unavailable: {e}\n"),
                )
            } else {
                text(StatusCode::OK, PLAIN, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            // Counted at scrape time: one pass over the cache, never per request.
            let store = current.load().shared.status_store.clone();
            StatusStore::export(store.as_deref(), &process.metrics);
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                process.metrics.encode(),
            )
        }
        (&Method::GET, "/config") => {
            let v = redacted_config(&current.load().shared.settings);
            let body = serde_json::to_vec_pretty(&v).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/usage" | "/dashboard") => text(
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
            "admin_token": s.server.admin_token_sha256.map(|_| "[redacted]"),
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
            "keys": c.keys.iter().map(|k| json!({
                "sha256": "[redacted]",
                "not_after": k.not_after.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
            })).collect::<Vec<_>>(),
            "cert_subject": c.cert_subject,
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
            "sync": s.ledger.sync.as_str(),
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
