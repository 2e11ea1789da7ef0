//! classify: which route, which action, which account. Reads `account_id` from the top level
//! of a JSON body, from `/v2/accounts/{id}` or from the `account_id` query parameter, and the
//! `action` from the body (the caller's scopes are `scope`'s).
//! The result travels down as a `RequestContext` extension; nothing below re-parses.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use tower::{Layer, Service};

use super::BoxFuture;
use crate::context::{RequestContext, RequestLog, Route};
use crate::error::GatewayError;

/// Where a route names its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Account {
    /// Top level of a JSON body, which must then be an object.
    Body,
    /// A JSON body with an optional `action` and no account (enrich).
    ActionOnly,
    /// `/v2/accounts/{account_id}`.
    Path,
    /// None besides the optional `account_id` query parameter.
    None,
}

/// The upstream's surface: route name and where its account is, or 404/405.
fn resolve(method: &Method, path: &str) -> Result<(Route, Account), GatewayError> {
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    // At most four segments matter; no allocation on the hot path.
    let mut buf = [""; 4];
    let mut n = 0;
    for seg in rest.split('/') {
        if n == buf.len() {
            n += 1;
            break;
        }
        buf[n] = seg;
        n += 1;
    }
    let segs: &[&str] = if n > buf.len() {
        &["", "", "", "", ""]
    } else {
        &buf[..n]
    };
    let m = method.as_str();
    let (route, allowed, account): (Route, &[&str], Account) = match segs {
        ["login"] => (Route::Login, &["POST"], Account::None),
        ["checkpoint"] => (Route::Checkpoint, &["POST"], Account::Body),
        ["accounts"] => (Route::Accounts, &["GET"], Account::None),
        ["accounts", id] if !id.is_empty() => (Route::Account, &["GET"], Account::Path),
        ["credits"] => (Route::Credits, &["GET"], Account::None),
        ["logs"] => (Route::Logs, &["GET"], Account::None),
        ["profiles"] => (Route::Profiles, &["POST"], Account::Body),
        ["network"] => (Route::Network, &["POST"], Account::Body),
        ["messages"] => (Route::Messages, &["POST"], Account::Body),
        ["content"] => (Route::Content, &["POST"], Account::Body),
        ["recruiter"] => (Route::Recruiter, &["POST"], Account::Body),
        ["enrich"] => (Route::Enrich, &["POST"], Account::ActionOnly),
        ["webhooks"] if m == "POST" => (Route::Webhooks, &["POST"], Account::Body),
        ["webhooks"] => (Route::Webhooks, &["GET", "POST"], Account::None),
        ["webhooks", id] if !id.is_empty() => (Route::Webhook, &["PUT", "DELETE"], Account::None),
        ["webhooks", id, "stop" | "start" | "rotate-secret"] if !id.is_empty() => {
            (Route::Webhook, &["POST"], Account::None)
        }
        ["webhooks", id, "events"] if !id.is_empty() => (Route::Webhook, &["GET"], Account::None),
        ["webhooks", id, "secret"] if !id.is_empty() => {
            (Route::Webhook, &["DELETE"], Account::None)
        }
        _ => {
            return Err(GatewayError::NotFound(format!(
                "{path} is not a LinkupAPI v2 endpoint"
            )))
        }
    };
    if !allowed.contains(&m) {
        return Err(GatewayError::MethodNotAllowed(format!(
            "{m} is not allowed on {path} (allowed: {})",
            allowed.join(", ")
        )));
    }
    Ok((route, account))
}

/// The route's name for labels and envelopes, whatever the method (`other` off the surface).
pub fn route_name(method: &Method, path: &str) -> Route {
    match resolve(method, path) {
        Ok((name, _)) => name,
        Err(GatewayError::MethodNotAllowed(_)) => {
            // Known path, wrong method: still name the route.
            [Method::GET, Method::POST, Method::PUT, Method::DELETE]
                .iter()
                .find_map(|m| resolve(m, path).ok().map(|(name, _)| name))
                .unwrap_or(Route::Other)
        }
        Err(_) => Route::Other,
    }
}

/// The top-level fields the gateway cares about; everything else is skipped without
/// building a tree. A repeated `account_id` or `action` is refused: two parsers taking
/// different copies is how scope checks get bypassed.
#[derive(Default, Debug)]
struct TopLevel {
    account_id: Option<String>,
    action: Option<String>,
    /// Only checkpoint cares about it (coalescing key); elsewhere a bad `code` is not ours to
    /// refuse.
    code: Code,
}

