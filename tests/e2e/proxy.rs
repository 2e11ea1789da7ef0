//! The data plane, row by row of SPEC §4.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;

use crate::common::*;

#[tokio::test]
async fn forwards_with_the_stored_key_and_clean_headers() {
    let h = Harness::start().await;
    let account = h.connected_account("tok-forward").await;
    let req = Request::post(h.url("/v2/profiles"))
        .header("x-api-key", ALPHA_KEY)
        .header("authorization", format!("Bearer {ALPHA_KEY}"))
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "must-not-pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-custom", "kept")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"account_id":"{account}","action":"get","params":{{"profile_url":"u"}}}}"#
        ))))
        .unwrap();
    let a = h.send(req).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["success"], true);
    assert!(a.json().get("error").is_none());
    assert!(a.headers.contains_key("x-request-id"));

    let seen = h.emu.requests();
    let last = seen
        .iter()
        .rev()
        .find(|r| r.path_and_query == "/v2/profiles")
        .unwrap();
    let header = |n: &str| {
        last.headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(header("x-api-key"), vec![UPSTREAM_KEY.to_string()]);
    assert!(header("authorization").is_empty());
    assert!(header("proxy-authorization").is_empty());
    assert!(header("x-hop-secret").is_empty());
    assert!(header("keep-alive").is_empty());
    assert_eq!(header("x-custom"), vec!["kept".to_string()]);
    assert_eq!(header("host"), vec![h.emu.addr().to_string()]);
    assert_eq!(header("x-request-id").len(), 1);
    assert!(last.body.contains(&account));
}

#[tokio::test]
async fn bearer_key_is_accepted_and_request_id_is_kept() {
    let h = Harness::start().await;
    let req = Request::get(h.url("/v2/credits"))
        .header("authorization", format!("Bearer {ALPHA_KEY}"))
        .header("x-request-id", "caller-chosen-id-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = h.send(req).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-request-id"], "caller-chosen-id-1");
    let last = h.emu.requests().pop().unwrap();
    assert!(last
        .headers
        .iter()
        .any(|(k, v)| k == "x-request-id" && v == "caller-chosen-id-1"));
}

#[tokio::test]
async fn missing_or_unknown_key_is_403_invalid_api_key_and_not_forwarded() {
    let h = Harness::start().await;
    let before = h.upstream_calls();
    for key in [None, Some("lgw_not_a_key"), Some("")] {
        let a = h.call(Method::GET, "/v2/credits", key, "").await;
        assert_eq!(a.status, 403);
        assert_eq!(a.code(), "INVALID_API_KEY");
        assert_eq!(a.source(), "gateway");
        assert_eq!(a.json()["metadata"]["credits_consumed"], 0);
    }
    assert_eq!(h.upstream_calls(), before);
}

#[tokio::test]
async fn scoped_client_is_forbidden_other_accounts_and_paths() {
    let h = Harness::start().await;
    let before = h.upstream_calls();
    let a = h
        .call(
            Method::POST,
            "/v2/checkpoint",
            Some(SCOPED_KEY),
            r#"{"account_id":"acc_other","code":"1"}"#,
        )
        .await;
    assert_eq!((a.status, a.code().as_str()), (403, "FORBIDDEN"));
    let a = h
        .call(Method::GET, "/v2/accounts/acc_other", Some(SCOPED_KEY), "")
        .await;
    assert_eq!((a.status, a.code().as_str()), (403, "FORBIDDEN"));
    let a = h
        .call(Method::GET, "/v2/credits", Some(SCOPED_KEY), "")
        .await;
    assert_eq!((a.status, a.code().as_str()), (403, "FORBIDDEN"));
    assert_eq!(h.upstream_calls(), before, "refusals must not be forwarded");
    // Its own account goes through (the emulator does not know it: its own 404, unchanged).
    let a = h
        .call(
            Method::GET,
            "/v2/accounts/acc_allowed",
            Some(SCOPED_KEY),
            "",
        )
        .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.code(), "INVALID_ACCOUNT");
    assert_eq!(
        a.source(),
        "",
        "upstream errors pass through without a source"
    );
    assert_eq!(h.upstream_calls(), before + 1);
}

