//! The data plane's HTTP/1.1 server for plain-TCP callers: a small codec of our own instead of
//! hyper's, for what it holds per connection.
//!
//! hyper keeps, for every connection, an 8 KB write buffer from its first byte to its last and
//! a read buffer that grows to 16 KB (the first one is still referenced by the request's
//! header values when hyper reads on to notice a hang-up, so a second one is allocated). With
//! thousands of callers waiting on a slow upstream, that was ~24 KB of every ~35 KB a call in
//! flight cost (heaptrack, 2,000 calls). Here a connection holds no buffer while it waits:
//! reads go through one scratch buffer per worker thread, and a request keeps exactly its own
//! bytes (head and body in one allocation that the header values and the body share).
//!
//! What it speaks: HTTP/1.0 and 1.1 requests parsed by `httparse` (the parser hyper uses),
//! `Content-Length` or `chunked` bodies (both together, several differing lengths, other
//! transfer codings, obsolete line folding: 400 and the connection closed — no request
//! smuggling), `Expect: 100-continue`, keep-alive and pipelining (answered in order),
//! `Connection: close`. A caller that closes or half-closes while its request is in flight is
//! gone: its request future is dropped (the upstream call itself is detached and still
//! charged, see `detach`). Heads must complete within `server.header_read_timeout` of their
//! first byte (or of the connection's opening); idle keep-alive connections close after 75 s.
//! HTTP/2 callers (prior knowledge) are handed to hyper before a byte is consumed; TLS callers
//! never come here (hyper serves them behind rustls).

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::body::DataBody;
use crate::error::GatewayError;
use crate::metrics::RefusalLabels;
use crate::shared::Process;

/// The largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers a request may carry (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// How long an idle keep-alive connection stays open (nginx's `keepalive_timeout`).
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(75);
/// Answers up to this size are copied behind their head and written in one call.
const COPY_BODY_BELOW: usize = 16 * 1024;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

thread_local! {
    /// Every read of this thread's connections lands here first; only the bytes a request
    /// needs are kept.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice());
}

/// What a connection is served with.
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_body_bytes: usize,
    /// A body must arrive within this of its head.
    pub body_read_timeout: Duration,
}

/// Reads what the socket has (once readable) onto the end of `buf`; `Ok(0)`: closed. A short
/// read clears the socket's readiness ([`crate::util::try_read_draining`]): the codec watches
/// every connection for a hang-up while its answer is pending, and that watch then costs no
/// `recv`.
async fn read_more(stream: &TcpStream, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        let got = SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let cap = want.clamp(1, s.len());
            let got =
                crate::util::try_read_draining(stream, cap, || stream.try_read(&mut s[..cap]))?;
            if let Some(n) = got {
                buf.extend_from_slice(&s[..n]);
            }
            Ok::<_, io::Error>(got)
        })?;
        if let Some(n) = got {
            return Ok(n);
        }
    }
}

/// Why a connection stops being read.
enum Stop {
    /// Closed by the caller, idle too long, or drained: nothing to answer.
    Quiet,
    /// A malformed or oversized request: answered with this, then closed.
    Refuse(StatusCode, String),
}

/// A parsed request and how its connection goes on.
struct Parsed {
    req: Request<DataBody>,
    keep_alive: bool,
}

/// Serves one plain-TCP connection until it closes. `call` runs the data plane's stack.
pub async fn serve<F, Fut>(
    stream: TcpStream,
    limits: Limits,
    process: Arc<Process>,
    mut shutdown: watch::Receiver<bool>,
    mut call: F,
) where
    F: FnMut(Request<DataBody>) -> Fut,
    Fut: Future<Output = Response<Bytes>>,
{
    // Bytes read but not yet part of an answered request (a partial head, pipelined requests).
    let mut pending: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        // Boxed: its states (timers, body framing) would otherwise size the connection's task
        // for the whole time a request waits on the upstream; this way they live only while
        // a request is being read.
        let next = Box::pin(next_request(
            &stream,
            &mut pending,
            &limits,
            first,
            &mut shutdown,
        ));
        let parsed = match next.await {
            Ok(p) => p,
            Err(Stop::Quiet) => return,
            Err(Stop::Refuse(status, message)) => {
                refuse(&stream, &process, status, message).await;
                return;
            }
        };
        first = false;
        let head_only = parsed.req.method() == Method::HEAD;
        let mut keep_alive = parsed.keep_alive;
        // While the answer is pending the socket is watched: end of stream is a hang-up (the
        // request future is dropped); pipelined bytes are kept for later. In a block of its
        // own, so the answer's future and the write's share the task's room.
        let resp = {
            let answer = call(parsed.req);
            tokio::pin!(answer);
            let mut watching = true;
            loop {
                tokio::select! {
                    biased;
                    resp = &mut answer => break resp,
                    more = read_more(&stream, &mut pending, MAX_HEAD_BYTES), if watching => match more {
                        Ok(0) | Err(_) => return,
                        Ok(_) => watching = pending.len() < MAX_HEAD_BYTES,
                    },
                }
            }
        };
        if *shutdown.borrow() {
            keep_alive = false;
        }
        if write_response(&stream, resp, head_only, keep_alive)
            .await
            .is_err()
            || !keep_alive
        {
            return;
        }
    }
}

