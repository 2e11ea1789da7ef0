//! The status cache in the store: Redis holds the truth with the status TTL; each replica keeps
//! a short local copy (`fleet.local_status_ttl`), dropped when another replica publishes a
//! change.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Fleet, Unavailable};
use crate::layers::status_cache::CachedStatus;

impl Fleet {
    fn status_key(&self, account: &str) -> String {
        self.key("status", account)
    }

    fn status_message(&self, account: &str) -> String {
        format!("s{}\n{account}", self.instance)
    }

    /// The account's status: the local copy when there is one, else one `GET`.
    pub async fn status_get(&self, account: &str) -> Result<Option<CachedStatus>, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        if let Some(s) = self.local_status.get(account).await {
            return Ok(s);
        }
        let epoch = self.status_epoch.load(Ordering::Acquire);
        let mut c = self.conn();
        let v: Option<String> = self
            .run(
                "status_get",
                redis::cmd("GET")
                    .arg(self.status_key(account))
                    .query_async(&mut c),
            )
            .await?;
        let s = v.as_deref().and_then(CachedStatus::from_upstream);
        // Keep it as the local copy unless a change was announced meanwhile (the answer may
        // predate it).
        if self.status_epoch.load(Ordering::Acquire) == epoch {
            self.local_status.insert(Arc::from(account), s).await;
        }
        Ok(s)
    }

    /// Remember the account's status for `ttl` on every replica.
    pub async fn status_set(
        &self,
        account: &Arc<str>,
        status: CachedStatus,
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.status_key(account))
            .arg(status.as_str())
            .arg("PX")
            .arg(ms)
            .ignore()
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(self.status_message(account))
            .ignore();
        let mut c = self.conn();
        let r = self.run("status_set", pipe.query_async::<()>(&mut c)).await;
        if r.is_ok() {
            self.local_status
                .insert(account.clone(), Some(status))
                .await;
        } else {
            self.local_status.invalidate(&**account).await;
        }
        r
    }

    /// Forget the account on every replica; true when the store held it.
    pub async fn status_forget(&self, account: &str) -> Result<bool, Unavailable> {
        self.local_status.invalidate(account).await;
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(self.status_key(account))
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(self.status_message(account))
            .ignore();
        let mut c = self.conn();
        let (n,): (u64,) = self.run("status_forget", pipe.query_async(&mut c)).await?;
        Ok(n > 0)
    }

    /// Drop this replica's local copy of an account's status (tests, admin).
    pub async fn status_drop_local(&self, account: &str) {
        self.local_status.invalidate(account).await;
    }
}
