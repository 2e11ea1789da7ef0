//! A local LinkupAPI v2 emulator: the upstream for development, demos, tests and benchmarks.
//!
//! It speaks the v2 envelope (`success` / `data` | `error` / `metadata`), checks `x-api-key`,
//! keeps accounts (login, 2FA checkpoint with code or app approval), a credit balance and
//! webhooks in memory, records every `/v2` request, and can play faults (latency, resets,
//! 5xx, an HTML 502, slow headers, 429, 402). Control routes under `/_emulator/` (no key)
//! and the [`EmulatorHandle`] methods drive and inspect it. HTTP/1.1 and h2c on one port.

mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

pub use state::action_cost;
use state::{decode, now_ts, ApiErr, Route, State};

/// Request bodies larger than this are not read (the connection is dropped).
const MAX_BODY: usize = 16 << 20;

/// How the emulator starts.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The one `x-api-key` the emulator accepts.
    pub api_key: String,
    /// The starting credit balance.
    pub initial_credits: i64,
    /// The right 2FA code for accounts on `code_challenge`.
    pub checkpoint_code: String,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            api_key: "emulator-key".into(),
            initial_credits: 10_000,
            checkpoint_code: "123456".into(),
        }
    }
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("api_key", &"<redacted>")
            .field("initial_credits", &self.initial_credits)
            .field("checkpoint_code", &self.checkpoint_code)
            .finish()
    }
}

/// Counters, as `GET /_emulator/stats` shows them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// `/v2` requests received (authenticated or not, faulted or not).
    pub total_calls: u64,
    /// Keyed by `"METHOD /path"` (no query), e.g. `"POST /v2/checkpoint"`.
    pub calls_by_path: BTreeMap<String, u64>,
    pub credits_charged: i64,
    pub balance: i64,
    /// `/v2` requests being answered right now, and the most seen at once.
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// `POST /v2/checkpoint` requests per body `account_id`.
    pub checkpoint_calls_by_account: BTreeMap<String, u64>,
}

/// What to do instead of (or before) answering normally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    #[default]
    None,
    /// Read the request, then drop the connection without an answer.
    Reset,
    /// 500 `INTERNAL_ERROR`.
    #[serde(rename = "error_5xx")]
    Error5xx,
    /// 502 with an HTML body, as an edge proxy would answer.
    BadGatewayHtml,
    /// Wait `slow_ms`, then answer normally.
    SlowHeaders,
    /// 429 `RATE_LIMITED`.
    RateLimited,
    /// 402 `INSUFFICIENT_CREDITS`.
    InsufficientCredits,
    /// Answer normally, with the headers a careless upstream sends: `Set-Cookie`, its server's
    /// name, and the caller's `x-api-key` echoed back (as `x-api-key` and inside another).
    LeakyHeaders,
    /// Answer normally, with one 16 KB header.
    HugeHeader,
}

/// Fault injection, as `POST /_emulator/faults` takes it (omitted fields default).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added before answering every (matching) `/v2` request.
    pub latency_ms: u64,
    pub mode: FaultMode,
    /// Apply `mode` to the next `count` matching requests (then it switches itself off);
    /// 0 = until changed.
    pub count: u64,
    /// Only requests naming this account (body, path or query); `None` = all requests. Applies
    /// to `latency_ms` as well as `mode`.
    pub account_id: Option<String>,
    /// The wait of `slow_headers`.
    pub slow_ms: u64,
    /// When not 0, every (matching) successful answer is padded to this many bytes (a
    /// `padding` string in `data`, before `metadata`), with its `Content-Length`: a large
    /// upstream answer. Like `latency_ms`, it stays until changed (`count` is for `mode`).
    pub big_answer_bytes: u64,
    /// Big answers send their headers and the first half of their body, then wait for
    /// [`EmulatorHandle::release_stalled`] (or `POST /_emulator/release`) before the rest: the
    /// answers of concurrent calls are then all in flight at once, by construction.
    pub stall_big_answers: bool,
    /// Answer successful (matching) requests with this as `metadata.credits_consumed` instead
    /// of the price (a fraction, a string, a huge number...): what a broken upstream might
    /// send. Independent of `mode` and `count`; stays until changed. The balance is still
    /// charged the price.
    pub credits_consumed: Option<Value>,
}

/// One `/v2` request as the emulator received it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path_and_query: String,
    /// Lowercase names, in arrival order; on HTTP/2 the `:authority` is recorded as `host`.
    pub headers: Vec<(String, String)>,
    /// The body as (lossy) UTF-8.
    pub body: String,
}

