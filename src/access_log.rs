//! The access log: one line per request, serialized straight into a reused buffer and handed
//! to a writer thread in chunks of about 64 KB, or at least once a second (nginx's
//! `access_log buffer= flush=`, Envoy's flush thread).
//!
//! tracing-subscriber's formatter builds every field through `dyn Visit` and a JSON map on
//! each event (tokio-rs/tracing #428, #391): a fifth of the gateway's CPU went there. It stays
//! for the operational logs; the access line, the one log line every request writes, has its
//! fixed fields written here, in the same shape (`--log-format json`: the same keys and
//! `"message":"request"`; `text`: tracing's layout) and behind the same `--log-level`
//! filter. It carries no header and no key, like the line it replaces.
//!
//! [`install`] sets the process's sink once (the binary does, beside the tracing subscriber);
//! without one (tests, the library embedded elsewhere) lines go through `tracing` as before.

use std::cell::RefCell;
use std::io::Write;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A chunk is handed to the writer thread once it holds this much.
const CHUNK: usize = 64 * 1024;
/// Lines wait at most about this long in the buffer.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Chunks queued for the writer; beyond, a request waits for it (no line is dropped).
const QUEUED_CHUNKS: usize = 16;

/// The fields of one access line.
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub client: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub account: &'a str,
    pub action: &'a str,
    pub status: u16,
    /// The gateway's refusal code, `""` for none.
    pub error: &'a str,
    /// Credits charged, -1 when none were settled.
    pub credits: i64,
    pub duration_us: u64,
    /// -1 when the upstream was not called.
    pub upstream_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

enum Msg {
    Chunk(Vec<u8>),
    Flush(SyncSender<()>),
}

struct Sink {
    format: Format,
    buf: Mutex<Vec<u8>>,
    tx: SyncSender<Msg>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Flushes what is buffered when dropped: keep it alive until the process exits.
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        flush();
    }
}

/// Send access lines to `out` from now on, through a writer thread. Once per process; a second
/// call keeps the first sink.
pub fn install(format: Format, out: impl Write + Send + 'static) -> Guard {
    let (tx, rx) = mpsc::sync_channel(QUEUED_CHUNKS);
    let sink = Sink {
        format,
        buf: Mutex::new(Vec::with_capacity(CHUNK + 1024)),
        tx,
    };
    if SINK.set(sink).is_ok() {
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_chunks(rx, out));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log thread");
        }
    }
    Guard(())
}

/// Write everything buffered so far and wait until it is written.
pub fn flush() {
    let Some(sink) = SINK.get() else { return };
    let chunk = std::mem::take(&mut *sink.buf.lock().unwrap_or_else(PoisonError::into_inner));
    if !chunk.is_empty() && sink.tx.send(Msg::Chunk(chunk)).is_err() {
        return;
    }
    let (done, wait) = mpsc::sync_channel(1);
    if sink.tx.send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(Duration::from_secs(5));
    }
}

