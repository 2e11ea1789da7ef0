//! The fleet store against a real redis-server: two `Fleet`s on one Redis act as one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use linkup_gateway::budgets::{now_ms, utc_day};
use linkup_gateway::config::{load_str, parse_quota, FleetSettings};
use linkup_gateway::fleet::{
    Admission, AdmitRequest, BudgetCheck, Fleet, FlightRole, LimitCheck, Part, RemoteAnswer,
};
use linkup_gateway::layers::status_cache::CachedStatus;
use linkup_gateway::ledger::{Ledger, MemoryLedger, Outcome, Row};
use linkup_gateway::limits::{Limiter, Subject};
use tokio::time::Instant;

use crate::servers::Redis;

fn settings(url: &str, extra: &str) -> FleetSettings {
    let text = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n[fleet]\nredis_url = \"{url}\"\ntimeout = \"1s\"\nlocal_status_ttl = \"30s\"\ncheckpoint_lease = \"1s\"\n{extra}"
    );
    load_str(&text, &[("K".into(), "k".into())], None)
        .unwrap()
        .fleet
        .unwrap()
}

async fn fleet_with(url: &str, extra: &str, ledger: Arc<dyn Ledger>) -> Arc<Fleet> {
    Fleet::connect(&settings(url, extra), ledger).await.unwrap()
}

