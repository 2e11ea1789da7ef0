//! Which account a webhook belongs to. A webhook's routes name only its id
//! (`/v2/webhooks/{id}/...`), so a client scoped to some accounts could otherwise stop, delete
//! or rotate the secret of another account's webhook. The gateway learns the owner from every
//! answer that shows one (create, list, by-id answers, whoever the caller) and, for an id it
//! has not seen, asks the upstream's list once (`scope`).

use std::sync::Arc;

use serde::Deserialize;

/// The most webhook owners remembered; beyond it the least used are forgotten and asked again.
const MAX_WEBHOOKS: u64 = 65_536;

pub struct WebhookOwners {
    owners: moka::future::Cache<Arc<str>, Arc<str>>,
}

impl Default for WebhookOwners {
    fn default() -> Self {
        WebhookOwners {
            owners: moka::future::Cache::new(MAX_WEBHOOKS),
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    data: Option<Data>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Data {
    List { items: Vec<Item> },
    One(Item),
}

#[derive(Deserialize)]
struct Item {
    webhook_id: Option<String>,
    account_id: Option<String>,
}

impl WebhookOwners {
    /// The account of webhook `id`, when known.
    pub async fn owner(&self, id: &str) -> Option<Arc<str>> {
        self.owners.get(id).await
    }

    /// Remember every (webhook, account) pair a webhook answer shows: `data` itself (create,
    /// update, start/stop) or each of `data.items` (list). Anything else teaches nothing.
    pub async fn learn(&self, body: &[u8]) {
        let Ok(Answer { data: Some(data) }) = serde_json::from_slice::<Answer>(body) else {
            return;
        };
        let items = match data {
            Data::List { items } => items,
            Data::One(item) => vec![item],
        };
        for item in items {
            if let (Some(w), Some(a)) = (item.webhook_id, item.account_id) {
                self.owners.insert(Arc::from(w), Arc::from(a)).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn learns_owners_from_one_webhook_or_a_list_and_nothing_else() {
        let o = WebhookOwners::default();
        o.learn(br#"{"success":true,"data":{"webhook_id":"wh_1","account_id":"a"}}"#)
            .await;
        o.learn(
            br#"{"data":{"items":[{"webhook_id":"wh_2","account_id":"b"},{"webhook_id":"wh_3"}],"total":2}}"#,
        )
        .await;
        o.learn(br#"{"data":{"webhook_id":"wh_4","secret":"whsec_x"}}"#)
            .await;
        o.learn(b"<html>").await;
        assert_eq!(o.owner("wh_1").await.as_deref(), Some("a"));
        assert_eq!(o.owner("wh_2").await.as_deref(), Some("b"));
        assert_eq!(o.owner("wh_3").await, None);
        assert_eq!(o.owner("wh_4").await, None);
    }
}