struct Shared {
    cfg: EmulatorConfig,
    state: Mutex<State>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Bumped by each release of the stalled big answers.
    released: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> Stats {
        let st = self.lock();
        Stats {
            total_calls: st.total_calls,
            calls_by_path: st.calls_by_path.clone(),
            credits_charged: st.credits_charged,
            balance: st.balance,
            in_flight: self.in_flight.load(Ordering::Acquire),
            max_in_flight: self.max_in_flight.load(Ordering::Acquire),
            checkpoint_calls_by_account: st.checkpoint_calls_by_account.clone(),
        }
    }

    fn reset(&self) {
        self.lock().reset();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Acquire), Ordering::Release);
    }
}

/// Counts a `/v2` request in flight for as long as it lives (also when the connection dies).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running emulator. Dropping the handle leaves it running until the runtime stops; call
/// [`EmulatorHandle::shutdown`] to stop it.
pub struct EmulatorHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for EmulatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// Lets every big answer stalled so far (`Faults::stall_big_answers`) send the rest of its
    /// body; answers that start later stall until the next release.
    pub fn release_stalled(&self) {
        self.shared.released.send_modify(|g| *g += 1);
    }

    /// Approves a pending `app_challenge` (the user tapped "yes" in the app): the next
    /// checkpoint connects the account. False when the account is unknown.
    pub fn approve(&self, account_id: &str) -> bool {
        self.shared.lock().approve(account_id)
    }

    /// Deactivates (or reactivates) an account. False when the account is unknown.
    pub fn set_active(&self, account_id: &str, active: bool) -> bool {
        self.shared.lock().set_active(account_id, active)
    }

    pub fn set_balance(&self, credits: i64) {
        self.shared.lock().balance = credits;
    }

    /// The recorded `/v2` requests, oldest first (the last 1000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Stops accepting, lets in-flight answers finish for up to a second, then closes every
    /// connection.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Starts the emulator on an already-bound listener (tests bind `127.0.0.1:0`).
pub async fn start(listener: TcpListener, cfg: EmulatorConfig) -> std::io::Result<EmulatorHandle> {
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(cfg.initial_credits)),
        cfg,
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        released: tokio::sync::watch::Sender::new(0),
    });
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
    Ok(EmulatorHandle {
        addr,
        shared,
        stop,
        task,
    })
}

/// For the CLI: binds `listen`, logs the address, runs until ctrl-c or SIGTERM.
pub async fn run(listen: SocketAddr, cfg: EmulatorConfig) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let handle = start(listener, cfg).await?;
    tracing::info!(addr = %handle.addr(), url = %handle.url(), "LinkupAPI v2 emulator listening");
    wait_for_signal().await;
    tracing::info!("emulator stopping");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<Notify>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { handle(shared, req).await }
                    });
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), svc)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.notified() => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    conns.shutdown().await;
}

/// The `reset` fault: the service fails, so hyper drops the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("emulated connection reset")]
struct Reset;

type Resp = Response<Either<Full<Bytes>, Stalled>>;

/// A body that sends `first`, waits for `wait`, then sends `rest` (with its whole length
/// declared up front): `Faults::stall_big_answers`.
struct Stalled {
    first: Option<Bytes>,
    rest: Option<Bytes>,
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.rest.is_none() {
            return Poll::Ready(None);
        }
        std::task::ready!(self.wait.as_mut().poll(cx));
        Poll::Ready(self.rest.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len) as u64;
        http_body::SizeHint::with_exact(len(&self.first) + len(&self.rest))
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Reset> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let is_v2 = path == "/v2" || path.starts_with("/v2/");
    let is_control = path == "/_emulator" || path.starts_with("/_emulator/");
    if !is_v2 && !is_control {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route",
            "unknown",
        ));
    }
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(Reset),
    };
    if is_control {
        return Ok(control(&shared, &parts, &body));
    }
    // A real API carries out a request it has read whether or not its caller is still there:
    // the work (and the charge) runs on a task of its own, which a hang-up does not cancel.
    match tokio::spawn(async move { v2(&shared, parts, body).await }).await {
        Ok(r) => r,
        Err(_) => Err(Reset),
    }
}

