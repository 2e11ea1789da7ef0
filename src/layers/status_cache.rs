//! status_cache: the gateway remembers which accounts the upstream last called `connected`
//! (or `active`), and answers a `POST /v2/checkpoint` for such an account itself: 200, the
//! upstream's success envelope with `credits_consumed: 0`, `x-gateway-cache: hit`. Nothing is
//! forwarded, limited or charged.
//!
//! It learns on the way back up, from the few answers that can teach it something: the
//! `data.account_id` / `data.status` of login, checkpoint and `GET /v2/accounts/{id}` answers,
//! and an `ACCOUNT_INACTIVE` / `INVALID_ACCOUNT` error for the request's account on any route.
//! Every other answer passes without being parsed. `checkpoint_required` is remembered too (it
//! is never a hit), so polling callers see the account's state in logs and metrics; any other
//! status drops the entry.
//!
//! The store ([`StatusStore`]) lives in the process, not in one config generation: a SIGHUP
//! reload keeps it unless `status_cache.ttl` or `max_entries` change (then it starts empty).

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{take_ready, BoxFuture};
use crate::config::{OnFailure, StatusCacheSettings};
use crate::context::{AnsweredBy, RequestContext, RequestLog, Route, StatusLearnt};
use crate::error::GatewayError;
use crate::fleet::Fleet;
use crate::metrics::{Metrics, StatusLabels};
use crate::shared::Process;
use crate::upstream::UpstreamAnswer;

pub const X_GATEWAY_CACHE: &str = "x-gateway-cache";

/// What the gateway remembers of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedStatus {
    /// The upstream said `connected` or `active`: a checkpoint is answered here.
    Connected,
    /// The upstream said `checkpoint_required`: checkpoints go on to the upstream.
    CheckpointRequired,
}

