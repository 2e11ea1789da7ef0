//! Admission by this process's own state: its limiters (governor GCRA per account or client,
//! per rule), its upstream-429 holds and its daily budgets. Synchronous: nothing is awaited.

use std::sync::Arc;
use std::time::Duration;

use super::{
    budget_refusal_message, cooldown_refusal, count, limit_message, limit_refusal, publish_budget,
    Admission, Admitted, Decision, Passed, Reservation,
};
use crate::budgets::{now_ms, utc_day, Standing};
use crate::config::ClientSettings;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::limits::{ratelimit_item, Subject, Verdict};
use crate::metrics::{ClientLabels, Label};
use crate::shared::Shared;
use crate::util::BoxFuture;

/// The process's own limiters and budgets (embedded mode).
pub struct Local;

impl Admission for Local {
    fn admit(
        &self,
        shared: &Arc<Shared>,
        path: &str,
        ctx: &RequestContext,
        client: &Arc<ClientSettings>,
        paced: bool,
    ) -> Decision {
        Decision::Now(admit(shared, path, ctx, client, paced))
    }

    fn hold(&self, _account: &Arc<str>, _cooldown: Duration) -> Option<BoxFuture<()>> {
        None
    }
}

/// Limits, then the budget: a request refused by a limit holds no reservation.
pub(crate) fn admit(
    shared: &Shared,
    path: &str,
    ctx: &RequestContext,
    client: &Arc<ClientSettings>,
    paced: bool,
) -> Result<Admitted, GatewayError> {
    let passed = check_limits(shared, path, ctx, client, paced)?;
    let cost = shared.settings.costs.expected(path, ctx.action.as_deref());
    let day = utc_day(now_ms());
    reserve(shared, client, cost, day)?;
    Ok(Admitted {
        passed,
        reservation: Reservation::in_process(cost, day),
    })
}

/// The per-process limit check: the upstream-429 cooldown, then the account's (or the
/// client's, for requests without an account) limit of the first matching rule.
pub(crate) fn check_limits(
    shared: &Shared,
    path: &str,
    ctx: &RequestContext,
    client: &ClientSettings,
    paced: bool,
) -> Result<Passed, GatewayError> {
    let limits = &shared.limits;
    let account = ctx.account_id.as_ref();
    let (limiter, shadow) = limits.for_request(path, ctx.action.as_deref());
    if let Some(a) = account {
        if let Some(left) = limits.cooldowns.remaining(a) {
            if paced && !limits.default_shadow {
                // A paced request waits this out; only a final refusal is counted.
                return Err(cooldown_refusal(shared, a, left));
            }
            count(shared, client, Arc::from("cooldown"), limits.default_shadow);
            if limits.default_shadow {
                tracing::info!(account = %a, shadow = true, "would refuse: upstream 429 cooldown");
            } else {
                return Err(cooldown_refusal(shared, a, left));
            }
        }
    }
    let subject = match account {
        Some(a) => Subject::Account(a.clone()),
        None => Subject::Client(client.name.clone()),
    };
    match limiter.check(&subject) {
        Verdict::Allow { remaining, reset } => Ok(Some((
            limiter.policy.clone(),
            ratelimit_item(limiter, remaining, reset),
        ))),
        Verdict::Deny { wait } => {
            let message = limit_message(limiter, account, client, wait);
            if paced && !shadow {
                return Err(limit_refusal(limiter, message, wait));
            }
            count(shared, client, limiter.name.clone(), shadow);
            if shadow {
                tracing::info!(shadow = true, "would refuse: {message}");
                Ok(None)
            } else {
                Err(limit_refusal(limiter, message, wait))
            }
        }
    }
}

/// Reserve `cost` of the client's budget for `day` in this process (a shadow client's is
/// reserved and its refusal only counted and logged); the budget gauges follow.
pub(crate) fn reserve(
    shared: &Shared,
    client: &ClientSettings,
    cost: u64,
    day: i64,
) -> Result<(), GatewayError> {
    let process = &shared.process;
    let reserved = process.budgets.reserve(
        &client.name,
        cost,
        client.daily_credit_budget,
        !client.shadow,
        day,
    );
    if let Err(e) = reserved {
        let standing = Standing {
            spent: e.spent,
            reserved: e.reserved,
        };
        let message = budget_refusal_message(client, e.budget, standing, cost);
        if !client.shadow {
            return Err(GatewayError::InsufficientCredits(message));
        }
        process
            .metrics
            .budget_shadow_refusals
            .get_or_create(&ClientLabels {
                client: Label(client.name.clone()),
            })
            .inc();
        tracing::info!(shadow = true, "would refuse: {message}");
    }
    publish_budget(process, client, day);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::context::Route;

    #[test]
    fn limits_first_then_the_budget_and_a_settle_replaces_the_reservation() {
        let s = Arc::new(crate::shared::for_tests(&format!(
            "[[clients]]\nname = \"crm\"\nkey_sha256 = \"{}\"\ndaily_credit_budget = 3\n\
             [rate_limit]\nper_account = \"2/min\"\nburst = 2\n",
            "ab".repeat(32)
        )));
        let client = s.settings.clients[0].clone();
        let ctx = |a: &str| RequestContext {
            route: Route::Profiles,
            action: None,
            account_id: Some(Arc::from(a)),
            code: None,
        };
        let standing = || s.process.budgets.standing(&client.name, utc_day(now_ms()));
        let cost = s.settings.costs.expected("/v2/profiles", None);
        assert!(cost > 0);

        let first = admit(&s, "/v2/profiles", &ctx("a"), &client, false).unwrap();
        assert_eq!(first.reservation.cost, cost);
        assert!(
            first.passed.is_some(),
            "the RateLimit headers of a passed request"
        );
        assert_eq!(standing().reserved, cost);

        // Account `a`'s burst of 2 is spent; the refused request holds no reservation.
        admit(&s, "/v2/profiles", &ctx("a"), &client, false).unwrap();
        let e = admit(&s, "/v2/profiles", &ctx("a"), &client, false)
            .err()
            .unwrap();
        assert_eq!(e.code(), "RATE_LIMITED");
        assert_eq!(standing().reserved, 2 * cost);

        // Another account passes the limit and takes the third credit; a fourth is over the
        // budget, and holds nothing either.
        assert_eq!(cost, 1, "the default cost of /v2/profiles");
        admit(&s, "/v2/profiles", &ctx("b"), &client, false).unwrap();
        let e = admit(&s, "/v2/profiles", &ctx("c"), &client, false)
            .err()
            .unwrap();
        assert_eq!(e.code(), "INSUFFICIENT_CREDITS");
        assert_eq!(standing().reserved, 3);

        // Settled with what was charged: the first's credit is spent, the rest stay reserved.
        first.reservation.settle(&s.process, &client, 1);
        assert_eq!((standing().spent, standing().reserved), (1, 2));
    }
}
