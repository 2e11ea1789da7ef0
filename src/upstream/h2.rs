//! A pool of HTTP/2 connections to the upstream, opened as the calls in flight need them.
//!
//! hyper-util's pooled client keeps one HTTP/2 connection per host: every call in flight shares
//! it, and past what the upstream allows on one connection (its `SETTINGS_MAX_CONCURRENT_STREAMS`,
//! typically 100–256) calls queue inside it. This pool opens another connection whenever every
//! open one carries `upstream.http2_max_streams` calls (or what the upstream announces, if
//! fewer), fills the oldest first, and closes connections that have carried nothing for the
//! idle timeout. Thousands of slow calls then ride a few dozen connections instead of one
//! HTTP/1.1 connection each (a descriptor, hyper's buffers and a task per call).
//!
//! One pool per data-plane worker: connections are opened on the worker's own runtime, so
//! their tasks run beside the requests that use them. A connection being opened counts as one
//! with room: calls that arrive meanwhile wait for it rather than each opening its own. The
//! connect runs on a task of its own, so a caller that goes away never strands the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tower::Service;

use super::{root_cause, CallError};

/// The h2 crate is used directly (not hyper's HTTP/2 client, which spawns two tasks per
/// request: one sending its body, one waiting for its answer — ~5 KB and two task switches per
/// call): a call sends its headers and body and waits for its answer in its own task.
type Sender = h2::client::SendRequest<Bytes>;

/// What opening a connection gave.
type Opened = Result<(Sender, Arc<ConnShared>), OpenError>;

/// What a connection's task tells the pool.
struct ConnShared {
    /// What the upstream allows at once on this connection (its latest SETTINGS).
    allowed: AtomicUsize,
    /// The connection's task has ended: nothing more can be sent on it.
    closed: AtomicBool,
}

#[derive(Clone, Debug)]
enum OpenError {
    /// Nothing could be sent: the message says why.
    Failed(Arc<str>),
    /// `auto` over https: the upstream chose HTTP/1.1 in the TLS handshake.
    Http1,
}

/// What [`H2Pool::send`] did with a request.
pub(super) enum Sent {
    /// The upstream's answer (its lease holds the call's place until dropped), or the failure.
    Answer(Result<(Response<H2Body>, Lease), CallError>),
    /// The upstream speaks HTTP/1.1 (`auto` over https): the request, untouched, for that pool.
    Http1(Request<Bytes>),
}

pub(super) struct H2Pool {
    connector: HttpsConnector<HttpConnector>,
    /// scheme://authority of the upstream.
    target: Uri,
    /// `auto`: a TLS handshake that chooses HTTP/1.1 sends every call to the HTTP/1.1 pool.
    fall_back_to_http1: bool,
    /// https: HTTP/2 must be agreed in the TLS handshake; http: spoken with prior knowledge.
    https: bool,
    max_streams: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
    slots: Mutex<Slots>,
    /// Set once a TLS handshake chose HTTP/1.1 (`auto`).
    speaks_http1: AtomicBool,
}

#[derive(Default)]
struct Slots {
    next_id: u64,
    list: Vec<Slot>,
}

struct Slot {
    id: u64,
    state: State,
    /// Calls holding a lease on this connection.
    in_flight: usize,
    /// Since when `in_flight` has been 0.
    idle_since: Instant,
}

enum State {
    Opening(watch::Receiver<Option<Opened>>),
    Open {
        sender: Sender,
        conn: Arc<ConnShared>,
    },
}

/// A call's place on a connection; given back when dropped (once its answer has been read).
pub(crate) struct Lease {
    pool: Arc<H2Pool>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.pool.lock();
        if let Some(slot) = slots.list.iter_mut().find(|s| s.id == self.id) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            if slot.in_flight == 0 {
                slot.idle_since = Instant::now();
            }
        }
    }
}

