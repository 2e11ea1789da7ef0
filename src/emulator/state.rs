//! The emulator's in-memory world (accounts, webhooks, balance, counters, faults, recorded
//! requests) and the `/v2` routes that act on it. Everything here is synchronous: the server
//! takes the one `Mutex<State>` for a handful of microseconds and never across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{FaultMode, Faults, RecordedRequest};

/// How many `/v2` requests `requests()` keeps.
pub(crate) const RECORDED_MAX: usize = 1000;

/// Per-action credit costs of the category endpoints and `/v2/enrich`. The upstream publishes
/// none of them (only checkpoint = 1 and account reads = 0 are documented); these are the
/// emulator's, chosen so that tests see different costs. `None`: the action does not exist.
pub fn action_cost(category: &str, action: &str) -> Option<i64> {
    let cost = match (category, action) {
        ("network", "decline" | "withdraw") => 0,
        (
            "profiles",
            "get" | "get_me" | "get_company" | "visit" | "get_contact" | "get_viewers"
            | "get_posts" | "get_comments" | "get_reactions",
        )
        | (
            "network",
            "invite" | "list_invitations" | "accept" | "list_connections" | "check_invitation",
        )
        | ("messages", "send" | "list_inbox" | "get_conversation")
        | ("content", "comment" | "answer_comment" | "react" | "repost")
        | ("enrich", "validate_email") => 1,
        ("profiles", "search_people" | "search_companies")
        | ("content", "create" | "create_company" | "search")
        | ("recruiter", "get_candidates")
        | ("enrich", "find_email" | "reverse_email") => 2,
        ("recruiter", "get_cv") => 3,
        _ => return None,
    };
    Some(cost)
}

const CATEGORIES: [&str; 5] = ["profiles", "network", "messages", "content", "recruiter"];

/// `2026-11-25T10:32:00Z`, the envelope's timestamp format (the gateway's own, shared).
pub(crate) fn now_ts() -> String {
    crate::util::now_rfc3339()
}

/// An error answer: HTTP status, envelope `error.code`, `error.message`.
#[derive(Debug)]
pub(crate) struct ApiErr {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiErr {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiErr {
            status,
            code,
            message: message.into(),
        }
    }
    fn params(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_PARAMS", message)
    }
    fn unknown_account(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "INVALID_ACCOUNT",
            format!("account {id} not found"),
        )
    }
    fn inactive(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "ACCOUNT_INACTIVE", message)
    }
}

/// What a `/v2` route answered: the `data` object and the credits it consumed.
pub(crate) type Answer = Result<(Value, i64), ApiErr>;

/// The `/v2` surface, decoded from method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Login,
    Checkpoint,
    ListAccounts,
    GetAccount(String),
    Credits,
    Logs,
    Category(&'static str),
    Enrich,
    WebhookCreate,
    WebhookList,
    WebhookUpdate(String),
    WebhookDelete(String),
    /// `POST /v2/webhooks/{id}/start` (true) or `/stop` (false).
    WebhookSetActive(String, bool),
    WebhookRotate(String),
    WebhookEvents(String),
    WebhookDeleteSecret(String),
    Unknown,
}

pub(crate) fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

