//! The typed settings the running gateway uses: what [`super::validate`] builds from the raw
//! surface. Strings are `Duration`s, quotas, `Uri`s and header values here; secrets have types
//! whose `Debug` prints `[redacted]`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};

use super::serialize as ser;

pub use super::path_pattern::PathPattern;

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
        f.write_str(ser::REDACTED)
    }
}

/// `/config` shows that the key is there, never what it is.
impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(ser::REDACTED)
    }
}

/// The running gateway's settings. `Serialize` is what the admin listener's `/config` shows:
/// secrets redacted by their types or by `serialize_with`, never by a hand-written mirror.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    #[serde(serialize_with = "ser::opt_path")]
    pub source: Option<PathBuf>,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub clients: Vec<Arc<ClientSettings>>,
    pub rate_limit: RateLimitSettings,
    #[serde(rename = "checkpoint", serialize_with = "ser::checkpoint")]
    pub checkpoint_coalesce: bool,
    pub status_cache: StatusCacheSettings,
    pub idempotency: IdempotencySettings,
    pub ledger: LedgerSettings,
    pub fleet: Option<FleetSettings>,
    #[serde(rename = "metrics", serialize_with = "ser::metrics")]
    pub metrics_per_account: bool,
    pub costs: CostSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    #[serde(serialize_with = "ser::millis")]
    pub request_timeout: Duration,
    #[serde(serialize_with = "ser::millis")]
    pub shutdown_grace: Duration,
    pub max_in_flight: usize,
    #[serde(serialize_with = "ser::millis")]
    pub header_read_timeout: Duration,
    /// Data-plane workers (resolved: at least 1).
    pub workers: usize,
    /// The longest `account_id`, `action` or path segment accepted.
    pub max_id_bytes: usize,
    /// SHA-256 of the admin token; `None`: the admin listener is open (loopback only).
    #[serde(rename = "admin_token", serialize_with = "ser::redacted_if_some")]
    pub admin_token_sha256: Option<[u8; 32]>,
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsSettings {
    #[serde(serialize_with = "ser::path")]
    pub cert_file: PathBuf,
    #[serde(serialize_with = "ser::path")]
    pub key_file: PathBuf,
    #[serde(serialize_with = "ser::opt_path")]
    pub client_ca_file: Option<PathBuf>,
    /// Built from the files when the config was loaded (and again on every reload).
    #[serde(skip)]
    pub server_config: Arc<rustls::ServerConfig>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamSettings {
    #[serde(skip)]
    pub scheme: Scheme,
    #[serde(skip)]
    pub authority: Authority,
    /// Host header value for the upstream.
    #[serde(skip)]
    pub host: HeaderValue,
    /// The url as configured (no secrets in it: userinfo is refused).
    pub url: String,
    pub api_key: ApiKey,
    pub api_key_source: String,
    #[serde(serialize_with = "ser::millis")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser::opt_path")]
    pub ca_file: Option<PathBuf>,
    /// The process-wide budget of bytes held by upstream answers being buffered (and until
    /// they have been written to their callers); past it an answer is refused with a 503.
    pub max_buffered_bytes: usize,
    pub protocol: UpstreamProtocol,
    /// Calls one HTTP/2 connection carries at once (at most what the upstream announces).
    pub http2_max_streams: usize,
}

/// How the gateway speaks to the upstream (`upstream.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
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

#[derive(Debug, Clone, Serialize)]
pub struct ClientSettings {
    pub name: Arc<str>,
    /// Its virtual keys (by SHA-256); several while a rotation overlaps. May be empty when the
    /// client is identified by `cert_subject` only.
    #[serde(flatten, serialize_with = "ser::client_keys")]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientKey {
    #[serde(serialize_with = "ser::redacted")]
    pub sha256: [u8; 32],
    /// The last moment the key is accepted; `None`: no expiry.
    #[serde(serialize_with = "ser::rfc3339")]
    pub not_after: Option<time::OffsetDateTime>,
}

impl ClientKey {
    pub fn expired_at(&self, now: time::OffsetDateTime) -> bool {
        self.not_after.is_some_and(|t| now > t)
    }
}

#[derive(Debug, Clone)]
pub enum AccountScope {
    Any,
    Only(Vec<String>),
}

/// As the file spells it: `["*"]` for any account, else the list.
impl Serialize for AccountScope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccountScope::Any => ["*"].serialize(s),
            AccountScope::Only(list) => list.serialize(s),
        }
    }
}

