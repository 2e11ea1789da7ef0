//! HTTP/1.1 to a plain-TCP upstream, spoken in the caller's own task.
//!
//! hyper's client runs every connection on a task of its own: a call hands its request to that
//! task through a channel, the task writes it, reads the answer and hands the head back through
//! another channel, and the body's bytes follow through a third (profile of `benches/load.sh`:
//! the connection tasks, their channels and the pool's checkout were about a tenth of a
//! worker's time, beside the kernel's own). Here a call takes an idle connection from its
//! worker's pool, writes the request with one `send`, reads and parses the answer's head
//! (`httparse`, as the server side does) and reads its body itself; the connection goes back to
//! the pool when the body has been read to its end (pingora's connection reuse works the
//! same way). A connection is only ever used by one call at a time, on the worker that opened
//! it.
//!
//! - Idle connections are checked before reuse (one non-blocking read: closed or unexpected
//!   bytes, and it is dropped; pingora's idle-connection watch, without the task), kept at most
//!   [`IDLE_TIMEOUT`] and at most `MAX_IDLE` per worker.
//! - Nothing is ever re-sent once a byte of it may have reached the upstream; a request whose
//!   write fails before its first byte on a reused connection is written again on a new one.
//! - An answer's head is at most [`MAX_HEAD`] bytes (nginx's `proxy_buffer_size`): larger, a
//!   502. Bodies are framed by `Content-Length`, `chunked`, or the connection's end; interim
//!   1xx answers are skipped; `HEAD`, 204 and 304 answers have none.
//! - TLS upstreams keep hyper-util's client (`super::client`): this is the plain-TCP path.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use tokio::net::TcpStream;

use super::CallError;

/// The largest answer head (status line and headers) read.
pub const MAX_HEAD: usize = 4096;
/// How long a pooled connection may carry nothing before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections a worker keeps (hyper-util's `pool_max_idle_per_host` was set the same).
const MAX_IDLE: usize = 4096;
/// The most headers an answer may carry.
const MAX_HEADERS: usize = 100;
/// A body read asks for at most this much at once.
const READ_CHUNK: usize = 64 * 1024;

struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// One worker's plain-TCP connections to the upstream.
pub(crate) struct H1Pool {
    /// `host:port`, resolved at each new connection.
    addr: String,
    host: HeaderValue,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
}

/// Whether an idle connection is still open and quiet (no byte arrived while it was idle).
fn alive(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Reads what the socket has onto the end of `buf`, asking for at least `want` bytes of
/// room; `Ok(0)`: closed. A short read clears the socket's readiness
/// ([`crate::util::try_read_draining`]).
fn poll_read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < want.max(1) {
            buf.reserve(want.max(1));
        }
        let room = buf.capacity() - buf.len();
        if let Some(n) = crate::util::try_read_draining(stream, room, || stream.try_read_buf(buf))?
        {
            return Poll::Ready(Ok(n));
        }
    }
}

async fn read_into(stream: &TcpStream, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_into(stream, cx, buf, max)).await
}

