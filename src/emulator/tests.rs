//! Unit tests of `emulator`, in a file of their own to keep the module short.

#![allow(clippy::unwrap_used)]

use super::*;
use hyper_util::client::legacy::{connect::HttpConnector, Client};

const KEY: &str = "test-key";

struct Emu {
    h: EmulatorHandle,
    c: Client<HttpConnector, Full<Bytes>>,
}

struct Got {
    status: u16,
    content_type: String,
    json: Value,
}

impl Got {
    fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
    fn credits(&self) -> i64 {
        self.json["metadata"]["credits_consumed"].as_i64().unwrap()
    }
    fn data(&self, field: &str) -> &Value {
        &self.json["data"][field]
    }
}

async fn emu() -> Emu {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = EmulatorConfig {
        api_key: KEY.into(),
        ..Default::default()
    };
    let h = start(listener, cfg).await.unwrap();
    Emu {
        h,
        c: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Emu {
    async fn call(&self, m: Method, path: &str, key: Option<&str>, body: &str) -> Option<Got> {
        let mut b = Request::builder()
            .method(m)
            .uri(format!("{}{path}", self.h.url()));
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        let resp = self
            .c
            .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap());
        let resp = resp.await.ok()?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Some(Got {
            status,
            content_type: ct.unwrap_or_default(),
            json,
        })
    }
    async fn post(&self, path: &str, body: &str) -> Got {
        self.call(Method::POST, path, Some(KEY), body)
            .await
            .unwrap()
    }
    async fn get(&self, path: &str) -> Got {
        self.call(Method::GET, path, Some(KEY), "").await.unwrap()
    }
    async fn connected(&self, token: &str) -> String {
        let a = self
            .post("/v2/login", &format!(r#"{{"login_token":"{token}"}}"#))
            .await;
        assert_eq!(
            (a.status, a.data("status").as_str()),
            (200, Some("connected"))
        );
        a.data("account_id").as_str().unwrap().to_owned()
    }
    async fn pending(&self, email: &str, challenge: &str) -> String {
        let body =
            format!(r#"{{"email":"{email}","password":"p","challenge_type":"{challenge}"}}"#);
        let a = self.post("/v2/login", &body).await;
        assert_eq!(a.data("status"), "checkpoint_required");
        assert_eq!(a.data("challenge_type"), challenge);
        a.data("account_id").as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn login_then_checkpoint_with_code() {
    let e = emu().await;
    let a = e
        .post(
            "/v2/login",
            r#"{"platform":"linkedin","email":"Ada@x.io","password":"p"}"#,
        )
        .await;
    assert_eq!(
        (a.status, a.content_type.as_str()),
        (200, "application/json")
    );
    assert_eq!((a.json["success"].as_bool(), a.credits()), (Some(true), 0));
    assert_eq!(a.json["metadata"]["action"], "login");
    assert_eq!(a.data("challenge_type"), "code_challenge");
    let id = a.data("account_id").as_str().unwrap().to_owned();
    assert_eq!(id.len(), 24);
    assert_eq!(
        e.pending("ada@x.io", "code_challenge").await,
        id,
        "deterministic from email"
    );
    let acc = format!("/v2/accounts/{id}");
    assert_eq!(e.get(&acc).await.data("status"), "checkpoint_required");
    let get = format!(r#"{{"account_id":"{id}","action":"get"}}"#);
    assert_eq!(
        e.post("/v2/profiles", &get).await.code(),
        "ACCOUNT_INACTIVE"
    );

    let cp = |code: &str| format!(r#"{{"account_id":"{id}","code":"{code}"}}"#);
    let a = e.post("/v2/checkpoint", &cp("000000")).await;
    assert_eq!(
        (a.status, a.code(), a.credits()),
        (400, "INVALID_PARAMS", 0)
    );
    assert_eq!(a.json["metadata"]["action"], "checkpoint");
    let a = e
        .post("/v2/checkpoint", &format!(r#"{{"account_id":"{id}"}}"#))
        .await;
    assert_eq!(a.code(), "INVALID_PARAMS");
    assert_eq!(e.h.stats().credits_charged, 0);
    let a = e.post("/v2/checkpoint", &cp("123456")).await;
    assert_eq!((a.status, a.credits()), (200, 1));
    assert_eq!(
        a.json["data"],
        json!({"account_id": id, "status": "connected"})
    );
    // Already connected: answered and billed again.
    assert_eq!(e.post("/v2/checkpoint", &cp("x")).await.credits(), 1);
    assert_eq!(e.get(&acc).await.data("status"), "active");
    assert_eq!(e.post("/v2/profiles", &get).await.status, 200);

    let s = e.h.stats();
    assert_eq!((s.credits_charged, s.balance), (3, 9_997));
    assert_eq!(s.checkpoint_calls_by_account[&id], 4);
    assert_eq!(s.calls_by_path["POST /v2/checkpoint"], 4);
    assert_eq!(*e.get("/v2/credits").await.data("credits"), 9_997);

    let a = e.post("/v2/checkpoint", "not json").await;
    assert_eq!((a.status, a.code()), (400, "INVALID_PARAMS"));
    let a = e
        .post("/v2/checkpoint", r#"{"account_id":"nope","code":"1"}"#)
        .await;
    assert_eq!((a.status, a.code()), (404, "INVALID_ACCOUNT"));
    assert!(e.h.set_active(&id, false));
    let a = e.post("/v2/checkpoint", &cp("123456")).await;
    assert_eq!((a.status, a.code()), (403, "ACCOUNT_INACTIVE"));

    let t = e.connected("li_at_abc").await;
    assert_eq!(
        e.connected("li_at_abc").await,
        t,
        "re-login returns the same id"
    );
    assert_ne!(e.connected("li_at_other").await, t);
    let a = e.post("/v2/login", r#"{"email":"a@b.c"}"#).await;
    assert_eq!((a.status, a.code()), (400, "INVALID_PARAMS"));
    e.h.shutdown().await;
}

#[tokio::test]
async fn app_challenge_needs_approval() {
    let e = emu().await;
    let id = e.pending("bob@x.io", "app_challenge").await;
    let cp = format!(r#"{{"account_id":"{id}"}}"#);
    let a = e.post("/v2/checkpoint", &cp).await;
    assert_eq!((a.status, a.credits()), (200, 1));
    assert_eq!(a.data("status"), "checkpoint_required");
    assert_eq!(
        e.post(&format!("/_emulator/accounts/{id}/approve"), "")
            .await
            .status,
        200
    );
    assert_eq!(
        e.post("/_emulator/accounts/nobody/approve", "")
            .await
            .status,
        404
    );
    assert!(!e.h.approve("nobody"));
    assert_eq!(
        e.post("/v2/checkpoint", &cp).await.data("status"),
        "connected"
    );
    assert_eq!(e.h.stats().credits_charged, 2);
    e.h.shutdown().await;
}

#[tokio::test]
async fn actions_charge_and_insufficient_balance_refuses() {
    let e = emu().await;
    let id = e.connected("tok").await;
    let act = |a: &str| format!(r#"{{"account_id":"{id}","action":"{a}","params":{{"k":"x"}}}}"#);
    let a = e.post("/v2/profiles", &act("search_people")).await;
    assert_eq!((a.status, a.credits()), (200, 2));
    assert_eq!(a.json["metadata"]["action"], "search_people");
    assert_eq!(
        (a.data("account_id"), a.data("params")),
        (&json!(id), &json!({"k": "x"}))
    );
    assert_eq!(e.post("/v2/network", &act("decline")).await.credits(), 0);
    let a = e.post("/v2/profiles", &act("fly")).await;
    assert_eq!((a.status, a.code()), (400, "INVALID_ACTION"));
    let a = e
        .post("/v2/profiles", r#"{"account_id":"ghost","action":"get"}"#)
        .await;
    assert_eq!((a.status, a.code()), (404, "INVALID_ACCOUNT"));
    let a = e
        .post("/v2/enrich", r#"{"action":"find_email","params":{}}"#)
        .await;
    assert_eq!((a.status, a.credits()), (200, 2));
    assert_eq!(e.h.stats().credits_charged, 4);

    e.h.set_balance(2);
    let a = e.post("/v2/recruiter", &act("get_cv")).await;
    assert_eq!(
        (a.status, a.code(), a.credits()),
        (402, "INSUFFICIENT_CREDITS", 0)
    );
    assert_eq!(e.post("/v2/content", &act("create")).await.status, 200);
    let s = e.h.stats();
    assert_eq!((s.balance, s.credits_charged), (0, 6));
    let cp = format!(r#"{{"account_id":"{id}"}}"#);
    assert_eq!(
        e.post("/v2/checkpoint", &cp).await.code(),
        "INSUFFICIENT_CREDITS"
    );

    for key in [None, Some("wrong")] {
        let a = e.call(Method::GET, "/v2/credits", key, "").await.unwrap();
        assert_eq!((a.status, a.code()), (403, "INVALID_API_KEY"));
    }
    let a = e.post("/v2/inbox", "{}").await;
    assert_eq!((a.status, a.code()), (404, "INVALID_ACCOUNT"));
    let a = e.get("/v1/profile/me").await;
    assert_eq!((a.status, a.code()), (404, "NOT_FOUND"));
    e.h.shutdown().await;
}

#[tokio::test]
async fn accounts_list_and_webhooks() {
    let e = emu().await;
    let ids = [e.connected("a").await, e.connected("b").await];
    let a = e.get("/v2/accounts?limit=1&offset=1").await;
    assert_eq!(a.json["metadata"]["action"], "list_accounts");
    assert_eq!((a.data("total"), a.data("limit")), (&json!(2), &json!(1)));
    assert_eq!(a.data("items")[0]["account_id"], ids[1].as_str());
    assert_eq!(a.data("items")[0]["status"], "active");
    assert_eq!(e.get("/v2/accounts?limit=0").await.code(), "INVALID_PARAMS");
    e.h.set_active(&ids[0], false);
    let a = e.get(&format!("/v2/accounts/{}", ids[0])).await;
    assert_eq!(
        (a.data("status"), a.data("is_active")),
        (&json!("inactive"), &json!(false))
    );
    let send = format!(r#"{{"account_id":"{}","action":"send"}}"#, ids[0]);
    assert_eq!(
        e.post("/v2/messages", &send).await.code(),
        "ACCOUNT_INACTIVE"
    );

    let body = format!(r#"{{"account_id":"{}","enable_signature":true}}"#, ids[1]);
    let a = e.post("/v2/webhooks", &body).await;
    assert_eq!((a.status, a.credits()), (200, 0));
    assert!(a.data("secret").is_string());
    let wh = a.data("webhook_id").as_str().unwrap().to_owned();
    assert_eq!(e.get("/v2/webhooks").await.data("total"), 1);
    let a = e.post(&format!("/v2/webhooks/{wh}/stop"), "").await;
    assert_eq!(a.data("is_active"), false);
    let del = e
        .call(Method::DELETE, &format!("/v2/webhooks/{wh}"), Some(KEY), "")
        .await;
    assert_eq!(del.unwrap().status, 200);
    assert_eq!(
        e.get(&format!("/v2/webhooks/{wh}/events")).await.status,
        404
    );
    assert_eq!(e.post("/v2/webhooks", "{}").await.code(), "INVALID_PARAMS");
    e.h.shutdown().await;
}

#[tokio::test]
async fn faults_are_played_and_counted() {
    let e = emu().await;
    let id = e.connected("f").await;
    let before = e.h.stats();
    let a = e
        .post("/_emulator/faults", r#"{"mode":"error_5xx","count":1}"#)
        .await;
    assert_eq!(a.status, 200);
    let a = e.get("/v2/credits").await;
    assert_eq!(
        (a.status, a.code(), a.credits()),
        (500, "INTERNAL_ERROR", 0)
    );
    assert_eq!(e.get("/v2/credits").await.status, 200, "count 1: used up");

    e.h.set_faults(Faults {
        mode: FaultMode::BadGatewayHtml,
        count: 1,
        ..Default::default()
    });
    let a = e.get("/v2/credits").await;
    assert_eq!((a.status, a.content_type.as_str()), (502, "text/html"));
    assert!(a.json.is_null());

    // Reset: no answer, counted, nothing charged; the next call works.
    e.h.set_faults(Faults {
        mode: FaultMode::Reset,
        count: 1,
        ..Default::default()
    });
    let get = format!(r#"{{"account_id":"{id}","action":"get"}}"#);
    assert!(e
        .call(Method::POST, "/v2/profiles", Some(KEY), &get)
        .await
        .is_none());
    assert_eq!(e.post("/v2/profiles", &get).await.status, 200);

    // Scoped to one account (body or path); other requests pass.
    let only = Some(id.clone());
    e.h.set_faults(Faults {
        mode: FaultMode::RateLimited,
        account_id: only,
        ..Default::default()
    });
    let a = e.post("/v2/profiles", &get).await;
    assert_eq!((a.status, a.code()), (429, "RATE_LIMITED"));
    assert_eq!(a.json["metadata"]["action"], "get");
    assert_eq!(e.get(&format!("/v2/accounts/{id}")).await.status, 429);
    assert_eq!(e.get("/v2/credits").await.status, 200);
    e.h.set_faults(Faults {
        mode: FaultMode::InsufficientCredits,
        ..Default::default()
    });
    assert_eq!(e.get("/v2/credits").await.code(), "INSUFFICIENT_CREDITS");
    let s = e.h.stats();
    assert_eq!(s.total_calls - before.total_calls, 9);
    assert_eq!(s.credits_charged - before.credits_charged, 1);

    // Latency: concurrent requests show in max_in_flight.
    e.post("/_emulator/reset", "").await;
    e.h.set_faults(Faults {
        latency_ms: 200,
        ..Default::default()
    });
    let (a, b, c) = tokio::join!(
        e.get("/v2/credits"),
        e.get("/v2/credits"),
        e.get("/v2/credits")
    );
    assert_eq!((a.status, b.status, c.status), (200, 200, 200));
    let s = e.h.stats();
    assert_eq!((s.total_calls, s.in_flight, s.max_in_flight), (3, 0, 3));
    e.h.shutdown().await;
}

#[tokio::test]
async fn records_requests_and_serves_h2c() {
    let e = emu().await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(format!("{}/v2/login?x=1", e.h.url()))
        .header("x-api-key", KEY)
        .header("X-Custom", "kept")
        .body(Full::new(Bytes::from_static(br#"{"login_token":"h2"}"#)))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(
        (resp.version(), resp.status().as_u16()),
        (http::Version::HTTP_2, 200)
    );
    let seen = e.h.requests();
    let last = seen.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path_and_query.as_str()),
        ("POST", "/v2/login?x=1")
    );
    assert!(last
        .headers
        .iter()
        .any(|(k, v)| k == "x-custom" && v == "kept"));
    assert!(last.headers.iter().any(|(k, _)| k == "host"));
    assert_eq!(last.body, r#"{"login_token":"h2"}"#);
    let a = e.get("/_emulator/requests").await;
    assert_eq!(a.json[0]["path_and_query"], "/v2/login?x=1");
    let a = e.get("/_emulator/stats").await;
    assert_eq!(
        (
            &a.json["total_calls"],
            &a.json["calls_by_path"]["POST /v2/login"]
        ),
        (&json!(1), &json!(1))
    );
    e.post("/_emulator/reset", "").await;
    assert!(e.h.requests().is_empty());
    assert_eq!(e.h.stats().total_calls, 0);
    e.h.shutdown().await;
}
