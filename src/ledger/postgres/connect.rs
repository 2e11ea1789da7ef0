//! Where and how the fleet ledger connects: the URL (its password never shown), TLS through
//! rustls, keepalives and timeouts, and the retry of a refused connection at open.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use postgres::Client;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::super::LedgerError;
use super::{CONNECT_TIMEOUT, OPEN_RETRY, STUCK_AFTER};
use crate::config::LedgerSync;

/// Where and how to connect; `display` is what errors and logs name.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) config: postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    pub(super) display: String,
    pub(super) sync: LedgerSync,
}

impl Target {
    pub(super) fn parse(url: &str, sync: LedgerSync) -> Result<Target, LedgerError> {
        let open_error = |reason: String| LedgerError::Open {
            path: "ledger.postgres_url".into(),
            reason,
        };
        let (url, root_file) = split_tls_params(url).map_err(open_error)?;
        let mut config = postgres::Config::from_str(&url)
            .map_err(|e| open_error(format!("invalid URL: {}", describe(&e))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("linkup-gateway");
        }
        // A server that vanishes without closing the connection (host down, network cut) is
        // noticed within about half a minute, not the kernel's default of many minutes.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(15));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(STUCK_AFTER);
        }
        let display = display(&config);
        let tls = tls(root_file.as_ref()).map_err(|reason| LedgerError::Open {
            path: display.clone(),
            reason,
        })?;
        Ok(Target {
            config,
            tls,
            display,
            sync,
        })
    }

    pub(super) fn connect(&self) -> Result<Client, postgres::Error> {
        let mut client = self.config.connect(self.tls.clone())?;
        // A statement stuck on a lock fails (its rows are kept and retried) instead of
        // holding every caller.
        client.batch_execute(&format!(
            "SET statement_timeout = {}",
            STUCK_AFTER.as_millis()
        ))?;
        // Committed must mean durable, whatever the server's default.
        if self.sync != LedgerSync::Async {
            client.batch_execute("SET synchronous_commit = on")?;
        }
        Ok(client)
    }

    pub(super) fn write_error(&self, e: &postgres::Error) -> LedgerError {
        LedgerError::Write {
            path: self.display.clone(),
            detail: describe(e),
        }
    }

    pub(super) fn query_error(&self, e: &postgres::Error) -> LedgerError {
        LedgerError::Query {
            path: self.display.clone(),
            detail: describe(e),
        }
    }
}

/// Take libpq's TLS parameters the `postgres` crate does not know out of a URL: `sslmode`
/// `verify-ca` / `verify-full` (kept as `require`: certificates are always verified) and
/// `sslrootcert`. Other URLs and parameters pass through untouched.
pub(super) fn split_tls_params(url: &str) -> Result<(String, Option<PathBuf>), String> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_string(), None));
    };
    let mut kept = Vec::new();
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("the URL's `{key}` is not UTF-8"))?;
        match key {
            "sslmode" if value == "verify-ca" || value == "verify-full" => {
                kept.push("sslmode=require".to_string());
            }
            "sslrootcert" => root = Some(PathBuf::from(value.as_ref())),
            _ => kept.push(pair.to_string()),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, root))
}

pub(super) fn tls(root_file: Option<&PathBuf>) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    match root_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| format!("sslrootcert: cannot read {}: {e}", file.display()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("sslrootcert: bad PEM in {}: {e}", file.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert: bad certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert: no certificate in {}", file.display()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `postgres://host:port/db`: the URL without its user and password.
pub(super) fn display(config: &postgres::Config) -> String {
    let mut out = String::from("postgres://");
    let ports = config.get_ports();
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match host {
            postgres::config::Host::Tcp(h) => out.push_str(h),
            #[cfg(unix)]
            postgres::config::Host::Unix(p) => out.push_str(&p.display().to_string()),
        }
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let _ = write!(out, ":{port}");
    }
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    let _ = write!(out, "/{db}");
    out
}

/// An error with its causes: the `postgres` crate's `Display` omits them.
pub(super) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// Connect, retrying refused connections for [`OPEN_RETRY`].
pub(super) fn connect_with_retry(target: &Target) -> Result<Client, String> {
    // 50 ms doubling to 500 ms, for OPEN_RETRY in all; an error from the server itself
    // (authentication, a missing database) is not retried.
    let mut pauses = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .without_max_times()
        .with_total_delay(Some(OPEN_RETRY))
        .build();
    loop {
        match target.connect() {
            Ok(client) => return Ok(client),
            Err(e) if e.as_db_error().is_none() => match pauses.next() {
                Some(pause) => std::thread::sleep(pause),
                None => return Err(format!("cannot connect: {}", describe(&e))),
            },
            Err(e) => return Err(format!("cannot connect: {}", describe(&e))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::PostgresLedger;
    use super::*;

    #[test]
    fn errors_name_the_database_never_the_password() {
        let t = Target::parse(
            "postgres://gw:s3cret@db.example:6543/linkup?sslmode=verify-full",
            LedgerSync::PowerSafe,
        )
        .unwrap();
        assert_eq!(t.display, "postgres://db.example:6543/linkup");
        assert_eq!(t.config.get_ssl_mode(), postgres::config::SslMode::Require);
        let e = PostgresLedger::open(
            "postgres://gw:s3cret@db.example:6543/linkup?bogus=1",
            LedgerSync::PowerSafe,
            10,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn tls_parameters_libpq_knows_are_taken_out_of_the_url() {
        let (url, root) = split_tls_params(
            "postgresql://h/db?sslrootcert=%2Fetc%2Fca.pem&sslmode=verify-ca&options=-c%20x=1",
        )
        .unwrap();
        assert_eq!(url, "postgresql://h/db?sslmode=require&options=-c%20x=1");
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            split_tls_params("host=h dbname=d").unwrap(),
            ("host=h dbname=d".to_string(), None)
        );
    }
}
