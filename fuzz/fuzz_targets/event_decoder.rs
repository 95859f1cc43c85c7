//! Ring-buffer records, decoded and named as the event reader does (`events::decode`, then
//! `Enricher::enrich` on the demo policy), then rendered by every sink format. Whatever bytes the
//! kernel (or a corrupted buffer) hands over: nothing panics, only a whole `FlowEvent` decodes,
//! and the JSON line the sinks write by hand is byte for byte serde's, and the `Value` view that
//! OCSF, CEF and syslog derive from says the same.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use zt_agent::{
    events::{
        self,
        record::Record,
        sinks::{syslog::Header, Format, Renderer},
        Enricher,
    },
    identity::sources::IdentitySources,
    policy,
    state::Policies,
};
use zt_common::FlowEvent;

/// The policy events are named by: the demo's identities and rules, compiled once.
fn naming() -> &'static (Arc<Mutex<Policies>>, Arc<Mutex<IdentitySources>>) {
    static NAMING: OnceLock<(Arc<Mutex<Policies>>, Arc<Mutex<IdentitySources>>)> = OnceLock::new();
    NAMING.get_or_init(|| {
        let set = policy::parse_str(include_str!("../../policies/demo.yaml"), "demo.yaml").expect("the demo parses");
        let compiled = Arc::new(policy::compile::compile(&set).expect("the demo compiles"));
        let policies = Arc::new(Mutex::new(Policies::new(1, compiled.clone())));
        let sources = Arc::new(Mutex::new(IdentitySources::new(compiled, None, None)));
        (policies, sources)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(event) = events::decode(data) else {
        assert!(data.len() < size_of::<FlowEvent>(), "a whole event always decodes");
        return;
    };
    let (policies, sources) = naming();
    // A new enricher per input, so its interface-name cache does not grow across the run.
    let record = Enricher::new("node-a".into(), policies.clone(), sources.clone()).enrich(&event);
    let mut line = Vec::new();
    record.write_json(&mut line);
    let line = String::from_utf8(line).expect("the JSON line is UTF-8");
    assert_eq!(line, serde_json::to_string(&record).unwrap(), "hand-written JSON line vs serde");
    let record = Record::from(record);
    assert_eq!(line, record.to_string(), "JSON line vs the Value view the other formats derive from");
    for format in [Format::Json, Format::Ocsf, Format::Cef] {
        let _ = Renderer { format, syslog: None }.render(&record);
        let _ = Renderer { format, syslog: Some(Header::new(16)) }.render(&record);
    }
});