impl H2Pool {
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        target: Uri,
        fall_back_to_http1: bool,
        max_streams: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> H2Pool {
        let https = target.scheme() == Some(&http::uri::Scheme::HTTPS);
        H2Pool {
            connector,
            target,
            fall_back_to_http1,
            https,
            max_streams: max_streams.max(1),
            connect_timeout,
            idle_timeout,
            slots: Mutex::new(Slots::default()),
            speaks_http1: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Nothing panics while holding it; a poisoned pool is still a consistent one.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one request on a connection with room, opening one if none has.
    pub(super) async fn send(self: &Arc<Self>, req: Request<Bytes>) -> Sent {
        if self.speaks_http1.load(Ordering::Relaxed) {
            return Sent::Http1(req);
        }
        let (mut parts, body) = req.into_parts();
        strip_connection_headers(&mut parts.headers);
        // A connection found closed, or a stream the upstream refused unprocessed
        // (REFUSED_STREAM), is tried once more on another: nothing was acted on.
        let mut retried = false;
        loop {
            let (lease, sender) = match self.lease().await {
                Ok(l) => l,
                Err(OpenError::Http1) => {
                    return Sent::Http1(Request::from_parts(parts, body));
                }
                Err(OpenError::Failed(m)) => {
                    return Sent::Answer(Err(CallError::Connect(m.to_string())))
                }
            };
            let unsent = |e: h2::Error| {
                format!(
                    "the HTTP/2 connection closed before the request went out: {}",
                    root_cause(&e)
                )
            };
            let mut sender = match sender.ready().await {
                Ok(s) => s,
                Err(e) if !retried => {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection closed; retrying");
                    retried = true;
                    self.forget(lease.id);
                    continue;
                }
                Err(e) => return Sent::Answer(Err(CallError::Connect(unsent(e)))),
            };
            let mut head = Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = parts.uri.clone();
            *head.headers_mut() = parts.headers.clone();
            let (answer, mut stream) = match sender.send_request(head, body.is_empty()) {
                Ok(r) => r,
                Err(e) if !retried => {
                    tracing::debug!(error = %e, "upstream HTTP/2 stream not opened; retrying");
                    retried = true;
                    self.forget(lease.id);
                    continue;
                }
                Err(e) => return Sent::Answer(Err(CallError::Connect(unsent(e)))),
            };
            if !body.is_empty() {
                // Buffered by h2 and sent as the flow-control window allows.
                if let Err(e) = stream.send_data(body.clone(), true) {
                    return Sent::Answer(Err(CallError::Sent(root_cause(&e))));
                }
            }
            match answer.await {
                Ok(resp) => {
                    let declared = resp
                        .headers()
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    let resp = resp.map(|recv| H2Body { recv, declared });
                    return Sent::Answer(Ok((resp, lease)));
                }
                Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) && !retried => {
                    retried = true;
                }
                Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                    return Sent::Answer(Err(CallError::Connect(format!(
                        "the upstream refused the stream unprocessed: {}",
                        root_cause(&e)
                    ))))
                }
                Err(e) => return Sent::Answer(Err(CallError::Sent(root_cause(&e)))),
            }
        }
    }

