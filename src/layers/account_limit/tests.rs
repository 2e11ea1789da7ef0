//! Unit tests of `account_limit`, in a file of their own to keep the module short.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::context::Route;
use crate::metrics::{Label, RateLimitedLabels};
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

/// A client `crm`, with `extra` config after it.
fn shared(extra: &str) -> Arc<Shared> {
    Arc::new(crate::shared::for_tests(&format!(
        "[[clients]]
name = \"crm\"
key_sha256 = \"{}\"
{extra}
",
        "ab".repeat(32)
    )))
}

fn req(s: &Shared, path: &str, account: Option<&str>, action: Option<&str>) -> Request<Bytes> {
    let mut r = Request::post(path).body(Bytes::new()).unwrap();
    r.extensions_mut().insert(s.settings.clients[0].clone());
    r.extensions_mut().insert(RequestContext {
        route: Route::Profiles,
        action: action.map(Arc::from),
        account_id: account.map(Arc::from),
        code: None,
    });
    r
}

/// The layer over a stub upstream answering `status`/`body`; counts calls.
async fn call(
    s: &Arc<Shared>,
    calls: &Arc<AtomicUsize>,
    r: Request<Bytes>,
    status: u16,
    body: &'static str,
) -> Result<Response<Bytes>, GatewayError> {
    let c = calls.clone();
    AccountLimitLayer::new(s.clone())
        .layer(tower::service_fn(move |_r: Request<Bytes>| {
            c.fetch_add(1, Ordering::SeqCst);
            let mut resp = Response::new(Bytes::from_static(body.as_bytes()));
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            async move { Ok::<_, GatewayError>(resp) }
        }))
        .oneshot(r)
        .await
}

const OK: &str = r#"{"success":true}"#;

#[tokio::test(start_paused = true)]
async fn each_account_has_its_bucket_and_answers_carry_the_ratelimit_headers() {
    let s = shared("[rate_limit]\nper_account = \"2/min\"\nburst = 2");
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let r = call(
            &s,
            &calls,
            req(&s, "/v2/profiles", Some("a"), None),
            200,
            OK,
        )
        .await
        .unwrap();
        assert!(r.headers().contains_key(RATELIMIT_POLICY));
        assert!(r.headers().contains_key(RATELIMIT));
    }
    let e = call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("a"), None),
        200,
        OK,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), "RATE_LIMITED");
    assert!(
        e.to_string().contains("account a is limited to 2/min"),
        "{e}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the refusal is not forwarded"
    );
    // Another account, and requests without one (per client), have buckets of their own.
    call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("b"), None),
        200,
        OK,
    )
    .await
    .unwrap();
    call(&s, &calls, req(&s, "/v2/enrich", None, None), 200, OK)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn the_first_matching_rule_wins_and_a_shadow_rule_only_counts() {
    let s = shared(
            "[rate_limit]\nper_account = \"100/min\"\nburst = 100\n\
             [[rate_limit.rules]]\nname = \"invites\"\npath = \"/v2/network\"\naction = \"invite\"\nper_account = \"1/day\"\nburst = 1\n\
             [[rate_limit.rules]]\nname = \"reads\"\npath = \"/v2/network\"\nper_account = \"1/day\"\nburst = 1\nshadow = true\n",
        );
    let calls = Arc::new(AtomicUsize::new(0));
    let invite = || req(&s, "/v2/network", Some("a"), Some("invite"));
    call(&s, &calls, invite(), 200, OK).await.unwrap();
    let e = call(&s, &calls, invite(), 200, OK).await.unwrap_err();
    assert!(e.to_string().contains("by rule `invites`"), "{e}");
    // The shadow rule lets its second request through and counts it.
    let read = || req(&s, "/v2/network", Some("a"), Some("list"));
    call(&s, &calls, read(), 200, OK).await.unwrap();
    call(&s, &calls, read(), 200, OK).await.unwrap();
    let shadowed = s
        .process
        .metrics
        .rate_limited
        .get_or_create(&RateLimitedLabels {
            client: Label(Arc::from("crm")),
            reason: Label(Arc::from("reads")),
            shadow: true,
        })
        .get();
    assert_eq!(shadowed, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_rate_limited_answer_holds_the_account_back_for_the_cooldown() {
    let s = shared("[rate_limit]\nupstream_429_cooldown = \"30s\"");
    let calls = Arc::new(AtomicUsize::new(0));
    let limited = r#"{"success":false,"error":{"code":"RATE_LIMITED","message":"slow down"}}"#;
    let r = call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("a"), None),
        429,
        limited,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 429, "the upstream's answer passes through");
    let e = call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("a"), None),
        200,
        OK,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("rate limited by LinkupAPI"), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "held back, not forwarded");
    // Other accounts are not held; a 429 of another kind holds nobody.
    call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("b"), None),
        429,
        OK,
    )
    .await
    .unwrap();
    call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("b"), None),
        200,
        OK,
    )
    .await
    .unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    call(
        &s,
        &calls,
        req(&s, "/v2/profiles", Some("a"), None),
        200,
        OK,
    )
    .await
    .unwrap();
}
