//! Several real gateway replicas (each its own `Gateway`, own listeners, own process state)
//! against one emulator, one private Redis and one private PostgreSQL: the fleet behaves as
//! one gateway (issue 8, item 5).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use linkup_gateway::config;
use linkup_gateway::emulator::{self, EmulatorConfig, EmulatorHandle, Faults};
use linkup_gateway::server::Gateway;
use serde_json::Value;

use crate::servers::{Postgres, Redis};

const UPSTREAM_KEY: &str = "fleet-upstream-secret";
const KEY: &str = "lgw_fleet_caller_key_0001";
const BUDGETED_KEY: &str = "lgw_fleet_budgeted_key_0002";

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct FleetUnderTest {
    pub emu: EmulatorHandle,
    pub redis: Redis,
    pub pg: Postgres,
    pub replicas: Vec<Gateway>,
    http: Client<HttpConnector, Full<Bytes>>,
    h2: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
}

fn sha(key: &str) -> String {
    linkup_gateway::keygen::key_sha256_hex(key)
}

fn config_text(emu: &str, key_file: &str, redis: &str, pg: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
request_timeout = "30s"
shutdown_grace = "5s"

[upstream]
url = "{emu}"
api_key_file = "{key_file}"
connect_timeout = "1s"

[[clients]]
name = "alpha"
key_sha256 = "{alpha}"

[[clients]]
name = "budgeted"
key_sha256 = "{budgeted}"
daily_credit_budget = 10

[ledger]
postgres_url = "{pg}"

[fleet]
redis_url = "{redis}"
# Generous: a loaded 2-core CI machine must not open the breaker on a slow answer (the
# outage tests stop Redis, which fails at once, not by timeout).
timeout = "2s"
{limits}
{extra}
"#,
        alpha = sha(KEY),
        budgeted = sha(BUDGETED_KEY),
        limits = if extra.contains("[rate_limit]") {
            ""
        } else {
            "[rate_limit]\nper_account = \"100000/sec\"\nburst = 100000\n"
        },
    )
}

