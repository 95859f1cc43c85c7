//! The capabilities the agent needs, proven the way a container without `privileged` would run
//! it: as root with only these in its bounding set (setpriv). With them it starts, enforces,
//! serves its metrics and readiness, and a second agent adopts the first's pins; without any
//! one of them it refuses to start, saying why. docs/kubernetes.md lists the same set. Needs
//! root; fails, never skips.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use zt_tests::{ensure_root, http_get, tcp_connect, tcp_server, Agent, AgentOptions, Cgroup, Topology, TopologySpec};

/// What the DaemonSet's capability-only alternative grants.
const CAPABILITIES: [&str; 3] = ["bpf", "net_admin", "perfmon"];

fn policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/topology.yaml")
}

fn options(t: &Topology, capabilities: &[&str]) -> AgentOptions {
    let mut options = AgentOptions::for_node(t.node(), policy(), "enforce");
    options.capabilities = Some(capabilities.iter().map(|c| c.to_string()).collect());
    options
}

#[test]
fn the_agent_enforces_with_the_documented_capabilities_and_no_others() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2).workload("intruder", 9)).unwrap();
    let api = SocketAddr::new(t.ipv4("api"), 8080);
    let _server = tcp_server(t.ns("api"), api).unwrap();
    // With cgroup hooks too.
    let scope = Cgroup::new_scope().unwrap();
    let with_cgroups = |options: AgentOptions| AgentOptions {
        extra_args: vec!["--cgroup".into(), scope.relative().into()],
        ..options
    };
    let agent = Agent::start(t.node().ns(), &with_cgroups(options(&t, &CAPABILITIES))).unwrap();
    let status = agent.status_json();
    let hooks: Vec<&str> = status["attachments"].as_array().unwrap().iter().filter_map(|a| a["hook"].as_str()).collect();
    assert!(hooks.iter().any(|h| h.starts_with("cgroup")) && hooks.iter().any(|h| h.starts_with("tc")), "{status:#}");
    assert!(tcp_connect(t.ns("web"), api, Duration::from_secs(2)).is_ok(), "web → api\n{}", agent.stderr());
    assert!(tcp_connect(t.ns("intruder"), api, Duration::from_millis(700)).is_err(), "intruder → api");
    let metrics: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let (status, body) = http_get(t.node().ns(), metrics, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}\n{}", agent.stderr());
    let (status, body) = http_get(t.node().ns(), metrics, "/metrics").unwrap();
    assert!(status == 200 && body.contains("zt_map_entries{map=\"conntrack\"}"), "{status} {body}\n{}", agent.stderr());

    // Restarted with the same capabilities, an agent adopts the pins it finds.
    let dir = agent.bpffs_dir().clone();
    drop(agent);
    let next = Agent::start(t.node().ns(), &with_cgroups(AgentOptions { bpffs_dir: Some(dir), ..options(&t, &CAPABILITIES) })).unwrap();
    assert!(next.stderr().contains("adopted"), "{}", next.stderr());
    assert!(tcp_connect(t.ns("intruder"), api, Duration::from_millis(700)).is_err(), "still enforced after adoption");
}

#[test]
fn without_any_one_of_them_the_agent_refuses_to_start() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("web", 1)).unwrap();
    for missing in CAPABILITIES {
        let fewer: Vec<&str> = CAPABILITIES.into_iter().filter(|c| *c != missing).collect();
        let err = Agent::start(t.node().ns(), &options(&t, &fewer)).err();
        let err = err.unwrap_or_else(|| panic!("the agent started without {missing}: the set is not minimal"));
        let said = format!("{err:#}");
        assert!(said.contains("zt-agent:"), "without {missing}, no error of the agent's own: {said}");
        eprintln!("without {missing}: {}", said.lines().find(|l| l.contains("zt-agent:")).unwrap_or_default().trim());
    }
}
