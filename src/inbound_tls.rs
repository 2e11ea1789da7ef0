//! Inbound TLS and mTLS for the data listener: the rustls `ServerConfig` built from
//! `[server] tls`, and the names a verified client certificate presents.
//!
//! The config is built while the config file is validated (so `check-config` reports a bad
//! file, a PEM that does not parse or a key that does not match its certificate, with the key
//! path), and lives in the settings of a generation: SIGHUP builds a new one from the files as
//! they are then, and new connections get it.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A problem with one of the `server.tls` files: the key it is about and what is wrong.
pub type TlsProblem = (&'static str, String);

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let bytes =
        std::fs::read(path).map_err(|e| (key, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                key,
                format!("{}: not PEM certificates: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((
            key,
            format!("{}: holds no PEM CERTIFICATE block", path.display()),
        ));
    }
    Ok(certs)
}

/// The server config for `[server] tls`: the certificate chain and key, ALPN h2 and
/// http/1.1, and, with a client CA, client certificates required and verified against it.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<Arc<ServerConfig>, Vec<TlsProblem>> {
    let mut problems = Vec::new();
    let certs = read_certs("server.tls.cert_file", cert_file).map_err(|p| problems.push(p));
    let key = std::fs::read(key_file)
        .map_err(|e| {
            (
                "server.tls.key_file",
                format!("cannot read {}: {e}", key_file.display()),
            )
        })
        .and_then(|bytes| {
            PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                (
                    "server.tls.key_file",
                    format!("{}: no PEM private key: {e}", key_file.display()),
                )
            })
        })
        .map_err(|p| problems.push(p));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match client_ca_file {
        None => None,
        Some(ca) => match read_certs("server.tls.client_ca_file", ca) {
            Err(p) => {
                problems.push(p);
                None
            }
            Ok(cas) => {
                let mut roots = RootCertStore::empty();
                let mut ok = true;
                for c in cas {
                    if let Err(e) = roots.add(c) {
                        problems.push((
                            "server.tls.client_ca_file",
                            format!("{}: not a usable CA certificate: {e}", ca.display()),
                        ));
                        ok = false;
                    }
                }
                if ok {
                    match WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider.clone(),
                    )
                    .build()
                    {
                        Ok(v) => Some(v),
                        Err(e) => {
                            problems.push((
                                "server.tls.client_ca_file",
                                format!("{}: {e}", ca.display()),
                            ));
                            None
                        }
                    }
                } else {
                    None
                }
            }
        },
    };
    let (Ok(certs), Ok(key)) = (certs, key) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![("server.tls", e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        vec![(
            "server.tls.key_file",
            format!(
                "{} does not go with the certificate in {}: {e}",
                key_file.display(),
                cert_file.display()
            ),
        )]
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The names a (verified) client certificate presents: its subject common name(s), then its
/// DNS subject alternative names. `[[clients]].cert_subject` is matched against these.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names
}
