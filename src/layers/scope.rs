//! scope: the caller's path scope, and its account scope on every route of the upstream's
//! surface. A client whose `accounts` is not `["*"]` never reads or changes anything of an
//! account outside its scope, whatever the endpoint:
//!
//! | route | rule for a scoped client |
//! |---|---|
//! | checkpoint, profiles … recruiter, `GET /v2/accounts/{id}`, `POST /v2/webhooks` | the request names one of its accounts |
//! | `GET /v2/accounts` | the gateway reads every page upstream and answers the client's accounts only (`total` too), paged by the caller's `limit`/`offset` |
//! | `GET /v2/webhooks` | the answer is filtered to the client's accounts (`total` too) |
//! | `/v2/webhooks/{id}/…` | the webhook's account is established first (learned from answers, or from the upstream's list) and must be the client's; otherwise 403 |
//! | `GET /v2/logs` | the request must name one of its accounts (`?account_id=`): the upstream filters it |
//! | `POST /v2/login` | refused: connecting an account is not scoped to accounts it already has |
//! | `GET /v2/credits`, `POST /v2/enrich` | allowed: they concern no account |
//!
//! Unscoped clients pass straight through; webhook answers teach the owner table whoever asks.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{header, Method, Request, Response, Uri};
use serde_json::Value;
use tower::{Layer, Service, ServiceExt};

use super::{take_ready, BoxFuture};
use crate::config::{AccountScope, ClientSettings};
use crate::context::{RequestContext, Route};
use crate::error::GatewayError;
use crate::shared::Shared;

/// The largest page `GET /v2/accounts` serves (its documented maximum), and the most pages the
/// gateway reads to answer a scoped client's list.
const ACCOUNTS_PAGE: usize = 500;
const MAX_ACCOUNT_PAGES: usize = 100;

/// The caller's path scope and, on routes that name an account, its account scope.
pub fn check_scope(
    client: &ClientSettings,
    path: &str,
    ctx: &RequestContext,
) -> Result<(), GatewayError> {
    if !client.paths.iter().any(|p| p.matches(path)) {
        return Err(GatewayError::Forbidden(format!(
            "client `{}` may not use {path}",
            client.name
        )));
    }
    if let Some(a) = &ctx.account_id {
        if !client.accounts.allows(a) {
            return Err(GatewayError::Forbidden(format!(
                "client `{}` may not act for account {a}",
                client.name
            )));
        }
    }
    Ok(())
}

/// What a scoped client's request needs before (and after) it is forwarded.
#[derive(Debug, PartialEq, Eq)]
enum Rule {
    /// Concerns no account.
    Free,
    /// Must name one of the client's accounts (checked by [`check_scope`]).
    NamesAccount,
    /// Answered from every upstream page, filtered.
    AccountList,
    /// Forwarded; the answer's items filtered.
    FilterItems,
    /// A webhook by id: its owner must be the client's.
    Webhook,
    /// Refused.
    Refused(&'static str),
}

fn rule(route: Route, method: &Method) -> Rule {
    match route {
        Route::Credits | Route::Enrich => Rule::Free,
        Route::Accounts => Rule::AccountList,
        Route::Webhooks if method == Method::GET => Rule::FilterItems,
        Route::Webhook => Rule::Webhook,
        Route::Login => Rule::Refused(
            "connecting an account (/v2/login) needs a client with accounts = [\"*\"]",
        ),
        // checkpoint, the action categories, account, POST webhooks, logs.
        _ => Rule::NamesAccount,
    }
}

#[derive(Clone)]
pub struct ScopeLayer {
    shared: Arc<Shared>,
}

impl ScopeLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        ScopeLayer { shared }
    }
}

