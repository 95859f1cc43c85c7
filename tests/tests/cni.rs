//! `zt-cni` invoked as a container runtime invokes a plugin chain, inside a test-made node
//! namespace: Debian's containernetworking-plugins `ptp` (with `host-local` IPAM) makes the
//! pod's veth, then `zt-cni` hands its host side to the running agent and returns only once it
//! is attached, with ptp's result passed through. Real traffic shows the difference: before
//! the ADD the node reaches the pod unjudged, after it the pod's interface enforces policy.
//! Needs root; fails, never skips.

mod common;

use std::{net::SocketAddr, time::Duration};

use serde_json::json;
use zt_tests::{ensure_root, tcp_connect, tcp_server, Agent, AgentOptions, Netns, Topology, TopologySpec};

use common::cni::{host_side, invoke, plugin, zt_cni, PodRef};

const POLICY: &str = "\
apiVersion: zt/v1
kind: Identity
metadata: {name: web}
spec: {selectors: [{cidr: 10.20.1.0/24}]}
---
apiVersion: zt/v1
kind: Identity
metadata: {name: pods}
spec: {selectors: [{cidr: 10.30.0.0/24}]}
---
apiVersion: zt/v1
kind: Policy
metadata: {name: default-deny}
spec: {subject: [any], ingress: [], egress: []}
---
apiVersion: zt/v1
kind: Policy
metadata: {name: pods}
spec:
  subject: [pods]
  ingress: [{from: [web], ports: [{protocol: tcp, port: 8080}]}]
---
apiVersion: zt/v1
kind: Policy
metadata: {name: web}
spec:
  subject: [web]
  egress: [{to: [pods], ports: [{protocol: tcp, port: 8080}]}]
";

fn attached(agent: &Agent, interface: &str) -> Vec<String> {
    let status = agent.status_json();
    status["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["interface"] == interface)
        .map(|a| a["hook"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn add_returns_once_the_pods_interface_is_attached_and_del_forgets_it() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("web", 1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let agent = Agent::start(t.node().ns(), &AgentOptions::for_node(t.node(), &policy, "enforce")).unwrap();

    // The cluster's CNI: a veth pair, the pod's end in its namespace, an address from 10.30.0.0/24.
    let pod_ns = Netns::new("pod").unwrap();
    let pod = PodRef { container_id: "zt-test-container", namespace: "prod", name: "api-1", netns: &pod_ns };
    let ptp_config = json!({
        "cniVersion": "1.0.0", "name": "zt-test", "type": "ptp", "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.30.0.0/24", "dataDir": dir.path().join("ipam"),
                 "routes": [{"dst": "0.0.0.0/0"}]}
    });
    let (ok, result, stderr) = invoke(t.node().ns(), &plugin("ptp"), "ADD", &pod, &ptp_config);
    assert!(ok, "ptp ADD: {result} {stderr}");
    let (veth, pod_ip) = host_side(&result);
    let service = SocketAddr::new(pod_ip, 8080);
    let _server = tcp_server(&pod_ns, service).unwrap();
    // Not yet zt's: the node (host, which no rule lets reach pods) gets through unjudged.
    assert!(attached(&agent, &veth).is_empty());
    assert!(tcp_connect(t.node().ns(), service, Duration::from_secs(2)).is_ok(), "before zt-cni, nothing judges {veth}");

    // zt-cni, chained after ptp: its result passes through, and the veth is attached when ADD returns.
    let mut chained = json!({"cniVersion": "1.0.0", "name": "zt-test", "type": "zt-cni", "socket": agent.socket()});
    chained["prevResult"] = result.clone();
    let (ok, out, stderr) = invoke(t.node().ns(), &zt_cni(), "ADD", &pod, &chained);
    assert!(ok, "zt-cni ADD: {out} {stderr}\n{}", agent.stderr());
    assert_eq!(out, result, "the previous plugin's result, unchanged");
    let mut hooks = attached(&agent, &veth);
    hooks.sort();
    assert_eq!(hooks, ["tc-egress", "tc-ingress"], "attached before ADD returned");
    let (ok, _, stderr) = invoke(t.node().ns(), &zt_cni(), "CHECK", &pod, &chained);
    assert!(ok, "zt-cni CHECK: {stderr}");

    // Judged now: web is allowed in, the node is not.
    assert!(tcp_connect(t.ns("web"), service, Duration::from_secs(2)).is_ok(), "web → pod\n{}", agent.stderr());
    assert!(tcp_connect(t.node().ns(), service, Duration::from_millis(700)).is_err(), "host → pod after ADD");
    // The connection's deny: the pod's own stack may have sent something denied too (an MLD
    // report from `::` when its interface came up).
    let denied = agent
        .wait_for_event(|e| e["verdict"] == "deny" && e["interface"] == veth.as_str() && e["protocol"] == "tcp", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no deny on {veth}: {:#?}", agent.events()));
    assert_eq!((denied["hook"].as_str(), denied["dst"]["identity"].as_str()), (Some("tc-egress"), Some("pods")), "{denied:#}");
    assert_eq!(denied["src"]["identity"], "host", "{denied:#}\n{}", agent.stderr());

    // DEL, in the reverse order of ADD: zt-cni forgets, then ptp removes the veth.
    let (ok, _, stderr) = invoke(t.node().ns(), &zt_cni(), "DEL", &pod, &chained);
    assert!(ok, "zt-cni DEL: {stderr}");
    assert!(attached(&agent, &veth).is_empty(), "forgotten on DEL");
    let (ok, _, stderr) = invoke(t.node().ns(), &plugin("ptp"), "DEL", &pod, &ptp_config);
    assert!(ok, "ptp DEL: {stderr}");
    // A repeated DEL, with nothing left to undo, still succeeds (CNI spec).
    let (ok, _, stderr) = invoke(t.node().ns(), &zt_cni(), "DEL", &pod, &chained);
    assert!(ok, "second zt-cni DEL: {stderr}");
}

#[test]
fn add_fails_when_no_agent_answers_so_the_runtime_does_not_start_the_pod() {
    ensure_root().unwrap();
    let node = Netns::new("node").unwrap();
    let pod_ns = Netns::new("pod").unwrap();
    let pod = PodRef { container_id: "zt-test-container", namespace: "prod", name: "api-1", netns: &pod_ns };
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "cniVersion": "1.0.0", "name": "zt-test", "type": "zt-cni", "socket": dir.path().join("no-agent.sock"),
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "veth0zt"}, {"name": "eth0", "sandbox": pod_ns.path()}]}
    });
    let (ok, out, _) = invoke(&node, &zt_cni(), "ADD", &pod, &config);
    assert!(!ok, "ADD succeeded without an agent: {out}");
    assert_eq!(out["code"], 999, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("did not attach to veth0zt"), "{out}");
}
