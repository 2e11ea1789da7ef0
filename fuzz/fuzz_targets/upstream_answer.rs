//! Upstream answers: credits, action and error code (`Charge::of`) and the account status
//! vocabulary, from any bytes; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let c = linkup_gateway::layers::credits::Charge::of(data);
    if let Some(credits) = c.credits {
        // Only a plausible whole number is read as a charge: no sum of them can overflow.
        assert!(credits <= linkup_gateway::layers::credits::MAX_CREDITS_PER_CALL);
        assert!(c.credits_raw.is_none());
    }
    if let Some(raw) = &c.credits_raw {
        assert!(raw.len() <= 64);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = linkup_gateway::layers::status_cache::CachedStatus::from_upstream(s);
    }
});
