//! Upstream answers: credits, action, error code and account status (`UpstreamAnswer::parse`)
//! and the account status vocabulary, from any bytes; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkup_gateway::upstream::{UpstreamAnswer, MAX_CREDITS_PER_CALL};

fuzz_target!(|data: &[u8]| {
    let c = UpstreamAnswer::parse(data);
    if let Some(credits) = c.credits {
        // Only a plausible whole number is read as a charge: no sum of them can overflow.
        assert!(credits <= MAX_CREDITS_PER_CALL);
        assert!(c.credits_raw.is_none());
    }
    if let Some(raw) = &c.credits_raw {
        assert!(raw.len() <= 64);
    }
    // An account id is kept only beside a status.
    assert!(c.account_id.is_none() || c.status.is_some());
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = linkup_gateway::layers::status_cache::CachedStatus::from_upstream(s);
    }
});
