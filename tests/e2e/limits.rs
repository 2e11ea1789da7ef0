//! Rate limits end to end: per account, per rule, per client, the upstream-429 cooldown,
//! shadow mode, and buckets kept across a reload.

use http::Method;

use crate::common::*;

const THREE_PER_MIN: &str = "[rate_limit]\nper_account = \"3/min\"\nburst = 3\n";

fn profile_get(account: &str) -> String {
    format!(r#"{{"account_id":"{account}","action":"get","params":{{"profile_url":"u"}}}}"#)
}

#[tokio::test]
async fn fourth_request_within_3_per_min_is_429_and_not_forwarded() {
    let h = Harness::start_with("", THREE_PER_MIN).await;
    let a = h.connected_account("tok-limit-a").await;
    let b = h.connected_account("tok-limit-b").await;
    for i in 0..3 {
        let r = h.post("/v2/profiles", &profile_get(&a)).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.headers["ratelimit-policy"], "\"account\";q=3;w=60");
        assert_eq!(
            r.headers["ratelimit"].to_str().unwrap().split(';').nth(1),
            Some(format!("r={}", 2 - i).as_str())
        );
    }
    let before = h.upstream_calls();
    let r = h.post("/v2/profiles", &profile_get(&a)).await;
    assert_eq!((r.status, r.code().as_str()), (429, "RATE_LIMITED"));
    assert_eq!(r.source(), "gateway");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3/min"));
    assert!(r.headers.contains_key("ratelimit"));
    assert_eq!(h.upstream_calls(), before, "refused, not forwarded");
    // An independent second account.
    assert_eq!(h.post("/v2/profiles", &profile_get(&b)).await.status, 200);
    let m = String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap();
    assert!(
        m.contains(
            r#"linkup_gateway_rate_limited_total{client="alpha",reason="account",shadow="false"} 1"#
        ),
        "{m}"
    );
}

#[tokio::test]
async fn a_rule_on_one_action_leaves_another_free() {
    let extra = "[rate_limit]\nper_account = \"1000/min\"\nburst = 100\n\
                 [[rate_limit.rules]]\nname = \"invites\"\npath = \"/v2/network\"\naction = \"invite\"\nper_account = \"1/week\"\nburst = 1\n";
    let h = Harness::start_with("", extra).await;
    let a = h.connected_account("tok-rule").await;
    let invite =
        format!(r#"{{"account_id":"{a}","action":"invite","params":{{"profile_url":"u"}}}}"#);
    assert_eq!(h.post("/v2/network", &invite).await.status, 200);
    let r = h.post("/v2/network", &invite).await;
    assert_eq!(r.status, 429);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invites"));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 86_400, "a week-long quota: {retry}");
    for _ in 0..5 {
        assert_eq!(h.post("/v2/profiles", &profile_get(&a)).await.status, 200);
        let list = format!(r#"{{"account_id":"{a}","action":"list_connections"}}"#);
        assert_eq!(h.post("/v2/network", &list).await.status, 200);
    }
}

#[tokio::test]
async fn per_client_limit_refuses_a_flood_of_malformed_bodies_before_parsing() {
    let extra = format!(
        "[[clients]]\nname = \"flooder\"\nkey_sha256 = \"{}\"\nrequests_per_second = 2\n",
        sha("lgw_flooder")
    );
    let h = Harness::start_with("", &extra).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = h
            .call(
                Method::POST,
                "/v2/checkpoint",
                Some("lgw_flooder"),
                "{{{ not json",
            )
            .await;
        codes.push(r.code());
    }
    assert_eq!(&codes[..2], ["INVALID_PARAMS", "INVALID_PARAMS"]);
    assert!(codes[2..].iter().all(|c| c == "RATE_LIMITED"), "{codes:?}");
    let m = String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap();
    assert!(
        m.contains(r#"rate_limited_total{client="flooder",reason="client",shadow="false"} 4"#),
        "{m}"
    );
    // Other clients are not affected.
    assert_eq!(h.get("/v2/credits").await.status, 200);
}

#[tokio::test]
async fn requests_without_an_account_are_limited_per_client() {
    let h = Harness::start_with("", "[rate_limit]\nper_account = \"2/min\"\nburst = 2\n").await;
    assert_eq!(h.get("/v2/credits").await.status, 200);
    assert_eq!(h.get("/v2/accounts").await.status, 200);
    let r = h.get("/v2/credits").await;
    assert_eq!(r.status, 429);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("client `alpha`"));
}

#[tokio::test]
async fn upstream_rate_limited_holds_the_account_back_for_the_cooldown() {
    let extra =
        "[rate_limit]\nper_account = \"1000/min\"\nburst = 100\nupstream_429_cooldown = \"60s\"\n";
    let h = Harness::start_with("", extra).await;
    let a = h.connected_account("tok-cool-a").await;
    let b = h.connected_account("tok-cool-b").await;
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        mode: linkup_gateway::emulator::FaultMode::RateLimited,
        count: 1,
        account_id: Some(a.clone()),
        ..Default::default()
    });
    let r = h.post("/v2/profiles", &profile_get(&a)).await;
    assert_eq!(
        (r.status, r.source().as_str()),
        (429, ""),
        "the upstream's own 429 passes through"
    );
    let before = h.upstream_calls();
    let r = h.post("/v2/profiles", &profile_get(&a)).await;
    assert_eq!((r.status, r.source().as_str()), (429, "gateway"));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&retry), "{retry}");
    assert_eq!(h.upstream_calls(), before, "held back, not forwarded");
    assert_eq!(
        h.post("/v2/profiles", &profile_get(&b)).await.status,
        200,
        "other accounts go on"
    );
}

