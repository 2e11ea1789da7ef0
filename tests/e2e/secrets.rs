//! Neither the upstream key nor a virtual key ever shows up in a log line, an error body, a
//! response header or an admin answer.

use http::Method;

use crate::common::*;

#[tokio::test]
async fn keys_never_leak_into_logs_errors_or_admin_answers() {
    let h = Harness::start().await;
    let mut exposed: Vec<String> = Vec::new();
    let mut record = |a: &Answer| {
        exposed.push(String::from_utf8_lossy(&a.body).into_owned());
        for (k, v) in &a.headers {
            exposed.push(format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())));
        }
    };
    let account = h.connected_account("tok-secrets").await;
    record(&h.get("/v2/credits").await);
    record(
        &h.post(
            "/v2/profiles",
            &format!(r#"{{"account_id":"{account}","action":"get"}}"#),
        )
        .await,
    );
    record(&h.post("/v2/checkpoint", "not json").await);
    record(
        &h.call(
            Method::GET,
            "/v2/credits",
            Some("lgw_wrong_DO_NOT_LEAK"),
            "",
        )
        .await,
    );
    record(
        &h.call(
            Method::POST,
            "/v2/checkpoint",
            Some(SCOPED_KEY),
            r#"{"account_id":"x"}"#,
        )
        .await,
    );
    record(&h.post("/v2/inbox", "{}").await);
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        mode: linkup_gateway::emulator::FaultMode::Reset,
        count: 1,
        ..Default::default()
    });
    record(&h.get("/v2/credits").await);
    for p in ["/metrics", "/config", "/healthz", "/readyz"] {
        record(&h.admin(p).await);
    }
    // A rejected reload reports problems without the key.
    std::fs::write(h.config_path(), "[upstream]\nurl = \"nope\"\n").unwrap();
    for p in h.gw.reload().unwrap_err() {
        exposed.push(p);
    }
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(logs.contains("\"request\""), "logs were captured");
    exposed.push(logs);
    let all = exposed.join("\n");
    for secret in [
        UPSTREAM_KEY,
        ALPHA_KEY,
        SCOPED_KEY,
        "lgw_wrong_DO_NOT_LEAK",
        &sha(ALPHA_KEY),
    ] {
        assert!(!all.contains(secret), "leaked: {secret}");
    }
}

/// An upstream that echoes the stored key, sets a cookie or names its server: the caller sees
/// only the headers it needs, and never the key; an answer with an oversized header is a 502.
#[tokio::test]
async fn upstream_answer_headers_are_filtered_and_oversized_ones_refused() {
    use linkup_gateway::emulator::{FaultMode, Faults};
    let h = Harness::start().await;
    h.emu.set_faults(Faults {
        mode: FaultMode::LeakyHeaders,
        ..Default::default()
    });
    let a = h.get("/v2/credits").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    assert!(a.headers.contains_key("x-request-id"));
    for name in ["set-cookie", "x-api-key", "x-debug", "server"] {
        assert!(!a.headers.contains_key(name), "{name} reached the caller");
    }
    for (k, v) in &a.headers {
        assert!(
            !String::from_utf8_lossy(v.as_bytes()).contains(UPSTREAM_KEY),
            "{k} carries the stored key"
        );
    }

    h.emu.set_faults(Faults {
        mode: FaultMode::HugeHeader,
        ..Default::default()
    });
    let a = h.get("/v2/credits").await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert_eq!(a.code(), "UPSTREAM_UNAVAILABLE");
    assert!(
        !a.text().contains(&"x".repeat(64)),
        "the oversized header came back"
    );
}
