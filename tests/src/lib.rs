//! Testbed for zt's privileged tests and demo: network namespaces wired as nodes and workloads,
//! real traffic between them, and the agent running inside a node.
//!
//! Everything created here lives in namespaces this process created (named
//! `zt-<pid>-<counter>-<role>`) and is removed on drop; [`cleanup_all`] removes what is still
//! alive (for interrupt handlers), and leftovers of crashed runs are swept on first use.

pub mod agent;
pub mod bench_policy;
pub mod cgroup;
pub mod netns;
pub mod podman;
pub mod rsyslog;
pub mod sniffer;
pub mod topology;
pub mod traffic;

pub use agent::{
    agent_bin, run_agent_command, run_agent_command_in, upgrade_agent_bin, Agent, AgentOptions, BpffsDir,
};
pub use cgroup::Cgroup;
pub use netns::Netns;
pub use rsyslog::{Received, Rsyslog, RsyslogInputs, TlsFiles};
pub use sniffer::{Packet, Sniffer};
pub use topology::{Node, Topology, TopologySpec, Workload};
pub use traffic::{
    http_get, ping, tcp_connect, tcp_server, udp_echo_of, udp_echo_server, udp_roundtrip, udp_send_from, Server,
};

/// Stops the agents, removes their pins, deletes the namespaces and removes the cgroups this
/// process still holds.
/// Concurrent calls return once the first has finished, so any caller may exit right after.
pub fn cleanup_all() {
    static CLEANING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serialised = CLEANING.lock().unwrap_or_else(|e| e.into_inner());
    agent::stop_all();
    netns::delete_all();
    cgroup::delete_all();
}

/// Fails unless running as root, which creating namespaces and loading eBPF programs need.
pub fn ensure_root() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "must run as root (network namespaces, eBPF programs, packages): run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask test` (or `demo`)"
    );
    Ok(())
}