/// Waits for, reads and parses the next request on the connection.
async fn next_request(
    stream: &TcpStream,
    pending: &mut Vec<u8>,
    limits: &Limits,
    first: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Parsed, Stop> {
    // Idle: nothing of the next request yet. The first request must start within the header
    // read timeout (a connection that sends nothing is cut); later ones within the idle time.
    if pending.is_empty() {
        if *shutdown.borrow() {
            return Err(Stop::Quiet);
        }
        let idle = if first {
            limits.header_read_timeout
        } else {
            KEEP_ALIVE_IDLE
        };
        tokio::select! {
            read = crate::deadline::timeout(idle, read_more(stream, pending, MAX_HEAD_BYTES)) => match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(Stop::Quiet),
            },
            _ = shutdown.changed() => return Err(Stop::Quiet),
        }
    }
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        match parse_head(pending, limits.max_body_bytes)? {
            Some(head) => return read_body(stream, pending, head, limits, deadline).await,
            None if pending.len() >= MAX_HEAD_BYTES => {
                return Err(Stop::Refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("the request head is larger than {MAX_HEAD_BYTES} bytes"),
                ))
            }
            None => {
                match tokio::time::timeout_at(
                    deadline,
                    read_more(stream, pending, MAX_HEAD_BYTES - pending.len()),
                )
                .await
                {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Err(Stop::Quiet),
                }
            }
        }
    }
}

/// How a request's body is framed.
enum Framing {
    Length(usize),
    Chunked,
    /// Declared longer than `max_body_bytes`: never read; the connection closes after the answer.
    TooLarge,
}

/// A complete head: the request without its body, and where its body starts.
struct Head {
    parts: http::request::Parts,
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

fn bad(message: impl Into<String>) -> Stop {
    Stop::Refuse(StatusCode::BAD_REQUEST, message.into())
}

/// Parses the head at the start of `buf`; `None`: not complete yet.
fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, Stop> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Stop::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(bad(format!("malformed HTTP request: {e}"))),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad("malformed HTTP request line"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| bad(format!("malformed method `{method}`")))?;
    let uri = Uri::try_from(path).map_err(|_| bad("malformed request target"))?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = version == Version::HTTP_10;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad(format!("malformed header name `{}`", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| bad(format!("malformed value of header `{}`", h.name)))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| bad("malformed Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("several different Content-Length headers"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            if chunked || !h.value.eq_ignore_ascii_case(b"chunked") {
                return Err(Stop::Refuse(
                    StatusCode::BAD_REQUEST,
                    "only `Transfer-Encoding: chunked` is accepted".into(),
                ));
            }
            chunked = true;
        } else if name == header::CONNECTION {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        } else if name == header::EXPECT {
            if !h.value.eq_ignore_ascii_case(b"100-continue") {
                return Err(Stop::Refuse(
                    StatusCode::EXPECTATION_FAILED,
                    "only `Expect: 100-continue` is understood".into(),
                ));
            }
            expect_continue = version == Version::HTTP_11;
        }
        map.append(name, value);
    }
    if chunked && length.is_some() {
        return Err(bad("Content-Length and Transfer-Encoding together"));
    }
    if chunked && version == Version::HTTP_10 {
        return Err(bad("chunked bodies need HTTP/1.1"));
    }
    let framing = match length {
        _ if chunked => Framing::Chunked,
        Some(n) if n > max_body => Framing::TooLarge,
        Some(n) => Framing::Length(n),
        None => Framing::Length(0),
    };
    let mut builder = Request::builder().method(method).uri(uri).version(version);
    if let Some(h) = builder.headers_mut() {
        *h = map;
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|e| bad(format!("malformed request: {e}")))?
        .into_parts();
    Ok(Some(Head {
        parts,
        head_len,
        keep_alive: !close,
        framing,
        expect_continue,
    }))
}

