//! Errors the gateway makes, and their one mapping to a status and the upstream's envelope.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Who failed: the caller's request, the gateway itself, or the upstream (pingora's
/// `ErrorSource`). Logged with each refusal; the envelope always says `"source": "gateway"`
/// because the gateway wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Caller,
    Gateway,
    Upstream,
}

/// `Clone` so one failure can be shared with every caller waiting on the same upstream call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidApiKey(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidParams(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// `policy`/`state`: the `RateLimit-Policy` and `RateLimit` header items of the limit.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
        policy: Option<HeaderValue>,
        state: Option<HeaderValue>,
    },
    #[error("{0}")]
    InsufficientCredits(String),
    #[error("the gateway is at its limit of {limit} requests in flight; retry shortly")]
    Overloaded { limit: usize },
    /// `maybe_sent`: the failure came after the request may have reached the upstream (a reset,
    /// a broken response), so the upstream may have acted and charged (ledger: `ambiguous`).
    #[error("the upstream is unavailable: {message}")]
    UpstreamUnavailable { message: String, maybe_sent: bool },
    #[error("the request took longer than {}s", .0.as_secs_f64())]
    UpstreamTimeout(Duration),
    /// The upstream answered, but holding its answer would take the bytes held by all answers
    /// in flight past `upstream.max_buffered_bytes`. The call was made: the upstream may have
    /// acted and charged (ledger: `ambiguous`).
    #[error("the gateway is holding its limit of {limit} bytes of upstream answers and dropped this one; the upstream received the request and may have acted on it and charged for it, so check before repeating an action that is not idempotent")]
    AnswerOverBudget { limit: usize },
    #[error("the credit ledger cannot be written; requests that cost credits are refused until it recovers")]
    LedgerUnavailable,
    /// Fleet mode: the shared store (Redis) is down and `fleet.on_store_failure` says `deny`
    /// for a request that costs credits.
    #[error("{0}")]
    StoreUnavailable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// An `Idempotency-Key` seen before with another request (422).
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// An `Idempotency-Key` whose first request is still in flight (409, Retry-After).
    #[error("{0}")]
    IdempotencyInFlight(String),
    /// An `Idempotency-Key` whose first request's outcome is unknown, or whose answer was not
    /// kept: not sent again (409).
    #[error("{0}")]
    IdempotencyOutcomeUnknown(String),
    /// The gateway is shutting down and cannot serve this request within its grace (503).
    #[error("{0}")]
    Draining(String),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidApiKey(_) | GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::InvalidParams(_) => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::InsufficientCredits(_) => StatusCode::PAYMENT_REQUIRED,
            GatewayError::Overloaded { .. }
            | GatewayError::LedgerUnavailable
            | GatewayError::StoreUnavailable(_)
            | GatewayError::AnswerOverBudget { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnavailable { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::IdempotencyKeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::Draining(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::IdempotencyInFlight(_) | GatewayError::IdempotencyOutcomeUnknown(_) => {
                StatusCode::CONFLICT
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidApiKey(_) => "INVALID_API_KEY",
            GatewayError::Forbidden(_) => "FORBIDDEN",
            GatewayError::InvalidParams(_) => "INVALID_PARAMS",
            GatewayError::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            GatewayError::RateLimited { .. } => "RATE_LIMITED",
            GatewayError::InsufficientCredits(_) => "INSUFFICIENT_CREDITS",
            GatewayError::Overloaded { .. } => "OVERLOADED",
            GatewayError::UpstreamUnavailable { .. } => "UPSTREAM_UNAVAILABLE",
            GatewayError::UpstreamTimeout(_) => "UPSTREAM_TIMEOUT",
            GatewayError::AnswerOverBudget { .. } => "UPSTREAM_ANSWER_OVER_BUDGET",
            GatewayError::LedgerUnavailable => "LEDGER_UNAVAILABLE",
            GatewayError::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            GatewayError::NotFound(_) => "NOT_FOUND",
            GatewayError::MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            GatewayError::IdempotencyKeyReused(_) => "IDEMPOTENCY_KEY_REUSED",
            GatewayError::Draining(_) => "DRAINING",
            GatewayError::IdempotencyInFlight(_) => "IDEMPOTENCY_IN_FLIGHT",
            GatewayError::IdempotencyOutcomeUnknown(_) => "IDEMPOTENCY_OUTCOME_UNKNOWN",
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            GatewayError::Overloaded { .. }
            | GatewayError::LedgerUnavailable
            | GatewayError::StoreUnavailable(_)
            | GatewayError::Draining(_)
            | GatewayError::AnswerOverBudget { .. } => Blame::Gateway,
            GatewayError::UpstreamUnavailable { .. } | GatewayError::UpstreamTimeout(_) => {
                Blame::Upstream
            }
            _ => Blame::Caller,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            // Whole seconds, rounded up, never 0 (a 0 invites a hot retry loop).
            GatewayError::RateLimited { retry_after, .. } => {
                let ms = retry_after.as_millis();
                Some(u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1))
            }
            GatewayError::Overloaded { .. }
            | GatewayError::StoreUnavailable(_)
            | GatewayError::IdempotencyInFlight(_)
            | GatewayError::Draining(_)
            | GatewayError::AnswerOverBudget { .. } => Some(1),
            GatewayError::LedgerUnavailable => Some(5),
            _ => None,
        }
    }

    /// The one mapping from an error to what the caller sees: the upstream's envelope with
    /// `"source": "gateway"`, the status, `Retry-After` where it applies.
    pub fn into_response(&self, action: &str) -> Response<Bytes> {
        let bytes = crate::envelope::refusal(self.code(), &self.to_string(), action);
        let mut resp = Response::new(Bytes::from(bytes));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let GatewayError::RateLimited { policy, state, .. } = self {
            if let Some(p) = policy {
                h.append(RATELIMIT_POLICY, p.clone());
            }
            if let Some(s) = state {
                h.append(RATELIMIT, s.clone());
            }
        }
        resp.extensions_mut().insert(GatewayAnswered(self.code()));
        resp
    }
}

/// IETF `RateLimit-Policy` / `RateLimit` response headers (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// Marks a response the gateway wrote itself (refusal or failure), with its error code.
#[derive(Debug, Clone, Copy)]
pub struct GatewayAnswered(pub &'static str);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_source_gateway_and_zero_credits() {
        let r = GatewayError::InvalidParams("bad".into()).into_response("checkpoint");
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["error"]["code"], "INVALID_PARAMS");
        assert_eq!(v["error"]["source"], "gateway");
        assert_eq!(v["metadata"]["credits_consumed"], 0);
        assert_eq!(v["metadata"]["action"], "checkpoint");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        let e = GatewayError::RateLimited {
            message: "x".into(),
            retry_after: Duration::from_millis(1),
            policy: None,
            state: None,
        };
        assert_eq!(e.into_response("a").headers()["retry-after"], "1");
        let e = GatewayError::RateLimited {
            message: "x".into(),
            retry_after: Duration::from_millis(12_001),
            policy: Some(HeaderValue::from_static("\"account\";q=60;w=60")),
            state: Some(HeaderValue::from_static("\"account\";r=0;t=13")),
        };
        let r = e.into_response("a");
        assert_eq!(r.headers()["retry-after"], "13");
        assert_eq!(r.headers()["ratelimit-policy"], "\"account\";q=60;w=60");
        assert_eq!(r.headers()["ratelimit"], "\"account\";r=0;t=13");
        let e = GatewayError::Overloaded { limit: 1 };
        assert_eq!(e.into_response("a").status(), 503);
        assert!(e.into_response("a").headers().contains_key("retry-after"));
    }
}
