//! The end-to-end harness: the real emulator and the real gateway on 127.0.0.1:0, a real HTTP
//! client, a real key file, and every log line captured so tests can look for leaks.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use linkup_gateway::config;
use linkup_gateway::emulator::{self, EmulatorConfig, EmulatorHandle};
use linkup_gateway::server::Gateway;
use serde_json::Value;

pub const UPSTREAM_KEY: &str = "upstream-secret-DO-NOT-LEAK-7f3a9c";
pub const ALPHA_KEY: &str = "lgw_alpha_virtual_key_DO_NOT_LEAK_41d2";
pub const SCOPED_KEY: &str = "lgw_scoped_virtual_key_DO_NOT_LEAK_98be";

/// Every log line of this test binary, at debug level, for the secrets test.
pub fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter("debug")
            .with_writer(move || CaptureWriter(writer.clone()))
            .try_init();
        buf
    })
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The emulator on 127.0.0.1:0, accepting `key` as the upstream key.
pub async fn start_emulator(key: &str) -> EmulatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    emulator::start(
        listener,
        EmulatorConfig {
            api_key: key.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

pub fn sha(key: &str) -> String {
    linkup_gateway::keygen::key_sha256_hex(key)
}

pub struct Harness {
    pub emu: EmulatorHandle,
    pub gw: Gateway,
    pub http: Client<HttpConnector, Full<Bytes>>,
    pub dir: tempfile::TempDir,
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A `/v2/profiles`-style body: `account_id`, `action`, params.
pub fn action(account: &str, action: &str) -> String {
    format!(r#"{{"account_id":"{account}","action":"{action}","params":{{"profile_url":"u"}}}}"#)
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
    pub fn source(&self) -> String {
        self.json()["error"]["source"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// The config every harness starts from; `extra` is appended (more sections or clients).
pub fn config_text(upstream_url: &str, key_file: &str, server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = 4096
shutdown_grace = "5s"
{server}

[upstream]
url = "{upstream_url}"
api_key_file = "{key_file}"
connect_timeout = "1s"

[[clients]]
name = "alpha"
key_sha256 = "{alpha}"

[[clients]]
name = "scoped"
key_sha256 = "{scoped}"
accounts = ["acc_allowed"]
paths = ["/v2/checkpoint", "/v2/accounts/*"]
{limits}
{extra}
"#,
        // Generous limits unless a test sets its own, so only limit tests meet limits.
        limits = if extra.contains("[rate_limit]") {
            ""
        } else {
            "[rate_limit]\nper_account = \"100000/sec\"\nburst = 100000\n"
        },
        server = if server.contains("request_timeout") {
            server.to_owned()
        } else {
            format!("request_timeout = \"5s\"\n{server}")
        },
        alpha = sha(ALPHA_KEY),
        scoped = sha(SCOPED_KEY),
    )
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("", "").await
    }

    /// `server`: lines for the [server] table; `extra`: more tables or clients.
    pub async fn start_with(server: &str, extra: &str) -> Harness {
        captured_logs();
        let emu = start_emulator(UPSTREAM_KEY).await;
        Self::start_against(emu, server, extra).await
    }

    pub async fn start_against(emu: EmulatorHandle, server: &str, extra: &str) -> Harness {
        Self::start_against_with_upstream(emu, server, "", extra).await
    }

    /// Like `start_with`, with `upstream`: lines for the [upstream] table.
    pub async fn start_with_upstream(upstream: &str, extra: &str) -> Harness {
        captured_logs();
        let emu = start_emulator(UPSTREAM_KEY).await;
        Self::start_against_with_upstream(emu, "", upstream, extra).await
    }

    async fn start_against_with_upstream(
        emu: EmulatorHandle,
        server: &str,
        upstream: &str,
        extra: &str,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("upstream.key");
        std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
        let cfg_path = dir.path().join("gateway.toml");
        let text = config_text(&emu.url(), &key_file.display().to_string(), server, extra)
            .replacen(
                "connect_timeout = \"1s\"\n",
                &format!("connect_timeout = \"1s\"\n{upstream}\n"),
                1,
            );
        std::fs::write(&cfg_path, text).unwrap();
        let settings = config::load(&cfg_path).unwrap();
        let gw = Gateway::start(settings).await.unwrap();
        let http = Client::builder(TokioExecutor::new()).build_http();
        Harness { emu, gw, http, dir }
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("gateway.toml")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.data_addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.admin_addr, path)
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let resp: Response<_> = self.http.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// A request with the given virtual key (None: no key).
    pub async fn call(&self, method: Method, path: &str, key: Option<&str>, body: &str) -> Answer {
        let mut b = Request::builder().method(method).uri(self.url(path));
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        if !body.is_empty() {
            b = b.header("content-type", "application/json");
        }
        self.send(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        self.call(Method::POST, path, Some(ALPHA_KEY), body).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, Some(ALPHA_KEY), "").await
    }

    pub async fn admin(&self, path: &str) -> Answer {
        let req = Request::get(self.admin_url(path))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(req).await
    }

    /// A connected account (login_token login through the gateway).
    pub async fn connected_account(&self, token: &str) -> String {
        let a = self
            .post(
                "/v2/login",
                &format!(r#"{{"platform":"linkedin","login_token":"{token}","country":"FR"}}"#),
            )
            .await;
        assert_eq!(a.status, 200, "login: {}", String::from_utf8_lossy(&a.body));
        a.json()["data"]["account_id"].as_str().unwrap().to_owned()
    }

    pub fn upstream_calls(&self) -> u64 {
        self.emu.stats().total_calls
    }
}
