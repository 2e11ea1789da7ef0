//! Checkpoint coalescing and the status cache:
//!
//! - `layers/*`: what `status_cache` + `coalesce` add to a request that neither applies to
//!   (`POST /v2/profiles` for an account), measured in isolation over a stub that answers at
//!   once: `bare` is the stub alone, `with_both_layers` the same stub under both layers; the
//!   difference is the layers' cost. `cache_hit` is a checkpoint answered by the cache.
//! - `storm/*`: the wall time of 1,000 concurrent identical checkpoint submits against the
//!   emulator with 100 ms of latency, through the whole stack in process and through the real
//!   server over h2c (8 connections); each sample is one storm on a fresh pending account.
//!
//!     cargo bench --bench checkpoint

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};

use linkup_gateway::config;
use linkup_gateway::context::{RequestContext, RequestLog, Route};
use linkup_gateway::emulator::{self, EmulatorConfig, EmulatorHandle, Faults};
use linkup_gateway::error::GatewayError;
use linkup_gateway::layers::coalesce::{CoalesceLayer, Flights};
use linkup_gateway::layers::status_cache::{CachedStatus, StatusCacheLayer, StatusStore};
use linkup_gateway::server::Gateway;
use linkup_gateway::shared::{Process, Shared};
use linkup_gateway::stack::build_stack;
use linkup_gateway::upstream::UpstreamClient;

const ANSWER: &[u8] = br#"{"success":true,"data":{"account_id":"acc_1","profile":{"name":"Ada"}},"metadata":{"action":"get","credits_consumed":1,"timestamp":"2026-11-25T10:32:00Z"}}"#;
const KEY: &str = "lgw_bench_key";
const UPSTREAM_KEY: &str = "upstream-key";
const CALLERS: usize = 1_000;

fn request(route: Route, path: &str, code: Option<&str>) -> Request<Bytes> {
    let mut r = Request::post(path).body(Bytes::new()).unwrap();
    r.extensions_mut().insert(RequestContext {
        route,
        action: None,
        account_id: Some(Arc::from("acc_1")),
        code: code.map(Arc::from),
    });
    r.extensions_mut().insert(Arc::new(RequestLog::new(
        HeaderValue::from_static("bench"),
        route,
    )));
    r
}

fn bench_layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stub = tower::service_fn(|_r: Request<Bytes>| async {
        Ok::<_, GatewayError>(Response::new(Bytes::from_static(ANSWER)))
    });
    let process = Arc::new(Process::default());
    let store = Arc::new(StatusStore::new(Duration::from_secs(600), 100_000));
    rt.block_on(store.remember(Arc::from("acc_1"), CachedStatus::Connected));
    let layered = StatusCacheLayer::new(Some(store.clone()), process.clone()).layer(
        CoalesceLayer::new(
            true,
            Flights::default(),
            Some(store),
            process,
            Duration::from_secs(60),
        )
        .layer(stub),
    );

    let mut g = c.benchmark_group("layers");
    g.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| {
            let r = request(Route::Profiles, "/v2/profiles", None);
            async move { stub.oneshot(r).await.unwrap() }
        })
    });
    g.bench_function("with_both_layers", |b| {
        b.to_async(&rt).iter(|| {
            let (s, r) = (
                layered.clone(),
                request(Route::Profiles, "/v2/profiles", None),
            );
            async move { s.oneshot(r).await.unwrap() }
        })
    });
    g.bench_function("cache_hit", |b| {
        b.to_async(&rt).iter(|| {
            let s = layered.clone();
            let r = request(Route::Checkpoint, "/v2/checkpoint", Some("123456"));
            async move {
                let resp = s.oneshot(r).await.unwrap();
                assert!(resp.headers().contains_key("x-gateway-cache"));
            }
        })
    });
    g.finish();
}

