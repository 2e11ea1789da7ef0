//! Checkpoint coalescing and the connected-status cache, end to end against the emulator with
//! injected latency. Latency only keeps an upstream call open; every ordering a test relies on
//! is waited for as a condition (emulator in-flight count, the gateway's flight map), and no
//! test asserts a duration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use linkup_gateway::emulator::Faults;
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// Per-account limits out of the way: these tests are about what reaches the upstream.
const NO_LIMITS: &str = "[rate_limit]\nper_account = \"1000/sec\"\nburst = 1000\n";
const SLOW: &str = "request_timeout = \"30s\"";

fn checkpoint(account: &str, code: Option<&str>) -> String {
    match code {
        Some(c) => format!(r#"{{"account_id":"{account}","code":"{c}"}}"#),
        None => format!(r#"{{"account_id":"{account}"}}"#),
    }
}

/// An account waiting for its 2FA (`code_challenge` or `app_challenge`), logged in through
/// the gateway (which remembers it as `checkpoint_required`).
async fn pending(h: &Harness, email: &str, challenge: &str) -> String {
    let a = h
        .post(
            "/v2/login",
            &format!(
                r#"{{"platform":"linkedin","email":"{email}","password":"p","challenge_type":"{challenge}"}}"#
            ),
        )
        .await;
    assert_eq!(a.json()["data"]["status"], "checkpoint_required");
    a.json()["data"]["account_id"].as_str().unwrap().to_owned()
}

/// Every upstream call for `account` takes `ms` (it only keeps the call open long enough for
/// the others to arrive; nothing waits for it to pass).
fn slow_upstream(h: &Harness, account: &str, ms: u64) {
    h.emu.set_faults(Faults {
        latency_ms: ms,
        account_id: Some(account.to_owned()),
        ..Default::default()
    });
}

/// Waits for a condition the test cannot be signalled about (another process's counters).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for _ in 0..15_000 {
        if cond() {
            return;
        }
        tick.tick().await;
    }
    panic!("gave up waiting for {what}");
}

fn cached(a: &Answer) -> bool {
    a.headers.get("x-gateway-cache").is_some_and(|v| v == "hit")
}

fn coalesced(a: &Answer) -> bool {
    a.headers
        .get("x-gateway-coalesced")
        .is_some_and(|v| v == "true")
}

fn checkpoint_calls(h: &Harness, account: &str) -> u64 {
    h.emu
        .stats()
        .checkpoint_calls_by_account
        .get(account)
        .copied()
        .unwrap_or(0)
}

async fn metrics(h: &Harness) -> String {
    String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap()
}

