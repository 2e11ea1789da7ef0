//! coalesce: single flight for `POST /v2/checkpoint`. A 2FA code is single-use upstream and
//! every submit costs a credit, so while a checkpoint for account A with code C (no code: app
//! approval) is in flight, every identical submit waits for it and gets a copy of its status,
//! headers and body with `x-gateway-coalesced: true` (or the same error). One upstream call,
//! one credit, one ledger row.
//!
//! A submit for A with another code waits until the call in flight has finished, then goes on
//! (and is answered from the status cache if that call connected A): the upstream never has
//! two checkpoints for one account in flight.
//!
//! The upstream call belongs to no caller: the leader's whole work (the status re-check, in
//! fleet mode the wait for another replica's call, the call itself, bounded by
//! `request_timeout`, and publishing its answer) runs on its own task, so the first caller
//! hanging up at any point neither fails the others nor stops the call from being recorded; that task also teaches the status cache, before it releases
//! anyone. A waiter gives up after `request_timeout` too. The map of
//! calls in flight ([`Flights`]) lives in the process, so a SIGHUP reload does not split it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;

use super::status_cache::{self, StatusStore};
use super::{take_ready, BoxFuture};
use crate::config::OnFailure;
use crate::context::{AnsweredBy, RequestContext, RequestLog, Route, StatusLearnt};
use crate::error::GatewayError;
use crate::fleet::{FlightRole, RemoteAnswer};
use crate::shared::Process;

pub const X_GATEWAY_COALESCED: &str = "x-gateway-coalesced";

/// A finished upstream call as every waiter gets it: `Response` is not `Clone`, its parts are
/// (and the body is a cheap `Bytes` clone).
enum Outcome {
    Answer {
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
    },
    Failed(GatewayError),
    /// No call was made: the account turned out connected (see `Role::Lead`), so everyone is
    /// answered from the status cache.
    Connected,
}

impl Outcome {
    /// Another replica's answer (fleet mode).
    fn from_remote(a: RemoteAnswer) -> Outcome {
        match a {
            RemoteAnswer::Answer {
                status,
                headers,
                body,
            } => Outcome::Answer {
                status,
                version: Version::HTTP_11,
                headers,
                body,
            },
            RemoteAnswer::Failed {
                timeout: Some(t), ..
            } => Outcome::Failed(GatewayError::UpstreamTimeout(t)),
            RemoteAnswer::Failed { message, .. } => {
                Outcome::Failed(GatewayError::UpstreamUnavailable {
                    message,
                    maybe_sent: true,
                })
            }
        }
    }

    /// What the other replicas get; `None`: nothing to share (a refusal of this caller, or no
    /// call), they go on by themselves.
    fn to_remote(&self) -> Option<RemoteAnswer> {
        match self {
            Outcome::Answer {
                status,
                headers,
                body,
                ..
            } => Some(RemoteAnswer::Answer {
                status: *status,
                headers: headers.clone(),
                body: body.clone(),
            }),
            Outcome::Failed(GatewayError::UpstreamTimeout(t)) => Some(RemoteAnswer::Failed {
                timeout: Some(*t),
                message: GatewayError::UpstreamTimeout(*t).to_string(),
            }),
            Outcome::Failed(GatewayError::UpstreamUnavailable { message, .. }) => {
                Some(RemoteAnswer::Failed {
                    timeout: None,
                    message: message.clone(),
                })
            }
            // The call was made; the other replicas' submits must not make it again.
            Outcome::Failed(e @ GatewayError::AnswerOverBudget { .. }) => {
                Some(RemoteAnswer::Failed {
                    timeout: None,
                    message: e.to_string(),
                })
            }
            Outcome::Failed(_) | Outcome::Connected => None,
        }
    }

    fn of(result: &Result<Response<Bytes>, GatewayError>) -> Outcome {
        match result {
            Ok(r) => Outcome::Answer {
                status: r.status(),
                version: r.version(),
                headers: r.headers().clone(),
                body: r.body().clone(),
            },
            Err(e) => Outcome::Failed(e.clone()),
        }
    }

    /// The follower's copy.
    fn copy(&self) -> Result<Response<Bytes>, GatewayError> {
        match self {
            Outcome::Answer {
                status,
                version,
                headers,
                body,
            } => {
                let mut resp = Response::new(body.clone());
                *resp.status_mut() = *status;
                *resp.version_mut() = *version;
                *resp.headers_mut() = headers.clone();
                resp.headers_mut()
                    .insert(X_GATEWAY_COALESCED, HeaderValue::from_static("true"));
                resp.extensions_mut().insert(AnsweredBy::Coalesced);
                Ok(resp)
            }
            Outcome::Failed(e) => Err(e.clone()),
            Outcome::Connected => Err(abandoned()),
        }
    }
}

/// `None` until the call has finished.
type Done = watch::Receiver<Option<Arc<Outcome>>>;

struct Flight {
    code: Option<Arc<str>>,
    done: Done,
    /// Submits that joined this call, and submits with another code waiting for it to end
    /// (for tests and logs).
    joined: usize,
    waiting: usize,
}

