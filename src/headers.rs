//! Header hygiene shared by both directions of the proxy.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies drop.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
];

/// Drop hop-by-hop headers and every header that `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP.iter() {
        h.remove(n);
    }
    h.remove("proxy-connection");
}

/// The upstream answer's headers a caller may see: how to read the body, how to cache it,
/// when to retry. Everything else stays at the gateway: `Set-Cookie` (a session of the
/// gateway's key, not the caller's), the upstream's and its CDN's own headers, and anything
/// the caller has no use for. `content-length` is set again from the body.
const ANSWER_HEADERS: [HeaderName; 10] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CACHE_CONTROL,
    header::ETAG,
    header::LAST_MODIFIED,
    header::EXPIRES,
    header::VARY,
    header::RETRY_AFTER,
    header::WARNING,
];

/// Keep only the headers of an upstream answer a caller needs (see [`ANSWER_HEADERS`], plus
/// rate-limit headers, `x-ratelimit-*` and the IETF `ratelimit*`), and drop any header whose
/// value holds `secret` (the stored key echoed back), whatever its name.
pub fn answer_headers(h: &mut HeaderMap, secret: &[u8]) {
    let dropped: Vec<HeaderName> = h
        .keys()
        .filter(|name| {
            let n = name.as_str();
            !(ANSWER_HEADERS.contains(name)
                || n.starts_with("x-ratelimit-")
                || n.starts_with("ratelimit"))
        })
        .cloned()
        .collect();
    for name in dropped {
        h.remove(name);
    }
    if secret.is_empty() {
        return;
    }
    let leaking: Vec<HeaderName> = h
        .iter()
        .filter(|(_, v)| {
            v.as_bytes()
                .windows(secret.len())
                .any(|w| w.eq_ignore_ascii_case(secret))
        })
        .map(|(n, _)| n.clone())
        .collect();
    for name in leaking {
        h.remove(name);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_only_what_callers_need_and_never_the_key() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("retry-after", "3".parse().unwrap());
        h.insert("x-ratelimit-remaining", "7".parse().unwrap());
        h.insert("set-cookie", "session=abc; HttpOnly".parse().unwrap());
        h.insert("x-api-key", "the-stored-key".parse().unwrap());
        h.insert("server", "upstream/1.0".parse().unwrap());
        h.insert("content-length", "12".parse().unwrap());
        h.insert("vary", "x-THE-STORED-KEY-echo".parse().unwrap());
        answer_headers(&mut h, b"the-stored-key");
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-type", "retry-after", "x-ratelimit-remaining"]
        );
    }

    #[test]
    fn drops_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }
}
