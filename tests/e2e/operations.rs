//! Admin listener, drain and reload.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::common::*;

#[tokio::test]
async fn admin_answers_health_readiness_metrics_and_config() {
    let h = Harness::start().await;
    assert_eq!(h.admin("/healthz").await.status, 200);
    assert_eq!(h.admin("/readyz").await.status, 200);
    h.get("/v2/credits").await;
    let m = h.admin("/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for name in [
        "linkup_gateway_requests_total",
        "linkup_gateway_request_duration_seconds",
        "linkup_gateway_upstream_duration_seconds",
        "linkup_gateway_in_flight",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let c = h.admin("/config").await;
    assert_eq!(c.status, 200);
    let v = c.json();
    assert_eq!(v["upstream"]["api_key"], "[redacted]");
    assert_eq!(v["clients"][0]["name"], "alpha");
    assert_eq!(v["clients"][0]["key_sha256"], "[redacted]");
    assert_eq!(h.admin("/nope").await.status, 404);
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_and_turns_readyz_503() {
    let h = Harness::start_with("request_timeout = \"10s\"", "").await;
    h.emu.set_faults(linkup_gateway::emulator::Faults {
        latency_ms: 600,
        ..Default::default()
    });
    let req = Request::get(h.url("/v2/credits"))
        .header("x-api-key", ALPHA_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let slow = tokio::spawn(h.http.request(req));
    while h.gw.process.in_flight.load(Ordering::Acquire) == 0 {
        tokio::task::yield_now().await;
    }
    let Harness { gw, http, .. } = h;
    let admin = gw.admin_addr;
    let data = gw.data_addr;
    let process = gw.process.clone();
    let drain = tokio::spawn(gw.shutdown());
    while !process.draining.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    let ready = http
        .request(
            Request::get(format!("http://{admin}/readyz"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the in-flight request finished");
    drain.await.unwrap();
    // The data listener is closed now.
    assert!(tokio::net::TcpStream::connect(data).await.is_err());
}

#[tokio::test]
async fn reload_applies_a_valid_config_and_keeps_the_old_on_error() {
    let h = Harness::start().await;
    let newcomer = "lgw_newcomer_key_123";
    assert_eq!(
        h.call(http::Method::GET, "/v2/credits", Some(newcomer), "")
            .await
            .status,
        403
    );

    let key_file = h.dir.path().join("upstream.key");
    let extra = format!(
        "[[clients]]\nname = \"newcomer\"\nkey_sha256 = \"{}\"\n",
        sha(newcomer)
    );
    let good = config_text(&h.emu.url(), &key_file.display().to_string(), "", &extra);
    std::fs::write(h.config_path(), &good).unwrap();
    h.gw.reload().unwrap();
    assert_eq!(
        h.call(http::Method::GET, "/v2/credits", Some(newcomer), "")
            .await
            .status,
        200
    );

    std::fs::write(
        h.config_path(),
        format!("{good}\n[ledger]\nreconcile_every = \"often\"\n"),
    )
    .unwrap();
    let problems = h.gw.reload().unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("ledger.reconcile_every")),
        "{problems:?}"
    );
    assert_eq!(
        h.call(http::Method::GET, "/v2/credits", Some(newcomer), "")
            .await
            .status,
        200,
        "the old config stays"
    );
    let m = String::from_utf8(h.admin("/metrics").await.body.to_vec()).unwrap();
    assert!(
        m.contains(r#"linkup_gateway_config_reloads_total{result="rejected"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn reload_rotates_the_upstream_key_without_dropping_the_connection() {
    // The emulator accepts only the new key; the gateway starts with the old one.
    let emu = start_emulator("rotated-upstream-key").await;
    let h = Harness::start_against(emu, "", "").await;
    // One keep-alive connection for the whole test.
    let (mut sender, conn) = {
        let stream = tokio::net::TcpStream::connect(h.gw.data_addr)
            .await
            .unwrap();
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap()
    };
    let conn = tokio::spawn(conn);
    let credits = || {
        Request::get("/v2/credits")
            .header("host", "gw")
            .header("x-api-key", ALPHA_KEY)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = sender.send_request(credits()).await.unwrap();
    assert_eq!(r.status(), 403, "old key refused by the upstream");
    http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap();

    std::fs::write(h.dir.path().join("upstream.key"), "rotated-upstream-key\n").unwrap();
    h.gw.reload().unwrap();
    let r = sender.send_request(credits()).await.unwrap();
    assert_eq!(r.status(), 200, "new key in use on the same connection");
    assert!(!conn.is_finished());
}

#[tokio::test]
async fn an_admin_token_guards_everything_but_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "admin-secret-DO-NOT-LEAK\n").unwrap();
    let server = format!("admin_token_file = \"{}\"", token_file.display());
    let h = Harness::start_with(&server, "").await;
    assert_eq!(h.admin("/healthz").await.status, 200);
    assert_eq!(h.admin("/readyz").await.status, 200);
    for path in ["/metrics", "/config", "/usage", "/dashboard"] {
        let a = h.admin(path).await;
        assert_eq!(a.status, 401, "{path}");
        assert!(a.headers.contains_key("www-authenticate"));
    }
    let with = |token: &str| {
        Request::get(h.admin_url("/config"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(h.send(with("wrong")).await.status, 401);
    let ok = h.send(with("admin-secret-DO-NOT-LEAK")).await;
    assert_eq!(ok.status, 200);
    let body = String::from_utf8(ok.body.to_vec()).unwrap();
    assert!(body.contains("\"admin_token\": \"[redacted]\""), "{body}");
    assert!(!body.contains("admin-secret-DO-NOT-LEAK"));
}

#[test]
fn a_public_admin_listener_without_a_token_and_unreadable_inbound_tls_files_are_refused() {
    let base = "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n";
    let env = vec![("K".to_string(), "k".to_string())];
    let e = linkup_gateway::config::load_str(
        &format!("[server]\nadmin_listen = \"0.0.0.0:9090\"\n{base}"),
        &env,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("server.admin_listen"), "{e}");
    let e = linkup_gateway::config::load_str(
        &format!("[server]\ntls = {{ cert_file = \"c\", key_file = \"k\" }}\n{base}"),
        &env,
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("server.tls.cert_file: cannot read"),
        "{e}"
    );
    assert!(e.to_string().contains("server.tls.key_file"), "{e}");
}

/// The data plane's workers each listen on the port (one `SO_REUSEPORT` group on Linux), and
/// connections reach all of them; a second gateway started on the same address is refused
/// with "address in use" instead of silently taking part of the traffic.
#[tokio::test]
async fn a_second_gateway_on_the_same_port_is_refused_and_every_worker_serves() {
    let h = Harness::start_with("workers = 3\n", "").await;
    assert_eq!(h.gw.settings().server.workers, 3);
    // Many fresh connections: every one is served whichever worker accepts it.
    for _ in 0..24 {
        let mut s = tokio::net::TcpStream::connect(h.gw.data_addr)
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!("GET /v2/credits HTTP/1.1\r\nHost: x\r\nx-api-key: {ALPHA_KEY}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    let mut settings = linkup_gateway::config::load(&h.config_path()).unwrap();
    settings.server.listen = h.gw.data_addr;
    settings.ledger.path = h.dir.path().join("second.sqlite3");
    match linkup_gateway::server::Gateway::start(settings).await {
        Err(linkup_gateway::server::StartError::Bind { key, source, .. }) => {
            assert_eq!(key, "server.listen");
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a second gateway bound the same port"),
    }
}

/// `/usage` over a real SQLite ledger of 25 000 accounts in a day: JSON pages of `limit` rows
/// walked by `next_cursor` give every row exactly once, in key order; a limit above the
/// maximum, a garbled cursor and another query's cursor are 400; CSV streams every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_pages_walk_every_row_once_and_csv_streams_them_all() {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use linkup_gateway::config::LedgerSync;
    use linkup_gateway::ledger::{day_key, day_of, Ledger, Outcome, Row, SqliteLedger};

    const ACCOUNTS: u64 = 25_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.sqlite3");
    let now = linkup_gateway::budgets::now_ms();
    let day = day_key(day_of(now));
    let mut want: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    {
        // Straight through the ledger API (async: queued, then one flush): quick.
        let ledger = SqliteLedger::open(&path, LedgerSync::Async).unwrap();
        let odd = ["=HYPERLINK(1)", "a,b", "", "Zeta", "ämter"];
        let accounts = (0..ACCOUNTS)
            .map(|i| format!("acc_{:05}", i * 7_919 % ACCOUNTS))
            .chain(odd.iter().map(|a| a.to_string()));
        for (i, account) in accounts.enumerate() {
            let client = if i % 5 == 0 { "beta" } else { "alpha" };
            for n in 0..(1 + u64::from(i % 10 == 0)) {
                let credits = (i as u64 + n) % 3;
                ledger
                    .record(Row {
                        at_ms: now,
                        request_id: format!("r{i}-{n}"),
                        client: Arc::from(client),
                        account_id: (!account.is_empty()).then(|| Arc::from(account.as_str())),
                        path: "/v2/profiles".into(),
                        action: Some(Arc::from("get")),
                        status: 200,
                        credits,
                        credits_known: true,
                        credits_raw: None,
                        outcome: Outcome::Settled,
                    })
                    .await
                    .unwrap();
                let e = want
                    .entry((client.to_string(), account.clone()))
                    .or_default();
                e.0 += 1;
                e.1 += credits;
            }
        }
        ledger.flush().await.unwrap();
    }
    let want: Vec<(String, String, u64, u64)> = want
        .into_iter()
        .map(|((c, a), (r, cr))| (c, a, r, cr))
        .collect();
    let h = Harness::start_with("", &format!("[ledger]\npath = \"{}\"\n", path.display())).await;
    let range = format!("from={day}&to={day}&by=client,account");
    let row_of = |r: &serde_json::Value| {
        (
            r["client"].as_str().unwrap().to_string(),
            r["account"].as_str().unwrap().to_string(),
            r["requests"].as_u64().unwrap(),
            r["credits"].as_u64().unwrap(),
        )
    };

    // Without limit: the first page of the default size, and a cursor.
    let first = h.admin(&format!("/usage?{range}")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let v = first.json();
    assert_eq!(v["rows"].as_array().unwrap().len(), 1_000);
    assert!(v["next_cursor"].is_string());
    let first_rows: Vec<_> = v["rows"].as_array().unwrap().iter().map(row_of).collect();
    assert_eq!(first_rows[..], want[..1_000]);

    // Walked 997 at a time; every other page asks with the cursor alone.
    let mut got = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match (&next, pages % 2) {
            (None, _) => format!("/usage?{range}&limit=997"),
            (Some(c), 0) => format!("/usage?{range}&limit=997&cursor={c}"),
            (Some(c), _) => format!("/usage?cursor={c}&limit=997"),
        };
        let a = h.admin(&url).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        let rows = v["rows"].as_array().unwrap();
        assert!(rows.len() <= 997);
        got.extend(rows.iter().map(row_of));
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => next = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, want.len().div_ceil(997));
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want, "every row once, in key order");

    // Limits beyond the bounds, garbled and foreign cursors: 400, saying why.
    for bad in ["limit=10001", "limit=0", "limit=lots"] {
        let a = h.admin(&format!("/usage?{range}&{bad}")).await;
        assert_eq!(a.status, 400, "{bad}");
        assert!(a.text().contains("1 to 10000"), "{bad}: {}", a.text());
    }
    let cursor = first.json()["next_cursor"].as_str().unwrap().to_string();
    for garbled in ["zz", "7b7d", &cursor[..cursor.len() - 4]] {
        let a = h.admin(&format!("/usage?{range}&cursor={garbled}")).await;
        assert_eq!(a.status, 400, "{garbled}");
        assert!(a.text().starts_with("cursor: not a cursor"), "{}", a.text());
    }
    for foreign in [
        format!("by=account&cursor={cursor}"),
        format!("from=2020-01-01&cursor={cursor}"),
    ] {
        let a = h.admin(&format!("/usage?{foreign}")).await;
        assert_eq!(a.status, 400, "{foreign}");
        assert!(a.text().contains("another query"), "{}", a.text());
    }

    // CSV without limit: every row, streamed (chunked, no length known up front).
    let csv_lines = |body: &[u8]| -> Vec<(String, String, u64, u64)> {
        let mut r = csv::Reader::from_reader(body);
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                (
                    rec[0].to_string(),
                    rec[1].to_string(),
                    rec[2].parse().unwrap(),
                    rec[3].parse().unwrap(),
                )
            })
            .collect()
    };
    let neutral: Vec<_> = want
        .iter()
        .map(|(c, a, r, cr)| {
            let a = if a.starts_with('=') {
                format!("'{a}")
            } else {
                a.clone()
            };
            (c.clone(), a, *r, *cr)
        })
        .collect();
    let csv = h.admin(&format!("/usage?{range}&format=csv")).await;
    assert_eq!(csv.status, 200);
    assert!(csv.headers.get("content-length").is_none());
    assert!(csv.headers.get("x-next-cursor").is_none());
    assert!(csv.body.starts_with(b"client,account,requests,credits\n"));
    assert_eq!(csv_lines(&csv.body), neutral);
    // Sent in parts as the ledger is read (10 000 rows a read), not built whole first.
    let resp = h
        .http
        .request(
            Request::get(h.admin_url(&format!("/usage?{range}&format=csv")))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let (mut parts, mut bytes) = (0, 0);
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if let Some(d) = frame.unwrap().data_ref() {
            parts += 1;
            bytes += d.len();
        }
    }
    assert_eq!(bytes, csv.body.len());
    assert!(parts >= want.len().div_ceil(10_000), "{parts} parts");

    // CSV with limit: that page, the next cursor in a header; the rest streamed after it.
    let page = h
        .admin(&format!("/usage?{range}&format=csv&limit=500"))
        .await;
    assert_eq!(page.status, 200);
    let next = page.headers["x-next-cursor"].to_str().unwrap().to_string();
    let head = csv_lines(&page.body);
    assert_eq!(head[..], neutral[..500]);
    let rest = h.admin(&format!("/usage?cursor={next}&format=csv")).await;
    assert_eq!(rest.status, 200);
    assert_eq!(csv_lines(&rest.body)[..], neutral[500..]);
}
