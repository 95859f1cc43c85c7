//! zt-agent: turns workload identities and YAML policy into BPF maps, runs the datapath, and
//! streams its verdicts.
pub mod agent;
pub mod control;
pub mod counters;
pub mod datapath;
pub mod event_limits;
pub mod events;
pub mod fanout;
pub mod flows;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod reload;
pub mod sinks;
pub mod sources;
pub mod svid;
