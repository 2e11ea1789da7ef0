//! How the settings show in the admin listener's `/config`: `#[derive(Serialize)]` on the
//! settings with these helpers named by `serialize_with`. Secrets never show: the upstream key
//! and the store URLs are types whose `Serialize` writes `[redacted]` (see `settings.rs`), and
//! the key and admin-token hashes go through [`redacted`]. Durations show as milliseconds
//! (`"60000ms"`, which the config accepts back), paths as text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::settings::ClientKey;

pub const REDACTED: &str = "[redacted]";

/// A secret's place, never its value.
pub fn redacted<T, S: Serializer>(_: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(REDACTED)
}

/// `null` when there is none, `[redacted]` when there is one.
pub fn redacted_if_some<T, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_none(),
    }
}

pub fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}ms", d.as_millis()))
}

/// A path as text even when it is not UTF-8 (serde's own `Path` impl would fail then).
pub fn path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&p.display())
}

pub fn opt_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => path(p, s),
        None => s.serialize_none(),
    }
}

/// `checkpoint_coalesce` as the file spells it: `"checkpoint": {"coalesce": …}`.
pub fn checkpoint<S: Serializer>(coalesce: &bool, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(1))?;
    m.serialize_entry("coalesce", coalesce)?;
    m.end()
}

/// `metrics_per_account` as the file spells it: `"metrics": {"per_account": …}`.
pub fn metrics<S: Serializer>(per_account: &bool, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(1))?;
    m.serialize_entry("per_account", per_account)?;
    m.end()
}

/// A client's keys (flattened into the client): `key_sha256` says a key exists without
/// showing it, `keys` lists each with its expiry.
pub fn client_keys<S: Serializer>(keys: &[ClientKey], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(2))?;
    m.serialize_entry("key_sha256", REDACTED)?;
    m.serialize_entry("keys", keys)?;
    m.end()
}

/// `not_after` as RFC 3339, `null` for a key that does not expire.
pub fn rfc3339<S: Serializer>(t: &Option<time::OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
    let text = t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    text.serialize(s)
}

