//! The raw surface: exactly what the file may say (`deny_unknown_fields`), with every default
//! in one block, [`defaults`], as rpxy keeps its `constants.rs`. Values stay strings here
//! (`"30s"`, `"60/min"`) so that validation can report every bad one at once, each with its key
//! path; serde would stop at the first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// Every default of the config file, in one place. `config/gateway.toml` shows the same values.
pub mod defaults {
    // [server]
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    pub const MAX_BODY_BYTES: u64 = 1024 * 1024;
    pub const REQUEST_TIMEOUT: &str = "60s";
    pub const SHUTDOWN_GRACE: &str = "30s";
    pub const MAX_IN_FLIGHT: u64 = 10_000;
    pub const HEADER_READ_TIMEOUT: &str = "10s";
    /// 0: one data-plane worker per CPU the process may run on.
    pub const WORKERS: u64 = 0;
    pub const MAX_ID_BYTES: u64 = super::super::MAX_ID_BYTES as u64;

    // [upstream]
    pub const UPSTREAM_URL: &str = "https://api.linkupapi.com";
    pub const CONNECT_TIMEOUT: &str = "5s";
    /// 256 MB: eight answers of the largest size one answer may have (32 MB) at once, far above
    /// what LinkupAPI's JSON answers (kilobytes) need even with thousands in flight.
    pub const MAX_BUFFERED_BYTES: u64 = 8 * crate::upstream::MAX_RESPONSE_BYTES as u64;
    pub const UPSTREAM_PROTOCOL: &str = "auto";
    /// 100: what RFC 9113 recommends a peer allow at least, and what most servers announce.
    pub const HTTP2_MAX_STREAMS: u32 = 100;

    // [[clients]]
    pub const CLIENT_ACCOUNTS: &[&str] = &["*"];
    pub const CLIENT_PATHS: &[&str] = &["/v2/*"];

    // [rate_limit]
    pub const PER_ACCOUNT: &str = "60/min";
    pub const BURST: u32 = 10;
    pub const UPSTREAM_429_COOLDOWN: &str = "60s";
    pub const MAX_QUEUED: usize = 10_000;
    /// A rule's `max_delay` under `on_limit = "delay"`.
    pub const RULE_MAX_DELAY: &str = "30s";

    // [checkpoint]
    pub const COALESCE: bool = true;

    // [status_cache]
    pub const STATUS_CACHE_ENABLED: bool = true;
    pub const STATUS_CACHE_TTL: &str = "10m";
    pub const STATUS_CACHE_MAX_ENTRIES: u64 = 100_000;

    // [idempotency]
    pub const IDEMPOTENCY_ENABLED: bool = true;
    pub const IDEMPOTENCY_TTL: &str = "24h";
    pub const IDEMPOTENCY_MAX_KEYS: u64 = 1_000_000;

    // [ledger]
    /// Relative to the config file's folder.
    pub const LEDGER_PATH: &str = "data/ledger.sqlite3";
    pub const LEDGER_SYNC: &str = "crash_safe";
    pub const RECONCILE_EVERY: &str = "5m";
    pub const BUFFER_ROWS: u64 = 100_000;

    // [fleet]
    pub const FLEET_TIMEOUT: &str = "250ms";
    pub const LOCAL_STATUS_TTL: &str = "5s";
    pub const CHECKPOINT_LEASE: &str = "10s";
    pub const KEY_PREFIX: &str = "lgw:";
    pub const LIMITS_ON_STORE_FAILURE: &str = "local";
    pub const BUDGETS_ON_STORE_FAILURE: &str = "deny";

