//! Daily credit budgets per client: reserve before forwarding, settle when the answer comes.
//!
//! One counter per client holds spent + reserved credits for the current UTC day; a reservation
//! is a compare-and-add under a short per-client lock, so 100 concurrent requests against a
//! budget of 10 forward exactly 10. Budgets live as long as the process (a reload keeps them)
//! and are restored from the ledger at startup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Days since the Unix epoch, UTC: the budget period.
pub fn utc_day(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(86_400_000)
}

pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[derive(Debug, Default)]
struct Day {
    day: i64,
    /// Credits settled today (what the upstream reported; ambiguous answers count their
    /// reservation until reconciliation).
    spent: u64,
    /// Credits reserved by requests in flight.
    reserved: u64,
}

impl Day {
    fn roll(&mut self, today: i64) {
        if self.day != today {
            self.day = today;
            self.spent = 0;
            // Reservations of requests still in flight across midnight stay held.
        }
    }
}

#[derive(Debug, Default)]
pub struct Budgets {
    clients: RwLock<HashMap<Arc<str>, Arc<Mutex<Day>>>>,
}

/// A refusal: the budget cannot cover the cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub spent: u64,
    pub reserved: u64,
    pub budget: u64,
}

/// Spent and reserved credits of one client today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Standing {
    pub spent: u64,
    pub reserved: u64,
}

impl Budgets {
    fn day_of(&self, client: &Arc<str>) -> Arc<Mutex<Day>> {
        if let Ok(m) = self.clients.read() {
            if let Some(d) = m.get(client) {
                return d.clone();
            }
        }
        match self.clients.write() {
            Ok(mut m) => m.entry(client.clone()).or_default().clone(),
            Err(_) => Arc::new(Mutex::new(Day::default())),
        }
    }

    /// Restore today's spending (from the ledger) at startup.
    pub fn restore(&self, spent_today: &HashMap<String, u64>, today: i64) {
        for (client, spent) in spent_today {
            let day = self.day_of(&Arc::from(client.as_str()));
            if let Ok(mut d) = day.lock() {
                d.day = today;
                d.spent = *spent;
            };
        }
    }

    /// Reserve `cost` against `budget` (None: unlimited, only tracked). With `enforce` false
    /// (shadow) a reservation over the budget is still taken, and reported.
    pub fn reserve(
        &self,
        client: &Arc<str>,
        cost: u64,
        budget: Option<u64>,
        enforce: bool,
        today: i64,
    ) -> Result<(), Exceeded> {
        let day = self.day_of(client);
        let Ok(mut d) = day.lock() else {
            return Ok(());
        };
        d.roll(today);
        if let Some(budget) = budget {
            let committed = d.spent.saturating_add(d.reserved);
            if committed.saturating_add(cost) > budget {
                let e = Exceeded {
                    spent: d.spent,
                    reserved: d.reserved,
                    budget,
                };
                if enforce {
                    return Err(e);
                }
                d.reserved = d.reserved.saturating_add(cost);
                return Err(e);
            }
        }
        d.reserved = d.reserved.saturating_add(cost);
        Ok(())
    }

    /// Replace a reservation by what was charged (`charged` None: released, nothing charged).
    pub fn settle(&self, client: &Arc<str>, reserved: u64, charged: u64, today: i64) {
        let day = self.day_of(client);
        if let Ok(mut d) = day.lock() {
            d.roll(today);
            d.reserved = d.reserved.saturating_sub(reserved);
            d.spent = d.spent.saturating_add(charged);
        };
    }

    pub fn standing(&self, client: &Arc<str>, today: i64) -> Standing {
        let day = self.day_of(client);
        let Ok(mut d) = day.lock() else {
            return Standing::default();
        };
        d.roll(today);
        Standing {
            spent: d.spent,
            reserved: d.reserved,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let b = Arc::new(Budgets::default());
        let client: Arc<str> = Arc::from("c");
        let ok = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..100 {
                s.spawn(|| {
                    if b.reserve(&client, 1, Some(10), true, 1).is_ok() {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(ok.into_inner(), 10);
        assert_eq!(
            b.standing(&client, 1),
            Standing {
                spent: 0,
                reserved: 10
            }
        );
    }

    #[test]
    fn settle_replaces_the_reservation_and_the_day_rolls_over() {
        let b = Budgets::default();
        let c: Arc<str> = Arc::from("c");
        b.reserve(&c, 3, Some(5), true, 1).unwrap();
        b.settle(&c, 3, 1, 1);
        assert_eq!(
            b.standing(&c, 1),
            Standing {
                spent: 1,
                reserved: 0
            }
        );
        assert!(b.reserve(&c, 4, Some(5), true, 1).is_ok());
        assert!(b.reserve(&c, 1, Some(5), true, 1).is_err());
        b.settle(&c, 4, 4, 1);
        // Next UTC day: spent resets.
        assert_eq!(
            b.standing(&c, 2),
            Standing {
                spent: 0,
                reserved: 0
            }
        );
        assert!(b.reserve(&c, 5, Some(5), true, 2).is_ok());
    }

    #[test]
    fn shadow_reserves_but_reports() {
        let b = Budgets::default();
        let c: Arc<str> = Arc::from("c");
        assert!(b.reserve(&c, 2, Some(1), false, 1).is_err());
        assert_eq!(
            b.standing(&c, 1).reserved,
            2,
            "shadow still tracks the reservation"
        );
    }

    #[test]
    fn restore_sets_todays_spending() {
        let b = Budgets::default();
        let mut m = HashMap::new();
        m.insert("c".to_string(), 7u64);
        b.restore(&m, 3);
        let c: Arc<str> = Arc::from("c");
        assert_eq!(b.standing(&c, 3).spent, 7);
        assert!(b.reserve(&c, 4, Some(10), true, 3).is_err());
    }

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), 0);
        assert_eq!(utc_day(86_399_999), 0);
        assert_eq!(utc_day(86_400_000), 1);
        assert_eq!(utc_day(-1), -1);
    }
}
