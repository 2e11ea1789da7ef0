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
use http::{Request, Response, Uri, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tower::Service;

use super::{root_cause, CallError};

type Sender = http2::SendRequest<Full<Bytes>>;

/// What opening a connection gave.
type Opened = Result<(Sender, Arc<AtomicUsize>), OpenError>;

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
    Answer(Result<(Response<Incoming>, Lease), CallError>),
    /// The upstream speaks HTTP/1.1 (`auto` over https): the request, untouched, for that pool.
    Http1(Request<Full<Bytes>>),
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
        /// What the upstream allows at once on this connection (its latest SETTINGS).
        allowed: Arc<AtomicUsize>,
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

    /// Connections open or being opened (for tests and the pool's own accounting).
    #[cfg(test)]
    pub(super) fn connections(&self) -> usize {
        self.lock().list.len()
    }

    /// Sends one request on a connection with room, opening one if none has.
    pub(super) async fn send(self: &Arc<Self>, mut req: Request<Full<Bytes>>) -> Sent {
        if self.speaks_http1.load(Ordering::Relaxed) {
            return Sent::Http1(req);
        }
        *req.version_mut() = Version::HTTP_2;
        // A connection found closed before the request went out is tried once more on another:
        // nothing was sent on it.
        let mut retried = false;
        loop {
            let (lease, mut sender) = match self.lease().await {
                Ok(l) => l,
                Err(OpenError::Http1) => {
                    *req.version_mut() = Version::HTTP_11;
                    return Sent::Http1(req);
                }
                Err(OpenError::Failed(m)) => {
                    return Sent::Answer(Err(CallError::Connect(m.to_string())))
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Sent::Answer(Ok((resp, lease))),
                Err(mut e) => match e.take_message() {
                    Some(r) if !retried => {
                        retried = true;
                        req = r;
                        self.forget(lease.id);
                    }
                    Some(_) => {
                        return Sent::Answer(Err(CallError::Connect(format!(
                            "the HTTP/2 connection closed before the request went out: {}",
                            root_cause(e.error())
                        ))))
                    }
                    None => {
                        return Sent::Answer(Err(CallError::Sent(root_cause(e.error()))));
                    }
                },
            }
        }
    }

    /// A place on a connection with room: an open one, one being opened, or a new one.
    async fn lease(self: &Arc<Self>) -> Result<(Lease, Sender), OpenError> {
        let (lease, mut opening) = {
            let mut slots = self.lock();
            let now = Instant::now();
            let idle = self.idle_timeout;
            slots.list.retain(|s| match &s.state {
                State::Opening(_) => true,
                State::Open { sender, .. } => {
                    !sender.is_closed()
                        && (s.in_flight > 0 || now.duration_since(s.idle_since) < idle)
                }
            });
            let max = self.max_streams;
            let found = slots.list.iter_mut().find(|s| match &s.state {
                State::Opening(_) => s.in_flight < max,
                State::Open { allowed, .. } => {
                    s.in_flight < max.min(allowed.load(Ordering::Relaxed).max(1))
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
        let opened = match opening.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
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
                Ok((sender, allowed)) => {
                    if let Some(slot) = slots.list.iter_mut().find(|s| s.id == id) {
                        slot.state = State::Open {
                            sender: sender.clone(),
                            allowed: allowed.clone(),
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
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // A dead peer is noticed while calls wait on it, not only when the OS gives up.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let (sender, conn) = builder.handshake(io).await.map_err(|e| {
            OpenError::Failed(format!("HTTP/2 handshake: {}", root_cause(&e)).into())
        })?;
        let allowed = Arc::new(AtomicUsize::new(self.max_streams));
        tokio::spawn(Watched {
            conn: Box::pin(conn),
            allowed: allowed.clone(),
        });
        Ok((sender, allowed))
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

/// Drives a connection and publishes what the upstream allows on it after every turn.
struct Watched<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    conn: Pin<Box<http2::Connection<T, Full<Bytes>, TokioExecutor>>>,
    allowed: Arc<AtomicUsize>,
}

impl<T> Future for Watched<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let done = self.conn.as_mut().poll(cx);
        let allowed = self.conn.current_max_send_streams();
        self.allowed.store(allowed, Ordering::Relaxed);
        match done {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream HTTP/2 connection closed");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}
