//! Account scopes on every endpoint: a client scoped to one account walks the whole route
//! table and never reads or changes anything of another account.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::Value;

use crate::common::*;

const TEAM_A_KEY: &str = "lgw_team_a_virtual_key_DO_NOT_LEAK_5c01";

/// The emulator's account id for a login token.
fn account_of(token: &str) -> String {
    sha(token)[..24].to_owned()
}

struct Scene {
    h: Harness,
    a: String,
    b: String,
}

impl Scene {
    async fn start() -> Scene {
        let (a, b) = (account_of("tok-scope-a"), account_of("tok-scope-b"));
        let extra = format!(
            "[[clients]]\nname = \"team-a\"\nkey_sha256 = \"{}\"\naccounts = [\"{a}\"]\n",
            sha(TEAM_A_KEY)
        );
        let h = Harness::start_with("", &extra).await;
        assert_eq!(h.connected_account("tok-scope-a").await, a);
        assert_eq!(h.connected_account("tok-scope-b").await, b);
        Scene { h, a, b }
    }

    async fn team_a(&self, method: Method, path: &str, body: &str) -> Answer {
        self.h.call(method, path, Some(TEAM_A_KEY), body).await
    }

    /// A webhook made through the gateway by the unscoped client (the gateway sees its owner).
    async fn webhook_via_gateway(&self, account: &str) -> String {
        let w = self
            .h
            .post(
                "/v2/webhooks",
                &format!(r#"{{"account_id":"{account}","url":"https://hooks.example/x","enable_signature":true}}"#),
            )
            .await;
        assert_eq!(w.status, 200, "{}", w.text());
        w.json()["data"]["webhook_id"].as_str().unwrap().to_owned()
    }

    /// A webhook made straight at the upstream (the gateway has never seen it).
    async fn webhook_behind_its_back(&self, account: &str) -> String {
        let req = Request::post(format!("{}/v2/webhooks", self.h.emu.url()))
            .header("x-api-key", UPSTREAM_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"account_id":"{account}","enable_signature":true}}"#
            ))))
            .unwrap();
        let w = self.h.send(req).await;
        assert_eq!(w.status, 200, "{}", w.text());
        w.json()["data"]["webhook_id"].as_str().unwrap().to_owned()
    }

    /// Every webhook as the upstream has it.
    async fn upstream_webhooks(&self) -> Vec<Value> {
        let req = Request::get(format!("{}/v2/webhooks", self.h.emu.url()))
            .header("x-api-key", UPSTREAM_KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let a = self.h.send(req).await;
        a.json()["data"]["items"].as_array().unwrap().clone()
    }
}

