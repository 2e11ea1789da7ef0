//! Configuration: raw serde structs (exactly the TOML surface, `deny_unknown_fields`) are
//! validated once into typed [`Settings`]. Strings become `Duration`s, quotas, `Uri`s and
//! header values here, never per request. Every problem names its key path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Digest;

/// Prefix of environment overrides: `LINKUP_GATEWAY__SERVER__LISTEN=0.0.0.0:8080`.
pub const ENV_PREFIX: &str = "LINKUP_GATEWAY__";

/// The default longest `account_id`, `action` or path id accepted (`server.max_id_bytes`).
/// Each is a limiter, cache and ledger key and a log field: one as long as the body would cost
/// memory everywhere it is kept.
pub const MAX_ID_BYTES: usize = 256;

// ---------------------------------------------------------------------------------------------
// Raw surface: what the file may say. Defaults live here, in one place.
// ---------------------------------------------------------------------------------------------

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
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "d_listen")]
    pub listen: String,
    #[serde(default = "d_admin_listen")]
    pub admin_listen: String,
    #[serde(default = "d_max_body")]
    pub max_body_bytes: u64,
    #[serde(default = "d_request_timeout")]
    pub request_timeout: String,
    #[serde(default = "d_shutdown_grace")]
    pub shutdown_grace: String,
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: u64,
    #[serde(default = "d_header_read_timeout")]
    pub header_read_timeout: String,
    /// Data-plane worker threads, each a single-threaded runtime accepting on the listener;
    /// 0 (the default): one per CPU the process may run on.
    #[serde(default)]
    pub workers: u64,
    #[serde(default = "d_max_id_bytes")]
    pub max_id_bytes: u64,
    /// Where the admin token comes from (never the config file itself: it is served by /config).
    pub admin_token_env: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: d_listen(),
            admin_listen: d_admin_listen(),
            max_body_bytes: d_max_body(),
            request_timeout: d_request_timeout(),
            shutdown_grace: d_shutdown_grace(),
            max_in_flight: d_max_in_flight(),
            header_read_timeout: d_header_read_timeout(),
            workers: 0,
            max_id_bytes: d_max_id_bytes(),
            admin_token_env: None,
            admin_token_file: None,
            tls: None,
        }
    }
}

fn d_listen() -> String {
    "127.0.0.1:8080".into()
}
fn d_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn d_max_body() -> u64 {
    1024 * 1024
}
fn d_request_timeout() -> String {
    "60s".into()
}
fn d_shutdown_grace() -> String {
    "30s".into()
}
fn d_max_in_flight() -> u64 {
    10_000
}
fn d_max_id_bytes() -> u64 {
    MAX_ID_BYTES as u64
}
fn d_header_read_timeout() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default = "d_upstream_url")]
    pub url: String,
    pub api_key_file: Option<PathBuf>,
    pub api_key_env: Option<String>,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: String,
    pub ca_file: Option<PathBuf>,
    /// Bytes all upstream answers being buffered may hold at once, process-wide.
    #[serde(default = "d_max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    /// `"auto"` (default), `"http2"` or `"http1"`: see [`UpstreamProtocol`].
    #[serde(default = "d_upstream_protocol")]
    pub protocol: String,
    /// Calls one HTTP/2 connection carries at once before another is opened (never more than
    /// the upstream announces).
    #[serde(default = "d_http2_max_streams")]
    pub http2_max_streams: u32,
}

fn d_upstream_url() -> String {
    "https://api.linkupapi.com".into()
}
fn d_connect_timeout() -> String {
    "5s".into()
}
/// 256 MB: eight answers of the largest size one answer may have (32 MB) at once, far above
/// what LinkupAPI's JSON answers (kilobytes) need even with thousands in flight.
fn d_max_buffered_bytes() -> u64 {
    8 * crate::upstream::MAX_RESPONSE_BYTES as u64
}
fn d_upstream_protocol() -> String {
    "auto".into()
}
/// 100: what RFC 9113 recommends a peer allow at least, and what most servers announce.
fn d_http2_max_streams() -> u32 {
    100
}
/// The smallest `upstream.max_buffered_bytes`: below it ordinary answers would be refused.
pub const MIN_BUFFERED_BYTES: u64 = 64 * 1024;

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
    #[serde(default = "d_star")]
    pub accounts: Vec<String>,
    #[serde(default = "d_paths")]
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

fn d_star() -> Vec<String> {
    vec!["*".into()]
}
fn d_paths() -> Vec<String> {
    vec!["/v2/*".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default = "d_per_account")]
    pub per_account: String,
    #[serde(default = "d_burst")]
    pub burst: u32,
    #[serde(default = "d_cooldown")]
    pub upstream_429_cooldown: String,
    #[serde(default)]
    pub shadow: bool,
    /// Requests waiting under `on_limit = "delay"` rules, all queues together; past it, 429.
    #[serde(default = "d_max_queued")]
    pub max_queued: usize,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

fn d_max_queued() -> usize {
    10_000
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            per_account: d_per_account(),
            burst: d_burst(),
            upstream_429_cooldown: d_cooldown(),
            shadow: false,
            max_queued: d_max_queued(),
            rules: Vec::new(),
        }
    }
}

