//! HTTP/2 to the upstream: calls spread over several multiplexed connections, each carrying at
//! most `upstream.http2_max_streams` at once, reused once open.

use std::sync::{Arc, Mutex};

use linkup_gateway::emulator::Faults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::tls::gateway_with_server;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A plain TCP front before `backend` that notes, for each connection, whether it opened with
/// the HTTP/2 preface.
async fn counting_front(backend: std::net::SocketAddr) -> (u16, Arc<Mutex<Vec<bool>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let conns = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let conns = conns.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 24];
                if inbound.read_exact(&mut first).await.is_err() {
                    return;
                }
                conns.lock().unwrap().push(first == PREFACE);
                let Ok(mut out) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                if out.write_all(&first).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn http2_calls_share_connections_of_at_most_http2_max_streams_and_reuse_them() {
    const CALLS: usize = 10;
    let emu = start_emulator(UPSTREAM_KEY).await;
    let (port, conns) = counting_front(emu.addr()).await;
    let h = gateway_with_server(
        emu,
        &format!("http://127.0.0.1:{port}"),
        None,
        "protocol = \"http2\"\nhttp2_max_streams = 4",
        "workers = 1",
    )
    .await;
    // Every answer stops half-way until released: the calls are all in flight together.
    h.emu.set_faults(Faults {
        big_answer_bytes: 2000,
        stall_big_answers: true,
        ..Default::default()
    });
    let h = Arc::new(h);
    let body = r#"{"action":"validate_email","params":{"email":"a@example.com"}}"#;
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.post("/v2/enrich", body).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.upstream_calls() < CALLS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    h.emu.release_stalled();
    for c in calls {
        let a = c.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    // Ten calls at once, four per connection: three connections, all HTTP/2 (prior knowledge).
    assert_eq!(*conns.lock().unwrap(), vec![true; 3]);
    // Open connections are reused: ten more calls open nothing new.
    h.emu.set_faults(Faults::default());
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.post("/v2/enrich", body).await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().status, 200);
    }
    assert_eq!(conns.lock().unwrap().len(), 3);
    assert_eq!(h.upstream_calls(), 2 * CALLS as u64);
}
