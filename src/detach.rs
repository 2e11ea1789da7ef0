//! A future that runs in its caller's task and moves to a task of its own only if the caller
//! goes away.
//!
//! An upstream call belongs to no caller: once sent it must complete and be recorded, even when
//! the caller hangs up or the whole-request timeout answers 504 first. Spawning every call on a
//! task of its own gives that, at the price of two cross-thread hand-offs per request (spawn,
//! then the join handle's wake-up). [`Detach`] keeps the normal path on the caller's task and
//! pays for a spawn only when the future is dropped unfinished: its `Drop` hands the rest of
//! the work to `tokio::spawn` (pingora and linkerd2-proxy keep the request path on one task
//! the same way).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// Calls handed to a task of their own and not finished yet: a data-plane worker draining at
/// shutdown keeps its runtime alive until this is 0 (or the grace passes), so a caller's
/// hang-up just before shutdown still gets its call recorded.
static DETACHED: AtomicUsize = AtomicUsize::new(0);

/// How many detached calls are still running, process-wide.
pub fn in_flight() -> usize {
    DETACHED.load(Ordering::Acquire)
}

/// Counts one detached call from spawn to end (or to its task being dropped).
struct Counted;

impl Counted {
    fn new() -> Counted {
        DETACHED.fetch_add(1, Ordering::AcqRel);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        DETACHED.fetch_sub(1, Ordering::AcqRel);
    }
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Polls `fut` in place; if dropped before it completes, spawns it to run to the end.
pub struct Detach<T: Send + 'static> {
    fut: Option<Boxed<T>>,
}

impl<T: Send + 'static> Detach<T> {
    pub fn new(fut: impl Future<Output = T> + Send + 'static) -> Detach<T> {
        Detach {
            fut: Some(Box::pin(fut)),
        }
    }
}

impl<T: Send + 'static> Future for Detach<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(fut) = self.fut.as_mut() else {
            // Polled after completion: a contract breach of the caller; never resolves again.
            return Poll::Pending;
        };
        let out = fut.as_mut().poll(cx);
        if out.is_ready() {
            self.fut = None;
        }
        out
    }
}

impl<T: Send + 'static> Drop for Detach<T> {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            // Outside a runtime (its shutdown) there is nothing left to run the call on.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let counted = Counted::new();
                rt.spawn(async move {
                    let out = fut.await;
                    drop(counted);
                    out
                });
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn completes_in_place_when_polled_to_the_end() {
        assert_eq!(Detach::new(async { 7 }).await, 7);
    }

    #[tokio::test]
    async fn a_dropped_future_runs_to_the_end_on_its_own_task() {
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let mut d = Detach::new(async move {
            let _ = wait.await;
            f.store(true, Ordering::SeqCst);
            let _ = done_tx.send(());
        });
        // Started in the caller's task, then the caller goes away.
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut d).poll(cx).is_pending())).await;
        assert!(pending);
        drop(d);
        assert!(!finished.load(Ordering::SeqCst));
        // Counted while it runs on its own, so a draining worker waits for it.
        assert!(in_flight() >= 1);
        release.send(()).unwrap();
        done_rx.await.unwrap();
        assert!(finished.load(Ordering::SeqCst));
        while in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    }
}