fn d_per_account() -> String {
    "60/min".into()
}
fn d_burst() -> u32 {
    10
}
fn d_cooldown() -> String {
    "60s".into()
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
#[serde(deny_unknown_fields)]
pub struct RawCheckpoint {
    #[serde(default = "d_true")]
    pub coalesce: bool,
}

impl Default for RawCheckpoint {
    fn default() -> Self {
        RawCheckpoint { coalesce: true }
    }
}

fn d_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatusCache {
    #[serde(default = "d_true")]
    pub enabled: bool,
    #[serde(default = "d_cache_ttl")]
    pub ttl: String,
    #[serde(default = "d_cache_max")]
    pub max_entries: u64,
}

impl Default for RawStatusCache {
    fn default() -> Self {
        RawStatusCache {
            enabled: true,
            ttl: d_cache_ttl(),
            max_entries: d_cache_max(),
        }
    }
}

fn d_cache_ttl() -> String {
    "10m".into()
}
fn d_cache_max() -> u64 {
    100_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdempotency {
    #[serde(default = "d_true")]
    pub enabled: bool,
    #[serde(default = "d_idem_ttl")]
    pub ttl: String,
    #[serde(default = "d_idem_max")]
    pub max_keys: u64,
    #[serde(default)]
    pub require: Vec<RawRequire>,
}

impl Default for RawIdempotency {
    fn default() -> Self {
        RawIdempotency {
            enabled: true,
            ttl: d_idem_ttl(),
            max_keys: d_idem_max(),
            require: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequire {
    pub path: String,
    pub action: Option<String>,
}

fn d_idem_ttl() -> String {
    "24h".into()
}
fn d_idem_max() -> u64 {
    1_000_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    pub path: Option<PathBuf>,
    pub postgres_url: Option<String>,
    #[serde(default = "d_sync")]
    pub sync: String,
    #[serde(default = "d_reconcile")]
    pub reconcile_every: String,
    #[serde(default = "d_buffer_rows")]
    pub buffer_rows: u64,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            path: None,
            postgres_url: None,
            sync: d_sync(),
            reconcile_every: d_reconcile(),
            buffer_rows: d_buffer_rows(),
        }
    }
}

fn d_sync() -> String {
    "crash_safe".into()
}
fn d_reconcile() -> String {
    "5m".into()
}
fn d_buffer_rows() -> u64 {
    100_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub redis_url: Option<String>,
    pub on_store_failure: Option<RawStoreFailure>,
    #[serde(default = "d_store_timeout")]
    pub timeout: String,
    #[serde(default = "d_local_status_ttl")]
    pub local_status_ttl: String,
    #[serde(default = "d_lease")]
    pub checkpoint_lease: String,
    #[serde(default = "d_key_prefix")]
    pub key_prefix: String,
}

fn d_store_timeout() -> String {
    "250ms".into()
}
fn d_local_status_ttl() -> String {
    "5s".into()
}
fn d_lease() -> String {
    "10s".into()
}
fn d_key_prefix() -> String {
    "lgw:".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStoreFailure {
    #[serde(default = "d_local")]
    pub limits: String,
    #[serde(default = "d_deny")]
    pub budgets: String,
}

fn d_local() -> String {
    "local".into()
}
fn d_deny() -> String {
    "deny".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    #[serde(default)]
    pub per_account: bool,
}

// ---------------------------------------------------------------------------------------------
// Typed settings: what the running gateway uses.
// ---------------------------------------------------------------------------------------------

/// The upstream key. Its `Debug` prints `[redacted]`; the header built from it is sensitive.
#[derive(Clone)]
pub struct ApiKey {
    secret: SecretString,
    header: HeaderValue,
}

impl ApiKey {
    pub fn new(key: &str) -> Result<ApiKey, String> {
        let key = key.trim();
        if key.is_empty() {
            return Err("the upstream key is empty".into());
        }
        let mut header = HeaderValue::from_str(key)
            .map_err(|_| "the upstream key holds characters not allowed in a header".to_string())?;
        header.set_sensitive(true);
        Ok(ApiKey {
            secret: SecretString::from(key.to_owned()),
            header,
        })
    }

    /// The header value to send upstream (marked sensitive: hyper and h2 never index it).
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// Only for comparisons in tests and for redaction checks; never log this.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub source: Option<PathBuf>,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub clients: Vec<Arc<ClientSettings>>,
    pub rate_limit: RateLimitSettings,
    pub checkpoint_coalesce: bool,
    pub status_cache: StatusCacheSettings,
    pub idempotency: IdempotencySettings,
    pub ledger: LedgerSettings,
    pub fleet: Option<FleetSettings>,
    pub metrics_per_account: bool,
    pub costs: CostSettings,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_in_flight: usize,
    pub header_read_timeout: Duration,
    /// Data-plane workers (resolved: at least 1).
    pub workers: usize,
    /// The longest `account_id`, `action` or path segment accepted.
    pub max_id_bytes: usize,
    /// SHA-256 of the admin token; `None`: the admin listener is open (loopback only).
    pub admin_token_sha256: Option<[u8; 32]>,
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    /// Built from the files when the config was loaded (and again on every reload).
    pub server_config: Arc<rustls::ServerConfig>,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Host header value for the upstream.
    pub host: HeaderValue,
    /// The url as configured (no secrets in it: userinfo is refused).
    pub url: String,
    pub api_key: ApiKey,
    pub api_key_source: String,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// The process-wide budget of bytes held by upstream answers being buffered (and until
    /// they have been written to their callers); past it an answer is refused with a 503.
    pub max_buffered_bytes: usize,
    pub protocol: UpstreamProtocol,
    /// Calls one HTTP/2 connection carries at once (at most what the upstream announces).
    pub http2_max_streams: usize,
}

/// How the gateway speaks to the upstream (`upstream.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// https: HTTP/2 when the TLS handshake agrees on it (ALPN), else HTTP/1.1; http: HTTP/1.1.
    Auto,
    /// HTTP/2 only: over https by ALPN, over http with prior knowledge (h2c).
    Http2,
    /// HTTP/1.1 only.
    Http1,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Auto => "auto",
            UpstreamProtocol::Http2 => "http2",
            UpstreamProtocol::Http1 => "http1",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub name: Arc<str>,
    /// Its virtual keys (by SHA-256); several while a rotation overlaps. May be empty when the
    /// client is identified by `cert_subject` only.
    pub keys: Vec<ClientKey>,
    /// Matched against a verified client certificate's subject CN and DNS SANs.
    pub cert_subject: Option<String>,
    pub accounts: AccountScope,
    pub paths: Vec<PathPattern>,
    pub daily_credit_budget: Option<u64>,
    pub requests_per_second: Option<f64>,
    pub burst: u32,
    pub shadow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    pub sha256: [u8; 32],
    /// The last moment the key is accepted; `None`: no expiry.
    pub not_after: Option<time::OffsetDateTime>,
}

impl ClientKey {
    pub fn expired_at(&self, now: time::OffsetDateTime) -> bool {
        self.not_after.is_some_and(|t| now > t)
    }
}

/// `not_after`: an RFC 3339 date-time in UTC, or a date (the key works through that whole
/// UTC day).
pub fn parse_not_after(v: &str) -> Result<time::OffsetDateTime, String> {
    let v = v.trim();
    if let Ok(t) = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339) {
        return Ok(t.to_offset(time::UtcOffset::UTC));
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    match time::Date::parse(v, &date_format) {
        Ok(d) => Ok(d
            .with_time(time::macros::time!(23:59:59.999_999_999))
            .assume_utc()),
        Err(_) => Err(format!(
            "`{v}` is not an RFC 3339 date-time or date (examples: \"2026-12-31T00:00:00Z\", \"2026-12-31\")"
        )),
    }
}

#[derive(Debug, Clone)]
pub enum AccountScope {
    Any,
    Only(Vec<String>),
}

impl AccountScope {
    pub fn allows(&self, account_id: &str) -> bool {
        match self {
            AccountScope::Any => true,
            AccountScope::Only(list) => list.iter().any(|a| a == account_id),
        }
    }
}

/// A path pattern: `*` matches any run of characters (slashes included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    pub fn new(p: &str) -> PathPattern {
        PathPattern(p.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, path: &str) -> bool {
        glob_match(self.0.as_bytes(), path.as_bytes())
    }
}

fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point: linear in practice.
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// A quota such as `60/min`: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub count: u32,
    pub period: Duration,
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "sec",
            60 => "min",
            3600 => "hour",
            86400 => "day",
            604800 => "week",
            _ => return write!(f, "{}/{}s", self.count, self.period.as_secs()),
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub per_account: Quota,
    pub burst: u32,
    pub upstream_429_cooldown: Duration,
    pub shadow: bool,
    pub max_queued: usize,
    pub rules: Vec<RuleSettings>,
}

#[derive(Debug, Clone)]
pub struct RuleSettings {
    pub name: String,
    pub path: PathPattern,
    pub action: Option<String>,
    pub per_account: Quota,
    pub burst: u32,
    pub shadow: bool,
    /// `on_limit = "delay"`: requests over the limit wait up to this long for their slot.
    pub pacing: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct StatusCacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_entries: u64,
}

#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_keys: u64,
    /// POSTs that must carry an `Idempotency-Key`: a path pattern and, optionally, the action.
    pub require: Vec<(PathPattern, Option<String>)>,
}

