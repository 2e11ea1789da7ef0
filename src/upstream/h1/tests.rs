//! Unit tests of `h1`, in a file of their own to keep the module short.

#![allow(clippy::unwrap_used)]

use super::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An upstream that answers each request it reads on a connection with the next of
/// `answers` (raw bytes), and counts the connections it accepted.
async fn upstream(answers: Vec<&'static [u8]>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut have = Vec::new();
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    have.extend_from_slice(&buf[..n]);
                    // One request: its head, and its body by content-length.
                    let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&have[..end]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if have.len() < end + 4 + len {
                        continue;
                    }
                    have.drain(..end + 4 + len);
                    let answer = answers.lock().unwrap().pop_front();
                    match answer {
                        Some(a) => s.write_all(a).await.unwrap(),
                        None => return,
                    }
                    if a_closes(answer) {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn a_closes(a: Option<&[u8]>) -> bool {
    a.is_some_and(|a| {
        let s = String::from_utf8_lossy(a).to_lowercase();
        s.contains("connection: close")
    })
}

fn pool(addr: String) -> Arc<H1Pool> {
    Arc::new(H1Pool::new(
        addr,
        HeaderValue::from_static("upstream.test"),
        Duration::from_secs(2),
    ))
}

async fn call(pool: &Arc<H1Pool>, method: Method) -> Result<(u16, Bytes), String> {
    let req = Request::builder()
        .method(method)
        .uri("http://upstream.test/v2/profiles?x=1")
        .body(Bytes::from_static(b"{\"account_id\":\"a\"}"))
        .unwrap();
    let resp = pool.send(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes()))
}

#[tokio::test]
async fn answers_by_length_chunked_and_close_and_the_connection_is_reused() {
    let (addr, accepted) = upstream(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
        ])
        .await;
    let p = pool(addr);
    assert_eq!(
        call(&p, Method::POST).await.unwrap(),
        (200, Bytes::from_static(b"hello"))
    );
    assert_eq!(
        call(&p, Method::POST).await.unwrap(),
        (200, Bytes::from_static(b"abcdefg"))
    );
    assert_eq!(call(&p, Method::DELETE).await.unwrap(), (204, Bytes::new()));
    // A HEAD answer has no body whatever its length says.
    assert_eq!(call(&p, Method::HEAD).await.unwrap(), (200, Bytes::new()));
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one connection for four answers"
    );
    assert_eq!(
        call(&p, Method::GET).await.unwrap(),
        (200, Bytes::from_static(b"until the end"))
    );
    assert!(p.checkout().is_none(), "a closed connection is not pooled");
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
    // The upstream answers with keep-alive, then closes the connection anyway.
    let (addr, accepted) = upstream(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nyes",
    ])
    .await;
    let p = pool(addr);
    assert_eq!(
        call(&p, Method::POST).await.unwrap(),
        (200, Bytes::from_static(b"ok"))
    );
    // Wait until this side has seen the pooled connection's end (the peer's FIN): the
    // server task serves one more answer per connection only, so close it by a shutdown
    // of our write side, which makes the server read end-of-stream and close.
    let idle = p.checkout().unwrap();
    let std = idle.into_std().unwrap();
    std.shutdown(std::net::Shutdown::Write).unwrap();
    let idle = TcpStream::from_std(std).unwrap();
    idle.readable().await.unwrap();
    p.checkin(idle);
    // The closed connection is noticed at checkout: a new one carries the call.
    assert_eq!(
        call(&p, Method::POST).await.unwrap(),
        (200, Bytes::from_static(b"yes"))
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn malformed_oversized_or_cut_answers_are_errors_after_sending() {
    let big: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "x".repeat(5000))
            .into_bytes()
            .into_boxed_slice(),
    );
    for (answer, what) in [
        (big, "larger than"),
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx"[..],
            "Content-Length",
        ),
        (&b"NOT HTTP\r\n\r\n"[..], "malformed"),
    ] {
        let (addr, _) = upstream(vec![answer]).await;
        match pool(addr)
            .send(
                Request::post("http://upstream.test/v2/x")
                    .body(Bytes::new())
                    .unwrap(),
            )
            .await
        {
            Err(CallError::Sent(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("{what}: {:?}", other.map(|r| r.status())),
        }
    }
    // Cut mid-body: the body read fails.
    let (addr, _) = upstream(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nabc",
    ])
    .await;
    let err = call(&pool(addr), Method::POST).await.unwrap_err();
    assert!(err.contains("mid-answer"), "{err}");
    // Nothing listening: a connect error (nothing was sent).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    assert!(matches!(
        pool(dead)
            .send(Request::post("http://x/").body(Bytes::new()).unwrap())
            .await,
        Err(CallError::Connect(_))
    ));
}

#[test]
fn the_request_goes_in_one_buffer_with_its_length() {
    let req = Request::post("http://upstream.test/v2/a?b=1")
        .header("x-api-key", "k")
        .header("transfer-encoding", "chunked")
        .body(Bytes::from_static(b"{}"))
        .unwrap();
    let wire = String::from_utf8(encode(&req, &HeaderValue::from_static("upstream.test"))).unwrap();
    assert_eq!(
            wire,
            "POST /v2/a?b=1 HTTP/1.1\r\nhost: upstream.test\r\nx-api-key: k\r\ncontent-length: 2\r\n\r\n{}"
        );
    let get = Request::get("http://u/v2/credits")
        .body(Bytes::new())
        .unwrap();
    let wire = String::from_utf8(encode(&get, &HeaderValue::from_static("u"))).unwrap();
    assert_eq!(wire, "GET /v2/credits HTTP/1.1\r\nhost: u\r\n\r\n");
}
