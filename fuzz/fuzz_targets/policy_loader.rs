//! Policy text through what `policy check` and every reload run, from memory: parsing and
//! validation (`policy::parse_str`, the loader `load_paths` feeds each file to) and compilation
//! never panic, whatever the bytes; and both are deterministic (the same text loads and
//! compiles to the same result twice), which the agent's reload relies on to tell a changed
//! policy from an unchanged one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zt_agent::policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let loaded = policy::parse_str(text, "fuzz.yaml");
    assert_eq!(loaded, policy::parse_str(text, "fuzz.yaml"), "loading is deterministic");
    if let Ok(set) = loaded {
        let compiled = policy::compile::compile(&set).map_err(|e| e.to_string());
        assert_eq!(compiled, policy::compile::compile(&set).map_err(|e| e.to_string()), "compiling is deterministic");
    }
});
