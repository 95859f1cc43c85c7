//! Pods judged by what they are: the agent runs with `--kubernetes` against an API server of
//! pods and namespaces (`common::fake_api`, answering kube-rs's list and watch requests as the
//! real one does), pods get their network from Debian's `ptp` plugin with `zt-cni` chained after
//! it, as a runtime invokes them, and real traffic between the pods is allowed or denied by
//! `pods` selectors over their label-set identities. Needs root; fails, never skips.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::{json, Value};
use zt_tests::{ensure_root, tcp_connect, tcp_server, Agent, AgentOptions, Netns, Server, Topology, TopologySpec};

use common::{
    cni::{host_side, invoke, plugin, zt_cni, PodRef},
    fake_api::FakeApiServer,
};

const NODE: &str = "node-a";

/// Default deny for the shop's pods; its api takes the shop's web on 8080, from any service
/// account, and nothing else.
const POLICY: &str = "\
apiVersion: zt/v1
kind: Policy
metadata: {name: shop-default-deny}
spec: {subject: [{pods: {namespace: shop}}], ingress: []}
---
apiVersion: zt/v1
kind: Policy
metadata: {name: api}
spec:
  subject: [{pods: {namespace: shop, matchLabels: {app: api}}}]
  ingress:
    - from: [{pods: {namespaceSelector: {matchLabels: {team: retail}}, matchLabels: {app: web}}}]
      ports: [{protocol: tcp, port: 8080}]
";

/// A pod with its network: ptp then zt-cni, as the runtime runs the chain.
struct Pod {
    netns: Netns,
    name: String,
    veth: String,
    ip: IpAddr,
    ptp: Value,
    chained: Value,
    _server: Server,
}

impl Pod {
    fn pod_ref(&self) -> PodRef<'_> {
        PodRef { container_id: &self.name, namespace: "shop", name: &self.name, netns: &self.netns }
    }

    fn service(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 8080)
    }
}

/// Runs the chain's ADD for pod `name` of the shop; the API server learns its address after,
/// as the kubelet reports it. Panics, with what the plugins said, when ADD fails.
fn start_pod(t: &Topology, agent: &Agent, api: &FakeApiServer, ipam: &Path, name: &str, labels: Value) -> Pod {
    let account = name.split('-').next().unwrap();
    api.set_pod("shop", name, account, labels.clone(), NODE, &[]);
    let netns = Netns::new("pod").unwrap();
    let ptp = json!({
        "cniVersion": "1.0.0", "name": "zt-test", "type": "ptp", "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.30.0.0/24", "dataDir": ipam, "routes": [{"dst": "0.0.0.0/0"}]}
    });
    let pod_ref = PodRef { container_id: name, namespace: "shop", name, netns: &netns };
    let (ok, result, stderr) = invoke(t.node().ns(), &plugin("ptp"), "ADD", &pod_ref, &ptp);
    assert!(ok, "ptp ADD {name}: {result} {stderr}");
    let mut chained = json!({"cniVersion": "1.0.0", "name": "zt-test", "type": "zt-cni", "socket": agent.socket()});
    chained["prevResult"] = result.clone();
    let (ok, out, stderr) = invoke(t.node().ns(), &zt_cni(), "ADD", &pod_ref, &chained);
    assert!(ok, "zt-cni ADD {name}: {out} {stderr}\n{}", agent.stderr());
    let (veth, ip) = host_side(&result);
    api.set_pod("shop", name, account, labels, NODE, &[&ip.to_string()]);
    let server = tcp_server(&netns, SocketAddr::new(ip, 8080)).unwrap();
    Pod { netns, name: name.to_owned(), veth, ip, ptp, chained, _server: server }
}

fn connects(from: &Pod, to: &Pod) -> bool {
    tcp_connect(&from.netns, to.service(), Duration::from_millis(800)).is_ok()
}

/// A node with the fake API server (namespace `shop`, labelled team=retail) and an agent with
/// `--kubernetes` on `policy` (a file in a directory of its own, so that more can be added).
struct Cluster {
    api: FakeApiServer,
    dir: tempfile::TempDir,
    agent: Agent,
    metrics: SocketAddr,
    t: Topology,
}

