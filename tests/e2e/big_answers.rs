//! Large upstream answers against the process-wide budget of buffered answer bytes
//! (`upstream.max_buffered_bytes`, issue 14 item 10): past it an answer is refused with a 503,
//! counted, and still recorded in the ledger; the bytes come back when the answers are gone.

use std::sync::Arc;
use std::time::Duration;

use linkup_gateway::emulator::Faults;

use crate::common::*;

const BUDGET: u64 = 1024 * 1024;
const ANSWER: u64 = 600 * 1024;
const CALLS: usize = 6;

/// The next answer of a call, within a deadline (a missing one fails instead of hanging).
async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an answer within 30 s")
        .expect("an answer")
}

/// The value of an unlabelled or labelled sample in a /metrics text (0 when absent).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn big_answers_past_the_buffer_budget_are_refused_503_counted_and_all_recorded() {
    let h = Harness::start_with_upstream(&format!("max_buffered_bytes = {BUDGET}"), "").await;
    let account = h.connected_account("tok-big-answers").await;
    let charged_before = h.emu.stats().credits_charged;
    // Every answer for this account is 600 KB and stops half-way until released: the six
    // answers are in flight together by construction, and only one fits in 1 MB.
    h.emu.set_faults(Faults {
        big_answer_bytes: ANSWER,
        stall_big_answers: true,
        account_id: Some(account.clone()),
        ..Default::default()
    });
    let h = Arc::new(h);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..CALLS {
        let (h, tx, body) = (h.clone(), tx.clone(), action(&account, "get"));
        tasks.push(tokio::spawn(async move {
            let _ = tx.send(h.post("/v2/profiles", &body).await);
        }));
    }
    drop(tx);
    // Refused on their headers while the first one holds its 600 KB.
    for _ in 0..CALLS - 1 {
        let a = next(&mut rx).await;
        assert_eq!(
            (a.status, a.code().as_str(), a.source().as_str()),
            (503, "UPSTREAM_ANSWER_OVER_BUDGET", "gateway"),
            "{}",
            a.text()
        );
        assert_eq!(a.headers["retry-after"], "1");
        assert!(a.text().contains("may have acted"), "{}", a.text());
    }
    h.emu.release_stalled();
    let a = next(&mut rx).await;
    assert_eq!(
        a.status,
        200,
        "{}",
        a.text().chars().take(300).collect::<String>()
    );
    assert_eq!(a.body.len() as u64, ANSWER, "the whole answer");
    assert_eq!(a.json()["metadata"]["credits_consumed"], 1);
    for t in tasks {
        t.await.unwrap();
    }

    let metrics = h.admin("/metrics").await.text();
    let refused = (CALLS - 1) as u64;
    assert_eq!(
        sample(
            &metrics,
            r#"linkup_gateway_upstream_errors_total{kind="answer_budget"}"#
        ),
        refused,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"linkup_gateway_refusals_total{code="UPSTREAM_ANSWER_OVER_BUDGET"}"#
        ),
        refused,
        "{metrics}"
    );

    // Every call is in the ledger: the one answered settled with what it reported, the refused
    // ones ambiguous with their reserved cost (their credits_consumed was never read).
    let u = h.admin("/usage?by=action,outcome").await.json();
    let rows: Vec<_> = u["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "get")
        .cloned()
        .collect();
    let of = |outcome: &str| {
        rows.iter()
            .find(|r| r["outcome"] == outcome)
            .map(|r| (r["requests"].as_u64(), r["credits"].as_u64()))
    };
    assert_eq!(of("settled"), Some((Some(1), Some(1))), "{rows:?}");
    assert_eq!(
        of("ambiguous"),
        Some((Some(refused), Some(refused))),
        "{rows:?}"
    );
    assert_eq!(
        h.emu.stats().credits_charged - charged_before,
        CALLS as i64,
        "the upstream charged every call; the ledger has all of them"
    );

    // Once the answers are gone their bytes are given back (the last one is released by the
    // connection task after its last write: wait for it), and a big answer fits again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = h.admin("/metrics").await.text();
        if sample(&m, "linkup_gateway_upstream_buffered_bytes") == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget was not given back: {m}"
        );
        tokio::task::yield_now().await;
    }
    h.emu.set_faults(Faults {
        big_answer_bytes: ANSWER,
        account_id: Some(account.clone()),
        ..Default::default()
    });
    let a = h.post("/v2/profiles", &action(&account, "get")).await;
    assert_eq!((a.status, a.body.len() as u64), (200, ANSWER));

    let h = Arc::into_inner(h).expect("every task joined");
    h.gw.shutdown().await;
    h.emu.shutdown().await;
}