fn record_of(parts: &Parts, body: &Bytes) -> RecordedRequest {
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if !parts.headers.contains_key(HOST) {
        if let Some(authority) = parts.uri.authority() {
            headers.push(("host".into(), authority.as_str().to_owned()));
        }
    }
    RecordedRequest {
        method: parts.method.as_str().to_owned(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        headers,
        body: String::from_utf8_lossy(body).into_owned(),
    }
}

async fn v2(shared: &Shared, parts: Parts, body: Bytes) -> Result<Resp, Reset> {
    let _flight = InFlight::enter(shared);
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let route = Route::parse(&parts.method, path);
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let named = route.named_account(json.as_ref(), query);
    let record = record_of(&parts, &body);
    let (latency_ms, fault, slow_ms, big_answer_bytes, stall, credits_override) = {
        let mut st = shared.lock();
        st.record(record, path, &route, json.as_ref());
        let (latency_ms, fault, slow_ms, big_answer_bytes, stall) = st.take_fault(named.as_deref());
        (
            latency_ms,
            fault,
            slow_ms,
            big_answer_bytes,
            stall,
            st.credits_override(named.as_deref()),
        )
    };
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }
    let action = route.action(json.as_ref());
    let (status, code, message) = match fault {
        FaultMode::None | FaultMode::LeakyHeaders | FaultMode::HugeHeader => {
            (StatusCode::OK, "", "")
        }
        FaultMode::Reset => return Err(Reset),
        FaultMode::BadGatewayHtml => return Ok(bad_gateway_html()),
        FaultMode::SlowHeaders => {
            tokio::time::sleep(Duration::from_millis(slow_ms)).await;
            (StatusCode::OK, "", "")
        }
        FaultMode::Error5xx => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "an unexpected error occurred",
        ),
        FaultMode::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "too many requests, retry after a short delay",
        ),
        FaultMode::InsufficientCredits => (
            StatusCode::PAYMENT_REQUIRED,
            "INSUFFICIENT_CREDITS",
            "not enough credits for this action",
        ),
    };
    if status != StatusCode::OK {
        return Ok(error_response(status, code, message, &action));
    }
    let key_ok = parts
        .headers
        .get("x-api-key")
        .is_some_and(|k| k.as_bytes() == shared.cfg.api_key.as_bytes());
    if !key_ok {
        let message = "the API key is missing, invalid or expired";
        return Ok(error_response(
            StatusCode::FORBIDDEN,
            "INVALID_API_KEY",
            message,
            &action,
        ));
    }
    let answer = shared
        .lock()
        .dispatch(&shared.cfg.checkpoint_code, &route, json.as_ref(), query);
    let mut resp = match answer {
        Ok((data, credits)) if big_answer_bytes > 0 => {
            let stall = stall.then(|| shared.released.subscribe());
            big_answer(data, &action, credits, big_answer_bytes, stall)
        }
        Ok((data, credits)) => {
            let mut metadata = Metadata::new(&action, credits);
            if let Some(v) = credits_override {
                metadata.credits_consumed = v;
            }
            json_response(
                StatusCode::OK,
                &Envelope {
                    success: true,
                    data: Some(&data),
                    error: None,
                    metadata,
                },
            )
        }
        Err(ApiErr {
            status,
            code,
            message,
        }) => error_response(status, code, &message, &action),
    };
    let h = resp.headers_mut();
    match fault {
        FaultMode::LeakyHeaders => {
            h.insert(
                "set-cookie",
                HeaderValue::from_static("session=s3cr3t; HttpOnly"),
            );
            h.insert("server", HeaderValue::from_static("linkup-emulator"));
            if let Some(key) = parts.headers.get("x-api-key") {
                h.insert("x-api-key", key.clone());
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "key={}",
                    String::from_utf8_lossy(key.as_bytes())
                )) {
                    h.insert("x-debug", v);
                }
            }
        }
        FaultMode::HugeHeader => {
            h.insert("x-padding", HeaderValue::from_static(HUGE_HEADER));
        }
        _ => {}
    }
    Ok(resp)
}