impl IdempotencySettings {
    /// Must a request on `path` with `action` carry a key?
    pub fn required(&self, path: &str, action: Option<&str>) -> bool {
        self.require
            .iter()
            .any(|(p, a)| p.matches(path) && a.as_deref().is_none_or(|a| Some(a) == action))
    }
}

/// Ledger durability, named by what a recorded row survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerSync {
    /// The default: the row is in the OS's hands before the answer goes back (SQLite WAL,
    /// `synchronous = NORMAL`), the WAL is fsynced at least once a second. Survives a crash or
    /// SIGKILL of the gateway; a power loss may take the last second.
    CrashSafe,
    /// The row is fsynced before the answer (group commit): survives power loss.
    PowerSafe,
    /// Queued in memory before the answer: a crash may lose the last rows.
    Async,
}

impl LedgerSync {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerSync::CrashSafe => "crash_safe",
            LedgerSync::PowerSafe => "power_safe",
            LedgerSync::Async => "async",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub path: PathBuf,
    /// Fleet: one ledger in PostgreSQL for every replica (instead of `path`).
    pub postgres_url: Option<Redacted>,
    pub sync: LedgerSync,
    pub reconcile_every: Duration,
    /// PostgreSQL: rows held in memory while the server is unreachable; when full, requests
    /// that cost credits fail closed.
    pub buffer_rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Local,
    Deny,
}

#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub redis_url: Option<Redacted>,
    pub limits_on_failure: OnFailure,
    pub budgets_on_failure: OnFailure,
    /// Each Redis command's deadline; past it the store counts as failed for this request.
    pub timeout: Duration,
    /// How long a replica trusts its local copy of an account's status.
    pub local_status_ttl: Duration,
    /// A checkpoint leader's lease; renewed while its call runs, taken over when it lapses.
    pub checkpoint_lease: Duration,
    /// Prefix of every key and channel (several gateways can share one Redis).
    pub key_prefix: String,
}

/// A connection string that may carry a password: Debug and Display hide it.
#[derive(Clone)]
pub struct Redacted(SecretString);

impl Redacted {
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone)]
pub struct CostSettings {
    pub default: u64,
    /// Keys are paths (`/v2/checkpoint`) or actions (`invite`); a path wins over an action.
    pub by_key: BTreeMap<String, u64>,
}

/// Endpoints the upstream documents as free; `[costs]` entries override them.
pub const FREE_BY_DEFAULT: [&str; 6] = [
    "/v2/credits",
    "/v2/accounts",
    "/v2/accounts/*",
    "/v2/logs",
    "/v2/webhooks",
    "/v2/webhooks/*",
];

impl CostSettings {
    /// The cost to reserve: an exact path key, else a path pattern key (`/v2/accounts/*`),
    /// else the action's key (`invite`), else `default`.
    pub fn expected(&self, path: &str, action: Option<&str>) -> u64 {
        if let Some(c) = self.by_key.get(path) {
            return *c;
        }
        for (k, c) in &self.by_key {
            if k.contains('*') && glob_match(k.as_bytes(), path.as_bytes()) {
                return *c;
            }
        }
        if let Some(c) = action.and_then(|a| self.by_key.get(a)) {
            return *c;
        }
        self.default
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(ps) => ps.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Load a file, apply `LINKUP_GATEWAY__*` overrides from the process environment, validate.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut s = load_str(&text, &env, path.parent())?;
    s.source = Some(path.to_owned());
    Ok(s)
}

/// Parse TOML text with the given environment (overrides and `api_key_env`). Relative paths in
/// the file are resolved against `base_dir`.
pub fn load_str(
    text: &str,
    env: &[(String, String)],
    base_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let raw = parse_raw(text, env)?;
    validate(raw, env, base_dir)
}

/// TOML text plus environment overrides into the raw surface; unknown keys are errors.
fn parse_raw(text: &str, env: &[(String, String)]) -> Result<RawConfig, ConfigError> {
    let mut value: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax(format!("TOML: {e}")))?;
    apply_env_overrides(&mut value, env)?;
    serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner.trim().to_string();
        ConfigError::Invalid(vec![Problem {
            key: if path == "." { "(top)".into() } else { path },
            message: inner,
        }])
    })
}

fn apply_env_overrides(
    root: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    for (name, val) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Invalid(vec![Problem {
                key: name.clone(),
                message: "malformed override name; use LINKUP_GATEWAY__SECTION__KEY".into(),
            }]));
        }
        let mut table = &mut *root;
        for part in &parts[..parts.len() - 1] {
            let entry = table
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => table = t,
                _ => {
                    return Err(ConfigError::Invalid(vec![Problem {
                        key: name.clone(),
                        message: format!("`{part}` is not a table and cannot be overridden by key"),
                    }]))
                }
            }
        }
        let key = parts[parts.len() - 1].clone();
        table.insert(key, env_value(val));
    }
    Ok(())
}

/// An override is read as a TOML value when it is one (`8080`, `true`, `["a"]`), else as a string.
fn env_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: &str) -> Duration {
        match parse_duration(v) {
            Ok(d) => d,
            Err(e) => {
                self.push(key, e);
                Duration::ZERO
            }
        }
    }

    fn quota(&mut self, key: &str, v: &str) -> Quota {
        match parse_quota(v) {
            Ok(q) => q,
            Err(e) => {
                self.push(key, e);
                Quota {
                    count: 1,
                    period: Duration::from_secs(1),
                }
            }
        }
    }

    fn addr(&mut self, key: &str, v: &str) -> SocketAddr {
        match v.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.push(key, format!("`{v}` is not an IP:port address"));
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }
}

