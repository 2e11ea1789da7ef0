//! The binary itself: every command's --help, exit codes, check-config, keygen, and `serve`
//! as a real process: SIGHUP reload and SIGTERM drain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_linkup-gateway");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec![],
        vec!["serve"],
        vec!["check-config"],
        vec!["keygen"],
        vec!["emulator"],
        vec!["demo"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        let (code, out, _) = run(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(run(&["frobnicate"]).0, 2);
    assert_eq!(run(&["serve", "--bogus"]).0, 2);
    assert_eq!(run(&["keygen"]).0, 2, "--name or --rotate is required");
    assert_eq!(run(&["keygen", "--name", "a", "--rotate", "a"]).0, 2);
    assert_eq!(run(&["keygen", "--rotate", "has space"]).0, 2);
    assert_eq!(run(&["keygen", "--name", "has space"]).0, 2);
    assert_eq!(run(&["--log-format", "xml", "keygen", "--name", "a"]).0, 2);
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn check_config_names_each_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "bad.toml",
        "[server]\nrequest_timeout = \"soon\"\n[upstream]\nurl = \"ftp://x\"\napi_key_file = \"missing.key\"\n[rate_limit]\nper_account = \"9/eon\"\n",
    );
    let (code, _, err) = run(&["check-config", "--config", &cfg]);
    assert_eq!(code, 1);
    for key in [
        "server.request_timeout",
        "upstream.url",
        "upstream.api_key_file",
        "rate_limit.per_account",
    ] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let cfg = write(
        dir.path(),
        "typo.toml",
        "[sever]\nlisten = \"127.0.0.1:1\"\n",
    );
    let (code, _, err) = run(&["check-config", "--config", &cfg]);
    assert_eq!(code, 1);
    assert!(err.contains("sever"), "{err}");
    let (code, _, err) = run(&["check-config", "--config", "/nonexistent/gw.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn keygen_rotate_prints_a_new_key_once_and_the_line_for_the_existing_client() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "k", "upstream-key\n");
    let (code, out, err) = run(&["keygen", "--rotate", "crm-sync"]);
    assert_eq!(code, 0);
    let key = err
        .split_whitespace()
        .find(|w| w.starts_with("lgw_"))
        .unwrap()
        .to_owned();
    assert_eq!(
        err.matches(&key).count(),
        1,
        "the key is shown once, on stderr"
    );
    assert!(
        !out.contains(&key),
        "stdout (what gets appended to a config) holds no key"
    );
    assert!(out.contains("not_after"), "{out}");
    let line: String = out
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(line.starts_with("keys = "), "{line}");
    let old = linkup_gateway::keygen::key_sha256_hex("lgw_old");
    let cfg = write(
        dir.path(),
        "rotated.toml",
        &format!(
            "[upstream]\nurl = \"https://api.linkupapi.com\"\napi_key_file = \"k\"\n[[clients]]\nname = \"crm-sync\"\nkey_sha256 = \"{old}\"\n{line}\n"
        ),
    );
    let (code, _, err) = run(&["check-config", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn check_config_accepts_a_good_file_and_keygen_output() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "k", "upstream-key\n");
    let (code, block, err) = run(&["keygen", "--name", "crm-sync"]);
    assert_eq!(code, 0);
    assert!(block.contains("[[clients]]") && block.contains("key_sha256"));
    let key = err
        .split_whitespace()
        .find(|w| w.starts_with("lgw_"))
        .unwrap();
    assert!(!block.contains(key), "the key goes to stderr only");
    let cfg = write(
        dir.path(),
        "good.toml",
        &format!("[upstream]\nurl = \"https://api.linkupapi.com\"\napi_key_file = \"k\"\n{block}"),
    );
    let (code, out, err) = run(&["check-config", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
    assert!(!out.contains("upstream-key"));
}

#[test]
fn serve_refuses_a_bad_config_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "g.toml",
        "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"UNSET_VAR_FOR_TEST\"\n",
    );
    let (code, _, err) = run(&["serve", "--config", &cfg]);
    assert_eq!(code, 1);
    assert!(err.contains("upstream.api_key_env"), "{err}");
}

/// The emulator on 127.0.0.1:0, accepting `key`.
async fn start_emulator(key: &str) -> linkup_gateway::emulator::EmulatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    linkup_gateway::emulator::start(
        listener,
        linkup_gateway::emulator::EmulatorConfig {
            api_key: key.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

type LogLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// `serve` as a real process with JSON logs; returns it, its log lines and its data address
/// once it logs that it listens.
async fn spawn_serve(cfg: &str) -> (tokio::process::Child, LogLines, String) {
    let mut child = tokio::process::Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config", cfg])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let up = wait_for_log(&mut lines, "linkup-gateway listening").await;
    let addr = up["data_addr"].as_str().unwrap().to_owned();
    (child, lines, addr)
}

/// Read JSON log lines from the child until one has `message == want`; return it.
async fn wait_for_log(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    want: &str,
) -> serde_json::Value {
    let fut = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == want {
                    return v;
                }
            }
        }
        panic!("the gateway exited before logging {want:?}");
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("no {want:?} log line within 30 s"))
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_drains_on_sigterm() {
    use bytes::Bytes;
    use http_body_util::Full;
    use linkup_gateway::emulator;

    let emu = start_emulator("k-up").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "up.key", "k-up");
    let one = linkup_gateway::keygen::key_sha256_hex("lgw_one");
    let two = linkup_gateway::keygen::key_sha256_hex("lgw_two");
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n\
         [upstream]\nurl = \"{}\"\napi_key_file = \"up.key\"\n[[clients]]\nname = \"one\"\nkey_sha256 = \"{one}\"\n",
        emu.url()
    );
    let cfg = write(dir.path(), "g.toml", &base);
    let (mut child, mut lines, addr) = spawn_serve(&cfg).await;
    let pid = child.id().unwrap().to_string();

    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let get = |key: &'static str| {
        client.request(
            http::Request::get(format!("http://{addr}/v2/credits"))
                .header("x-api-key", key)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    };
    assert_eq!(get("lgw_one").await.unwrap().status(), 200);
    assert_eq!(get("lgw_two").await.unwrap().status(), 403);

    // SIGHUP: a second client appears.
    write(
        dir.path(),
        "g.toml",
        &format!("{base}[[clients]]\nname = \"two\"\nkey_sha256 = \"{two}\"\n"),
    );
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_for_log(&mut lines, "config reloaded").await;
    assert_eq!(get("lgw_two").await.unwrap().status(), 200);

    // SIGTERM while a slow request is in flight: it completes, then the process exits 0.
    emu.set_faults(emulator::Faults {
        latency_ms: 500,
        ..Default::default()
    });
    let slow = tokio::spawn(get("lgw_one"));
    while emu.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn demo_walkthrough_works_as_printed() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    // The demo binds the emulator at upstream.url: pick a free port for it.
    let emu_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml")).unwrap();
    let text = shipped
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("127.0.0.1:8787", &format!("127.0.0.1:{emu_port}"))
        .replace("../data/demo-ledger.sqlite3", "demo-ledger.sqlite3");
    let cfg = write(dir.path(), "demo.toml", &text);
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--config", &cfg])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push_str(&line);
            out.push('\n');
            if line.contains("Press Ctrl-C") {
                return;
            }
        }
        panic!("demo exited early: {out}");
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .unwrap();
    let gw = out
        .split("export GW=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    let key = out
        .split("KEY=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    let account = out
        .split("the demo logged it in: ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap()
        .to_owned();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    // Step 3 of the walk-through, as printed.
    let resp = client
        .request(
            http::Request::post(format!("{gw}/v2/checkpoint"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!(
                    r#"{{"account_id":"{account}","code":"123456"}}"#
                ))))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"]["status"], "connected");
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn usage_reports_the_ledger_as_table_csv_and_json() {
    use linkup_gateway::ledger::{Ledger, Outcome, Row, SqliteLedger};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    // `usage` needs only [ledger]: no upstream key in sight.
    let cfg = write(
        dir.path(),
        "g.toml",
        "[upstream]\nurl = \"https://api.linkupapi.com\"\napi_key_env = \"NOT_SET_ANYWHERE\"\n[ledger]\npath = \"l.sqlite3\"\n",
    );
    {
        let ledger = SqliteLedger::open(
            &dir.path().join("l.sqlite3"),
            linkup_gateway::config::LedgerSync::PowerSafe,
        )
        .unwrap();
        let now = linkup_gateway::budgets::now_ms();
        for (client, action, credits, outcome) in [
            ("crm", "get", 1, Outcome::Settled),
            ("crm", "search_people", 2, Outcome::Settled),
            ("crm", "checkpoint", 0, Outcome::Cached),
            ("outreach", "invite", 1, Outcome::Settled),
        ] {
            ledger
                .record(Row {
                    at_ms: now,
                    request_id: "r".into(),
                    client: Arc::from(client),
                    account_id: Some(Arc::from("acc_1")),
                    path: "/v2/profiles".into(),
                    action: Some(Arc::from(action)),
                    status: 200,
                    credits,
                    credits_known: true,
                    credits_raw: None,
                    outcome,
                })
                .await
                .unwrap();
        }
    }
    let (code, out, err) = run(&["usage", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("TOTAL") && last.trim_end().ends_with('4'),
        "{out}"
    );
    assert!(out.contains("crm") && out.contains("outreach"), "{out}");
    let (code, out, _) = run(&[
        "usage",
        "--config",
        &cfg,
        "--by",
        "client,outcome",
        "--format",
        "csv",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("client,outcome,requests,credits\n"),
        "{out}"
    );
    assert!(out.contains("crm,cached,1,0"), "{out}");
    let (code, out, _) = run(&[
        "usage", "--config", &cfg, "--by", "action", "--format", "json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 4);
    assert_eq!(run(&["usage", "--config", &cfg, "--by", "colour"]).0, 2);
    assert_eq!(
        run(&["usage", "--config", &cfg, "--from", "2026-13-01"]).0,
        2
    );
}

#[tokio::test]
async fn usage_pages_with_limit_and_cursor_and_streams_every_row_without() {
    use linkup_gateway::ledger::{Ledger, Outcome, Row, SqliteLedger};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "g.toml",
        "[upstream]\nurl = \"https://api.linkupapi.com\"\napi_key_env = \"NOT_SET_ANYWHERE\"\n[ledger]\npath = \"l.sqlite3\"\n",
    );
    // More than one ledger read (10 000 rows each) for the unlimited report.
    const ACCOUNTS: usize = 12_000;
    {
        let ledger = SqliteLedger::open(
            &dir.path().join("l.sqlite3"),
            linkup_gateway::config::LedgerSync::Async,
        )
        .unwrap();
        let now = linkup_gateway::budgets::now_ms();
        for i in 0..ACCOUNTS {
            ledger
                .record(Row {
                    at_ms: now,
                    request_id: format!("r{i}"),
                    client: Arc::from("crm"),
                    account_id: Some(Arc::from(format!("acc_{:05}", i * 7 % ACCOUNTS))),
                    path: "/v2/profiles".into(),
                    action: Some(Arc::from("get")),
                    status: 200,
                    credits: 1,
                    credits_known: true,
                    credits_raw: None,
                    outcome: Outcome::Settled,
                })
                .await
                .unwrap();
        }
        ledger.flush().await.unwrap();
    }
    let want: Vec<String> = (0..ACCOUNTS).map(|i| format!("acc_{i:05}")).collect();
    let accounts = |v: &serde_json::Value| -> Vec<String> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["account"].as_str().unwrap().to_string())
            .collect()
    };

    // Without --limit: every row, in every format, read page by page.
    let (code, out, err) = run(&[
        "usage", "--config", &cfg, "--by", "account", "--format", "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(accounts(&v), want);
    assert!(v["next_cursor"].is_null());
    assert!(err.is_empty(), "{err}");
    let (code, out, _) = run(&[
        "usage", "--config", &cfg, "--by", "account", "--format", "csv",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), ACCOUNTS + 1);
    let (code, out, _) = run(&["usage", "--config", &cfg, "--by", "account"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("acc_")).count(),
        ACCOUNTS
    );
    assert!(out.lines().last().unwrap().starts_with("TOTAL"), "{out}");

    // --limit: one page, the next cursor on stderr (and in the JSON); --cursor continues.
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec![
            "usage", "--config", &cfg, "--format", "json", "--limit", "1000",
        ];
        match &cursor {
            Some(c) => args.extend(["--cursor", c.as_str()]),
            None => args.extend(["--by", "account"]),
        }
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let page = accounts(&v);
        assert!(page.len() <= 5000);
        got.extend(page);
        match v["next_cursor"].as_str() {
            Some(c) => {
                assert!(err.contains(&format!("--cursor {c}")), "{err}");
                cursor = Some(c.to_string());
            }
            None => {
                assert!(err.is_empty(), "{err}");
                break;
            }
        }
    }
    assert_eq!(got, want);

    // A limited table totals its page and says so.
    let (code, out, err) = run(&[
        "usage", "--config", &cfg, "--by", "account", "--limit", "10",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().filter(|l| l.starts_with("acc_")).count(), 10);
    assert!(
        out.lines().last().unwrap().starts_with("PAGE TOTAL"),
        "{out}"
    );
    assert!(err.contains("--cursor "), "{err}");

    // Bad limits and cursors are usage errors (exit 2), said plainly.
    for bad in ["0", "10001", "many"] {
        let (code, _, err) = run(&["usage", "--config", &cfg, "--limit", bad]);
        assert_eq!(code, 2, "{bad}");
        assert!(err.contains("1 to 10000"), "{err}");
    }
    let (code, _, err) = run(&["usage", "--config", &cfg, "--cursor", "garbage"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a cursor"), "{err}");
    let c = cursor.unwrap_or_default();
    let (code, _, err) = run(&["usage", "--config", &cfg, "--by", "client", "--cursor", &c]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another query"), "{err}");
}

/// SIGKILL during a run of requests, then restart on the same ledger: every credit a caller saw
/// charged is in the ledger, and nothing is counted twice (the default `crash_safe`).
#[tokio::test]
async fn sigkill_loses_no_credit_a_caller_saw_charged() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::collections::HashMap;
    use std::sync::Arc;

    let emu = start_emulator("k-up").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "up.key", "k-up");
    let key = linkup_gateway::keygen::key_sha256_hex("lgw_kill");
    let cfg = write(
        dir.path(),
        "g.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\napi_key_file = \"up.key\"\n\
             [[clients]]\nname = \"k\"\nkey_sha256 = \"{key}\"\n\
             [rate_limit]\nper_account = \"100000/sec\"\nburst = 100000\n\
             [ledger]\npath = \"ledger.sqlite3\"\n",
            emu.url()
        ),
    );
    let (mut child, mut lines, addr) = spawn_serve(&cfg).await;
    // Keep draining the log pipe so the gateway never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let post = |path: &str, body: String| {
        client.request(
            http::Request::post(format!("http://{addr}{path}"))
                .header("x-api-key", "lgw_kill")
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
    };
    let login = post("/v2/login", r#"{"login_token":"tok-kill"}"#.into())
        .await
        .unwrap();
    let body = login.into_body().collect().await.unwrap().to_bytes();
    let account = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["data"]["account_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // 16 workers send requests until the gateway dies; each records what it saw charged.
    let seen: Arc<std::sync::Mutex<HashMap<String, u64>>> = Arc::default();
    let done = Arc::new(tokio::sync::Notify::new());
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..16 {
        let (seen, done, answered) = (seen.clone(), done.clone(), answered.clone());
        let client = client.clone();
        let addr = addr.clone();
        let account = account.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let req = http::Request::post(format!("http://{addr}/v2/profiles"))
                    .header("x-api-key", "lgw_kill")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"account_id":"{account}","action":"search_people","params":{{"w":{w}}}}}"#
                    ))))
                    .unwrap();
                let Ok(resp) = client.request(req).await else { return };
                let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
                let Ok(body) = resp.into_body().collect().await else { return };
                let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
                let credits = v["metadata"]["credits_consumed"].as_u64().unwrap_or(0);
                seen.lock().unwrap().insert(id, credits);
                if answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 200 {
                    done.notify_one();
                }
            }
        }));
    }
    done.notified().await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for w in workers {
        let _ = w.await;
    }

    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 200);
    // The gateway starts again on the same ledger: what the kill left in the journal (rows in
    // the OS's hands, not yet in SQLite) is written before it listens.
    let (mut restarted, _, _) = spawn_serve(&cfg).await;
    let db = rusqlite::Connection::open(dir.path().join("ledger.sqlite3")).unwrap();
    let mut stmt = db
        .prepare("SELECT request_id, credits FROM ledger_rows")
        .unwrap();
    let mut rows: HashMap<String, u64> = HashMap::new();
    for r in stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
    {
        let (id, credits) = r.unwrap();
        assert!(
            rows.insert(id.clone(), credits as u64).is_none(),
            "request {id} counted twice"
        );
    }
    for (id, credits) in &seen {
        assert_eq!(
            rows.get(id),
            Some(credits),
            "a charge the caller saw is missing: {id}"
        );
    }
    // The upstream charged at most what the ledger holds plus the calls cut by the kill.
    let charged = emu.stats().credits_charged as u64;
    let recorded: u64 = rows.values().sum();
    assert!(
        recorded <= charged,
        "the ledger holds more than the upstream charged"
    );

    restarted.start_kill().unwrap();
    restarted.wait().await.unwrap();
}

