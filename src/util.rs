//! Small helpers shared by the gateway and the emulator.

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

/// `2026-11-25T10:32:00Z`: the timestamp format of the upstream's envelopes.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    now.format(&fmt).unwrap_or_default()
}

/// Request ids: a random per-process prefix and a counter. Unique across restarts with
/// overwhelming probability, and cheap (no syscall, no RNG per request).
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds {
            prefix: rand::random(),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    pub fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // 8 hex digits of the prefix, then 12 of the counter: on the stack, one allocation.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let value = (u128::from(self.prefix) << 48) | u128::from(n & 0xffff_ffff_ffff);
        let mut buf = [0u8; 20];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = HEX[((value >> (4 * (19 - i))) & 0xf) as usize];
        }
        // Hex digits are always a valid header value.
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// A caller-supplied request id is kept when it is short, visible ASCII.
pub fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// A boxed, sendable future: what the layers and the ledger hand back.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// SHA-256 of a key (caller keys are stored and compared only as this).
pub fn sha256(key: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key).into()
}

/// One non-blocking read of `stream` by `read` (which returns the bytes it read), with at
/// most `room` bytes asked for; `Ok(None)`: nothing to read yet.
///
/// A read that returns fewer bytes than asked for has drained the socket, so its readiness
/// is cleared then and there (nginx's `rev->ready = 0` after a short `recv`): the next wait
/// parks on the reactor instead of paying a `recv` that can only say `EAGAIN` (one syscall
/// per request on each side of the gateway). Safe with tokio's edge-triggered readiness:
/// bytes that arrive after the read raise a new event, which the clear (bound to the event it
/// saw) leaves alone.
pub(crate) fn try_read_draining(
    stream: &tokio::net::TcpStream,
    room: usize,
    read: impl FnOnce() -> std::io::Result<usize>,
) -> std::io::Result<Option<usize>> {
    use std::io::ErrorKind::WouldBlock;
    let mut got = None;
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = read()?;
        got = Some(n);
        if n > 0 && n < room {
            // Drained: the readiness goes (the bytes are the caller's).
            Err(WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (got, result) {
        (Some(n), _) => Ok(Some(n)),
        (None, Err(e)) if e.kind() != WouldBlock => Err(e),
        (None, _) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_then_the_counter_in_hex() {
        let ids = RequestIds {
            prefix: 0x397a_456a,
            next: AtomicU64::new(0x26f3),
        };
        assert_eq!(ids.next(), "397a456a0000000026f3");
        assert_eq!(ids.next(), "397a456a0000000026f4");
    }
}