fn validate(
    raw: RawConfig,
    env: &[(String, String)],
    base_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let mut p = Problems(Vec::new());
    let resolve = |f: &Path| -> PathBuf {
        match base_dir {
            Some(b) if f.is_relative() && !b.as_os_str().is_empty() => b.join(f),
            _ => f.to_owned(),
        }
    };

    // [server]
    let s = &raw.server;
    let listen = p.addr("server.listen", &s.listen);
    let admin_listen = p.addr("server.admin_listen", &s.admin_listen);
    let request_timeout = p.duration("server.request_timeout", &s.request_timeout);
    let shutdown_grace = p.duration("server.shutdown_grace", &s.shutdown_grace);
    let header_read_timeout = p.duration("server.header_read_timeout", &s.header_read_timeout);
    if request_timeout.is_zero() && parse_duration(&s.request_timeout).is_ok() {
        p.push("server.request_timeout", "must be greater than 0");
    }
    if s.max_body_bytes == 0 {
        p.push("server.max_body_bytes", "must be greater than 0");
    }
    if s.max_in_flight == 0 {
        p.push("server.max_in_flight", "must be greater than 0");
    }
    if s.workers > 1024 {
        p.push("server.workers", "must be at most 1024 (0: one per CPU)");
    }
    if !(16..=65_536).contains(&s.max_id_bytes) {
        p.push("server.max_id_bytes", "must be from 16 to 65536");
    }
    let admin_token = match (&s.admin_token_env, &s.admin_token_file) {
        (Some(_), Some(_)) => {
            p.push(
                "server",
                "set either admin_token_env or admin_token_file, not both",
            );
            None
        }
        (Some(var), None) => match env.iter().find(|(k, _)| k == var) {
            Some((_, v)) if !v.trim().is_empty() => Some(v.trim().to_owned()),
            _ => {
                p.push(
                    "server.admin_token_env",
                    format!("${var} is not set or empty"),
                );
                None
            }
        },
        (None, Some(f)) => match std::fs::read_to_string(resolve(f)) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
            Ok(_) => {
                p.push("server.admin_token_file", "the file is empty");
                None
            }
            Err(e) => {
                p.push(
                    "server.admin_token_file",
                    format!("cannot read {}: {e}", f.display()),
                );
                None
            }
        },
        (None, None) => None,
    };
    if admin_token.is_none()
        && s.admin_token_env.is_none()
        && s.admin_token_file.is_none()
        && !admin_listen.ip().is_loopback()
    {
        p.push(
            "server.admin_listen",
            "not on loopback and no admin token: set admin_token_env or admin_token_file",
        );
    }
    let admin_token_sha256 = admin_token.map(|t| {
        let mut h = [0u8; 32];
        h.copy_from_slice(&sha2::Sha256::digest(t.as_bytes()));
        h
    });
    let tls = s.tls.as_ref().and_then(|t| {
        let cert_file = resolve(&t.cert_file);
        let key_file = resolve(&t.key_file);
        let client_ca_file = t.client_ca_file.as_deref().map(&resolve);
        match crate::inbound_tls::server_config(&cert_file, &key_file, client_ca_file.as_deref()) {
            Ok(server_config) => Some(TlsSettings {
                cert_file,
                key_file,
                client_ca_file,
                server_config,
            }),
            Err(problems) => {
                for (k, m) in problems {
                    p.push(k, m);
                }
                None
            }
        }
    });
    let mtls = s.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());

    // [upstream]
    let upstream = match &raw.upstream {
        None => {
            p.push("upstream", "missing: the upstream url and key are required");
            None
        }
        Some(u) => validate_upstream(u, env, &resolve, &mut p),
    };

    // [[clients]]
    let mut clients = Vec::new();
    let mut seen_names = std::collections::HashSet::new();
    let mut seen_keys = std::collections::HashSet::new();
    let mut seen_subjects = std::collections::HashSet::new();
    for (i, c) in raw.clients.iter().enumerate() {
        let key = |k: &str| format!("clients[{i}].{k}");
        if c.name.trim().is_empty() {
            p.push(key("name"), "must not be empty");
        } else if !seen_names.insert(c.name.clone()) {
            p.push(key("name"), format!("duplicate client name `{}`", c.name));
        }
        let mut keys = Vec::new();
        let listed = c
            .key_sha256
            .iter()
            .map(|h| (key("key_sha256"), h.as_str(), None))
            .chain(c.keys.iter().enumerate().map(|(j, k)| {
                (
                    format!("clients[{i}].keys[{j}]"),
                    k.sha256.as_str(),
                    k.not_after.as_deref(),
                )
            }));
        for (at, hex_sha, not_after) in listed {
            let sha_key = if at.ends_with(']') {
                format!("{at}.sha256")
            } else {
                at.clone()
            };
            let mut sha = [0u8; 32];
            match hex::decode(hex_sha.trim()) {
                Ok(b) if b.len() == 32 => sha.copy_from_slice(&b),
                _ => {
                    p.push(
                        sha_key,
                        "must be 64 hex characters (the SHA-256 that `linkup-gateway keygen` prints)",
                    );
                    continue;
                }
            }
            if !seen_keys.insert(sha) {
                p.push(
                    sha_key,
                    "the same key is already given to this or another client",
                );
            }
            let not_after = match not_after.map(parse_not_after) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    p.push(format!("{at}.not_after"), e);
                    None
                }
            };
            keys.push(ClientKey {
                sha256: sha,
                not_after,
            });
        }
        let cert_subject = c.cert_subject.as_deref().map(str::trim);
        if cert_subject.is_some_and(str::is_empty) {
            p.push(key("cert_subject"), "must not be empty");
        } else if let Some(subject) = cert_subject {
            if !seen_subjects.insert(subject.to_owned()) {
                p.push(
                    key("cert_subject"),
                    format!("`{subject}` is already given to another client"),
                );
            }
            if !mtls {
                p.push(
                    key("cert_subject"),
                    "needs client certificates: set server.tls.client_ca_file",
                );
            }
        }
        if c.key_sha256.is_none() && c.keys.is_empty() && cert_subject.is_none() {
            p.push(
                format!("clients[{i}]"),
                "no way to identify this client: set key_sha256, keys or cert_subject",
            );
        }
        let accounts = if c.accounts.iter().any(|a| a == "*") {
            AccountScope::Any
        } else {
            if c.accounts.is_empty() {
                p.push(
                    key("accounts"),
                    "empty: list account_ids, or [\"*\"] for any",
                );
            }
            AccountScope::Only(c.accounts.clone())
        };
        if c.paths.is_empty() {
            p.push(key("paths"), "empty: list path patterns such as \"/v2/*\"");
        }
        for (j, path) in c.paths.iter().enumerate() {
            if !path.starts_with("/v2/") && path != "/v2" {
                p.push(format!("clients[{i}].paths[{j}]"), "must start with /v2/");
            }
        }
        if let Some(r) = c.requests_per_second {
            if !(r.is_finite() && r > 0.0 && r <= 1e6) {
                p.push(
                    key("requests_per_second"),
                    "must be a number above 0 (at most 1000000)",
                );
            }
        }
        if c.burst == Some(0) {
            p.push(key("burst"), "must be at least 1");
        }
        let client_burst = c.burst.unwrap_or_else(|| {
            let r = c.requests_per_second.unwrap_or(1.0);
            if r.is_finite() && r >= 1.0 {
                r.ceil().min(1e6) as u32
            } else {
                1
            }
        });
        clients.push(Arc::new(ClientSettings {
            name: Arc::from(c.name.as_str()),
            keys,
            cert_subject: cert_subject.map(str::to_owned),
            accounts,
            paths: c.paths.iter().map(|s| PathPattern::new(s)).collect(),
            daily_credit_budget: c.daily_credit_budget,
            requests_per_second: c.requests_per_second,
            burst: client_burst.max(1),
            shadow: c.shadow,
        }));
    }
    if clients.is_empty() && !listen.ip().is_loopback() {
        p.push(
            "clients",
            "no client is defined and server.listen is not on loopback: that would be an open proxy",
        );
    }

    // [rate_limit]
    let rl = &raw.rate_limit;
    let per_account = p.quota("rate_limit.per_account", &rl.per_account);
    let cooldown = p.duration(
        "rate_limit.upstream_429_cooldown",
        &rl.upstream_429_cooldown,
    );
    if rl.burst == 0 {
        p.push("rate_limit.burst", "must be at least 1");
    }
    let mut rules = Vec::new();
    for (i, r) in rl.rules.iter().enumerate() {
        let q = p.quota(
            &format!("rate_limit.rules[{i}].per_account"),
            &r.per_account,
        );
        if !r.path.starts_with("/v2/") {
            p.push(
                format!("rate_limit.rules[{i}].path"),
                "must start with /v2/",
            );
        }
        if r.burst == Some(0) {
            p.push(format!("rate_limit.rules[{i}].burst"), "must be at least 1");
        }
        let name = r.name.clone().unwrap_or_else(|| match &r.action {
            Some(a) => format!("{} {}", r.path, a),
            None => r.path.clone(),
        });
        let pacing = match r.on_limit.as_deref() {
            None | Some("refuse") => {
                if r.max_delay.is_some() {
                    p.push(
                        format!("rate_limit.rules[{i}].max_delay"),
                        "only applies with on_limit = \"delay\"",
                    );
                }
                None
            }
            Some("delay") => {
                let d = p.duration(
                    &format!("rate_limit.rules[{i}].max_delay"),
                    r.max_delay.as_deref().unwrap_or("30s"),
                );
                if d.is_zero() {
                    p.push(
                        format!("rate_limit.rules[{i}].max_delay"),
                        "must be more than 0 (or use on_limit = \"refuse\")",
                    );
                } else if d >= request_timeout && !request_timeout.is_zero() {
                    p.push(
                        format!("rate_limit.rules[{i}].max_delay"),
                        format!(
                            "must be shorter than server.request_timeout ({} s): the wait counts toward it",
                            request_timeout.as_secs_f64()
                        ),
                    );
                }
                Some(d)
            }
            Some(other) => {
                p.push(
                    format!("rate_limit.rules[{i}].on_limit"),
                    format!("must be \"refuse\" or \"delay\", not {other:?}"),
                );
                None
            }
        };
        rules.push(RuleSettings {
            name,
            path: PathPattern::new(&r.path),
            action: r.action.clone(),
            per_account: q,
            burst: r.burst.unwrap_or(rl.burst.max(1)),
            shadow: r.shadow,
            pacing,
        });
    }

    // [status_cache]
    let ttl = p.duration("status_cache.ttl", &raw.status_cache.ttl);
    if raw.status_cache.max_entries == 0 {
        p.push("status_cache.max_entries", "must be at least 1");
    }

    // [idempotency]
    let idem_ttl = p.duration("idempotency.ttl", &raw.idempotency.ttl);
    if raw.idempotency.max_keys == 0 {
        p.push("idempotency.max_keys", "must be at least 1");
    }
    for (i, r) in raw.idempotency.require.iter().enumerate() {
        if !r.path.starts_with("/v2/") {
            p.push(
                format!("idempotency.require[{i}].path"),
                "must start with /v2/",
            );
        }
    }
    let idempotency = IdempotencySettings {
        enabled: raw.idempotency.enabled,
        ttl: idem_ttl,
        max_keys: raw.idempotency.max_keys,
        require: raw
            .idempotency
            .require
            .iter()
            .map(|r| (PathPattern::new(&r.path), r.action.clone()))
            .collect(),
    };

    // [ledger]
    let ledger = validate_ledger(&raw.ledger, &resolve, &mut p);
    // [fleet]
    let fleet = raw.fleet.map(|f| {
        let on = |key: &str, v: &str, p: &mut Problems| match v {
            "local" => OnFailure::Local,
            "deny" => OnFailure::Deny,
            other => {
                p.push(key, format!("`{other}`: expected \"local\" or \"deny\""));
                OnFailure::Deny
            }
        };
        let (limits, budgets) = match &f.on_store_failure {
            Some(o) => (
                on("fleet.on_store_failure.limits", &o.limits, &mut p),
                on("fleet.on_store_failure.budgets", &o.budgets, &mut p),
            ),
            None => (OnFailure::Local, OnFailure::Deny),
        };
        let timeout = p.duration("fleet.timeout", &f.timeout);
        let local_status_ttl = p.duration("fleet.local_status_ttl", &f.local_status_ttl);
        let checkpoint_lease = p.duration("fleet.checkpoint_lease", &f.checkpoint_lease);
        if timeout.is_zero() {
            p.push("fleet.timeout", "must be more than 0");
        }
        if checkpoint_lease < Duration::from_secs(1) {
            p.push("fleet.checkpoint_lease", "must be at least 1s");
        }
        match &f.redis_url {
            None => p.push(
                "fleet.redis_url",
                "[fleet] needs redis_url (remove [fleet] to run embedded)",
            ),
            Some(u) if !(u.starts_with("redis://") || u.starts_with("rediss://")) => {
                p.push("fleet.redis_url", "expected a redis:// or rediss:// URL")
            }
            Some(_) => {}
        }
        FleetSettings {
            redis_url: f.redis_url.map(|u| Redacted(SecretString::from(u))),
            limits_on_failure: limits,
            budgets_on_failure: budgets,
            timeout,
            local_status_ttl,
            checkpoint_lease,
            key_prefix: f.key_prefix,
        }
    });

    // [costs]
    let mut by_key: BTreeMap<String, u64> =
        FREE_BY_DEFAULT.iter().map(|k| (k.to_string(), 0)).collect();
    by_key.extend(raw.costs);
    let default = by_key.remove("default").unwrap_or(1);

    match upstream {
        Some(upstream) if p.0.is_empty() => Ok(Settings {
            source: None,
            server: ServerSettings {
                listen,
                admin_listen,
                max_body_bytes: usize::try_from(s.max_body_bytes).unwrap_or(usize::MAX),
                request_timeout,
                shutdown_grace,
                max_in_flight: usize::try_from(s.max_in_flight).unwrap_or(usize::MAX),
                header_read_timeout,
                max_id_bytes: usize::try_from(s.max_id_bytes).unwrap_or(usize::MAX),
                workers: match s.workers {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => usize::try_from(n).unwrap_or(1),
                },
                admin_token_sha256,
                tls,
            },
            upstream,
            clients,
            rate_limit: RateLimitSettings {
                per_account,
                burst: rl.burst.max(1),
                upstream_429_cooldown: cooldown,
                shadow: rl.shadow,
                max_queued: rl.max_queued,
                rules,
            },
            checkpoint_coalesce: raw.checkpoint.coalesce,
            status_cache: StatusCacheSettings {
                enabled: raw.status_cache.enabled,
                ttl,
                max_entries: raw.status_cache.max_entries,
            },
            idempotency,
            ledger,
            fleet,
            metrics_per_account: raw.metrics.per_account,
            costs: CostSettings { default, by_key },
        }),
        _ => Err(ConfigError::Invalid(p.0)),
    }
}

