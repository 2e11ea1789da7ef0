//! The upstream's answer, read once. The upstream client parses the envelope of every answer it
//! returns into an [`UpstreamAnswer`] response extension; credits (the charge), account_limit
//! (an upstream `RATE_LIMITED`) and the status cache (an account's status, an account gone)
//! read that extension instead of parsing the body again. Answers that did not come through
//! the client (another replica's shared answer, a test's stub) are parsed on first read by
//! [`UpstreamAnswer::of`].
//!
//! Only the fields the gateway needs are read; every other value is skipped without building a
//! tree, and an answer that is not JSON reads as all-`None` (its credits unknown).

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::Response;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

/// The most credits one call is believed to cost. LinkupAPI's prices are single digits; a
/// larger `credits_consumed` is a broken answer, recorded as unknown rather than trusted: one
/// such number (u64::MAX) would otherwise overflow every sum of the ledger built on it.
pub const MAX_CREDITS_PER_CALL: u64 = 1_000_000;

/// What an upstream answer says that the gateway acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpstreamAnswer {
    /// `metadata.credits_consumed` when it is a whole number from 0 to
    /// [`MAX_CREDITS_PER_CALL`].
    pub credits: Option<u64>,
    /// `metadata.credits_consumed` as sent (JSON text, at most 64 bytes) when it is present but
    /// not such a number: fractional, negative, a string, absurdly large.
    pub credits_raw: Option<String>,
    /// `metadata.action`.
    pub action: Option<String>,
    /// `error.code`.
    pub error_code: Option<String>,
    /// `data.status` when `data` is an object that has one (login, checkpoint, account).
    pub status: Option<String>,
    /// `data.account_id` of such an answer (kept only beside a `status`).
    pub account_id: Option<String>,
}

impl UpstreamAnswer {
    /// Parse an answer's body; anything unreadable is `None`.
    pub fn parse(body: &[u8]) -> UpstreamAnswer {
        let Ok(env) = serde_json::from_slice::<Envelope>(body) else {
            return UpstreamAnswer::default();
        };
        let mut out = UpstreamAnswer::default();
        if let Some(m) = env.metadata {
            out.action = m.action.and_then(|v| v.as_str().map(str::to_owned));
            match m.credits_consumed {
                None | Some(serde_json::Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(n) if n <= MAX_CREDITS_PER_CALL => out.credits = Some(n),
                    _ => {
                        let mut raw = v.to_string();
                        if raw.len() > 64 {
                            let mut cut = 64;
                            while !raw.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            raw.truncate(cut);
                        }
                        out.credits_raw = Some(raw);
                    }
                },
            }
        }
        out.error_code = env
            .error
            .and_then(|e| e.code)
            .and_then(|c| c.as_str().map(str::to_owned));
        if let Some(Data {
            status: Some(status),
            account_id,
        }) = env.data
        {
            out.status = Some(status.into_owned());
            out.account_id = account_id.map(Cow::into_owned);
        }
        out
    }