#[tokio::test]
async fn malformed_bodies_are_400_invalid_params_and_not_forwarded() {
    let h = Harness::start().await;
    let before = h.upstream_calls();
    for body in [
        "not json",
        "",
        "[]",
        r#"{"account_id": 12}"#,
        r#"{"account_id": "a", "account_id": "b"}"#,
        "{\"account_id\": \"\u{0}",
    ] {
        let a = h.post("/v2/checkpoint", body).await;
        assert_eq!(a.status, 400, "{body}");
        assert_eq!(a.code(), "INVALID_PARAMS", "{body}");
        assert_eq!(a.source(), "gateway");
    }
    // Invalid UTF-8.
    let req = Request::post(h.url("/v2/network"))
        .header("x-api-key", ALPHA_KEY)
        .body(Full::new(Bytes::from_static(
            b"{\"account_id\":\"\xff\xfe\"}",
        )))
        .unwrap();
    assert_eq!(h.send(req).await.status, 400);
    let deep = format!("{{\"x\":{}{}}}", "[".repeat(100), "]".repeat(100));
    assert_eq!(h.post("/v2/messages", &deep).await.code(), "INVALID_PARAMS");
    assert_eq!(h.upstream_calls(), before);
}

#[tokio::test]
async fn oversized_bodies_are_413_declared_or_streamed() {
    let h = Harness::start().await;
    let before = h.upstream_calls();
    let big = format!(r#"{{"account_id":"a","pad":"{}"}}"#, "x".repeat(5000));
    let a = h.post("/v2/profiles", &big).await;
    assert_eq!((a.status, a.code().as_str()), (413, "PAYLOAD_TOO_LARGE"));
    // A declared 1 MB body (a 1 MB account_id) is refused on its headers, before a byte of it
    // is sent: raw, because a client still writing the body when the 413 comes back and the
    // connection closes sees a broken pipe instead of the answer (hyper does no lingering
    // close).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.gw.data_addr)
        .await
        .unwrap();
    let head = format!(
        "POST /v2/checkpoint HTTP/1.1\r\nHost: x\r\nx-api-key: {ALPHA_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        (1 << 20) + 17
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    );
    let _ = read.await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("PAYLOAD_TOO_LARGE"), "{answer}");
    assert_eq!(h.upstream_calls(), before);
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let h = Harness::start().await;
    let a = h
        .post(
            "/v2/login",
            r#"{"platform":"linkedin","email":"e@x.io","password":"p"}"#,
        )
        .await;
    assert_eq!(a.json()["data"]["status"], "checkpoint_required");
    let id = a.json()["data"]["account_id"].as_str().unwrap().to_owned();
    let a = h
        .post(
            "/v2/checkpoint",
            &format!(r#"{{"account_id":"{id}","code":"000000"}}"#),
        )
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.code(), "INVALID_PARAMS");
    assert_eq!(a.source(), "");
    let a = h
        .post(
            "/v2/checkpoint",
            &format!(r#"{{"account_id":"{id}","code":"123456"}}"#),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["data"]["status"], "connected");
    assert_eq!(a.json()["metadata"]["credits_consumed"], 1);
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port with nothing listening: bind, note the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, UPSTREAM_KEY).unwrap();
    let text = config_text(
        &format!("http://127.0.0.1:{port}"),
        &key.display().to_string(),
        "",
        "",
    );
    let s = linkup_gateway::config::load_str(&text, &[], None).unwrap();
    let gw = linkup_gateway::server::Gateway::start(s).await.unwrap();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = Request::get(format!("http://{}/v2/credits", gw.data_addr))
        .header("x-api-key", ALPHA_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(v["error"]["source"], "gateway");
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_reset_is_502_and_not_retried() {
    let h = Harness::start().await;
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        mode: linkup_gateway::emulator::FaultMode::Reset,
        count: 1,
        ..Default::default()
    });
    let before = h.upstream_calls();
    let a = h.get("/v2/credits").await;
    assert_eq!((a.status, a.code().as_str()), (502, "UPSTREAM_UNAVAILABLE"));
    assert_eq!(h.upstream_calls(), before + 1, "tried exactly once");
    // The pool recovers: the next call works.
    assert_eq!(h.get("/v2/credits").await.status, 200);
}

#[tokio::test]
async fn non_json_upstream_5xx_passes_through() {
    let h = Harness::start().await;
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        mode: linkup_gateway::emulator::FaultMode::BadGatewayHtml,
        count: 1,
        ..Default::default()
    });
    let a = h.get("/v2/credits").await;
    assert_eq!(a.status, 502);
    assert_eq!(a.source(), "", "the upstream's own answer, unchanged");
}

#[tokio::test]
async fn slow_upstream_is_504_after_request_timeout() {
    let h = Harness::start_with("request_timeout = \"300ms\"", "").await;
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        latency_ms: 5_000,
        ..Default::default()
    });
    let a = h.get("/v2/credits").await;
    assert_eq!((a.status, a.code().as_str()), (504, "UPSTREAM_TIMEOUT"));
    assert_eq!(a.source(), "gateway");
}

