//! State that outlives a request, built once and handed to the layers as plain `Arc`s.
//!
//! Two lifetimes: [`Process`] lives as long as the process (metrics, the in-flight count, the
//! drain flag, request ids); [`Shared`] is one config generation, rebuilt on SIGHUP and swapped
//! in atomically, so a request always sees one consistent config.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use crate::budgets::Budgets;
use crate::config::{AccountScope, ClientSettings, PathPattern, Settings};
use crate::fleet::Fleet;
use crate::idempotency::IdempotencyStore;
use crate::layers::coalesce::Flights;
use crate::layers::credits::CreditState;
use crate::layers::status_cache::{StatusStore, StatusStoreSlot};
use crate::ledger::{Ledger, MemoryLedger};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::upstream::{AnswerBudget, UpstreamClient};
use crate::util::RequestIds;
use crate::webhook_owners::WebhookOwners;

pub struct Process {
    pub metrics: Metrics,
    pub in_flight: AtomicUsize,
    pub draining: AtomicBool,
    pub request_ids: RequestIds,
    /// The status cache outlives config generations (a reload must not forget which accounts
    /// are connected); each generation takes it from here.
    pub status_store: StatusStoreSlot,
    /// Checkpoint calls in flight, by account: process-wide, so a reload does not split them.
    pub checkpoint_flights: Flights,
    /// The durable credit ledger (one per process; `ledger.path` changes need a restart).
    pub ledger: Arc<dyn Ledger>,
    /// Daily budgets: spent and reserved credits per client, kept across reloads.
    pub budgets: Budgets,
    pub credit_state: CreditState,
    /// Fleet mode: limits, budgets, the status cache and coalescing shared through Redis.
    /// `None`: embedded mode, nothing of fleet mode runs.
    pub fleet: Option<Arc<Fleet>>,
    /// Which account each webhook belongs to, learned from answers (scoped clients' webhook
    /// routes are checked against it).
    pub webhook_owners: WebhookOwners,
    /// Idempotency-Key fates: in Redis (fleet) or a database beside the embedded ledger
    /// (`Gateway::start`), else in memory.
    pub idempotency: Arc<IdempotencyStore>,
    /// Bytes held by buffered upstream answers, across config generations (an answer of the
    /// previous generation still holds its bytes after a reload).
    pub answer_budget: Arc<AnswerBudget>,
    /// Woken when draining starts (requests waiting for a paced slot look at the grace).
    pub drain_started: tokio::sync::Notify,
}

impl Default for Process {
    /// A process with an in-memory ledger (unit tests, benches).
    fn default() -> Self {
        Process::with_ledger(Arc::new(MemoryLedger::default()))
    }
}

impl Process {
    pub fn with_ledger(ledger: Arc<dyn Ledger>) -> Process {
        Process::with_fleet(ledger, None)
    }

    /// A process in fleet mode when `fleet` is given (from `Fleet::connect`); its metrics join
    /// the process's registry.
    pub fn with_fleet(ledger: Arc<dyn Ledger>, fleet: Option<Arc<Fleet>>) -> Process {
        let mut metrics = Metrics::default();
        if let Some(f) = &fleet {
            f.metrics.register(&mut metrics.registry);
        }
        Process {
            metrics,
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            request_ids: RequestIds::default(),
            status_store: StatusStoreSlot::with_fleet(fleet.clone()),
            checkpoint_flights: Flights::default(),
            ledger,
            budgets: Budgets::default(),
            credit_state: CreditState::default(),
            fleet,
            webhook_owners: WebhookOwners::default(),
            idempotency: Arc::new(IdempotencyStore::in_memory()),
            drain_started: tokio::sync::Notify::new(),
            answer_budget: Arc::new(AnswerBudget::default()),
        }
    }
}

pub struct Shared {
    pub settings: Arc<Settings>,
    pub process: Arc<Process>,
    /// Virtual keys by SHA-256. Empty map + loopback listener = open local mode.
    pub clients: HashMap<[u8; 32], Arc<ClientSettings>>,
    /// The caller identity used when no `[[clients]]` are configured (loopback only).
    pub anonymous: Option<Arc<ClientSettings>>,
    pub upstream: UpstreamClient,
    /// Rate limits; their buckets carry over to the next generation where unchanged.
    pub limits: Limits,
    /// `None` when `status_cache.enabled = false`.
    pub status_store: Option<Arc<StatusStore>>,
    /// Limits and budget reservations of forwarded requests: the process's own, or the
    /// fleet's store with its failure policy; chosen here, once.
    pub admission: Arc<dyn crate::admission::Admission>,
}

impl Shared {
    pub fn new(settings: Arc<Settings>, process: Arc<Process>, upstream: UpstreamClient) -> Shared {
        Self::next(settings, process, upstream, None)
    }

    /// A new generation after `previous` (SIGHUP): unchanged limits keep their buckets.
    pub fn next(
        settings: Arc<Settings>,
        process: Arc<Process>,
        upstream: UpstreamClient,
        previous: Option<&Shared>,
    ) -> Shared {
        let limits = Limits::build(&settings, previous.map(|p| &p.limits));
        let status_store = process.status_store.for_settings(&settings.status_cache);
        let clients = settings
            .clients
            .iter()
            .flat_map(|c| c.keys.iter().map(|k| (k.sha256, c.clone())))
            .collect::<HashMap<_, _>>();
        // Open local mode only when no client exists at all (certificate-only clients count).
        let anonymous = settings.clients.is_empty().then(|| {
            Arc::new(ClientSettings {
                name: Arc::from("anonymous"),
                keys: Vec::new(),
                cert_subject: None,
                accounts: AccountScope::Any,
                // Cannot fail; if it did, the anonymous client would be refused everything.
                paths: PathPattern::new("/v2/*").into_iter().collect(),
                daily_credit_budget: None,
                requests_per_second: None,
                burst: 1,
                shadow: false,
            })
        });
        let admission = crate::admission::for_process(&process);
        Shared {
            settings,
            process,
            clients,
            anonymous,
            upstream,
            limits,
            status_store,
            admission,
        }
    }
}

/// Unit tests of the layers: one generation built from `extra` config (after an `[upstream]`
/// table that needs no network), with an in-memory ledger.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn for_tests(extra: &str) -> Shared {
    let text = format!("[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n{extra}");
    let settings = crate::config::load_str(&text, &[("K".into(), "k".into())], None).unwrap();
    let upstream = UpstreamClient::new(&settings.upstream, 0).unwrap();
    Shared::new(Arc::new(settings), Arc::new(Process::default()), upstream)
}