/// Checkpoint calls in flight, one at most per account. A std `Mutex`: it is held for a map
/// operation, never across an `.await`.
#[derive(Clone, Default)]
pub struct Flights(Arc<Mutex<HashMap<Arc<str>, Flight>>>);

enum Role {
    /// Nothing in flight for the account: this submit makes the call. The guard takes the
    /// entry out again, whatever happens to the call.
    Lead(watch::Sender<Option<Arc<Outcome>>>, FlightGuard),
    /// The same code is in flight: share its answer.
    Follow(Done),
    /// Another code is in flight: wait for it to finish, then try again.
    Wait(Done),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Flight>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join(&self, account: &Arc<str>, code: &Option<Arc<str>>) -> Role {
        let mut map = self.lock();
        match map.get_mut(account) {
            Some(f) if f.code == *code => {
                f.joined += 1;
                Role::Follow(f.done.clone())
            }
            Some(f) => {
                f.waiting += 1;
                Role::Wait(f.done.clone())
            }
            None => {
                let (tx, done) = watch::channel(None);
                map.insert(
                    account.clone(),
                    Flight {
                        code: code.clone(),
                        done,
                        joined: 0,
                        waiting: 0,
                    },
                );
                let guard = FlightGuard {
                    flights: self.clone(),
                    account: account.clone(),
                };
                Role::Lead(tx, guard)
            }
        }
    }

    /// Accounts with a checkpoint in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// How many submits have joined the call in flight for `account` (`None`: nothing in
    /// flight).
    pub fn joined(&self, account: &str) -> Option<usize> {
        self.lock().get(account).map(|f| f.joined)
    }

    /// How many submits with another code have waited for the call in flight for `account`.
    pub fn waiting(&self, account: &str) -> Option<usize> {
        self.lock().get(account).map(|f| f.waiting)
    }
}

/// Takes the account's entry out of the map when dropped: after the call (answer, error,
/// timeout), and also when the task panics or is cancelled, so no account is ever stuck.
struct FlightGuard {
    flights: Flights,
    account: Arc<str>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.flights.lock().remove(&self.account);
    }
}

/// Until the call has finished: its outcome, or `None` when it ended without one (its task
/// panicked or the runtime is going down).
async fn finished(mut done: Done) -> Option<Arc<Outcome>> {
    let r = done.wait_for(Option::is_some).await;
    r.ok().and_then(|v| v.clone())
}

fn abandoned() -> GatewayError {
    GatewayError::UpstreamUnavailable {
        message: "the shared checkpoint call ended without an answer".into(),
        maybe_sent: true,
    }
}

/// The leader's work, on its own task: what every local waiter gets, and what the leading
/// caller gets.
struct Lead {
    cfg: CoalesceLayer,
    account: Arc<str>,
    code: Option<Arc<str>>,
    log: Option<Arc<RequestLog>>,
    deadline: Instant,
}

type Led = (Arc<Outcome>, Result<Response<Bytes>, GatewayError>);

impl Lead {
    /// Answered from the status cache: no call.
    fn connected(&self) -> Led {
        (
            Arc::new(Outcome::Connected),
            Ok(status_cache::hit(
                &self.account,
                self.log.as_ref(),
                &self.cfg.process,
            )),
        )
    }

    async fn is_connected(&self) -> bool {
        match &self.cfg.store {
            Some(store) => store.is_connected(&self.account).await,
            None => false,
        }
    }

    async fn run<S>(self, mut inner: S, req: Request<Bytes>) -> Led
    where
        S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
    {
        let cfg = &self.cfg;
        let timeout = cfg.request_timeout;
        // The status_cache layer looked before this submit joined; a call that ended in
        // between taught the cache before it left the map, so a second look here closes that
        // gap.
        if self.is_connected().await {
            return self.connected();
        }
        // Fleet mode: one call for the whole fleet. Only this task (the local leader) talks to
        // the store; local followers wait on the flight's channel.
        let mut lease = None;
        if let Some(fleet) = &cfg.process.fleet {
            loop {
                if !fleet.is_up() {
                    fleet.fell_back("coalesce", OnFailure::Local);
                    break;
                }
                match fleet
                    .flight(&self.account, self.code.as_deref(), self.deadline)
                    .await
                {
                    Ok(FlightRole::Leader(l)) => {
                        if l.took_over() {
                            // The leader whose lease lapsed may have connected the account
                            // (it teaches the status cache before it publishes): look again,
                            // afresh, before calling with a single-use code.
                            fleet.status_drop_local(&self.account).await;
                            if self.is_connected().await {
                                let _ = l.release().await;
                                return self.connected();
                            }
                        }
                        lease = Some(l);
                        break;
                    }
                    Ok(FlightRole::Answer(a)) => {
                        let outcome = Arc::new(Outcome::from_remote(a));
                        if let Some(log) = &self.log {
                            log.set_credits(0);
                        }
                        cfg.process.metrics.checkpoint_coalesced.inc();
                        let mine = outcome.copy();
                        return (outcome, mine);
                    }
                    Ok(FlightRole::Ended) => {
                        // Another code's call ended on another replica; it may have connected
                        // the account.
                        if self.is_connected().await {
                            return self.connected();
                        }
                    }
                    Ok(FlightRole::TimedOut) => {
                        let e = GatewayError::UpstreamTimeout(timeout);
                        return (Arc::new(Outcome::Failed(e.clone())), Err(e));
                    }
                    Err(_) => {
                        fleet.fell_back("coalesce", OnFailure::Local);
                        break;
                    }
                }
            }
        }
        let mut result = match tokio::time::timeout(timeout, inner.call(req)).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
        };
        // The call's owner teaches the cache before anyone is released: a waiter re-checking
        // it must see what this call learnt, and a first caller that hung up must not take the
        // lesson with it.
        if let (Some(store), Ok(resp)) = (&cfg.store, &mut result) {
            store
                .learn(Route::Checkpoint, Some(&self.account), resp)
                .await;
            resp.extensions_mut().insert(StatusLearnt);
        }
        let outcome = Arc::new(Outcome::of(&result));
        // The other replicas' followers get it too (published on its own task, patiently), or,
        // for a refusal of this caller, the lease back.
        if let Some(lease) = lease {
            match outcome.to_remote() {
                Some(remote) => drop(lease.publish(&remote)),
                None => {
                    let _ = lease.release().await;
                }
            }
        }
        (outcome, result)
    }
}

