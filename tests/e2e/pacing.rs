//! Pacing: a rule with `on_limit = "delay"` queues requests over its limit instead of
//! refusing them.

use std::sync::Arc;

use crate::common::*;

fn paced(per: &str, max_delay: &str) -> String {
    format!(
        "[rate_limit]\nper_account = \"100000/sec\"\nburst = 100000\n\n\
         [[rate_limit.rules]]\npath = \"/v2/messages\"\naction = \"send\"\n\
         per_account = \"{per}\"\nburst = 1\non_limit = \"delay\"\nmax_delay = \"{max_delay}\"\n"
    )
}

fn send(account: &str) -> String {
    format!(r#"{{"account_id":"{account}","action":"send","params":{{"text":"hi"}}}}"#)
}

fn sends(h: &Harness) -> u64 {
    h.emu
        .stats()
        .calls_by_path
        .get("POST /v2/messages")
        .copied()
        .unwrap_or(0)
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn three_concurrent_sends_at_one_per_second_all_go_one_after_another() {
    let h =
        Arc::new(Harness::start_with("request_timeout = \"60s\"", &paced("1/sec", "30s")).await);
    let account = h.connected_account("tok-pace").await;
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (h, body) = (h.clone(), send(&account));
            tokio::spawn(async move { h.post("/v2/messages", &body).await })
        })
        .collect();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(sends(&h), 3);
    let m = h.admin("/metrics").await.text();
    let waited: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("linkup_gateway_rate_limit_waited_seconds_total "))
        .unwrap()
        .parse()
        .unwrap();
    // The second waited about a second for its slot, the third about two (less whatever
    // their arrivals were spread by: only "they waited" is asserted).
    assert!(waited >= 1.0, "waited {waited} s in all:\n{m}");
    assert!(m.contains("linkup_gateway_rate_limit_queued 0"), "{m}");
    assert!(
        !m.contains("rate_limited_total{client=\"alpha\""),
        "none refused:\n{m}"
    );
}

#[tokio::test]
async fn a_slot_beyond_max_delay_is_refused_at_once_and_a_hang_up_gives_its_place_back() {
    let h = Arc::new(Harness::start_with("request_timeout = \"60s\"", &paced("1/min", "5s")).await);
    let account = h.connected_account("tok-pace-far").await;
    let body = send(&account);
    assert_eq!(h.post("/v2/messages", &body).await.status, 200);
    // The next slot is a minute away, past max_delay: 429 at once, as without pacing.
    let far = h.post("/v2/messages", &body).await;
    assert_eq!((far.status, far.code().as_str()), (429, "RATE_LIMITED"));
    assert!(far.headers.contains_key("retry-after"));
    assert_eq!(sends(&h), 1);

    // A slot every 3 s, 4 s of patience: one waits, its caller hangs up, the queue is empty
    // again, and the slot it would have taken is free (had it been taken, the next would be
    // 6 s away: refused).
    let h =
        Arc::new(Harness::start_with("request_timeout = \"60s\"", &paced("20/min", "4s")).await);
    let account = h.connected_account("tok-pace-hangup").await;
    let body = send(&account);
    assert_eq!(h.post("/v2/messages", &body).await.status, 200);
    let waiting = {
        let (h, body) = (h.clone(), body.clone());
        tokio::spawn(async move { h.post("/v2/messages", &body).await })
    };
    let process = h.gw.process.clone();
    until("the second to queue", || {
        process.metrics.rate_limit_queued.get() == 1
    })
    .await;
    waiting.abort();
    let _ = waiting.await;
    until("the hung-up request to leave the queue", || {
        process.metrics.rate_limit_queued.get() == 0
    })
    .await;
    // The slot it would have taken is still there: the next one gets it, not the one after.
    let next = h.post("/v2/messages", &body).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(sends(&h), 2, "the hung-up request never went");
}

#[tokio::test]
async fn queues_are_bounded_in_total() {
    let cfg =
        paced("20/min", "30s").replace("burst = 100000\n", "burst = 100000\nmax_queued = 1\n");
    let h = Arc::new(Harness::start_with("request_timeout = \"60s\"", &cfg).await);
    let account = h.connected_account("tok-pace-bound").await;
    let body = send(&account);
    assert_eq!(h.post("/v2/messages", &body).await.status, 200);
    let waiting = {
        let (h, body) = (h.clone(), body.clone());
        tokio::spawn(async move { h.post("/v2/messages", &body).await })
    };
    let process = h.gw.process.clone();
    until("the second to queue", || {
        process.metrics.rate_limit_queued.get() == 1
    })
    .await;
    let third = h.post("/v2/messages", &body).await;
    assert_eq!((third.status, third.code().as_str()), (429, "RATE_LIMITED"));
    assert!(third.text().contains("max_queued"), "{}", third.text());
    // The queued one still goes when its slot comes.
    assert_eq!(waiting.await.unwrap().status, 200);
    assert_eq!(sends(&h), 2);
}

#[tokio::test]
async fn at_shutdown_a_slot_within_the_grace_is_served_and_one_after_it_is_503() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    // A slot every 3 s; the harness's shutdown_grace is 5 s.
    let h = Harness::start_with("request_timeout = \"60s\"", &paced("20/min", "30s")).await;
    let account = h.connected_account("tok-pace-drain").await;
    let body = send(&account);
    assert_eq!(h.post("/v2/messages", &body).await.status, 200);
    let url = h.url("/v2/messages");
    let client = h.http.clone();
    let post = |body: String| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let req = http::Request::post(url)
                .header("x-api-key", ALPHA_KEY)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    let process = h.gw.process.clone();
    let second = post(body.clone());
    until("the second to queue", || {
        process.metrics.rate_limit_queued.get() == 1
    })
    .await;
    let third = post(body.clone());
    until("the third to queue", || {
        process.metrics.rate_limit_queued.get() == 2
    })
    .await;
    let Harness { emu, gw, dir, http } = h;
    let draining = tokio::spawn(gw.shutdown());
    let (status, text) = third.await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("DRAINING"), "{text}");
    let (status, text) = second.await.unwrap();
    assert_eq!(status, 200, "served within the grace: {text}");
    draining.await.unwrap();
    drop((emu, dir, http));
}