/// Reads the body the head announces, then cuts the request's bytes out of `pending`.
async fn read_body(
    stream: &TcpStream,
    pending: &mut Vec<u8>,
    head: Head,
    limits: &Limits,
    deadline: tokio::time::Instant,
) -> Result<Parsed, Stop> {
    let Head {
        parts,
        head_len,
        framing,
        mut keep_alive,
        expect_continue,
    } = head;
    let body_deadline = tokio::time::Instant::now() + limits.body_read_timeout;
    let _ = deadline;
    let body = match framing {
        Framing::TooLarge => {
            // Never read: the answer (413) closes the connection.
            pending.clear();
            pending.shrink_to_fit();
            keep_alive = false;
            DataBody::TooLarge
        }
        Framing::Length(n) => {
            let total = head_len + n;
            if pending.len() < total {
                if expect_continue {
                    let _ = write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                pending.reserve_exact(total - pending.len());
                while pending.len() < total {
                    let want = total - pending.len();
                    match tokio::time::timeout_at(body_deadline, read_more(stream, pending, want))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return Err(Stop::Quiet),
                    }
                }
            }
            // The request's own bytes, exactly; what follows it (pipelined) stays pending.
            let rest = pending.split_off(total);
            let own = std::mem::replace(pending, rest);
            let mut own = Bytes::from(own);
            let body = own.split_off(head_len);
            DataBody::read(body)
        }
        Framing::Chunked => {
            if expect_continue {
                let _ = write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n").await;
            }
            match read_chunked(
                stream,
                pending,
                head_len,
                limits.max_body_bytes,
                body_deadline,
            )
            .await?
            {
                Some(body) => DataBody::read(Bytes::from(body)),
                None => {
                    keep_alive = false;
                    DataBody::TooLarge
                }
            }
        }
    };
    Ok(Parsed {
        req: Request::from_parts(parts, body),
        keep_alive,
    })
}

