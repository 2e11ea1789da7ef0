//! Inbound TLS and mTLS on the data listener, with certificates generated at test time, and
//! caller key rotation (two keys during an overlap, the old one refused once expired).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::common::*;

struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf signed by `ca`: (cert PEM, key PEM, cert DER, key DER).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn leaf(ca: &Ca, cn: &str, sans: &[&str], client: bool) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    if client {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

/// The gateway's certificate files and its client CA, in a directory of their own.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(server_ca: &Ca, client_ca: Option<&Ca>) -> Files {
        let f = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        f.install(&leaf(server_ca, "gateway", &["localhost"], false));
        if let Some(c) = client_ca {
            std::fs::write(f.dir.path().join("client-ca.pem"), &c.pem).unwrap();
        }
        f
    }

    fn install(&self, l: &Leaf) {
        std::fs::write(self.dir.path().join("cert.pem"), &l.cert_pem).unwrap();
        std::fs::write(self.dir.path().join("key.pem"), &l.key_pem).unwrap();
    }

    fn server_lines(&self, mtls: bool) -> String {
        let p = |n: &str| self.dir.path().join(n).display().to_string();
        let ca = if mtls {
            format!(", client_ca_file = \"{}\"", p("client-ca.pem"))
        } else {
            String::new()
        };
        format!(
            "tls = {{ cert_file = \"{}\", key_file = \"{}\"{ca} }}",
            p("cert.pem"),
            p("key.pem")
        )
    }
}

type Https = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// An https client trusting only `root`, optionally presenting a client certificate.
fn https_client(root: &Ca, identity: Option<&Leaf>) -> Https {
    https_client_with(root, identity, true)
}

fn https_client_with(root: &Ca, identity: Option<&Leaf>, h2: bool) -> Https {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match identity {
        Some(l) => builder
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only()
        .enable_http1();
    let connector = if h2 {
        connector.enable_http2().build()
    } else {
        connector.build()
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn https_call(
    client: &Https,
    h: &Harness,
    path: &str,
    key: Option<&str>,
) -> Result<(Answer, http::Version), String> {
    let mut b = Request::builder()
        .method(Method::GET)
        .uri(format!("https://localhost:{}{path}", h.gw.data_addr.port()));
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    let resp = client
        .request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let version = resp.version();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        },
        version,
    ))
}

const BILLING: &str = "[[clients]]\nname = \"billing\"\ncert_subject = \"billing.internal\"\npaths = [\"/v2/credits\"]\n";

