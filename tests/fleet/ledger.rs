//! The PostgreSQL ledger against a private server: the same answers as the SQLite ledger,
//! durability across a crash, server restarts under concurrent writers (nothing lost, nothing
//! doubled), a full buffer, and two replicas on one database.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linkup_gateway::config::LedgerSync;
use linkup_gateway::ledger::{
    GroupBy, Ledger, LedgerError, Outcome, PostgresLedger, Row, SqliteLedger, UsageQuery,
};
use time::macros::date;
use time::Date;

use crate::servers::{free_port, Postgres};

fn at(day: Date, seconds: i64) -> i64 {
    (day.midnight().assume_utc().unix_timestamp() + seconds) * 1000
}

fn row(request_id: String, day: Date, client: &str, credits: u64) -> Row {
    Row {
        at_ms: at(day, 3600),
        request_id,
        client: client.into(),
        account_id: Some("acct-1".into()),
        path: "/v2/checkpoint".into(),
        action: Some("search".into()),
        status: 200,
        credits,
        credits_known: true,
        credits_raw: None,
        outcome: Outcome::Settled,
    }
}

/// Open a ledger off the test's runtime thread (it blocks while connecting).
async fn open(url: &str, sync: LedgerSync, buffer_rows: usize) -> Arc<PostgresLedger> {
    let url = url.to_string();
    Arc::new(
        tokio::task::spawn_blocking(move || PostgresLedger::open(&url, sync, buffer_rows))
            .await
            .unwrap()
            .unwrap(),
    )
}