/// Decodes a chunked body starting at `pending[start..]`, reading more as needed; what follows
/// it stays in `pending`. `None`: longer than `max` (the rest is not read).
async fn read_chunked(
    stream: &TcpStream,
    pending: &mut Vec<u8>,
    start: usize,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<Option<Vec<u8>>, Stop> {
    let mut body = Vec::new();
    let mut at = start;
    loop {
        // A size line.
        let (size, line) = loop {
            match httparse::parse_chunk_size(&pending[at..]) {
                Ok(httparse::Status::Complete((n, size))) => break (size, n),
                Ok(httparse::Status::Partial) if pending.len() - at < 1024 => {
                    more(stream, pending, deadline).await?
                }
                _ => return Err(bad("malformed chunked body")),
            }
        };
        at += line;
        let size = usize::try_from(size).map_err(|_| bad("chunk too large"))?;
        if size == 0 {
            // Trailers (ignored) up to the empty line.
            loop {
                match find_crlf(&pending[at..]) {
                    Some(0) => {
                        at += 2;
                        let rest = pending.split_off(at);
                        *pending = rest;
                        return Ok(Some(body));
                    }
                    Some(n) => at += n + 2,
                    None if pending.len() - at < 8192 => more(stream, pending, deadline).await?,
                    None => return Err(bad("chunked trailers too large")),
                }
            }
        }
        if body.len() + size > max {
            pending.clear();
            return Ok(None);
        }
        while pending.len() < at + size + 2 {
            more(stream, pending, deadline).await?;
        }
        if &pending[at + size..at + size + 2] != b"\r\n" {
            return Err(bad("malformed chunked body"));
        }
        body.extend_from_slice(&pending[at..at + size]);
        at += size + 2;
    }
}

async fn more(
    stream: &TcpStream,
    pending: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<(), Stop> {
    match tokio::time::timeout_at(deadline, read_more(stream, pending, 64 * 1024)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        _ => Err(Stop::Quiet),
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Answers a request the codec refused itself, in the upstream's envelope, counted.
async fn refuse(stream: &TcpStream, process: &Process, status: StatusCode, message: String) {
    let err = GatewayError::InvalidParams(message);
    process
        .metrics
        .refusals
        .get_or_create(&RefusalLabels { code: err.code() })
        .inc();
    let mut resp = err.into_response("");
    *resp.status_mut() = status;
    let _ = write_response(stream, resp, false, false).await;
}

/// Writes an answer: its head (with `Content-Length`, `Date`, and `Connection: close` when the
/// connection ends), then its body unless the request was a HEAD.
async fn write_response(
    stream: &TcpStream,
    resp: Response<Bytes>,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<()> {
    // The head is built before the first await: only its bytes and the body are kept while
    // the answer is written, not the whole response (a smaller connection task).
    let (head, body) = encode_response(resp, head_only, keep_alive);
    match body {
        Some(body) => write_two(stream, &head, &body).await,
        None => write_all(stream, &head).await,
    }
}

/// The answer's bytes: its head (with the body behind it when small), and a body to write
/// after it when large.
fn encode_response(
    resp: Response<Bytes>,
    head_only: bool,
    keep_alive: bool,
) -> (Vec<u8>, Option<Bytes>) {
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut head = Vec::with_capacity(
        160 + parts
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + if body.len() < COPY_BODY_BELOW && !head_only {
                body.len()
            } else {
                0
            },
    );
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || name == header::DATE
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !bodyless {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa(body.len()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"date: ");
    DATE.with(|d| head.extend_from_slice(d.borrow_mut().now()));
    head.extend_from_slice(b"\r\n\r\n");
    if bodyless || head_only || body.is_empty() {
        return (head, None);
    }
    if body.len() < COPY_BODY_BELOW {
        head.extend_from_slice(&body);
        return (head, None);
    }
    (head, Some(body))
}

fn itoa(n: usize) -> String {
    n.to_string()
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `a` then `b` with vectored writes (one system call when the socket takes both).
async fn write_two(stream: &TcpStream, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n >= a.len() => {
                b = &b[n - a.len()..];
                a = &[];
            }
            Ok(n) => a = &a[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    write_all(stream, b).await
}

/// The `Date` header's value, formatted once per second per thread.
struct CachedDate {
    second: u64,
    text: Vec<u8>,
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: 0, text: Vec::new() }) };
}

/// Whether a connection opens with the HTTP/2 preface, without consuming a byte. `None`: the
/// caller went away or sent nothing within `wait`.
pub async fn starts_with_h2_preface(stream: &TcpStream, wait: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        tokio::time::timeout_at(deadline, stream.readable())
            .await
            .ok()?
            .ok()?;
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A partial preface: the rest is on its way.
        tokio::time::sleep_until(
            (tokio::time::Instant::now() + Duration::from_millis(2)).min(deadline),
        )
        .await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Stop> {
        parse_head(text.as_bytes(), 1000)
    }

    fn refused(text: &str) -> StatusCode {
        match head(text) {
            Err(Stop::Refuse(s, _)) => s,
            Err(Stop::Quiet) => panic!("quiet"),
            Ok(_) => panic!("accepted: {text:?}"),
        }
    }

    #[test]
    fn heads_are_parsed_with_their_framing_and_connection() {
        let h = head("POST /v2/profiles?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Api-Key: k\r\n\r\nhello")
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(h.parts.method, Method::POST);
        assert_eq!(h.parts.uri.path(), "/v2/profiles");
        assert_eq!(h.parts.uri.query(), Some("x=1"));
        assert_eq!(h.parts.headers["x-api-key"], "k");
        assert!(matches!(h.framing, Framing::Length(5)));
        assert!(h.keep_alive);
        let h = head("GET / HTTP/1.0\r\n\r\n").ok().flatten().unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 closes unless asked");
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .ok()
            .flatten()
            .unwrap();
        assert!(h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
            .ok()
            .flatten()
            .unwrap();
        assert!(!h.keep_alive);
        assert!(matches!(
            head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .ok()
                .flatten()
                .unwrap()
                .framing,
            Framing::Chunked
        ));
        assert!(matches!(
            head("POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n")
                .ok()
                .flatten()
                .unwrap()
                .framing,
            Framing::TooLarge
        ));
        assert!(matches!(head("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None)));
    }

    #[test]
    fn ambiguous_or_malformed_heads_are_refused() {
        for text in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\r\n\r\n",
        ] {
            assert_eq!(refused(text), StatusCode::BAD_REQUEST, "{text:?}");
        }
        let mut flood = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            flood.push_str(&format!("x-{i}: 1\r\n"));
        }
        flood.push_str("\r\n");
        assert_eq!(refused(&flood), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(
            refused("POST / HTTP/1.1\r\nExpect: something\r\n\r\n"),
            StatusCode::EXPECTATION_FAILED
        );
    }
}