    // [costs]
    pub const COST_DEFAULT: u64 = 1;
    /// Endpoints the upstream documents as free; `[costs]` entries override them.
    pub const FREE_BY_DEFAULT: [&str; 6] = [
        "/v2/credits",
        "/v2/accounts",
        "/v2/accounts/*",
        "/v2/logs",
        "/v2/webhooks",
        "/v2/webhooks/*",
    ];
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub upstream: Option<RawUpstream>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub checkpoint: RawCheckpoint,
    #[serde(default)]
    pub status_cache: RawStatusCache,
    #[serde(default)]
    pub idempotency: RawIdempotency,
    #[serde(default)]
    pub ledger: RawLedger,
    pub fleet: Option<RawFleet>,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub costs: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: String,
    pub max_body_bytes: u64,
    pub request_timeout: String,
    pub shutdown_grace: String,
    pub max_in_flight: u64,
    pub header_read_timeout: String,
    /// Data-plane worker threads, each a single-threaded runtime accepting on the listener;
    /// 0 (the default): one per CPU the process may run on.
    pub workers: u64,
    pub max_id_bytes: u64,
    /// Where the admin token comes from (never the config file itself: it is served by /config).
    pub admin_token_env: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub url: String,
    pub api_key_file: Option<PathBuf>,
    pub api_key_env: Option<String>,
    pub connect_timeout: String,
    pub ca_file: Option<PathBuf>,
    /// Bytes all upstream answers being buffered may hold at once, process-wide.
    pub max_buffered_bytes: u64,
    /// `"auto"` (default), `"http2"` or `"http1"`: see [`super::UpstreamProtocol`].
    pub protocol: String,
    /// Calls one HTTP/2 connection carries at once before another is opened (never more than
    /// the upstream announces).
    pub http2_max_streams: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub name: String,
    /// One virtual key, as keygen prints it. Several keys (rotation): `keys`.
    pub key_sha256: Option<String>,
    /// Keys with an optional expiry: `keys = [{ sha256 = "...", not_after = "2026-12-31" }]`.
    #[serde(default)]
    pub keys: Vec<RawClientKey>,
    /// Identify this client by its TLS client certificate (subject CN or a DNS SAN).
    pub cert_subject: Option<String>,
    #[serde(default = "client_accounts")]
    pub accounts: Vec<String>,
    #[serde(default = "client_paths")]
    pub paths: Vec<String>,
    pub daily_credit_budget: Option<u64>,
    pub requests_per_second: Option<f64>,
    /// Burst of the per-client limit; default: `requests_per_second` rounded up.
    pub burst: Option<u32>,
    #[serde(default)]
    pub shadow: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientKey {
    pub sha256: String,
    /// RFC 3339 UTC date-time (`2026-12-31T18:00:00Z`) or date (`2026-12-31`: the whole day).
    pub not_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub per_account: String,
    pub burst: u32,
    pub upstream_429_cooldown: String,
    pub shadow: bool,
    /// Requests waiting under `on_limit = "delay"` rules, all queues together; past it, 429.
    pub max_queued: usize,
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Option<String>,
    pub path: String,
    pub action: Option<String>,
    pub per_account: String,
    pub burst: Option<u32>,
    #[serde(default)]
    pub shadow: bool,
    /// `"refuse"` (default): 429 at once; `"delay"`: wait for the next slot.
    pub on_limit: Option<String>,
    /// With `on_limit = "delay"`: the longest wait (default 30 s); a slot further away is 429.
    pub max_delay: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCheckpoint {
    pub coalesce: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStatusCache {
    pub enabled: bool,
    pub ttl: String,
    pub max_entries: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdempotency {
    pub enabled: bool,
    pub ttl: String,
    pub max_keys: u64,
    pub require: Vec<RawRequire>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequire {
    pub path: String,
    pub action: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLedger {
    pub path: Option<PathBuf>,
    pub postgres_url: Option<String>,
    pub sync: String,
    pub reconcile_every: String,
    pub buffer_rows: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    pub redis_url: Option<String>,
    pub on_store_failure: Option<RawStoreFailure>,
    pub timeout: String,
    pub local_status_ttl: String,
    pub checkpoint_lease: String,
    pub key_prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStoreFailure {
    pub limits: String,
    pub budgets: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    #[serde(default)]
    pub per_account: bool,
}

// ---------------------------------------------------------------------------------------------
// The defaults above, applied (serde's `default` calls these for a missing key or section).
// ---------------------------------------------------------------------------------------------

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
fn client_accounts() -> Vec<String> {
    strings(defaults::CLIENT_ACCOUNTS)
}
fn client_paths() -> Vec<String> {
    strings(defaults::CLIENT_PATHS)
}

impl Default for RawServer {
    fn default() -> Self {
        use defaults::*;
        RawServer {
            listen: LISTEN.into(),
            admin_listen: ADMIN_LISTEN.into(),
            max_body_bytes: MAX_BODY_BYTES,
            request_timeout: REQUEST_TIMEOUT.into(),
            shutdown_grace: SHUTDOWN_GRACE.into(),
            max_in_flight: MAX_IN_FLIGHT,
            header_read_timeout: HEADER_READ_TIMEOUT.into(),
            workers: WORKERS,
            max_id_bytes: MAX_ID_BYTES,
            admin_token_env: None,
            admin_token_file: None,
            tls: None,
        }
    }
}

impl Default for RawUpstream {
    fn default() -> Self {
        use defaults::*;
        RawUpstream {
            url: UPSTREAM_URL.into(),
            api_key_file: None,
            api_key_env: None,
            connect_timeout: CONNECT_TIMEOUT.into(),
            ca_file: None,
            max_buffered_bytes: MAX_BUFFERED_BYTES,
            protocol: UPSTREAM_PROTOCOL.into(),
            http2_max_streams: HTTP2_MAX_STREAMS,
        }
    }
}

impl Default for RawRateLimit {
    fn default() -> Self {
        use defaults::*;
        RawRateLimit {
            per_account: PER_ACCOUNT.into(),
            burst: BURST,
            upstream_429_cooldown: UPSTREAM_429_COOLDOWN.into(),
            shadow: false,
            max_queued: MAX_QUEUED,
            rules: Vec::new(),
        }
    }
}

impl Default for RawCheckpoint {
    fn default() -> Self {
        RawCheckpoint {
            coalesce: defaults::COALESCE,
        }
    }
}

impl Default for RawStatusCache {
    fn default() -> Self {
        use defaults::*;
        RawStatusCache {
            enabled: STATUS_CACHE_ENABLED,
            ttl: STATUS_CACHE_TTL.into(),
            max_entries: STATUS_CACHE_MAX_ENTRIES,
        }
    }
}

impl Default for RawIdempotency {
    fn default() -> Self {
        use defaults::*;
        RawIdempotency {
            enabled: IDEMPOTENCY_ENABLED,
            ttl: IDEMPOTENCY_TTL.into(),
            max_keys: IDEMPOTENCY_MAX_KEYS,
            require: Vec::new(),
        }
    }
}

impl Default for RawLedger {
    fn default() -> Self {
        use defaults::*;
        RawLedger {
            path: None,
            postgres_url: None,
            sync: LEDGER_SYNC.into(),
            reconcile_every: RECONCILE_EVERY.into(),
            buffer_rows: BUFFER_ROWS,
        }
    }
}

impl Default for RawFleet {
    fn default() -> Self {
        use defaults::*;
        RawFleet {
            redis_url: None,
            on_store_failure: None,
            timeout: FLEET_TIMEOUT.into(),
            local_status_ttl: LOCAL_STATUS_TTL.into(),
            checkpoint_lease: CHECKPOINT_LEASE.into(),
            key_prefix: KEY_PREFIX.into(),
        }
    }
}

impl Default for RawStoreFailure {
    fn default() -> Self {
        use defaults::*;
        RawStoreFailure {
            limits: LIMITS_ON_STORE_FAILURE.into(),
            budgets: BUDGETS_ON_STORE_FAILURE.into(),
        }
    }
}
