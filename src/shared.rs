//! State that outlives a request, built once and handed to the layers as plain `Arc`s.
//!
//! Two lifetimes: [`Process`] lives as long as the process (metrics, the in-flight count, the
//! drain flag, request ids); [`Shared`] is one config generation, rebuilt on SIGHUP and swapped
//! in atomically, so a request always sees one consistent config.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use crate::config::{AccountScope, ClientSettings, PathPattern, Settings};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::upstream::UpstreamClient;
use crate::util::RequestIds;

#[derive(Default)]
pub struct Process {
    pub metrics: Metrics,
    pub in_flight: AtomicUsize,
    pub draining: AtomicBool,
    pub request_ids: RequestIds,
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
        let clients = settings
            .clients
            .iter()
            .map(|c| (c.key_sha256, c.clone()))
            .collect::<HashMap<_, _>>();
        let anonymous = clients.is_empty().then(|| {
            Arc::new(ClientSettings {
                name: Arc::from("anonymous"),
                key_sha256: [0; 32],
                accounts: AccountScope::Any,
                paths: vec![PathPattern::new("/v2/*")],
                daily_credit_budget: None,
                requests_per_second: None,
                burst: 1,
                shadow: false,
            })
        });
        Shared {
            settings,
            process,
            clients,
            anonymous,
            upstream,
            limits,
        }
    }
}
