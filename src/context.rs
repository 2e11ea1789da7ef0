//! Request-scoped values that layers pass down as typed request extensions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use http::HeaderValue;

use crate::config::ClientSettings;

/// A route of the upstream's surface, named by method and path (`classify::resolve`): the
/// metrics label, the access log's `route`, and what the layers match on. `Other` is off the
/// surface (answered 404 or 405 by classify).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Login,
    Checkpoint,
    Accounts,
    Account,
    Credits,
    Logs,
    Profiles,
    Network,
    Messages,
    Content,
    Recruiter,
    Enrich,
    Webhooks,
    Webhook,
    Other,
}

impl Route {
    /// The route's name in labels, logs and envelopes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Login => "login",
            Route::Checkpoint => "checkpoint",
            Route::Accounts => "accounts",
            Route::Account => "account",
            Route::Credits => "credits",
            Route::Logs => "logs",
            Route::Profiles => "profiles",
            Route::Network => "network",
            Route::Messages => "messages",
            Route::Content => "content",
            Route::Recruiter => "recruiter",
            Route::Enrich => "enrich",
            Route::Webhooks => "webhooks",
            Route::Webhook => "webhook",
            Route::Other => "other",
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the gateway knows of a request: route, action, account. Made by `classify`.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub route: Route,
    pub action: Option<Arc<str>>,
    pub account_id: Option<Arc<str>>,
    /// The 2FA `code` of a `POST /v2/checkpoint` body (a number is kept as its JSON text);
    /// `None` elsewhere, and for an app-approval checkpoint. Coalescing keys on it.
    pub code: Option<Arc<str>>,
}

/// Who answered a request, as a response extension for the credits ledger. The gateway's own
/// answers say so (`Cache`: the status cache; `Coalesced`: a copy of another caller's
/// upstream call, 0 credits); an answer without one came from the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    Upstream,
    Cache,
    Coalesced,
    /// A stored answer replayed for a repeated `Idempotency-Key`: 0 credits.
    Replayed,
}

/// Response extension: the status cache already learnt from this upstream answer (coalesce's
/// flight owner teaches it before releasing its followers), so the status_cache layer does
/// not learn from it a second time (in fleet mode that would be one more Redis round trip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLearnt;

/// Filled in by the layers as the request goes down, read by `observe` when the answer comes
/// back up (refusals included): pingora's per-request CTX. One allocation per request.
#[derive(Debug)]
pub struct RequestLog {
    pub request_id: HeaderValue,
    /// The route named by the method and path (metrics label, envelope `metadata.action`).
    pub route: Route,
    pub client: OnceLock<Arc<ClientSettings>>,
    pub context: OnceLock<RequestContext>,
    credits: AtomicU64,
    upstream_micros: AtomicU64,
}

const UNSET: u64 = u64::MAX;

impl RequestLog {
    pub fn new(request_id: HeaderValue, route: Route) -> RequestLog {
        RequestLog {
            request_id,
            route,
            client: OnceLock::new(),
            context: OnceLock::new(),
            credits: AtomicU64::new(UNSET),
            upstream_micros: AtomicU64::new(UNSET),
        }
    }

    pub fn set_credits(&self, credits: u64) {
        self.credits.store(credits, Ordering::Relaxed);
    }

    pub fn credits(&self) -> Option<u64> {
        match self.credits.load(Ordering::Relaxed) {
            UNSET => None,
            c => Some(c),
        }
    }

    pub fn set_upstream_micros(&self, us: u64) {
        self.upstream_micros.store(us, Ordering::Relaxed);
    }

    pub fn upstream_micros(&self) -> Option<u64> {
        match self.upstream_micros.load(Ordering::Relaxed) {
            UNSET => None,
            c => Some(c),
        }
    }

    pub fn client_name(&self) -> Option<&Arc<str>> {
        self.client.get().map(|c| &c.name)
    }
}