impl Route {
    pub fn parse(method: &Method, path: &str) -> Route {
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Unknown;
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| decode(s);
        match (method, segs.as_slice()) {
            (&Method::POST, ["login"]) => Route::Login,
            (&Method::POST, ["checkpoint"]) => Route::Checkpoint,
            (&Method::GET, ["accounts"]) => Route::ListAccounts,
            (&Method::GET, ["accounts", a]) if !a.is_empty() => Route::GetAccount(id(a)),
            (&Method::GET, ["credits"]) => Route::Credits,
            (&Method::GET, ["logs"]) => Route::Logs,
            (&Method::POST, ["enrich"]) => Route::Enrich,
            (&Method::POST, ["webhooks"]) => Route::WebhookCreate,
            (&Method::POST, [c]) => match CATEGORIES.iter().find(|k| *k == c) {
                Some(k) => Route::Category(k),
                None => Route::Unknown,
            },
            (&Method::GET, ["webhooks"]) => Route::WebhookList,
            (_, ["webhooks", "", ..]) => Route::Unknown,
            (&Method::PUT, ["webhooks", w]) => Route::WebhookUpdate(id(w)),
            (&Method::DELETE, ["webhooks", w]) => Route::WebhookDelete(id(w)),
            (&Method::POST, ["webhooks", w, "stop"]) => Route::WebhookSetActive(id(w), false),
            (&Method::POST, ["webhooks", w, "start"]) => Route::WebhookSetActive(id(w), true),
            (&Method::POST, ["webhooks", w, "rotate-secret"]) => Route::WebhookRotate(id(w)),
            (&Method::GET, ["webhooks", w, "events"]) => Route::WebhookEvents(id(w)),
            (&Method::DELETE, ["webhooks", w, "secret"]) => Route::WebhookDeleteSecret(id(w)),
            _ => Route::Unknown,
        }
    }

    /// `metadata.action`: the body's `action` on category endpoints, a fixed name elsewhere.
    pub fn action(&self, body: Option<&Value>) -> String {
        let fixed = match self {
            Route::Login => "login",
            Route::Checkpoint => "checkpoint",
            Route::ListAccounts => "list_accounts",
            Route::GetAccount(_) => "get_account",
            Route::Credits => "get_credits",
            Route::Logs => "list_logs",
            Route::Category(c) => c,
            Route::Enrich => "enrich",
            Route::WebhookCreate => "create_webhook",
            Route::WebhookList => "list_webhooks",
            Route::WebhookUpdate(_) => "update_webhook",
            Route::WebhookDelete(_) => "delete_webhook",
            Route::WebhookSetActive(_, false) => "stop_webhook",
            Route::WebhookSetActive(_, true) => "start_webhook",
            Route::WebhookRotate(_) => "rotate_webhook_secret",
            Route::WebhookEvents(_) => "list_webhook_events",
            Route::WebhookDeleteSecret(_) => "delete_webhook_secret",
            Route::Unknown => "unknown",
        };
        if matches!(self, Route::Category(_) | Route::Enrich) {
            if let Some(a) = body.and_then(|b| b.get("action")).and_then(Value::as_str) {
                return a.to_owned();
            }
        }
        fixed.to_owned()
    }

    /// The account a request names (body, path or query), for the fault filter.
    pub fn named_account(&self, body: Option<&Value>, query: &str) -> Option<String> {
        if let Route::GetAccount(id) = self {
            return Some(id.clone());
        }
        if let Some(id) = body
            .and_then(|b| b.get("account_id"))
            .and_then(Value::as_str)
        {
            return Some(id.to_owned());
        }
        query_param(query, "account_id")
    }
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Challenge {
    Code,
    App,
}

impl Challenge {
    fn name(self) -> &'static str {
        match self {
            Challenge::Code => "code_challenge",
            Challenge::App => "app_challenge",
        }
    }
}

#[derive(Debug, Clone)]
struct Account {
    id: String,
    name: String,
    country: String,
    challenge: Challenge,
    connected: bool,
    approved: bool,
    active: bool,
    created_at: String,
    updated_at: String,
}

