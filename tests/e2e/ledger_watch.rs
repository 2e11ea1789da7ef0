//! The ledger file deleted, truncated or replaced under a running gateway (issue 14 item 5):
//! the writer notices within about a second, `/readyz` turns 503 naming what happened, costly
//! requests are refused with 503 LEDGER_UNAVAILABLE before they are forwarded, free ones go
//! on, `linkup_gateway_ledger_file_lost_total{reason}` and `ledger_errors_total` count it, an
//! ERROR line says it. After a restart nothing the upstream charged is missing: the journal
//! holds the rows and is written into the ledger the gateway opens; a truncated file is
//! refused at start with what to do.
//!
//! Real SQLite files on disk, the real gateway and emulator over loopback. The gateway and
//! emulator run on the test's runtime, so they stop with the test, pass or fail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use linkup_gateway::server::Gateway;

use crate::common::*;

fn ledger_path(h: &Harness) -> PathBuf {
    h.dir.path().join("data/ledger.sqlite3")
}

/// Poll `/readyz` until it is 503 (or fail after 10 s); its body.
async fn until_not_ready(h: &Harness) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = h.admin("/readyz").await;
        if r.status == 503 {
            return r.text();
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "/readyz never noticed the lost ledger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // a poll period, not a sync
    }
}

fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A few charged requests, all answered 200.
async fn charge_a_few(h: &Harness, account: &str, n: usize) {
    for i in 0..n {
        let body = format!(
            r#"{{"account_id":"{account}","action":"get","params":{{"profile_url":"p{i}"}}}}"#
        );
        let a = h.post("/v2/profiles", &body).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
}

/// The lost ledger is noticed and fails closed: not ready, costly refused before forwarding,
/// free served, counted under `reason`, logged.
async fn fails_closed(h: &Harness, account: &str, reason: &str, what: &str) {
    let ready = until_not_ready(h).await;
    let path = ledger_path(h).display().to_string();
    assert!(ready.contains(what), "{ready}");
    assert!(ready.contains(&path), "{ready}");

    let calls = h.upstream_calls();
    for _ in 0..3 {
        let a = h.post("/v2/profiles", &action(account, "get")).await;
        assert_eq!(a.status, 503, "{}", a.text());
        assert_eq!(a.code(), "LEDGER_UNAVAILABLE");
        assert_eq!(a.source(), "gateway");
    }
    assert_eq!(h.upstream_calls(), calls, "refusals were forwarded");
    let free = h.get("/v2/credits").await;
    assert_eq!(free.status, 200, "{}", free.text());

    // Counted by the ledger watcher within a quarter of a second.
    let series = format!("linkup_gateway_ledger_file_lost_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = h.admin("/metrics").await.text();
        if metric(&m, &series) > 0 {
            break m;
        }
        assert!(Instant::now() < deadline, "{series} never counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await; // a poll period, not a sync
    };
    assert_eq!(metric(&m, &series), 1, "{m}");
    assert!(metric(&m, "linkup_gateway_ledger_errors_total") >= 1, "{m}");
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("ledger file {what}")) && l.contains(&path)),
        "no ERROR line says the ledger file {what}"
    );
}

/// What is left of a harness once its gateway has stopped: the emulator (with its charges)
/// and the directory (config, ledger, journal).
struct Stopped {
    emu: linkup_gateway::emulator::EmulatorHandle,
    dir: tempfile::TempDir,
}

impl Stopped {
    async fn start(&self) -> Result<Gateway, String> {
        let settings = linkup_gateway::config::load(&self.dir.path().join("gateway.toml")).unwrap();
        Gateway::start(settings).await.map_err(|e| e.to_string())
    }
}

/// Stop the harness's gateway (as SIGTERM does) and start another on the same config.
async fn restart(h: Harness) -> (Result<Gateway, String>, Stopped) {
    let Harness { emu, gw, dir, .. } = h;
    gw.shutdown().await;
    let stopped = Stopped { emu, dir };
    (stopped.start().await, stopped)
}

/// The restarted gateway's ledger holds every credit the emulator charged.
async fn holds_every_charge(gw: &Gateway, h: &Stopped) {
    let charged = h.emu.stats().credits_charged as u64;
    let ledger = gw.process.ledger.clone();
    let recorded = tokio::task::spawn_blocking(move || ledger.totals())
        .await
        .unwrap()
        .unwrap()
        .1;
    assert_eq!(recorded, charged, "the ledger lost charges");
    assert_eq!(gw.process.ledger.write_error().map(|e| e.to_string()), None);
}

fn move_aside(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let mut to = from.clone();
        to.push(".damaged");
        if Path::new(&from).exists() {
            std::fs::rename(&from, &to).unwrap();
        }
    }
}

#[tokio::test]
async fn a_ledger_deleted_under_the_gateway_fails_closed_and_a_restart_loses_nothing() {
    let h = Harness::start().await;
    let account = h.connected_account("tok-deleted").await;
    charge_a_few(&h, &account, 3).await;
    assert_eq!(h.admin("/readyz").await.status, 200);

    std::fs::remove_file(ledger_path(&h)).unwrap();
    // Answered before the writer's next check: journaled, and kept.
    charge_a_few(&h, &account, 1).await;
    fails_closed(&h, &account, "deleted", "was deleted").await;

    // Restart: a new ledger at the path, the journal written into it.
    let (started, h) = restart(h).await;
    let gw = started.unwrap();
    holds_every_charge(&gw, &h).await;
    assert_eq!(readyz(&gw).await, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_ledger_truncated_under_the_gateway_fails_closed_and_is_refused_at_start() {
    let h = Harness::start().await;
    let account = h.connected_account("tok-truncated").await;
    charge_a_few(&h, &account, 3).await;

    let path = ledger_path(&h);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    fails_closed(&h, &account, "truncated", "was truncated").await;

    // A restart refuses the truncated file, saying what is wrong and what to do...
    let (started, h) = restart(h).await;
    let err = started.err().expect("started on a truncated ledger");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("was truncated"), "{err}");
    assert!(err.contains("Move"), "{err}");
    // ...and once it is moved aside, starts on a new ledger with every charge replayed.
    move_aside(&path);
    let gw = h.start().await.unwrap();
    holds_every_charge(&gw, &h).await;
    assert_eq!(readyz(&gw).await, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_ledger_replaced_under_the_gateway_is_detected() {
    let h = Harness::start().await;
    let account = h.connected_account("tok-replaced").await;
    charge_a_few(&h, &account, 2).await;

    // Another file renamed over the path (a restore from an old copy, say).
    let path = ledger_path(&h);
    let other = h.dir.path().join("data/other.sqlite3");
    std::fs::copy(&path, &other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    fails_closed(&h, &account, "replaced", "was replaced by another file").await;
    h.gw.shutdown().await;
}

async fn readyz(gw: &Gateway) -> u16 {
    use bytes::Bytes;
    use http_body_util::Full;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::get(format!("http://{}/readyz", gw.admin_addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.request(req).await.unwrap().status().as_u16()
}
