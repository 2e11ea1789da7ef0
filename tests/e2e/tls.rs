//! An https upstream, reached over rustls with real certificates generated at test time: a TLS
//! terminator (tokio-rustls) in front of the emulator, offering h2 and HTTP/1.1 by ALPN.

use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::common::*;

pub struct TlsFront {
    pub port: u16,
    pub ca_pem: String,
    /// The protocol each accepted connection agreed on by ALPN, in order.
    pub alpn: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

/// A CA, a `localhost` certificate it signs, and a TLS listener forwarding to `backend`,
/// offering h2 and HTTP/1.1.
async fn tls_front(backend: std::net::SocketAddr) -> TlsFront {
    tls_front_offering(backend, &[b"h2", b"http/1.1"]).await
}

/// Like [`tls_front`], offering the `alpn` protocols.
pub async fn tls_front_offering(backend: std::net::SocketAddr, alpn: &[&[u8]]) -> TlsFront {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "linkup-gateway test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let agreed = Arc::new(Mutex::new(Vec::new()));
    let seen = agreed.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let proto = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                seen.lock().unwrap().push(proto);
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    TlsFront {
        port,
        ca_pem: ca_cert.pem(),
        alpn: agreed,
    }
}

async fn gateway_to(
    emu: linkup_gateway::emulator::EmulatorHandle,
    url: &str,
    ca_file: Option<&str>,
) -> Harness {
    gateway_with(emu, url, ca_file, "").await
}

/// A gateway in front of `url` (the emulator behind a front); `upstream`: more lines for the
/// [upstream] table, `server`: for the [server] one.
pub async fn gateway_with(
    emu: linkup_gateway::emulator::EmulatorHandle,
    url: &str,
    ca_file: Option<&str>,
    upstream: &str,
) -> Harness {
    gateway_with_server(emu, url, ca_file, upstream, "").await
}

pub async fn gateway_with_server(
    emu: linkup_gateway::emulator::EmulatorHandle,
    url: &str,
    ca_file: Option<&str>,
    upstream: &str,
    server: &str,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("upstream.key");
    std::fs::write(&key_file, UPSTREAM_KEY).unwrap();
    let mut text = config_text(url, &key_file.display().to_string(), server, "");
    let ca_line = match ca_file {
        Some(ca) => {
            let ca_path = dir.path().join("ca.pem");
            std::fs::write(&ca_path, ca).unwrap();
            format!("ca_file = \"{}\"\n", ca_path.display())
        }
        None => String::new(),
    };
    text = text.replace(
        "connect_timeout = \"1s\"",
        &format!("connect_timeout = \"1s\"\n{ca_line}{upstream}"),
    );
    std::fs::write(dir.path().join("gateway.toml"), &text).unwrap();
    let settings = linkup_gateway::config::load(&dir.path().join("gateway.toml")).unwrap();
    let gw = linkup_gateway::server::Gateway::start(settings)
        .await
        .unwrap();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    Harness { emu, gw, http, dir }
}

#[tokio::test]
async fn an_https_upstream_is_reached_over_rustls_with_the_configured_ca() {
    let emu = start_emulator(UPSTREAM_KEY).await;
    let front = tls_front(emu.addr()).await;
    let url = format!("https://localhost:{}", front.port);
    let h = gateway_to(emu, &url, Some(&front.ca_pem)).await;
    let account = h.connected_account("tok-tls").await;
    let a = h
        .post(
            "/v2/profiles",
            &format!(
                r#"{{"account_id":"{account}","action":"get","params":{{"profile_url":"u"}}}}"#
            ),
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let last = h.emu.requests().pop().unwrap();
    assert!(last
        .headers
        .iter()
        .any(|(k, v)| k == "x-api-key" && v == UPSTREAM_KEY));
    assert!(
        last.headers
            .iter()
            .any(|(k, v)| k == "host" && v == &format!("localhost:{}", front.port)),
        "{:?}",
        last.headers
    );
    // `protocol = "auto"`: the TLS handshake agreed on HTTP/2, and one connection carried both.
    assert_eq!(*front.alpn.lock().unwrap(), vec![Some(b"h2".to_vec())]);
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_502_and_nothing_is_sent() {
    let emu = start_emulator(UPSTREAM_KEY).await;
    let front = tls_front(emu.addr()).await;
    let url = format!("https://localhost:{}", front.port);
    // No ca_file: the test CA is not among the webpki roots.
    let h = gateway_to(emu, &url, None).await;
    let a = h.get("/v2/credits").await;
    assert_eq!((a.status, a.code().as_str()), (502, "UPSTREAM_UNAVAILABLE"));
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{}",
        a.json()
    );
    assert_eq!(
        h.upstream_calls(),
        0,
        "the key never left over an untrusted connection"
    );
}

#[tokio::test]
async fn auto_speaks_http1_to_an_https_upstream_whose_handshake_chooses_it() {
    let emu = start_emulator(UPSTREAM_KEY).await;
    let front = tls_front_offering(emu.addr(), &[b"http/1.1"]).await;
    let url = format!("https://localhost:{}", front.port);
    let h = gateway_with(emu, &url, Some(&front.ca_pem), "").await;
    for _ in 0..3 {
        let a = h.get("/v2/credits").await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    // The first connection offered h2 and learnt HTTP/1.1 (it is not used for calls); the
    // HTTP/1.1 pool's connection (no ALPN offered: HTTP/1.1) then carried every call.
    let agreed = front.alpn.lock().unwrap().clone();
    assert_eq!(agreed, vec![Some(b"http/1.1".to_vec()), None], "{agreed:?}");
    assert_eq!(h.upstream_calls(), 3);
}

#[tokio::test]
async fn http2_only_to_an_upstream_that_refuses_it_is_502_and_nothing_is_sent() {
    let emu = start_emulator(UPSTREAM_KEY).await;
    let front = tls_front_offering(emu.addr(), &[b"http/1.1"]).await;
    let url = format!("https://localhost:{}", front.port);
    let h = gateway_with(emu, &url, Some(&front.ca_pem), "protocol = \"http2\"").await;
    let a = h.get("/v2/credits").await;
    assert_eq!((a.status, a.code().as_str()), (502, "UPSTREAM_UNAVAILABLE"));
    let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("HTTP/2"), "{message}");
    assert_eq!(h.upstream_calls(), 0);
}