impl AccountScope {
    pub fn allows(&self, account_id: &str) -> bool {
        match self {
            AccountScope::Any => true,
            AccountScope::Only(list) => list.iter().any(|a| a == account_id),
        }
    }
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

/// As the file spells it: `"60/min"`.
impl Serialize for Quota {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RateLimitSettings {
    pub per_account: Quota,
    pub burst: u32,
    #[serde(serialize_with = "ser::millis")]
    pub upstream_429_cooldown: Duration,
    pub shadow: bool,
    pub max_queued: usize,
    pub rules: Vec<RuleSettings>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleSettings {
    pub name: String,
    pub path: PathPattern,
    pub action: Option<String>,
    pub per_account: Quota,
    pub burst: u32,
    pub shadow: bool,
    /// `on_limit = "delay"`: requests over the limit wait up to this long for their slot.
    #[serde(flatten, serialize_with = "ser::pacing")]
    pub pacing: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusCacheSettings {
    pub enabled: bool,
    #[serde(serialize_with = "ser::millis")]
    pub ttl: Duration,
    pub max_entries: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdempotencySettings {
    pub enabled: bool,
    #[serde(serialize_with = "ser::millis")]
    pub ttl: Duration,
    pub max_keys: u64,
    /// POSTs that must carry an `Idempotency-Key`.
    pub require: Vec<IdempotencyRequirement>,
}

/// One `idempotency.require` entry: a path pattern and, optionally, the action.
#[derive(Debug, Clone, Serialize)]
pub struct IdempotencyRequirement {
    pub path: PathPattern,
    pub action: Option<String>,
}

impl IdempotencySettings {
    /// Must a request on `path` with `action` carry a key?
    pub fn required(&self, path: &str, action: Option<&str>) -> bool {
        self.require
            .iter()
            .any(|r| r.path.matches(path) && r.action.as_deref().is_none_or(|a| Some(a) == action))
    }
}

/// Ledger durability, named by what a recorded row survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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

#[derive(Debug, Clone, Serialize)]
pub struct LedgerSettings {
    #[serde(serialize_with = "ser::path")]
    pub path: PathBuf,
    /// Fleet: one ledger in PostgreSQL for every replica (instead of `path`).
    pub postgres_url: Option<Redacted>,
    pub sync: LedgerSync,
    #[serde(serialize_with = "ser::millis")]
    pub reconcile_every: Duration,
    /// PostgreSQL: rows held in memory while the server is unreachable; when full, requests
    /// that cost credits fail closed.
    pub buffer_rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Local,
    Deny,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetSettings {
    pub redis_url: Option<Redacted>,
    pub on_store_failure: StoreFailureSettings,
    /// Each Redis command's deadline; past it the store counts as failed for this request.
    #[serde(serialize_with = "ser::millis")]
    pub timeout: Duration,
    /// How long a replica trusts its local copy of an account's status.
    #[serde(serialize_with = "ser::millis")]
    pub local_status_ttl: Duration,
    /// A checkpoint leader's lease; renewed while its call runs, taken over when it lapses.
    #[serde(serialize_with = "ser::millis")]
    pub checkpoint_lease: Duration,
    /// Prefix of every key and channel (several gateways can share one Redis).
    pub key_prefix: String,
}

/// `fleet.on_store_failure`: what limits and budgets do while the shared store is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoreFailureSettings {
    pub limits: OnFailure,
    pub budgets: OnFailure,
}

/// A connection string that may carry a password: Debug and Serialize hide it.
#[derive(Clone)]
pub struct Redacted(SecretString);

impl Redacted {
    pub fn new(secret: String) -> Redacted {
        Redacted(SecretString::from(secret))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ser::REDACTED)
    }
}

impl Serialize for Redacted {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(ser::REDACTED)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CostSettings {
    pub default: u64,
    /// Keys are paths (`/v2/checkpoint`) or actions (`invite`); a path wins over an action.
    pub by_key: BTreeMap<String, u64>,
    /// The keys of `by_key` that hold a `*`, compiled, in the map's order.
    #[serde(skip)]
    pub patterns: Vec<(PathPattern, u64)>,
}

impl CostSettings {
    /// The cost to reserve: an exact path key, else a path pattern key (`/v2/accounts/*`),
    /// else the action's key (`invite`), else `default`.
    pub fn expected(&self, path: &str, action: Option<&str>) -> u64 {
        if let Some(c) = self.by_key.get(path) {
            return *c;
        }
        for (p, c) in &self.patterns {
            if p.matches(path) {
                return *c;
            }
        }
        if let Some(c) = action.and_then(|a| self.by_key.get(a)) {
            return *c;
        }
        self.default
    }
}
