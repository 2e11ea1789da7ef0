//! The data plane's workers: one single-threaded tokio runtime per core, each accepting on the
//! same listening socket and running every request of the connections it accepted to the end.
//!
//! A connection, its requests, its upstream call (on the worker's own upstream pool, see
//! [`crate::upstream::UpstreamClient`]) and the answer all stay on one thread: no work
//! stealing, no cross-thread wake-up per request. This is the shape of Envoy's workers and of
//! pingora's no-steal runtime. Shared state (limits, budgets, cache, ledger) is the same for
//! every worker; background work (admin listener, reconciliation, the ledger's own threads)
//! stays on the main runtime.
//!
//! Each worker accepts on a listening socket of its own, all in one `SO_REUSEPORT` group on
//! Linux (see `server::bind_data`): the kernel spreads connections evenly over the workers.

use std::cell::Cell;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch};

use crate::server::Generation;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the data-plane worker this thread is, if it is one.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Start a worker per listener and wait until every one accepts; each then answers on its
/// channel once it has drained.
pub(crate) async fn start(
    listeners: Vec<std::net::TcpListener>,
    current: &Arc<ArcSwap<Generation>>,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<Vec<oneshot::Receiver<()>>> {
    let mut done = Vec::with_capacity(listeners.len());
    let mut ready = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let current = current.clone();
        let shutdown = shutdown.clone();
        let (tx, rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel::<std::io::Result<()>>();
        std::thread::Builder::new()
            .name(format!("lgw-worker-{index}"))
            .spawn(move || {
                INDEX.with(|i| i.set(Some(index)));
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            crate::server::serve_data(l, current.clone(), shutdown).await
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                    // Calls whose callers hung up run on tasks of this runtime: they are
                    // recorded before it goes, within the grace.
                    let grace = current.load().shared.settings.server.shutdown_grace;
                    let until = tokio::time::Instant::now() + grace;
                    while crate::detach::in_flight() > 0 && tokio::time::Instant::now() < until {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                });
                let _ = tx.send(());
            })?;
        done.push(rx);
        ready.push(ready_rx);
    }
    for r in ready {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::Error::other("a worker stopped while starting")),
        }
    }
    Ok(done)
}

/// Tests: make this thread count as data-plane worker `index`.
#[cfg(test)]
pub(crate) fn mark_for_test(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}
