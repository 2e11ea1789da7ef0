//! The `upstream` layer at the bottom of the stack: send once, collect the answer, map failures
//! to `GatewayError`. Nothing is retried once the request may have reached the upstream; a
//! request is only re-sent when it was never written (a pooled connection closed under it).
//!
//! - [`client`]: the pooled client (HTTP/1.1 by [`h1`] over plain TCP and hyper-util over TLS,
//!   HTTP/2 by [`h2`]'s pool);
//! - [`budget`]: the process-wide budget of bytes held by buffered answers.

mod answer;
mod budget;
mod client;
mod h1;
mod h2;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

pub use answer::{UpstreamAnswer, MAX_CREDITS_PER_CALL};
pub use budget::AnswerBudget;
use budget::{buffer_answer, BufferError};
pub use client::UpstreamClient;

use crate::context::{RequestLog, Route};
use crate::error::GatewayError;
use crate::metrics::{KindLabels, RouteLabels};
use crate::shared::Process;

/// Upstream answers are small JSON; a body beyond this is a broken upstream, not data.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// Why an upstream call failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Before anything was sent (connect, TLS, HTTP/2 handshake): why.
    Connect(String),
    /// After the request may have reached the upstream: why.
    Sent(String),
}

/// The declared `Content-Length` of an answer, for the log line of a refused one.
fn body_len_hint(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The bottom of the stack: one upstream call.
#[derive(Clone)]
pub struct Upstream {
    client: UpstreamClient,
    process: Arc<Process>,
    /// `upstream.max_buffered_bytes` of this config generation.
    max_buffered: usize,
}

impl Upstream {
    pub fn new(client: UpstreamClient, process: Arc<Process>, max_buffered: usize) -> Upstream {
        Upstream {
            client,
            process,
            max_buffered,
        }
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
        let client = self.client.clone();
        let process = self.process.clone();
        let max_buffered = self.max_buffered;
        Box::pin(async move {
            let log = req.extensions().get::<Arc<RequestLog>>().cloned();
            let route = log.as_ref().map(|l| l.route).unwrap_or(Route::Other);
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
            let answer = match client.send(req).await {
                Ok(a) => a,
                Err(CallError::Connect(m)) => {
                    return Err(fail("connect", format!("cannot connect: {m}"), false))
                }
                Err(CallError::Sent(m)) => {
                    return Err(fail(
                        "reset",
                        format!("connection failed after the request was sent: {m}"),
                        true,
                    ))
                }
            };
            let (mut parts, body) = answer.response.into_parts();
            // The call's place on its HTTP/2 connection is held until the body has been read.
            let lease = answer.lease;
            let body = match buffer_answer(body, &process.answer_budget, max_buffered).await {
                Ok(b) => b,
                Err(BufferError::Body(message)) => return Err(fail("body", message, true)),
                Err(BufferError::OverBudget) => {
                    process
                        .metrics
                        .upstream_errors
                        .get_or_create(&KindLabels {
                            kind: "answer_budget",
                        })
                        .inc();
                    let request_id = log
                        .as_ref()
                        .and_then(|l| l.request_id.to_str().ok())
                        .unwrap_or("-");
                    tracing::warn!(
                        request_id,
                        kind = "answer_budget",
                        status = parts.status.as_u16(),
                        declared_bytes = ?body_len_hint(&parts.headers),
                        held_bytes = process.answer_budget.held(),
                        max_buffered_bytes = max_buffered,
                        "upstream answer dropped: the bytes held by answers in flight would pass upstream.max_buffered_bytes; its credits are recorded as ambiguous"
                    );
                    return Err(GatewayError::AnswerOverBudget {
                        limit: max_buffered,
                    });
                }
            };
            drop(lease);
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
            // Read once, here; the layers above read this, not the body.
            parts.extensions.insert(UpstreamAnswer::parse(&body));
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
