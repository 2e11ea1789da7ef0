//! The whole stack, request in to response out, against an in-process fixed-answer upstream on
//! loopback: the baseline every later layer is measured against.
//!
//!     cargo bench --bench stack

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;

use linkup_gateway::config;
use linkup_gateway::shared::{Process, Shared};
use linkup_gateway::stack::build_stack;
use linkup_gateway::upstream::UpstreamClient;

const ANSWER: &[u8] = br#"{"success":true,"data":{"account_id":"acc_1","profile":{"name":"Ada"}},"metadata":{"action":"get","credits_consumed":1,"timestamp":"2026-11-25T10:32:00Z"}}"#;

async fn fixed_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_r| async {
                    let mut resp = http::Response::new(Full::new(Bytes::from_static(ANSWER)));
                    resp.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn bench_stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(fixed_upstream());
    let key = "lgw_bench_key";
    let text = format!(
        "[upstream]\nurl = \"http://{addr}\"\napi_key_env = \"K\"\n\
         [[clients]]\nname = \"bench\"\nkey_sha256 = \"{}\"\n\
         [rate_limit]\nper_account = \"1000000/sec\"\nburst = 1000000\n",
        linkup_gateway::keygen::key_sha256_hex(key)
    );
    let settings = config::load_str(&text, &[("K".into(), "upstream-key".into())], None).unwrap();
    let upstream = UpstreamClient::new(&settings.upstream, 0).unwrap();
    let shared = Arc::new(Shared::new(
        Arc::new(settings),
        Arc::new(Process::default()),
        upstream,
    ));
    let stack = build_stack::<Full<Bytes>>(&shared);
    // 10,000 distinct accounts, as the load harness uses: limits and ledger see real keys.
    let bodies: Vec<Bytes> = (0..10_000)
        .map(|i| {
            Bytes::from(format!(
                r#"{{"account_id":"acc{i:021}","action":"get","params":{{"profile_url":"https://www.linkedin.com/in/ada"}}}}"#
            ))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let request = || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % bodies.len();
        Request::post("/v2/profiles")
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Full::new(bodies[i].clone()))
            .unwrap()
    };

    let mut g = c.benchmark_group("stack");
    g.throughput(Throughput::Elements(1));
    g.bench_function("post_profiles_through_every_layer", |b| {
        b.to_async(&rt).iter(|| {
            let s = stack.clone();
            let r = request();
            async move {
                let resp = s.oneshot(r).await.unwrap();
                assert_eq!(resp.status(), 200);
            }
        })
    });
    g.bench_function("refused_unknown_key", |b| {
        b.to_async(&rt).iter(|| {
            let s = stack.clone();
            let mut r = request();
            r.headers_mut().insert("x-api-key", "nope".parse().unwrap());
            async move {
                let resp = s.oneshot(r).await.unwrap();
                assert_eq!(resp.status(), 403);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_stack);
criterion_main!(benches);
