//! The admin listener: health, readiness, metrics and the running config (redacted).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::layers::status_cache::StatusStore;
use crate::ledger::{Ledger, LedgerError, UsagePage, UsageQuery, USAGE_READ_PAGE};
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
                            return Ok::<_, Infallible>(boxed(resp));
                        }
                        if let Some(resp) = purge_cache(&req, &current).await {
                            return Ok::<_, Infallible>(boxed(resp));
                        }
                        if req.method() == Method::GET {
                            match req.uri().path() {
                                "/usage" => return Ok(usage(req.uri().query(), &process).await),
                                "/dashboard" => {
                                    return Ok(boxed(dashboard(&process, &current).await))
                                }
                                _ => {}
                            }
                        }
                        Ok::<_, Infallible>(boxed(route(&req, &process, &current)))
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An admin answer's body: whole (most) or streamed (`/usage` CSV).
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

fn boxed(r: Response<Full<Bytes>>) -> Response<Body> {
    r.map(|b| b.map_err(|never| match never {}).boxed())
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
        .map(|t| crate::util::sha256(t.trim().as_bytes()));
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

/// Run a ledger read off the async threads (a blocking thread holds the SQLite reader for the
/// one statement, never across an `.await`).
async fn read_ledger<T: Send + 'static>(
    ledger: Arc<dyn Ledger>,
    f: impl FnOnce(&dyn Ledger) -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(move || f(ledger.as_ref())).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// One page of a usage query, off the async threads.
async fn read_page(
    ledger: Arc<dyn Ledger>,
    q: UsageQuery,
    after: Option<Vec<String>>,
    limit: usize,
) -> Result<UsagePage, String> {
    read_ledger(ledger, move |l| l.usage_page(&q, after.as_deref(), limit)).await
}

/// `GET /usage?from=&to=&by=&format=json|csv&limit=&cursor=`: ledger aggregates, one page at a
/// time, in key order; default range today (UTC).
///
/// JSON: `{"rows": [...], "next_cursor": "..." | null}`, at most `limit` rows (default
/// [`crate::usage::DEFAULT_LIMIT`], at most [`crate::usage::MAX_LIMIT`]). CSV with `limit`: the
/// same page, its cursor in `X-Next-Cursor`; CSV without: every row of the range (after
/// `cursor` if given), streamed as the ledger is read page by page.
async fn usage(query: Option<&str>, process: &Process) -> Response<Body> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let bad = |e: String| boxed(text(StatusCode::BAD_REQUEST, PLAIN, format!("{e}\n")));
    let params: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let format = match get("format").map(crate::usage::Format::parse).transpose() {
        Ok(Some(crate::usage::Format::Table)) => crate::usage::Format::Csv,
        Ok(f) => f.unwrap_or(crate::usage::Format::Json),
        Err(e) => return bad(e),
    };
    let limit = match get("limit").map(crate::usage::parse_limit).transpose() {
        Ok(l) => l,
        Err(e) => return bad(e),
    };
    let paged = match crate::usage::paged_query(get("from"), get("to"), get("by"), get("cursor")) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    let (q, after) = (paged.query, paged.after);
    let csv = format == crate::usage::Format::Csv;
    let size = match limit {
        Some(n) => n,
        None if csv => USAGE_READ_PAGE,
        None => crate::usage::DEFAULT_LIMIT,
    };
    // The first page before any header: a ledger that cannot be read is a 503, not a cut stream.
    let page = match read_page(process.ledger.clone(), q.clone(), after, size).await {
        Ok(page) => page,
        Err(e) => {
            return boxed(text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("{e}\n"),
            ))
        }
    };
    if csv && limit.is_none() {
        return csv_stream(process.ledger.clone(), q, page);
    }
    let next = page
        .next
        .as_ref()
        .map(|keys| crate::usage::encode_cursor(&q, keys));
    if csv {
        let mut body = crate::usage::csv_header(&q.by);
        body.extend(crate::usage::csv_rows(&page.rows, &q.by));
        let mut r = text(StatusCode::OK, "text/csv; charset=utf-8", body);
        if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
            r.headers_mut().insert("x-next-cursor", v);
        }
        return boxed(r);
    }
    boxed(text(
        StatusCode::OK,
        "application/json",
        crate::usage::json_page(&page.rows, next.as_deref()),
    ))
}

/// What the CSV producer hands the body.
enum Chunk {
    Data(Bytes),
    /// The ledger failed after the answer began: the body ends in an error (the connection is
    /// cut before the last chunk, so the caller sees a broken transfer, never a short file).
    Failed(String),
    Done,
}

/// A body fed by a channel of at most one chunk: the producer reads the next page only once
/// the previous one is on its way, so memory stays at a page or two however many rows.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    done: bool,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Chunk::Data(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Chunk::Done)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Chunk::Failed(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err("the usage export stopped before its end".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Every row of the range as CSV, `first` and then the pages after it, read one at a time.
fn csv_stream(ledger: Arc<dyn Ledger>, q: UsageQuery, first: UsagePage) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(1);
    let mut head = crate::usage::csv_header(&q.by);
    head.extend(crate::usage::csv_rows(&first.rows, &q.by));
    let mut next = first.next;
    tokio::spawn(async move {
        if tx.send(Chunk::Data(head.into())).await.is_err() {
            return;
        }
        while let Some(after) = next.take() {
            let page =
                match read_page(ledger.clone(), q.clone(), Some(after), USAGE_READ_PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "the /usage CSV export failed part way");
                        let _ = tx.send(Chunk::Failed(e)).await;
                        return;
                    }
                };
            let chunk = crate::usage::csv_rows(&page.rows, &q.by);
            next = page.next;
            // An error: the caller went away; stop reading.
            if tx.send(Chunk::Data(chunk.into())).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Chunk::Done).await;
    });
    let mut r = Response::new(ChannelBody { rx, done: false }.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    r
}

/// `GET /dashboard`: the last 30 days of credits, and today's budgets.
async fn dashboard(process: &Process, current: &ArcSwap<Generation>) -> Response<Full<Bytes>> {
    use crate::ledger::GroupBy;
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
    // One page each (a few rows per client, action and day): past that, the charts draw the
    // first series and say so in the log.
    let result = read_ledger(process.ledger.clone(), move |l| {
        let page = |q: &UsageQuery| {
            let page = l.usage_page(q, None, crate::usage::MAX_LIMIT)?;
            if page.next.is_some() {
                tracing::warn!(
                    rows = crate::usage::MAX_LIMIT,
                    "the dashboard draws only the first rows of a grouping"
                );
            }
            Ok::<_, LedgerError>(page.rows)
        };
        Ok((page(&a)?, page(&b)?, page(&c)?))
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
            process
                .metrics
                .upstream_buffered_bytes
                .set(i64::try_from(process.answer_budget.held()).unwrap_or(i64::MAX));
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                process.metrics.encode(),
            )
        }
        (&Method::GET, "/config") => {
            // The settings' own `Serialize`: secrets show as "[redacted]" (config/serialize.rs).
            let body =
                serde_json::to_vec_pretty(&*current.load().shared.settings).unwrap_or_default();
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