async fn slow_emulator() -> EmulatorHandle {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = emulator::start(
        l,
        EmulatorConfig {
            api_key: UPSTREAM_KEY.into(),
            initial_credits: 1_000_000_000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    emu.set_faults(Faults {
        latency_ms: 100,
        ..Default::default()
    });
    emu
}

fn settings_text(upstream: &str, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\napi_key_env = \"K\"\n\
         [rate_limit]\nper_account = \"1000000/sec\"\nburst = 1000000\n\
         [[clients]]\nname = \"bench\"\nkey_sha256 = \"{}\"\n{extra}",
        linkup_gateway::keygen::key_sha256_hex(KEY)
    )
}

fn checkpoint_body(account: &str) -> Bytes {
    Bytes::from(format!(r#"{{"account_id":"{account}","code":"123456"}}"#))
}

fn login_body(n: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"platform":"linkedin","email":"storm-{n}@bench.io","password":"p"}}"#
    ))
}

fn account_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["data"]["status"], "checkpoint_required", "{v}");
    v["data"]["account_id"].as_str().unwrap().to_owned()
}

fn bench_storm(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let emu = rt.block_on(slow_emulator());
    let env = [("K".to_string(), UPSTREAM_KEY.to_string())];

    // In process: the whole stack, called directly.
    let settings = config::load_str(&settings_text(&emu.url(), ""), &env, None).unwrap();
    let upstream = UpstreamClient::new(&settings.upstream, 0).unwrap();
    let shared = Arc::new(Shared::new(
        Arc::new(settings),
        Arc::new(Process::default()),
        upstream,
    ));
    let stack = build_stack::<Full<Bytes>>(&shared);
    let call = |path: &str, body: Bytes| {
        Request::post(path)
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap()
    };

    // Over the wire: the real server, 8 h2c connections.
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[ledger]\npath = \"{}\"\n",
        dir.path().join("ledger.db").display()
    );
    let settings = config::load_str(&settings_text(&emu.url(), &ledger), &env, None).unwrap();
    let gw = rt.block_on(Gateway::start(settings)).unwrap();
    let base = format!("http://{}", gw.data_addr);
    let clients: Vec<Client<HttpConnector, Full<Bytes>>> = (0..8)
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http()
        })
        .collect();

    let mut n = 0u64;
    let mut g = c.benchmark_group("storm");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("1000_callers_100ms_upstream_in_process", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let stack = stack.clone();
            let mut accounts = Vec::new();
            for _ in 0..iters {
                n += 1;
                accounts.push(n);
            }
            async move {
                let mut total = Duration::ZERO;
                for n in accounts {
                    let resp = stack
                        .clone()
                        .oneshot(call("/v2/login", login_body(n)))
                        .await
                        .unwrap();
                    let account = account_of(resp.body());
                    let body = checkpoint_body(&account);
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..CALLERS)
                        .map(|_| {
                            tokio::spawn(
                                stack.clone().oneshot(call("/v2/checkpoint", body.clone())),
                            )
                        })
                        .collect();
                    for t in tasks {
                        assert_eq!(t.await.unwrap().unwrap().status(), 200);
                    }
                    total += started.elapsed();
                }
                total
            }
        })
    });
    let clients = &clients;
    let base = &base;
    g.bench_function("1000_callers_100ms_upstream_over_h2c", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut accounts = Vec::new();
            for _ in 0..iters {
                n += 1;
                accounts.push(n);
            }
            async move {
                let mut total = Duration::ZERO;
                for n in accounts {
                    let resp = clients[0]
                        .request(call(&format!("{base}/v2/login"), login_body(n)))
                        .await
                        .unwrap();
                    let account = account_of(&resp.into_body().collect().await.unwrap().to_bytes());
                    let body = checkpoint_body(&account);
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..CALLERS)
                        .map(|i| {
                            let c = clients[i % clients.len()].clone();
                            let req = call(&format!("{base}/v2/checkpoint"), body.clone());
                            tokio::spawn(async move {
                                let resp = c.request(req).await.unwrap();
                                let status = resp.status();
                                resp.into_body().collect().await.unwrap();
                                status
                            })
                        })
                        .collect();
                    for t in tasks {
                        assert_eq!(t.await.unwrap(), 200);
                    }
                    total += started.elapsed();
                }
                total
            }
        })
    });
    g.finish();
    let s = emu.stats();
    println!(
        "emulator: {} checkpoint calls for {} storms of {CALLERS} callers",
        s.calls_by_path
            .get("POST /v2/checkpoint")
            .copied()
            .unwrap_or(0),
        n
    );
}

criterion_group!(benches, bench_layers, bench_storm);
criterion_main!(benches);
