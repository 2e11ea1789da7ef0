//! Admission: may a request that is about to be forwarded go, and what does it hold of its
//! client's budget? One decision per forwarded request, made by `account_limit` (which knows
//! account, action, client and cost), covering the upstream-429 cooldown, the account/rule
//! limit and the budget reservation; the per-client limit too where the state is shared.
//!
//! Two implementations, chosen once when the shared state of a config generation is built
//! ([`for_process`]):
//! - [`local::Local`]: this process's limiters and budgets, decided synchronously;
//! - [`store::Fallback`] over [`store::Store`]: the fleet's Redis (one round trip, all or
//!   nothing), with `fleet.on_store_failure` as the wrapper that falls back to
//!   [`local::Local`] (or refuses) while the store cannot be used, and counts it.
//!
//! The layers see only [`Admission`], [`Admitted`] and the [`Reservation`] that travels from
//! `account_limit` to `credits` as a request extension and is settled there with the charge.

pub mod local;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::budgets::Standing;
use crate::config::ClientSettings;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::fleet::Fleet;
use crate::limits::{ratelimit_item, Limiter};
use crate::metrics::{ClientLabels, Label, RateLimitedLabels};
use crate::shared::{Process, Shared};
use crate::util::BoxFuture;

/// A request that passed: the `RateLimit-Policy` and `RateLimit` items to add, if any.
pub type Passed = Option<(HeaderValue, HeaderValue)>;

/// What admission gives a request that may go.
pub struct Admitted {
    pub passed: Passed,
    /// Its budget reservation, settled by `credits` with what the call charged.
    pub reservation: Reservation,
}

/// An admission decision: at once (this process's state), or after a round trip.
pub enum Decision {
    Now(Result<Admitted, GatewayError>),
    Later(BoxFuture<Result<Admitted, GatewayError>>),
}

impl Decision {
    pub async fn wait(self) -> Result<Admitted, GatewayError> {
        match self {
            Decision::Now(r) => r,
            Decision::Later(f) => f.await,
        }
    }
}

/// The shared-state concern of admission (see the module docs).
pub trait Admission: Send + Sync + 'static {
    /// Decide a request that will be forwarded. `paced`: a limit or cooldown refusal is not
    /// counted (the caller waits for its slot and asks again).
    fn admit(
        &self,
        shared: &Arc<Shared>,
        path: &str,
        ctx: &RequestContext,
        client: &Arc<ClientSettings>,
        paced: bool,
    ) -> Decision;

    /// LinkupAPI rate limited `account`: hold it back for `cooldown` wherever this state is
    /// shared (the caller holds it back in this process too). `None`: nothing to wait for.
    fn hold(&self, account: &Arc<str>, cooldown: Duration) -> Option<BoxFuture<()>>;
}

/// The admission of a process: the fleet's store with its failure policy when fleet mode is
/// on, else the process's own state.
pub fn for_process(process: &Process) -> Arc<dyn Admission> {
    match &process.fleet {
        Some(fleet) => Arc::new(store::Fallback::new(store::Store::new(fleet.clone()))),
        None => Arc::new(local::Local),
    }
}

/// A request's hold on its client's budget for the day, wherever it was taken.
#[derive(Clone)]
pub struct Reservation {
    /// The expected cost reserved.
    pub cost: u64,
    /// The UTC day (days since the epoch) it was reserved for.
    pub day: i64,
    home: Home,
}

#[derive(Clone)]
enum Home {
    /// This process's budgets.
    Process,
    /// The fleet's store, under the marker value it had then: the settle frees the
    /// reservation only if the store still has it (not reseeded since).
    Store { fleet: Arc<Fleet>, marker: Arc<str> },
}

impl Reservation {
    pub(crate) fn in_process(cost: u64, day: i64) -> Reservation {
        Reservation {
            cost,
            day,
            home: Home::Process,
        }
    }

    pub(crate) fn in_store(
        cost: u64,
        day: i64,
        fleet: Arc<Fleet>,
        marker: Arc<str>,
    ) -> Reservation {
        Reservation {
            cost,
            day,
            home: Home::Store { fleet, marker },
        }
    }