/// A body's top-level `code`: a string, or a number kept as its JSON text.
#[derive(Default, Debug, PartialEq)]
enum Code {
    #[default]
    Absent,
    Value(String),
    /// Not a string or number, or given twice.
    Invalid(&'static str),
}

/// Reads a `code` value without building a tree: strings and numbers are kept, anything else
/// is skipped and marked invalid.
struct CodeValue(Code);

impl<'de> de::Deserialize<'de> for CodeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CodeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a code")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Value(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Value(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Value(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Value(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Value(
                    serde_json::Number::from_f64(v)
                        .map_or_else(|| v.to_string(), |n| n.to_string()),
                )))
            }
            fn visit_unit<E: de::Error>(self) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Absent))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<CodeValue, E> {
                Ok(CodeValue(Code::Invalid(
                    "`code` must be a string or a number",
                )))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<CodeValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(CodeValue(Code::Invalid(
                    "`code` must be a string or a number",
                )))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CodeValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(CodeValue(Code::Invalid(
                    "`code` must be a string or a number",
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A top-level key, told apart without allocating: serde's `Cow<str>` is always owned, one
/// `String` per key of every body (heaptrack: 3 allocations per request). Escaped keys come
/// unescaped through `visit_str`, so `"account\u005fid"` is still `account_id`.
enum Key {
    AccountId,
    Action,
    Code,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "account_id" => Key::AccountId,
                    "action" => Key::Action,
                    "code" => Key::Code,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> de::Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
                let mut out = TopLevel::default();
                // Seen, whatever the value: `{"account_id": null, "account_id": "y"}` is as
                // ambiguous as two strings.
                let (mut seen_account, mut seen_action) = (false, false);
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::AccountId => {
                            if std::mem::replace(&mut seen_account, true) {
                                return Err(de::Error::custom("`account_id` appears twice"));
                            }
                            let v: serde_json::Value = map.next_value()?;
                            match v {
                                serde_json::Value::String(s) => out.account_id = Some(s),
                                serde_json::Value::Null => {}
                                _ => {
                                    return Err(de::Error::custom("`account_id` must be a string"))
                                }
                            }
                        }
                        Key::Code => {
                            let v: CodeValue = map.next_value()?;
                            out.code = match out.code {
                                Code::Absent => v.0,
                                _ => Code::Invalid("`code` appears twice"),
                            };
                        }
                        Key::Action => {
                            if std::mem::replace(&mut seen_action, true) {
                                return Err(de::Error::custom("`action` appears twice"));
                            }
                            let v: serde_json::Value = map.next_value()?;
                            match v {
                                serde_json::Value::String(s) => out.action = Some(s),
                                serde_json::Value::Null => {}
                                _ => return Err(de::Error::custom("`action` must be a string")),
                            }
                        }
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// No LinkupAPI body nests deeper than a few levels; a deep one is an attack on whoever parses
/// it next (the gateway skips values without recursion, the upstream may not).
const MAX_JSON_DEPTH: usize = 32;

/// The deepest nesting of arrays and objects, counting only outside strings. One pass.
fn json_depth_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn parse_body(body: &[u8]) -> Result<TopLevel, GatewayError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(GatewayError::InvalidParams(
            "the body must be a JSON object with account_id".into(),
        ));
    }
    if json_depth_exceeds(body, MAX_JSON_DEPTH) {
        return Err(GatewayError::InvalidParams(format!(
            "the body nests deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    serde_json::from_slice::<TopLevel>(body).map_err(|e| {
        GatewayError::InvalidParams(format!("the body is not valid JSON for this endpoint: {e}"))
    })
}

fn query_account(query: Option<&str>) -> Result<Option<String>, GatewayError> {
    let Some(q) = query else { return Ok(None) };
    let mut found: Option<String> = None;
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        if k == "account_id" {
            if found.is_some() {
                return Err(GatewayError::InvalidParams(
                    "`account_id` appears twice in the query".into(),
                ));
            }
            found = Some(v.into_owned());
        }
    }
    Ok(found)
}

fn path_account(path: &str) -> Result<String, GatewayError> {
    let id = path.rsplit('/').next().unwrap_or("");
    percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| GatewayError::InvalidParams("the account id in the path is not UTF-8".into()))
}

/// Route, action and account of a request, or why it is refused (ids bounded by the default
/// [`MAX_ID_BYTES`]).
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<RequestContext, GatewayError> {
    classify_bounded(method, path, query, body, MAX_ID_BYTES)
}

/// [`classify`] with ids bounded by `max_id` bytes (`server.max_id_bytes`).
pub fn classify_bounded(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
    max_id: usize,
) -> Result<RequestContext, GatewayError> {
    let (route, source) = resolve(method, path)?;
    let mut action = None;
    let mut code = None;
    let mut account = match source {
        Account::Body | Account::ActionOnly => {
            let top = parse_body(body)?;
            action = top.action;
            if route == Route::Checkpoint {
                // Two copies or an object: the gateway's coalescing key and the upstream's
                // reading could differ, so it is refused rather than guessed.
                match top.code {
                    Code::Absent => {}
                    Code::Value(c) => code = Some(Arc::from(c)),
                    Code::Invalid(why) => return Err(GatewayError::InvalidParams(why.into())),
                }
            }
            top.account_id
        }
        Account::Path => Some(path_account(path)?),
        Account::None => None,
    };
    if let Some(q) = query_account(query)? {
        match &account {
            Some(a) if *a != q => {
                return Err(GatewayError::InvalidParams(
                    "the request names two different accounts".into(),
                ))
            }
            _ => account = Some(q),
        }
    }
    if let Some(a) = &account {
        check_id("account_id", a, max_id)?;
    }
    if let Some(a) = &action {
        check_id("action", a, max_id)?;
    }
    if let Some(seg) = path.split('/').find(|s| s.len() > max_id) {
        return Err(GatewayError::InvalidParams(format!(
            "a path segment is {} bytes long; ids are at most {max_id} (server.max_id_bytes)",
            seg.len()
        )));
    }
    Ok(RequestContext {
        route,
        action: action.map(Arc::from),
        account_id: account.map(Arc::from),
        code,
    })
}

pub use crate::config::MAX_ID_BYTES;

/// An identifier is short and printable, or the request is refused before anything keys on it.
fn check_id(name: &str, v: &str, max_id: usize) -> Result<(), GatewayError> {
    if v.len() > max_id {
        return Err(GatewayError::InvalidParams(format!(
            "`{name}` is {} bytes long; at most {max_id} (server.max_id_bytes)",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(GatewayError::InvalidParams(format!(
            "`{name}` contains control characters"
        )));
    }
    Ok(())
}

#[derive(Clone)]
pub struct ClassifyLayer {
    max_id: usize,
}

impl ClassifyLayer {
    /// `max_id`: `server.max_id_bytes`.
    pub fn new(max_id: usize) -> Self {
        ClassifyLayer { max_id }
    }
}

impl Default for ClassifyLayer {
    fn default() -> Self {
        ClassifyLayer::new(MAX_ID_BYTES)
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;
    fn layer(&self, inner: S) -> Classify<S> {
        Classify {
            inner,
            max_id: self.max_id,
        }
    }
}

#[derive(Clone)]
pub struct Classify<S> {
    inner: S,
    max_id: usize,
}

impl<S> Service<Request<Bytes>> for Classify<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<Bytes>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let uri = req.uri();
        let ctx = match classify_bounded(
            req.method(),
            uri.path(),
            uri.query(),
            req.body(),
            self.max_id,
        ) {
            Ok(c) => c,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        if let Some(log) = req.extensions().get::<Arc<RequestLog>>() {
            let _ = log.context.set(ctx.clone());
        }
        req.extensions_mut().insert(ctx);
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn post(path: &str, body: &str) -> Result<RequestContext, GatewayError> {
        classify(&Method::POST, path, None, body.as_bytes())
    }

    #[test]
    fn account_and_action_from_the_body() {
        let c = post(
            "/v2/network",
            r#"{"account_id":"acc_1","action":"invite","params":{"account_id":"nested"}}"#,
        )
        .unwrap();
        assert_eq!(c.route, Route::Network);
        assert_eq!(c.account_id.as_deref(), Some("acc_1"));
        assert_eq!(c.action.as_deref(), Some("invite"));
        // Keys are read unescaped: an escaped `account_id` is the account, and naming it
        // twice that way is as ambiguous as twice in plain text.
        let c = post(
            "/v2/network",
            r#"{"account\u005fid":"acc_2","\u0061ction":"invite"}"#,
        )
        .unwrap();
        assert_eq!(c.account_id.as_deref(), Some("acc_2"));
        assert_eq!(c.action.as_deref(), Some("invite"));
        assert!(post("/v2/network", r#"{"account_id":"a","account\u005fid":"b"}"#).is_err());
    }

    #[test]
    fn checkpoint_code_is_read_as_text_and_a_bad_one_refused() {
        let code = |body: &str| post("/v2/checkpoint", body).map(|c| c.code);
        let a = r#""account_id":"acc_1""#;
        assert_eq!(
            code(&format!(r#"{{{a},"code":"0123"}}"#))
                .unwrap()
                .as_deref(),
            Some("0123")
        );
        assert_eq!(
            code(&format!(r#"{{{a},"code":123456}}"#))
                .unwrap()
                .as_deref(),
            Some("123456")
        );
        assert_eq!(code(&format!("{{{a}}}")).unwrap(), None);
        assert_eq!(code(&format!(r#"{{{a},"code":null}}"#)).unwrap(), None);
        for bad in [
            r#""code":{"x":1}"#,
            r#""code":[1]"#,
            r#""code":"1","code":"2""#,
        ] {
            let e = code(&format!("{{{a},{bad}}}")).unwrap_err();
            assert_eq!(e.code(), "INVALID_PARAMS", "{bad}");
        }
        // Only checkpoint reads it; elsewhere any `code` passes untouched.
        let c = post(
            "/v2/messages",
            r#"{"account_id":"acc_1","code":{"x":[1]},"action":"send"}"#,
        )
        .unwrap();
        assert_eq!((c.code, c.action.as_deref()), (None, Some("send")));
    }

    #[test]
    fn account_from_path_and_query() {
        let c = classify(&Method::GET, "/v2/accounts/acc%5F2", None, b"").unwrap();
        assert_eq!(
            (c.route, c.account_id.as_deref()),
            (Route::Account, Some("acc_2"))
        );
        let c = classify(
            &Method::GET,
            "/v2/logs",
            Some("limit=5&account_id=acc_3"),
            b"",
        )
        .unwrap();
        assert_eq!(c.account_id.as_deref(), Some("acc_3"));
        let e = classify(&Method::GET, "/v2/accounts/a", Some("account_id=b"), b"").unwrap_err();
        assert_eq!(e.code(), "INVALID_PARAMS");
        let e = classify(
            &Method::GET,
            "/v2/logs",
            Some("account_id=a&account_id=b"),
            b"",
        )
        .unwrap_err();
        assert_eq!(e.code(), "INVALID_PARAMS");
    }

    #[test]
    fn identifiers_are_bounded_and_printable() {
        let long = "a".repeat(MAX_ID_BYTES + 1);
        let ok = "a".repeat(MAX_ID_BYTES);
        assert!(post("/v2/profiles", &format!(r#"{{"account_id": "{ok}"}}"#)).is_ok());
        for body in [
            format!(r#"{{"account_id": "{long}"}}"#),
            format!(r#"{{"account_id": "a", "action": "{long}"}}"#),
            r#"{"account_id": "a
b"}"#
                .to_string(),
            r#"{"account_id": "a", "action": "in\u0000vite"}"#.to_string(),
        ] {
            let e = post("/v2/profiles", &body).unwrap_err();
            assert_eq!(e.code(), "INVALID_PARAMS", "{body}");
        }
        for (path, query) in [
            (format!("/v2/accounts/{long}"), None),
            ("/v2/accounts/a%0Ab".to_string(), None),
            ("/v2/logs".to_string(), Some(format!("account_id={long}"))),
            (format!("/v2/webhooks/{long}/events"), None),
        ] {
            let e = classify(&Method::GET, &path, query.as_deref(), b"").unwrap_err();
            assert_eq!(e.code(), "INVALID_PARAMS", "{path}");
        }
    }

    #[test]
    fn the_identifier_bound_is_configurable() {
        let body = |id: &str| format!(r#"{{"account_id": "{id}"}}"#);
        let at = |id: &str| {
            classify_bounded(&Method::POST, "/v2/profiles", None, body(id).as_bytes(), 16)
        };
        assert!(at(&"a".repeat(16)).is_ok());
        let e = at(&"a".repeat(17)).unwrap_err();
        assert_eq!(e.code(), "INVALID_PARAMS");
        assert!(e.to_string().contains("server.max_id_bytes"), "{e}");
    }

    #[test]
    fn malformed_bodies_are_invalid_params() {
        for body in [
            "",
            "not json",
            "[1,2]",
            r#"{"account_id": 42}"#,
            r#"{"account_id": "a", "account_id": "b"}"#,
            r#"{"account_id": null, "account_id": "b"}"#,
            r#"{"account_id": "a", "account_id": null}"#,
            r#"{"account_id": "a", "action": null, "action": "invite"}"#,
            r#"{"account_id": "a", "action": "get", "action": null}"#,
            r#"{"account_id": "a""#,
            r#"{"action": ["x"]}"#,
        ] {
            let e = post("/v2/checkpoint", body).unwrap_err();
            assert_eq!(e.code(), "INVALID_PARAMS", "{body}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            post("/v2/checkpoint", &deep).unwrap_err().code(),
            "INVALID_PARAMS"
        );
        // Brackets inside strings are not nesting.
        let brackets = format!(
            r#"{{"account_id":"a","t":"{}\"{}"}}"#,
            "[".repeat(100),
            "{".repeat(100)
        );
        assert!(post("/v2/checkpoint", &brackets).is_ok());
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(post("/v2/inbox", "{}").unwrap_err().code(), "NOT_FOUND");
        assert_eq!(
            post("/v2//checkpoint", "{}").unwrap_err().code(),
            "NOT_FOUND"
        );
        let e = classify(&Method::GET, "/v2/checkpoint", None, b"").unwrap_err();
        assert_eq!(e.code(), "METHOD_NOT_ALLOWED");
        assert!(classify(&Method::DELETE, "/v2/webhooks/w1", None, b"").is_ok());
        assert!(classify(&Method::POST, "/v2/login", None, b"anything").is_ok());
    }
}