/// Poll `ready` until it holds; fail after 30 s.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Flush until it succeeds (rows kept during an outage are written by then).
async fn flushed(ledger: &dyn Ledger) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ledger.flush().await {
            Ok(()) => return,
            Err(e) => assert!(Instant::now() < deadline, "flush still fails: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rows_and_uids(pg: &Postgres) -> (u64, u64) {
    let out = pg.psql("SELECT count(*), count(DISTINCT row_uid) FROM ledger_rows");
    let (a, b) = out.split_once('|').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// A varied set: clients, accounts (and none), actions (and none), every outcome, unknown
/// credits, days from late October 2026 to early January 2027.
fn generated_rows() -> Vec<Row> {
    let clients = ["crm", "batch", "Zeta", "ämter"];
    let accounts = [Some("acct-a"), Some("acct-b"), None];
    let actions = [Some("search"), Some("fetch"), None];
    let start = date!(2026 - 10 - 25);
    (0..900u64)
        .map(|i| {
            let day = start + time::Duration::days((i * 7 % 75) as i64);
            Row {
                at_ms: at(day, (i % 86_400) as i64),
                request_id: format!("gen-{i}"),
                client: clients[(i % 4) as usize].into(),
                account_id: accounts[(i % 3) as usize].map(Into::into),
                path: "/v2/checkpoint".into(),
                action: actions[(i / 3 % 3) as usize].map(Into::into),
                status: 200,
                credits: i % 5,
                credits_known: i % 11 != 0,
                credits_raw: None,
                outcome: Outcome::ALL[(i / 2 % 4) as usize],
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_answers_as_sqlite_does_for_the_same_rows() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 100_000).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteLedger::open(&dir.path().join("l.sqlite3"), LedgerSync::PowerSafe).unwrap();
    let rows = generated_rows();
    // Concurrently, so batches of several rows (and several keys) commit together.
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in rows.chunks(100) {
        let (ledger, chunk) = (ledger.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for r in chunk {
                ledger.record(r).await.unwrap();
            }
        });
    }
    for r in rows.iter().cloned() {
        sqlite.record(r).await.unwrap();
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }

    let expected = sqlite.totals().unwrap();
    assert_eq!(expected.0, 900);
    assert_eq!(ledger.totals().unwrap(), expected);
    for day in [
        date!(2026 - 10 - 25),
        date!(2026 - 11 - 1),
        date!(2026 - 12 - 31),
        date!(2027 - 1 - 2),
        date!(2026 - 6 - 1),
    ] {
        assert_eq!(
            ledger.spent_on(day).unwrap(),
            sqlite.spent_on(day).unwrap(),
            "{day}"
        );
    }
    let ranges = [
        (date!(2026 - 10 - 1), date!(2027 - 1 - 31)),
        (date!(2026 - 10 - 27), date!(2026 - 12 - 3)),
        (date!(2026 - 11 - 1), date!(2026 - 11 - 30)),
        (date!(2026 - 11 - 15), date!(2026 - 11 - 15)),
        (date!(2026 - 12 - 30), date!(2027 - 1 - 2)),
        (date!(2025 - 1 - 1), date!(2025 - 12 - 31)),
    ];
    let mut compared = 0;
    for (from, to) in ranges {
        // Every subset of the grouping keys, in the canonical order.
        for mask in 0u32..32 {
            let by: Vec<GroupBy> = GroupBy::ALL
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, g)| g)
                .collect();
            let q = UsageQuery {
                from_day: from,
                to_day: to,
                by: by.clone(),
            };
            let want = sqlite.usage(&q).unwrap();
            assert_eq!(ledger.usage(&q).unwrap(), want, "{from}..={to} by {by:?}");
            compared += want.len();
        }
        // And one order that is not the canonical one.
        let q = UsageQuery {
            from_day: from,
            to_day: to,
            by: vec![GroupBy::Outcome, GroupBy::Day, GroupBy::Client],
        };
        assert_eq!(ledger.usage(&q).unwrap(), sqlite.usage(&q).unwrap());
    }
    assert!(compared > 1000, "the comparison saw {compared} rows");
    assert_eq!(rows_and_uids(&pg), (900, 900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_is_durable_once_record_resolves_and_async_rows_once_flushed() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 100).await;
    ledger
        .record(row("durable".into(), date!(2026 - 11 - 25), "crm", 7))
        .await
        .unwrap();
    // A crash right after the answer: the row is there when the server comes back.
    pg.restart();
    assert_eq!(
        pg.psql("SELECT request_id, credits FROM ledger_rows"),
        "durable|7"
    );
    // The reader reconnects by itself.
    assert_eq!(ledger.totals().unwrap(), (1, 7));
    assert_eq!(
        ledger.spent_on(date!(2026 - 11 - 25)).unwrap().get("crm"),
        Some(&7)
    );
    // And so does the writer: the next row commits on a fresh connection, without an error.
    ledger
        .record(row("after".into(), date!(2026 - 11 - 25), "crm", 1))
        .await
        .unwrap();
    assert!(ledger.write_error().is_none());
    drop(ledger);

    let ledger = open(&pg.url(), LedgerSync::Async, 100).await;
    for i in 0..20 {
        ledger
            .record(row(format!("async-{i}"), date!(2026 - 11 - 26), "batch", 1))
            .await
            .unwrap();
    }
    ledger.flush().await.unwrap();
    pg.restart();
    assert_eq!(
        pg.psql("SELECT count(*) FROM ledger_rows WHERE request_id LIKE 'async-%'"),
        "20"
    );
    assert_eq!(ledger.totals().unwrap(), (22, 28));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_under_eight_writers_loses_and_doubles_no_row() {
    let pg = Arc::new(tokio::task::spawn_blocking(Postgres::start).await.unwrap());
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 1_000_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (oks, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ok_ids = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let (ledger, stop, oks, errors, ok_ids) = (
            ledger.clone(),
            stop.clone(),
            oks.clone(),
            errors.clone(),
            ok_ids.clone(),
        );
        tasks.spawn(async move {
            let mut recorded = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("w{t}-{recorded}");
                recorded += 1;
                match ledger
                    .record(row(id.clone(), date!(2026 - 11 - 25), "crm", 1))
                    .await
                {
                    Ok(()) => {
                        oks.fetch_add(1, Ordering::SeqCst);
                        ok_ids.lock().unwrap().push(id);
                    }
                    Err(e) => {
                        assert!(matches!(e, LedgerError::Write { .. }), "{e}");
                        errors.fetch_add(1, Ordering::SeqCst);
                        // Errors come back at once while the server is down: pace the loop.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            recorded
        });
    }
    until("rows before the crash", || {
        oks.load(Ordering::SeqCst) >= 500
    })
    .await;
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.stop("immediate"))
        .await
        .unwrap();
    until("errors while the server is down", || {
        errors.load(Ordering::SeqCst) >= 50 && ledger.write_error().is_some()
    })
    .await;
    let e = ledger.write_error().unwrap().to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{}/postgres", pg.port)),
        "{e}"
    );
    assert!(ledger.rows_waiting() > 0);
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.restart())
        .await
        .unwrap();
    let after = oks.load(Ordering::SeqCst) + 500;
    until("rows after the restart", || {
        oks.load(Ordering::SeqCst) >= after
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut recorded = 0;
    while let Some(t) = tasks.join_next().await {
        recorded += t.unwrap();
    }
    flushed(ledger.as_ref()).await;
    assert!(ledger.write_error().is_none());
    assert_eq!(ledger.rows_waiting(), 0);

    let errors = errors.load(Ordering::SeqCst);
    assert!(errors > 0);
    assert_eq!(recorded, oks.load(Ordering::SeqCst) + errors);
    // Every row recorded, Ok or not, is there exactly once.
    assert_eq!(rows_and_uids(&pg), (recorded, recorded));
    assert_eq!(
        pg.psql("SELECT count(DISTINCT request_id) FROM ledger_rows"),
        recorded.to_string()
    );
    let present: HashSet<String> = pg
        .psql("SELECT request_id FROM ledger_rows")
        .lines()
        .map(str::to_owned)
        .collect();
    let ok_ids = ok_ids.lock().unwrap();
    assert!(ok_ids.iter().all(|id| present.contains(id)));
    // The aggregates agree with the rows.
    assert_eq!(ledger.totals().unwrap(), (recorded, recorded));
    println!(
        "recorded {recorded}: {} ok, {errors} answered with an error and written later; {} commits",
        ok_ids.len(),
        ledger.commits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_fails_fast_and_the_kept_rows_are_written_later() {
    let pg = Arc::new(tokio::task::spawn_blocking(Postgres::start).await.unwrap());
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 10).await;
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.stop("immediate"))
        .await
        .unwrap();
    for i in 0..10 {
        let e = ledger
            .record(row(format!("kept-{i}"), date!(2026 - 11 - 25), "crm", 2))
            .await
            .unwrap_err();
        assert!(matches!(e, LedgerError::Write { .. }), "{e}");
    }
    let started = Instant::now();
    let e = ledger
        .record(row("refused".into(), date!(2026 - 11 - 25), "crm", 2))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(50));
    assert!(matches!(e, LedgerError::BufferFull { rows: 10, .. }), "{e}");
    assert!(e.to_string().contains("ledger.buffer_rows"), "{e}");
    assert!(
        ledger.totals().is_err(),
        "reads fail while the server is down"
    );

    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.restart())
        .await
        .unwrap();
    flushed(ledger.as_ref()).await;
    assert_eq!(ledger.totals().unwrap(), (10, 20));
    assert_eq!(rows_and_uids(&pg), (10, 10));
    // Room again.
    ledger
        .record(row("later".into(), date!(2026 - 11 - 25), "crm", 2))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_migrate_once_and_each_sees_both() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let url = pg.url();
    // Both open at once: the migration runs once, under the advisory lock.
    let (a, b) = tokio::join!(
        open(&url, LedgerSync::PowerSafe, 1000),
        open(&url, LedgerSync::PowerSafe, 1000)
    );
    assert_eq!(
        pg.psql(
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM ledger_schema_migrations"
        ),
        "1,2"
    );
    // Both write the same aggregate keys concurrently (and must not deadlock).
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let ledger = if t % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            for i in 0..100 {
                let client = ["crm", "batch", "ops"][(i + t) % 3];
                ledger
                    .record(row(format!("r{t}-{i}"), date!(2026 - 11 - 25), client, 1))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let q = UsageQuery {
        from_day: date!(2026 - 11 - 1),
        to_day: date!(2026 - 11 - 30),
        by: vec![GroupBy::Client],
    };
    let usage = a.usage(&q).unwrap();
    assert_eq!(usage, b.usage(&q).unwrap());
    let clients: BTreeSet<_> = usage.iter().filter_map(|u| u.client.clone()).collect();
    assert_eq!(clients.len(), 3);
    assert_eq!(usage.iter().map(|u| u.requests).sum::<u64>(), 800);
    assert_eq!(a.totals().unwrap(), (800, 800));
    assert_eq!(b.totals().unwrap(), (800, 800));
    // A third replica opening later finds the schema current.
    let c = open(&url, LedgerSync::Async, 10).await;
    assert_eq!(c.totals().unwrap(), (800, 800));
}

#[test]
fn an_unreachable_server_fails_open_clearly_without_the_password() {
    let port = free_port();
    let url = format!("postgres://gw:hunter2@127.0.0.1:{port}/linkup");
    let started = Instant::now();
    let e = PostgresLedger::open(&url, LedgerSync::PowerSafe, 10)
        .err()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = e.to_string();
    assert!(matches!(e, LedgerError::Open { .. }), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}/linkup")), "{text}");
    assert!(text.contains("refused"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// Durable rows per second with `before_response` and 64 concurrent writers:
/// `cargo test --release --test fleet ledger::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
#[ignore]
async fn throughput() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 100_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for t in 0..64 {
        let (ledger, stop) = (ledger.clone(), stop.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let client = ["crm", "batch", "ops", "etl"][(n % 4) as usize];
                ledger
                    .record(row(format!("t{t}-{n}"), date!(2026 - 11 - 25), client, 1))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        });
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut rows = 0;
    while let Some(t) = tasks.join_next().await {
        rows += t.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "postgres ledger, before_response, 64 writers: {rows} rows in {secs:.1} s = {:.0} rows/s, {} commits ({:.1} rows/commit)",
        rows as f64 / secs,
        ledger.commits(),
        rows as f64 / ledger.commits() as f64
    );
    assert_eq!(ledger.totals().unwrap().0, rows);
}

/// A TCP proxy in front of the server that, once armed, forwards the next write of the row
/// `lost-ack` and cuts the connection when the server has committed it, before its answer
/// reaches the ledger: a commit whose acknowledgement is lost.
struct LoseNextCommitAck {
    port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
}

impl LoseNextCommitAck {
    fn start(upstream: u16, committed: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (armed2, cuts2) = (armed.clone(), cuts.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let mut server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let (mut client_r, mut server_w) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let hold = Arc::new(AtomicBool::new(false));
                let hold2 = hold.clone();
                // Server to client, until told to hold back its answers.
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = server.read(&mut buf) {
                        if n == 0 || hold2.load(Ordering::SeqCst) {
                            break;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                let (armed, cuts, committed) = (armed2.clone(), cuts2.clone(), committed.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = client_r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let commit = buf[..n].windows(8).any(|w| w == b"lost-ack");
                        if commit && armed.swap(false, Ordering::SeqCst) {
                            hold.store(true, Ordering::SeqCst);
                            server_w.write_all(&buf[..n]).unwrap();
                            let deadline = Instant::now() + Duration::from_secs(30);
                            while !committed() {
                                assert!(Instant::now() < deadline, "the commit never landed");
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            cuts.fetch_add(1, Ordering::SeqCst);
                            let _ = client_r.shutdown(Shutdown::Both);
                            let _ = server_w.shutdown(Shutdown::Both);
                            break;
                        }
                        if server_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LoseNextCommitAck { port, armed, cuts }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_lost_commit_acknowledgement_is_not_doubled() {
    let pg = Arc::new(tokio::task::spawn_blocking(Postgres::start).await.unwrap());
    // The proxy's threads outlive the test (its accept loop blocks): they hold the server
    // weakly, so the server's Drop still stops it when the test ends, pass or fail.
    let weak = Arc::downgrade(&pg);
    let proxy = LoseNextCommitAck::start(
        pg.port,
        Arc::new(move || {
            weak.upgrade().is_none_or(|pg| {
                pg.psql("SELECT count(*) FROM ledger_rows WHERE request_id = 'lost-ack'") == "1"
            })
        }),
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let ledger = open(&url, LedgerSync::PowerSafe, 100).await;
    ledger
        .record(row("before".into(), date!(2026 - 11 - 25), "crm", 3))
        .await
        .unwrap();
    proxy.armed.store(true, Ordering::SeqCst);
    // The commit lands, its answer is lost, the writer retries the batch on a fresh
    // connection at once: the caller sees success, and the row counts once.
    ledger
        .record(row("lost-ack".into(), date!(2026 - 11 - 25), "crm", 5))
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1);
    assert_eq!(rows_and_uids(&pg), (2, 2));
    assert_eq!(ledger.totals().unwrap(), (2, 8));
    assert_eq!(
        pg.psql("SELECT requests, credits FROM usage_daily WHERE client = 'crm'"),
        "2|8"
    );
    assert!(ledger.write_error().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_against_sslrootcert() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    // A CA and a certificate for 127.0.0.1 it signs, readable by the server's user.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "linkup-gateway test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("lgw-pg-tls")
        .tempdir_in("/tmp")
        .unwrap();
    let (crt, key, ca) = (
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&crt, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let ok = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(&crt)
            .arg(&key)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    pg.psql(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'",
        crt.display()
    ));
    pg.psql(&format!(
        "ALTER SYSTEM SET ssl_key_file = '{}'",
        key.display()
    ));
    pg.psql("ALTER SYSTEM SET ssl = on");
    pg.psql("SELECT pg_reload_conf()");
    until("the server to offer TLS", || pg.psql("SHOW ssl") == "on").await;

    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let verified = format!(
        "{base}?sslmode=verify-full&sslrootcert={}&application_name=lgw-tls",
        ca.display()
    );
    let ledger = open(&verified, LedgerSync::PowerSafe, 10).await;
    ledger
        .record(row("tls".into(), date!(2026 - 11 - 25), "crm", 1))
        .await
        .unwrap();
    assert_eq!(ledger.totals().unwrap(), (1, 1));
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'lgw-tls' AND ssl"
        ),
        "2",
        "the writer and the reader both use TLS"
    );

    // Without the CA, the certificate does not verify: opening fails, and says why.
    let url = format!("{base}?sslmode=require");
    let e =
        tokio::task::spawn_blocking(move || PostgresLedger::open(&url, LedgerSync::PowerSafe, 10))
            .await
            .unwrap()
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("certificate"), "{e}");
    // sslmode=disable connects in clear.
    let clear = open(
        &format!("{base}?sslmode=disable&application_name=lgw-clear"),
        LedgerSync::PowerSafe,
        10,
    )
    .await;
    assert_eq!(clear.totals().unwrap(), (1, 1));
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'lgw-clear' AND NOT ssl"
        ),
        "2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_text_is_stored_and_a_non_utf8_database_is_refused() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 10).await;
    // A NUL (which PostgreSQL text cannot hold) must not wedge the writer.
    let mut r = row("nul".into(), date!(2026 - 11 - 25), "crm\u{1F600}", 4);
    r.action = Some("sea\0rch".into());
    ledger.record(r).await.unwrap();
    let q = UsageQuery {
        from_day: date!(2026 - 11 - 25),
        to_day: date!(2026 - 11 - 25),
        by: vec![GroupBy::Client, GroupBy::Action],
    };
    let usage = ledger.usage(&q).unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].client.as_deref(), Some("crm\u{1F600}"));
    assert_eq!(usage[0].action.as_deref(), Some("sea\u{FFFD}rch"));
    assert!(ledger.write_error().is_none());

    pg.psql(
        "CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' \
         TEMPLATE template0",
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/latin", pg.port);
    let e =
        tokio::task::spawn_blocking(move || PostgresLedger::open(&url, LedgerSync::PowerSafe, 10))
            .await
            .unwrap()
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("LATIN1") && e.contains("UTF8"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_queued_before_a_drop_are_written() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ledger = open(&pg.url(), LedgerSync::Async, 10_000).await;
    for i in 0..500 {
        ledger
            .record(row(format!("q-{i}"), date!(2026 - 11 - 25), "crm", 1))
            .await
            .unwrap();
    }
    // Dropping joins the writer, which commits what is queued first.
    let ledger = Arc::into_inner(ledger).unwrap();
    tokio::task::spawn_blocking(move || drop(ledger))
        .await
        .unwrap();
    assert_eq!(rows_and_uids(&pg), (500, 500));
    assert_eq!(
        pg.psql("SELECT sum(requests) FROM usage_monthly_no_account"),
        "500"
    );
}

/// `/usage` pages from PostgreSQL, read by keyset, are the SQLite ledger's page for page (rows
/// and cursors), in byte order even in a database whose collation is not (ICU `en-US` sorts
/// `acc` before `Zeta`, byte order after; the key columns are `COLLATE "C"`): a cursor
/// compares keys in the order the pages were sorted in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_pages_match_sqlite_page_for_page_whatever_the_collation() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    pg.psql(
        "CREATE DATABASE icu_en ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' \
         LOCALE 'C.UTF-8' TEMPLATE template0",
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/icu_en", pg.port);
    let ledger = open(&url, LedgerSync::Async, 100_000).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteLedger::open(&dir.path().join("l.sqlite3"), LedgerSync::Async).unwrap();
    let prefixes = ["Zeta", "acc", "ämter", "a,b", "", "_x"];
    let start = date!(2026 - 01 - 25);
    for i in 0..3_000u64 {
        let day = start + time::Duration::days((i % 40) as i64);
        let r = Row {
            at_ms: at(day, (i % 86_400) as i64),
            request_id: format!("p-{i}"),
            client: ["crm", "Ops", "bi"][(i % 3) as usize].into(),
            account_id: Some(format!("{}{}", prefixes[(i % 6) as usize], i % 1_000).into()),
            path: "/v2/checkpoint".into(),
            action: [None, Some("search"), Some("Fetch")][(i / 3 % 3) as usize].map(Into::into),
            status: 200,
            credits: i % 4,
            credits_known: true,
            credits_raw: None,
            outcome: Outcome::ALL[(i / 2 % 4) as usize],
        };
        sqlite.record(r.clone()).await.unwrap();
        ledger.record(r).await.unwrap();
    }
    sqlite.flush().await.unwrap();
    flushed(ledger.as_ref()).await;
    // The database's own order is not byte order.
    let icu_first = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.query_one("SELECT 'acc' < 'Zeta'", &[])
                .unwrap()
                .get::<_, bool>(0)
        })
        .await
        .unwrap()
    };
    assert!(
        icu_first,
        "the database sorts in byte order: the test proves nothing"
    );

    let mut pages = 0;
    for (from, to) in [
        (date!(2026 - 01 - 20), date!(2026 - 03 - 10)),
        (date!(2026 - 02 - 03), date!(2026 - 02 - 03)),
    ] {
        for by in ["client,account", "account,day", "action,client", "outcome"] {
            let q = UsageQuery {
                from_day: from,
                to_day: to,
                by: GroupBy::parse_list(by).unwrap(),
            };
            let want = sqlite.usage(&q).unwrap();
            for limit in [97, 10_000] {
                let mut all = Vec::new();
                let mut after: Option<Vec<String>> = None;
                loop {
                    let got = ledger.usage_page(&q, after.as_deref(), limit).unwrap();
                    let expected = sqlite.usage_page(&q, after.as_deref(), limit).unwrap();
                    assert_eq!(got, expected, "{from}..={to} by {by} limit {limit}");
                    pages += 1;
                    all.extend(got.rows);
                    match got.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                assert_eq!(all, want, "{from}..={to} by {by} limit {limit}");
            }
        }
    }
    assert!(pages > 60, "{pages} pages compared");
}

/// An unknown row keeps `metadata.credits_consumed` as sent (at most 64 bytes) in
/// `credits_raw`; a known row has NULL there. A database migrated by the previous release
/// (schema version 1, no column) gets the column.
#[tokio::test]
async fn the_raw_credits_value_of_an_unknown_row_is_stored() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    // The previous release's schema: version 1, without the column.
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 100).await;
    drop(ledger);
    pg.psql("ALTER TABLE ledger_rows DROP COLUMN credits_raw");
    pg.psql("DELETE FROM ledger_schema_migrations WHERE version > 1");
    let ledger = open(&pg.url(), LedgerSync::PowerSafe, 100).await;
    let mut odd = row("odd".into(), date!(2026 - 11 - 25), "crm", 0);
    odd.credits_known = false;
    odd.credits_raw = Some(format!("\"{}\"", "x".repeat(100)));
    ledger.record(odd).await.unwrap();
    ledger
        .record(row("known".into(), date!(2026 - 11 - 25), "crm", 2))
        .await
        .unwrap();
    assert_eq!(
        pg.psql(
            "SELECT request_id, credits_known, length(credits_raw), left(credits_raw, 3) \
             FROM ledger_rows ORDER BY id"
        ),
        "odd|f|64|\"xx\nknown|t||"
    );
}
