//! zt-agent: turns workload identities and YAML policy into BPF maps, runs the datapath, and
//! streams its verdicts.
pub mod agent;
pub mod control;
pub mod datapath;
pub mod events;
pub mod fanout;
pub mod flows;
pub mod identity;
pub mod policy;
pub mod reload;
pub mod sinks;
pub mod sources;
pub mod svid;