impl<S> Layer<S> for ScopeLayer {
    type Service = Scope<S>;
    fn layer(&self, inner: S) -> Scope<S> {
        Scope {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Scope<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn forbidden(client: &ClientSettings, why: impl std::fmt::Display) -> GatewayError {
    GatewayError::Forbidden(format!("client `{}`: {why}", client.name))
}

impl<S> Service<Request<Bytes>> for Scope<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    /// The common case (unscoped, or a request that names its account) is the inner future
    /// itself, with no box of this layer's.
    type Future = Either<S::Future, BoxFuture<Result<Response<Bytes>, GatewayError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        match self.decide(req) {
            Ok(req) => Either::Left(self.inner.call(req)),
            Err(fut) => Either::Right(fut),
        }
    }
}

impl<S> Scope<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// `Ok`: forward as is; `Err`: the refusal, or the work around forwarding.
    #[allow(clippy::result_large_err)]
    fn decide(
        &mut self,
        req: Request<Bytes>,
    ) -> Result<Request<Bytes>, BoxFuture<Result<Response<Bytes>, GatewayError>>> {
        let (route, named, scoped) = {
            let (Some(client), Some(ctx)) = (
                req.extensions().get::<Arc<ClientSettings>>(),
                req.extensions().get::<RequestContext>(),
            ) else {
                return Ok(req);
            };
            if let Err(e) = check_scope(client, req.uri().path(), ctx) {
                return Err(Box::pin(async move { Err(e) }));
            }
            let scoped = matches!(client.accounts, AccountScope::Only(_));
            (ctx.route, ctx.account_id.is_some(), scoped)
        };
        let webhooks = matches!(route, Route::Webhooks | Route::Webhook);
        if !scoped {
            if !webhooks {
                return Ok(req);
            }
            // Unscoped: forwarded as is; a webhook answer still teaches the owner table.
            let fut = self.inner.call(req);
            let shared = self.shared.clone();
            return Err(Box::pin(async move {
                let resp = fut.await?;
                learn(&shared, &resp).await;
                Ok(resp)
            }));
        }
        let rule = rule(route, req.method());
        if rule == Rule::Free || (rule == Rule::NamesAccount && named) {
            return Ok(req);
        }
        let Some(client) = req.extensions().get::<Arc<ClientSettings>>().cloned() else {
            return Ok(req);
        };
        match rule {
            Rule::Free => Ok(req),
            Rule::Refused(why) => Err(Box::pin(async move { Err(forbidden(&client, why)) })),
            Rule::NamesAccount => Err(Box::pin(async move {
                Err(forbidden(
                    &client,
                    "the request must name one of the client's accounts (`account_id`)",
                ))
            })),
            Rule::FilterItems => {
                let fut = self.inner.call(req);
                let shared = self.shared.clone();
                Err(Box::pin(async move {
                    let resp = fut.await?;
                    learn(&shared, &resp).await;
                    Ok(filter_items(resp, &client.accounts))
                }))
            }
            Rule::Webhook => {
                let inner = take_ready(&mut self.inner);
                let shared = self.shared.clone();
                Err(Box::pin(webhook(inner, shared, client, req)))
            }
            Rule::AccountList => {
                let inner = self.inner.clone();
                Err(Box::pin(account_list(inner, client, req)))
            }
        }
    }
}

async fn learn(shared: &Shared, resp: &Response<Bytes>) {
    if resp.status().is_success() {
        shared.process.webhook_owners.learn(resp.body()).await;
    }
}