impl Cluster {
    fn start(policy: &str, mode: Option<&str>) -> Cluster {
        let t = Topology::new(TopologySpec::new()).unwrap();
        let api = FakeApiServer::start(t.node().ns());
        api.set_namespace("shop", json!({"team": "retail", "kubernetes.io/metadata.name": "shop"}));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/cluster.yaml"), policy).unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        let metrics = SocketAddr::from(([127, 0, 0, 1], 19_464));
        let options = AgentOptions {
            node_name: NODE.into(),
            mode: mode.map(str::to_owned),
            extra_args: vec![
                "--kubernetes".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
            ],
            ..AgentOptions::for_node(t.node(), dir.path().join("policies"), "enforce")
        };
        let agent = Agent::start(t.node().ns(), &options).unwrap();
        Cluster { api, dir, agent, metrics, t }
    }

    fn pod(&self, name: &str, labels: Value) -> Pod {
        start_pod(&self.t, &self.agent, &self.api, &self.dir.path().join("ipam"), name, labels)
    }
}

fn metric(node: &Netns, address: SocketAddr, name: &str) -> Option<String> {
    let (_, body) = zt_tests::http_get(node, address, "/metrics").ok()?;
    body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
}

#[test]
fn pods_are_judged_by_their_labels_namespace_and_service_account() {
    ensure_root().unwrap();
    let mut cluster = Cluster::start(POLICY, Some("enforce"));
    let (agent, t, metrics) = (&cluster.agent, &cluster.t, cluster.metrics);

    // Each ADD returns with the pod's interface bound to its label set's identity: web and
    // other are new label sets, so their ADDs wait for the reload that numbers them.
    let web = cluster.pod("web-1", json!({"app": "web", "pod-template-hash": "5d9f"}));
    let api_pod = cluster.pod("api-1", json!({"app": "api"}));
    let other = cluster.pod("other-1", json!({"app": "other"}));

    assert!(connects(&web, &api_pod), "web → api:8080 is allowed\n{}", agent.stderr());
    assert!(!connects(&other, &api_pod), "other → api is not");
    let denied = agent
        .wait_for_event(|e| e["verdict"] == "deny" && e["src"]["identity"] == "k8s:shop:other:app=other", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no deny from other: {:#?}", agent.events()));
    assert_eq!(denied["dst"]["identity"], "k8s:shop:api:app=api", "{denied:#}");
    assert_eq!(denied["reason"], "default-deny", "{denied:#}");
    assert!(!connects(&api_pod, &web), "the shop's default deny: nothing may reach web");
    assert!(metric(t.node().ns(), metrics, "zt_kubernetes_api_reachable").as_deref() == Some("1"));

    // A second web pod of a new rollout: the hash label is not part of the identity, so it is
    // web's label set, and its ADD needs no reload.
    let reloads_before = agent.events().iter().filter(|e| e["kind"] == "policy" && e["trigger"] == "cluster-change").count();
    let web2 = cluster.pod("web-2", json!({"app": "web", "pod-template-hash": "77c4"}));
    assert!(connects(&web2, &api_pod), "the second web pod is web\n{}", agent.stderr());
    let reloads = agent.events().iter().filter(|e| e["kind"] == "policy" && e["trigger"] == "cluster-change").count();
    assert_eq!(reloads, reloads_before, "same label set, no reload");

    // A canary with one more label is a new label set: its ADD waits for the reload, and the
    // `app: web` selector expands to it too.
    let canary = cluster.pod("web-3", json!({"app": "web", "track": "canary"}));
    assert!(connects(&canary, &api_pod), "the canary is still app=web\n{}", agent.stderr());

    // The API server goes away: the watches fail, and the agent enforces with what it knew.
    cluster.api.stop();
    let (agent, t) = (&cluster.agent, &cluster.t);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(t.node().ns(), metrics, "zt_kubernetes_api_reachable").as_deref() != Some("0") {
        assert!(std::time::Instant::now() < deadline, "the agent never noticed the API server had gone\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(connects(&web, &api_pod) && !connects(&other, &api_pod), "enforcing with the last known pods");

    // DEL forgets the pod's interface; ptp then removes it.
    for pod in [&web, &api_pod, &other, &web2, &canary] {
        let (ok, _, stderr) = invoke(t.node().ns(), &zt_cni(), "DEL", &pod.pod_ref(), &pod.chained);
        assert!(ok, "zt-cni DEL {}: {stderr}", pod.name);
        let (ok, _, stderr) = invoke(t.node().ns(), &plugin("ptp"), "DEL", &pod.pod_ref(), &pod.ptp);
        assert!(ok, "ptp DEL {}: {stderr}", pod.name);
        assert!(
            !agent.status_json()["attachments"].as_array().unwrap().iter().any(|a| a["interface"] == pod.veth.as_str()),
            "{} forgotten",
            pod.veth
        );
    }
}

#[test]
fn add_fails_when_the_api_server_never_tells_of_the_pod() {
    ensure_root().unwrap();
    let cluster = Cluster::start(POLICY, Some("enforce"));
    let node = cluster.t.node().ns();
    let netns = Netns::new("pod").unwrap();
    let pod = PodRef { container_id: "ghost", namespace: "shop", name: "ghost", netns: &netns };
    let ptp = json!({
        "cniVersion": "1.0.0", "name": "zt-test", "type": "ptp", "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.30.0.0/24", "dataDir": cluster.dir.path().join("ipam")}
    });
    let (ok, result, stderr) = invoke(node, &plugin("ptp"), "ADD", &pod, &ptp);
    assert!(ok, "ptp ADD: {result} {stderr}");
    let mut chained = json!({"cniVersion": "1.0.0", "name": "zt-test", "type": "zt-cni", "socket": cluster.agent.socket()});
    chained["prevResult"] = result;
    let (ok, out, _) = invoke(node, &zt_cni(), "ADD", &pod, &chained);
    assert!(!ok, "ADD succeeded for a pod the API server never named: {out}");
    let message = out["msg"].as_str().unwrap_or_default();
    assert!(message.contains("pod shop/ghost: no identity bound to"), "{out}");
    let _ = invoke(node, &plugin("ptp"), "DEL", &pod, &ptp);
}

/// The walkthrough of docs/kubernetes.md with pods: a default deny in force, the node in
/// monitor mode (nothing dropped, would-be denials reported), `policy suggest` over the audits,
/// the suggestion added to the policy directory (hot-reloaded), then `zt-agent mode enforce`:
/// what was seen passes, the rest is dropped.
#[test]
fn monitor_suggest_then_enforce_with_pods() {
    ensure_root().unwrap();
    let cluster = Cluster::start(
        "apiVersion: zt/v1\nkind: Policy\nmetadata: {name: baseline}\nspec: {subject: [{pods: {}}], ingress: [], egress: []}\n",
        None,
    );
    let agent = &cluster.agent;
    let web = cluster.pod("web-1", json!({"app": "web"}));
    let api_pod = cluster.pod("api-1", json!({"app": "api"}));
    let other = cluster.pod("other-1", json!({"app": "other"}));
    assert!(connects(&web, &api_pod), "monitor drops nothing\n{}", agent.stderr());
    agent
        .wait_for_event(|e| e["verdict"] == "audit" && e["src"]["identity"] == "k8s:shop:web:app=web", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no audit of web → api: {:#?}", agent.events()));

    let events: String = agent.events().iter().map(|e| e.to_string() + "\n").collect();
    let (events_file, policies) = (cluster.dir.path().join("events.jsonl"), cluster.dir.path().join("policies"));
    std::fs::write(&events_file, events).unwrap();
    let out = zt_tests::run_agent_command([
        "policy".as_ref(),
        "suggest".as_ref(),
        "--from".as_ref(),
        events_file.as_os_str(),
        "--policy".as_ref(),
        policies.as_os_str(),
    ])
    .unwrap();
    let suggestion = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{suggestion}{}", String::from_utf8_lossy(&out.stderr));
    assert!(suggestion.contains("{pods: {namespace: \"shop\", serviceAccount: \"web\", matchLabels: {\"app\": \"web\"}}}"), "{suggestion}");
    let reloads = |agent: &Agent| agent.events().iter().filter(|e| e["kind"] == "policy" && e["result"] == "applied").count();
    let before = reloads(agent);
    std::fs::write(policies.join("suggested.yaml"), &suggestion).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reloads(agent) == before {
        assert!(std::time::Instant::now() < deadline, "the suggestion was not loaded\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }

    agent.set_mode("enforce").unwrap();
    assert!(connects(&web, &api_pod), "the flow that was seen passes\n{}", agent.stderr());
    assert!(!connects(&other, &api_pod), "one that was not is dropped");
    assert!(!connects(&api_pod, &web), "so is its reverse, as a new flow");
}

