//! Config parsing: any text is either settings or problems with key paths, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let env = [("K".to_string(), "k".to_string())];
        if let Err(e) = linkup_gateway::config::load_str(text, &env, None) {
            // Every problem renders (and names a key path).
            let _ = e.problems();
        }
    }
});