fn ids(a: &Answer, key: &str) -> Vec<String> {
    a.json()["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[key].as_str().unwrap().to_owned())
        .collect()
}

fn forbidden(a: &Answer, what: &str) {
    assert_eq!(
        (a.status, a.code().as_str()),
        (403, "FORBIDDEN"),
        "{what}: {}",
        a.text()
    );
    assert!(!a.text().contains("whsec_"), "{what}: {}", a.text());
}

/// The webhook routes, each with the body it takes.
fn webhook_routes(id: &str) -> Vec<(Method, String, &'static str)> {
    vec![
        (Method::GET, format!("/v2/webhooks/{id}/events"), ""),
        (
            Method::PUT,
            format!("/v2/webhooks/{id}"),
            r#"{"url":"https://evil.example/"}"#,
        ),
        (Method::POST, format!("/v2/webhooks/{id}/stop"), ""),
        (Method::POST, format!("/v2/webhooks/{id}/start"), ""),
        (Method::POST, format!("/v2/webhooks/{id}/rotate-secret"), ""),
        (Method::DELETE, format!("/v2/webhooks/{id}/secret"), ""),
        (Method::DELETE, format!("/v2/webhooks/{id}"), ""),
    ]
}

#[tokio::test]
async fn a_scoped_client_sees_and_changes_only_its_accounts_on_every_route() {
    let s = Scene::start().await;
    let (a, b) = (s.a.clone(), s.b.clone());
    let wa = s.webhook_via_gateway(&a).await;
    let wb = s.webhook_via_gateway(&b).await;
    let wb_hidden = s.webhook_behind_its_back(&b).await;
    let wa_hidden = s.webhook_behind_its_back(&a).await;

    // Lists: filtered, totals too. The unscoped client sees everything.
    let all = s.h.get("/v2/accounts").await;
    assert_eq!(all.json()["data"]["total"], 2);
    let mine = s.team_a(Method::GET, "/v2/accounts", "").await;
    assert_eq!(mine.status, 200, "{}", mine.text());
    assert_eq!(ids(&mine, "account_id"), vec![a.clone()]);
    assert_eq!(mine.json()["data"]["total"], 1);
    assert_eq!(mine.json()["success"], true);
    let past = s
        .team_a(Method::GET, "/v2/accounts?limit=1&offset=1", "")
        .await;
    assert_eq!(
        (
            ids(&past, "account_id").len(),
            past.json()["data"]["total"].clone()
        ),
        (0, Value::from(1))
    );
    let hooks = s.team_a(Method::GET, "/v2/webhooks", "").await;
    assert_eq!(hooks.status, 200);
    let mut seen = ids(&hooks, "webhook_id");
    seen.sort();
    let mut want = vec![wa.clone(), wa_hidden.clone()];
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(hooks.json()["data"]["total"], 2);
    forbidden(
        &s.team_a(Method::GET, &format!("/v2/webhooks?account_id={b}"), "")
            .await,
        "list b's webhooks",
    );
    forbidden(
        &s.team_a(Method::GET, "/v2/logs", "").await,
        "logs of every account",
    );
    forbidden(
        &s.team_a(Method::GET, &format!("/v2/logs?account_id={b}"), "")
            .await,
        "b's logs",
    );
    assert_eq!(
        s.team_a(Method::GET, &format!("/v2/logs?account_id={a}"), "")
            .await
            .status,
        200
    );

    // Requests that name an account.
    forbidden(
        &s.team_a(Method::GET, &format!("/v2/accounts/{b}"), "")
            .await,
        "read b",
    );
    assert_eq!(
        s.team_a(Method::GET, &format!("/v2/accounts/{a}"), "")
            .await
            .status,
        200
    );
    forbidden(
        &s.team_a(Method::POST, "/v2/profiles", &action(&b, "get"))
            .await,
        "act for b",
    );
    forbidden(
        &s.team_a(Method::POST, "/v2/profiles", r#"{"action":"get"}"#)
            .await,
        "no account",
    );
    assert_eq!(
        s.team_a(Method::POST, "/v2/profiles", &action(&a, "get"))
            .await
            .status,
        200
    );
    forbidden(
        &s.team_a(
            Method::POST,
            "/v2/webhooks",
            &format!(r#"{{"account_id":"{b}"}}"#),
        )
        .await,
        "a webhook on b",
    );
    forbidden(
        &s.team_a(
            Method::POST,
            "/v2/login",
            r#"{"platform":"linkedin","login_token":"tok-new","country":"FR"}"#,
        )
        .await,
        "connect an account",
    );
    // Routes of no account.
    assert_eq!(s.team_a(Method::GET, "/v2/credits", "").await.status, 200);

    // Another account's webhooks, known to the gateway or not, by every route: refused, and
    // the upstream never hears of it.
    // (The lists above taught the gateway the hidden ones' owners; these two it has not seen.)
    let wb_late = s.webhook_behind_its_back(&b).await;
    let wa_late = s.webhook_behind_its_back(&a).await;
    let webhooks_before = s.upstream_webhooks().await;
    let calls = s.h.upstream_calls();
    for id in [&wb, &wb_hidden, &wb_late] {
        for (m, path, body) in webhook_routes(id) {
            let what = format!("{m} {path}");
            let ans = s.team_a(m, &path, body).await;
            forbidden(&ans, &what);
            assert!(
                ans.text().contains(&b),
                "{what}: names the owner: {}",
                ans.text()
            );
        }
    }
    // The one lookup of the hidden webhook's owner is the gateway's own list call.
    assert_eq!(s.h.upstream_calls(), calls + 1);
    assert_eq!(s.upstream_webhooks().await, webhooks_before);
    let unknown = s
        .team_a(Method::POST, "/v2/webhooks/wh_nope/stop", "")
        .await;
    forbidden(&unknown, "an unknown webhook");
    assert!(
        unknown.text().contains("cannot be established"),
        "{}",
        unknown.text()
    );

    // Its own, by every route, known or not.
    for id in [&wa, &wa_hidden, &wa_late] {
        for (m, path, body) in webhook_routes(id) {
            let ans = s.team_a(m.clone(), &path, body).await;
            assert_eq!(ans.status, 200, "{m} {path}: {}", ans.text());
        }
    }
    assert_eq!(
        s.upstream_webhooks().await.len(),
        3,
        "team-a deleted its three"
    );

    // The unscoped client is unaffected.
    let all = s.h.get("/v2/webhooks").await;
    assert_eq!(ids(&all, "webhook_id").len(), 3);
    let rotate =
        s.h.post(&format!("/v2/webhooks/{wb}/rotate-secret"), "")
            .await;
    assert_eq!(rotate.status, 200);
    assert!(rotate.text().contains("whsec_"));
}

#[tokio::test]
async fn a_scoped_clients_account_list_is_read_across_every_upstream_page() {
    // 1,030 accounts upstream (three pages of 500); team-a has the first, one on the second
    // page and the last.
    let tokens: Vec<String> = (0..1030).map(|i| format!("tok-page-{i}")).collect();
    let mine = [&tokens[0], &tokens[777], &tokens[1029]].map(|t| account_of(t));
    let extra = format!(
        "[[clients]]\nname = \"team-a\"\nkey_sha256 = \"{}\"\naccounts = [{}]\n",
        sha(TEAM_A_KEY),
        mine.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let h = Harness::start_with("", &extra).await;
    for t in &tokens {
        let req = Request::post(format!("{}/v2/login", h.emu.url()))
            .header("x-api-key", UPSTREAM_KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"platform":"linkedin","login_token":"{t}","country":"FR"}}"#
            ))))
            .unwrap();
        assert_eq!(h.send(req).await.status, 200);
    }
    let list = |q: &'static str| {
        let h = &h;
        async move { h.call(Method::GET, q, Some(TEAM_A_KEY), "").await }
    };
    let all = list("/v2/accounts").await;
    assert_eq!(all.status, 200, "{}", all.text());
    assert_eq!(ids(&all, "account_id"), mine.to_vec());
    assert_eq!(all.json()["data"]["total"], 3);
    let second = list("/v2/accounts?limit=1&offset=1").await;
    assert_eq!(ids(&second, "account_id"), vec![mine[1].clone()]);
    assert_eq!(
        (
            second.json()["data"]["limit"].clone(),
            second.json()["data"]["offset"].clone()
        ),
        (Value::from(1), Value::from(1))
    );
    let bad = list("/v2/accounts?limit=501").await;
    assert_eq!((bad.status, bad.code().as_str()), (400, "INVALID_PARAMS"));
}
