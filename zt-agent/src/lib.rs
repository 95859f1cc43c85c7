//! zt-agent: turns workload identities and YAML policy into BPF maps, runs the datapath, and
//! streams its verdicts.
pub mod agent;
pub mod bounded;
pub mod cni;
pub mod control;
pub mod datapath;
pub mod events;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod state;
