//! Account and action extraction from bodies, paths and queries: route, account and action,
//! or a refusal; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: method byte, then path \0 query \0 body.
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = match m % 4 {
        0 => http::Method::GET,
        1 => http::Method::POST,
        2 => http::Method::PUT,
        _ => http::Method::DELETE,
    };
    let mut parts = rest.splitn(3, |&b| b == 0);
    let path = std::str::from_utf8(parts.next().unwrap_or_default()).unwrap_or("/v2/profiles");
    let query = parts.next().and_then(|q| std::str::from_utf8(q).ok());
    let body = parts.next().unwrap_or_default();
    let path = format!("/v2/{}", path.trim_start_matches('/'));
    if let Ok(ctx) = linkup_gateway::layers::classify::classify(&method, &path, query, body) {
        // An account named by a request is never empty of meaning: it came from the input.
        if let Some(a) = &ctx.account_id {
            assert!(a.len() <= data.len());
        }
    }
    let _ = linkup_gateway::layers::classify::route_name(&method, &path);
});
