//! Timeouts on the data plane without a tokio timer each.
//!
//! Every request carried three tokio timers (the keep-alive wait for it, the whole-request
//! timeout, the upstream call's bound), each one a timer-wheel entry behind the driver's lock
//! and, as measured (`perf record -e syscalls:sys_enter_write -g`), an `eventfd` write to wake
//! the worker's own reactor from `Sleep::poll`: two syscalls per request for timers that
//! almost never fire. nginx keeps one timer tree per worker and no syscall per timer; this is
//! the same idea in its simplest form.
//!
//! On a data-plane worker (a `current_thread` runtime, see [`crate::workers`]) a [`Timeout`]
//! registers in its thread's [`Wheel`]: one FIFO queue per distinct duration, so that a queue's
//! deadlines only grow and registration is a push, plus a slab of live entries that a finished
//! future removes in O(1). One driver task per worker sleeps until the earliest deadline,
//! rounded up to a [`TICK`], and wakes what has expired. Off the workers (the main runtime,
//! unit tests, paused clocks alike) it is `tokio::time::timeout` as before. Time is tokio's, so
//! `tokio::time::pause` holds either way.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;

/// How late a timeout may fire: expiries within one tick are woken together.
pub const TICK: Duration = Duration::from_millis(10);

/// Distinct durations a worker's wheel keeps a queue for; a further one uses a tokio timer.
const MAX_QUEUES: usize = 8;

/// The future passed its deadline first.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

struct Entry {
    gen: u64,
    fired: bool,
    waker: Option<Waker>,
}

/// One duration's deadlines in order, as `(deadline, key, gen)`.
type Queue = VecDeque<(Instant, usize, u64)>;

/// One worker's timeouts.
struct Wheel {
    /// Unique per wheel: a future dropped on another thread leaves this wheel alone.
    id: u64,
    next_gen: u64,
    entries: Slab<Entry>,
    /// Per duration, `(deadline, key, gen)` in deadline order; entries whose future finished
    /// stay until they reach the front or a compaction.
    queues: Vec<(Duration, Queue)>,
    queued: usize,
    driver: Option<Waker>,
    driver_alive: bool,
    /// When the driver's sleep ends (`None`: it waits for a registration).
    driver_at: Option<Instant>,
    base: Instant,
}

thread_local! {
    static WHEEL: RefCell<Option<Wheel>> = const { RefCell::new(None) };
}

static NEXT_WHEEL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Wheel {
    fn new() -> Wheel {
        Wheel {
            id: NEXT_WHEEL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            next_gen: 0,
            entries: Slab::new(),
            queues: Vec::new(),
            queued: 0,
            driver: None,
            driver_alive: false,
            driver_at: None,
            base: Instant::now(),
        }
    }

    /// `at` rounded up to the wheel's next tick.
    fn tick_of(&self, at: Instant) -> Instant {
        let since = at.saturating_duration_since(self.base).as_nanos();
        let tick = TICK.as_nanos();
        let ticks = since.div_ceil(tick);
        let nanos = u64::try_from(ticks.saturating_mul(tick)).unwrap_or(u64::MAX);
        self.base + Duration::from_nanos(nanos)
    }

    /// Registers a deadline `dur` from now; `None` when this wheel keeps no queue for it.
    fn register(&mut self, dur: Duration, waker: &Waker) -> Option<(usize, u64)> {
        let q = match self.queues.iter().position(|(d, _)| *d == dur) {
            Some(q) => q,
            None if self.queues.len() < MAX_QUEUES => {
                self.queues.push((dur, VecDeque::new()));
                self.queues.len() - 1
            }
            None => return None,
        };
        let deadline = Instant::now() + dur;
        self.next_gen += 1;
        let gen = self.next_gen;
        let key = self.entries.insert(Entry {
            gen,
            fired: false,
            waker: Some(waker.clone()),
        });
        let queue = &mut self.queues[q].1;
        let was_empty = queue.is_empty();
        queue.push_back((deadline, key, gen));
        self.queued += 1;
        if was_empty {
            let at = self.tick_of(deadline);
            if self.driver_at.is_none_or(|d| at < d) {
                if let Some(driver) = &self.driver {
                    driver.wake_by_ref();
                }
            }
        }
        if self.queued > 2 * self.entries.len() + 1024 {
            self.compact();
        }
        Some((key, gen))
    }

    /// Drops the queue entries of futures that have finished.
    fn compact(&mut self) {
        let entries = &self.entries;
        for (_, queue) in &mut self.queues {
            queue.retain(|&(_, key, gen)| entries.get(key).is_some_and(|e| e.gen == gen));
        }
        self.queued = self.queues.iter().map(|(_, q)| q.len()).sum();
    }

    /// Wakes every expired future; returns the earliest deadline still pending.
    fn fire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for (_, queue) in &mut self.queues {
            while let Some(&(deadline, key, gen)) = queue.front() {
                let live = self.entries.get_mut(key).filter(|e| e.gen == gen);
                match live {
                    None => {}
                    Some(e) if deadline <= now => {
                        e.fired = true;
                        if let Some(w) = e.waker.take() {
                            w.wake();
                        }
                    }
                    Some(_) => {
                        next = Some(next.map_or(deadline, |n| n.min(deadline)));
                        break;
                    }
                }
                queue.pop_front();
                self.queued -= 1;
            }
        }
        next
    }
}