fn validate_ledger(
    l: &RawLedger,
    resolve: &dyn Fn(&Path) -> PathBuf,
    p: &mut Problems,
) -> LedgerSettings {
    let sync = match l.sync.as_str() {
        "crash_safe" => LedgerSync::CrashSafe,
        "power_safe" => LedgerSync::PowerSafe,
        "async" => LedgerSync::Async,
        "before_response" => {
            // The old name of the fsync-before-the-answer setting: kept working, with a nudge.
            tracing::warn!(
                "ledger.sync = \"before_response\" is deprecated: it is now called \"power_safe\" (fsync before the answer); the default \"crash_safe\" survives a crash or SIGKILL of the gateway at a fraction of the cost"
            );
            LedgerSync::PowerSafe
        }
        other => {
            p.push(
                "ledger.sync",
                format!(
                    "`{other}`: expected \"crash_safe\" (default), \"power_safe\" or \"async\""
                ),
            );
            LedgerSync::CrashSafe
        }
    };
    let reconcile_every = p.duration("ledger.reconcile_every", &l.reconcile_every);
    if l.path.is_some() && l.postgres_url.is_some() {
        p.push("ledger", "set either path or postgres_url, not both");
    } else if let Some(u) = &l.postgres_url {
        if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
            p.push(
                "ledger.postgres_url",
                "expected a postgres:// or postgresql:// URL",
            );
        }
    }
    if l.buffer_rows == 0 {
        p.push("ledger.buffer_rows", "must be at least 1");
    }
    LedgerSettings {
        path: resolve(
            l.path
                .as_deref()
                .unwrap_or(Path::new("data/ledger.sqlite3")),
        ),
        postgres_url: l
            .postgres_url
            .clone()
            .map(|u| Redacted(SecretString::from(u))),
        sync,
        reconcile_every,
        buffer_rows: usize::try_from(l.buffer_rows).unwrap_or(usize::MAX),
    }
}