/// `/v2/webhooks/{id}/…` for a scoped client: establish the webhook's account, then forward.
async fn webhook<S>(
    mut inner: S,
    shared: Arc<Shared>,
    client: Arc<ClientSettings>,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
{
    let raw = req.uri().path().split('/').nth(3).unwrap_or("");
    let id = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    let owners = &shared.process.webhook_owners;
    let mut owner = owners.owner(&id).await;
    if owner.is_none() {
        // Not seen yet: the upstream's list says whose it is (free, the gateway's own call).
        match shared
            .upstream
            .get(&shared.settings.upstream, "/v2/webhooks")
            .await
        {
            Ok((status, body)) if status.is_success() => {
                owners.learn(&body).await;
                owner = owners.owner(&id).await;
            }
            Ok((status, _)) => {
                tracing::warn!(%status, "webhook owner lookup: GET /v2/webhooks failed")
            }
            Err(e) => tracing::warn!(error = %e, "webhook owner lookup: GET /v2/webhooks failed"),
        }
    }
    match owner {
        Some(a) if client.accounts.allows(&a) => {
            let resp = inner.call(req).await?;
            learn(&shared, &resp).await;
            Ok(resp)
        }
        Some(a) => Err(forbidden(
            &client,
            format_args!("webhook {id} belongs to account {a}, outside the client's accounts"),
        )),
        None => Err(forbidden(
            &client,
            format_args!("the account of webhook {id} cannot be established"),
        )),
    }
}

/// Keep only the `data.items` whose `account_id` the client may see, and count them in
/// `data.total`. An answer that is not a success list passes unchanged.
fn filter_items(resp: Response<Bytes>, scope: &AccountScope) -> Response<Bytes> {
    if !resp.status().is_success() {
        return resp;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(resp.body()) else {
        return resp;
    };
    let Some(data) = v.get_mut("data").and_then(Value::as_object_mut) else {
        return resp;
    };
    let Some(items) = data.get_mut("items").and_then(Value::as_array_mut) else {
        return resp;
    };
    items.retain(|i| in_scope(i, scope));
    let kept = items.len();
    if data.contains_key("total") {
        data.insert("total".into(), Value::from(kept));
    }
    rewrite(resp, &v)
}

fn in_scope(item: &Value, scope: &AccountScope) -> bool {
    item.get("account_id")
        .and_then(Value::as_str)
        .is_some_and(|a| scope.allows(a))
}

fn rewrite(resp: Response<Bytes>, v: &Value) -> Response<Bytes> {
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::from_parts(parts, Bytes::from(body))
}

/// `limit` and `offset` of the caller's query, as the upstream reads them (default 50 and 0).
fn page_of(query: Option<&str>) -> Result<(usize, usize), GatewayError> {
    let (mut limit, mut offset) = (50, 0);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let n = || {
            v.parse::<usize>()
                .map_err(|_| GatewayError::InvalidParams(format!("`{k}` must be a number")))
        };
        match &*k {
            "limit" => limit = n()?,
            "offset" => offset = n()?,
            _ => {}
        }
    }
    if !(1..=ACCOUNTS_PAGE).contains(&limit) {
        return Err(GatewayError::InvalidParams(format!(
            "`limit` must be between 1 and {ACCOUNTS_PAGE}"
        )));
    }
    Ok((limit, offset))
}

/// `GET /v2/accounts` for a scoped client: every upstream page read (each a request of its
/// own through the layers below: limited, free, in the ledger), the client's accounts kept, and
/// the caller's page of them answered with the first page's envelope.
async fn account_list<S>(
    inner: S,
    client: Arc<ClientSettings>,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, GatewayError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError> + Clone,
{
    let (limit, offset) = page_of(req.uri().query())?;
    let wanted = match &client.accounts {
        AccountScope::Only(list) => list.len(),
        AccountScope::Any => usize::MAX,
    };
    let (parts, _) = req.into_parts();
    let mut kept: Vec<Value> = Vec::new();
    let mut first: Option<(Response<()>, Value)> = None;
    let mut at = 0;
    for _ in 0..MAX_ACCOUNT_PAGES {
        let uri: Uri = format!("/v2/accounts?limit={ACCOUNTS_PAGE}&offset={at}")
            .parse()
            .map_err(|_| GatewayError::InvalidParams("bad account list page".into()))?;
        let mut page = Request::new(Bytes::new());
        *page.method_mut() = Method::GET;
        *page.uri_mut() = uri;
        *page.headers_mut() = parts.headers.clone();
        *page.extensions_mut() = parts.extensions.clone();
        let resp = inner.clone().oneshot(page).await?;
        if !resp.status().is_success() {
            return Ok(resp);
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(resp.body()) else {
            return Ok(resp);
        };
        let total = v["data"]["total"].as_u64().unwrap_or(0) as usize;
        let items = match v["data"]["items"].as_array_mut() {
            Some(items) => std::mem::take(items),
            None => return Ok(resp),
        };
        let n = items.len();
        kept.extend(items.into_iter().filter(|i| in_scope(i, &client.accounts)));
        if first.is_none() {
            first = Some((resp.map(|_| ()), v));
        }
        at += n;
        if n == 0 || at >= total || kept.len() >= wanted {
            let Some((head, mut v)) = first else {
                break;
            };
            let total = kept.len();
            let items: Vec<Value> = kept.into_iter().skip(offset).take(limit).collect();
            v["data"] = serde_json::json!({
                "items": items, "total": total, "limit": limit, "offset": offset,
            });
            return Ok(rewrite(head.map(|_| Bytes::new()), &v));
        }
    }
    Err(GatewayError::Forbidden(format!(
        "client `{}`: more than {} accounts upstream; list the client's accounts by id",
        client.name,
        ACCOUNTS_PAGE * MAX_ACCOUNT_PAGES
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::PathPattern;

    fn client(accounts: AccountScope, paths: &[&str]) -> ClientSettings {
        ClientSettings {
            name: Arc::from("crm"),
            keys: Vec::new(),
            cert_subject: None,
            accounts,
            paths: paths.iter().map(|p| PathPattern::new(p).unwrap()).collect(),
            daily_credit_budget: None,
            requests_per_second: None,
            burst: 1,
            shadow: false,
        }
    }

    fn ctx(account: Option<&str>) -> RequestContext {
        RequestContext {
            route: Route::Checkpoint,
            action: None,
            account_id: account.map(Arc::from),
            code: None,
        }
    }

    #[test]
    fn scopes_refuse_other_accounts_and_paths() {
        let c = client(
            AccountScope::Only(vec!["acc_1".into()]),
            &["/v2/checkpoint", "/v2/accounts/*"],
        );
        assert!(check_scope(&c, "/v2/checkpoint", &ctx(Some("acc_1"))).is_ok());
        let e = check_scope(&c, "/v2/checkpoint", &ctx(Some("acc_2"))).unwrap_err();
        assert_eq!(e.code(), "FORBIDDEN");
        let e = check_scope(&c, "/v2/messages", &ctx(Some("acc_1"))).unwrap_err();
        assert_eq!(e.code(), "FORBIDDEN");
    }

    #[test]
    fn every_route_of_the_surface_has_a_rule() {
        use crate::layers::classify::route_name;
        let surface = [
            (Method::POST, "/v2/login", Rule::Refused("")),
            (Method::POST, "/v2/checkpoint", Rule::NamesAccount),
            (Method::GET, "/v2/accounts", Rule::AccountList),
            (Method::GET, "/v2/accounts/a", Rule::NamesAccount),
            (Method::GET, "/v2/credits", Rule::Free),
            (Method::GET, "/v2/logs", Rule::NamesAccount),
            (Method::POST, "/v2/profiles", Rule::NamesAccount),
            (Method::POST, "/v2/network", Rule::NamesAccount),
            (Method::POST, "/v2/messages", Rule::NamesAccount),
            (Method::POST, "/v2/content", Rule::NamesAccount),
            (Method::POST, "/v2/recruiter", Rule::NamesAccount),
            (Method::POST, "/v2/enrich", Rule::Free),
            (Method::POST, "/v2/webhooks", Rule::NamesAccount),
            (Method::GET, "/v2/webhooks", Rule::FilterItems),
            (Method::PUT, "/v2/webhooks/w", Rule::Webhook),
            (Method::DELETE, "/v2/webhooks/w", Rule::Webhook),
            (Method::POST, "/v2/webhooks/w/stop", Rule::Webhook),
            (Method::POST, "/v2/webhooks/w/start", Rule::Webhook),
            (Method::POST, "/v2/webhooks/w/rotate-secret", Rule::Webhook),
            (Method::GET, "/v2/webhooks/w/events", Rule::Webhook),
            (Method::DELETE, "/v2/webhooks/w/secret", Rule::Webhook),
        ];
        for (m, path, want) in surface {
            let got = rule(route_name(&m, path), &m);
            match want {
                Rule::Refused(_) => assert!(matches!(got, Rule::Refused(_)), "{m} {path}"),
                want => assert_eq!(got, want, "{m} {path}"),
            }
        }
    }

    #[test]
    fn list_answers_keep_only_the_clients_accounts_and_count_them() {
        let body = r#"{"success":true,"data":{"items":[{"webhook_id":"w1","account_id":"a"},{"webhook_id":"w2","account_id":"b"},{"webhook_id":"w3"}],"total":3},"metadata":{"credits_consumed":0}}"#;
        let mut resp = Response::new(Bytes::from(body));
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, body.len().into());
        let out = filter_items(resp, &AccountScope::Only(vec!["a".into()]));
        assert!(!out.headers().contains_key(header::CONTENT_LENGTH));
        let v: Value = serde_json::from_slice(out.body()).unwrap();
        assert_eq!(v["data"]["total"], 1);
        assert_eq!(v["data"]["items"][0]["webhook_id"], "w1");
        assert_eq!(v["data"]["items"].as_array().unwrap().len(), 1);
        assert_eq!(v["metadata"]["credits_consumed"], 0);
    }

    #[test]
    fn pages_are_the_upstreams_limits() {
        assert_eq!(page_of(None).unwrap(), (50, 0));
        assert_eq!(page_of(Some("limit=2&offset=4")).unwrap(), (2, 4));
        assert!(page_of(Some("limit=0")).is_err());
        assert!(page_of(Some("limit=501")).is_err());
        assert!(page_of(Some("offset=x")).is_err());
    }
}
