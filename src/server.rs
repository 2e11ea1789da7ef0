//! Listeners, HTTP versions, graceful drain and SIGHUP reload.
//!
//! The data plane serves HTTP/1.1 and h2c through hyper-util's auto builder, or, with
//! `[server] tls`, HTTP/1.1 and h2 over rustls (ALPN). The TLS handshake runs on the
//! connection's own task, bounded by `header_read_timeout`, with the rustls config of the
//! generation current when the connection was accepted (SIGHUP reloads the certificate). Each request loads
//! the current config generation (one atomic load) and runs its stack; a reload builds a new
//! generation and swaps it in, so no connection is dropped and no request sees half a config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::body::DataBody;
use crate::config::{self, Settings};
use crate::layers::authenticate::PeerIdentity;
use crate::metrics::ReloadLabels;
use crate::shared::{Process, Shared};
use crate::stack::{build_stack, Stack};
use crate::upstream::UpstreamClient;

/// One config generation: its settings and the stack built from them.
pub struct Generation {
    pub shared: Arc<Shared>,
    pub stack: Stack<DataBody>,
}

impl Generation {
    fn build(
        settings: Settings,
        process: &Arc<Process>,
        previous: Option<&Generation>,
    ) -> Result<Generation, String> {
        let upstream = match previous {
            Some(p)
                if p.shared
                    .upstream
                    .reuse_for(&settings.upstream, settings.server.workers) =>
            {
                p.shared.upstream.clone()
            }
            _ => UpstreamClient::new(&settings.upstream, settings.server.workers)?,
        };
        let shared = Arc::new(Shared::next(
            Arc::new(settings),
            process.clone(),
            upstream,
            previous.map(|p| &*p.shared),
        ));
        let stack = build_stack(&shared);
        Ok(Generation { shared, stack })
    }
}

