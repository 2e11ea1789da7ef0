//! Unit tests of `coalesce`, in a file of their own to keep the module short.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::layers::status_cache::CachedStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Semaphore;
use tower::ServiceExt;

type TestSvc = tower::util::BoxCloneService<Request<Bytes>, Response<Bytes>, GatewayError>;

fn req(account: &str, code: Option<&str>) -> Request<Bytes> {
    let mut r = Request::post("/v2/checkpoint").body(Bytes::new()).unwrap();
    r.extensions_mut().insert(RequestContext {
        route: Route::Checkpoint,
        action: None,
        account_id: Some(Arc::from(account)),
        code: code.map(Arc::from),
    });
    r.extensions_mut().insert(Arc::new(RequestLog::new(
        HeaderValue::from_static("id"),
        Route::Checkpoint,
    )));
    r
}

/// A stub upstream that holds every call until the test adds a permit to `gate`, counts
/// calls and the most in flight at once, and answers with the call's number.
struct Upstream {
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Upstream {
    fn new() -> Upstream {
        Upstream {
            gate: Arc::new(Semaphore::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn service(&self, answer: fn(usize) -> Result<Response<Bytes>, GatewayError>) -> TestSvc {
        let (gate, calls, in_flight, max) = (
            self.gate.clone(),
            self.calls.clone(),
            self.in_flight.clone(),
            self.max_in_flight.clone(),
        );
        TestSvc::new(tower::service_fn(move |_r: Request<Bytes>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            let (gate, in_flight) = (gate.clone(), in_flight.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                in_flight.fetch_sub(1, Ordering::SeqCst);
                answer(n)
            }
        }))
    }

    async fn until_called(&self, n: usize) {
        while self.calls.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    }
}

fn ok(n: usize) -> Result<Response<Bytes>, GatewayError> {
    let mut r = Response::new(Bytes::from(format!(r#"{{"call":{n}}}"#)));
    r.headers_mut().insert("x-upstream", HeaderValue::from(n));
    Ok(r)
}

fn layer(flights: &Flights, store: Option<Arc<StatusStore>>, timeout_s: u64) -> CoalesceLayer {
    CoalesceLayer::new(
        true,
        flights.clone(),
        store,
        Arc::new(Process::default()),
        Duration::from_secs(timeout_s),
    )
}

async fn until_joined(flights: &Flights, account: &str, n: usize) {
    while flights.joined(account) != Some(n) {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn identical_checkpoints_share_the_first_upstream_call() {
    let up = Upstream::new();
    let flights = Flights::default();
    let l = layer(&flights, None, 30);
    let process = l.process.clone();
    let svc = l.layer(up.service(ok));
    let leader = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    up.until_called(1).await;
    let followers: Vec<_> = (0..50)
        .map(|_| {
            let r = req("a", Some("1"));
            let log = r.extensions().get::<Arc<RequestLog>>().cloned().unwrap();
            (tokio::spawn(svc.clone().oneshot(r)), log)
        })
        .collect();
    until_joined(&flights, "a", 50).await;
    up.gate.add_permits(1);
    let first = leader.await.unwrap().unwrap();
    assert!(!first.headers().contains_key(X_GATEWAY_COALESCED));
    assert_eq!(first.extensions().get::<AnsweredBy>(), None);
    for (f, log) in followers {
        let r = f.await.unwrap().unwrap();
        assert_eq!(r.body(), first.body());
        assert_eq!(r.headers()["x-upstream"], "1");
        assert_eq!(r.headers()[X_GATEWAY_COALESCED], "true");
        assert_eq!(
            r.extensions().get::<AnsweredBy>(),
            Some(&AnsweredBy::Coalesced)
        );
        assert_eq!(log.credits(), Some(0));
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    assert_eq!(process.metrics.checkpoint_coalesced.get(), 50);
    assert!(flights.is_empty());
}

#[tokio::test]
async fn a_submit_after_the_call_finished_starts_a_new_one() {
    let up = Upstream::new();
    up.gate.add_permits(2);
    let flights = Flights::default();
    let svc = layer(&flights, None, 30).layer(up.service(ok));
    svc.clone().oneshot(req("a", Some("1"))).await.unwrap();
    let r = svc.oneshot(req("a", Some("1"))).await.unwrap();
    assert_eq!(r.headers()["x-upstream"], "2");
    assert!(flights.is_empty());
}

async fn until_waiting(flights: &Flights, account: &str, n: usize) {
    while flights.waiting(account) != Some(n) {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn another_code_waits_for_the_call_in_flight_then_goes_on() {
    let up = Upstream::new();
    let flights = Flights::default();
    let svc = layer(&flights, None, 30).layer(up.service(ok));
    let wrong = tokio::spawn(svc.clone().oneshot(req("a", Some("000000"))));
    up.until_called(1).await;
    let right = tokio::spawn(svc.clone().oneshot(req("a", Some("123456"))));
    until_waiting(&flights, "a", 1).await;
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    up.gate.add_permits(1);
    assert_eq!(wrong.await.unwrap().unwrap().headers()["x-upstream"], "1");
    up.until_called(2).await;
    up.gate.add_permits(1);
    let r = right.await.unwrap().unwrap();
    assert_eq!(r.headers()["x-upstream"], "2");
    assert!(!r.headers().contains_key(X_GATEWAY_COALESCED));
    assert_eq!(up.max_in_flight.load(Ordering::SeqCst), 1);
    assert!(flights.is_empty());
}

#[tokio::test]
async fn other_accounts_are_not_held_up() {
    let up = Upstream::new();
    let flights = Flights::default();
    let svc = layer(&flights, None, 30).layer(up.service(ok));
    let a = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    up.until_called(1).await;
    let b = tokio::spawn(svc.clone().oneshot(req("b", Some("1"))));
    up.until_called(2).await;
    assert_eq!(flights.len(), 2);
    up.gate.add_permits(2);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test]
async fn after_waiting_a_connected_account_is_answered_from_the_cache() {
    let up = Upstream::new();
    let flights = Flights::default();
    let store = Arc::new(StatusStore::new(Duration::from_secs(60), 10));
    let svc = layer(&flights, Some(store.clone()), 30).layer(up.service(|_| {
        Ok(Response::new(Bytes::from_static(
            br#"{"success":true,"data":{"account_id":"a","status":"connected"}}"#,
        )))
    }));
    let right = tokio::spawn(svc.clone().oneshot(req("a", Some("123456"))));
    up.until_called(1).await;
    let late = tokio::spawn(svc.clone().oneshot(req("a", Some("654321"))));
    until_waiting(&flights, "a", 1).await;
    up.gate.add_permits(1);
    right.await.unwrap().unwrap();
    let r = late.await.unwrap().unwrap();
    assert_eq!(r.headers()[status_cache::X_GATEWAY_CACHE], "hit");
    assert_eq!(r.extensions().get::<AnsweredBy>(), Some(&AnsweredBy::Cache));
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.get("a").await, Some(CachedStatus::Connected));
}

#[tokio::test]
async fn a_submit_that_missed_the_cache_just_before_a_call_connected_the_account_is_a_hit() {
    // The status_cache layer above saw `checkpoint_required`; by the time this submit
    // joins, the call in flight has ended and connected the account.
    let up = Upstream::new();
    let flights = Flights::default();
    let store = Arc::new(StatusStore::new(Duration::from_secs(60), 10));
    store
        .remember(Arc::from("a"), CachedStatus::Connected)
        .await;
    let svc = layer(&flights, Some(store), 30).layer(up.service(ok));
    let r = svc.oneshot(req("a", Some("123456"))).await.unwrap();
    assert_eq!(r.headers()[status_cache::X_GATEWAY_CACHE], "hit");
    assert_eq!(up.calls.load(Ordering::SeqCst), 0);
    assert!(flights.is_empty());
}

#[tokio::test]
async fn the_call_goes_on_when_the_leader_hangs_up() {
    let up = Upstream::new();
    let flights = Flights::default();
    let svc = layer(&flights, None, 30).layer(up.service(ok));
    let leader = tokio::spawn(svc.clone().oneshot(req("a", None)));
    up.until_called(1).await;
    let follower = tokio::spawn(svc.clone().oneshot(req("a", None)));
    until_joined(&flights, "a", 1).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    up.gate.add_permits(1);
    let r = follower.await.unwrap().unwrap();
    assert_eq!(r.headers()["x-upstream"], "1");
    assert_eq!(r.headers()[X_GATEWAY_COALESCED], "true");
    assert!(flights.is_empty());
}

#[tokio::test]
async fn errors_are_shared_like_answers() {
    let up = Upstream::new();
    let flights = Flights::default();
    let svc = layer(&flights, None, 30).layer(up.service(|_| {
        Err(GatewayError::UpstreamUnavailable {
            message: "reset".into(),
            maybe_sent: true,
        })
    }));
    let leader = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    up.until_called(1).await;
    let follower = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    until_joined(&flights, "a", 1).await;
    up.gate.add_permits(1);
    for r in [leader.await.unwrap(), follower.await.unwrap()] {
        assert_eq!(r.unwrap_err().code(), "UPSTREAM_UNAVAILABLE");
    }
    assert!(flights.is_empty());
}

fn explode() -> Result<Response<Bytes>, GatewayError> {
    panic!("the upstream stub panics (on purpose)")
}

#[tokio::test]
async fn a_panicking_call_leaves_no_entry_behind() {
    let up = Upstream::new();
    let flights = Flights::default();
    let svc = layer(&flights, None, 30).layer(up.service(|_| explode()));
    let leader = tokio::spawn(svc.clone().oneshot(req("a", None)));
    up.until_called(1).await;
    let follower = tokio::spawn(svc.clone().oneshot(req("a", None)));
    until_joined(&flights, "a", 1).await;
    up.gate.add_permits(1);
    for r in [leader.await.unwrap(), follower.await.unwrap()] {
        assert_eq!(r.unwrap_err().code(), "UPSTREAM_UNAVAILABLE");
    }
    assert!(flights.is_empty());
}

#[tokio::test(start_paused = true)]
async fn nobody_waits_longer_than_the_request_timeout() {
    let up = Upstream::new();
    let flights = Flights::default();
    let svc = layer(&flights, None, 5).layer(up.service(ok));
    let leader = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    up.until_called(1).await;
    let follower = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    let waiter = tokio::spawn(svc.clone().oneshot(req("a", Some("2"))));
    until_joined(&flights, "a", 1).await;
    until_waiting(&flights, "a", 1).await;
    // The stub never answers; paused time runs on to the timeouts.
    for r in [
        leader.await.unwrap(),
        follower.await.unwrap(),
        waiter.await.unwrap(),
    ] {
        assert_eq!(r.unwrap_err().code(), "UPSTREAM_TIMEOUT");
    }
    // The calls' own tasks give up too (the waiter's went on after the first ended), so
    // the account is free again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(flights.is_empty());
}

#[tokio::test]
async fn switched_off_or_not_a_checkpoint_it_passes_through() {
    let up = Upstream::new();
    let flights = Flights::default();
    let mut l = layer(&flights, None, 30);
    l.enabled = false;
    let svc = l.layer(up.service(ok));
    let a = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    let b = tokio::spawn(svc.clone().oneshot(req("a", Some("1"))));
    up.until_called(2).await;
    assert!(flights.is_empty());
    up.gate.add_permits(2);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    let svc = layer(&flights, None, 30).layer(up.service(ok));
    let mut r = req("a", Some("1"));
    r.extensions_mut().insert(RequestContext {
        route: Route::Profiles,
        action: None,
        account_id: Some(Arc::from("a")),
        code: None,
    });
    let a = tokio::spawn(svc.clone().oneshot(r));
    up.until_called(3).await;
    assert!(flights.is_empty());
    up.gate.add_permits(1);
    a.await.unwrap().unwrap();
}