/// A rule's pacing (flattened into the rule) as the file spells it: `on_limit` and `max_delay`.
pub fn pacing<S: Serializer>(pacing: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(2))?;
    match pacing {
        Some(d) => {
            m.serialize_entry("on_limit", "delay")?;
            m.serialize_entry("max_delay", &format!("{}ms", d.as_millis()))?;
        }
        None => {
            m.serialize_entry("on_limit", "refuse")?;
            m.serialize_entry("max_delay", &None::<String>)?;
        }
    }
    m.end()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::{json, Value};

    use crate::config::{load_str, AccountScope, Settings};

    const UPSTREAM_KEY: &str = "upstream-key-DO-NOT-SHOW";
    const ADMIN_TOKEN: &str = "admin-token-DO-NOT-SHOW";
    const KEY_HASH: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    /// A config that sets a value in every section, secrets included.
    fn everything() -> Settings {
        let text = format!(
            r#"
            [server]
            admin_token_env = "ADMIN"
            [upstream]
            url = "http://127.0.0.1:1"
            api_key_env = "K"
            [[clients]]
            name = "crm"
            key_sha256 = "{KEY_HASH}"
            keys = [{{ sha256 = "{}", not_after = "2026-12-31" }}]
            accounts = ["acc_1", "acc_2"]
            daily_credit_budget = 10
            requests_per_second = 2.5
            [[clients]]
            name = "any"
            key_sha256 = "{}"
            [rate_limit]
            [[rate_limit.rules]]
            path = "/v2/network"
            action = "invite"
            per_account = "100/week"
            [[rate_limit.rules]]
            path = "/v2/messages"
            per_account = "5/min"
            on_limit = "delay"
            max_delay = "2s"
            [idempotency]
            require = [{{ path = "/v2/messages", action = "send" }}, {{ path = "/v2/network" }}]
            [ledger]
            postgres_url = "postgres://gw:pg-password-DO-NOT-SHOW@db/linkup"
            [fleet]
            redis_url = "redis://:redis-password-DO-NOT-SHOW@127.0.0.1:6379/0"
            on_store_failure = {{ limits = "deny" }}
            [metrics]
            per_account = true
            [costs]
            invite = 5
            "#,
            "c".repeat(64),
            "d".repeat(64),
        );
        let env = [("K", UPSTREAM_KEY), ("ADMIN", ADMIN_TOKEN)]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        load_str(&text, &env, None).unwrap()
    }

    /// Every value `old` holds, `new` holds at the same place (it may hold more).
    fn holds(new: &Value, old: &Value, at: &str) {
        match old {
            Value::Object(m) => {
                for (k, v) in m {
                    holds(&new[k], v, &format!("{at}.{k}"));
                }
            }
            Value::Array(a) => {
                assert_eq!(new.as_array().map(Vec::len), Some(a.len()), "{at}");
                for (i, v) in a.iter().enumerate() {
                    holds(&new[i], v, &format!("{at}[{i}]"));
                }
            }
            _ => assert_eq!(new, old, "{at}"),
        }
    }

    #[test]
    fn config_json_shows_everything_the_hand_written_mirror_did() {
        for s in [everything(), minimal()] {
            let new = serde_json::to_value(&s).unwrap();
            holds(&new, &old_mirror(&s), "");
        }
    }

    fn minimal() -> Settings {
        let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\napi_key_env = \"K\"\n";
        load_str(text, &[("K".into(), UPSTREAM_KEY.into())], None).unwrap()
    }

    #[test]
    fn config_json_shows_no_secret() {
        let s = everything();
        let text = serde_json::to_string_pretty(&s).unwrap();
        for secret in [
            UPSTREAM_KEY,
            ADMIN_TOKEN,
            KEY_HASH,
            &"c".repeat(64),
            &"d".repeat(64),
            "pg-password",
            "redis-password",
        ] {
            assert!(!text.contains(secret), "{secret} shows in {text}");
        }
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["upstream"]["api_key"], "[redacted]");
        assert_eq!(v["server"]["admin_token"], "[redacted]");
        assert_eq!(v["clients"][0]["keys"][1]["sha256"], "[redacted]");
        assert_eq!(v["ledger"]["postgres_url"], "[redacted]");
        assert_eq!(v["fleet"]["redis_url"], "[redacted]");
    }

    /// The `/config` of the hand-written mirror this derive replaced (admin.rs until the
    /// config split), kept as the oracle of `config_json_shows_everything_the_hand_written_mirror_did`.
    fn old_mirror(s: &Settings) -> serde_json::Value {
        let d = |d: std::time::Duration| format!("{}ms", d.as_millis());
        json!({
            "source": s.source.as_ref().map(|p| p.display().to_string()),
            "server": {
                "listen": s.server.listen.to_string(),
                "admin_listen": s.server.admin_listen.to_string(),
                "max_body_bytes": s.server.max_body_bytes,
                "request_timeout": d(s.server.request_timeout),
                "shutdown_grace": d(s.server.shutdown_grace),
                "max_in_flight": s.server.max_in_flight,
                "header_read_timeout": d(s.server.header_read_timeout),
                "admin_token": s.server.admin_token_sha256.map(|_| "[redacted]"),
                "tls": s.server.tls.as_ref().map(|t| json!({
                    "cert_file": t.cert_file.display().to_string(),
                    "key_file": t.key_file.display().to_string(),
                    "client_ca_file": t.client_ca_file.as_ref().map(|p| p.display().to_string()),
                })),
            },
            "upstream": {
                "url": s.upstream.url,
                "api_key": "[redacted]",
                "api_key_source": s.upstream.api_key_source,
                "connect_timeout": d(s.upstream.connect_timeout),
                "ca_file": s.upstream.ca_file.as_ref().map(|p| p.display().to_string()),
                "max_buffered_bytes": s.upstream.max_buffered_bytes,
            "protocol": s.upstream.protocol.as_str(),
            "http2_max_streams": s.upstream.http2_max_streams,
            },
            "clients": s.clients.iter().map(|c| json!({
                "name": &*c.name,
                "key_sha256": "[redacted]",
                "keys": c.keys.iter().map(|k| json!({
                    "sha256": "[redacted]",
                    "not_after": k.not_after.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
                })).collect::<Vec<_>>(),
                "cert_subject": c.cert_subject,
                "accounts": match &c.accounts { AccountScope::Any => json!(["*"]), AccountScope::Only(l) => json!(l) },
                "paths": c.paths.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                "daily_credit_budget": c.daily_credit_budget,
                "requests_per_second": c.requests_per_second,
                "shadow": c.shadow,
            })).collect::<Vec<_>>(),
            "rate_limit": {
                "per_account": s.rate_limit.per_account.to_string(),
                "burst": s.rate_limit.burst,
                "upstream_429_cooldown": d(s.rate_limit.upstream_429_cooldown),
                "max_queued": s.rate_limit.max_queued,
                "shadow": s.rate_limit.shadow,
                "rules": s.rate_limit.rules.iter().map(|r| json!({
                    "name": r.name, "path": r.path.as_str(), "action": r.action,
                    "per_account": r.per_account.to_string(), "burst": r.burst, "shadow": r.shadow,
                    "on_limit": if r.pacing.is_some() { "delay" } else { "refuse" }, "max_delay": r.pacing.map(d),
                })).collect::<Vec<_>>(),
            },
            "checkpoint": {"coalesce": s.checkpoint_coalesce},
            "status_cache": {"enabled": s.status_cache.enabled, "ttl": d(s.status_cache.ttl), "max_entries": s.status_cache.max_entries},
            "idempotency": {
                "enabled": s.idempotency.enabled, "ttl": d(s.idempotency.ttl), "max_keys": s.idempotency.max_keys,
                "require": s.idempotency.require.iter().map(|r| json!({"path": r.path.as_str(), "action": r.action})).collect::<Vec<_>>(),
            },
            "ledger": {
                "path": s.ledger.path.display().to_string(),
                "postgres_url": s.ledger.postgres_url.as_ref().map(|_| "[redacted]"),
                "sync": s.ledger.sync.as_str(),
                "reconcile_every": d(s.ledger.reconcile_every),
            },
            "fleet": s.fleet.as_ref().map(|f| json!({
                "redis_url": f.redis_url.as_ref().map(|_| "[redacted]"),
                "on_store_failure": {"limits": format!("{:?}", f.on_store_failure.limits).to_lowercase(), "budgets": format!("{:?}", f.on_store_failure.budgets).to_lowercase()},
            })),
            "metrics": {"per_account": s.metrics_per_account},
            "costs": {"default": s.costs.default, "by_key": s.costs.by_key},
        })
    }
}
