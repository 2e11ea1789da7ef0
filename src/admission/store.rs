//! Admission by the fleet's shared store: the whole decision in one round trip (the fleet's
//! `admit` script: cooldown, account/rule limit, per-client limit and budget reservation, all
//! or nothing), and [`Fallback`], the `fleet.on_store_failure` policy around it.

use std::sync::Arc;
use std::time::Duration;

use super::{
    budget_refusal_message, cooldown_refusal, count, limit_message, limit_refusal, local,
    publish_standing, secs, Admission, Admitted, Decision, Passed, Reservation,
};
use crate::budgets::{now_ms, utc_day};
use crate::config::{ClientSettings, OnFailure};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::fleet::{self, AdmitRequest, BudgetCheck, Fleet, LimitCheck, Part, Unavailable};
use crate::limits::{ratelimit_item, Subject};
use crate::metrics::{ClientLabels, Label};
use crate::shared::Shared;
use crate::util::BoxFuture;

/// The fleet's Redis as the home of limits and budgets.
pub struct Store {
    fleet: Arc<Fleet>,
}

impl Store {
    pub fn new(fleet: Arc<Fleet>) -> Store {
        Store { fleet }
    }

    /// `Err(Unavailable)`: the store cannot be used; `Ok(Err(_))`: refused.
    async fn admit(
        &self,
        shared: &Shared,
        path: &str,
        ctx: &RequestContext,
        client: &ClientSettings,
        (cost, day): (u64, i64),
        paced: bool,
    ) -> Result<Result<Admitted, GatewayError>, Unavailable> {
        let limits = &shared.limits;
        let account = ctx.account_id.as_ref();
        let (limiter, shadow) = limits.for_request(path, ctx.action.as_deref());
        // This replica's own hold: set with the store's, and the only one when the upstream
        // RATE_LIMITED answer came while the store was down (the store never heard of it).
        let local_cooldown = account.and_then(|a| limits.cooldowns.remaining(a).map(|l| (a, l)));
        if let (Some((a, left)), false) = (local_cooldown, limits.default_shadow) {
            if !paced {
                count(shared, client, Arc::from("cooldown"), false);
            }
            return Ok(Err(cooldown_refusal(shared, a, left)));
        }
        let subject = match account {
            Some(a) => Subject::Account(a.clone()),
            None => Subject::Client(client.name.clone()),
        };
        let client_subject = Subject::Client(client.name.clone());
        let client_limiter = limits.clients.get(&client.name);
        let r = AdmitRequest {
            cooldown: account.map(|a| (&**a, limits.default_shadow)),
            limit: Some(LimitCheck {
                limiter,
                subject: &subject,
                shadow,
            }),
            client: client_limiter.map(|l| LimitCheck {
                limiter: l,
                subject: &client_subject,
                shadow: client.shadow,
            }),
            budget: Some(BudgetCheck {
                client: &client.name,
                cost,
                budget: client.daily_credit_budget,
                enforce: !client.shadow,
                day,
            }),
        };
        let admission = self.fleet.admit(&r).await?;
        let m = &shared.process.metrics;
        Ok(match admission {
            fleet::Admission::Allowed {
                limit,
                shadowed,
                standing,
                marker,
            } => {
                if shadowed.cooldown || local_cooldown.is_some() {
                    count(shared, client, Arc::from("cooldown"), true);
                    tracing::info!(account = ?account, shadow = true, "would refuse: upstream 429 cooldown");
                }
                if shadowed.limit {
                    count(shared, client, limiter.name.clone(), true);
                    tracing::info!(
                        shadow = true,
                        "would refuse: {}",
                        limit_message(limiter, account, client, Duration::ZERO)
                    );
                }
                if shadowed.client {
                    count(shared, client, Arc::from("client"), true);
                    tracing::info!(client = %client.name, shadow = true, "would refuse: client rate limit");
                }
                if shadowed.budget {
                    m.budget_shadow_refusals
                        .get_or_create(&ClientLabels {
                            client: Label(client.name.clone()),
                        })
                        .inc();
                    tracing::info!(client = %client.name, spent = standing.spent, reserved = standing.reserved, cost, shadow = true, "would refuse: daily credit budget");
                }
                publish_standing(&shared.process, client, standing);
                let passed: Passed = limit.map(|(remaining, reset)| {
                    (
                        limiter.policy.clone(),
                        ratelimit_item(limiter, remaining, reset),
                    )
                });
                Ok(Admitted {
                    passed,
                    reservation: Reservation::in_store(cost, day, self.fleet.clone(), marker),
                })
            }
            fleet::Admission::Refused {
                part,
                wait,
                standing,
            } => Err(match part {
                Part::Cooldown => {
                    if !paced {
                        count(shared, client, Arc::from("cooldown"), false);
                    }
                    let a = account.map(|a| &**a).unwrap_or("");
                    cooldown_refusal(shared, a, wait)
                }
                Part::Limit => {
                    if !paced {
                        count(shared, client, limiter.name.clone(), false);
                    }
                    limit_refusal(limiter, limit_message(limiter, account, client, wait), wait)
                }
                Part::Client => {
                    count(shared, client, Arc::from("client"), false);
                    let l = client_limiter.unwrap_or(limiter);
                    GatewayError::RateLimited {
                        message: format!(
                            "client `{}` is limited to {}; retry in {} s",
                            client.name,
                            l.quota,
                            secs(wait)
                        ),
                        retry_after: wait,
                        policy: Some(l.policy.clone()),
                        state: Some(ratelimit_item(l, 0, wait)),
                    }
                }
                Part::Budget => {
                    publish_standing(&shared.process, client, standing);
                    GatewayError::InsufficientCredits(budget_refusal_message(
                        client,
                        client.daily_credit_budget.unwrap_or(0),
                        standing,
                        cost,
                    ))
                }
            }),
        })
    }
}