async fn purge(h: &Harness, account: &str) -> u16 {
    let req = Request::delete(h.admin_url(&format!("/cache/accounts/{account}")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    h.send(req).await.status
}

#[tokio::test]
async fn a_thousand_identical_submits_make_one_upstream_call_and_cost_one_credit() {
    let h = Harness::start_with(SLOW, NO_LIMITS).await;
    let id = pending(&h, "storm@x.io", "code_challenge").await;
    slow_upstream(&h, &id, 3_000);
    let before = h.emu.stats();
    // h2c, 125 streams on each of 8 connections (the gateway allows 256 per connection).
    let clients: Vec<Client<HttpConnector, Full<Bytes>>> = (0..8)
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http()
        })
        .collect();
    let body = Bytes::from(checkpoint(&id, Some("123456")));
    let tasks: Vec<_> = (0..1_000)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            let req = Request::post(h.url("/v2/checkpoint"))
                .header("x-api-key", ALPHA_KEY)
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .unwrap();
            tokio::spawn(async move {
                let (parts, body) = c.request(req).await.unwrap().into_parts();
                Answer {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: body.collect().await.unwrap().to_bytes(),
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }

    let s = h.emu.stats();
    assert_eq!(checkpoint_calls(&h, &id), 1, "one upstream call");
    assert_eq!(s.credits_charged - before.credits_charged, 1, "one credit");
    let first = &answers[0];
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.json()["data"]["status"], "connected");
    assert_eq!(first.json()["metadata"]["credits_consumed"], 1);
    for a in &answers {
        assert_eq!(
            (a.status, &a.body),
            (200, &first.body),
            "every caller the same answer"
        );
    }
    assert_eq!(answers.iter().filter(|a| coalesced(a)).count(), 999);
    assert!(answers.iter().all(|a| !cached(a)));
    let m = metrics(&h).await;
    assert!(
        m.contains("linkup_gateway_checkpoint_coalesced_total 999"),
        "{m}"
    );
    assert!(h.gw.process.checkpoint_flights.is_empty());
}

#[tokio::test]
async fn the_leader_hangs_up_and_the_followers_still_get_the_answer() {
    let h = Arc::new(Harness::start_with(SLOW, NO_LIMITS).await);
    let id = pending(&h, "leader@x.io", "code_challenge").await;
    slow_upstream(&h, &id, 3_000);
    let before = h.emu.stats();
    let process = h.gw.process.clone();

    // The first caller, on a raw connection it can drop mid-request.
    let body = checkpoint(&id, Some("123456"));
    let mut leader = tokio::net::TcpStream::connect(h.gw.data_addr)
        .await
        .unwrap();
    let head = format!(
        "POST /v2/checkpoint HTTP/1.1\r\nhost: gw\r\nx-api-key: {ALPHA_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    leader.write_all(head.as_bytes()).await.unwrap();
    until("the leader's upstream call", || {
        h.emu.stats().in_flight == 1
    })
    .await;

    let followers: Vec<_> = (0..5)
        .map(|_| {
            let (h, body) = (h.clone(), body.clone());
            tokio::spawn(async move { h.post("/v2/checkpoint", &body).await })
        })
        .collect();
    until("five followers", || {
        process.checkpoint_flights.joined(&id) == Some(5)
    })
    .await;
    assert_eq!(process.in_flight.load(Ordering::SeqCst), 6);

    drop(leader);
    until("the gateway to drop the leader's request", || {
        process.in_flight.load(Ordering::SeqCst) == 5
    })
    .await;
    assert_eq!(
        h.emu.stats().in_flight,
        1,
        "the upstream call goes on without its first caller"
    );

    for f in followers {
        let a = f.await.unwrap();
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert!(coalesced(&a));
        assert_eq!(a.json()["data"]["status"], "connected");
        assert_eq!(a.json()["metadata"]["credits_consumed"], 1);
    }
    assert_eq!(checkpoint_calls(&h, &id), 1);
    assert_eq!(h.emu.stats().credits_charged - before.credits_charged, 1);
    // What the call taught is kept: the account is now answered from the cache.
    assert!(cached(&h.post("/v2/checkpoint", &body).await));
}

#[tokio::test]
async fn a_wrong_and_a_right_code_sent_at_once_are_serialised_and_the_account_ends_connected() {
    let h = Arc::new(Harness::start_with(SLOW, NO_LIMITS).await);
    let id = pending(&h, "two-codes@x.io", "code_challenge").await;
    slow_upstream(&h, &id, 300);
    let send = |code: &'static str| {
        let (h, body) = (h.clone(), checkpoint(&id, Some(code)));
        tokio::spawn(async move { h.post("/v2/checkpoint", &body).await })
    };
    let (wrong, right) = (send("000000"), send("123456"));
    let (wrong, right) = (wrong.await.unwrap(), right.await.unwrap());

    let s = h.emu.stats();
    assert_eq!(s.max_in_flight, 1, "never two checkpoints for one account");
    assert_eq!(right.status, 200);
    assert_eq!(right.json()["data"]["status"], "connected");
    // Whichever went first: the wrong code fails upstream, or it comes after the right one
    // and is answered from the cache.
    assert!(
        (wrong.status == 400 && wrong.code() == "INVALID_PARAMS") || cached(&wrong),
        "{}",
        String::from_utf8_lossy(&wrong.body)
    );
    assert!(!coalesced(&wrong) && !coalesced(&right));
    let acc = h.get(&format!("/v2/accounts/{id}")).await;
    assert_eq!(acc.json()["data"]["status"], "active");
}

#[tokio::test]
async fn another_code_waits_for_the_call_in_flight_and_may_then_be_a_cache_hit() {
    let h = Arc::new(Harness::start_with(SLOW, NO_LIMITS).await);
    for (first, second) in [("000000", "123456"), ("123456", "000000")] {
        let id = pending(&h, &format!("order-{first}@x.io"), "code_challenge").await;
        slow_upstream(&h, &id, 1_000);
        let send = |code: &'static str| {
            let (h, body) = (h.clone(), checkpoint(&id, Some(code)));
            tokio::spawn(async move { h.post("/v2/checkpoint", &body).await })
        };
        let a = send(first);
        until("the first call upstream", || h.emu.stats().in_flight == 1).await;
        let b = send(second);
        until("the second code to wait", || {
            h.gw.process.checkpoint_flights.waiting(&id) == Some(1)
        })
        .await;
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        if first == "000000" {
            assert_eq!((a.status, a.code().as_str()), (400, "INVALID_PARAMS"));
            assert_eq!(b.status, 200);
            assert!(!cached(&b), "forwarded after the wrong code's call");
            assert_eq!(checkpoint_calls(&h, &id), 2);
        } else {
            assert_eq!(a.status, 200);
            assert!(cached(&b), "the right code connected the account meanwhile");
            assert_eq!(b.json()["data"]["status"], "connected");
            assert_eq!(checkpoint_calls(&h, &id), 1);
        }
    }
    assert_eq!(h.emu.stats().max_in_flight, 1);
}