    /// A place on a connection with room: an open one, one being opened, or a new one.
    async fn lease(self: &Arc<Self>) -> Result<(Lease, Sender), OpenError> {
        let (lease, opening) = {
            let mut slots = self.lock();
            let now = Instant::now();
            let idle = self.idle_timeout;
            slots.list.retain(|s| match &s.state {
                State::Opening(_) => true,
                State::Open { conn, .. } => {
                    !conn.closed.load(Ordering::Acquire)
                        && (s.in_flight > 0 || now.duration_since(s.idle_since) < idle)
                }
            });
            let max = self.max_streams;
            let found = slots.list.iter_mut().find(|s| match &s.state {
                State::Opening(_) => s.in_flight < max,
                State::Open { conn, .. } => {
                    s.in_flight < max.min(conn.allowed.load(Ordering::Relaxed).max(1))
                }
            });
            match found {
                Some(slot) => {
                    slot.in_flight += 1;
                    let lease = Lease {
                        pool: self.clone(),
                        id: slot.id,
                    };
                    match &slot.state {
                        State::Open { sender, .. } => return Ok((lease, sender.clone())),
                        State::Opening(rx) => (lease, rx.clone()),
                    }
                }
                None => {
                    let id = slots.next_id;
                    slots.next_id += 1;
                    let (tx, rx) = watch::channel(None);
                    slots.list.push(Slot {
                        id,
                        state: State::Opening(rx.clone()),
                        in_flight: 1,
                        idle_since: now,
                    });
                    tokio::spawn(self.clone().open(id, tx));
                    (
                        Lease {
                            pool: self.clone(),
                            id,
                        },
                        rx,
                    )
                }
            }
        };
        // Boxed: only the calls that wait for a connection being opened pay for this state;
        // it would otherwise size every call's future.
        let mut opening = opening;
        let opened = Box::pin(async move {
            match opening.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => None,
            }
        })
        .await;
        match opened {
            Some(Ok((sender, _))) => Ok((lease, sender)),
            Some(Err(e)) => Err(e),
            None => Err(OpenError::Failed("the connection task ended".into())),
        }
    }

    /// Stops handing out a connection that was found closed.
    fn forget(&self, id: u64) {
        self.lock().list.retain(|s| s.id != id);
    }

    /// Opens connection `id` and tells everyone waiting for it.
    async fn open(self: Arc<Self>, id: u64, tx: watch::Sender<Option<Opened>>) {
        let opened = self.handshake().await;
        {
            let mut slots = self.lock();
            match &opened {
                Ok((sender, conn)) => {
                    if let Some(slot) = slots.list.iter_mut().find(|s| s.id == id) {
                        slot.state = State::Open {
                            sender: sender.clone(),
                            conn: conn.clone(),
                        };
                        if slot.in_flight == 0 {
                            slot.idle_since = Instant::now();
                        }
                    }
                }
                Err(_) => slots.list.retain(|s| s.id != id),
            }
        }
        if matches!(opened, Err(OpenError::Http1)) {
            self.speaks_http1.store(true, Ordering::Relaxed);
        }
        let _ = tx.send(Some(opened));
    }

    async fn handshake(&self) -> Opened {
        let connect = self.connector.clone().call(self.target.clone());
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) if refused_alpn(&*e) => return Err(OpenError::Failed(NOT_H2.into())),
            Ok(Err(e)) => return Err(OpenError::Failed(root_cause(&*e).into())),
            Err(_) => {
                return Err(OpenError::Failed(
                    format!(
                        "no connection within {} ms",
                        self.connect_timeout.as_millis()
                    )
                    .into(),
                ))
            }
        };
        if self.https && !io.connected().is_negotiated_h2() {
            if self.fall_back_to_http1 {
                return Err(OpenError::Http1);
            }
            return Err(OpenError::Failed(NOT_H2.into()));
        }
        let (sender, conn) = h2::client::Builder::new()
            // Answers are read as they come; the windows only let big ones stream.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake::<_, Bytes>(TokioIo::new(io))
            .await
            .map_err(|e| {
                OpenError::Failed(format!("HTTP/2 handshake: {}", root_cause(&e)).into())
            })?;
        let shared = Arc::new(ConnShared {
            allowed: AtomicUsize::new(self.max_streams),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(Watched {
            conn,
            shared: shared.clone(),
        });
        Ok((sender, shared))
    }
}

const NOT_H2: &str = "the upstream did not agree to HTTP/2 in the TLS handshake (ALPN); set upstream.protocol = \"auto\" or \"http1\"";

/// Whether a TLS handshake failed because the server would speak none of the protocols offered.
fn refused_alpn(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            );
        }
        // hyper-rustls hands TLS errors over wrapped in `io::Error`s (twice), whose `source()`
        // skips the wrapped error itself.
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// Drives a connection and publishes what the upstream allows on it after every turn, and
/// when it has ended.
struct Watched<T> {
    conn: h2::client::Connection<T, Bytes>,
    shared: Arc<ConnShared>,
}

impl<T> Future for Watched<T>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let done = Pin::new(&mut self.conn).poll(cx);
        let allowed = self.conn.max_concurrent_send_streams();
        self.shared.allowed.store(allowed, Ordering::Relaxed);
        match done {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection closed");
                }
                self.shared.closed.store(true, Ordering::Release);
                Poll::Ready(())
            }
        }
    }
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2); the h2 crate refuses a request carrying them.
fn strip_connection_headers(h: &mut HeaderMap) {
    for name in [
        http::header::CONNECTION,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
        http::header::HeaderName::from_static("keep-alive"),
        http::header::HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(&name);
    }
    if h.get(http::header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        h.remove(http::header::TE);
    }
}

/// An answer's body on its HTTP/2 stream; each chunk read gives its window back at once.
pub(crate) struct H2Body {
    recv: h2::RecvStream,
    /// Its `Content-Length` (h2 checks the data against it).
    declared: Option<u64>,
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.recv.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = self.recv.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            // Trailers are not forwarded.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.declared
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