/// Writes all of `bytes`; `Err((written, e))` says how much went before the failure.
async fn write_all(stream: &TcpStream, bytes: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut off = 0;
    while off < bytes.len() {
        match stream.try_write(&bytes[off..]) {
            Ok(0) => return Err((off, io::ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stream.writable().await.map_err(|e| (off, e))?;
            }
            Err(e) => return Err((off, e)),
        }
    }
    Ok(())
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Eof,
    None,
}

impl H1Pool {
    pub(crate) fn new(addr: String, host: HeaderValue, connect_timeout: Duration) -> H1Pool {
        H1Pool {
            addr,
            host,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// An idle connection that is still open, the most recently used first.
    fn checkout(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle
            .front()
            .is_some_and(|i| i.since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        while let Some(i) = idle.pop_back() {
            if alive(&i.stream) {
                return Some(i.stream);
            }
        }
        None
    }

    fn checkin(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle {
            stream,
            since: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<TcpStream, CallError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.addr.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::Connect(e.to_string())),
            Err(_) => {
                return Err(CallError::Connect(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends `req` and reads the head of its answer; the body is read by the caller.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: Request<Bytes>,
    ) -> Result<Response<H1Body>, CallError> {
        let head_only = req.method() == Method::HEAD;
        let wire = encode(&req, &self.host);
        let stream = loop {
            let (stream, reused) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            match write_all(&stream, &wire).await {
                Ok(()) => break stream,
                // Not a byte of it left: safe to write it again, on a fresh connection.
                Err((0, _)) if reused => continue,
                Err((0, e)) => return Err(CallError::Connect(e.to_string())),
                Err((_, e)) => return Err(CallError::Sent(e.to_string())),
            }
        };
        let mut buf = BytesMut::with_capacity(MAX_HEAD);
        loop {
            let room = MAX_HEAD - buf.len();
            let n = read_into(&stream, &mut buf, room)
                .await
                .map_err(|e| CallError::Sent(e.to_string()))?;
            if n == 0 {
                return Err(CallError::Sent(
                    "the upstream closed the connection before its answer".into(),
                ));
            }
            match parse_head(&mut buf, head_only)? {
                Some((parts, framing, keep_alive)) => {
                    let body = H1Body {
                        stream: Some(stream),
                        pool: self.clone(),
                        buf,
                        framing,
                        keep_alive,
                        chunk: ChunkState::Size,
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                None if buf.len() >= MAX_HEAD => {
                    return Err(CallError::Sent(format!(
                        "the upstream's answer head is larger than {MAX_HEAD} bytes"
                    )))
                }
                None => {}
            }
        }
    }
}

/// The request on the wire: head and body in one buffer, so one `send` carries it.
fn encode(req: &Request<Bytes>, host: &HeaderValue) -> Vec<u8> {
    let body = req.body();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = req.headers();
    if !headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        // The body is sent whole: its length is ours to say.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let needs_length =
        !body.is_empty() || matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if needs_length {
        use std::io::Write;
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn bad(message: impl Into<String>) -> CallError {
    CallError::Sent(format!(
        "malformed answer from the upstream: {}",
        message.into()
    ))
}

type Head = (http::response::Parts, Framing, bool);

/// Parses the answer head at the start of `buf`, skipping interim (1xx) answers; on success
/// the head's bytes are cut off `buf`, which keeps what follows it.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Head>, CallError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| bad(format!("status {code}")))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(bad("an upgrade was never asked for"));
            }
            buf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Header values share the head's bytes (one allocation for all of them).
        let mut ranges = Vec::with_capacity(resp.headers.len());
        let base = buf.as_ptr() as usize;
        for h in resp.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| bad(format!("header name `{}`", h.name)))?;
            let start = h.value.as_ptr() as usize - base;
            ranges.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut map = HeaderMap::with_capacity(ranges.len());
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut close = version == Version::HTTP_10;
        for (name, start, end) in ranges {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| bad(format!("value of header `{name}`")))?;
            if name == header::CONTENT_LENGTH {
                let n = value
                    .to_str()
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad("Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad("several different Content-Length headers"));
                }
                length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                // The last coding must be chunked for the length to be known by it.
                chunked = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if !chunked {
                    close = true;
                }
            } else if name == header::CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive")
                        && version == Version::HTTP_10
                    {
                        close = false;
                    }
                }
            }
            map.append(name, value);
        }
        let framing = if head_only
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::None
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            close = true;
            Framing::Eof
        };
        let mut builder = Response::builder().status(status).version(version);
        if let Some(h) = builder.headers_mut() {
            *h = map;
        }
        let (parts, ()) = builder
            .body(())
            .map_err(|e| bad(e.to_string()))?
            .into_parts();
        return Ok(Some((parts, framing, !close)));
    }
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes left, then its CRLF.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// An answer's body, read from its connection as it is polled; the connection returns to its
/// pool once the body has been read to its end (dropped before, the connection is closed).
pub(crate) struct H1Body {
    stream: Option<TcpStream>,
    pool: Arc<H1Pool>,
    /// Bytes read past what has been handed out.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    chunk: ChunkState,
}

impl H1Body {
    fn finish(&mut self) {
        self.framing = Framing::None;
        if let Some(stream) = self.stream.take() {
            if self.keep_alive && self.buf.is_empty() {
                self.pool.checkin(stream);
            }
        }
    }

    /// Reads more of the body into `buf`; an error when the connection breaks off or closes
    /// before the body's end (the connection is dropped then).
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<(), BoxError>> {
        let result = match ready!(self.poll_more(cx, want)) {
            Ok(0) => Err("the upstream closed the connection mid-answer".into()),
            Ok(_) => return Poll::Ready(Ok(())),
            Err(e) => Err(e.into()),
        };
        self.stream = None;
        Poll::Ready(result)
    }

    /// Reads more from the connection into `buf`; `Ok(0)`: closed.
    fn poll_more(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let Some(stream) = &self.stream else {
            return Poll::Ready(Ok(0));
        };
        poll_read_into(stream, cx, &mut self.buf, want.clamp(1, READ_CHUNK))
    }

    /// One step of chunked decoding over `buf`: `Some(data)` to hand out, `None` for more input
    /// (or the end, once `chunk` is `Done`).
    fn decode_chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let Some(eol) = find_crlf(&self.buf) else {
                        if self.buf.len() > 1024 {
                            return Err("a chunk-size line is too long".into());
                        }
                        return Ok(None);
                    };
                    let line = &self.buf[..eol];
                    let size = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or(line)
                        .trim_ascii();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or("a malformed chunk size")?;
                    self.buf.advance(eol + 2);
                    self.chunk = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(self.buf.len());
                    let data = self.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.chunk = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Some(data));
                }
                ChunkState::DataEnd => {
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err("a chunk does not end with CRLF".into());
                    }
                    self.buf.advance(2);
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(eol) = find_crlf(&self.buf) else {
                        if self.buf.len() > 8192 {
                            return Err("the trailers are too long".into());
                        }
                        return Ok(None);
                    };
                    self.buf.advance(eol + 2);
                    if eol == 0 {
                        self.chunk = ChunkState::Done;
                        return Ok(None);
                    }
                }
                ChunkState::Done => return Ok(None),
            }
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.framing {
                Framing::None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(this.buf.len());
                        let data = this.buf.split_to(n).freeze();
                        this.framing = Framing::Length(left - n as u64);
                        if left - n as u64 == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                    }
                    let want = usize::try_from(left).unwrap_or(usize::MAX);
                    if let Err(e) = ready!(this.poll_fill(cx, want)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Framing::Chunked => {
                    match this.decode_chunk() {
                        Ok(Some(data)) => {
                            return Poll::Ready(Some(Ok(http_body::Frame::data(data))))
                        }
                        Ok(None) if this.chunk == ChunkState::Done => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            this.stream = None;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                    if let Err(e) = ready!(this.poll_fill(cx, READ_CHUNK)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Framing::Eof => {
                    if !this.buf.is_empty() {
                        let data = this.buf.split().freeze();
                        return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                    }
                    match ready!(this.poll_more(cx, READ_CHUNK)) {
                        Ok(0) => {
                            this.stream = None;
                            this.framing = Framing::None;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            this.stream = None;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::None | Framing::Length(0))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(n) => http_body::SizeHint::with_exact(n),
            Framing::None => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
