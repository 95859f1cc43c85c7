//! Policy text, as `policy check` and the agent's reload read it: parsing, validation and
//! compilation must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zt_agent::policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(set) = policy::parse_str(text, "fuzz.yaml") {
        let _ = policy::compile::compile(&set);
    }
});
