//! `--sink` specs, one per line, through the parser `zt-agent run` uses (`SinkSpec::from_str`)
//! and the checks across sinks (`spec::validate`): nothing panics, a refused spec's error names
//! the spec, one sink alone always validates, and the same sink twice never does (same name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zt_agent::events::sinks::spec::{self, SinkSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut specs = Vec::new();
    for line in text.split('\n') {
        match line.parse::<SinkSpec>() {
            Ok(sink) => {
                assert_eq!(spec::validate(std::slice::from_ref(&sink)), Ok(()), "{line}");
                assert!(spec::validate(&[sink.clone(), sink.clone()]).is_err(), "{line}");
                let _ = (sink.kind(), sink.renderer());
                specs.push(sink);
            }
            Err(error) => assert!(error.starts_with(&format!("sink `{line}`: ")), "{error}"),
        }
    }
    let _ = spec::validate(&specs);
});