/// `fleet.on_store_failure` around [`Store`]: while the store cannot be used, requests that
/// cost credits are refused (`deny`) or decided by this process's own state (`local`), and
/// every such request is counted in `linkup_gateway_fleet_fallbacks_total`.
pub struct Fallback {
    store: Arc<Store>,
}

impl Fallback {
    pub fn new(store: Store) -> Fallback {
        Fallback {
            store: Arc::new(store),
        }
    }
}

impl Admission for Fallback {
    fn admit(
        &self,
        shared: &Arc<Shared>,
        path: &str,
        ctx: &RequestContext,
        client: &Arc<ClientSettings>,
        paced: bool,
    ) -> Decision {
        let (store, shared) = (self.store.clone(), shared.clone());
        let (path, ctx, client) = (path.to_owned(), ctx.clone(), client.clone());
        Decision::Later(Box::pin(async move {
            let cost = shared.settings.costs.expected(&path, ctx.action.as_deref());
            let day = utc_day(now_ms());
            let fleet = &store.fleet;
            let decided = if fleet.is_up() {
                store
                    .admit(&shared, &path, &ctx, &client, (cost, day), paced)
                    .await
            } else {
                Err(Unavailable)
            };
            match decided {
                Ok(decision) => decision,
                Err(Unavailable) => {
                    if cost > 0 && fleet.budgets_on_failure == OnFailure::Deny {
                        // Refused before a local limit cell is taken for it.
                        fleet.fell_back("budgets", OnFailure::Deny);
                        return Err(GatewayError::StoreUnavailable(
                            "the shared budget store is unavailable and fleet.on_store_failure.budgets is \"deny\"; requests that cost credits are refused until it is back; retry shortly".into(),
                        ));
                    }
                    if cost > 0 && fleet.limits_on_failure == OnFailure::Deny {
                        fleet.fell_back("limits", OnFailure::Deny);
                        return Err(GatewayError::StoreUnavailable(
                            "the shared rate-limit store is unavailable and fleet.on_store_failure.limits is \"deny\"; retry shortly".into(),
                        ));
                    }
                    fleet.fell_back("limits", OnFailure::Local);
                    // The per-client limit was already checked per replica (client_limit).
                    let passed = local::check_limits(&shared, &path, &ctx, &client, paced)?;
                    if cost > 0 {
                        fleet.fell_back("budgets", OnFailure::Local);
                    }
                    local::reserve(&shared, &client, cost, day)?;
                    Ok(Admitted {
                        passed,
                        reservation: Reservation::in_process(cost, day),
                    })
                }
            }
        }))
    }

    fn hold(&self, account: &Arc<str>, cooldown: Duration) -> Option<BoxFuture<()>> {
        // Every replica holds it back; the caller's local hold covers a store outage.
        let (store, account) = (self.store.clone(), account.clone());
        Some(Box::pin(async move {
            let _ = store.fleet.hold(&account, cooldown).await;
        }))
    }
}