/// A successful answer padded to `bytes` (when `data` is an object; as is otherwise). With
/// `stall`, its body stops half-way until the next release.
fn big_answer(
    mut data: Value,
    action: &str,
    credits: i64,
    bytes: u64,
    stall: Option<tokio::sync::watch::Receiver<u64>>,
) -> Resp {
    let metadata = Metadata::new(action, credits);
    let size = |data: &Value| {
        serde_json::to_vec(&Envelope {
            success: true,
            data: Some(data),
            error: None,
            metadata: Metadata {
                action,
                credits_consumed: credits.into(),
                timestamp: metadata.timestamp.clone(),
            },
        })
        .map_or(0, |v| v.len())
    };
    if let Some(obj) = data.as_object_mut() {
        obj.insert("padding".into(), Value::String(String::new()));
    }
    let base = size(&data) as u64;
    if let Some(obj) = data.as_object_mut() {
        let pad = usize::try_from(bytes.saturating_sub(base)).unwrap_or(0);
        obj.insert("padding".into(), Value::String("x".repeat(pad)));
    }
    let envelope = Envelope {
        success: true,
        data: Some(&data),
        error: None,
        metadata,
    };
    let Some(mut released) = stall else {
        return json_response(StatusCode::OK, &envelope);
    };
    let mut first = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default());
    let rest = first.split_off(first.len() / 2);
    let body = Stalled {
        first: Some(first),
        rest: Some(rest),
        wait: Box::pin(async move {
            let _ = released.changed().await;
        }),
    };
    let mut resp = Response::new(Either::Right(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The value of `FaultMode::HugeHeader`'s header: 16 KB.
const HUGE_HEADER: &str = {
    const BYTES: [u8; 16 * 1024] = [b'x'; 16 * 1024];
    match std::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => "",
    }
};

/// The v2 envelope, fields in the upstream's order.
#[derive(serde::Serialize)]
struct Envelope<'a> {
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<EnvelopeError<'a>>,
    metadata: Metadata<'a>,
}

#[derive(serde::Serialize)]
struct EnvelopeError<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(serde::Serialize)]
struct Metadata<'a> {
    action: &'a str,
    credits_consumed: Value,
    timestamp: String,
}

impl<'a> Metadata<'a> {
    fn new(action: &'a str, credits_consumed: i64) -> Self {
        Metadata {
            action,
            credits_consumed: Value::from(credits_consumed),
            timestamp: now_ts(),
        }
    }
}

fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Resp {
    // Serializing these types cannot fail (string keys only).
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(bytes))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(status: StatusCode, code: &str, message: &str, action: &str) -> Resp {
    let error = Some(EnvelopeError { code, message });
    let envelope = Envelope {
        success: false,
        data: None,
        error,
        metadata: Metadata::new(action, 0),
    };
    json_response(status, &envelope)
}

fn bad_gateway_html() -> Resp {
    const PAGE: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
        <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from_static(PAGE.as_bytes()))));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// A control route's refusal.
type Refusal = (StatusCode, String);

/// A control body: `{}` when empty, otherwise JSON for `T`.
fn control_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refusal> {
    let bytes: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(bytes).map_err(|e| (StatusCode::BAD_REQUEST, format!("bad body: {e}")))
}

#[derive(serde::Deserialize)]
struct ActiveBody {
    active: bool,
}

#[derive(serde::Deserialize)]
struct BalanceBody {
    balance: i64,
}

fn control(shared: &Shared, parts: &Parts, body: &Bytes) -> Resp {
    match control_route(shared, parts, body) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err((status, message)) => json_response(status, &json!({ "error": message })),
    }
}

fn control_route(shared: &Shared, parts: &Parts, body: &Bytes) -> Result<Value, Refusal> {
    let rest = parts.uri.path().trim_start_matches("/_emulator");
    let segs: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let found = |yes: bool, id: &str| match yes {
        true => Ok(json!({"ok": true})),
        false => Err((StatusCode::NOT_FOUND, format!("no account {id}"))),
    };
    let value = match (&parts.method, segs.as_slice()) {
        (&Method::GET, ["stats"]) => serde_json::to_value(shared.stats()),
        (&Method::GET, ["faults"]) => serde_json::to_value(&shared.lock().faults),
        (&Method::POST, ["faults"]) => {
            let faults: Faults = control_body(body)?;
            let v = serde_json::to_value(&faults);
            shared.lock().faults = faults;
            v
        }
        (&Method::POST, ["accounts", id, "approve"]) => {
            let id = decode(id);
            return found(shared.lock().approve(&id), &id);
        }
        (&Method::POST, ["accounts", id, "active"]) => {
            let b: ActiveBody = control_body(body)?;
            let id = decode(id);
            return found(shared.lock().set_active(&id, b.active), &id);
        }
        (&Method::POST, ["credits"]) => {
            let b: BalanceBody = control_body(body)?;
            shared.lock().balance = b.balance;
            Ok(json!({ "balance": b.balance }))
        }
        (&Method::GET, ["requests"]) => serde_json::to_value(&shared.lock().requests),
        (&Method::POST, ["release"]) => {
            shared.released.send_modify(|g| *g += 1);
            Ok(json!({"ok": true}))
        }
        (&Method::POST, ["reset"]) => {
            shared.reset();
            Ok(json!({"ok": true}))
        }
        _ => return Err((StatusCode::NOT_FOUND, "no such control route".into())),
    };
    value.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[cfg(test)]
mod tests;