#[derive(Clone)]
pub struct CoalesceLayer {
    enabled: bool,
    flights: Flights,
    /// Re-checked after waiting for another code's call, which may have connected the account.
    store: Option<Arc<StatusStore>>,
    process: Arc<Process>,
    request_timeout: Duration,
}

impl CoalesceLayer {
    pub fn new(
        enabled: bool,
        flights: Flights,
        store: Option<Arc<StatusStore>>,
        process: Arc<Process>,
        request_timeout: Duration,
    ) -> Self {
        CoalesceLayer {
            enabled,
            flights,
            store,
            process,
            request_timeout,
        }
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;
    fn layer(&self, inner: S) -> Coalesce<S> {
        Coalesce {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Coalesce<S> {
    inner: S,
    cfg: CoalesceLayer,
}

impl<S> Service<Request<Bytes>> for Coalesce<S>
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
        if !self.cfg.enabled {
            return Box::pin(self.inner.call(req));
        }
        let (account, code) = match req.extensions().get::<RequestContext>() {
            Some(RequestContext {
                route: Route::Checkpoint,
                account_id: Some(account),
                code,
                ..
            }) => (account.clone(), code.clone()),
            _ => return Box::pin(self.inner.call(req)),
        };
        let inner = take_ready(&mut self.inner);
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let timeout = cfg.request_timeout;
            let deadline = Instant::now() + timeout;
            let log = req.extensions().get::<Arc<RequestLog>>().cloned();
            loop {
                match cfg.flights.join(&account, &code) {
                    Role::Lead(tx, guard) => {
                        // Everything the leader does (the status re-check, the fleet flight,
                        // the upstream call, publishing) runs on its own task from here on:
                        // this caller hanging up at any point must not fail the local
                        // followers waiting on `tx`.
                        let (mine_tx, mine) = oneshot::channel();
                        let lead = Lead {
                            cfg: cfg.clone(),
                            account: account.clone(),
                            code: code.clone(),
                            log: log.clone(),
                            deadline,
                        };
                        let task = async move {
                            let (outcome, result) = lead.run(inner, req).await;
                            // The entry goes before the answer: a submit arriving from now on
                            // starts afresh instead of taking a finished answer.
                            drop(guard);
                            tx.send_replace(Some(outcome));
                            let _ = mine_tx.send(result);
                        };
                        tokio::spawn(task.in_current_span());
                        return match tokio::time::timeout_at(deadline, mine).await {
                            Ok(Ok(result)) => result,
                            Ok(Err(_)) => Err(abandoned()),
                            Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
                        };
                    }
                    Role::Follow(done) => {
                        if let Some(log) = &log {
                            log.set_credits(0);
                        }
                        tracing::debug!(account = %account, "checkpoint coalesced");
                        let outcome = match tokio::time::timeout_at(deadline, finished(done)).await
                        {
                            Ok(Some(outcome)) => outcome,
                            Ok(None) => return Err(abandoned()),
                            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout)),
                        };
                        if let Outcome::Connected = *outcome {
                            return Ok(status_cache::hit(&account, log.as_ref(), &cfg.process));
                        }
                        cfg.process.metrics.checkpoint_coalesced.inc();
                        return outcome.copy();
                    }
                    Role::Wait(done) => {
                        tracing::debug!(
                            account = %account,
                            "another code is in flight for this account; waiting for it"
                        );
                        if tokio::time::timeout_at(deadline, finished(done))
                            .await
                            .is_err()
                        {
                            return Err(GatewayError::UpstreamTimeout(timeout));
                        }
                        if let Some(store) = &cfg.store {
                            if store.is_connected(&account).await {
                                return Ok(status_cache::hit(&account, log.as_ref(), &cfg.process));
                            }
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