#[tokio::test]
async fn shadow_mode_counts_but_does_not_refuse() {
    let h = Harness::start_with(
        "",
        "[rate_limit]\nper_account = \"1/min\"\nburst = 1\nshadow = true\n",
    )
    .await;
    let a = h.connected_account("tok-shadow").await;
    for _ in 0..3 {
        assert_eq!(h.post("/v2/profiles", &profile_get(&a)).await.status, 200);
    }
    let m = String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap();
    // login (no account: per client) + 3 profile calls on one account: 2 would-be refusals.
    assert!(
        m.contains(
            r#"linkup_gateway_rate_limited_total{client="alpha",reason="account",shadow="true"} 2"#
        ),
        "{m}"
    );
}

#[tokio::test]
async fn reload_keeps_buckets_whose_quota_did_not_change() {
    let h = Harness::start_with("", THREE_PER_MIN).await;
    let a = h.connected_account("tok-reload-limit").await;
    for _ in 0..3 {
        assert_eq!(h.post("/v2/profiles", &profile_get(&a)).await.status, 200);
    }
    assert_eq!(h.post("/v2/profiles", &profile_get(&a)).await.status, 429);
    let key_file = h.dir.path().join("upstream.key").display().to_string();
    // An unrelated change: the bucket stays empty.
    let extra = format!(
        "{THREE_PER_MIN}[[clients]]\nname = \"late\"\nkey_sha256 = \"{}\"\n",
        sha("lgw_late")
    );
    std::fs::write(
        h.config_path(),
        config_text(&h.emu.url(), &key_file, "", &extra),
    )
    .unwrap();
    h.gw.reload().unwrap();
    assert_eq!(
        h.post("/v2/profiles", &profile_get(&a)).await.status,
        429,
        "bucket kept"
    );
    // A changed quota starts afresh.
    let extra = "[rate_limit]\nper_account = \"5/min\"\nburst = 5\n";
    std::fs::write(
        h.config_path(),
        config_text(&h.emu.url(), &key_file, "", extra),
    )
    .unwrap();
    h.gw.reload().unwrap();
    assert_eq!(
        h.post("/v2/profiles", &profile_get(&a)).await.status,
        200,
        "new quota, new bucket"
    );
}

#[tokio::test]
async fn cache_hits_and_coalesced_followers_are_not_counted() {
    use std::sync::Arc;
    // One request per minute per account: anything beyond the first that reaches the
    // account limit would be refused.
    let extra = "[rate_limit]\nper_account = \"1/min\"\nburst = 1\n";
    let h = Arc::new(Harness::start_with("request_timeout = \"30s\"", extra).await);

    // Cache hits: the login (no account: per client) marks the account connected; every
    // checkpoint after it is answered from the cache, none is limited.
    let connected = h.connected_account("tok-free-hits").await;
    for _ in 0..5 {
        let a = h
            .post(
                "/v2/checkpoint",
                &format!(r#"{{"account_id":"{connected}","code":"1"}}"#),
            )
            .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["x-gateway-cache"], "hit");
    }

    // Coalesced followers: 20 identical submits while the first is in flight share its one
    // upstream call (the only one the limit counts).
    let pending = {
        // alpha's 1/min bucket for account-less requests went to the first login: log this
        // account in at the emulator directly.
        let listener_url = h.emu.url();
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = http::Request::post(format!("{listener_url}/v2/login"))
            .header("x-api-key", UPSTREAM_KEY)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"platform":"linkedin","email":"free@x.io","password":"p"}"#,
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["data"]["account_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        latency_ms: 1_000,
        account_id: Some(pending.clone()),
        ..Default::default()
    });
    let body = format!(r#"{{"account_id":"{pending}","code":"123456"}}"#);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (h, body) = (h.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            h.post("/v2/checkpoint", &body).await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let m = String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap();
    assert!(
        !m.contains(r#"reason="account""#),
        "nothing was limited:\n{m}"
    );
}