    /// The answer's reading: the upstream client's extension, or a parse of the body.
    pub fn of(resp: &Response<Bytes>) -> Cow<'_, UpstreamAnswer> {
        match resp.extensions().get::<UpstreamAnswer>() {
            Some(a) => Cow::Borrowed(a),
            None => Cow::Owned(UpstreamAnswer::parse(resp.body())),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    data: Option<Data<'a>>,
    metadata: Option<Meta>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct Meta {
    credits_consumed: Option<serde_json::Value>,
    action: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: Option<serde_json::Value>,
}

/// `data`'s `account_id` and `status` when it is an object and they are strings; any other
/// `data` (a list, a string) and any other field is skipped.
#[derive(Default)]
struct Data<'a> {
    account_id: Option<Cow<'a, str>>,
    status: Option<Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Data<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Data<'a>, M::Error> {
                let mut out = Data::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match &*key {
                        "account_id" => out.account_id = map.next_value::<Text<'de>>()?.0,
                        "status" => out.status = map.next_value::<Text<'de>>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
            fn visit_seq<S: de::SeqAccess<'de>>(self, mut seq: S) -> Result<Data<'a>, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Data::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Data<'a>, E> {
                Ok(Data::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Data<'a>, E> {
                Ok(Data::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Data<'a>, E> {
                Ok(Data::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Data<'a>, E> {
                Ok(Data::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Data<'a>, E> {
                Ok(Data::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Data<'a>, E> {
                Ok(Data::default())
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A string value, borrowed where it has no escapes; any other value reads as `None`.
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Text<'a>, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_seq<S: de::SeqAccess<'de>>(self, mut seq: S) -> Result<Text<'a>, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_credits_action_and_error() {
        let c = UpstreamAnswer::parse(
            br#"{"success":true,"data":{},"metadata":{"action":"get","credits_consumed":2}}"#,
        );
        assert_eq!(c.credits, Some(2));
        assert_eq!(c.action.as_deref(), Some("get"));
        let c = UpstreamAnswer::parse(br#"{"success":false,"error":{"code":"INSUFFICIENT_CREDITS"},"metadata":{"credits_consumed":0}}"#);
        assert_eq!(
            (c.credits, c.error_code.as_deref()),
            (Some(0), Some("INSUFFICIENT_CREDITS"))
        );
        for unknown in [
            &b"<html>502</html>"[..],
            br#"{"metadata":{"credits_consumed":"2"}}"#,
            br#"{"metadata":{"credits_consumed":-1}}"#,
            br#"{"metadata":{"credits_consumed":1.5}}"#,
            br#"{"metadata":{"credits_consumed":1e30}}"#,
            br#"{"metadata":{"credits_consumed":18446744073709551615}}"#,
            br#"{"metadata":{"credits_consumed":9223372036854775808}}"#,
            br#"{"metadata":{"credits_consumed":1000001}}"#,
            br#"{"metadata":{"credits_consumed":{"n":1}}}"#,
            br#"{"data":{}}"#,
            b"",
        ] {
            assert_eq!(
                UpstreamAnswer::parse(unknown).credits,
                None,
                "{}",
                String::from_utf8_lossy(unknown)
            );
        }
        // The value as sent is kept for the warning, bounded.
        let c = UpstreamAnswer::parse(br#"{"metadata":{"credits_consumed":1.5}}"#);
        assert_eq!(c.credits_raw.as_deref(), Some("1.5"));
        let long = format!(
            r#"{{"metadata":{{"credits_consumed":"{}"}}}}"#,
            "9".repeat(500)
        );
        assert!(
            UpstreamAnswer::parse(long.as_bytes())
                .credits_raw
                .unwrap()
                .len()
                <= 64
        );
        assert_eq!(
            UpstreamAnswer::parse(br#"{"metadata":{"credits_consumed":1000000}}"#).credits,
            Some(MAX_CREDITS_PER_CALL)
        );
        assert_eq!(
            UpstreamAnswer::parse(br#"{"metadata":{"credits_consumed":null}}"#).credits_raw,
            None
        );
    }

    #[test]
    fn reads_an_accounts_status_and_skips_any_other_data() {
        let a = UpstreamAnswer::parse(
            br#"{"success":true,"data":{"account_id":"acc_\u0031","status":"connected","extra":[1,{"status":"x"}]},"metadata":{"credits_consumed":0}}"#,
        );
        assert_eq!(
            (a.account_id.as_deref(), a.status.as_deref(), a.credits),
            (Some("acc_1"), Some("connected"), Some(0))
        );
        // No status: the account id is not kept (a profile answer names its account too).
        let a = UpstreamAnswer::parse(
            br#"{"data":{"account_id":"acc_1","profile":{"status":"busy"}},"metadata":{"credits_consumed":1}}"#,
        );
        assert_eq!((a.account_id, a.status, a.credits), (None, None, Some(1)));
        // A list, a string or a non-string status is skipped; the rest of the answer still reads.
        for body in [
            &br#"{"data":[{"account_id":"a","status":"connected"}],"metadata":{"credits_consumed":3}}"#[..],
            br#"{"data":"text","metadata":{"credits_consumed":3}}"#,
            br#"{"data":{"account_id":"a","status":7},"metadata":{"credits_consumed":3}}"#,
            br#"{"data":null,"metadata":{"credits_consumed":3}}"#,
        ] {
            let a = UpstreamAnswer::parse(body);
            assert_eq!(
                (a.status, a.credits),
                (None, Some(3)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn of_prefers_the_clients_reading() {
        let mut resp = Response::new(Bytes::from_static(
            br#"{"metadata":{"credits_consumed":5}}"#,
        ));
        assert_eq!(UpstreamAnswer::of(&resp).credits, Some(5));
        resp.extensions_mut().insert(UpstreamAnswer {
            credits: Some(2),
            ..UpstreamAnswer::default()
        });
        assert!(matches!(UpstreamAnswer::of(&resp), Cow::Borrowed(_)));
        assert_eq!(UpstreamAnswer::of(&resp).credits, Some(2));
    }
}