/// Only the `[ledger]` section of a config file, validated: for `usage`, which reads the
/// ledger and needs neither the upstream key nor the rest.
pub fn load_ledger(path: &Path) -> Result<LedgerSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let raw = parse_raw(&text, &env)?;
    let base = path.parent();
    let resolve = |f: &Path| -> PathBuf {
        match base {
            Some(b) if f.is_relative() && !b.as_os_str().is_empty() => b.join(f),
            _ => f.to_owned(),
        }
    };
    let mut p = Problems(Vec::new());
    let ledger = validate_ledger(&raw.ledger, &resolve, &mut p);
    if p.0.is_empty() {
        Ok(ledger)
    } else {
        Err(ConfigError::Invalid(p.0))
    }
}

fn validate_upstream(
    u: &RawUpstream,
    env: &[(String, String)],
    resolve: &dyn Fn(&Path) -> PathBuf,
    p: &mut Problems,
) -> Option<UpstreamSettings> {
    let connect_timeout = p.duration("upstream.connect_timeout", &u.connect_timeout);
    if u.max_buffered_bytes < MIN_BUFFERED_BYTES {
        p.push(
            "upstream.max_buffered_bytes",
            format!("must be at least {MIN_BUFFERED_BYTES} (64 KB)"),
        );
    }
    let protocol = match u.protocol.as_str() {
        "auto" => UpstreamProtocol::Auto,
        "http2" => UpstreamProtocol::Http2,
        "http1" => UpstreamProtocol::Http1,
        other => {
            p.push(
                "upstream.protocol",
                format!("`{other}` is not one of \"auto\", \"http2\", \"http1\""),
            );
            UpstreamProtocol::Auto
        }
    };
    if u.http2_max_streams == 0 {
        p.push("upstream.http2_max_streams", "must be at least 1");
    }
    let uri: Option<Uri> = match u.url.parse::<Uri>() {
        Ok(uri) => Some(uri),
        Err(_) => {
            p.push("upstream.url", format!("`{}` is not a URL", u.url));
            None
        }
    };
    let mut target = None;
    if let Some(uri) = uri {
        let scheme = uri.scheme().cloned();
        let authority = uri.authority().cloned();
        match (scheme, authority) {
            (Some(s), Some(a)) if s == Scheme::HTTP || s == Scheme::HTTPS => {
                if a.as_str().contains('@') {
                    p.push(
                        "upstream.url",
                        "must not carry credentials; use api_key_file",
                    );
                } else if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                    p.push(
                        "upstream.url",
                        "must be a bare origin such as https://api.linkupapi.com (the /v2 path comes from the caller)",
                    );
                } else {
                    target = Some((s, a));
                }
            }
            _ => p.push(
                "upstream.url",
                "must be an http:// or https:// URL with a host",
            ),
        }
    }

    let key = match (&u.api_key_file, &u.api_key_env) {
        (Some(_), Some(_)) => {
            p.push(
                "upstream",
                "set either api_key_file or api_key_env, not both",
            );
            None
        }
        (None, None) => {
            p.push(
                "upstream.api_key_file",
                "missing: set api_key_file or api_key_env",
            );
            None
        }
        (Some(f), None) => {
            let f = resolve(f);
            match std::fs::read_to_string(&f) {
                Ok(text) => match ApiKey::new(&text) {
                    Ok(k) => Some((k, format!("file {}", f.display()))),
                    Err(e) => {
                        p.push("upstream.api_key_file", format!("{e} (in {})", f.display()));
                        None
                    }
                },
                Err(e) => {
                    p.push(
                        "upstream.api_key_file",
                        format!("cannot read {}: {e}", f.display()),
                    );
                    None
                }
            }
        }
        (None, Some(var)) => match env.iter().find(|(k, _)| k == var) {
            Some((_, v)) => match ApiKey::new(v) {
                Ok(k) => Some((k, format!("env {var}"))),
                Err(e) => {
                    p.push("upstream.api_key_env", format!("{e} (in ${var})"));
                    None
                }
            },
            None => {
                p.push("upstream.api_key_env", format!("${var} is not set"));
                None
            }
        },
    };

    let (Some((scheme, authority)), Some((api_key, api_key_source))) = (target, key) else {
        return None;
    };
    let host = HeaderValue::from_str(authority.as_str()).ok()?;
    Some(UpstreamSettings {
        url: format!("{scheme}://{authority}"),
        scheme,
        authority,
        host,
        api_key,
        api_key_source,
        connect_timeout,
        ca_file: u.ca_file.as_deref().map(resolve),
        max_buffered_bytes: usize::try_from(u.max_buffered_bytes).unwrap_or(usize::MAX),
        protocol,
        http2_max_streams: u.http2_max_streams as usize,
    })
}

// ---------------------------------------------------------------------------------------------
// Small parsers
// ---------------------------------------------------------------------------------------------

/// `"250ms"`, `"30s"`, `"10m"`, `"2h"`, `"1d"`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a duration (examples: \"250ms\", \"30s\", \"10m\")"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
                "`{v}` is not a duration (units: ms, s, m, h, d; examples: \"250ms\", \"30s\")"
            ))
        }
    };
    Ok(d)
}

