//! The registry and every metric name, in one file.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A shared, cheaply cloned label value (client names are `Arc<str>` already).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

impl EncodeLabelValue for crate::context::Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub client: Label,
    pub route: crate::context::Route,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: crate::context::Route,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub code: &'static str,
}

/// `connected` or `checkpoint_required`: the statuses the status cache keeps.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub client: Label,
    pub account: Label,
}

/// Caps the distinct values of a label (the upstream's `metadata.action`), so a misbehaving
/// upstream cannot blow up the series count: past the cap, new values become `other`.
#[derive(Debug, Default)]
pub struct LabelCap {
    seen: std::sync::RwLock<std::collections::HashSet<Arc<str>>>,
}

impl LabelCap {
    pub const MAX: usize = 64;

    pub fn label(&self, value: &Arc<str>) -> Label {
        if let Ok(seen) = self.seen.read() {
            if seen.contains(value) {
                return Label(value.clone());
            }
        }
        match self.seen.write() {
            Ok(mut seen) if seen.len() < Self::MAX || seen.contains(value) => {
                seen.insert(value.clone());
                Label(value.clone())
            }
            _ => Label(Arc::from("other")),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub client: Label,
    pub action: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub client: Label,
    /// `client`, `account` (the default), a rule's name, or `cooldown`.
    pub reason: Label,
    pub shadow: bool,
}

/// What fell back to per-replica state (or was denied) while the fleet store was down:
/// `limits`, `budgets`, `status`, `coalesce`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabels {
    pub part: &'static str,
    /// `local` (used the replica's own state) or `deny` (refused, 503 STORE_UNAVAILABLE).
    pub decision: &'static str,
}

/// A fleet store operation: `admit`, `settle`, `cooldown`, `standing`, `status_get`,
/// `status_set`, `status_forget`, `lease`, `lease_renew`, `lease_wait`, `lease_release`,
/// `publish`, `probe`, `reseed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// The fleet store's metrics. Made by `Fleet::connect` (before the process's registry exists)
/// and registered by `Process::with_fleet`; every handle is a cheap shared clone.
#[derive(Clone, Debug, Default)]
pub struct FleetMetrics {
    pub store_up: Gauge,
    pub fallbacks: Family<PartLabels, Counter>,
    pub round_trips: Family<OpLabels, Counter>,
    pub store_errors: Family<OpLabels, Counter>,
    pub reseeds: Counter,
    pub lease_takeovers: Counter,
    pub coalesced_remote: Counter,
    pub status_invalidations: Counter,
}

impl FleetMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleet_store_up",
            "1 while the fleet store (Redis) answers, 0 while the breaker holds it down",
            self.store_up.clone(),
        );
        registry.register(
            "fleet_fallbacks",
            "Requests that used per-replica state (decision=local) or were refused (decision=deny) because the fleet store was down, by part",
            self.fallbacks.clone(),
        );
        registry.register(
            "fleet_round_trips",
            "Round trips to the fleet store, by operation",
            self.round_trips.clone(),
        );
        registry.register(
            "fleet_store_errors",
            "Fleet store operations that failed or timed out (each one opens the breaker), by operation",
            self.store_errors.clone(),
        );
        registry.register(
            "fleet_budget_reseeds",
            "Times this replica found the store empty (restart without persistence) and reseeded today's spending from the ledger",
            self.reseeds.clone(),
        );
        registry.register(
            "fleet_lease_takeovers",
            "Checkpoint leases taken over after their leader's lease lapsed without an answer",
            self.lease_takeovers.clone(),
        );
        registry.register(
            "fleet_coalesced_remote",
            "Checkpoint submits answered with the published answer of another replica's call",
            self.coalesced_remote.clone(),
        );
        registry.register(
            "fleet_status_invalidations",
            "Local status-cache copies dropped on a pub/sub message from another replica",
            self.status_invalidations.clone(),
        );
    }
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~65 s: the gateway's own overhead and LinkedIn-slow upstream calls alike.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 18,
    ))
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub upstream_duration: HistogramFamily,
    pub upstream_errors: Family<KindLabels, Counter>,
    /// Set at scrape time from the process's answer budget.
    pub upstream_buffered_bytes: Gauge,
    pub refusals: Family<RefusalLabels, Counter>,
    pub in_flight: Gauge,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub checkpoint_coalesced: Counter,
    pub idempotency_replays: Counter,
    pub idempotency_conflicts: Counter,
    pub idempotency_waits: Counter,
    pub status_cache_hits: Counter,
    pub status_cache_misses: Counter,
    pub status_cache_entries: Family<StatusLabels, Gauge>,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    pub rate_limit_tracked: Gauge,
    pub rate_limit_queued: Gauge,
    pub rate_limit_waited: Counter<f64, std::sync::atomic::AtomicU64>,
    pub credits_consumed: Family<ActionLabels, Counter>,
    pub action_labels: LabelCap,
    /// Only filled with `metrics.per_account = true` (one series per account: cardinality!).
    pub account_credits: Family<AccountLabels, Counter>,
    pub credits_unknown: Family<ClientLabels, Counter>,
    pub credits_reserved: Family<ClientLabels, Gauge>,
    pub budget_remaining: Family<ClientLabels, Gauge>,
    pub budget_shadow_refusals: Family<ClientLabels, Counter>,
    pub ledger_rows: Family<OutcomeLabels, Counter>,
    pub ledger_errors: Counter,
    /// The embedded ledger's file was deleted, replaced, truncated or overwritten under the
    /// running gateway (`reason`); counted once per detection (also in `ledger_errors`).
    pub ledger_file_lost: Family<ReasonLabels, Counter>,
    pub upstream_balance: Gauge,
    pub credits_drift: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("linkup_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by client, route and HTTP status (refusals included)",
            requests.clone(),
        );
        let request_duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Whole-request latency as the caller sees it",
            request_duration.clone(),
        );
        let upstream_duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_duration_seconds",
            "Upstream call latency, response body included",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream calls that failed, by kind (connect, reset, timeout, body, answer_budget)",
            upstream_errors.clone(),
        );
        let upstream_buffered_bytes = Gauge::default();
        registry.register(
            "upstream_buffered_bytes",
            "Bytes held by upstream answers being buffered or written to their callers (bounded by upstream.max_buffered_bytes)",
            upstream_buffered_bytes.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Requests the gateway refused or failed itself, by error code",
            refusals.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("in_flight", "Requests in flight", in_flight.clone());
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "SIGHUP config reloads, by result (ok, rejected)",
            config_reloads.clone(),
        );
        // prometheus-client appends `_total` to counters.
        let checkpoint_coalesced = Counter::default();
        registry.register(
            "checkpoint_coalesced",
            "Checkpoint submits answered with a copy of an identical in-flight upstream call",
            checkpoint_coalesced.clone(),
        );
        let idempotency_replays = Counter::default();
        registry.register(
            "idempotency_replays",
            "Repeated Idempotency-Key requests answered with the first one's stored answer",
            idempotency_replays.clone(),
        );
        let idempotency_conflicts = Counter::default();
        registry.register(
            "idempotency_conflicts",
            "Repeated Idempotency-Key requests refused (422 another request, 409 in flight or unknown outcome)",
            idempotency_conflicts.clone(),
        );
        let idempotency_waits = Counter::default();
        registry.register(
            "idempotency_waits",
            "Repeated Idempotency-Key requests that waited for their first one in flight",
            idempotency_waits.clone(),
        );
        let status_cache_hits = Counter::default();
        registry.register(
            "status_cache_hits",
            "Checkpoints answered from the status cache (account known to be connected)",
            status_cache_hits.clone(),
        );
        let status_cache_misses = Counter::default();
        registry.register(
            "status_cache_misses",
            "Checkpoints looked up in the status cache and passed on",
            status_cache_misses.clone(),
        );
        let status_cache_entries = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "status_cache_entries",
            "Accounts in the status cache, by remembered status (counted at scrape time)",
            status_cache_entries.clone(),
        );
        let credits_consumed = Family::<ActionLabels, Counter>::default();
        registry.register(
            "credits_consumed",
            "Credits the upstream reported in metadata.credits_consumed (ambiguous answers: the reserved cost), by client and action",
            credits_consumed.clone(),
        );
        let account_credits = Family::<AccountLabels, Counter>::default();
        registry.register(
            "account_credits_consumed",
            "Credits consumed per client and account (only with metrics.per_account = true)",
            account_credits.clone(),
        );
        let credits_unknown = Family::<ClientLabels, Counter>::default();
        registry.register(
            "credits_unknown",
            "Upstream answers without a numeric metadata.credits_consumed (recorded as 0)",
            credits_unknown.clone(),
        );
        let credits_reserved = Family::<ClientLabels, Gauge>::default();
        registry.register(
            "credits_reserved",
            "Credits reserved by requests in flight",
            credits_reserved.clone(),
        );
        let budget_remaining = Family::<ClientLabels, Gauge>::default();
        registry.register(
            "budget_remaining_credits",
            "What is left of a client's daily credit budget (UTC day)",
            budget_remaining.clone(),
        );
        let budget_shadow_refusals = Family::<ClientLabels, Counter>::default();
        registry.register(
            "budget_shadow_refusals",
            "Requests a shadow budget would have refused",
            budget_shadow_refusals.clone(),
        );
        let ledger_rows = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "ledger_rows",
            "Ledger rows written, by outcome (settled, cached, coalesced, ambiguous)",
            ledger_rows.clone(),
        );
        let ledger_errors = Counter::default();
        registry.register(
            "ledger_errors",
            "Ledger writes that failed (costly requests are refused until one succeeds)",
            ledger_errors.clone(),
        );
        let ledger_file_lost = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ledger_file_lost",
            "Times the ledger file was found deleted, replaced, truncated or overwritten under the running gateway, by reason (costly requests are refused and /readyz is not ready until a restart)",
            ledger_file_lost.clone(),
        );
        let upstream_balance = Gauge::default();
        registry.register(
            "upstream_balance_credits",
            "LinkupAPI's credit balance at the last reconciliation (GET /v2/credits)",
            upstream_balance.clone(),
        );
        let credits_drift = Gauge::default();
        registry.register(
            "credits_drift",
            "Credits the upstream charged minus credits the ledger recorded, since the gateway started",
            credits_drift.clone(),
        );
        let rate_limited = Family::<RateLimitedLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests over a rate limit, by client and reason (client, account, rule name, cooldown); shadow=true: counted, not refused",
            rate_limited.clone(),
        );
        let rate_limit_queued = Gauge::default();
        registry.register(
            "rate_limit_queued",
            "Requests waiting for their slot under an on_limit = \"delay\" rule",
            rate_limit_queued.clone(),
        );
        let rate_limit_waited = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "rate_limit_waited_seconds",
            "Seconds requests spent waiting for their slot under on_limit = \"delay\" rules",
            rate_limit_waited.clone(),
        );
        let rate_limit_tracked = Gauge::default();
        registry.register(
            "rate_limit_tracked_subjects",
            "Accounts and clients with a live rate-limit bucket (idle ones are evicted every minute)",
            rate_limit_tracked.clone(),
        );
        Metrics {
            rate_limited,
            rate_limit_tracked,
            rate_limit_queued,
            rate_limit_waited,
            credits_consumed,
            action_labels: LabelCap::default(),
            account_credits,
            credits_unknown,
            credits_reserved,
            budget_remaining,
            budget_shadow_refusals,
            ledger_rows,
            ledger_errors,
            ledger_file_lost,
            upstream_balance,
            credits_drift,
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            upstream_buffered_bytes,
            refusals,
            in_flight,
            config_reloads,
            checkpoint_coalesced,
            idempotency_replays,
            idempotency_conflicts,
            idempotency_waits,
            status_cache_hits,
            status_cache_misses,
            status_cache_entries,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_cap_turns_new_values_into_other_past_the_cap() {
        let cap = LabelCap::default();
        for i in 0..LabelCap::MAX {
            assert_eq!(&*cap.label(&Arc::from(format!("a{i}"))).0, format!("a{i}"));
        }
        assert_eq!(&*cap.label(&Arc::from("new")).0, "other");
        assert_eq!(
            &*cap.label(&Arc::from("a3")).0,
            "a3",
            "known values keep their label"
        );
    }
}