#[tokio::test]
async fn https_is_served_with_the_configured_certificate_over_h2_and_http1() {
    let server_ca = ca("gateway CA");
    let files = Files::new(&server_ca, None);
    let h = Harness::start_with(&files.server_lines(false), "").await;
    let client = https_client(&server_ca, None);
    let (a, version) = https_call(&client, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(version, http::Version::HTTP_2, "ALPN offers h2");
    let http1 = https_client_with(&server_ca, None, false);
    let (a, version) = https_call(&http1, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .unwrap();
    assert_eq!((a.status, version), (200, http::Version::HTTP_11));
    // Without a key it is still the usual refusal, now over TLS.
    let (a, _) = https_call(&client, &h, "/v2/credits", None).await.unwrap();
    assert_eq!((a.status, a.code().as_str()), (403, "INVALID_API_KEY"));
    // A client that does not trust the gateway's CA does not get through.
    let stranger = https_client(&ca("another CA"), None);
    assert!(https_call(&stranger, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .is_err());
}

#[tokio::test]
async fn plain_http_to_a_tls_listener_fails_and_the_listener_keeps_serving() {
    let server_ca = ca("gateway CA");
    let files = Files::new(&server_ca, None);
    let h = Harness::start_with(&files.server_lines(false), "").await;
    let plain = Request::get(h.url("/v2/credits"))
        .header("x-api-key", ALPHA_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(h.http.request(plain).await.is_err());
    assert_eq!(h.upstream_calls(), 0);
    let (a, _) = https_call(
        &https_client(&server_ca, None),
        &h,
        "/v2/credits",
        Some(ALPHA_KEY),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn with_a_client_ca_a_connection_without_a_client_certificate_is_refused() {
    let server_ca = ca("gateway CA");
    let client_ca = ca("client CA");
    let files = Files::new(&server_ca, Some(&client_ca));
    let h = Harness::start_with(&files.server_lines(true), BILLING).await;
    // Even with a valid virtual key: no certificate, no connection.
    let r = https_call(
        &https_client(&server_ca, None),
        &h,
        "/v2/credits",
        Some(ALPHA_KEY),
    )
    .await;
    assert!(r.is_err(), "{:?}", r.map(|(a, _)| a.status));
    // A certificate from another CA is refused too.
    let other = leaf(&ca("rogue CA"), "billing.internal", &[], true);
    let r = https_call(
        &https_client(&server_ca, Some(&other)),
        &h,
        "/v2/credits",
        None,
    )
    .await;
    assert!(r.is_err());
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn a_client_certificate_matching_cert_subject_is_that_client_without_a_key() {
    let server_ca = ca("gateway CA");
    let client_ca = ca("client CA");
    let files = Files::new(&server_ca, Some(&client_ca));
    let h = Harness::start_with(&files.server_lines(true), BILLING).await;
    let billing = https_client(
        &server_ca,
        Some(&leaf(&client_ca, "billing.internal", &[], true)),
    );
    let (a, _) = https_call(&billing, &h, "/v2/credits", None).await.unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    // Admitted as `billing`, with billing's scopes.
    let (a, _) = https_call(&billing, &h, "/v2/accounts", None)
        .await
        .unwrap();
    assert_eq!((a.status, a.code().as_str()), (403, "FORBIDDEN"));
    // A presented virtual key wins over the certificate.
    let (a, _) = https_call(&billing, &h, "/v2/accounts", Some(ALPHA_KEY))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    // A DNS SAN matches as well as the CN.
    let by_san = https_client(
        &server_ca,
        Some(&leaf(
            &client_ca,
            "Billing Service",
            &["billing.internal"],
            true,
        )),
    );
    let (a, _) = https_call(&by_san, &h, "/v2/credits", None).await.unwrap();
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn a_valid_client_certificate_with_an_unknown_subject_and_no_key_is_403() {
    let server_ca = ca("gateway CA");
    let client_ca = ca("client CA");
    let files = Files::new(&server_ca, Some(&client_ca));
    let h = Harness::start_with(&files.server_lines(true), BILLING).await;
    let stranger = https_client(
        &server_ca,
        Some(&leaf(&client_ca, "stranger.internal", &[], true)),
    );
    let (a, _) = https_call(&stranger, &h, "/v2/credits", None)
        .await
        .unwrap();
    assert_eq!((a.status, a.code().as_str()), (403, "INVALID_API_KEY"));
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cert_subject"),
        "{}",
        a.json()
    );
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn sighup_reload_serves_the_new_certificate_to_new_connections() {
    let old_ca = ca("old CA");
    let new_ca = ca("new CA");
    let files = Files::new(&old_ca, None);
    let h = Harness::start_with(&files.server_lines(false), "").await;
    let trusts_old = https_client(&old_ca, None);
    let trusts_new = https_client(&new_ca, None);
    assert!(https_call(&trusts_old, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .is_ok());
    assert!(https_call(&trusts_new, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .is_err());

    files.install(&leaf(&new_ca, "gateway", &["localhost"], false));
    h.gw.reload().unwrap();

    let (a, _) = https_call(&trusts_new, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    // A fresh client (no pooled connection) that trusts only the old CA is now refused.
    let fresh_old = https_client(&old_ca, None);
    assert!(https_call(&fresh_old, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .is_err());

    // A broken certificate file is refused at reload; the running certificate stays.
    std::fs::write(files.dir.path().join("key.pem"), "garbage").unwrap();
    let problems = h.gw.reload().unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("server.tls.key_file")),
        "{problems:?}"
    );
    let fresh_new = https_client(&new_ca, None);
    assert!(https_call(&fresh_new, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .is_ok());

    // Dropping [server] tls on reload would downgrade every caller: refused, TLS stays.
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    let plain: String = text
        .lines()
        .filter(|l| !l.starts_with("tls = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(h.config_path(), plain).unwrap();
    let problems = h.gw.reload().unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("server.tls: turning")),
        "{problems:?}"
    );
    assert!(https_call(&fresh_new, &h, "/v2/credits", Some(ALPHA_KEY))
        .await
        .is_ok());
}

const OLD_KEY: &str = "lgw_rotating_old_key_DO_NOT_LEAK_11aa";
const NEW_KEY: &str = "lgw_rotating_new_key_DO_NOT_LEAK_22bb";

fn rotating(old_not_after: &str) -> String {
    format!(
        "[[clients]]\nname = \"rotating\"\nkeys = [{{ sha256 = \"{}\", not_after = \"{old_not_after}\" }}, {{ sha256 = \"{}\" }}]\n",
        sha(OLD_KEY),
        sha(NEW_KEY)
    )
}

#[tokio::test]
async fn both_keys_work_during_a_rotation_and_the_expired_one_is_refused_with_its_reason() {
    let h = Harness::start_with("", &rotating("2099-12-31")).await;
    for key in [OLD_KEY, NEW_KEY] {
        let a = h.call(Method::GET, "/v2/credits", Some(key), "").await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    }

    // The overlap ends: the old key's not_after is now in the past.
    let text = std::fs::read_to_string(h.config_path())
        .unwrap()
        .replace("2099-12-31", "2020-01-01T00:00:00Z");
    std::fs::write(h.config_path(), text).unwrap();
    h.gw.reload().unwrap();

    let a = h.call(Method::GET, "/v2/credits", Some(OLD_KEY), "").await;
    assert_eq!((a.status, a.code().as_str()), (403, "INVALID_API_KEY"));
    assert_eq!(a.source(), "gateway");
    let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("expired"), "{message}");
    assert!(!String::from_utf8_lossy(&a.body).contains(OLD_KEY));
    let a = h.call(Method::GET, "/v2/credits", Some(NEW_KEY), "").await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_header_read_timeout_and_blocks_no_one() {
    use tokio::io::AsyncReadExt;
    let server_ca = ca("gateway CA");
    let files = Files::new(&server_ca, None);
    let server = format!(
        "header_read_timeout = \"300ms\"\n{}",
        files.server_lines(false)
    );
    let h = Harness::start_with(&server, "").await;
    // A client that connects and never says hello.
    let mut silent = tokio::net::TcpStream::connect(h.gw.data_addr)
        .await
        .unwrap();
    // Meanwhile others are served: the handshake runs on the connection's task.
    let (a, _) = https_call(
        &https_client(&server_ca, None),
        &h,
        "/v2/credits",
        Some(ALPHA_KEY),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the gateway closes a connection that never completes its handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
