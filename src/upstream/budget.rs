//! The process-wide budget of bytes held by buffered upstream answers
//! (`upstream.max_buffered_bytes`), and the collection of one answer against it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;

use super::MAX_RESPONSE_BYTES;

/// The bytes held by all upstream answers of the process, against `upstream.max_buffered_bytes`
/// (issue 14 item 10: each answer was bounded, their sum was not). An answer takes its bytes
/// before it buffers them and gives them back when its last `Bytes` handle is dropped: after
/// hyper has written it to the caller (and to every coalesced follower), or when it is thrown
/// away. Taking is one compare-and-swap, giving back one `fetch_sub`; nothing waits: past the
/// budget the answer is refused at once (see `Upstream::call`).
#[derive(Debug, Default)]
pub struct AnswerBudget {
    held: AtomicUsize,
}

impl AnswerBudget {
    /// Bytes held right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Takes `n` more bytes unless that would pass `limit`.
    fn take(&self, n: usize, limit: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                h.checked_add(n).filter(|&t| t <= limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.held.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// The bytes one answer holds of the budget; given back when it is dropped.
struct Held {
    budget: Arc<AnswerBudget>,
    limit: usize,
    bytes: usize,
}

impl Held {
    fn new(budget: Arc<AnswerBudget>, limit: usize) -> Held {
        Held {
            budget,
            limit,
            bytes: 0,
        }
    }

    /// Holds `total` bytes in all (never fewer than now); `false`: past the budget.
    fn hold(&mut self, total: usize) -> bool {
        if total <= self.bytes {
            return true;
        }
        if !self.budget.take(total - self.bytes, self.limit) {
            return false;
        }
        self.bytes = total;
        true
    }

    /// Holds `total` bytes in all, fewer than now (a buffer shrunk).
    fn shrink(&mut self, total: usize) {
        if total < self.bytes {
            self.budget.give_back(self.bytes - total);
            self.bytes = total;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// A buffered answer and the budget it holds: the owner behind the answer's `Bytes`, so the
/// bytes are given back exactly when the memory is freed.
struct Buffered<B> {
    data: B,
    _held: Held,
}

impl<B: AsRef<[u8]>> AsRef<[u8]> for Buffered<B> {
    fn as_ref(&self) -> &[u8] {
        self.data.as_ref()
    }
}

/// Why an answer could not be buffered.
#[derive(Debug)]
pub(super) enum BufferError {
    /// The upstream's body broke off or passed `MAX_RESPONSE_BYTES`.
    Body(String),
    /// Holding it would pass the process's budget.
    OverBudget,
}

/// Collects an upstream answer's body into one `Bytes`, holding its bytes of `budget` before
/// they are buffered.
///
/// - With a declared length (`Content-Length`, the usual case): all of it is taken from the
///   budget before a byte is read, and the buffer is allocated once at exactly that size (no
///   doubling: a 30 MB answer is one 30 MB allocation, which the allocator maps and unmaps
///   whole). An answer that arrives in one chunk is kept as that chunk, uncopied.
/// - Without one (chunked): the buffer grows by doubling (capped at `MAX_RESPONSE_BYTES`), and
///   each growth takes its new capacity from the budget before allocating it; the buffer is
///   shrunk to its length at the end and the difference given back.
pub(super) async fn buffer_answer<B>(
    mut body: B,
    budget: &Arc<AnswerBudget>,
    limit: usize,
) -> Result<Bytes, BufferError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let declared = http_body::Body::size_hint(&body).exact();
    let mut held = Held::new(budget.clone(), limit);
    let declared = match declared.map(usize::try_from) {
        Some(Ok(n)) if n <= MAX_RESPONSE_BYTES => {
            if !held.hold(n) {
                return Err(BufferError::OverBudget);
            }
            Some(n)
        }
        Some(_) => {
            return Err(BufferError::Body(format!(
                "the answer declares a body larger than {MAX_RESPONSE_BYTES} bytes"
            )))
        }
        None => None,
    };
    // The first chunk is kept as it is until a second one comes.
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| BufferError::Body(format!("the response body broke off: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers: not forwarded
        };
        if chunk.is_empty() {
            continue;
        }
        let total = len + chunk.len();
        if total > declared.unwrap_or(MAX_RESPONSE_BYTES) {
            return Err(BufferError::Body(format!(
                "the response body is longer than {} bytes",
                declared.unwrap_or(MAX_RESPONSE_BYTES)
            )));
        }
        match (&first, declared) {
            (None, _) if buf.capacity() == 0 => {
                if declared.is_none() && !held.hold(total) {
                    return Err(BufferError::OverBudget);
                }
                first = Some(chunk);
            }
            (_, Some(n)) => {
                if buf.capacity() == 0 {
                    buf.reserve_exact(n);
                }
                if let Some(f) = first.take() {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&chunk);
            }
            (_, None) => {
                if total > buf.capacity() {
                    let cap = total
                        .max(buf.capacity().saturating_mul(2))
                        .min(MAX_RESPONSE_BYTES);
                    // The first chunk is held until it has been copied in.
                    let kept = first.as_ref().map_or(0, Bytes::len);
                    if !held.hold(cap + kept) {
                        return Err(BufferError::OverBudget);
                    }
                    buf.reserve_exact(cap - buf.len());
                }
                if let Some(f) = first.take() {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&chunk);
            }
        }
        len = total;
    }
    if declared.is_some_and(|n| n != len) {
        return Err(BufferError::Body(format!(
            "the response body is shorter than its declared length ({len} bytes)"
        )));
    }
    if let Some(f) = first {
        // One chunk: no copy. Chunked answers hold what they hold; declared ones held it all.
        return Ok(Bytes::from_owner(Buffered {
            data: f,
            _held: held,
        }));
    }
    if len == 0 {
        return Ok(Bytes::new());
    }
    if buf.capacity() > len {
        buf.shrink_to_fit();
        held.shrink(buf.capacity().max(len));
    }
    Ok(Bytes::from_owner(Buffered {
        data: buf,
        _held: held,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Frame, SizeHint};

    use super::*;

    /// A body that gives `chunks` one by one (then `fail` as an error, if set), declaring
    /// `declared` bytes or nothing (chunked).
    struct Chunks {
        chunks: VecDeque<Bytes>,
        declared: Option<u64>,
        fail: bool,
    }

    fn body(sizes: &[usize], declared: bool) -> Chunks {
        Chunks {
            chunks: sizes.iter().map(|&n| Bytes::from(vec![b'x'; n])).collect(),
            declared: declared.then(|| sizes.iter().sum::<usize>() as u64),
            fail: false,
        }
    }

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            match self.chunks.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None if self.fail => Poll::Ready(Some(Err("reset"))),
                None => Poll::Ready(None),
            }
        }
        fn size_hint(&self) -> SizeHint {
            self.declared
                .map_or_else(SizeHint::default, SizeHint::with_exact)
        }
    }

    #[tokio::test]
    async fn answers_hold_their_bytes_until_their_last_handle_drops() {
        let budget = Arc::new(AnswerBudget::default());
        let limit = 1000;
        // Declared, in three chunks: all 600 taken up front, one buffer of exactly 600.
        let a = buffer_answer(body(&[200, 200, 200], true), &budget, limit)
            .await
            .unwrap();
        assert_eq!((a.len(), budget.held()), (600, 600));
        // A second one does not fit next to it: refused, and holds nothing afterwards.
        let e = buffer_answer(body(&[600], true), &budget, limit).await;
        assert!(matches!(e, Err(BufferError::OverBudget)), "{e:?}");
        assert_eq!(budget.held(), 600);
        // A copy (a coalesced follower's) keeps the bytes held; the last drop gives them back.
        let copy = a.clone();
        drop(a);
        assert_eq!(budget.held(), 600);
        drop(copy);
        assert_eq!(budget.held(), 0);
        // One chunk: kept as it is, held the same way.
        let one = buffer_answer(body(&[300], true), &budget, limit)
            .await
            .unwrap();
        assert_eq!((one.len(), budget.held()), (300, 300));
        drop(one);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn chunked_answers_hold_their_buffer_and_give_back_what_they_shrink() {
        let budget = Arc::new(AnswerBudget::default());
        let limit = 1000;
        let a = buffer_answer(body(&[100, 150, 50, 10], false), &budget, limit)
            .await
            .unwrap();
        assert_eq!(a.len(), 310);
        assert!(a.iter().all(|&b| b == b'x'));
        // Shrunk to its length at the end (the allocator may round up a little).
        assert!((310..=400).contains(&budget.held()), "{}", budget.held());
        drop(a);
        assert_eq!(budget.held(), 0);
        // Past the budget half-way: refused, and what it had taken is given back.
        let e = buffer_answer(body(&[400, 400, 400], false), &budget, limit).await;
        assert!(matches!(e, Err(BufferError::OverBudget)), "{e:?}");
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn broken_or_oversized_bodies_hold_nothing() {
        let budget = Arc::new(AnswerBudget::default());
        let mut b = body(&[100, 100], true);
        b.declared = Some(500);
        b.fail = true;
        let e = buffer_answer(b, &budget, 1000).await;
        assert!(matches!(e, Err(BufferError::Body(_))), "{e:?}");
        assert_eq!(budget.held(), 0);
        // Shorter than declared, without an error from the body itself.
        let mut b = body(&[100], true);
        b.declared = Some(500);
        let e = buffer_answer(b, &budget, 1000).await;
        assert!(matches!(e, Err(BufferError::Body(_))), "{e:?}");
        // Declared beyond the per-answer maximum: refused before a byte is read.
        let mut b = body(&[1], true);
        b.declared = Some(MAX_RESPONSE_BYTES as u64 + 1);
        let e = buffer_answer(b, &budget, usize::MAX).await;
        assert!(matches!(e, Err(BufferError::Body(_))), "{e:?}");
        assert_eq!(budget.held(), 0);
        // An empty answer holds nothing.
        let a = buffer_answer(body(&[], true), &budget, 1000).await.unwrap();
        assert!(a.is_empty());
        assert_eq!(budget.held(), 0);
    }
}
