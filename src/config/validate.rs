//! Raw surface → typed settings, one function per section, in the order the file lists them.
//! Each collects its problems (with key paths) instead of stopping at the first, so a bad file
//! is reported whole; a section with problems still returns placeholder values, and
//! [`validate`] builds [`Settings`] only when no problem was found.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderValue, Uri};
use sha2::Digest;

use super::parse::{parse_duration, parse_not_after, parse_quota};
use super::raw::{
    defaults, RawClient, RawConfig, RawFleet, RawIdempotency, RawLedger, RawRateLimit, RawServer,
    RawStatusCache, RawUpstream,
};
use super::settings::*;
use super::{ConfigError, Problem};

/// The smallest `upstream.max_buffered_bytes`: below it ordinary answers would be refused.
pub const MIN_BUFFERED_BYTES: u64 = 64 * 1024;

pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
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

    /// A path pattern, compiled once here. (It cannot fail: every character but `*` is taken
    /// literally; a failure would still be reported, not ignored.)
    fn pattern(&mut self, key: &str, v: &str) -> Option<PathPattern> {
        match PathPattern::new(v) {
            Ok(pattern) => Some(pattern),
            Err(e) => {
                self.push(key, e);
                None
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

/// Relative paths in the file are relative to the file's folder.
pub(super) fn resolve(base_dir: Option<&Path>, f: &Path) -> PathBuf {
    match base_dir {
        Some(b) if f.is_relative() && !b.as_os_str().is_empty() => b.join(f),
        _ => f.to_owned(),
    }
}

pub(super) fn validate(
    raw: RawConfig,
    env: &[(String, String)],
    base_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let mut p = Problems(Vec::new());
    let server = server(&raw.server, env, base_dir, &mut p);
    let upstream = match &raw.upstream {
        None => {
            p.push("upstream", "missing: the upstream url and key are required");
            None
        }
        Some(u) => upstream(u, env, base_dir, &mut p),
    };
    // Read from the raw table: TLS files that failed to load are a problem already, and must
    // not make every `cert_subject` a second one.
    let mtls = (raw.server.tls.as_ref()).is_some_and(|t| t.client_ca_file.is_some());
    let clients = clients(&raw.clients, server.listen, mtls, &mut p);
    let rate_limit = rate_limit(&raw.rate_limit, server.request_timeout, &mut p);
    let status_cache = status_cache(&raw.status_cache, &mut p);
    let idempotency = idempotency(&raw.idempotency, &mut p);
    let ledger = ledger(&raw.ledger, base_dir, &mut p);
    let fleet = raw.fleet.map(|f| fleet(f, &mut p));
    let costs = costs(raw.costs, &mut p);

    match upstream {
        Some(upstream) if p.0.is_empty() => Ok(Settings {
            source: None,
            server,
            upstream,
            clients,
            rate_limit,
            checkpoint_coalesce: raw.checkpoint.coalesce,
            status_cache,
            idempotency,
            ledger,
            fleet,
            metrics_per_account: raw.metrics.per_account,
            costs,
        }),
        _ => Err(ConfigError::Invalid(p.0)),
    }
}

/// `[server]`, its admin token and inbound TLS.
fn server(
    s: &RawServer,
    env: &[(String, String)],
    base_dir: Option<&Path>,
    p: &mut Problems,
) -> ServerSettings {
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
        (None, Some(f)) => match std::fs::read_to_string(resolve(base_dir, f)) {
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
        let cert_file = resolve(base_dir, &t.cert_file);
        let key_file = resolve(base_dir, &t.key_file);
        let client_ca_file = t.client_ca_file.as_deref().map(|f| resolve(base_dir, f));
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
    ServerSettings {
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
    }
}

/// `[upstream]`: where, and the one real key.
fn upstream(
    u: &RawUpstream,
    env: &[(String, String)],
    base_dir: Option<&Path>,
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
            let f = resolve(base_dir, f);
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
        ca_file: u.ca_file.as_deref().map(|f| resolve(base_dir, f)),
        max_buffered_bytes: usize::try_from(u.max_buffered_bytes).unwrap_or(usize::MAX),
        protocol,
        http2_max_streams: u.http2_max_streams as usize,
    })
}

/// `[[clients]]`: names, keys and subjects unique across clients; their scopes and limits.
fn clients(
    raw: &[RawClient],
    listen: SocketAddr,
    mtls: bool,
    p: &mut Problems,
) -> Vec<Arc<ClientSettings>> {
    let mut clients = Vec::new();
    let mut seen_names = HashSet::new();
    let mut seen_keys = HashSet::new();
    let mut seen_subjects = HashSet::new();
    for (i, c) in raw.iter().enumerate() {
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
            if sha == [0u8; 32] {
                // The placeholder of the shipped examples: no key hashes to it, and taking it
                // for a client would hide that the real one was never put in.
                p.push(
                    sha_key,
                    "all zeros: a placeholder, not a key's SHA-256; run `linkup-gateway keygen --name NAME` (a new client) or `keygen --rotate NAME` and put the SHA-256 it prints here",
                );
                continue;
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
            paths: c
                .paths
                .iter()
                .enumerate()
                .filter_map(|(j, s)| p.pattern(&format!("clients[{i}].paths[{j}]"), s))
                .collect(),
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
    clients
}

/// `[rate_limit]` and its rules; a rule's `max_delay` must fit in `server.request_timeout`.
fn rate_limit(rl: &RawRateLimit, request_timeout: Duration, p: &mut Problems) -> RateLimitSettings {
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
                    r.max_delay.as_deref().unwrap_or(defaults::RULE_MAX_DELAY),
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
        let Some(path) = p.pattern(&format!("rate_limit.rules[{i}].path"), &r.path) else {
            continue;
        };
        rules.push(RuleSettings {
            name,
            path,
            action: r.action.clone(),
            per_account: q,
            burst: r.burst.unwrap_or(rl.burst.max(1)),
            shadow: r.shadow,
            pacing,
        });
    }
    RateLimitSettings {
        per_account,
        burst: rl.burst.max(1),
        upstream_429_cooldown: cooldown,
        shadow: rl.shadow,
        max_queued: rl.max_queued,
        rules,
    }
}

/// `[status_cache]`.
fn status_cache(c: &RawStatusCache, p: &mut Problems) -> StatusCacheSettings {
    let ttl = p.duration("status_cache.ttl", &c.ttl);
    if c.max_entries == 0 {
        p.push("status_cache.max_entries", "must be at least 1");
    }
    StatusCacheSettings {
        enabled: c.enabled,
        ttl,
        max_entries: c.max_entries,
    }
}

/// `[idempotency]`.
fn idempotency(i: &RawIdempotency, p: &mut Problems) -> IdempotencySettings {
    let ttl = p.duration("idempotency.ttl", &i.ttl);
    if i.max_keys == 0 {
        p.push("idempotency.max_keys", "must be at least 1");
    }
    for (j, r) in i.require.iter().enumerate() {
        if !r.path.starts_with("/v2/") {
            p.push(
                format!("idempotency.require[{j}].path"),
                "must start with /v2/",
            );
        }
    }
    IdempotencySettings {
        enabled: i.enabled,
        ttl,
        max_keys: i.max_keys,
        require: i
            .require
            .iter()
            .enumerate()
            .filter_map(|(j, r)| {
                Some(IdempotencyRequirement {
                    path: p.pattern(&format!("idempotency.require[{j}].path"), &r.path)?,
                    action: r.action.clone(),
                })
            })
            .collect(),
    }
}

/// `[ledger]` (also read alone by `usage`, through [`super::load_ledger`]).
pub(super) fn ledger(l: &RawLedger, base_dir: Option<&Path>, p: &mut Problems) -> LedgerSettings {
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
            base_dir,
            l.path
                .as_deref()
                .unwrap_or(Path::new(defaults::LEDGER_PATH)),
        ),
        postgres_url: l.postgres_url.clone().map(Redacted::new),
        sync,
        reconcile_every,
        buffer_rows: usize::try_from(l.buffer_rows).unwrap_or(usize::MAX),
    }
}

/// `[fleet]`: the shared store and what to do while it is down.
fn fleet(f: RawFleet, p: &mut Problems) -> FleetSettings {
    let on = |key: &str, v: &str, p: &mut Problems| match v {
        "local" => OnFailure::Local,
        "deny" => OnFailure::Deny,
        other => {
            p.push(key, format!("`{other}`: expected \"local\" or \"deny\""));
            OnFailure::Deny
        }
    };
    let o = f.on_store_failure.unwrap_or_default();
    let limits = on("fleet.on_store_failure.limits", &o.limits, p);
    let budgets = on("fleet.on_store_failure.budgets", &o.budgets, p);
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
        redis_url: f.redis_url.map(Redacted::new),
        on_store_failure: StoreFailureSettings { limits, budgets },
        timeout,
        local_status_ttl,
        checkpoint_lease,
        key_prefix: f.key_prefix,
    }
}

/// `[costs]`: the documented-free endpoints, then the file's entries over them.
fn costs(raw: BTreeMap<String, u64>, p: &mut Problems) -> CostSettings {
    let mut by_key: BTreeMap<String, u64> = defaults::FREE_BY_DEFAULT
        .iter()
        .map(|k| (k.to_string(), 0))
        .collect();
    by_key.extend(raw);
    let default = by_key.remove("default").unwrap_or(defaults::COST_DEFAULT);
    let patterns = by_key
        .iter()
        .filter(|(k, _)| k.contains('*'))
        .filter_map(|(k, c)| Some((p.pattern(&format!("costs.\"{k}\""), k)?, *c)))
        .collect();
    CostSettings {
        default,
        by_key,
        patterns,
    }
}
