//! The request body the data plane's stack reads: hyper's streaming body (HTTP/2 and TLS
//! callers) or one read whole by the gateway's own HTTP/1.1 codec ([`crate::http1`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The error a body over `server.max_body_bytes` gives (`read_body` answers it 413).
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the limit")]
pub struct BodyTooLarge;

/// The error a body the codec could not read gives (broken chunked framing).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyBroken(pub String);

pub enum DataBody {
    Hyper(Incoming),
    /// Read whole: given once.
    Read(Option<Bytes>),
    /// Longer than `server.max_body_bytes`: not read.
    TooLarge,
    Broken(Option<String>),
}

impl DataBody {
    pub fn read(bytes: Bytes) -> DataBody {
        DataBody::Read((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for DataBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            DataBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DataBody::Read(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            DataBody::TooLarge => Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
            DataBody::Broken(m) => Poll::Ready(
                m.take()
                    .map(|m| Err(Box::new(BodyBroken(m)) as Self::Error)),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DataBody::Hyper(b) => b.is_end_stream(),
            DataBody::Read(b) => b.is_none(),
            DataBody::TooLarge => false,
            DataBody::Broken(m) => m.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DataBody::Hyper(b) => b.size_hint(),
            DataBody::Read(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            DataBody::TooLarge | DataBody::Broken(_) => SizeHint::default(),
        }
    }
}
