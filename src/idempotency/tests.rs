//! Unit tests of `idempotency`, in a file of their own to keep the module short.

#![allow(clippy::unwrap_used)]

use super::*;

const KEEP: Keep = Keep {
    ttl: Duration::from_secs(60),
    max_keys: 1000,
    in_flight_for: Duration::from_secs(30),
};

fn stored() -> Fate {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("content-length", HeaderValue::from_static("2"));
    Fate::Done(Arc::new(Stored::of(StatusCode::OK, &h, &Bytes::from("{}"))))
}

async fn walk(store: Arc<IdempotencyStore>) {
    let c: Arc<str> = Arc::from("crm");
    let fp = fingerprint(&http::Method::POST, "/v2/messages", b"{}");
    let Begin::Lead(lead) = store.begin(&c, "k1", fp, KEEP).await.unwrap() else {
        panic!("first is the lead")
    };
    let Begin::Wait(mut rx) = store.begin(&c, "k1", fp, KEEP).await.unwrap() else {
        panic!("a repeat waits")
    };
    assert!(matches!(
        store.begin(&c, "k1", [1; 32], KEEP).await.unwrap(),
        Begin::Mismatch
    ));
    lead.finish(stored()).await;
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), Some(stored()));
    let Begin::Seen(Fate::Done(s)) = store.begin(&c, "k1", fp, KEEP).await.unwrap() else {
        panic!("replayed")
    };
    assert_eq!(s.header_map()["content-type"], "application/json");
    assert!(!s.header_map().contains_key("content-length"));
    // Another client's same key is its own.
    assert!(matches!(
        store
            .begin(&Arc::from("other"), "k1", fp, KEEP)
            .await
            .unwrap(),
        Begin::Lead(_)
    ));
    // Released: the key is free again.
    let Begin::Lead(lead) = store.begin(&c, "k2", fp, KEEP).await.unwrap() else {
        panic!()
    };
    lead.finish(Fate::Released).await;
    assert!(matches!(
        store.begin(&c, "k2", fp, KEEP).await.unwrap(),
        Begin::Lead(_)
    ));
    // A lead dropped untold is unknown.
    let Begin::Lead(lead) = store.begin(&c, "k3", fp, KEEP).await.unwrap() else {
        panic!()
    };
    drop(lead);
    tokio::task::yield_now().await;
    let mut seen = None;
    for _ in 0..100 {
        if let Begin::Seen(f) = store.begin(&c, "k3", fp, KEEP).await.unwrap() {
            seen = Some(f);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(seen, Some(Fate::Unknown));
}

#[tokio::test]
async fn first_waits_replays_mismatches_and_unknowns_in_memory() {
    walk(Arc::new(IdempotencyStore::in_memory())).await;
}

#[tokio::test]
async fn the_same_in_sqlite_and_it_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let store = Arc::new(IdempotencyStore::sqlite(&path).unwrap());
    walk(store.clone()).await;
    drop(store);
    let again = Arc::new(IdempotencyStore::sqlite(&path).unwrap());
    let fp = fingerprint(&http::Method::POST, "/v2/messages", b"{}");
    assert!(matches!(
        again
            .begin(&Arc::from("crm"), "k1", fp, KEEP)
            .await
            .unwrap(),
        Begin::Seen(Fate::Done(_))
    ));
    // A row left in flight by a stopped gateway reads as unknown.
    let Begin::Lead(lead) = again
        .begin(&Arc::from("crm"), "k9", fp, KEEP)
        .await
        .unwrap()
    else {
        panic!()
    };
    std::mem::forget(lead);
    let third = Arc::new(IdempotencyStore::sqlite(&path).unwrap());
    assert!(matches!(
        third
            .begin(&Arc::from("crm"), "k9", fp, KEEP)
            .await
            .unwrap(),
        Begin::Seen(Fate::Unknown)
    ));
}

#[tokio::test]
async fn a_flood_of_keys_is_bounded() {
    let store = Arc::new(IdempotencyStore::in_memory());
    let c: Arc<str> = Arc::from("crm");
    for i in 0..200 {
        if let Begin::Lead(l) = store
            .begin(&c, &format!("k{i}"), [0; 32], KEEP)
            .await
            .unwrap()
        {
            l.finish(Fate::DoneUnreplayable).await;
        }
    }
    assert_eq!(store.keys_kept().await, 200);
    store.purge(50).await.unwrap();
    assert_eq!(store.keys_kept().await, 50);
}

#[test]
fn keys_are_short_and_printable() {
    assert!(check_key(&HeaderValue::from_static("abc-123_X")).is_ok());
    assert!(check_key(&HeaderValue::from_static("")).is_err());
    assert!(check_key(&HeaderValue::from_str(&"x".repeat(256)).unwrap()).is_err());
    assert!(check_key(&HeaderValue::from_bytes(b"a\tb").unwrap()).is_err());
}