impl FleetUnderTest {
    /// `n` replicas; `extra` is appended to every replica's config.
    pub async fn start(n: usize, extra: &str) -> FleetUnderTest {
        let (redis, pg) = tokio::task::spawn_blocking(|| (Redis::start(), Postgres::start()))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emu = emulator::start(
            listener,
            EmulatorConfig {
                api_key: UPSTREAM_KEY.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("upstream.key");
        std::fs::write(&key_file, UPSTREAM_KEY).unwrap();
        let mut f = FleetUnderTest {
            emu,
            redis,
            pg,
            replicas: Vec::new(),
            http: Client::builder(TokioExecutor::new()).build_http(),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
            _dir: dir,
        };
        for i in 0..n {
            let cfg = f._dir.path().join(format!("replica{i}.toml"));
            std::fs::write(
                &cfg,
                config_text(
                    &f.emu.url(),
                    &key_file.display().to_string(),
                    &f.redis.url(),
                    &f.pg.url(),
                    extra,
                ),
            )
            .unwrap();
            let settings = config::load(&cfg).unwrap();
            f.replicas.push(Gateway::start(settings).await.unwrap());
        }
        f
    }

    fn request(
        &self,
        replica: usize,
        method: Method,
        path: &str,
        key: &str,
        body: &str,
    ) -> Request<Full<Bytes>> {
        let addr = self.replicas[replica % self.replicas.len()].data_addr;
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    async fn send(c: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Answer {
        let (parts, body) = c.request(req).await.unwrap().into_parts();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn post(&self, replica: usize, path: &str, body: &str) -> Answer {
        Self::send(
            &self.http,
            self.request(replica, Method::POST, path, KEY, body),
        )
        .await
    }

    pub async fn post_as(&self, replica: usize, key: &str, path: &str, body: &str) -> Answer {
        Self::send(
            &self.http,
            self.request(replica, Method::POST, path, key, body),
        )
        .await
    }

    pub async fn get(&self, replica: usize, path: &str) -> Answer {
        Self::send(
            &self.http,
            self.request(replica, Method::GET, path, KEY, ""),
        )
        .await
    }

    pub async fn admin(&self, replica: usize, path: &str) -> Answer {
        let addr = self.replicas[replica].admin_addr;
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        Self::send(&self.http, req).await
    }

    pub async fn connected_account(&self, token: &str) -> String {
        let a = self
            .post(
                0,
                "/v2/login",
                &format!(r#"{{"platform":"linkedin","login_token":"{token}","country":"FR"}}"#),
            )
            .await;
        assert_eq!(a.status, 200, "login: {}", a.text());
        a.json()["data"]["account_id"].as_str().unwrap().to_owned()
    }

    pub async fn metric(&self, replica: usize, line_prefix: &str) -> f64 {
        let m = self.admin(replica, "/metrics").await.text();
        m.lines()
            .filter(|l| l.starts_with(line_prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The fleet's ledger total (credits), read through replica 0's ledger (PostgreSQL).
    pub async fn ledger_credits(&self) -> (u64, u64) {
        let ledger = self.replicas[0].process.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.totals())
            .await
            .unwrap()
            .unwrap()
    }

    pub async fn shutdown(self) {
        for r in self.replicas {
            r.shutdown().await;
        }
    }
}

fn action(account: &str, action: &str) -> String {
    format!(r#"{{"account_id":"{account}","action":"{action}","params":{{"profile_url":"u"}}}}"#)
}

/// Waits for a condition nothing can signal (another component's counters), with a deadline.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_account_limit_holds_across_three_replicas() {
    let f = FleetUnderTest::start(3, "[rate_limit]\nper_account = \"5/min\"\nburst = 5\n").await;
    // The login itself counts for no account (per client); then 30 calls for one account,
    // spread round-robin over the replicas.
    let account = f.connected_account("tok-limit").await;
    let before = f.emu.stats().total_calls;
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..30 {
        let a = f.post(i, "/v2/profiles", &action(&account, "get")).await;
        match a.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(a.code(), "RATE_LIMITED");
                let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry >= 1);
            }
            s => panic!("unexpected {s}: {}", a.text()),
        }
    }
    assert_eq!(ok, 5, "5/min with burst 5 for the whole fleet");
    assert_eq!(limited, 25);
    assert_eq!(
        f.emu.stats().total_calls - before,
        5,
        "refusals are not forwarded"
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_caller_checkpoint_storm_over_three_replicas_makes_one_upstream_call() {
    let f = FleetUnderTest::start(3, "").await;
    let login = f
        .post(
            0,
            "/v2/login",
            r#"{"platform":"linkedin","email":"storm@x.io","password":"p","challenge_type":"code_challenge"}"#,
        )
        .await;
    let id = login.json()["data"]["account_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Keep the one call open long enough for every caller to arrive.
    f.emu.set_faults(Faults {
        latency_ms: 2_000,
        account_id: Some(id.clone()),
        ..Default::default()
    });
    let charged = f.emu.stats().credits_charged;
    let body = format!(r#"{{"account_id":"{id}","code":"123456"}}"#);
    let f = Arc::new(f);
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1_000)
        .map(|i| {
            let f = f.clone();
            let body = body.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let req = f.request(i, Method::POST, "/v2/checkpoint", KEY, &body);
                let a = FleetUnderTest::send(&f.h2, req).await;
                done.fetch_add(1, Ordering::Relaxed);
                a
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let calls = f
        .emu
        .stats()
        .checkpoint_calls_by_account
        .get(&id)
        .copied()
        .unwrap_or(0);
    assert_eq!(calls, 1, "one upstream call for the whole fleet");
    assert_eq!(f.emu.stats().credits_charged - charged, 1, "one credit");
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["data"]["status"], "connected");
    }
    let shared = answers
        .iter()
        .filter(|a| {
            a.headers
                .get("x-gateway-coalesced")
                .is_some_and(|v| v == "true")
                || a.headers.get("x-gateway-cache").is_some_and(|v| v == "hit")
        })
        .count();
    assert_eq!(
        shared, 999,
        "every caller but the leader got a shared answer"
    );
    // The ledger (one PostgreSQL for the fleet) holds the one charge.
    let (_, credits) = f.ledger_credits().await;
    assert_eq!(credits as i64, f.emu.stats().credits_charged);
    Arc::into_inner(f).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_of_ten_across_three_replicas_forwards_exactly_ten() {
    let f = Arc::new(FleetUnderTest::start(3, "").await);
    let account = f.connected_account("tok-budget").await;
    let before = f.emu.stats().total_calls;
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let f = f.clone();
            let body = action(&account, "get");
            tokio::spawn(async move { f.post_as(i, BUDGETED_KEY, "/v2/profiles", &body).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            200 => ok += 1,
            402 => assert_eq!(a.code(), "INSUFFICIENT_CREDITS"),
            s => panic!("unexpected {s}: {}", a.text()),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(f.emu.stats().total_calls - before, 10);
    Arc::into_inner(f).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_ledger_equals_the_emulators_charges_and_any_replica_shows_it() {
    let f = FleetUnderTest::start(3, "").await;
    let account = f.connected_account("tok-ledger").await;
    let mut i = 0;
    for (path, act) in [
        ("/v2/profiles", "get"),
        ("/v2/profiles", "search_people"),
        ("/v2/network", "invite"),
        ("/v2/messages", "send"),
        ("/v2/content", "create"),
        ("/v2/recruiter", "get_cv"),
    ] {
        for _ in 0..3 {
            assert_eq!(f.post(i, path, &action(&account, act)).await.status, 200);
            i += 1;
        }
    }
    f.get(1, "/v2/credits").await;
    let charged = f.emu.stats().credits_charged;
    assert!(charged > 10, "a real mix of costs: {charged}");
    let (_, credits) = f.ledger_credits().await;
    assert_eq!(credits as i64, charged);
    for r in 0..3 {
        let u = f.admin(r, "/usage").await;
        assert_eq!(u.status, 200, "{}", u.text());
        let total: i64 = u.json()["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["credits"].as_i64().unwrap())
            .sum();
        assert_eq!(total, charged, "replica {r} shows the fleet's total");
    }
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_run_limits_fall_back_locally_budgets_fail_closed_then_recover() {
    // Defaults: limits = local, budgets = deny.
    let f = FleetUnderTest::start(2, "[rate_limit]\nper_account = \"3/min\"\nburst = 3\n").await;
    let account = f.connected_account("tok-redis").await;
    assert_eq!(
        f.post(0, "/v2/profiles", &action(&account, "get"))
            .await
            .status,
        200
    );

    tokio::task::block_in_place(|| f.redis.stop());
    // Costly requests: budgets are `deny`, so they fail closed, clearly, and are not sent.
    let before = f.emu.stats().total_calls;
    let a = f.post(0, "/v2/profiles", &action(&account, "get")).await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.json()["error"]["source"], "gateway");
    assert!(!a.code().is_empty());
    assert_eq!(f.emu.stats().total_calls, before, "not forwarded");
    // Free requests go on with per-replica limits.
    for r in 0..2 {
        let a = f.get(r, "/v2/credits").await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert!(f.metric(0, "linkup_gateway_fleet_store_up").await == 0.0);
    assert!(f.metric(0, "linkup_gateway_fleet_fallbacks_total").await >= 1.0);

    // Redis comes back (empty): the replicas return to shared state by themselves.
    tokio::task::block_in_place(|| f.redis.restart());
    until("the replicas to see the store again", async || {
        f.metric(0, "linkup_gateway_fleet_store_up").await == 1.0
            && f.metric(1, "linkup_gateway_fleet_store_up").await == 1.0
    })
    .await;
    let fresh = f.connected_account("tok-redis-2").await;
    let mut ok = 0;
    for i in 0..8 {
        if f.post(i, "/v2/profiles", &action(&fresh, "get"))
            .await
            .status
            == 200
        {
            ok += 1;
        }
    }
    assert_eq!(
        ok, 3,
        "the shared 3/min limit holds again across both replicas"
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_with_budgets_local_keeps_serving_costly_requests() {
    let f = FleetUnderTest::start(
        2,
        "[fleet.on_store_failure]\nlimits = \"local\"\nbudgets = \"local\"\n",
    )
    .await;
    let account = f.connected_account("tok-local").await;
    tokio::task::block_in_place(|| f.redis.stop());
    for r in 0..4 {
        let a = f.post(r, "/v2/profiles", &action(&account, "get")).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert!(f.metric(0, "linkup_gateway_fleet_fallbacks_total").await >= 1.0);
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_deny_fails_closed_for_costly_requests_while_redis_is_down() {
    let f = FleetUnderTest::start(
        1,
        "[fleet.on_store_failure]\nlimits = \"deny\"\nbudgets = \"local\"\n",
    )
    .await;
    let account = f.connected_account("tok-deny").await;
    tokio::task::block_in_place(|| f.redis.stop());
    let a = f.post(0, "/v2/profiles", &action(&account, "get")).await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(
        f.get(0, "/v2/credits").await.status,
        200,
        "free requests go on"
    );
    f.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_mid_run_loses_and_doubles_no_ledger_row() {
    let f = Arc::new(FleetUnderTest::start(2, "").await);
    let account = f.connected_account("tok-pg").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let f = f.clone();
            let stop = stop.clone();
            let answered = answered.clone();
            let body = action(&account, "get");
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let a = f.post(i, "/v2/profiles", &body).await;
                    // 200: charged and recorded; 503 LEDGER_UNAVAILABLE (or STORE_UNAVAILABLE,
                    // should Redis be slow on a loaded machine): refused, not sent.
                    match a.status {
                        200 => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        503 => assert!(
                            ["LEDGER_UNAVAILABLE", "STORE_UNAVAILABLE"]
                                .contains(&a.code().as_str()),
                            "{}",
                            a.text()
                        ),
                        s => panic!("unexpected {s}: {}", a.text()),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    until("some traffic", async || {
        answered.load(Ordering::Relaxed) > 50
    })
    .await;
    // Restart PostgreSQL under load: an immediate stop (a crash), then a start.
    let pg = f.clone();
    tokio::task::spawn_blocking(move || pg.pg.restart())
        .await
        .unwrap();
    let at_restart = answered.load(Ordering::Relaxed);
    until("traffic after the restart", async || {
        answered.load(Ordering::Relaxed) > at_restart + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    // Every charge is in the ledger exactly once, once the replicas' buffers are written.
    let charged = f.emu.stats().credits_charged;
    until("the ledger to catch up", async || {
        f.ledger_credits().await.1 as i64 == charged
    })
    .await;
    let rows =
        f.pg.psql("SELECT count(*), count(DISTINCT row_uid) FROM ledger_rows");
    let (all, distinct) = rows.split_once('|').unwrap();
    assert_eq!(all, distinct, "no row doubled");
    Arc::into_inner(f).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paced_rule_spaces_sends_across_three_replicas() {
    let f = std::sync::Arc::new(
        FleetUnderTest::start(
            3,
            "[rate_limit]\nper_account = \"100000/sec\"\nburst = 100000\n\n\
             [[rate_limit.rules]]\npath = \"/v2/messages\"\naction = \"send\"\n\
             per_account = \"1/sec\"\nburst = 1\non_limit = \"delay\"\nmax_delay = \"20s\"\n",
        )
        .await,
    );
    let account = f.connected_account("tok-fleet-pace").await;
    let body = format!(r#"{{"account_id":"{account}","action":"send","params":{{"text":"hi"}}}}"#);
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let (f, body) = (f.clone(), body.clone());
            tokio::spawn(async move { f.post(i, "/v2/messages", &body).await })
        })
        .collect();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(f.emu.stats().calls_by_path["POST /v2/messages"], 3);
    // One slot a second for the whole fleet: the three together waited about 0 + 1 + 2 s.
    let mut waited = 0.0;
    for r in 0..3 {
        waited += f
            .metric(r, "linkup_gateway_rate_limit_waited_seconds_total")
            .await;
    }
    assert!(waited >= 1.0, "waited {waited} s in all");
    match std::sync::Arc::try_unwrap(f) {
        Ok(f) => f.shutdown().await,
        Err(_) => panic!("a task still holds the fleet"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotent_retry_on_another_replica_waits_for_the_first_and_replays_it() {
    let f = std::sync::Arc::new(FleetUnderTest::start(2, "").await);
    let account = f.connected_account("tok-fleet-idem").await;
    f.emu.set_faults(linkup_gateway::emulator::Faults {
        latency_ms: 700,
        account_id: Some(account.clone()),
        ..Default::default()
    });
    let body = format!(r#"{{"account_id":"{account}","action":"send","params":{{"text":"hi"}}}}"#);
    let keyed = |replica: usize, body: &str| {
        let mut r = f.request(replica, Method::POST, "/v2/messages", KEY, body);
        r.headers_mut()
            .insert("idempotency-key", http::HeaderValue::from_static("fleet-1"));
        r
    };
    let first = {
        let (f2, req) = (f.clone(), keyed(0, &body));
        tokio::spawn(async move { FleetUnderTest::send(&f2.http, req).await })
    };
    let emu = &f.emu;
    until("the first send upstream", async || {
        emu.stats().in_flight == 1
    })
    .await;
    // The retry lands on the other replica while the first is in flight: it waits for it.
    let retry = FleetUnderTest::send(&f.http, keyed(1, &body)).await;
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.body, first.body);
    // Later, on either replica: replayed; another body: 422.
    let again = FleetUnderTest::send(&f.http, keyed(1, &body)).await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let other = FleetUnderTest::send(&f.http, keyed(0, &body.replace("hi", "bye"))).await;
    assert_eq!(
        (other.status, other.code().as_str()),
        (422, "IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(
        f.emu.stats().calls_by_path["POST /v2/messages"],
        1,
        "sent once"
    );
    match std::sync::Arc::try_unwrap(f) {
        Ok(f) => f.shutdown().await,
        Err(_) => panic!("a task still holds the fleet"),
    }
}