    /// Replace the reservation by what was charged (0: give it back): in the store (off the
    /// caller's path, retried while the store is down) or in the process's budgets; the
    /// budget gauges follow.
    pub fn settle(&self, process: &Arc<Process>, client: &Arc<ClientSettings>, charged: u64) {
        match &self.home {
            Home::Store { fleet, marker } => {
                let (process, gauges_client) = (process.clone(), client.clone());
                fleet.settle_eventually(
                    client.name.clone(),
                    self.day,
                    self.cost,
                    charged,
                    marker.clone(),
                    move |s| {
                        if let Some(s) = s {
                            publish_standing(&process, &gauges_client, s);
                        }
                    },
                );
            }
            Home::Process => {
                process
                    .budgets
                    .settle(&client.name, self.cost, charged, self.day);
                publish_budget(process, client, self.day);
            }
        }
    }
}

/// Set the budget gauges from this process's standing of a client.
pub(crate) fn publish_budget(process: &Process, client: &ClientSettings, day: i64) {
    publish_standing(process, client, process.budgets.standing(&client.name, day));
}

/// Set the budget gauges from a client's standing (local, or the fleet store's).
pub(crate) fn publish_standing(process: &Process, client: &ClientSettings, standing: Standing) {
    let labels = ClientLabels {
        client: Label(client.name.clone()),
    };
    let m = &process.metrics;
    m.credits_reserved
        .get_or_create(&labels)
        .set(i64::try_from(standing.reserved).unwrap_or(i64::MAX));
    if let Some(budget) = client.daily_credit_budget {
        let left = budget.saturating_sub(standing.spent.saturating_add(standing.reserved));
        m.budget_remaining
            .get_or_create(&labels)
            .set(i64::try_from(left).unwrap_or(i64::MAX));
    }
}

/// Whole seconds for `Retry-After` and messages, rounded up, never 0.
pub(crate) fn secs(d: Duration) -> u128 {
    d.as_millis().div_ceil(1000).max(1)
}

/// Count a rate-limit refusal (or, `shadow`, one that would have been).
pub(crate) fn count(shared: &Shared, client: &ClientSettings, reason: Arc<str>, shadow: bool) {
    shared
        .process
        .metrics
        .rate_limited
        .get_or_create(&RateLimitedLabels {
            client: Label(client.name.clone()),
            reason: Label(reason),
            shadow,
        })
        .inc();
}

pub(crate) fn cooldown_refusal(shared: &Shared, account: &str, left: Duration) -> GatewayError {
    GatewayError::RateLimited {
        message: format!(
            "account {account} was rate limited by LinkupAPI and is held back for {} s; retry in {} s",
            shared.limits.cooldown.as_secs(),
            secs(left)
        ),
        retry_after: left,
        policy: None,
        state: None,
    }
}

pub(crate) fn limit_message(
    limiter: &Limiter,
    account: Option<&Arc<str>>,
    client: &ClientSettings,
    wait: Duration,
) -> String {
    let who = match account {
        Some(a) => format!("account {a}"),
        None => format!("client `{}` (requests without an account)", client.name),
    };
    let rule = match &*limiter.name {
        "account" => String::new(),
        name => format!(" by rule `{name}`"),
    };
    format!(
        "{who} is limited to {}{rule}; retry in {} s",
        limiter.quota,
        secs(wait)
    )
}

pub(crate) fn limit_refusal(limiter: &Limiter, message: String, wait: Duration) -> GatewayError {
    GatewayError::RateLimited {
        message,
        retry_after: wait,
        policy: Some(limiter.policy.clone()),
        state: Some(ratelimit_item(limiter, 0, wait)),
    }
}

/// The refusal of a request over its client's daily budget.
pub(crate) fn budget_refusal_message(
    client: &ClientSettings,
    budget: u64,
    standing: Standing,
    cost: u64,
) -> String {
    format!(
        "client `{}` has a daily budget of {budget} credits; {} spent and {} reserved today, and this request would cost {cost}",
        client.name, standing.spent, standing.reserved
    )
}