impl Account {
    fn status(&self) -> &'static str {
        if !self.active {
            "inactive"
        } else if self.connected {
            "active"
        } else {
            "checkpoint_required"
        }
    }

    fn item(&self) -> Value {
        json!({
            "account_id": self.id,
            "platform": "linkedin",
            "account_name": self.name,
            "is_active": self.active,
            "status": self.status(),
            "country": self.country,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }
}

#[derive(Debug, Clone)]
struct Webhook {
    id: String,
    account_id: String,
    url: Option<String>,
    events: Value,
    retry: bool,
    is_active: bool,
    secret: Option<String>,
    created_at: String,
}

impl Webhook {
    fn item(&self) -> Value {
        json!({
            "webhook_id": self.id,
            "account_id": self.account_id,
            "url": self.url,
            "mode": if self.url.is_some() { "push" } else { "hosted" },
            "events": self.events,
            "retry": self.retry,
            "is_active": self.is_active,
            "signature_enabled": self.secret.is_some(),
            "created_at": self.created_at,
        })
    }
}

fn new_secret() -> String {
    format!("whsec_{}", hex::encode(rand::random::<[u8; 24]>()))
}

fn short_id(input: &str) -> String {
    let mut h = hex::encode(Sha256::digest(input.as_bytes()));
    h.truncate(24);
    h
}

fn non_empty_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

fn object(body: Option<&Value>) -> Result<&Map<String, Value>, ApiErr> {
    body.and_then(Value::as_object)
        .ok_or_else(|| ApiErr::params("the body must be a JSON object"))
}

fn account_id_of(obj: &Map<String, Value>) -> Result<&str, ApiErr> {
    non_empty_str(obj, "account_id").ok_or_else(|| ApiErr::params("account_id is required"))
}

/// `limit` / `offset` (or `count` / `offset`) pagination from the query string.
fn page(query: &str, default: usize) -> Result<(usize, usize), ApiErr> {
    let num = |name: &str| -> Result<Option<usize>, ApiErr> {
        match query_param(query, name) {
            None => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .map(Some)
                .map_err(|_| ApiErr::params(format!("{name} must be a non-negative integer"))),
        }
    };
    let limit = num("limit")?.unwrap_or(default);
    if !(1..=500).contains(&limit) {
        return Err(ApiErr::params("limit must be between 1 and 500"));
    }
    Ok((limit, num("offset")?.unwrap_or(0)))
}

/// Everything the emulator remembers.
pub(crate) struct State {
    pub balance: i64,
    pub credits_charged: i64,
    pub total_calls: u64,
    pub calls_by_path: BTreeMap<String, u64>,
    pub checkpoint_calls_by_account: BTreeMap<String, u64>,
    pub faults: Faults,
    pub requests: VecDeque<RecordedRequest>,
    accounts: Vec<Account>,
    index: HashMap<String, usize>,
    webhooks: BTreeMap<String, Webhook>,
    next_webhook: u64,
}

impl State {
    pub fn new(balance: i64) -> Self {
        State {
            balance,
            credits_charged: 0,
            total_calls: 0,
            calls_by_path: BTreeMap::new(),
            checkpoint_calls_by_account: BTreeMap::new(),
            faults: Faults::default(),
            requests: VecDeque::with_capacity(64),
            accounts: Vec::new(),
            index: HashMap::new(),
            webhooks: BTreeMap::new(),
            next_webhook: 1,
        }
    }

    /// Counts and records one `/v2` request as it arrives.
    pub fn record(
        &mut self,
        request: RecordedRequest,
        path: &str,
        route: &Route,
        body: Option<&Value>,
    ) {
        self.total_calls += 1;
        let key = format!("{} {}", request.method, path);
        *self.calls_by_path.entry(key).or_insert(0) += 1;
        if *route == Route::Checkpoint {
            if let Some(id) = body
                .and_then(|b| b.get("account_id"))
                .and_then(Value::as_str)
            {
                *self
                    .checkpoint_calls_by_account
                    .entry(id.to_owned())
                    .or_insert(0) += 1;
            }
        }
        if self.requests.len() >= RECORDED_MAX {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    /// The latency to add and the fault to play for a request naming `account`:
    /// `(latency_ms, mode, slow_ms, big_answer_bytes, stall_big_answers)`. A fault with a `count` is used up by
    /// matching requests and then switches itself off.
    pub fn take_fault(&mut self, account: Option<&str>) -> (u64, FaultMode, u64, u64, bool) {
        let f = &mut self.faults;
        let matches = match f.account_id.as_deref() {
            None => true,
            Some(want) => account == Some(want),
        };
        if !matches {
            return (0, FaultMode::None, 0, 0, false);
        }
        let mode = f.mode;
        if mode != FaultMode::None && f.count > 0 {
            f.count -= 1;
            if f.count == 0 {
                f.mode = FaultMode::None;
            }
        }
        (
            f.latency_ms,
            mode,
            f.slow_ms,
            f.big_answer_bytes,
            f.stall_big_answers,
        )
    }

    /// The `credits_consumed` a successful answer for `account` carries instead of the price.
    pub fn credits_override(&self, account: Option<&str>) -> Option<serde_json::Value> {
        let f = &self.faults;
        match f.account_id.as_deref() {
            Some(want) if account != Some(want) => None,
            _ => f.credits_consumed.clone(),
        }
    }

    /// Clears counters, recorded requests and faults; accounts, webhooks and balance stay.
    pub fn reset(&mut self) {
        self.credits_charged = 0;
        self.total_calls = 0;
        self.calls_by_path.clear();
        self.checkpoint_calls_by_account.clear();
        self.faults = Faults::default();
        self.requests.clear();
    }

    pub fn approve(&mut self, id: &str) -> bool {
        match self.account_mut(id) {
            Some(a) => {
                a.approved = true;
                a.updated_at = now_ts();
                true
            }
            None => false,
        }
    }

    pub fn set_active(&mut self, id: &str, active: bool) -> bool {
        match self.account_mut(id) {
            Some(a) => {
                a.active = active;
                a.updated_at = now_ts();
                true
            }
            None => false,
        }
    }

    fn account(&self, id: &str) -> Result<&Account, ApiErr> {
        self.index
            .get(id)
            .and_then(|i| self.accounts.get(*i))
            .ok_or_else(|| ApiErr::unknown_account(id))
    }

    fn account_mut(&mut self, id: &str) -> Option<&mut Account> {
        let i = *self.index.get(id)?;
        self.accounts.get_mut(i)
    }

    /// Takes `cost` credits from the balance, or refuses (and takes nothing).
    fn charge(&mut self, cost: i64) -> Result<(), ApiErr> {
        if self.balance < cost {
            return Err(ApiErr::new(
                StatusCode::PAYMENT_REQUIRED,
                "INSUFFICIENT_CREDITS",
                format!(
                    "this action costs {cost} credits and the balance is {}",
                    self.balance
                ),
            ));
        }
        self.balance -= cost;
        self.credits_charged += cost;
        Ok(())
    }

    /// Answers one authenticated `/v2` request.
    pub fn dispatch(
        &mut self,
        code: &str,
        route: &Route,
        body: Option<&Value>,
        query: &str,
    ) -> Answer {
        match route {
            Route::Login => self.login(body),
            Route::Checkpoint => self.checkpoint(code, body),
            Route::ListAccounts => {
                let (limit, offset) = page(query, 50)?;
                let items: Vec<Value> = self
                    .accounts
                    .iter()
                    .skip(offset)
                    .take(limit)
                    .map(Account::item)
                    .collect();
                let total = self.accounts.len();
                Ok((
                    json!({"items": items, "total": total, "limit": limit, "offset": offset}),
                    0,
                ))
            }
            Route::GetAccount(id) => Ok((self.account(id)?.item(), 0)),
            Route::Credits => Ok((json!({ "credits": self.balance }), 0)),
            Route::Logs => {
                let (limit, offset) = page(query, 50)?;
                Ok((
                    json!({"items": [], "total": 0, "limit": limit, "offset": offset}),
                    0,
                ))
            }
            Route::Category(category) => self.category(category, body),
            Route::Enrich => self.enrich(body),
            Route::WebhookCreate => self.webhook_create(body),
            Route::WebhookList => {
                let want = query_param(query, "account_id");
                let items: Vec<Value> = self
                    .webhooks
                    .values()
                    .filter(|w| match want.as_deref() {
                        None => true,
                        Some(a) => a == w.account_id,
                    })
                    .map(Webhook::item)
                    .collect();
                let total = items.len();
                Ok((json!({"items": items, "total": total}), 0))
            }
            Route::WebhookUpdate(id) => {
                let obj = object(body)?;
                let w = self.webhook_mut(id)?;
                if let Some(url) = obj.get("url") {
                    w.url = url.as_str().map(str::to_owned);
                }
                if let Some(events) = obj.get("events") {
                    w.events = events.clone();
                }
                if let Some(retry) = obj.get("retry").and_then(Value::as_bool) {
                    w.retry = retry;
                }
                if let Some(active) = obj.get("is_active").and_then(Value::as_bool) {
                    w.is_active = active;
                }
                Ok((w.item(), 0))
            }
            Route::WebhookDelete(id) => match self.webhooks.remove(id) {
                Some(_) => Ok((json!({"webhook_id": id, "deleted": true}), 0)),
                None => Err(unknown_webhook(id)),
            },
            Route::WebhookSetActive(id, active) => {
                let w = self.webhook_mut(id)?;
                w.is_active = *active;
                Ok((w.item(), 0))
            }
            Route::WebhookRotate(id) => {
                let w = self.webhook_mut(id)?;
                let secret = new_secret();
                w.secret = Some(secret.clone());
                Ok((json!({"webhook_id": id, "secret": secret}), 0))
            }
            Route::WebhookDeleteSecret(id) => {
                let w = self.webhook_mut(id)?;
                w.secret = None;
                Ok((w.item(), 0))
            }
            Route::WebhookEvents(id) => {
                self.webhook_mut(id)?;
                Ok((json!({"events": [], "next_cursor": null}), 0))
            }
            Route::Unknown => Err(ApiErr::new(
                StatusCode::NOT_FOUND,
                "INVALID_ACCOUNT",
                "not found",
            )),
        }
    }

    fn login(&mut self, body: Option<&Value>) -> Answer {
        let obj = object(body)?;
        if let Some(p) = obj.get("platform") {
            if p.as_str() != Some("linkedin") {
                return Err(ApiErr::params("platform must be \"linkedin\""));
            }
        }
        let challenge = match obj.get("challenge_type").map(Value::as_str) {
            None | Some(Some("code_challenge")) => Challenge::Code,
            Some(Some("app_challenge")) => Challenge::App,
            Some(_) => {
                return Err(ApiErr::params(
                    "challenge_type must be code_challenge or app_challenge",
                ))
            }
        };
        let country = non_empty_str(obj, "country").unwrap_or("FR").to_owned();
        let name = non_empty_str(obj, "account_name");
        let (id, connected, default_name) = if let Some(token) = non_empty_str(obj, "login_token") {
            (short_id(token), true, "LinkedIn account".to_owned())
        } else {
            match (non_empty_str(obj, "email"), non_empty_str(obj, "password")) {
                (Some(email), Some(_)) => {
                    let email = email.trim().to_ascii_lowercase();
                    (short_id(&format!("email:{email}")), false, email)
                }
                _ => {
                    return Err(ApiErr::params(
                        "send either login_token, or email and password",
                    ))
                }
            }
        };
        let now = now_ts();
        match self.account_mut(&id) {
            Some(a) => {
                a.connected = connected;
                a.approved = false;
                a.challenge = challenge;
                a.country = country;
                if let Some(n) = name {
                    a.name = n.to_owned();
                }
                a.updated_at = now;
            }
            None => {
                self.index.insert(id.clone(), self.accounts.len());
                self.accounts.push(Account {
                    id: id.clone(),
                    name: name.map_or(default_name, str::to_owned),
                    country,
                    challenge,
                    connected,
                    approved: false,
                    active: true,
                    created_at: now.clone(),
                    updated_at: now,
                });
            }
        }
        let data = if connected {
            json!({"account_id": id, "status": "connected", "platform": "linkedin"})
        } else {
            json!({"account_id": id, "status": "checkpoint_required",
                   "challenge_type": challenge.name(), "platform": "linkedin"})
        };
        Ok((data, 0))
    }

    fn checkpoint(&mut self, right_code: &str, body: Option<&Value>) -> Answer {
        let obj = object(body)?;
        let id = account_id_of(obj)?;
        let acc = self.account(id)?;
        if !acc.active {
            return Err(ApiErr::inactive(format!("account {id} is inactive")));
        }
        let (connected, challenge, approved) = (acc.connected, acc.challenge, acc.approved);
        let code = match obj.get("code") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let now_connected = connected
            || match challenge {
                Challenge::App => approved,
                Challenge::Code => match code {
                    Some(c) if c == right_code => true,
                    Some(_) => return Err(ApiErr::params("the verification code is wrong")),
                    None => return Err(ApiErr::params("code is required for code_challenge")),
                },
            };
        self.charge(1)?;
        if now_connected && !connected {
            if let Some(a) = self.account_mut(id) {
                a.connected = true;
                a.updated_at = now_ts();
            }
        }
        let status = if now_connected {
            "connected"
        } else {
            "checkpoint_required"
        };
        Ok((json!({"account_id": id, "status": status}), 1))
    }

    fn category(&mut self, category: &'static str, body: Option<&Value>) -> Answer {
        let obj = object(body)?;
        let id = account_id_of(obj)?;
        let acc = self.account(id)?;
        if !acc.active {
            return Err(ApiErr::inactive(format!("account {id} is inactive")));
        }
        if !acc.connected {
            return Err(ApiErr::inactive(format!(
                "account {id} is not connected (checkpoint_required)"
            )));
        }
        let action =
            non_empty_str(obj, "action").ok_or_else(|| ApiErr::params("action is required"))?;
        let cost = action_cost(category, action).ok_or_else(|| {
            ApiErr::new(
                StatusCode::BAD_REQUEST,
                "INVALID_ACTION",
                format!("action {action} is not supported on /v2/{category}"),
            )
        })?;
        self.charge(cost)?;
        let params = obj.get("params").cloned().unwrap_or_else(|| json!({}));
        let data = json!({
            "account_id": id,
            "action": action,
            "category": category,
            "params": params,
            "result_id": short_id(&format!("{id}/{category}/{action}")),
        });
        Ok((data, cost))
    }

    fn enrich(&mut self, body: Option<&Value>) -> Answer {
        let obj = object(body)?;
        let action =
            non_empty_str(obj, "action").ok_or_else(|| ApiErr::params("action is required"))?;
        let cost = action_cost("enrich", action).ok_or_else(|| {
            ApiErr::new(
                StatusCode::BAD_REQUEST,
                "INVALID_ACTION",
                format!("action {action} is not supported on /v2/enrich"),
            )
        })?;
        self.charge(cost)?;
        let params = obj.get("params").cloned().unwrap_or_else(|| json!({}));
        Ok((json!({"action": action, "params": params}), cost))
    }

    fn webhook_create(&mut self, body: Option<&Value>) -> Answer {
        let obj = object(body)?;
        let account_id = account_id_of(obj)?;
        self.account(account_id)?;
        let url = match obj.get("url") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) if u.starts_with("https://") || u.starts_with("http://") => {
                Some(u.clone())
            }
            Some(_) => return Err(ApiErr::params("url must be an http(s) URL")),
        };
        let id = format!("wh_{:016x}", self.next_webhook);
        self.next_webhook += 1;
        let signed = obj.get("enable_signature").and_then(Value::as_bool) == Some(true);
        let w = Webhook {
            id: id.clone(),
            account_id: account_id.to_owned(),
            url,
            events: obj.get("events").cloned().unwrap_or_else(|| json!(["all"])),
            retry: obj.get("retry").and_then(Value::as_bool).unwrap_or(true),
            is_active: true,
            secret: signed.then(new_secret),
            created_at: now_ts(),
        };
        let mut data = w.item();
        if let (Some(secret), Some(map)) = (&w.secret, data.as_object_mut()) {
            map.insert("secret".into(), Value::String(secret.clone()));
        }
        self.webhooks.insert(id, w);
        Ok((data, 0))
    }

    fn webhook_mut(&mut self, id: &str) -> Result<&mut Webhook, ApiErr> {
        self.webhooks.get_mut(id).ok_or_else(|| unknown_webhook(id))
    }
}

fn unknown_webhook(id: &str) -> ApiErr {
    ApiErr::new(
        StatusCode::NOT_FOUND,
        "INVALID_ACCOUNT",
        format!("webhook {id} not found"),
    )
}