fn write_chunks(rx: Receiver<Msg>, mut out: impl Write) {
    loop {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(Msg::Chunk(chunk)) => {
                let _ = out.write_all(&chunk);
                let _ = out.flush();
            }
            Ok(Msg::Flush(done)) => {
                let _ = out.flush();
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {
                let Some(sink) = SINK.get() else { continue };
                let chunk =
                    std::mem::take(&mut *sink.buf.lock().unwrap_or_else(PoisonError::into_inner));
                if !chunk.is_empty() {
                    let _ = out.write_all(&chunk);
                    let _ = out.flush();
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Log one request.
pub fn log(e: &Entry<'_>) {
    let Some(sink) = SINK.get() else {
        tracing::info!(
            request_id = e.request_id,
            client = e.client,
            method = e.method,
            route = e.route,
            account = e.account,
            action = e.action,
            status = e.status,
            error = e.error,
            credits = e.credits,
            duration_us = e.duration_us,
            upstream_us = e.upstream_us,
            "request"
        );
        return;
    };
    // The same filter as the line it replaces (`--log-level warn` turns it off); the answer
    // is cached at the call site, so this costs a load and a compare.
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    thread_local! {
        static LINE: RefCell<(Vec<u8>, Clock)> = RefCell::new((Vec::with_capacity(512), Clock::default()));
    }
    LINE.with(|cell| {
        let Ok(mut cell) = cell.try_borrow_mut() else {
            return;
        };
        let (line, clock) = &mut *cell;
        line.clear();
        format_line(line, clock, sink.format, e);
        let mut buf = sink.buf.lock().unwrap_or_else(PoisonError::into_inner);
        buf.extend_from_slice(line);
        if buf.len() >= CHUNK {
            let full = std::mem::replace(&mut *buf, Vec::with_capacity(CHUNK + 1024));
            drop(buf);
            let _ = sink.tx.send(Msg::Chunk(full));
        }
    });
}

/// The timestamp's text up to the second, made again only when the second changes.
#[derive(Default)]
struct Clock {
    second: u64,
    text: String,
}

impl Clock {
    /// `2026-12-03T09:25:17.123456Z`, as tracing-subscriber writes it.
    fn write(&mut self, out: &mut Vec<u8>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let second = now.as_secs();
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text.clear();
            let t = i64::try_from(second)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            use std::fmt::Write as _;
            let _ = write!(
                self.text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
        }
        out.extend_from_slice(self.text.as_bytes());
        let _ = write!(out, ".{:06}Z", now.subsec_micros());
    }
}

fn format_line(out: &mut Vec<u8>, clock: &mut Clock, format: Format, e: &Entry<'_>) {
    match format {
        Format::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            clock.write(out);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
            for (key, value) in [
                ("request_id", e.request_id),
                ("client", e.client),
                ("method", e.method),
                ("route", e.route),
                ("account", e.account),
                ("action", e.action),
            ] {
                json_str(out, key, value);
            }
            let _ = write!(out, ",\"status\":{}", e.status);
            json_str(out, "error", e.error);
            let _ = writeln!(
                out,
                ",\"credits\":{},\"duration_us\":{},\"upstream_us\":{}}}",
                e.credits, e.duration_us, e.upstream_us
            );
        }
        Format::Text => {
            clock.write(out);
            let _ = writeln!(
                out,
                "  INFO request request_id={} client={} method={} route={} account={} action={} status={} error={} credits={} duration_us={} upstream_us={}",
                Visible(e.request_id),
                Visible(e.client),
                Visible(e.method),
                Visible(e.route),
                Visible(e.account),
                Visible(e.action),
                e.status,
                Visible(e.error),
                e.credits,
                e.duration_us,
                e.upstream_us
            );
        }
    }
}

/// `,"key":"value"` with the value escaped as JSON requires.
fn json_str(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":\"");
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => {
                out.extend_from_slice(&bytes[start..i]);
                let _ = write!(out, "\\u{b:04x}");
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A text-format value with control characters shown escaped, so one request is one line.
struct Visible<'a>(&'a str);

impl std::fmt::Display for Visible<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.bytes().all(|b| b >= 0x20 && b != 0x7f) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry<'a>(account: &'a str) -> Entry<'a> {
        Entry {
            request_id: "0001",
            client: "crm",
            method: "POST",
            route: "profiles",
            account,
            action: "get",
            status: 200,
            error: "",
            credits: 1,
            duration_us: 1234,
            upstream_us: 1000,
        }
    }

    #[test]
    fn a_json_line_has_the_fields_of_the_tracing_line_and_parses() {
        let mut out = Vec::new();
        format_line(
            &mut out,
            &mut Clock::default(),
            Format::Json,
            &entry("acc\"\\\n\u{1}é"),
        );
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["account"], "acc\"\\\n\u{1}é");
        assert_eq!(v["status"], 200);
        assert_eq!(v["credits"], 1);
        assert_eq!(v["upstream_us"], 1000);
        assert_eq!(v["error"], "");
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-12-03T09:25:17.123456Z".len(), "{ts}");
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }

    #[test]
    fn a_text_line_is_one_line_whatever_the_values() {
        let mut out = Vec::new();
        format_line(
            &mut out,
            &mut Clock::default(),
            Format::Text,
            &entry("a\nb"),
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.contains("  INFO request request_id=0001 client=crm"));
        assert!(text.contains("account=a\\nb"));
    }
}
