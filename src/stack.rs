//! The onion, outermost first. This is the one place the order is written down; each line says
//! why it stands where it stands.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use crate::layers::account_limit::AccountLimitLayer;
use crate::layers::authenticate::AuthenticateLayer;
use crate::layers::classify::ClassifyLayer;
use crate::layers::client_limit::ClientLimitLayer;
use crate::layers::coalesce::CoalesceLayer;
use crate::layers::credits::{CreditsLayer, RecordSavedLayer};
use crate::layers::guard::GuardLayer;
use crate::layers::idempotency::IdempotencyLayer;
use crate::layers::inject_key::InjectKeyLayer;
use crate::layers::observe::ObserveLayer;
use crate::layers::read_body::ReadBodyLayer;
use crate::layers::respond::RespondLayer;
use crate::layers::scope::ScopeLayer;
use crate::layers::status_cache::StatusCacheLayer;
use crate::shared::Shared;
use crate::upstream::Upstream;

/// The whole data plane for one config generation.
pub type Stack<B> = BoxCloneSyncService<Request<B>, Response<Bytes>, Infallible>;

pub fn build_stack<B>(shared: &Arc<Shared>) -> Stack<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let s = &shared.settings.server;
    let svc = ServiceBuilder::new()
        // observe: outermost, so the request id, the log line and the metrics see every
        // answer, the gateway's own refusals included.
        .layer(ObserveLayer::new(shared.process.clone()))
        // respond: errors become the upstream's envelope here and nowhere else; above it
        // everything is a response, below it everything is a `GatewayError`.
        .layer(RespondLayer)
        // guard: the cheapest refusals first (load shedding, open-proxy targets, a declared
        // oversized body), and the whole-request timeout around everything below.
        .layer(GuardLayer::new(
            shared.process.clone(),
            s.max_in_flight,
            s.max_body_bytes,
            s.request_timeout,
        ))
        // authenticate: before any work on the caller's behalf, and before its body is read.
        .layer(AuthenticateLayer::new(shared.clone()))
        // client_limit: per-client rate, here so that it runs before the body is read or
        // parsed: a flood of malformed bodies is limited too.
        .layer(ClientLimitLayer::new(shared.clone()))
        // read_body: collect the body once, bounded; below here requests are `Request<Bytes>`.
        .layer(ReadBodyLayer::new(s.max_body_bytes))
        // classify: route, action, account_id from body/path/query. Everything below needs to
        // know the account.
        .layer(ClassifyLayer::new(s.max_id_bytes))
        // scope: the caller's paths, and its accounts on every route (lists filtered, webhooks
        // resolved to their account); before anything counts, caches or charges the request.
        .layer(ScopeLayer::new(shared.clone()))
        // record_saved: the 0-credit ledger rows of the answers the layers below give
        // themselves (replayed, cached, coalesced): what the gateway saved.
        .layer(RecordSavedLayer::new(shared.process.clone()))
        // idempotency: a repeated Idempotency-Key is answered here (replayed, 409, 422) and
        // never reaches the cache, coalescing, limits or credits below; below record_saved so
        // a replay is a 0-credit `replayed` ledger row.
        .layer(IdempotencyLayer::new(shared.clone()))
        // status_cache: a checkpoint for an account known to be connected is answered here,
        // free, before anything below counts it; above coalesce so a hit never waits on a call
        // in flight. It learns from upstream answers on their way back up.
        .layer(StatusCacheLayer::new(
            shared.status_store.clone(),
            shared.process.clone(),
        ))
        // coalesce: identical in-flight checkpoints share one upstream call, and one account
        // never has two in flight; above the limits and credits so that followers are neither
        // limited nor charged, and the one call is counted and charged once. The call runs on
        // its own task, so everything below it (limit, credits, ledger row) completes even when
        // its first caller hangs up; that task teaches the status cache before it releases
        // anyone, so a submit waiting behind it may be answered from the cache.
        .layer(CoalesceLayer::new(
            shared.settings.checkpoint_coalesce,
            shared.process.checkpoint_flights.clone(),
            shared.status_store.clone(),
            shared.process.clone(),
            s.request_timeout,
        ))
        // account_limit: governor per account_id and rule, and the upstream-429 cooldown; below
        // the cache and coalescing so it counts only requests that will reach the upstream.
        .layer(AccountLimitLayer::new(shared.clone()))
        // credits: reserve the budget just before forwarding, settle with
        // metadata.credits_consumed and write the ledger row before the answer goes back;
        // below the limits so that a refused request never holds a reservation. The call runs
        // on its own task, so a caller that hangs up or times out never loses a charge.
        .layer(CreditsLayer::new(shared.clone()))
        // inject_key: the last rewrite before the wire: caller credentials out, stored key in.
        .layer(InjectKeyLayer::new(Arc::new(
            shared.settings.upstream.clone(),
        )))
        // upstream: the pooled client; one attempt.
        .service(Upstream::new(
            shared.upstream.clone(),
            shared.process.clone(),
            shared.settings.upstream.max_buffered_bytes,
        ));
    BoxCloneSyncService::new(svc)
}
