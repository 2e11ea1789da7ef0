//! Idempotency-Key end to end: a retried action reaches LinkupAPI once.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use linkup_gateway::emulator::{FaultMode, Faults};

use crate::common::*;

const OTHER_KEY: &str = "lgw_other_virtual_key_DO_NOT_LEAK_77aa";

fn other_client() -> String {
    format!(
        "[[clients]]\nname = \"other\"\nkey_sha256 = \"{}\"\n",
        sha(OTHER_KEY)
    )
}

fn send(account: &str) -> String {
    format!(r#"{{"account_id":"{account}","action":"send","params":{{"text":"hi"}}}}"#)
}

fn keyed(h: &Harness, key: &str, idem: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(h.url("/v2/messages"))
        .header("x-api-key", key)
        .header("content-type", "application/json");
    if let Some(k) = idem {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

fn sends(h: &Harness) -> u64 {
    h.emu
        .stats()
        .calls_by_path
        .get("POST /v2/messages")
        .copied()
        .unwrap_or(0)
}

async fn usage_rows(h: &Harness) -> Vec<serde_json::Value> {
    h.admin("/usage?by=client,outcome").await.json()["rows"]
        .as_array()
        .unwrap()
        .clone()
}

fn row<'a>(
    rows: &'a [serde_json::Value],
    client: &str,
    outcome: &str,
) -> Option<&'a serde_json::Value> {
    rows.iter()
        .find(|r| r["client"] == client && r["outcome"] == outcome)
}

#[tokio::test]
async fn a_client_that_times_out_and_retries_sends_once_and_gets_the_first_answer() {
    let h = Harness::start().await;
    let account = h.connected_account("tok-idem-retry").await;
    h.emu.set_faults(Faults {
        latency_ms: 1_000,
        account_id: Some(account.clone()),
        ..Default::default()
    });
    let body = send(&account);
    // The caller gives up after 0.3 s and retries with the same key, until it has an answer.
    let mut answer = None;
    let mut attempts = 0;
    while answer.is_none() {
        attempts += 1;
        assert!(attempts <= 20, "never answered");
        let req = keyed(&h, ALPHA_KEY, Some("send-42"), &body);
        if let Ok(a) = tokio::time::timeout(Duration::from_millis(300), h.send(req)).await {
            answer = Some(a);
        }
    }
    let a = answer.unwrap();
    assert!(attempts >= 3, "the first attempts timed out ({attempts})");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["idempotent-replayed"], "true");
    assert_eq!(a.json()["success"], true);
    assert_eq!(sends(&h), 1, "one send upstream");
    // One credit-bearing row (the first attempt, whose caller had gone), the rest free.
    let rows = usage_rows(&h).await;
    let settled = row(&rows, "alpha", "settled").unwrap();
    assert!(settled["credits"].as_u64().unwrap() > 0, "{rows:?}");
    let replayed = row(&rows, "alpha", "replayed").unwrap();
    assert_eq!(replayed["credits"], 0);
    let m = h.admin("/metrics").await.text();
    assert!(
        m.contains("linkup_gateway_idempotency_replays_total 1"),
        "{m}"
    );
}

#[tokio::test]
async fn repeats_replay_conflicts_are_refused_and_two_clients_never_meet() {
    let h = Harness::start_with("", &other_client()).await;
    let account = h.connected_account("tok-idem-repeat").await;
    let body = send(&account);
    let first = h.send(keyed(&h, ALPHA_KEY, Some("k-1"), &body)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let again = h.send(keyed(&h, ALPHA_KEY, Some("k-1"), &body)).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body, "the very answer, replayed");
    assert_eq!(again.headers["content-type"], first.headers["content-type"]);
    assert_eq!(sends(&h), 1);
    // Same key, another body: 422, nothing forwarded.
    let other_body = body.replace("hi", "bye");
    let conflict = h.send(keyed(&h, ALPHA_KEY, Some("k-1"), &other_body)).await;
    assert_eq!(
        (
            conflict.status,
            conflict.code().as_str(),
            conflict.source().as_str()
        ),
        (422, "IDEMPOTENCY_KEY_REUSED", "gateway")
    );
    assert_eq!(sends(&h), 1);
    // Another client's same key is its own request.
    let theirs = h.send(keyed(&h, OTHER_KEY, Some("k-1"), &body)).await;
    assert_eq!(theirs.status, 200);
    assert!(!theirs.headers.contains_key("idempotent-replayed"));
    assert_eq!(sends(&h), 2);
    // No key: every request goes; a bad key is 400 and goes nowhere.
    h.send(keyed(&h, ALPHA_KEY, None, &body)).await;
    assert_eq!(sends(&h), 3);
    let bad = h
        .send(keyed(&h, ALPHA_KEY, Some(&"x".repeat(300)), &body))
        .await;
    assert_eq!((bad.status, bad.code().as_str()), (400, "INVALID_PARAMS"));
    assert_eq!(sends(&h), 3);
    // An upstream refusal that cost nothing is not kept: the retry goes again.
    let unknown_account = send("no-such-account");
    let a = h
        .send(keyed(&h, ALPHA_KEY, Some("k-404"), &unknown_account))
        .await;
    assert_eq!(a.status, 404);
    let b = h
        .send(keyed(&h, ALPHA_KEY, Some("k-404"), &unknown_account))
        .await;
    assert_eq!(b.status, 404);
    assert!(!b.headers.contains_key("idempotent-replayed"));
    assert_eq!(sends(&h), 5);
}

