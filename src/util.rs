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
