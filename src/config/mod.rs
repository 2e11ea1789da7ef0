//! Configuration, the rpxy way: the raw serde surface ([`raw`], exactly the TOML keys with
//! `deny_unknown_fields` and every default in one block) is validated once, one function per
//! section ([`validate`]), into typed [`Settings`] ([`settings`]). Strings become `Duration`s,
//! quotas, `Uri`s and header values here, never per request. Every problem names its key path.
//! This file holds the entry points: `load`, `load_str`, `load_ledger` and the environment
//! overrides.

use std::fmt;
use std::path::{Path, PathBuf};

mod parse;
mod path_pattern;
pub mod raw;
mod serialize;
mod settings;
mod validate;

pub use parse::{parse_duration, parse_not_after, parse_quota};
pub use raw::defaults::FREE_BY_DEFAULT;
pub use raw::*;
pub use settings::*;
pub use validate::MIN_BUFFERED_BYTES;

/// Prefix of environment overrides: `LINKUP_GATEWAY__SERVER__LISTEN=0.0.0.0:8080`.
pub const ENV_PREFIX: &str = "LINKUP_GATEWAY__";

/// The default longest `account_id`, `action` or path id accepted (`server.max_id_bytes`).
/// Each is a limiter, cache and ledger key and a log field: one as long as the body would cost
/// memory everywhere it is kept.
pub const MAX_ID_BYTES: usize = 256;

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
    validate::validate(raw, env, base_dir)
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

/// Only the `[ledger]` section of a config file, validated: for `usage`, which reads the
/// ledger and needs neither the upstream key nor the rest.
pub fn load_ledger(path: &Path) -> Result<LedgerSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let raw = parse_raw(&text, &env)?;
    let mut p = validate::Problems(Vec::new());
    let ledger = validate::ledger(&raw.ledger, path.parent(), &mut p);
    if p.0.is_empty() {
        Ok(ledger)
    } else {
        Err(ConfigError::Invalid(p.0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn an_all_zero_placeholder_hash_is_refused_with_how_to_make_a_key() {
        let zeros = "0".repeat(64);
        for line in [
            format!("key_sha256 = \"{zeros}\""),
            format!("keys = [{{ sha256 = \"{SHA_A}\" }}, {{ sha256 = \"{zeros}\" }}]"),
        ] {
            let ps = load_str(&client_with(&line), &env(), None)
                .unwrap_err()
                .problems();
            assert_eq!(ps.len(), 1, "{ps:?}");
            assert!(
                (ps[0].starts_with("clients[0].key_sha256: all zeros")
                    || ps[0].starts_with("clients[0].keys[1].sha256: all zeros"))
                    && ps[0].contains("linkup-gateway keygen --name"),
                "{ps:?}"
            );
        }
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