async fn fleet(url: &str) -> Arc<Fleet> {
    fleet_with(url, "", Arc::new(MemoryLedger::default())).await
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn account(a: &str) -> Subject {
    Subject::Account(Arc::from(a))
}

fn limit_only<'a>(l: &'a Limiter, s: &'a Subject) -> AdmitRequest<'a> {
    AdmitRequest {
        limit: Some(LimitCheck {
            limiter: l,
            subject: s,
            shadow: false,
        }),
        ..Default::default()
    }
}

fn budget_only(client: &str, cost: u64, budget: u64) -> AdmitRequest<'_> {
    AdmitRequest {
        budget: Some(BudgetCheck {
            client,
            cost,
            budget: Some(budget),
            enforce: true,
            day: utc_day(now_ms()),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_fleets_share_one_account_limit_with_local_retry_after() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    assert!(a.is_up() && b.is_up());
    let l = Limiter::new("account", parse_quota("3/min").unwrap(), 3);
    let s = account("acc_1");
    let mut allowed = 0;
    for (i, f) in [&a, &b, &a, &b, &a, &b].into_iter().enumerate() {
        match f.admit(&limit_only(&l, &s)).await.unwrap() {
            Admission::Allowed { limit, .. } => {
                allowed += 1;
                let (remaining, _) = limit.unwrap();
                assert_eq!(remaining, 3 - allowed, "request {i}");
            }
            Admission::Refused { part, wait, .. } => {
                assert_eq!(part, Part::Limit);
                // As the local limiter: the 4th within 3/min waits 20 s (less the time gone by).
                assert!(
                    wait <= Duration::from_secs(20) && wait > Duration::from_secs(19),
                    "{wait:?}"
                );
            }
        }
    }
    assert_eq!(allowed, 3, "3/min across both replicas");
    // Another account has its own bucket.
    assert!(matches!(
        b.admit(&limit_only(&l, &account("acc_2"))).await.unwrap(),
        Admission::Allowed { .. }
    ));
    let rt = a
        .metrics
        .round_trips
        .get_or_create(&linkup_gateway::metrics::OpLabels { op: "admit" })
        .get();
    assert_eq!(rt, 3, "one round trip per admit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_client_limit_is_global_and_a_refusal_takes_nothing() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let client = Limiter::new("client crm", parse_quota("2/min").unwrap(), 2);
    let who = Subject::Client(Arc::from("crm"));
    let acct = Limiter::new("account", parse_quota("100/min").unwrap(), 100);
    let req = |i: usize| -> (Subject, usize) { (account(&format!("acc_{i}")), i) };
    let mut allowed = 0;
    for i in 0..6 {
        let (s, _) = req(i);
        let f = if i % 2 == 0 { &a } else { &b };
        let r = AdmitRequest {
            limit: Some(LimitCheck {
                limiter: &acct,
                subject: &s,
                shadow: false,
            }),
            client: Some(LimitCheck {
                limiter: &client,
                subject: &who,
                shadow: false,
            }),
            ..Default::default()
        };
        match f.admit(&r).await.unwrap() {
            Admission::Allowed { .. } => allowed += 1,
            Admission::Refused { part, .. } => assert_eq!(part, Part::Client),
        }
    }
    assert_eq!(allowed, 2);
    // All or nothing: the refused requests took no account cell (acc_2.. are untouched:
    // a 1-burst account limit still allows them).
    let one = Limiter::new("account", parse_quota("1/min").unwrap(), 1);
    let s = account("acc_5");
    assert!(matches!(
        a.admit(&limit_only(&one, &s)).await.unwrap(),
        Admission::Allowed { .. }
    ));
    // A budget refusal takes no limit cell either.
    let s = account("acc_b");
    let r = AdmitRequest {
        limit: Some(LimitCheck {
            limiter: &one,
            subject: &s,
            shadow: false,
        }),
        ..budget_only("poor", 5, 1)
    };
    assert!(matches!(
        a.admit(&r).await.unwrap(),
        Admission::Refused {
            part: Part::Budget,
            ..
        }
    ));
    assert!(matches!(
        b.admit(&limit_only(&one, &s)).await.unwrap(),
        Admission::Allowed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_cooldown_holds_the_account_on_every_replica() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    a.hold("acc", Duration::from_secs(60)).await.unwrap();
    let r = AdmitRequest {
        cooldown: Some(("acc", false)),
        ..Default::default()
    };
    let Admission::Refused { part, wait, .. } = b.admit(&r).await.unwrap() else {
        panic!("held back")
    };
    assert_eq!(part, Part::Cooldown);
    assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60));
    // Shadow: counted, not refused.
    let r = AdmitRequest {
        cooldown: Some(("acc", true)),
        ..Default::default()
    };
    let Admission::Allowed { shadowed, .. } = b.admit(&r).await.unwrap() else {
        panic!("shadow")
    };
    assert!(shadowed.cooldown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_limits_and_budgets_count_but_never_refuse_as_locally() {
    let redis = Redis::start();
    let f = fleet(&redis.url()).await;
    let l = Limiter::new("account", parse_quota("1/min").unwrap(), 1);
    let s = account("acc_sh");
    let shadow = |l: &'static Limiter, s: &'static Subject| AdmitRequest {
        limit: Some(LimitCheck {
            limiter: l,
            subject: s,
            shadow: true,
        }),
        budget: Some(BudgetCheck {
            client: "sh",
            cost: 2,
            budget: Some(1),
            enforce: false,
            day: utc_day(now_ms()),
        }),
        ..Default::default()
    };
    let (l, s): (&'static Limiter, &'static Subject) =
        (Box::leak(Box::new(l)), Box::leak(Box::new(s)));
    let Admission::Allowed { shadowed, .. } = f.admit(&shadow(l, s)).await.unwrap() else {
        panic!()
    };
    assert!(!shadowed.limit && shadowed.budget, "{shadowed:?}");
    let Admission::Allowed {
        shadowed,
        limit,
        standing,
        ..
    } = f.admit(&shadow(l, s)).await.unwrap()
    else {
        panic!()
    };
    assert!(shadowed.limit && shadowed.budget, "{shadowed:?}");
    assert_eq!(limit, None, "no RateLimit header for a shadow refusal");
    assert_eq!(standing.reserved, 4, "a shadow budget still reserves");
    // A shadow refusal took no cell: the bucket refuses (enforced) for the same wait as before.
    let Admission::Refused { part, wait, .. } = f.admit(&limit_only(l, s)).await.unwrap() else {
        panic!()
    };
    assert_eq!(part, Part::Limit);
    assert!(wait > Duration::from_secs(59), "{wait:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_budget_of_10_admits_exactly_10_of_100_across_two_replicas_and_settles() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let f = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            match f.admit(&budget_only("crm", 1, 10)).await.unwrap() {
                Admission::Allowed { marker, .. } => Some(marker),
                Admission::Refused { .. } => None,
            }
        }));
    }
    let mut markers = Vec::new();
    for t in tasks {
        markers.extend(t.await.unwrap());
    }
    assert_eq!(markers.len(), 10);
    let marker = markers[0].clone();
    assert!(
        markers.iter().all(|m| *m == marker),
        "one store, one marker"
    );
    let day = utc_day(now_ms());
    let s = a.standing("crm", day).await.unwrap();
    assert_eq!((s.spent, s.reserved), (0, 10));
    // Settle: 4 charged 1, 3 charged 0, 3 ambiguous (kept as charged).
    for charged in [1, 1, 1, 1, 0, 0, 0, 1, 1, 1] {
        b.settle("crm", day, 1, charged, &marker)
            .await
            .unwrap()
            .unwrap();
    }
    let s = b.standing("crm", day).await.unwrap();
    assert_eq!((s.spent, s.reserved), (7, 0));
    // The spawned form, drained as on shutdown.
    a.settle_eventually(Arc::from("crm"), day, 0, 0, marker.clone(), |_| {});
    assert!(a.admit(&budget_only("crm", 1, 10)).await.is_ok());
    a.settle_eventually(Arc::from("crm"), day, 1, 0, marker.clone(), |_| {});
    assert!(a.drain(Duration::from_secs(5)).await);
    assert_eq!(b.standing("crm", day).await.unwrap().reserved, 0);
    // 3 left: one request of 3 fits, then nothing.
    assert!(matches!(
        a.admit(&budget_only("crm", 3, 10)).await.unwrap(),
        Admission::Allowed { .. }
    ));
    let Admission::Refused { part, standing, .. } =
        b.admit(&budget_only("crm", 1, 10)).await.unwrap()
    else {
        panic!("budget spent")
    };
    assert_eq!(
        (part, standing.spent, standing.reserved),
        (Part::Budget, 7, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_learnt_by_one_replica_is_seen_by_the_other_and_changes_invalidate_copies() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let acc: Arc<str> = Arc::from("acc_s");
    eventually("subscribed", async || {
        a.is_subscribed() && b.is_subscribed()
    })
    .await;
    assert_eq!(
        b.status_get(&acc).await.unwrap(),
        None,
        "b now holds a local 'unknown'"
    );
    a.status_set(&acc, CachedStatus::Connected, Duration::from_secs(600))
        .await
        .unwrap();
    // b's local copy (30 s) is dropped by a's message.
    eventually("b sees connected", async || {
        b.status_get(&acc).await.unwrap() == Some(CachedStatus::Connected)
    })
    .await;
    let pttl = redis.command(&["PTTL", "lgw:status:acc_s"]);
    let pttl: u64 = pttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(
        (590_000..=600_000).contains(&pttl),
        "TTL as status_cache.ttl: {pttl}"
    );
    // b's copy is local now; a change made by a drops it.
    let before = b
        .metrics
        .round_trips
        .get_or_create(&linkup_gateway::metrics::OpLabels { op: "status_get" })
        .get();
    assert_eq!(
        b.status_get(&acc).await.unwrap(),
        Some(CachedStatus::Connected)
    );
    let after = b
        .metrics
        .round_trips
        .get_or_create(&linkup_gateway::metrics::OpLabels { op: "status_get" })
        .get();
    assert_eq!(before, after, "served from the local copy");
    assert!(a.status_forget(&acc).await.unwrap());
    eventually("b forgets", async || {
        b.status_get(&acc).await.unwrap().is_none()
    })
    .await;
    a.status_set(
        &acc,
        CachedStatus::CheckpointRequired,
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    eventually("b sees checkpoint_required", async || {
        b.status_get(&acc).await.unwrap() == Some(CachedStatus::CheckpointRequired)
    })
    .await;
    assert!(b.metrics.status_invalidations.get() >= 3);
}

fn answer(n: usize) -> RemoteAnswer {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("x-call", HeaderValue::from(n));
    RemoteAnswer::Answer {
        status: StatusCode::OK,
        headers,
        body: Bytes::from(format!(
            "{{\"success\":true,\"data\":{{\"status\":\"connected\"}},\"n\":{n}}}"
        )),
    }
}

#[test]
fn remote_answers_round_trip() {
    for a in [
        answer(7),
        RemoteAnswer::Failed {
            timeout: Some(Duration::from_secs(60)),
            message: "the request took longer than 60s".into(),
        },
        RemoteAnswer::Failed {
            timeout: None,
            message: "reset".into(),
        },
    ] {
        assert_eq!(RemoteAnswer::decode(&a.encode()), Some(a));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_hundred_attempts_across_two_replicas_make_one_leader_and_all_share_its_answer() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let leaders = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let f = if i % 2 == 0 { a.clone() } else { b.clone() };
        let leaders = leaders.clone();
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            match f.flight("acc_l", Some("123456"), deadline).await.unwrap() {
                FlightRole::Leader(lease) => {
                    leaders.fetch_add(1, Ordering::SeqCst);
                    // The call takes longer than the lease: renewals keep it.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    lease.publish(&answer(1)).await.unwrap();
                    answer(1)
                }
                FlightRole::Answer(a) => a,
                other => panic!("{other:?}"),
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), answer(1));
    }
    assert_eq!(leaders.load(Ordering::SeqCst), 1);
    assert_eq!(
        redis.command(&["EXISTS", "lgw:lease:acc_l"]),
        ":0\r\n",
        "released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_follower_reads_the_stored_answer_and_another_code_waits_then_goes_on() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let deadline = || Instant::now() + Duration::from_secs(10);
    let FlightRole::Leader(lease) = a.flight("acc", Some("1"), deadline()).await.unwrap() else {
        panic!()
    };
    // Another code waits for the call in flight, then is told to look again.
    let other = {
        let b = b.clone();
        tokio::spawn(async move { b.flight("acc", Some("2"), deadline()).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !other.is_finished(),
        "never two checkpoints in flight per account"
    );
    lease.publish(&answer(3)).await.unwrap();
    assert!(matches!(other.await.unwrap(), FlightRole::Ended));
    // A new attempt after the end leads afresh.
    let FlightRole::Leader(lease) = b.flight("acc", Some("2"), deadline()).await.unwrap() else {
        panic!("a finished call releases the account")
    };
    drop(lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_dies_without_an_answer_is_taken_over_after_its_lease() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let FlightRole::Leader(lease) = a.flight("acc_d", None, deadline).await.unwrap() else {
        panic!()
    };
    let started = Instant::now();
    let follower = {
        let b = b.clone();
        tokio::spawn(async move { b.flight("acc_d", None, deadline).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(lease); // dies: no answer, no more renewals
    let FlightRole::Leader(_taken) = follower.await.unwrap() else {
        panic!("takeover")
    };
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the lease lapsed"
    );
    assert_eq!(b.metrics.lease_takeovers.get(), 1);
    // A bounded wait: a follower of a leader that never answers gives up at its deadline.
    let r = a
        .flight("acc_d", None, Instant::now() + Duration::from_millis(300))
        .await
        .unwrap();
    assert!(matches!(r, FlightRole::TimedOut));
}

/// A fleet with its own `fleet.timeout` and `checkpoint_lease`.
async fn fleet_tuned(url: &str, timeout: &str, lease: &str) -> Arc<Fleet> {
    let text = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n[fleet]\nredis_url = \"{url}\"\ntimeout = \"{timeout}\"\nlocal_status_ttl = \"30s\"\ncheckpoint_lease = \"{lease}\"\n"
    );
    let s = load_str(&text, &[("K".into(), "k".into())], None)
        .unwrap()
        .fleet
        .unwrap();
    Fleet::connect(&s, Arc::new(MemoryLedger::default()))
        .await
        .unwrap()
}

fn round_trips(f: &Fleet, op: &'static str) -> u64 {
    f.metrics
        .round_trips
        .get_or_create(&linkup_gateway::metrics::OpLabels { op })
        .get()
}

/// Stall the store longer than `fleet.timeout` and wait until a command on `f` has timed out
/// (one slow command opens its breaker).
async fn open_breaker(redis: &Redis, f: &Fleet, pause_ms: u64) {
    assert!(redis
        .command(&["CLIENT", "PAUSE", &pause_ms.to_string(), "ALL"])
        .starts_with("+OK"));
    assert!(f.standing("nobody", 0).await.is_err());
    assert!(!f.is_up(), "the slow command opened the breaker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_breaker_opens_mid_call_keeps_its_lease_and_its_answer_reaches_the_followers(
) {
    // Before: a renewal refused by the open breaker ended the renewals, publish was refused
    // while the breaker was open, and a follower whose read timed out gave up at once; so the
    // follower either called upstream itself or took over after the lease, with the same
    // single-use code: two upstream calls.
    let redis = Redis::start();
    let a = fleet_tuned(&redis.url(), "200ms", "2s").await;
    let b = fleet_tuned(&redis.url(), "200ms", "2s").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let FlightRole::Leader(lease) = a.flight("acc_p", Some("1"), deadline).await.unwrap() else {
        panic!("leader")
    };
    let follower = {
        let b = b.clone();
        tokio::spawn(async move { b.flight("acc_p", Some("1"), deadline).await })
    };
    eventually("the follower waits for the leader", async || {
        round_trips(&b, "lease_wait") >= 1
    })
    .await;
    // The store stalls while the call runs: both replicas' breakers open (the follower's
    // reads time out too).
    open_breaker(&redis, &a, 700).await;
    // The call runs on for longer than the lease: the renewals must carry it over the stall.
    let renewals = round_trips(&a, "lease_renew");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(round_trips(&a, "lease_renew") > renewals);
    assert_eq!(
        redis.command(&["EXISTS", "lgw:lease:acc_p"]),
        ":1\r\n",
        "the lease is still held"
    );
    // The answer comes while the leader's breaker is open again.
    open_breaker(&redis, &a, 500).await;
    let published = lease.publish(&answer(7));
    match follower.await.unwrap() {
        Ok(FlightRole::Answer(got)) => assert_eq!(got, answer(7)),
        other => panic!("the follower must get the leader's answer, got {other:?}"),
    }
    published.await.unwrap();
    assert_eq!(b.metrics.lease_takeovers.get(), 0);
    assert_eq!(
        redis.command(&["EXISTS", "lgw:lease:acc_p"]),
        ":0\r\n",
        "released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_down_opens_the_breaker_and_it_closes_by_itself_after_a_restart() {
    let redis = Redis::start();
    let f = fleet_with(
        &redis.url(),
        "on_store_failure = { limits = \"local\", budgets = \"deny\" }",
        Arc::new(MemoryLedger::default()),
    )
    .await;
    assert!(f.is_up());
    assert_eq!(f.metrics.store_up.get(), 1);
    assert_eq!(
        f.limits_on_failure,
        linkup_gateway::config::OnFailure::Local
    );
    assert_eq!(
        f.budgets_on_failure,
        linkup_gateway::config::OnFailure::Deny
    );
    redis.stop();
    // The first command fails (bounded by fleet.timeout) and opens the breaker...
    let started = Instant::now();
    assert!(f.admit(&budget_only("c", 1, 10)).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!f.is_up());
    assert_eq!(f.metrics.store_up.get(), 0);
    // ... and the next ones do not pay a timeout.
    let started = Instant::now();
    for _ in 0..100 {
        assert!(f.admit(&budget_only("c", 1, 10)).await.is_err());
    }
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    redis.restart();
    eventually("the probe closes the breaker", async || f.is_up()).await;
    assert!(matches!(
        f.admit(&budget_only("c", 1, 10)).await.unwrap(),
        Admission::Allowed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_answered_after_its_caller_gave_up_is_given_back() {
    let redis = Redis::start();
    let f = fleet(&redis.url()).await;
    let day = utc_day(now_ms());
    // The store stalls longer than fleet.timeout (1 s): the caller gives up, the script runs
    // when the store wakes, and nobody takes its reservation.
    assert!(redis
        .command(&["CLIENT", "PAUSE", "1500", "ALL"])
        .starts_with("+OK"));
    assert!(f.admit(&budget_only("cx", 2, 10)).await.is_err());
    assert!(!f.is_up(), "the timeout opened the breaker");
    let settles = || {
        f.metrics
            .round_trips
            .get_or_create(&linkup_gateway::metrics::OpLabels { op: "settle" })
            .get()
    };
    eventually("the reservation is given back", async || {
        f.is_up()
            && settles() >= 1
            && f.standing("cx", day).await.ok().map(|s| s.reserved) == Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_are_reseeded_from_the_ledger_when_redis_comes_back_empty() {
    let redis = Redis::start();
    let ledger = Arc::new(MemoryLedger::default());
    for credits in [4, 3] {
        ledger
            .record(Row {
                at_ms: now_ms(),
                request_id: "r".into(),
                client: Arc::from("crm"),
                account_id: None,
                path: "/v2/profiles".into(),
                action: None,
                status: 200,
                credits,
                credits_known: true,
                credits_raw: None,
                outcome: Outcome::Settled,
            })
            .await
            .unwrap();
    }
    let a = fleet_with(&redis.url(), "", ledger.clone()).await;
    let b = fleet_with(&redis.url(), "", ledger.clone()).await;
    let day = utc_day(now_ms());
    assert_eq!(
        a.standing("crm", day).await.unwrap().spent,
        7,
        "seeded on first connect"
    );
    assert_eq!(
        a.metrics.reseeds.get() + b.metrics.reseeds.get(),
        1,
        "by one replica"
    );
    redis.restart();
    // The next admit finds the store empty (marker gone) and refuses to reserve against it.
    eventually("an admit fails on the empty store", async || {
        a.admit(&budget_only("crm", 1, 10)).await.is_err()
    })
    .await;
    // b's first command on its broken connection may fail too (it opens b's breaker, and
    // b's probe closes it again): wait until both answer.
    eventually("reseeded and back up", async || {
        a.standing("crm", day).await.is_ok() && b.standing("crm", day).await.is_ok()
    })
    .await;
    assert_eq!(a.standing("crm", day).await.unwrap().spent, 7);
    // 3 left of 10 across both.
    assert!(matches!(
        b.admit(&budget_only("crm", 3, 10)).await.unwrap(),
        Admission::Allowed { .. }
    ));
    assert!(matches!(
        a.admit(&budget_only("crm", 1, 10)).await.unwrap(),
        Admission::Refused {
            part: Part::Budget,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_that_lands_after_an_empty_restart_frees_no_reservation_made_since() {
    // Before: the late settle lowered `reserved` by its own cost, freeing reservations made
    // after the reseed, and the budget could be overshot.
    let redis = Redis::start();
    let a = fleet(&redis.url()).await;
    let day = utc_day(now_ms());
    let Admission::Allowed { marker: old, .. } = a.admit(&budget_only("crm", 5, 10)).await.unwrap()
    else {
        panic!("fits")
    };
    redis.restart();
    eventually("reseeded", async || {
        a.admit(&budget_only("crm", 4, 10)).await.is_ok()
    })
    .await;
    assert_eq!(
        a.standing("crm", day).await.unwrap(),
        linkup_gateway::budgets::Standing {
            spent: 0,
            reserved: 4
        }
    );
    // The request forwarded before the restart is answered now: charged 5.
    let s = a.settle("crm", day, 5, 5, &old).await.unwrap().unwrap();
    assert_eq!(
        (s.spent, s.reserved),
        (5, 4),
        "the reservation of 4 stays held"
    );
    // 5 spent + 4 reserved: 2 more would overshoot the budget of 10.
    assert!(matches!(
        a.admit(&budget_only("crm", 2, 10)).await.unwrap(),
        Admission::Refused {
            part: Part::Budget,
            ..
        }
    ));
}

#[tokio::test]
async fn an_unreachable_redis_at_start_is_not_an_error_and_a_bad_url_is() {
    let port = crate::servers::free_port();
    let f = fleet(&format!("redis://127.0.0.1:{port}/0")).await;
    assert!(!f.is_up());
    let mut s = settings("redis://127.0.0.1:1/0", "");
    s.redis_url = load_str(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n[fleet]\nredis_url = \"redis://:secret@[::1\"\n",
        &[("K".into(), "k".into())],
        None,
    )
    .ok()
    .and_then(|c| c.fleet)
    .and_then(|f| f.redis_url);
    if s.redis_url.is_some() {
        let e = Fleet::connect(&s, Arc::new(MemoryLedger::default()))
            .await
            .unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------
// The layers in fleet mode: two stacks (two "replicas" in one test process), one Redis, one
// emulator. The multi-process end-to-end tests are in replicas.rs.

mod stacks {
    use super::*;
    use http::Request;
    use http_body_util::Full;
    use linkup_gateway::emulator::{self, EmulatorConfig, EmulatorHandle, Faults};
    use linkup_gateway::shared::{Process, Shared};
    use linkup_gateway::stack::{build_stack, Stack};
    use linkup_gateway::upstream::UpstreamClient;
    use tower::ServiceExt;

    const UPSTREAM_KEY: &str = "fleet-store-upstream-key";
    const CALLER: &str = "lgw_fleet_store_caller_0001";

    pub struct Replica {
        pub stack: Stack<Full<Bytes>>,
        pub shared: Arc<Shared>,
        pub fleet: Arc<Fleet>,
    }

    pub struct Answer {
        pub status: u16,
        pub headers: http::HeaderMap,
        pub json: serde_json::Value,
    }

    pub async fn emulator() -> EmulatorHandle {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        emulator::start(
            listener,
            EmulatorConfig {
                api_key: UPSTREAM_KEY.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    pub async fn replica(emu: &EmulatorHandle, redis: &Redis, extra: &str) -> Replica {
        let text = format!(
            "[server]\nrequest_timeout = \"10s\"\n[upstream]\nurl = \"{}\"\napi_key_env = \"K\"\n\
             [[clients]]\nname = \"crm\"\nkey_sha256 = \"{}\"\ndaily_credit_budget = 3\n\
             [fleet]\nredis_url = \"{}\"\ntimeout = \"1s\"\ncheckpoint_lease = \"1s\"\n{extra}",
            emu.url(),
            linkup_gateway::keygen::key_sha256_hex(CALLER),
            redis.url(),
        );
        let settings =
            Arc::new(load_str(&text, &[("K".into(), UPSTREAM_KEY.into())], None).unwrap());
        let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::default());
        let fleet = Fleet::connect(settings.fleet.as_ref().unwrap(), ledger.clone())
            .await
            .unwrap();
        let process = Arc::new(Process::with_fleet(ledger, Some(fleet.clone())));
        let upstream = UpstreamClient::new(&settings.upstream, 0).unwrap();
        let shared = Arc::new(Shared::new(settings, process, upstream));
        Replica {
            stack: build_stack(&shared),
            shared,
            fleet,
        }
    }

    impl Replica {
        pub async fn post(&self, path: &str, body: &str) -> Answer {
            let req = Request::post(path)
                .header("x-api-key", CALLER)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap();
            let resp = self.stack.clone().oneshot(req).await.unwrap();
            Answer {
                status: resp.status().as_u16(),
                headers: resp.headers().clone(),
                json: serde_json::from_slice(resp.body()).unwrap_or_default(),
            }
        }

        pub fn metrics(&self) -> String {
            self.shared.process.metrics.encode()
        }
    }

    pub fn profile(account: &str) -> String {
        format!(r#"{{"account_id":"{account}","action":"get","params":{{"profile_url":"u"}}}}"#)
    }

    pub async fn connected(r: &Replica, token: &str) -> String {
        let a = r
            .post(
                "/v2/login",
                &format!(r#"{{"platform":"linkedin","login_token":"{token}","country":"FR"}}"#),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.json);
        a.json["data"]["account_id"].as_str().unwrap().to_owned()
    }

    pub async fn pending(r: &Replica, email: &str) -> String {
        pending_with(r, email, "app_challenge").await
    }

    pub async fn pending_with(r: &Replica, email: &str, challenge: &str) -> String {
        let a = r
            .post(
                "/v2/login",
                &format!(
                    r#"{{"platform":"linkedin","email":"{email}","password":"p","challenge_type":"{challenge}"}}"#
                ),
            )
            .await;
        assert_eq!(
            a.json["data"]["status"], "checkpoint_required",
            "{}",
            a.json
        );
        a.json["data"]["account_id"].as_str().unwrap().to_owned()
    }

    pub fn slow(emu: &EmulatorHandle, account: &str, ms: u64) {
        emu.set_faults(Faults {
            latency_ms: ms,
            account_id: Some(account.to_owned()),
            ..Default::default()
        });
    }
}

use stacks::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stacks_share_the_account_limit_and_the_budget_in_one_round_trip_each() {
    let redis = Redis::start();
    let emu = emulator().await;
    let limits = "[rate_limit]\nper_account = \"3/min\"\nburst = 3\n[costs]\n\"/v2/login\" = 0\n";
    let (a, b) = (
        replica(&emu, &redis, limits).await,
        replica(&emu, &redis, limits).await,
    );
    let acc = connected(&a, "tok-fleet-1").await;
    let mut statuses = Vec::new();
    for r in [&a, &b, &a, &b] {
        let ans = r.post("/v2/profiles", &profile(&acc)).await;
        if ans.status == 200 {
            assert!(ans.headers.contains_key("ratelimit"));
        }
        statuses.push(ans.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "3/min across both stacks: {}",
        a.metrics() + &b.metrics()
    );
    let refused = b.post("/v2/profiles", &profile(&acc)).await;
    assert_eq!(refused.json["error"]["code"], "RATE_LIMITED");
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(b.metrics().contains(
        r#"linkup_gateway_rate_limited_total{client="crm",reason="account",shadow="false"}"#
    ));
    // Budget 3 (profiles cost 1 each): all three spent across the fleet.
    let day = utc_day(now_ms());
    eventually("settled in the store", async || {
        a.fleet.standing("crm", day).await.unwrap()
            == linkup_gateway::budgets::Standing {
                spent: 3,
                reserved: 0,
            }
    })
    .await;
    let other = connected(&b, "tok-fleet-2").await;
    let broke = a.post("/v2/profiles", &profile(&other)).await;
    assert_eq!(
        (broke.status, broke.json["error"]["code"].as_str()),
        (402, Some("INSUFFICIENT_CREDITS"))
    );
    // One admit per forwarded or refused-by-the-store request.
    let m = a.metrics() + &b.metrics();
    assert!(
        m.contains("linkup_gateway_fleet_round_trips_total{op=\"admit\"}"),
        "{m}"
    );
    assert!(m.contains("linkup_gateway_fleet_store_up 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_checkpoint_storm_over_two_stacks_makes_one_upstream_call() {
    let redis = Redis::start();
    let emu = emulator().await;
    let extra =
        "[rate_limit]\nper_account = \"1000/sec\"\nburst = 1000\n[costs]\n\"/v2/login\" = 0\n";
    let a = Arc::new(replica(&emu, &redis, extra).await);
    let b = Arc::new(replica(&emu, &redis, extra).await);
    let acc = pending(&a, "storm@example.com").await;
    slow(&emu, &acc, 400);
    let before = emu.stats().total_calls;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let r = if i % 2 == 0 { a.clone() } else { b.clone() };
        let acc = acc.clone();
        tasks.push(tokio::spawn(async move {
            r.post("/v2/checkpoint", &format!(r#"{{"account_id":"{acc}"}}"#))
                .await
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let ans = t.await.unwrap();
        assert!(ans.status < 500, "{} {}", ans.status, ans.json);
        bodies.push(ans.json["data"]["status"].clone());
    }
    assert_eq!(
        emu.stats().total_calls - before,
        1,
        "one upstream call for both stacks"
    );
    assert!(bodies.iter().all(|s| *s == bodies[0]), "{bodies:?}");
    let remote = a.fleet.metrics.coalesced_remote.get() + b.fleet.metrics.coalesced_remote.get();
    assert!(remote >= 1, "the other stack shared the answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_learnt_through_one_stack_is_a_cache_hit_on_the_other() {
    let redis = Redis::start();
    let emu = emulator().await;
    let (a, b) = (
        replica(&emu, &redis, "").await,
        replica(&emu, &redis, "").await,
    );
    let acc = connected(&a, "tok-fleet-status").await;
    let before = emu.stats().total_calls;
    let hit = b
        .post("/v2/checkpoint", &format!(r#"{{"account_id":"{acc}"}}"#))
        .await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.headers["x-gateway-cache"], "hit");
    assert_eq!(emu.stats().total_calls, before, "answered by the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_down_denies_costly_requests_with_budgets_deny_and_free_ones_go_on() {
    let redis = Redis::start();
    let emu = emulator().await;
    let extra = "[costs]\n\"/v2/login\" = 0\n";
    let a = replica(&emu, &redis, extra).await;
    let acc = connected(&a, "tok-fleet-down").await;
    redis.stop();
    // The first request pays at most fleet.timeout, opens the breaker, and is refused.
    let r = a.post("/v2/profiles", &profile(&acc)).await;
    assert_eq!(r.status, 503, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "STORE_UNAVAILABLE");
    assert_eq!(r.json["error"]["source"], "gateway");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(!a.fleet.is_up());
    // A free request goes on with local state.
    let free = a
        .post(
            "/v2/login",
            r#"{"platform":"linkedin","login_token":"tok-x","country":"FR"}"#,
        )
        .await;
    assert_eq!(free.status, 200, "{}", free.json);
    let m = a.metrics();
    assert!(m.contains("linkup_gateway_fleet_store_up 0"), "{m}");
    assert!(
        m.contains(r#"linkup_gateway_fleet_fallbacks_total{part="budgets",decision="deny"}"#),
        "{m}"
    );
    redis.restart();
    eventually("back to shared state", async || a.fleet.is_up()).await;
    assert_eq!(a.post("/v2/profiles", &profile(&acc)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_down_with_local_fallback_uses_the_replicas_own_limits_and_budgets() {
    let redis = Redis::start();
    let emu = emulator().await;
    let extra = "on_store_failure = { limits = \"local\", budgets = \"local\" }\n[rate_limit]\nper_account = \"2/min\"\nburst = 2\n[costs]\n\"/v2/login\" = 0\n";
    let a = replica(&emu, &redis, extra).await;
    let acc = connected(&a, "tok-fleet-local").await;
    redis.stop();
    let statuses = [
        a.post("/v2/profiles", &profile(&acc)).await.status,
        a.post("/v2/profiles", &profile(&acc)).await.status,
        a.post("/v2/profiles", &profile(&acc)).await.status,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    let m = a.metrics();
    assert!(
        m.contains(r#"linkup_gateway_fleet_fallbacks_total{part="limits",decision="local"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"linkup_gateway_fleet_fallbacks_total{part="budgets",decision="local"}"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn another_code_on_another_stack_waits_for_the_call_in_flight_then_may_be_a_cache_hit() {
    let redis = Redis::start();
    let emu = emulator().await;
    let extra = "[rate_limit]\nper_account = \"1000/sec\"\nburst = 1000\n";
    let a = Arc::new(replica(&emu, &redis, extra).await);
    let b = Arc::new(replica(&emu, &redis, extra).await);
    for (first, second) in [("000000", "123456"), ("123456", "000000")] {
        let id = pending_with(&a, &format!("order-{first}@x.io"), "code_challenge").await;
        slow(&emu, &id, 600);
        let send = |r: &Arc<Replica>, code: &'static str| {
            let (r, body) = (
                r.clone(),
                format!(r#"{{"account_id":"{id}","code":"{code}"}}"#),
            );
            tokio::spawn(async move { r.post("/v2/checkpoint", &body).await })
        };
        let calls = emu.stats().total_calls;
        let first_call = send(&a, first);
        eventually("the first call upstream", async || {
            emu.stats().in_flight == 1
        })
        .await;
        let second_call = send(&b, second);
        let (x, y) = (first_call.await.unwrap(), second_call.await.unwrap());
        if first == "000000" {
            assert_eq!(x.status, 400, "{}", x.json);
            assert_eq!(y.status, 200, "{}", y.json);
            assert!(
                !y.headers.contains_key("x-gateway-cache"),
                "forwarded after the wrong code"
            );
            assert_eq!(emu.stats().total_calls - calls, 2);
        } else {
            assert_eq!(x.status, 200, "{}", x.json);
            assert_eq!(
                y.headers["x-gateway-cache"], "hit",
                "connected meanwhile, on the other stack"
            );
            assert_eq!(emu.stats().total_calls - calls, 1);
        }
    }
    assert_eq!(
        emu.stats().max_in_flight,
        1,
        "never two checkpoints for one account"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_local_leader_that_hangs_up_while_following_another_stack_does_not_fail_its_followers() {
    // Before: the local leader's caller held the local flight while it followed the other
    // stack's call; when it hung up, the local followers got 502 at once.
    let redis = Redis::start();
    let emu = emulator().await;
    let extra = "[rate_limit]\nper_account = \"1000/sec\"\nburst = 1000\n";
    let a = Arc::new(replica(&emu, &redis, extra).await);
    let b = Arc::new(replica(&emu, &redis, extra).await);
    let acc = pending(&a, "hangup@example.com").await;
    slow(&emu, &acc, 1500);
    let calls = emu.stats().total_calls;
    let body = format!(r#"{{"account_id":"{acc}"}}"#);
    let send = |r: &Arc<Replica>| {
        let (r, body) = (r.clone(), body.clone());
        tokio::spawn(async move { r.post("/v2/checkpoint", &body).await })
    };
    let remote = send(&b);
    eventually("the other stack's call upstream", async || {
        emu.stats().in_flight == 1
    })
    .await;
    let waits = round_trips(&a.fleet, "lease_wait");
    let leader = send(&a);
    eventually("the local leader follows the other stack", async || {
        round_trips(&a.fleet, "lease_wait") > waits
    })
    .await;
    let follower = send(&a);
    let flights = a.shared.process.checkpoint_flights.clone();
    eventually("a local follower joined", async || {
        flights.joined(&acc) == Some(1)
    })
    .await;
    leader.abort();
    assert!(leader.await.is_err_and(|e| e.is_cancelled()));
    let got = follower.await.unwrap();
    assert_eq!(got.status, 200, "{}", got.json);
    assert_eq!(got.headers["x-gateway-coalesced"], "true");
    assert_eq!(remote.await.unwrap().status, 200);
    assert_eq!(emu.stats().total_calls - calls, 1, "one upstream call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_cooldown_learnt_while_the_store_was_down_holds_once_it_is_back() {
    // Before: the hold lived only in the replica's own cooldowns, which the fleet path never
    // looked at: once the store was back, the account went upstream again at once.
    let redis = Redis::start();
    let emu = emulator().await;
    let extra = "on_store_failure = { limits = \"local\", budgets = \"local\" }\n[costs]\n\"/v2/login\" = 0\n";
    let a = replica(&emu, &redis, extra).await;
    let acc = connected(&a, "tok-fleet-cool").await;
    redis.stop();
    emu.set_faults(linkup_gateway::emulator::Faults {
        mode: linkup_gateway::emulator::FaultMode::RateLimited,
        count: 1,
        account_id: Some(acc.clone()),
        ..Default::default()
    });
    let limited = a.post("/v2/profiles", &profile(&acc)).await;
    assert_eq!(limited.status, 429, "{}", limited.json);
    redis.restart();
    eventually("back to shared state", async || a.fleet.is_up()).await;
    let calls = emu.stats().total_calls;
    let held = a.post("/v2/profiles", &profile(&acc)).await;
    assert_eq!(held.status, 429, "{}", held.json);
    assert_eq!(held.json["error"]["source"], "gateway", "{}", held.json);
    assert_eq!(emu.stats().total_calls, calls, "held back by the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lease_holds_a_hash_of_the_code_never_the_code() {
    let redis = Redis::start();
    let (a, b) = (fleet(&redis.url()).await, fleet(&redis.url()).await);
    let deadline = || Instant::now() + Duration::from_secs(10);
    let FlightRole::Leader(lease) = a.flight("acc_h", Some("482913"), deadline()).await.unwrap()
    else {
        panic!("leader")
    };
    let held = redis.command(&["GET", "lgw:lease:acc_h"]);
    assert!(!held.contains("482913"), "{held}");
    assert!(
        held.contains(&linkup_gateway::keygen::key_sha256_hex("482913")),
        "{held}"
    );
    // The same code still follows (hashes compared), another one waits.
    let same = {
        let b = b.clone();
        tokio::spawn(async move { b.flight("acc_h", Some("482913"), deadline()).await })
    };
    let other = {
        let b = b.clone();
        tokio::spawn(async move { b.flight("acc_h", Some("000000"), deadline()).await })
    };
    eventually("both wait", async || round_trips(&b, "lease_wait") >= 2).await;
    lease.publish(&answer(5)).await.unwrap();
    assert_eq!(
        match same.await.unwrap().unwrap() {
            FlightRole::Answer(a) => Some(a),
            _ => None,
        },
        Some(answer(5))
    );
    assert!(matches!(other.await.unwrap().unwrap(), FlightRole::Ended));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_reply_fails_the_command_but_leaves_the_store_in_use() {
    let redis = Redis::start();
    let f = fleet(&redis.url()).await;
    let day = utc_day(now_ms());
    // A budget key of the wrong type: HMGET answers WRONGTYPE.
    assert!(redis
        .command(&["SET", &format!("lgw:budget:{day}:odd"), "x"])
        .starts_with("+OK"));
    assert!(f.standing("odd", day).await.is_err());
    assert!(f.is_up(), "an error reply does not open the breaker");
    assert!(f.standing("crm", day).await.is_ok());
    assert_eq!(f.metrics.store_up.get(), 1);
    assert_eq!(
        f.metrics
            .store_errors
            .get_or_create(&linkup_gateway::metrics::OpLabels { op: "standing" })
            .get(),
        1
    );
    // The server's version was read once.
    assert_eq!(round_trips(&f, "info"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_waits_for_a_reservation_still_to_be_given_back() {
    // Before: the give-back of an admit answered after its caller gave up was not counted
    // until its settle was spawned, so drain could return before it was even queued.
    let redis = Redis::start();
    let f = fleet(&redis.url()).await;
    let day = utc_day(now_ms());
    assert!(redis
        .command(&["CLIENT", "PAUSE", "1500", "ALL"])
        .starts_with("+OK"));
    assert!(f.admit(&budget_only("cd", 2, 10)).await.is_err());
    assert!(f.drain(Duration::from_secs(20)).await);
    assert!(round_trips(&f, "settle") >= 1, "the give-back was settled");
    assert_eq!(
        redis.command(&["HGET", &format!("lgw:budget:{day}:cd"), "reserved"]),
        "$1\r\n0\r\n"
    );
}
