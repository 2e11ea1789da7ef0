//! Reconciliation: every `ledger.reconcile_every` the gateway reads the upstream balance
//! (`GET /v2/credits`, free) and exports the drift between what the upstream charged and what
//! the ledger recorded. Drift comes from charges the gateway cannot see (webhook monitoring is
//! billed out of band), ambiguous answers, other users of the same key, and top-ups (negative).

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::server::Generation;
use crate::shared::Shared;

/// The upstream's credit balance (`data.credits` of `GET /v2/credits`).
pub async fn balance(shared: &Shared) -> Result<i64, String> {
    let (status, body) = shared
        .upstream
        .get(&shared.settings.upstream, "/v2/credits")
        .await?;
    if !status.is_success() {
        return Err(format!("GET /v2/credits answered {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("GET /v2/credits: not JSON: {e}"))?;
    v["data"]["credits"]
        .as_i64()
        .or_else(|| v["data"]["credits"].as_f64().map(|f| f as i64))
        .ok_or_else(|| "GET /v2/credits: no numeric data.credits".to_string())
}

pub async fn run(current: Arc<ArcSwap<Generation>>, mut stop: watch::Receiver<bool>) {
    let mut last: Option<(i64, u64)> = None;
    let mut drift: i64 = 0;
    loop {
        let every = current.load().shared.settings.ledger.reconcile_every;
        if every.is_zero() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let shared = current.load_full().shared.clone();
        let ledger = shared.process.ledger.clone();
        let recorded = match tokio::task::spawn_blocking(move || ledger.totals()).await {
            Ok(Ok((_, credits))) => credits,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reconcile: cannot read the ledger");
                continue;
            }
            Err(_) => continue,
        };
        let bal = match balance(&shared).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile: cannot read the upstream balance");
                continue;
            }
        };
        let m = &shared.process.metrics;
        m.upstream_balance.set(bal);
        if let Some((prev_bal, prev_recorded)) = last {
            let charged = prev_bal - bal;
            let seen = i64::try_from(recorded.saturating_sub(prev_recorded)).unwrap_or(i64::MAX);
            drift += charged - seen;
            m.credits_drift.set(drift);
            if charged == seen {
                tracing::info!(
                    balance = bal,
                    charged,
                    recorded = seen,
                    drift,
                    "reconciled credits"
                );
            } else {
                tracing::warn!(
                    balance = bal,
                    charged,
                    recorded = seen,
                    drift,
                    "credits drift: the upstream charged differently from what the ledger recorded"
                );
            }
        }
        last = Some((bal, recorded));
    }
}
