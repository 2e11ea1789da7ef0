//! Idempotency-Key fates shared by the replicas (`crate::idempotency`): one Redis key per
//! client and Idempotency-Key, claimed with `SET NX PX GET` (the replica that sets it leads
//! the first attempt; the others read what is there), and the fate written over it. Expiry is
//! Redis's (`idempotency.ttl`).

use std::time::Duration;

use super::{Fleet, Unavailable};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Fleet {
    /// The store's key of `client`'s Idempotency-Key (the client name's length first, so two
    /// clients' keys can never spell the same key).
    pub fn idempotency_key(&self, client: &str, key: &str) -> String {
        self.key("idem", &format!("{}:{client}:{key}", client.len()))
    }

    /// Claim `k` with `value` for `ttl`: `None` when this replica now holds it, else the value
    /// already there.
    pub async fn idempotency_claim(
        &self,
        k: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, Unavailable> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(k)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .arg("GET");
        let mut c = self.conn();
        self.run("idempotency", cmd.query_async(&mut c)).await
    }

    /// The value of `k`, if any.
    pub async fn idempotency_get(&self, k: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        let mut c = self.conn();
        self.run("idempotency", redis::cmd("GET").arg(k).query_async(&mut c))
            .await
    }

    /// Write `value` over `k` for `ttl`.
    pub async fn idempotency_put(
        &self,
        k: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let mut c = self.conn();
        self.run(
            "idempotency",
            redis::cmd("SET")
                .arg(k)
                .arg(value)
                .arg("PX")
                .arg(ms(ttl))
                .query_async::<()>(&mut c),
        )
        .await
    }

    /// Forget `k` (nothing happened upstream: the key is free again).
    pub async fn idempotency_del(&self, k: &str) -> Result<(), Unavailable> {
        let mut c = self.conn();
        self.run(
            "idempotency",
            redis::cmd("DEL").arg(k).query_async::<()>(&mut c),
        )
        .await
    }
}