#[tokio::test]
async fn an_unknown_outcome_is_never_sent_again() {
    let h = Harness::start().await;
    let account = h.connected_account("tok-idem-reset").await;
    h.emu.set_faults(Faults {
        mode: FaultMode::Reset,
        count: 1,
        account_id: Some(account.clone()),
        ..Default::default()
    });
    let body = send(&account);
    let first = h.send(keyed(&h, ALPHA_KEY, Some("k-reset"), &body)).await;
    assert_eq!(first.status, 502, "{}", first.text());
    assert_eq!(sends(&h), 1);
    let retry = h.send(keyed(&h, ALPHA_KEY, Some("k-reset"), &body)).await;
    assert_eq!(
        (retry.status, retry.code().as_str()),
        (409, "IDEMPOTENCY_OUTCOME_UNKNOWN"),
        "{}",
        retry.text()
    );
    assert!(
        retry.text().contains("new Idempotency-Key"),
        "{}",
        retry.text()
    );
    assert_eq!(sends(&h), 1, "not sent again");
    // A new key sends it.
    let fresh = h.send(keyed(&h, ALPHA_KEY, Some("k-reset-2"), &body)).await;
    assert_eq!(fresh.status, 200);
    assert_eq!(sends(&h), 2);
}

#[tokio::test]
async fn a_stored_answer_is_replayed_after_a_restart() {
    let emu = start_emulator(UPSTREAM_KEY).await;
    let h = Harness::start_against(emu, "", "").await;
    let account = h.connected_account("tok-idem-restart").await;
    let body = send(&account);
    let first = h.send(keyed(&h, ALPHA_KEY, Some("k-restart"), &body)).await;
    assert_eq!(first.status, 200);
    let Harness { emu, gw, dir, http } = h;
    gw.shutdown().await;
    let settings = linkup_gateway::config::load(&dir.path().join("gateway.toml")).unwrap();
    let gw = linkup_gateway::server::Gateway::start(settings)
        .await
        .unwrap();
    let h = Harness { emu, gw, dir, http };
    let again = h.send(keyed(&h, ALPHA_KEY, Some("k-restart"), &body)).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(sends(&h), 1);
}

#[tokio::test]
async fn required_keys_and_a_flood_of_distinct_keys_stays_bounded() {
    let h = Harness::start_with(
        "",
        "[idempotency]\nmax_keys = 100\nrequire = [{ path = \"/v2/messages\", action = \"send\" }]\n",
    )
    .await;
    let account = h.connected_account("tok-idem-flood").await;
    let body = send(&account);
    let missing = h.send(keyed(&h, ALPHA_KEY, None, &body)).await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (400, "INVALID_PARAMS")
    );
    assert!(
        missing.text().contains("Idempotency-Key"),
        "{}",
        missing.text()
    );
    assert_eq!(sends(&h), 0);
    // Another action on the path needs none.
    let read = format!(r#"{{"account_id":"{account}","action":"list_inbox"}}"#);
    assert_eq!(h.send(keyed(&h, ALPHA_KEY, None, &read)).await.status, 200);
    for i in 0..3_000 {
        let a = h
            .send(keyed(&h, ALPHA_KEY, Some(&format!("flood-{i}")), &read))
            .await;
        assert_eq!(a.status, 200);
    }
    // Purged every 1,024 new keys (and each minute): never far above max_keys.
    let kept = h.gw.process.idempotency.keys_kept().await;
    assert!(kept <= 100 + 1024, "{kept} keys kept");
}
