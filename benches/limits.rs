//! The cost of one rate-limit check with 100k and 1M tracked accounts, and the memory each
//! tracked account costs (a counting allocator measures it).
//!
//!     cargo bench --bench limits

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use linkup_gateway::config::parse_quota;
use linkup_gateway::limits::{Limiter, Subject};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// 24-hex account ids, like the upstream's.
fn accounts(n: usize) -> Vec<Subject> {
    (0..n)
        .map(|i| Subject::Account(Arc::from(format!("{:024x}", i as u128 * 2654435761))))
        .collect()
}

fn bench_limits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("account_limit_check");
    for n in [100_000usize, 1_000_000] {
        let subjects = accounts(n);
        let limiter = Limiter::new("account", parse_quota("1000000/sec").unwrap(), 1000);
        let before = LIVE.load(Ordering::Relaxed);
        for s in &subjects {
            limiter.check(s);
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        // The ids themselves are owned by the caller's request context, not by the limiter.
        println!(
            "{n} tracked accounts: {} bytes per account in the limiter (excluding the id string, shared with the request)",
            bytes / n as isize
        );
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 7919) % n;
                limiter.check(&subjects[i])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_limits);
criterion_main!(benches);
