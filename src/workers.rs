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
//! The workers share one listening socket (each holds a duplicate of its descriptor) instead
//! of `SO_REUSEPORT` sockets of their own: the kernel hands each new connection to whichever
//! worker accepts first (an idle one, usually), and a second process can never bind the same
//! port by accident and take half the traffic.

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

/// Start `n` workers on `listener`; each answers on its channel once it has drained.
pub(crate) fn start(
    n: usize,
    listener: std::net::TcpListener,
    current: &Arc<ArcSwap<Generation>>,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<Vec<oneshot::Receiver<()>>> {
    let mut done = Vec::with_capacity(n);
    for index in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = listener.try_clone()?;
        let current = current.clone();
        let shutdown = shutdown.clone();
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("lgw-worker-{index}"))
            .spawn(move || {
                INDEX.with(|i| i.set(Some(index)));
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => crate::server::serve_data(l, current.clone(), shutdown).await,
                        Err(e) => tracing::error!(worker = index, error = %e, "cannot accept"),
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
    }
    Ok(done)
}