/// A running gateway: its bound addresses, and handles to reload and stop it.
pub struct Gateway {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub process: Arc<Process>,
    current: Arc<ArcSwap<Generation>>,
    config_path: Option<PathBuf>,
    stop_data: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    data_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl Gateway {
    /// Bind both listeners and start serving. `settings.server.listen` may use port 0.
    pub async fn start(settings: Settings) -> Result<Gateway, StartError> {
        let config_path = settings.source.clone();
        let ledger_key = if settings.ledger.postgres_url.is_some() {
            "ledger.postgres_url"
        } else {
            "ledger.path"
        };
        // Opening connects and migrates (PostgreSQL) or opens the file: blocking work.
        let ledger_settings = settings.ledger.clone();
        let ledger = tokio::task::spawn_blocking(move || crate::ledger::open(&ledger_settings))
            .await
            .map_err(|e| StartError::Setup(format!("{ledger_key}: {e}")))?
            .map_err(|e| StartError::Setup(format!("{ledger_key}: {e}")))?;
        // Fleet mode: limits, budgets, the status cache and checkpoint leases in Redis. An
        // unreachable Redis is not fatal: the replica starts on its on_store_failure policy.
        let fleet = match &settings.fleet {
            Some(f) => Some(
                crate::fleet::Fleet::connect(f, ledger.clone())
                    .await
                    .map_err(StartError::Setup)?,
            ),
            None => None,
        };
        let mut process = Process::with_fleet(ledger, fleet);
        // Idempotency-Key fates live in the fleet's Redis (shared by the replicas), else in a
        // database beside the embedded ledger (else in memory).
        if let Some(fleet) = &process.fleet {
            process.idempotency =
                Arc::new(crate::idempotency::IdempotencyStore::fleet(fleet.clone()));
        } else if settings.ledger.postgres_url.is_none() {
            let path = crate::idempotency::beside(&settings.ledger.path);
            let store = tokio::task::spawn_blocking(move || {
                crate::idempotency::IdempotencyStore::sqlite(&path)
            })
            .await
            .map_err(|e| StartError::Setup(format!("ledger.path: {e}")))?
            .map_err(|e| StartError::Setup(format!("ledger.path: idempotency store: {e}")))?;
            process.idempotency = Arc::new(store);
        }
        let process = Arc::new(process);
        // Today's budgets resume where the ledger says they were.
        let today = crate::usage::today();
        let ledger = process.ledger.clone();
        match tokio::task::spawn_blocking(move || ledger.spent_on(today)).await {
            Ok(Ok(spent)) => process
                .budgets
                .restore(&spent, crate::budgets::utc_day(crate::budgets::now_ms())),
            Ok(Err(e)) => return Err(StartError::Setup(format!("{ledger_key}: {e}"))),
            Err(e) => return Err(StartError::Setup(format!("ledger: {e}"))),
        }
        let generation = Generation::build(settings, &process, None).map_err(StartError::Setup)?;
        let s = generation.shared.settings.server.clone();
        if generation.shared.anonymous.is_some() {
            tracing::warn!(
                "no [[clients]] configured: every caller on {} is admitted as `anonymous` (loopback only)",
                s.listen
            );
        }
        let data = bind_data(s.listen, s.workers).map_err(|source| StartError::Bind {
            key: "server.listen",
            addr: s.listen,
            source,
        })?;
        let admin = TcpListener::bind(s.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                key: "server.admin_listen",
                addr: s.admin_listen,
                source,
            })?;
        let data_addr = data
            .first()
            .ok_or_else(|| StartError::Setup("server.workers: no worker".into()))?
            .local_addr()
            .map_err(|e| StartError::Setup(e.to_string()))?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| StartError::Setup(e.to_string()))?;
        let current = Arc::new(ArcSwap::from_pointee(generation));
        let (stop_data, data_rx) = watch::channel(false);
        let (stop_admin, admin_rx) = watch::channel(false);
        let workers = crate::workers::start(data, &current, &data_rx)
            .await
            .map_err(|e| StartError::Setup(format!("server.workers: cannot start: {e}")))?;
        let data_task = tokio::spawn(async move {
            for drained in workers {
                let _ = drained.await;
            }
        });
        tokio::spawn(evict_idle(current.clone(), data_rx.clone()));
        tokio::spawn(watch_ledger(process.clone(), data_rx.clone()));
        tokio::spawn(crate::reconcile::run(current.clone(), data_rx));
        let admin_task = tokio::spawn(crate::admin::serve(
            admin,
            process.clone(),
            current.clone(),
            admin_rx,
        ));
        tracing::info!(%data_addr, %admin_addr, upstream = %current.load().shared.settings.upstream.url, "linkup-gateway listening");
        Ok(Gateway {
            data_addr,
            admin_addr,
            process,
            current,
            config_path,
            stop_data,
            stop_admin,
            data_task,
            admin_task,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.current.load().shared.settings.clone()
    }

    /// Reload from the config file it was started from (SIGHUP). On any problem the old config
    /// stays and the problems are returned.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        let Some(path) = &self.config_path else {
            return Err(vec!["the gateway was not started from a config file".into()]);
        };
        let settings = config::load(path).map_err(|e| e.problems());
        self.reload_with(settings)
    }

    /// Swap in new settings (listen addresses cannot change without a restart).
    pub fn reload_with(&self, settings: Result<Settings, Vec<String>>) -> Result<(), Vec<String>> {
        let result = settings.and_then(|mut s| {
            let old = self.current.load();
            let old_server = &old.shared.settings.server;
            if s.server.listen != old_server.listen
                || s.server.admin_listen != old_server.admin_listen
            {
                tracing::warn!("listen addresses changed: they take effect on restart only");
                s.server.listen = old_server.listen;
                s.server.admin_listen = old_server.admin_listen;
            }
            if s.server.workers != old_server.workers {
                tracing::warn!("server.workers changed: it takes effect on restart only");
                s.server.workers = old_server.workers;
            }
            if s.server.tls.is_some() != old_server.tls.is_some() {
                // Switching the listener between plaintext and TLS under its callers would cut
                // every one of them (or silently downgrade them): that is a restart.
                return Err(vec![
                    "server.tls: turning inbound TLS on or off takes a restart; the running listener stays as it is"
                        .to_string(),
                ]);
            }
            Generation::build(s, &self.process, Some(&old)).map_err(|e| vec![e])
        });
        match result {
            Ok(generation) => {
                self.current.store(Arc::new(generation));
                self.process
                    .metrics
                    .config_reloads
                    .get_or_create(&ReloadLabels { result: "ok" })
                    .inc();
                tracing::info!("config reloaded");
                Ok(())
            }
            Err(problems) => {
                self.process
                    .metrics
                    .config_reloads
                    .get_or_create(&ReloadLabels { result: "rejected" })
                    .inc();
                for p in &problems {
                    tracing::error!(problem = %p, "config reload refused; the running config stays");
                }
                Err(problems)
            }
        }
    }

    /// Drain: stop accepting, `/readyz` turns 503, in-flight requests get `shutdown_grace` to
    /// finish, then the admin listener stops too.
    pub async fn shutdown(self) {
        self.process.draining.store(true, Ordering::SeqCst);
        self.process.drain_started.notify_waiters();
        let _ = self.stop_data.send(true);
        let _ = self.data_task.await;
        // Budget settles still on their way to the fleet store go before the process does.
        if let Some(fleet) = &self.process.fleet {
            fleet.drain(std::time::Duration::from_secs(5)).await;
        }
        // Every row of every answer given is durable before the process goes.
        if let Err(e) = self.process.ledger.flush().await {
            tracing::error!(error = %e, "ledger flush at shutdown failed");
        }
        let _ = self.stop_admin.send(true);
        let _ = self.admin_task.await;
    }
}