#[tokio::test]
async fn beyond_max_in_flight_is_503_with_retry_after() {
    let h = Harness::start_with("max_in_flight = 1\nrequest_timeout = \"10s\"", "").await;
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        latency_ms: 800,
        ..Default::default()
    });
    let first = {
        let req = Request::get(h.url("/v2/credits"))
            .header("x-api-key", ALPHA_KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        tokio::spawn(h.http.request(req))
    };
    while h
        .gw
        .process
        .in_flight
        .load(std::sync::atomic::Ordering::Acquire)
        == 0
    {
        tokio::task::yield_now().await;
    }
    let a = h.get("/v2/credits").await;
    assert_eq!((a.status, a.code().as_str()), (503, "OVERLOADED"));
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn paths_and_methods_outside_the_surface_are_404_405() {
    let h = Harness::start().await;
    let before = h.upstream_calls();
    let a = h.post("/v2/inbox", "{}").await;
    assert_eq!((a.status, a.code().as_str()), (404, "NOT_FOUND"));
    let a = h.get("/v1/profile/me").await;
    assert_eq!((a.status, a.code().as_str()), (404, "NOT_FOUND"));
    let a = h.get("/v2/checkpoint").await;
    assert_eq!((a.status, a.code().as_str()), (405, "METHOD_NOT_ALLOWED"));
    let a = h
        .call(Method::DELETE, "/v2/accounts/x", Some(ALPHA_KEY), "")
        .await;
    assert_eq!(a.status, 405);
    assert_eq!(h.upstream_calls(), before);
}

#[tokio::test]
async fn h2c_callers_are_served() {
    let h = Harness::start().await;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = Request::get(h.url("/v2/credits"))
        .header("x-api-key", ALPHA_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let last = h.emu.requests().pop().unwrap();
    assert!(last
        .headers
        .iter()
        .any(|(k, v)| k == "x-api-key" && v == UPSTREAM_KEY));
}

#[tokio::test]
async fn every_refusal_is_counted_in_metrics() {
    let h = Harness::start().await;
    h.call(Method::GET, "/v2/credits", None, "").await;
    h.post("/v2/checkpoint", "nope").await;
    h.post("/v2/inbox", "{}").await;
    let m = String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap();
    assert!(
        m.contains(r#"linkup_gateway_refusals_total{code="INVALID_API_KEY"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"linkup_gateway_refusals_total{code="INVALID_PARAMS"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"linkup_gateway_refusals_total{code="NOT_FOUND"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"linkup_gateway_requests_total{client="alpha",route="checkpoint",status="400"} 1"#
        ),
        "{m}"
    );
    assert!(m.contains(r#"linkup_gateway_requests_total{client="unauthenticated",route="credits",status="403"} 1"#), "{m}");
}

#[tokio::test]
async fn a_caller_that_half_closes_after_its_request_is_gone_but_its_call_is_charged() {
    // Some clients shut their write side once the request is sent (`nc -N`, scripts). The
    // gateway takes that as a hang-up (nginx's 499: no `half_close`), and the call it had
    // forwarded still completes and lands in the ledger.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let account = h.connected_account("tok-half-close").await;
    // The upstream takes its time, so the hang-up is seen before any answer could be written.
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        latency_ms: 300,
        account_id: Some(account.clone()),
        ..Default::default()
    });
    let h = std::sync::Arc::new(h);
    let requests = |h: std::sync::Arc<Harness>| async move {
        let v = h.admin("/usage?by=client").await.json();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requests"].as_u64().unwrap())
            .sum::<u64>()
    };
    let before = requests(h.clone()).await;
    let calls = h.upstream_calls();
    let body = action(&account, "get");
    let mut s = tokio::net::TcpStream::connect(h.gw.data_addr)
        .await
        .unwrap();
    let head = format!(
        "POST /v2/profiles HTTP/1.1\r\nHost: x\r\nx-api-key: {ALPHA_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("the gateway closes the connection")
    .unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while requests(h.clone()).await != before + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the half-closed caller's call never reached the ledger"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(h.upstream_calls(), calls + 1);
    let rows = h.admin("/usage?by=account,outcome").await.json();
    let row = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == account.as_str() && r["requests"] == 1)
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["outcome"], "settled", "{rows}");
    assert!(row["credits"].as_u64().unwrap_or(0) > 0, "{rows}");
}
