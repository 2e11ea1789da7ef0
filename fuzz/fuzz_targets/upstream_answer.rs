//! Upstream answers: credits, action and error code (`Charge::of`) and the account status
//! vocabulary, from any bytes; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let c = linkup_gateway::layers::credits::Charge::of(data);
    if let Some(credits) = c.credits {
        // Only a non-negative integer is read as a charge.
        let _ = credits;
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = linkup_gateway::layers::status_cache::CachedStatus::from_upstream(s);
    }
});