/// Every minute, forget rate-limit buckets that are full again and expired cooldowns, so
/// millions of accounts over time cost memory only while they are active.
/// Once a minute: idle limiter state and expired Idempotency-Key fates.
async fn evict_idle(current: Arc<ArcSwap<Generation>>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let generation = current.load_full();
                let tracked = generation.shared.limits.evict_idle();
                generation
                    .shared
                    .process
                    .metrics
                    .rate_limit_tracked
                    .set(i64::try_from(tracked).unwrap_or(i64::MAX));
                // Idempotency-Key fates past their ttl, and the oldest beyond max_keys.
                let max_keys = generation.shared.settings.idempotency.max_keys;
                if let Err(e) = generation.shared.process.idempotency.purge(max_keys).await {
                    tracing::warn!(error = %e, "idempotency store: purge failed");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// While the ledger is failing, costly requests are refused and write no rows, so no write of
/// theirs can tell the credits layer it recovered: this watcher does, once the ledger has
/// written the rows it kept (its own retry, every second), and re-opens the gate.
async fn watch_ledger(process: Arc<Process>, mut stop: watch::Receiver<bool>) {
    use std::sync::atomic::Ordering;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_counted = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let state = &process.credit_state;
                // The ledger file was lost (deleted, replaced, truncated): fail closed now,
                // before any costly request is forwarded, and count it once.
                if let Some(crate::ledger::LedgerError::FileLost { reason, .. }) =
                    process.ledger.write_error()
                {
                    if !lost_counted {
                        lost_counted = true;
                        process.metrics.ledger_errors.inc();
                        process
                            .metrics
                            .ledger_file_lost
                            .get_or_create(&crate::metrics::ReasonLabels { reason })
                            .inc();
                    }
                    state.ledger_failing.store(true, Ordering::Release);
                    continue;
                }
                if state.ledger_failing.load(Ordering::Acquire)
                    && process.ledger.write_error().is_none()
                {
                    state.ledger_failing.store(false, Ordering::Release);
                    tracing::warn!("the ledger is writable again: requests that cost credits are served again");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// The per-connection service: each request runs the current generation's stack, carrying the
/// connection's verified client certificate names when there are some.
fn data_service(
    current: Arc<ArcSwap<Generation>>,
    identity: Option<PeerIdentity>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<Full<bytes::Bytes>>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<hyper::Response<Full<bytes::Bytes>>, std::convert::Infallible>,
    > + Send
                 + 'static,
> {
    hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(DataBody::Hyper);
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        let stack = current.load().stack.clone();
        async move {
            let resp = stack.oneshot(req).await?;
            Ok::<_, std::convert::Infallible>(resp.map(Full::new))
        }
    })
}

/// The connections a worker's own HTTP/1.1 codec serves, for the drain to wait on.
#[derive(Clone, Default)]
struct Live(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

/// One live connection; counted until dropped.
struct LiveGuard(Live);

impl Live {
    fn enter(&self) -> LiveGuard {
        self.0 .0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        LiveGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.0 .0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Returns once no connection is left.
    async fn drained(&self) {
        loop {
            let notified = self.0 .1.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self
            .0
             .0
             .0
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0 .0 .1.notify_waiters();
        }
    }
}

/// The data listeners, one per worker. On Linux each worker gets a socket of its own in one
/// `SO_REUSEPORT` group, so the kernel spreads new connections evenly over the workers (one
/// shared socket let whichever worker woke first take a whole burst: 60/40 at 256
/// connections). A plain bind first proves the port free: a second process started on the
/// same port fails with "address in use" instead of silently taking part of the traffic (it
/// cannot join the group: its own plain bind collides with it). Elsewhere, the workers share
/// one socket. The backlog is deep enough for thousands of callers connecting at once.
fn bind_data(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |reuseport: bool| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        #[cfg(target_os = "linux")]
        if reuseport {
            socket.set_reuseport(true)?;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = reuseport;
        Ok(socket)
    };
    let probe = socket(false)?;
    probe.bind(addr)?;
    if !cfg!(target_os = "linux") || workers <= 1 {
        let listener = probe.listen(4096)?.into_std()?;
        return (0..workers.max(1)).map(|_| listener.try_clone()).collect();
    }
    // Port 0 resolved once, then every worker binds the same port.
    let addr = probe.local_addr()?;
    drop(probe);
    (0..workers)
        .map(|_| {
            let s = socket(true)?;
            s.bind(addr)?;
            s.listen(4096)?.into_std()
        })
        .collect()
}

/// The answer to one request of a connection: on the connection's stack, or on a clone.
type ConnAnswer = futures_util::future::Either<
    <Stack<DataBody> as tower::Service<http::Request<DataBody>>>::Future,
    tower::util::Oneshot<Stack<DataBody>, http::Request<DataBody>>,
>;

/// A connection's own handle on the stack, kept from one request to the next while the config
/// generation stays the same. Cloning the stack per request (what `oneshot` on the shared one
/// does) costs an allocation and an increment and decrement of every layer's `Arc`s, counters
/// that both workers share: cache lines bouncing between cores on every request.
struct ConnStack {
    current: Arc<ArcSwap<Generation>>,
    generation: Arc<Generation>,
    stack: Stack<DataBody>,
}

impl ConnStack {
    fn new(current: Arc<ArcSwap<Generation>>) -> ConnStack {
        let generation = current.load_full();
        let stack = generation.stack.clone();
        ConnStack {
            current,
            generation,
            stack,
        }
    }

    fn call(&mut self, req: http::Request<DataBody>) -> ConnAnswer {
        {
            let now = self.current.load();
            if !Arc::ptr_eq(&*now, &self.generation) {
                self.generation = Arc::clone(&*now);
                self.stack = now.stack.clone();
            }
        }
        // Every layer is ready at once (limits are checked in `call`, never in `poll_ready`:
        // see ARCHITECTURE); should one ever not be, the request waits on a clone of its own.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match tower::Service::poll_ready(&mut self.stack, &mut cx) {
            std::task::Poll::Ready(Ok(())) => {
                futures_util::future::Either::Left(tower::Service::call(&mut self.stack, req))
            }
            _ => futures_util::future::Either::Right(self.stack.clone().oneshot(req)),
        }
    }
}

/// One worker's accept loop: serve every connection it accepts until shutdown, then drain.
pub(crate) async fn serve_data(
    listener: TcpListener,
    current: Arc<ArcSwap<Generation>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let server = current.load().shared.settings.server.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        // No `half_close`: a caller that shuts its write side before its answer is taken as
        // gone (nginx's 499), which is what frees its in-flight slot when a caller times out
        // and closes. Its call still runs to its end and is charged (`detach`).
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(64)
        .max_header_list_size(64 * 1024);
    // Shared by the connections: a clone of the builder (both protocols' settings, about a
    // kilobyte) would live in every connection's task for as long as it stays open.
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let live = Live::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let tls = current
                    .load()
                    .shared
                    .settings
                    .server
                    .tls
                    .as_ref()
                    .map(|t| t.server_config.clone());
                let Some(tls) = tls else {
                    // Plain TCP: HTTP/1.1 by the gateway's own codec; HTTP/2 (prior knowledge)
                    // by hyper.
                    let (current, builder, watcher) = (current.clone(), builder.clone(), graceful.watcher());
                    let (shutdown, live) = (shutdown.clone(), live.enter());
                    tokio::spawn(async move {
                        let _live = live;
                        let s = current.load().shared.clone();
                        match crate::http1::starts_with_h2_preface(&stream, s.settings.server.header_read_timeout).await {
                            Some(true) => {
                                let conn = builder
                                    .serve_connection(TokioIo::new(stream), data_service(current, None))
                                    .into_owned();
                                // Boxed: hyper's HTTP/2 connection is a large future, and as a
                                // state of this task it would size every connection's task,
                                // the HTTP/1.1 ones (the many) included.
                                if let Err(e) = Box::pin(watcher.watch(conn)).await {
                                    tracing::debug!(error = %e, "connection closed with an error");
                                }
                            }
                            Some(false) => {
                                let limits = crate::http1::Limits {
                                    header_read_timeout: s.settings.server.header_read_timeout,
                                    max_body_bytes: s.settings.server.max_body_bytes,
                                    body_read_timeout: s.settings.server.request_timeout,
                                };
                                let process = s.process.clone();
                                drop(s);
                                let mut stack = ConnStack::new(current);
                                crate::http1::serve(stream, limits, process, shutdown, |req| {
                                    let answer = stack.call(req);
                                    async move {
                                        match answer.await {
                                            Ok(resp) => resp,
                                            Err(never) => match never {},
                                        }
                                    }
                                })
                                .await;
                            }
                            None => {}
                        }
                    });
                    continue;
                };
                let current = current.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let handshake_timeout = server.header_read_timeout;
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map(|leaf| PeerIdentity(crate::inbound_tls::certificate_names(leaf).into()));
                    let conn = builder
                        .serve_connection(TokioIo::new(tls), data_service(current, identity))
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection closed with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let grace = current.load().shared.settings.server.shutdown_grace;
    tracing::info!(
        connections = graceful.count() + live.count(),
        grace_s = grace.as_secs_f64(),
        "draining"
    );
    if tokio::time::timeout(grace, async {
        graceful.shutdown().await;
        live.drained().await;
    })
    .await
    .is_err()
    {
        tracing::warn!("shutdown_grace passed with requests still in flight; closing them");
    }
}

/// `serve`: start, then wait for signals. SIGTERM/SIGINT drain and exit; SIGHUP reloads.
pub async fn run(settings: Settings) -> Result<(), StartError> {
    raise_open_file_limit(settings.server.max_in_flight);
    let gateway = Gateway::start(settings).await?;
    wait_for_signals(&gateway).await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Every request in flight holds two descriptors (the caller's connection and an upstream
/// one): raise the soft open-file limit to the hard one, as nginx's `worker_rlimit_nofile`
/// and Go's runtime do, and say so when even that is short of `max_in_flight`.
fn raise_open_file_limit(max_in_flight: usize) {
    let want = u64::try_from(max_in_flight)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(1024);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < want => tracing::warn!(
            open_file_limit = limit,
            max_in_flight,
            "the open-file limit is below 2 x server.max_in_flight + 1024: under full load, connections will be refused; raise `ulimit -n` (LimitNOFILE=) or lower max_in_flight"
        ),
        Ok(limit) => tracing::debug!(open_file_limit = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

#[cfg(unix)]
async fn wait_for_signals(gateway: &Gateway) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; waiting for ctrl-c");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => { let _ = gateway.reload(); }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_gateway: &Gateway) {
    let _ = tokio::signal::ctrl_c().await;
}