impl CachedStatus {
    /// An upstream `data.status` as the cache keeps it; `None`: forget the account.
    pub fn from_upstream(status: &str) -> Option<CachedStatus> {
        match status {
            "connected" | "active" => Some(CachedStatus::Connected),
            "checkpoint_required" => Some(CachedStatus::CheckpointRequired),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CachedStatus::Connected => "connected",
            CachedStatus::CheckpointRequired => "checkpoint_required",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    status: CachedStatus,
    /// On tokio's clock, so paused-time tests see expiry; moka's own `time_to_live` (same
    /// length) frees the memory.
    expires: Instant,
}

/// Account statuses by `account_id`, bounded (`max_entries`, least recently used out first)
/// and expiring (`ttl` after the answer that taught it).
///
/// In fleet mode the store in Redis is the truth (the fleet keeps a short local copy,
/// invalidated over pub/sub); `entries` here is then only the replica's own fallback while the
/// store is down: it starts from what it learns during the outage, and whatever it learns while
/// the store is up goes to the store and clears the local entry, so a later outage never
/// answers from a stale one.
pub struct StatusStore {
    entries: moka::future::Cache<Arc<str>, Entry>,
    ttl: Duration,
    max_entries: u64,
    fleet: Option<Arc<Fleet>>,
    /// Answers parsed to learn from (tests: one checkpoint answer is learnt from once).
    #[cfg(test)]
    parsed: std::sync::atomic::AtomicUsize,
}

impl StatusStore {
    pub fn new(ttl: Duration, max_entries: u64) -> StatusStore {
        StatusStore::with_fleet(ttl, max_entries, None)
    }

    /// A store whose truth is in the fleet's Redis when `fleet` is given.
    pub fn with_fleet(ttl: Duration, max_entries: u64, fleet: Option<Arc<Fleet>>) -> StatusStore {
        StatusStore {
            entries: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
            ttl,
            max_entries,
            fleet,
            #[cfg(test)]
            parsed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The account's remembered status, unless it has expired.
    pub async fn get(&self, account: &str) -> Option<CachedStatus> {
        if let Some(f) = &self.fleet {
            match f.status_get(account).await {
                Ok(s) => return s,
                Err(_) => f.fell_back("status", OnFailure::Local),
            }
        }
        let e = self.entries.get(account).await?;
        (Instant::now() < e.expires).then_some(e.status)
    }

    pub async fn is_connected(&self, account: &str) -> bool {
        self.get(account).await == Some(CachedStatus::Connected)
    }

    pub async fn remember(&self, account: Arc<str>, status: CachedStatus) {
        if let Some(f) = &self.fleet {
            if f.status_set(&account, status, self.ttl).await.is_ok() {
                self.entries.invalidate(&account).await;
                return;
            }
            f.fell_back("status", OnFailure::Local);
        }
        let expires = Instant::now() + self.ttl;
        self.entries
            .insert(account, Entry { status, expires })
            .await;
    }

    /// Forget an account; true when it was remembered (and not expired).
    pub async fn forget(&self, account: &str) -> bool {
        let local = self
            .entries
            .remove(account)
            .await
            .is_some_and(|e| Instant::now() < e.expires);
        if let Some(f) = &self.fleet {
            match f.status_forget(account).await {
                Ok(shared) => return shared || local,
                Err(_) => f.fell_back("status", OnFailure::Local),
            }
        }
        local
    }

    /// Cheap and synchronous: is there anything to forget? (Expired entries count; in fleet
    /// mode another replica may have taught the store, so always.)
    fn holds(&self, account: &str) -> bool {
        self.fleet.is_some() || self.entries.contains_key(account)
    }

    /// Live entries by status, for the gauge (one pass; run at scrape time, not per request).
    pub fn counts(&self) -> (u64, u64) {
        let now = Instant::now();
        let (mut connected, mut pending) = (0, 0);
        for (_, e) in self.entries.iter() {
            if now >= e.expires {
                continue;
            }
            match e.status {
                CachedStatus::Connected => connected += 1,
                CachedStatus::CheckpointRequired => pending += 1,
            }
        }
        (connected, pending)
    }

    /// Sets `linkup_gateway_status_cache_entries{status}`.
    pub fn export(store: Option<&StatusStore>, m: &Metrics) {
        let (connected, pending) = store.map_or((0, 0), StatusStore::counts);
        for (status, n) in [
            (CachedStatus::Connected, connected),
            (CachedStatus::CheckpointRequired, pending),
        ] {
            m.status_cache_entries
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Learn from an upstream answer. `route` and `account` are the request's; only the
    /// answers that can teach something are parsed. The gateway's own answers (cache hits,
    /// coalesced copies: their call was learnt from by its own task) teach nothing, and an
    /// answer marked [`StatusLearnt`] was learnt from already.
    pub(crate) async fn learn(
        &self,
        route: Route,
        account: Option<&Arc<str>>,
        resp: &Response<Bytes>,
    ) {
        if matches!(
            resp.extensions().get::<AnsweredBy>(),
            Some(AnsweredBy::Cache | AnsweredBy::Coalesced | AnsweredBy::Replayed)
        ) || resp.extensions().get::<StatusLearnt>().is_some()
        {
            return;
        }
        #[cfg(test)]
        self.parsed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match route {
            Route::Login | Route::Checkpoint | Route::Account => {
                let a = UpstreamAnswer::of(resp);
                if let (Some(id), Some(status)) = (&a.account_id, &a.status) {
                    let id: Arc<str> = match account {
                        Some(acc) if **acc == **id => acc.clone(),
                        _ => Arc::from(id.as_str()),
                    };
                    match CachedStatus::from_upstream(status) {
                        Some(s) => self.remember(id, s).await,
                        None => {
                            self.forget(&id).await;
                        }
                    }
                } else if let (Some(acc), Some(code)) = (account, &a.error_code) {
                    if account_gone(code) {
                        self.forget(acc).await;
                    }
                }
            }
            _ => {
                // Any other route: only an error naming a remembered account matters.
                let Some(acc) = account else { return };
                if !resp.status().is_client_error() || !self.holds(acc) {
                    return;
                }
                if UpstreamAnswer::of(resp)
                    .error_code
                    .as_deref()
                    .is_some_and(account_gone)
                {
                    self.forget(acc).await;
                }
            }
        }
    }
}

fn account_gone(code: &str) -> bool {
    matches!(code, "ACCOUNT_INACTIVE" | "INVALID_ACCOUNT")
}

/// The process-lifetime home of the store: one config generation after another asks it for
/// the store its settings call for, and gets the same one back while `ttl` and `max_entries`
/// stay the same.
#[derive(Default)]
pub struct StatusStoreSlot(Mutex<Option<Arc<StatusStore>>>, Option<Arc<Fleet>>);

impl StatusStoreSlot {
    /// In fleet mode every store it makes keeps its truth in the fleet's Redis.
    pub fn with_fleet(fleet: Option<Arc<Fleet>>) -> StatusStoreSlot {
        StatusStoreSlot(Mutex::new(None), fleet)
    }

    /// `None` when the cache is switched off (and the old store is dropped: re-enabling it
    /// must not bring back what it missed while off).
    pub fn for_settings(&self, s: &StatusCacheSettings) -> Option<Arc<StatusStore>> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !s.enabled {
            *slot = None;
            return None;
        }
        match &*slot {
            Some(store) if store.ttl == s.ttl && store.max_entries == s.max_entries => {
                Some(store.clone())
            }
            _ => {
                let store = Arc::new(StatusStore::with_fleet(
                    s.ttl,
                    s.max_entries,
                    self.1.clone(),
                ));
                *slot = Some(store.clone());
                Some(store)
            }
        }
    }
}

/// The gateway's answer for a checkpoint on a connected account, as SPEC §4 writes it.
pub(crate) fn hit(
    account: &str,
    log: Option<&Arc<RequestLog>>,
    process: &Process,
) -> Response<Bytes> {
    process.metrics.status_cache_hits.inc();
    if let Some(log) = log {
        log.set_credits(0);
    }
    #[derive(serde::Serialize)]
    struct Connected<'a> {
        account_id: &'a str,
        status: &'static str,
    }
    let body = crate::envelope::free_success(
        Connected {
            account_id: account,
            status: "connected",
        },
        Route::Checkpoint.as_str(),
    );
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(X_GATEWAY_CACHE, HeaderValue::from_static("hit"));
    resp.extensions_mut().insert(AnsweredBy::Cache);
    resp
}

#[derive(Clone)]
pub struct StatusCacheLayer {
    store: Option<Arc<StatusStore>>,
    process: Arc<Process>,
}

impl StatusCacheLayer {
    /// `store`: `None` when `status_cache.enabled = false` (the layer then only passes through).
    pub fn new(store: Option<Arc<StatusStore>>, process: Arc<Process>) -> Self {
        StatusCacheLayer { store, process }
    }
}

impl<S> Layer<S> for StatusCacheLayer {
    type Service = StatusCache<S>;
    fn layer(&self, inner: S) -> StatusCache<S> {
        StatusCache {
            inner,
            store: self.store.clone(),
            process: self.process.clone(),
        }
    }
}

#[derive(Clone)]
pub struct StatusCache<S> {
    inner: S,
    store: Option<Arc<StatusStore>>,
    process: Arc<Process>,
}

impl<S> Service<Request<Bytes>> for StatusCache<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let Some(store) = self.store.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let (route, account) = match req.extensions().get::<RequestContext>() {
            Some(c) => (c.route, c.account_id.clone()),
            None => return Box::pin(self.inner.call(req)),
        };
        match (route, account) {
            (Route::Checkpoint, Some(account)) => {
                let mut inner = take_ready(&mut self.inner);
                let process = self.process.clone();
                Box::pin(async move {
                    let cached = store.get(&account).await;
                    tracing::debug!(
                        account = %account,
                        cached = cached.map_or("unknown", CachedStatus::as_str),
                        "status cache"
                    );
                    if cached == Some(CachedStatus::Connected) {
                        let log = req.extensions().get::<Arc<RequestLog>>();
                        return Ok(hit(&account, log, &process));
                    }
                    process.metrics.status_cache_misses.inc();
                    let resp = inner.call(req).await?;
                    store.learn(route, Some(&account), &resp).await;
                    Ok(resp)
                })
            }
            // Login names no account in its request; its answer does.
            (route, account) if route == Route::Login || account.is_some() => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let resp = fut.await?;
                    store.learn(route, account.as_ref(), &resp).await;
                    Ok(resp)
                })
            }
            _ => Box::pin(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    fn ctx(route: Route, account: Option<&str>) -> RequestContext {
        RequestContext {
            route,
            action: None,
            account_id: account.map(Arc::from),
            code: None,
        }
    }

    fn req(route: Route, account: Option<&str>) -> Request<Bytes> {
        let mut r = Request::post("/v2/x").body(Bytes::new()).unwrap();
        r.extensions_mut().insert(ctx(route, account));
        r.extensions_mut().insert(Arc::new(RequestLog::new(
            HeaderValue::from_static("id"),
            route,
        )));
        r
    }

    fn answer(status: u16, body: &str) -> Response<Bytes> {
        let mut r = Response::new(Bytes::from(body.to_owned()));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    }

    type TestSvc = tower::util::BoxCloneService<Request<Bytes>, Response<Bytes>, GatewayError>;

    /// The layer over a stub upstream that always gives `status`/`body`, and counts calls.
    fn stack(
        store: &Arc<StatusStore>,
        status: u16,
        body: &'static str,
    ) -> (TestSvc, Arc<AtomicUsize>, Arc<Process>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let process = Arc::new(Process::default());
        let c = calls.clone();
        let svc = StatusCacheLayer::new(Some(store.clone()), process.clone()).layer(
            tower::service_fn(move |_r: Request<Bytes>| {
                c.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, GatewayError>(answer(status, body)) }
            }),
        );
        (TestSvc::new(svc), calls, process)
    }

    #[tokio::test]
    async fn a_checkpoint_for_a_connected_account_is_answered_here_and_free() {
        let store = Arc::new(StatusStore::new(Duration::from_secs(60), 100));
        store
            .remember(Arc::from("acc_1"), CachedStatus::Connected)
            .await;
        let (svc, calls, process) = stack(&store, 500, "{}");
        let r = req(Route::Checkpoint, Some("acc_1"));
        let log = r.extensions().get::<Arc<RequestLog>>().cloned().unwrap();
        let resp = svc.oneshot(r).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[X_GATEWAY_CACHE], "hit");
        assert_eq!(
            resp.extensions().get::<AnsweredBy>(),
            Some(&AnsweredBy::Cache)
        );
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["success"], true);
        assert_eq!(v["data"]["account_id"], "acc_1");
        assert_eq!(v["data"]["status"], "connected");
        assert_eq!(v["metadata"]["action"], "checkpoint");
        assert_eq!(v["metadata"]["credits_consumed"], 0);
        assert!(v["metadata"]["timestamp"].is_string());
        assert_eq!(log.credits(), Some(0));
        assert_eq!(process.metrics.status_cache_hits.get(), 1);
    }

    #[tokio::test]
    async fn learns_connected_and_checkpoint_required_and_forgets_other_statuses() {
        let store = Arc::new(StatusStore::new(Duration::from_secs(60), 100));
        let connected = r#"{"success":true,"data":{"account_id":"acc_1","status":"connected","platform":"linkedin"},"metadata":{}}"#;
        let (svc, _, _) = stack(&store, 200, connected);
        svc.oneshot(req(Route::Login, None)).await.unwrap();
        assert_eq!(store.get("acc_1").await, Some(CachedStatus::Connected));

        let pending =
            r#"{"success":true,"data":{"account_id":"acc_1","status":"checkpoint_required"}}"#;
        let (svc, calls, process) = stack(&store, 200, pending);
        svc.clone().oneshot(req(Route::Login, None)).await.unwrap();
        assert_eq!(
            store.get("acc_1").await,
            Some(CachedStatus::CheckpointRequired)
        );
        // checkpoint_required is never a hit.
        svc.oneshot(req(Route::Checkpoint, Some("acc_1")))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(process.metrics.status_cache_misses.get(), 1);

        let active =
            r#"{"success":true,"data":{"account_id":"acc_1","status":"active","is_active":true}}"#;
        let (svc, _, _) = stack(&store, 200, active);
        svc.oneshot(req(Route::Account, Some("acc_1")))
            .await
            .unwrap();
        assert!(store.is_connected("acc_1").await);

        let inactive = r#"{"success":true,"data":{"account_id":"acc_1","status":"inactive"}}"#;
        let (svc, _, _) = stack(&store, 200, inactive);
        svc.oneshot(req(Route::Account, Some("acc_1")))
            .await
            .unwrap();
        assert_eq!(store.get("acc_1").await, None);
    }

    #[tokio::test]
    async fn account_errors_forget_the_account_on_any_route() {
        let store = Arc::new(StatusStore::new(Duration::from_secs(60), 100));
        for (status, code, route) in [
            (403, "ACCOUNT_INACTIVE", Route::Profiles),
            (404, "INVALID_ACCOUNT", Route::Account),
            (403, "ACCOUNT_INACTIVE", Route::Checkpoint),
        ] {
            store
                .remember(Arc::from("acc_1"), CachedStatus::CheckpointRequired)
                .await;
            let body: &'static str = Box::leak(
                format!(r#"{{"success":false,"error":{{"code":"{code}","message":"x"}}}}"#)
                    .into_boxed_str(),
            );
            let (svc, _, _) = stack(&store, status, body);
            svc.oneshot(req(route, Some("acc_1"))).await.unwrap();
            assert_eq!(store.get("acc_1").await, None, "{route} {code}");
        }
        // Other errors, and other accounts' errors, leave it alone.
        store
            .remember(Arc::from("acc_1"), CachedStatus::Connected)
            .await;
        let (svc, _, _) = stack(
            &store,
            400,
            r#"{"success":false,"error":{"code":"INVALID_PARAMS"}}"#,
        );
        svc.oneshot(req(Route::Profiles, Some("acc_1")))
            .await
            .unwrap();
        let (svc, _, _) = stack(
            &store,
            403,
            r#"{"success":false,"error":{"code":"ACCOUNT_INACTIVE"}}"#,
        );
        svc.oneshot(req(Route::Profiles, Some("acc_2")))
            .await
            .unwrap();
        assert!(store.is_connected("acc_1").await);
    }

    #[tokio::test]
    async fn unparseable_or_unrelated_answers_teach_nothing() {
        let store = Arc::new(StatusStore::new(Duration::from_secs(60), 100));
        store
            .remember(Arc::from("acc_1"), CachedStatus::Connected)
            .await;
        for body in [
            "<html>502</html>",
            r#"{"data":[1,2]}"#,
            r#"{"data":{"status":"inactive"}}"#,
        ] {
            let body: &'static str = Box::leak(body.to_owned().into_boxed_str());
            let (svc, _, _) = stack(&store, 502, body);
            svc.oneshot(req(Route::Account, Some("acc_1")))
                .await
                .unwrap();
        }
        // A 200 on a route the cache does not learn from is not even parsed.
        let (svc, _, _) = stack(
            &store,
            200,
            r#"{"data":{"account_id":"acc_1","status":"inactive"}}"#,
        );
        svc.oneshot(req(Route::Profiles, Some("acc_1")))
            .await
            .unwrap();
        assert!(store.is_connected("acc_1").await);
    }

    #[tokio::test]
    async fn an_answer_already_learnt_from_is_not_learnt_again() {
        let store = Arc::new(StatusStore::new(Duration::from_secs(60), 100));
        store
            .remember(Arc::from("acc_1"), CachedStatus::CheckpointRequired)
            .await;
        let svc = StatusCacheLayer::new(Some(store.clone()), Arc::new(Process::default())).layer(
            tower::service_fn(|_r: Request<Bytes>| async {
                let mut r = answer(
                    200,
                    r#"{"data":{"account_id":"acc_1","status":"inactive"}}"#,
                );
                r.extensions_mut().insert(StatusLearnt);
                Ok::<_, GatewayError>(r)
            }),
        );
        svc.oneshot(req(Route::Checkpoint, Some("acc_1")))
            .await
            .unwrap();
        // Learning from it would have forgotten the account.
        assert_eq!(
            store.get("acc_1").await,
            Some(CachedStatus::CheckpointRequired)
        );
        assert_eq!(store.parsed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_checkpoint_through_coalescing_is_learnt_from_once() {
        use crate::layers::coalesce::{CoalesceLayer, Flights};
        let store = Arc::new(StatusStore::new(Duration::from_secs(60), 100));
        let process = Arc::new(Process::default());
        let coalesce = CoalesceLayer::new(
            true,
            Flights::default(),
            Some(store.clone()),
            process.clone(),
            Duration::from_secs(30),
        );
        let svc = StatusCacheLayer::new(Some(store.clone()), process).layer(coalesce.layer(
            tower::service_fn(|_r: Request<Bytes>| async {
                Ok::<_, GatewayError>(answer(
                    200,
                    r#"{"success":true,"data":{"account_id":"acc_1","status":"connected"}}"#,
                ))
            }),
        ));
        let mut r = req(Route::Checkpoint, Some("acc_1"));
        r.extensions_mut().get_mut::<RequestContext>().unwrap().code = Some(Arc::from("123456"));
        let resp = svc.oneshot(r).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(store.is_connected("acc_1").await);
        assert_eq!(store.parsed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let store = Arc::new(StatusStore::new(Duration::from_secs(600), 100));
        store
            .remember(Arc::from("acc_1"), CachedStatus::Connected)
            .await;
        tokio::time::advance(Duration::from_secs(599)).await;
        assert!(store.is_connected("acc_1").await);
        assert_eq!(store.counts(), (1, 0));
        // Learning again starts the ttl afresh.
        store
            .remember(Arc::from("acc_1"), CachedStatus::Connected)
            .await;
        tokio::time::advance(Duration::from_secs(599)).await;
        assert!(store.is_connected("acc_1").await);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.get("acc_1").await, None);
        assert_eq!(store.counts(), (0, 0));
        // An expired account's checkpoint goes to the upstream.
        let (svc, calls, _) = stack(&store, 200, "{}");
        svc.oneshot(req(Route::Checkpoint, Some("acc_1")))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_slot_keeps_the_store_until_its_size_or_ttl_change() {
        let slot = StatusStoreSlot::default();
        let s = |enabled, ttl, max_entries| StatusCacheSettings {
            enabled,
            ttl: Duration::from_secs(ttl),
            max_entries,
        };
        let a = slot.for_settings(&s(true, 60, 10)).unwrap();
        let b = slot.for_settings(&s(true, 60, 10)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = slot.for_settings(&s(true, 61, 10)).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(slot.for_settings(&s(false, 61, 10)).is_none());
        let d = slot.for_settings(&s(true, 61, 10)).unwrap();
        assert!(
            !Arc::ptr_eq(&c, &d),
            "switched off and on again: a fresh store"
        );
    }

    #[tokio::test]
    async fn switched_off_it_passes_everything_through() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let svc = StatusCacheLayer::new(None, Arc::new(Process::default())).layer(
            tower::service_fn(move |_r: Request<Bytes>| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, GatewayError>(answer(200, "{}")) }
            }),
        );
        svc.oneshot(req(Route::Checkpoint, Some("acc_1")))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
