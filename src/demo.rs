//! `demo`: the emulator and the gateway together on `config/demo.toml`, and a curl
//! walk-through that works as printed. No LinkupAPI key is needed and nothing is charged.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config;
use crate::emulator::{self, EmulatorConfig};
use crate::server::Gateway;

/// The demo client's virtual key. Not a secret: `config/demo.toml` holds its SHA-256 and the
/// demo listens on loopback only.
pub const DEMO_KEY: &str = "lgw_demo_key_for_local_use_only";
/// The variable `config/demo.toml` reads the upstream (emulator) key from.
pub const DEMO_UPSTREAM_KEY_ENV: &str = "LINKUP_DEMO_UPSTREAM_KEY";

pub async fn run(config_path: &Path) -> Result<(), String> {
    let upstream_key = crate::keygen::new_key();
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.push((DEMO_UPSTREAM_KEY_ENV.into(), upstream_key.clone()));
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| format!("cannot read {}: {e}", config_path.display()))?;
    let mut settings = config::load_str(&text, &env, config_path.parent())
        .map_err(|e| format!("{}: {}", config_path.display(), e.problems().join("; ")))?;
    settings.source = Some(config_path.to_owned());
    let emu_addr: SocketAddr = settings.upstream.authority.as_str().parse().map_err(|_| {
        "demo: upstream.url must be http://IP:PORT (the emulator's address)".to_string()
    })?;
    let listener = tokio::net::TcpListener::bind(emu_addr)
        .await
        .map_err(|e| format!("cannot start the emulator on {emu_addr}: {e}"))?;
    let emu = emulator::start(
        listener,
        EmulatorConfig {
            api_key: upstream_key,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("cannot start the emulator: {e}"))?;
    let gateway = Gateway::start(settings).await.map_err(|e| e.to_string())?;
    let gw = format!("http://{}", gateway.data_addr);
    let admin = format!("http://{}", gateway.admin_addr);

    // Log one demo account in through the gateway, so the walk-through can name it.
    let account = login(&gw).await?;
    println!("{}", walkthrough(&gw, &admin, &emu.url(), &account));
    let _ = tokio::signal::ctrl_c().await;
    println!("\nstopping the demo...");
    gateway.shutdown().await;
    emu.shutdown().await;
    Ok(())
}

async fn login(gw: &str) -> Result<String, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("{gw}/v2/login"))
        .header("x-api-key", DEMO_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"platform":"linkedin","email":"ada@example.com","password":"demo","country":"FR"}"#,
        )))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("demo login failed: {e}"))?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    v["data"]["account_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("demo login gave no account_id: {v}"))
}

fn walkthrough(gw: &str, admin: &str, emu: &str, account: &str) -> String {
    format!(
        r#"
linkup-gateway demo — the gateway on {gw}, its admin listener on {admin},
and a LinkupAPI emulator on {emu} (no real key, no real credits).

The demo client's virtual key is {key}. In another terminal:

  export GW={gw} KEY={key}

  # 1. Credits: the gateway swaps your virtual key for the stored upstream key
  curl -s $GW/v2/credits -H "x-api-key: $KEY"

  # 2. An account waiting for 2FA (the demo logged it in: {account})
  curl -s $GW/v2/accounts/{account} -H "x-api-key: $KEY"

  # 3. Submit the 2FA code (the emulator's code is 123456); it costs 1 credit
  curl -s -X POST $GW/v2/checkpoint -H "Authorization: Bearer $KEY" \
       -H 'content-type: application/json' -d '{{"account_id":"{account}","code":"123456"}}'

  # 4. An action on the connected account
  curl -s -X POST $GW/v2/profiles -H "x-api-key: $KEY" \
       -H 'content-type: application/json' \
       -d '{{"account_id":"{account}","action":"get","params":{{"profile_url":"https://www.linkedin.com/in/ada"}}}}'

  # 5. Refusals come in the upstream's envelope, with "source": "gateway"
  curl -s $GW/v2/credits -H "x-api-key: wrong-key"
  curl -s -X POST $GW/v2/checkpoint -H "x-api-key: $KEY" -d 'not json'

  # 6. Operations
  curl -s {admin}/metrics | grep linkup_gateway_requests
  curl -s {admin}/config
  curl -s {emu}/_emulator/stats

Press Ctrl-C to stop.
"#,
        key = DEMO_KEY
    )
}
