//! The fleet ledger's reader thread: `spent_on`, `/usage` pages and totals on a connection of
//! its own, reconnecting on failure.

use std::collections::HashMap;
use std::sync::mpsc::Receiver;

use postgres::types::ToSql;
use postgres::Client;
use time::Date;

use super::super::plan::{page_keys, usage_row, usage_sql, Dialect};
use super::super::{day_key, to_u64, UsagePage, UsageQuery, UsageRow};
use super::connect::Target;
use super::{LedgerError, Read};

/// The reader thread's connection.
pub(super) struct ReadConn {
    pub(super) target: Target,
    pub(super) client: Option<Client>,
}

impl ReadConn {
    pub(super) fn run(mut self, reads: Receiver<Read>) {
        while let Ok(read) = reads.recv() {
            match read {
                Read::SpentOn(day, reply) => {
                    let _ = reply.send(self.query(|c| spent_on(c, day)));
                }
                Read::Usage {
                    q,
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(self.query(|c| usage(c, &q, after.as_deref(), limit)));
                }
                Read::Totals(reply) => {
                    let _ = reply.send(self.query(totals));
                }
            }
        }
    }

    /// Run a query, connecting first if needed; a failure on a reused connection is retried
    /// once on a fresh one.
    fn query<T>(
        &mut self,
        mut run: impl FnMut(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, LedgerError> {
        let mut fresh_retry = true;
        loop {
            let reused = self.client.is_some();
            let mut client = match self.client.take() {
                Some(c) => c,
                None => self
                    .target
                    .connect()
                    .map_err(|e| self.target.query_error(&e))?,
            };
            match run(&mut client) {
                Ok(v) => {
                    self.client = Some(client);
                    return Ok(v);
                }
                // The connection is dropped; one that had been idle may have died with a
                // server restart: try once more on a fresh one.
                Err(_) if reused && fresh_retry => fresh_retry = false,
                Err(e) => return Err(self.target.query_error(&e)),
            }
        }
    }
}

pub(super) fn spent_on(
    client: &mut Client,
    day: Date,
) -> Result<HashMap<String, u64>, postgres::Error> {
    let rows = client.query(
        "SELECT client, SUM(credits)::BIGINT FROM usage_daily_no_account WHERE day = $1 \
         GROUP BY client",
        &[&day_key(day)],
    )?;
    rows.iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, to_u64(r.try_get(1)?))))
        .collect()
}

pub(super) fn totals(client: &mut Client) -> Result<(u64, u64), postgres::Error> {
    // The aggregates are written in the rows' transaction, so they count the same.
    let r = client.query_one(
        "SELECT COALESCE(SUM(requests), 0)::BIGINT, COALESCE(SUM(credits), 0)::BIGINT \
         FROM usage_monthly_no_account",
        &[],
    )?;
    Ok((to_u64(r.try_get(0)?), to_u64(r.try_get(1)?)))
}

pub(super) fn usage(
    client: &mut Client,
    q: &UsageQuery,
    after: Option<&[String]>,
    limit: usize,
) -> Result<UsagePage, postgres::Error> {
    let limit = limit.max(1);
    let Some((by, after)) = page_keys(q, after) else {
        return Ok(UsagePage {
            rows: Vec::new(),
            next: None,
        });
    };
    let (sql, bounds) = usage_sql(
        &by,
        q.from_day,
        q.to_day,
        Dialect::POSTGRES,
        after.is_some(),
        limit,
    );
    let params: Vec<&(dyn ToSql + Sync)> = bounds
        .iter()
        .chain(after.into_iter().flatten())
        .map(|b| b as &(dyn ToSql + Sync))
        .collect();
    // At most `limit + 1` rows (the SQL's LIMIT).
    let rows = client.query(&sql, &params)?;
    let rows = rows
        .iter()
        .map(|r| {
            let keys = (0..by.len())
                .map(|i| r.try_get::<_, String>(i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(usage_row(
                &by,
                keys,
                r.try_get(by.len())?,
                r.try_get(by.len() + 1)?,
            ))
        })
        .collect::<Result<Vec<UsageRow>, postgres::Error>>()?;
    Ok(UsagePage::from_rows(rows, &by, limit))
}