#[tokio::test]
async fn ten_callers_polling_an_app_challenge_never_put_two_calls_in_flight() {
    let h = Arc::new(Harness::start_with(SLOW, NO_LIMITS).await);
    let id = pending(&h, "poller@x.io", "app_challenge").await;
    slow_upstream(&h, &id, 250);
    let polls = Arc::new(AtomicUsize::new(0));
    let polled = Arc::new(tokio::sync::Notify::new());
    let pollers: Vec<_> = (0..10)
        .map(|_| {
            let (h, id) = (h.clone(), id.clone());
            let (polls, polled) = (polls.clone(), polled.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(100));
                let mut seen = Vec::new();
                loop {
                    every.tick().await;
                    let a = h.post("/v2/checkpoint", &checkpoint(&id, None)).await;
                    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
                    let status = a.json()["data"]["status"].as_str().unwrap().to_owned();
                    seen.push(status.clone());
                    polls.fetch_add(1, Ordering::SeqCst);
                    polled.notify_one();
                    if status == "connected" {
                        return seen;
                    }
                }
            })
        })
        .collect();
    // Let them poll a while unapproved, then the user taps "yes" in the app.
    while polls.load(Ordering::SeqCst) < 30 {
        polled.notified().await;
    }
    assert!(h.emu.approve(&id));
    for p in pollers {
        let seen = p.await.unwrap();
        assert_eq!(seen.last().map(String::as_str), Some("connected"));
        assert!(seen[..seen.len() - 1]
            .iter()
            .all(|s| s == "checkpoint_required"));
    }
    let s = h.emu.stats();
    assert_eq!(
        s.max_in_flight, 1,
        "never more than one upstream call in flight"
    );
    assert!(
        checkpoint_calls(&h, &id) < polls.load(Ordering::SeqCst) as u64,
        "polls shared calls"
    );
    let m = metrics(&h).await;
    assert!(
        m.contains("linkup_gateway_status_cache_entries{status=\"connected\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_cache_hit_is_free_and_marked() {
    let h = Harness::start().await;
    let id = h.connected_account("tok-cache-hit").await;
    let before = h.emu.stats();
    let a = h
        .post("/v2/checkpoint", &checkpoint(&id, Some("123456")))
        .await;
    assert_eq!(a.status, 200);
    assert!(cached(&a));
    assert!(a.headers.contains_key("x-request-id"));
    let v = a.json();
    assert_eq!(v["success"], true);
    assert_eq!(
        v["data"],
        serde_json::json!({"account_id": id, "status": "connected"})
    );
    assert_eq!(v["metadata"]["action"], "checkpoint");
    assert_eq!(v["metadata"]["credits_consumed"], 0);
    assert!(v["metadata"]["timestamp"].as_str().unwrap().ends_with('Z'));
    let after = h.emu.stats();
    assert_eq!(after.total_calls, before.total_calls, "nothing forwarded");
    assert_eq!(
        after.credits_charged, before.credits_charged,
        "nothing charged"
    );
    let m = metrics(&h).await;
    assert!(
        m.contains("linkup_gateway_status_cache_hits_total 1"),
        "{m}"
    );
    assert!(
        m.contains("linkup_gateway_status_cache_misses_total 0"),
        "{m}"
    );
    assert!(
        m.contains("linkup_gateway_status_cache_entries{status=\"connected\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn an_account_read_showing_another_status_drops_the_entry() {
    let h = Harness::start().await;
    let id = h.connected_account("tok-read-inactive").await;
    let cp = checkpoint(&id, None);
    assert!(cached(&h.post("/v2/checkpoint", &cp).await));
    // `active` keeps it.
    let acc = format!("/v2/accounts/{id}");
    assert_eq!(h.get(&acc).await.json()["data"]["status"], "active");
    assert!(cached(&h.post("/v2/checkpoint", &cp).await));
    assert!(h.emu.set_active(&id, false));
    assert_eq!(h.get(&acc).await.json()["data"]["status"], "inactive");
    let a = h.post("/v2/checkpoint", &cp).await;
    assert!(!cached(&a));
    assert_eq!((a.status, a.code().as_str()), (403, "ACCOUNT_INACTIVE"));
    assert_eq!(checkpoint_calls(&h, &id), 1);
}

#[tokio::test]
async fn an_account_inactive_error_on_any_route_drops_the_entry() {
    let h = Harness::start().await;
    let id = h.connected_account("tok-error-inactive").await;
    let cp = checkpoint(&id, None);
    assert!(cached(&h.post("/v2/checkpoint", &cp).await));
    assert!(h.emu.set_active(&id, false));
    let get = format!(r#"{{"account_id":"{id}","action":"get"}}"#);
    let a = h.post("/v2/profiles", &get).await;
    assert_eq!((a.status, a.code().as_str()), (403, "ACCOUNT_INACTIVE"));
    // Reactivated upstream, but the gateway no longer claims to know: the next one is asked.
    assert!(h.emu.set_active(&id, true));
    let a = h.post("/v2/checkpoint", &cp).await;
    assert!(!cached(&a));
    assert_eq!(a.status, 200);
    assert_eq!(checkpoint_calls(&h, &id), 1);
    assert!(cached(&h.post("/v2/checkpoint", &cp).await), "learnt again");
}

#[tokio::test]
async fn a_login_naming_the_account_again_updates_the_entry() {
    let h = Harness::start_with("", NO_LIMITS).await;
    let id = pending(&h, "relogin@x.io", "code_challenge").await;
    let right = checkpoint(&id, Some("123456"));
    let a = h.post("/v2/checkpoint", &right).await;
    assert_eq!((a.status, cached(&a)), (200, false));
    assert!(cached(&h.post("/v2/checkpoint", &right).await));
    // A new login restarts 2FA upstream: the account is no longer connected.
    assert_eq!(pending(&h, "relogin@x.io", "code_challenge").await, id);
    let wrong = h
        .post("/v2/checkpoint", &checkpoint(&id, Some("999999")))
        .await;
    assert_eq!(
        (wrong.status, wrong.code().as_str()),
        (400, "INVALID_PARAMS")
    );
    let a = h.post("/v2/checkpoint", &right).await;
    assert_eq!((a.status, cached(&a)), (200, false));
    assert_eq!(checkpoint_calls(&h, &id), 3);
    let m = metrics(&h).await;
    assert!(
        m.contains("linkup_gateway_status_cache_misses_total 3"),
        "{m}"
    );
}

#[tokio::test]
async fn the_cache_survives_a_reload_and_an_invalid_account_answer_drops_the_entry() {
    let h = Harness::start().await;
    let id = h.connected_account("tok-reload-cache").await;
    let cp = checkpoint(&id, None);
    assert!(cached(&h.post("/v2/checkpoint", &cp).await));
    // A reload onto another upstream, which has never heard of the account.
    let other = start_emulator(UPSTREAM_KEY).await;
    let key_file = h.dir.path().join("upstream.key").display().to_string();
    std::fs::write(
        h.config_path(),
        config_text(&other.url(), &key_file, "", ""),
    )
    .unwrap();
    h.gw.reload().unwrap();
    assert!(
        cached(&h.post("/v2/checkpoint", &cp).await),
        "kept across the reload"
    );
    let a = h.get(&format!("/v2/accounts/{id}")).await;
    assert_eq!((a.status, a.code().as_str()), (404, "INVALID_ACCOUNT"));
    let a = h.post("/v2/checkpoint", &cp).await;
    assert!(!cached(&a));
    assert_eq!(a.code(), "INVALID_ACCOUNT");
    // A changed ttl starts an empty cache.
    let id2 = {
        let a = h
            .post(
                "/v2/login",
                r#"{"platform":"linkedin","login_token":"tok-2"}"#,
            )
            .await;
        a.json()["data"]["account_id"].as_str().unwrap().to_owned()
    };
    assert!(cached(
        &h.post("/v2/checkpoint", &checkpoint(&id2, None)).await
    ));
    std::fs::write(
        h.config_path(),
        config_text(
            &other.url(),
            &key_file,
            "",
            "[status_cache]\nttl = \"1h\"\n",
        ),
    )
    .unwrap();
    h.gw.reload().unwrap();
    assert!(!cached(
        &h.post("/v2/checkpoint", &checkpoint(&id2, None)).await
    ));
    other.shutdown().await;
}

#[tokio::test]
async fn the_purge_route_forgets_an_account() {
    let h = Harness::start().await;
    let id = h.connected_account("tok-purge").await;
    let cp = checkpoint(&id, None);
    assert!(cached(&h.post("/v2/checkpoint", &cp).await));
    assert_eq!(purge(&h, &id).await, 204);
    let a = h.post("/v2/checkpoint", &cp).await;
    assert_eq!((a.status, cached(&a)), (200, false));
    assert_eq!(checkpoint_calls(&h, &id), 1);
    // Absent (or already purged): still 204. Other methods: 405.
    assert_eq!(purge(&h, "never-seen").await, 204);
    let get = Request::get(h.admin_url(&format!("/cache/accounts/{id}")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(get).await.status, 405);
}

#[tokio::test]
async fn with_the_cache_off_every_checkpoint_is_forwarded() {
    let h = Harness::start_with("", "[status_cache]\nenabled = false\n").await;
    let id = h.connected_account("tok-cache-off").await;
    let cp = checkpoint(&id, None);
    for _ in 0..2 {
        let a = h.post("/v2/checkpoint", &cp).await;
        assert_eq!((a.status, cached(&a)), (200, false));
    }
    assert_eq!(checkpoint_calls(&h, &id), 2);
    assert_eq!(purge(&h, &id).await, 204);
}

#[tokio::test]
async fn with_coalescing_off_identical_submits_each_reach_the_upstream() {
    let h = Arc::new(
        Harness::start_with(
            SLOW,
            &format!(
                "{NO_LIMITS}[checkpoint]\ncoalesce = false\n[status_cache]\nenabled = false\n"
            ),
        )
        .await,
    );
    let id = pending(&h, "plain@x.io", "app_challenge").await;
    slow_upstream(&h, &id, 300);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (h, body) = (h.clone(), checkpoint(&id, None));
            tokio::spawn(async move {
                h.call(Method::POST, "/v2/checkpoint", Some(ALPHA_KEY), &body)
                    .await
            })
        })
        .collect();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!((a.status, coalesced(&a)), (200, false));
    }
    assert_eq!(checkpoint_calls(&h, &id), 3);
}

#[tokio::test]
async fn a_coalesced_error_is_shared_too() {
    let h = Arc::new(Harness::start_with(SLOW, NO_LIMITS).await);
    let id = pending(&h, "errors@x.io", "app_challenge").await;
    h.emu.set_faults(Faults {
        latency_ms: 1_000,
        mode: linkup_gateway::emulator::FaultMode::Reset,
        account_id: Some(id.clone()),
        ..Default::default()
    });
    let send = || {
        let (h, body) = (h.clone(), checkpoint(&id, None));
        tokio::spawn(async move { h.post("/v2/checkpoint", &body).await })
    };
    let leader = send();
    until("the leader's upstream call", || {
        h.emu.stats().in_flight == 1
    })
    .await;
    let follower = send();
    until("the follower", || {
        h.gw.process.checkpoint_flights.joined(&id) == Some(1)
    })
    .await;
    for a in [leader.await.unwrap(), follower.await.unwrap()] {
        assert_eq!((a.status, a.code().as_str()), (502, "UPSTREAM_UNAVAILABLE"));
        assert_eq!(a.source(), "gateway");
    }
    assert_eq!(checkpoint_calls(&h, &id), 1);
}