/// The driver of this thread's wheel `id`: sleeps to the earliest deadline and fires it.
async fn drive(id: u64) {
    struct Alive(u64);
    impl Drop for Alive {
        fn drop(&mut self) {
            let _ = WHEEL.try_with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    if let Some(w) = w.as_mut().filter(|w| w.id == self.0) {
                        w.driver_alive = false;
                        w.driver = None;
                        w.driver_at = None;
                    }
                }
            });
        }
    }
    let _alive = Alive(id);
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    std::future::poll_fn(|cx| loop {
        let next = WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            let w = w.as_mut().filter(|w| w.id == id)?;
            if !w.driver.as_ref().is_some_and(|d| d.will_wake(cx.waker())) {
                w.driver = Some(cx.waker().clone());
            }
            let at = w.fire(Instant::now()).map(|d| w.tick_of(d));
            w.driver_at = at;
            Some(at)
        });
        let Some(next) = next else {
            // The wheel is gone (its thread is ending): so is this driver.
            return Poll::Ready(());
        };
        let Some(at) = next else {
            return Poll::Pending;
        };
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
    })
    .await
}

/// Where a [`Timeout`] keeps its deadline.
enum Timer {
    /// Not polled yet.
    Unset,
    /// In this thread's wheel.
    Wheel { wheel: u64, key: usize, gen: u64 },
    /// Off the data plane, or past the wheel's queues.
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

pin_project_lite::pin_project! {
    /// `fut`, or [`Elapsed`] once `dur` has passed (up to a [`TICK`] late on a worker).
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        dur: Duration,
        timer: Timer,
    }

    impl<F> PinnedDrop for Timeout<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Timer::Wheel { wheel, key, gen } = *this.timer {
                remove(wheel, key, gen);
            }
        }
    }
}

/// Bounds `fut` by `dur` (see the module's documentation for where the timer lives).
pub fn timeout<F: Future>(dur: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        dur,
        timer: Timer::Unset,
    }
}

fn remove(wheel: u64, key: usize, gen: u64) {
    let _ = WHEEL.try_with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            if let Some(w) = w.as_mut().filter(|w| w.id == wheel) {
                if w.entries.get(key).is_some_and(|e| e.gen == gen) {
                    w.entries.remove(key);
                }
            }
        }
    });
}