/// `serve` raises its soft open-file limit to the hard one (each call in flight holds two
/// descriptors) and runs the data plane on `server.workers` threads of its own.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_raises_the_open_file_limit_and_starts_its_workers() {
    let emu = start_emulator("k-up").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "up.key", "k-up");
    let cfg = write(
        dir.path(),
        "g.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 3\n\
             [upstream]\nurl = \"{}\"\napi_key_file = \"up.key\"\n[ledger]\npath = \"{}\"\n",
            emu.url(),
            dir.path().join("ledger.sqlite3").display()
        ),
    );
    let mut child = tokio::process::Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -Sn 256 && exec {BIN} --log-format json serve --config {cfg}"),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    wait_for_log(&mut lines, "linkup-gateway listening").await;
    let pid = child.id().unwrap();

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "256", "{line}");
    assert_eq!(soft, hard, "{line}");

    let mut workers: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("lgw-worker-"))
        .collect();
    workers.sort();
    assert_eq!(workers, ["lgw-worker-0", "lgw-worker-1", "lgw-worker-2"]);
    child.kill().await.unwrap();
}

/// Two gateways pointed at one SQLite ledger would each enforce the whole daily budget: the
/// second process is refused at start, naming the first one's pid, and the first keeps serving.
#[tokio::test]
async fn a_second_gateway_on_the_same_ledger_is_refused_naming_the_first() {
    let emu = start_emulator("k-up").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "up.key", "k-up");
    let ledger = dir.path().join("ledger.sqlite3");
    let cfg = |name: &str| {
        write(
            dir.path(),
            name,
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [upstream]\nurl = \"{}\"\napi_key_file = \"up.key\"\n[ledger]\npath = \"{}\"\n",
                emu.url(),
                ledger.display()
            ),
        )
    };
    let (first_cfg, second_cfg) = (cfg("one.toml"), cfg("two.toml"));
    let (mut child, _lines, addr) = spawn_serve(&first_cfg).await;
    let pid = child.id().unwrap();

    let second = tokio::process::Command::new(BIN)
        .args(["serve", "--config", &second_cfg])
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), second)
        .await
        .expect("the second gateway neither started nor gave up")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains("ledger.sqlite3"), "{err}");

    // The first one still answers.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /v2/credits HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    child.kill().await.unwrap();
}
