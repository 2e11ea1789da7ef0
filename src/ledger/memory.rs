//! An in-memory ledger: for unit tests of single layers and for benches that measure the stack
//! without disk I/O. Not durable; never used by `serve`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use time::Date;

use super::{day_key, day_of, GroupBy, Ledger, LedgerError, Row, UsagePage, UsageQuery, UsageRow};
use crate::util::BoxFuture;

#[derive(Debug, Default)]
pub struct MemoryLedger {
    rows: Mutex<Vec<Row>>,
}

impl MemoryLedger {
    pub fn rows(&self) -> Vec<Row> {
        self.rows.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Ledger for MemoryLedger {
    fn record(&self, row: Row) -> BoxFuture<Result<(), LedgerError>> {
        let r = match self.rows.lock() {
            Ok(mut rows) => {
                rows.push(row);
                Ok(())
            }
            Err(_) => Err(LedgerError::WriterGone),
        };
        Box::pin(async move { r })
    }

    fn spent_on(&self, day: Date) -> Result<HashMap<String, u64>, LedgerError> {
        let mut out = HashMap::new();
        for r in self.rows().iter().filter(|r| day_of(r.at_ms) == day) {
            *out.entry(r.client.to_string()).or_default() += r.credits;
        }
        Ok(out)
    }

    fn usage_page(
        &self,
        q: &UsageQuery,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<UsagePage, LedgerError> {
        let limit = limit.max(1);
        let mut groups: BTreeMap<Vec<String>, (u64, u64)> = BTreeMap::new();
        for r in self.rows() {
            let day = day_of(r.at_ms);
            if day < q.from_day || day > q.to_day {
                continue;
            }
            let key =
                q.by.iter()
                    .map(|g| match g {
                        GroupBy::Client => r.client.to_string(),
                        GroupBy::Account => r.account_id.as_deref().unwrap_or("").to_owned(),
                        GroupBy::Action => r.action.as_deref().unwrap_or("").to_owned(),
                        GroupBy::Day => day_key(day),
                        GroupBy::Outcome => r.outcome.as_str().to_owned(),
                    })
                    .collect();
            let e = groups.entry(key).or_default();
            e.0 += 1;
            e.1 += r.credits;
        }
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Unbounded,
        };
        let rows = groups
            .range((start, std::ops::Bound::Unbounded))
            .take(limit + 1)
            .map(|(key, &(requests, credits))| {
                let mut row = UsageRow {
                    client: None,
                    account: None,
                    action: None,
                    day: None,
                    outcome: None,
                    requests,
                    credits,
                };
                for (g, v) in q.by.iter().zip(key) {
                    let slot = match g {
                        GroupBy::Client => &mut row.client,
                        GroupBy::Account => &mut row.account,
                        GroupBy::Action => &mut row.action,
                        GroupBy::Day => &mut row.day,
                        GroupBy::Outcome => &mut row.outcome,
                    };
                    *slot = Some(v.clone());
                }
                row
            })
            .collect();
        Ok(UsagePage::from_rows(rows, &q.by, limit))
    }

    fn flush(&self) -> BoxFuture<Result<(), LedgerError>> {
        Box::pin(async { Ok(()) })
    }

    fn totals(&self) -> Result<(u64, u64), LedgerError> {
        let rows = self.rows();
        Ok((rows.len() as u64, rows.iter().map(|r| r.credits).sum()))
    }
}