/// Registers on this thread's wheel if it is a data-plane worker's.
fn register(dur: Duration, waker: &Waker) -> Option<Timer> {
    crate::workers::current()?;
    WHEEL
        .try_with(|w| {
            let mut w = w.try_borrow_mut().ok()?;
            let w = w.get_or_insert_with(Wheel::new);
            let (key, gen) = w.register(dur, waker)?;
            if !w.driver_alive {
                w.driver_alive = true;
                tokio::spawn(drive(w.id));
            }
            Some(Timer::Wheel {
                wheel: w.id,
                key,
                gen,
            })
        })
        .ok()
        .flatten()
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            if let Timer::Wheel { wheel, key, gen } = *this.timer {
                remove(wheel, key, gen);
                *this.timer = Timer::Unset;
            }
            return Poll::Ready(Ok(out));
        }
        if let Timer::Unset = this.timer {
            *this.timer = register(*this.dur, cx.waker())
                .unwrap_or_else(|| Timer::Tokio(Box::pin(tokio::time::sleep(*this.dur))));
        }
        match this.timer {
            Timer::Unset => Poll::Pending,
            Timer::Tokio(sleep) => match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
                Poll::Pending => Poll::Pending,
            },
            Timer::Wheel { wheel, key, gen } => {
                let (wheel, key, gen) = (*wheel, *key, *gen);
                let fired = WHEEL
                    .try_with(|w| {
                        let mut w = w.try_borrow_mut().ok()?;
                        let e = w
                            .as_mut()
                            .filter(|w| w.id == wheel)?
                            .entries
                            .get_mut(key)
                            .filter(|e| e.gen == gen)?;
                        if !e.fired && !e.waker.as_ref().is_some_and(|x| x.will_wake(cx.waker())) {
                            e.waker = Some(cx.waker().clone());
                        }
                        Some(e.fired)
                    })
                    .ok()
                    .flatten();
                match fired {
                    Some(false) => Poll::Pending,
                    // Fired, or its wheel is gone (polled from another thread): elapsed
                    // rather than never.
                    Some(true) | None => Poll::Ready(Err(Elapsed)),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A worker-like thread: a current_thread runtime marked as data-plane worker 0.
    fn on_worker<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        crate::workers::mark_for_test(0);
        rt.block_on(f)
    }

    fn queued() -> (usize, usize) {
        WHEEL.with(|w| {
            w.borrow()
                .as_ref()
                .map_or((0, 0), |w| (w.entries.len(), w.queued))
        })
    }

    #[test]
    fn a_future_that_finishes_in_time_is_its_own_answer_and_leaves_nothing_behind() {
        std::thread::spawn(|| {
            on_worker(async {
                let out = timeout(Duration::from_secs(30), async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    7
                })
                .await;
                assert_eq!(out, Ok(7));
                assert_eq!(queued().0, 0, "the finished future's entry is removed");
            })
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_future_past_its_deadline_is_elapsed_within_a_tick() {
        std::thread::spawn(|| {
            on_worker(async {
                let start = Instant::now();
                let out = timeout(Duration::from_secs(2), std::future::pending::<()>()).await;
                assert_eq!(out, Err(Elapsed));
                let took = start.elapsed();
                assert!(took >= Duration::from_secs(2), "{took:?}");
                assert!(took <= Duration::from_secs(2) + TICK, "{took:?}");
            })
        })
        .join()
        .unwrap();
    }

    #[test]
    fn many_durations_and_dropped_futures_keep_the_wheel_bounded() {
        std::thread::spawn(|| {
            on_worker(async {
                // Durations beyond the wheel's queues still time out (on tokio's timers).
                let mut set = tokio::task::JoinSet::new();
                for i in 0..(MAX_QUEUES as u64 + 4) {
                    set.spawn(timeout(
                        Duration::from_secs(1 + i),
                        std::future::pending::<()>(),
                    ));
                }
                let mut elapsed = 0;
                while let Some(r) = set.join_next().await {
                    assert_eq!(r.unwrap(), Err(Elapsed));
                    elapsed += 1;
                }
                assert_eq!(elapsed, MAX_QUEUES + 4);
                // Thousands of futures that finish at once leave no live entry, and the
                // queue of their deadlines is compacted rather than kept for 30 s.
                for _ in 0..10_000 {
                    let fut = timeout(Duration::from_secs(30), tokio::task::yield_now());
                    assert_eq!(fut.await, Ok(()));
                }
                let (live, queued) = queued();
                assert_eq!(live, 0);
                assert!(queued <= 1024 + 1, "{queued} deadlines kept");
            })
        })
        .join()
        .unwrap();
    }

    #[test]
    fn off_the_workers_it_is_tokios_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let out = timeout(Duration::from_secs(5), std::future::pending::<()>()).await;
            assert_eq!(out, Err(Elapsed));
            assert_eq!(queued(), (0, 0), "no wheel off the data plane");
        });
    }
}
