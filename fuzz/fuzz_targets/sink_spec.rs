//! `--sink` specs: parsing and the checks across sinks must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zt_agent::events::sinks::spec::{self, SinkSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let specs: Vec<SinkSpec> = text.split('\n').filter_map(|line| line.parse().ok()).collect();
    let _ = spec::validate(&specs);
});