/// `"30/min"`, `"500/day"`, `"100/week"`, `"5/sec"`, `"1000/hour"`.
pub fn parse_quota(v: &str) -> Result<Quota, String> {
    let err = || format!("`{v}` is not a quota (examples: \"30/min\", \"500/day\", \"100/week\")");
    let (n, unit) = v.trim().split_once('/').ok_or_else(err)?;
    let count: u32 = n.trim().parse().map_err(|_| err())?;
    if count == 0 {
        return Err(format!("`{v}`: the count must be at least 1"));
    }
    let secs = match unit.trim() {
        "s" | "sec" | "second" => 1,
        "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86400,
        "w" | "week" => 604800,
        _ => return Err(err()),
    };
    Ok(Quota {
        count,
        period: Duration::from_secs(secs),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![("LINKUP_API_KEY".into(), "secret-upstream-key".into())]
    }

    const MINIMAL: &str = r#"
        [upstream]
        url = "http://127.0.0.1:1"
        api_key_env = "LINKUP_API_KEY"
    "#;

    #[test]
    fn minimal_config_takes_defaults() {
        let s = load_str(MINIMAL, &env(), None).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.server.max_body_bytes, 1 << 20);
        assert_eq!(s.server.request_timeout, Duration::from_secs(60));
        assert_eq!(s.rate_limit.per_account, parse_quota("60/min").unwrap());
        assert_eq!(s.upstream.api_key.expose(), "secret-upstream-key");
        assert_eq!(s.upstream.max_buffered_bytes, 256 << 20);
        assert_eq!(s.costs.default, 1);
    }

    #[test]
    fn max_buffered_bytes_is_read_and_bounded_below() {
        let text = format!("{MINIMAL}\nmax_buffered_bytes = 1048576\n");
        let s = load_str(&text, &env(), None).unwrap();
        assert_eq!(s.upstream.max_buffered_bytes, 1 << 20);
        let text = format!("{MINIMAL}\nmax_buffered_bytes = 1000\n");
        let msg = load_str(&text, &env(), None).unwrap_err().to_string();
        assert!(msg.contains("upstream.max_buffered_bytes"), "{msg}");
    }

    #[test]
    fn the_upstream_protocol_is_one_of_three_and_streams_at_least_one() {
        let s = load_str(MINIMAL, &env(), None).unwrap();
        assert_eq!(
            (s.upstream.protocol, s.upstream.http2_max_streams),
            (UpstreamProtocol::Auto, 100)
        );
        let text = format!("{MINIMAL}\nprotocol = \"http2\"\nhttp2_max_streams = 8\n");
        let s = load_str(&text, &env(), None).unwrap();
        assert_eq!(
            (s.upstream.protocol, s.upstream.http2_max_streams),
            (UpstreamProtocol::Http2, 8)
        );
        let text = format!("{MINIMAL}\nprotocol = \"h3\"\nhttp2_max_streams = 0\n");
        let msg = load_str(&text, &env(), None).unwrap_err().to_string();
        assert!(msg.contains("upstream.protocol"), "{msg}");
        assert!(msg.contains("upstream.http2_max_streams"), "{msg}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_its_path() {
        let text = format!("{MINIMAL}\n[rate_limit]\nper_acount = \"5/min\"\n");
        let e = load_str(&text, &env(), None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("rate_limit"), "{msg}");
        assert!(msg.contains("per_acount"), "{msg}");
    }

    #[test]
    fn workers_and_the_identifier_bound_are_checked() {
        let text = format!("{MINIMAL}\n[server]\nworkers = 2\nmax_id_bytes = 64\n");
        let s = load_str(&text, &env(), None).unwrap();
        assert_eq!((s.server.workers, s.server.max_id_bytes), (2, 64));
        let s = load_str(MINIMAL, &env(), None).unwrap();
        assert!(s.server.workers >= 1);
        assert_eq!(s.server.max_id_bytes, 256);
        let text = format!("{MINIMAL}\n[server]\nworkers = 5000\nmax_id_bytes = 8\n");
        let ps = load_str(&text, &env(), None).unwrap_err().problems();
        assert!(
            ps.iter().any(|p| p.starts_with("server.workers:")),
            "{ps:?}"
        );
        assert!(
            ps.iter().any(|p| p.starts_with("server.max_id_bytes:")),
            "{ps:?}"
        );
    }

    #[test]
    fn bad_values_name_their_key_paths_all_at_once() {
        let text = format!(
            "{MINIMAL}\n[server]\nrequest_timeout = \"soon\"\n[rate_limit]\nper_account = \"lots\"\n[[rate_limit.rules]]\npath = \"/v2/network\"\nper_account = \"5/fortnight\"\n"
        );
        let e = load_str(&text, &env(), None).unwrap_err();
        let ps = e.problems();
        assert!(
            ps.iter().any(|p| p.starts_with("server.request_timeout:")),
            "{ps:?}"
        );
        assert!(
            ps.iter().any(|p| p.starts_with("rate_limit.per_account:")),
            "{ps:?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.starts_with("rate_limit.rules[0].per_account:")),
            "{ps:?}"
        );
    }

    #[test]
    fn missing_or_empty_key_is_refused() {
        let e = load_str(MINIMAL, &[], None).unwrap_err();
        assert!(e.to_string().contains("upstream.api_key_env"), "{e}");
        let e = load_str(MINIMAL, &[("LINKUP_API_KEY".into(), "  ".into())], None).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn no_clients_on_a_public_listener_is_refused() {
        let text = format!("{MINIMAL}\n[server]\nlisten = \"0.0.0.0:8080\"\n");
        let e = load_str(&text, &env(), None).unwrap_err();
        assert!(e.to_string().starts_with("clients:"), "{e}");
    }

    #[test]
    fn env_overrides_apply_with_types() {
        let mut env = env();
        env.push(("LINKUP_GATEWAY__SERVER__MAX_IN_FLIGHT".into(), "7".into()));
        env.push((
            "LINKUP_GATEWAY__SERVER__LISTEN".into(),
            "127.0.0.1:1234".into(),
        ));
        env.push((
            "LINKUP_GATEWAY__CHECKPOINT__COALESCE".into(),
            "false".into(),
        ));
        let s = load_str(MINIMAL, &env, None).unwrap();
        assert_eq!(s.server.max_in_flight, 7);
        assert_eq!(s.server.listen.port(), 1234);
        assert!(!s.checkpoint_coalesce);
    }

    #[test]
    fn env_override_of_unknown_key_is_an_error() {
        let mut env = env();
        env.push(("LINKUP_GATEWAY__SERVER__LISTN".into(), "x".into()));
        let e = load_str(MINIMAL, &env, None).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
    }

    #[test]
    fn upstream_key_never_prints() {
        let s = load_str(MINIMAL, &env(), None).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("secret-upstream-key"));
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn durations_and_quotas_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        let q = parse_quota("100/week").unwrap();
        assert_eq!((q.count, q.period.as_secs()), (100, 604800));
        assert_eq!(q.to_string(), "100/week");
        assert!(parse_quota("0/min").is_err());
        assert!(parse_quota("5/fortnight").is_err());
    }

    #[test]
    fn path_patterns_glob() {
        assert!(PathPattern::new("/v2/*").matches("/v2/checkpoint"));
        assert!(PathPattern::new("/v2/accounts/*").matches("/v2/accounts/abc"));
        assert!(!PathPattern::new("/v2/accounts/*").matches("/v2/accounts"));
        assert!(PathPattern::new("/v2/checkpoint").matches("/v2/checkpoint"));
        assert!(!PathPattern::new("/v2/checkpoint").matches("/v2/checkpoints"));
        assert!(PathPattern::new("/v2/*/stop").matches("/v2/webhooks/w1/stop"));
    }

    fn client_with(lines: &str) -> String {
        format!("{MINIMAL}\n[[clients]]\nname = \"crm\"\n{lines}\n")
    }

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_client_may_hold_several_keys_with_not_after() {
        let text = client_with(&format!(
            "key_sha256 = \"{SHA_A}\"\nkeys = [{{ sha256 = \"{SHA_B}\", not_after = \"2026-12-31\" }}, {{ sha256 = \"{}\", not_after = \"2027-01-15T10:00:00+02:00\" }}]",
            "c".repeat(64)
        ));
        let s = load_str(&text, &env(), None).unwrap();
        let keys = &s.clients[0].keys;
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].not_after, None);
        // A date: the key works through that whole UTC day.
        let eod = keys[1].not_after.unwrap();
        assert!(!keys[1].expired_at(parse_not_after("2026-12-31T23:59:59Z").unwrap()));
        assert!(keys[1].expired_at(parse_not_after("2027-01-01T00:00:00Z").unwrap()));
        assert_eq!(eod.offset(), time::UtcOffset::UTC);
        // Offsets are normalised to UTC.
        assert_eq!(keys[2].not_after.unwrap().hour(), 8);
    }

    #[test]
    fn bad_keys_name_their_paths() {
        let text = client_with(&format!(
            "keys = [{{ sha256 = \"{SHA_A}\", not_after = \"next tuesday\" }}, {{ sha256 = \"xyz\" }}, {{ sha256 = \"{SHA_A}\" }}]"
        ));
        let ps = load_str(&text, &env(), None).unwrap_err().problems();
        assert!(
            ps.iter()
                .any(|p| p.starts_with("clients[0].keys[0].not_after:")),
            "{ps:?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.starts_with("clients[0].keys[1].sha256:")),
            "{ps:?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.starts_with("clients[0].keys[2].sha256:") && p.contains("already")),
            "{ps:?}"
        );
        let text = client_with(&format!(
            "keys = [{{ sha256 = \"{SHA_A}\", expires = \"x\" }}]"
        ));
        let e = load_str(&text, &env(), None).unwrap_err();
        assert!(e.to_string().contains("expires"), "{e}");
        let e = load_str(&client_with(""), &env(), None).unwrap_err();
        assert!(
            e.to_string().starts_with("clients[0]: no way to identify"),
            "{e}"
        );
    }

    #[test]
    fn cert_subject_needs_client_certificates() {
        let text = client_with("cert_subject = \"billing.internal\"");
        let e = load_str(&text, &env(), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("clients[0].cert_subject: needs client certificates"),
            "{e}"
        );
    }

    struct Pems {
        dir: tempfile::TempDir,
    }

    /// A CA, a leaf it signs, and a second unrelated key, as PEM files.
    fn pems() -> Pems {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let w = |n: &str, t: String| std::fs::write(dir.path().join(n), t).unwrap();
        w("ca.pem", ca_cert.pem());
        w("cert.pem", leaf.pem());
        w("key.pem", leaf_key.serialize_pem());
        w("other.key", KeyPair::generate().unwrap().serialize_pem());
        w("junk.pem", "not a pem".into());
        Pems { dir }
    }

    fn tls_config(p: &Pems, tls: &str) -> Result<Settings, ConfigError> {
        let text = format!("{MINIMAL}\n[server]\ntls = {{ {tls} }}\n");
        load_str(&text, &env(), Some(p.dir.path()))
    }

    #[test]
    fn inbound_tls_loads_certificate_key_and_client_ca() {
        let p = pems();
        let s = tls_config(
            &p,
            "cert_file = \"cert.pem\", key_file = \"key.pem\", client_ca_file = \"ca.pem\"",
        )
        .unwrap();
        let tls = s.server.tls.unwrap();
        assert_eq!(tls.cert_file, p.dir.path().join("cert.pem"));
        assert_eq!(
            tls.server_config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let text = format!(
            "{MINIMAL}\n[server]\ntls = {{ cert_file = \"cert.pem\", key_file = \"key.pem\", client_ca_file = \"ca.pem\" }}\n[[clients]]\nname = \"billing\"\ncert_subject = \"billing.internal\"\n"
        );
        let s = load_str(&text, &env(), Some(p.dir.path())).unwrap();
        assert_eq!(
            s.clients[0].cert_subject.as_deref(),
            Some("billing.internal")
        );
        assert!(s.clients[0].keys.is_empty());
    }

    #[test]
    fn inbound_tls_problems_name_their_key_paths() {
        let p = pems();
        let ps = tls_config(
            &p,
            "cert_file = \"missing.pem\", key_file = \"junk.pem\", client_ca_file = \"junk.pem\"",
        )
        .unwrap_err()
        .problems();
        assert!(
            ps.iter()
                .any(|p| p.starts_with("server.tls.cert_file: cannot read")),
            "{ps:?}"
        );
        assert!(
            ps.iter().any(|p| p.starts_with("server.tls.key_file:")),
            "{ps:?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.starts_with("server.tls.client_ca_file:")),
            "{ps:?}"
        );
        let e = tls_config(&p, "cert_file = \"cert.pem\", key_file = \"other.key\"").unwrap_err();
        assert!(
            e.to_string().starts_with("server.tls.key_file:")
                && e.to_string().contains("does not go with"),
            "{e}"
        );
    }

    #[test]
    fn costs_prefer_path_then_action_then_default() {
        let text = format!("{MINIMAL}\n[costs]\ndefault = 2\n\"/v2/checkpoint\" = 1\ninvite = 3\n");
        let s = load_str(&text, &env(), None).unwrap();
        assert_eq!(s.costs.expected("/v2/checkpoint", None), 1);
        assert_eq!(s.costs.expected("/v2/network", Some("invite")), 3);
        assert_eq!(s.costs.expected("/v2/profiles", Some("get")), 2);
        // Documented-free endpoints cost nothing unless configured.
        assert_eq!(s.costs.expected("/v2/credits", None), 0);
        assert_eq!(s.costs.expected("/v2/accounts/acc_1", None), 0);
        assert_eq!(s.costs.expected("/v2/webhooks/w1/stop", None), 0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod shipped_files {
    use super::*;

    /// Every file in config/ must load, so the examples can't rot.
    #[test]
    fn every_file_in_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let env = vec![
            ("LINKUP_API_KEY".to_string(), "k".to_string()),
            (
                crate::demo::DEMO_UPSTREAM_KEY_ENV.to_string(),
                "k".to_string(),
            ),
        ];
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                load_str(&text, &env, Some(&dir))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "expected gateway.toml and demo.toml");
    }

    #[test]
    fn demo_toml_holds_the_hash_of_the_demo_key() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let text = std::fs::read_to_string(dir.join("demo.toml")).unwrap();
        let env = vec![(
            crate::demo::DEMO_UPSTREAM_KEY_ENV.to_string(),
            "k".to_string(),
        )];
        let s = load_str(&text, &env, Some(&dir)).unwrap();
        assert_eq!(
            s.clients[0].keys[0].sha256,
            crate::util::sha256(crate::demo::DEMO_KEY.as_bytes())
        );
    }
}
