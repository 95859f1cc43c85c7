//! Identities that are not addresses: processes identified by their cgroup, with real cgroups,
//! real processes and real packets. Needs root; fails, never skips.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use serde_json::Value;
use zt_tests::{ensure_root, run_agent_command, tcp_server, Agent, AgentOptions, Cgroup, Topology, TopologySpec};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");
const EVENT_WAIT: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// One TCP echo round trip to db:5432 from a process in `cgroup`, running on node-a itself (a
/// host service, sending from the node's address).
fn connect_from(cgroup: &Cgroup, t: &Topology, db: SocketAddr, timeout_ms: u32) -> bool {
    cgroup
        .run(t.node().ns(), Path::new(PROBE), &["tcp", &db.to_string(), &timeout_ms.to_string()])
        .expect("running the probe")
}

fn wait_for(agent: &Agent, what: &str, predicate: impl Fn(&Value) -> bool) -> Value {
    agent.wait_for_event(predicate, EVENT_WAIT).unwrap_or_else(|| {
        panic!("no event for {what}\nevents: {:#?}\nagent log:\n{}", agent.events(), agent.stderr())
    })
}

#[test]
fn the_same_program_is_allowed_or_denied_by_the_cgroup_it_runs_in() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("db", 3)).unwrap();
    let scope = Cgroup::new_scope().unwrap();
    let backup = scope.child("backup.service").unwrap();
    let other = scope.child("other.service").unwrap();
    let mut options = AgentOptions::for_node(t.node(), fixture("cgroup.yaml"), "enforce");
    options.extra_args = vec!["--cgroup".into(), scope.relative().into()];
    let agent = Agent::start(t.node().ns(), &options).unwrap();

    for db in [t.ipv4("db"), t.ipv6("db")].map(|ip| SocketAddr::new(ip, 5432)) {
        let _server = tcp_server(t.ns("db"), db).unwrap();
        assert!(connect_from(&backup, &t, db, 2000), "backup.service → db {db}");
        assert!(!connect_from(&other, &t, db, 700), "other.service → db {db}: same program, same address");
    }

    let allow = wait_for(&agent, "backup's allowed flow", |e| e["verdict"] == "allow" && e["src"]["identity"] == "backup");
    assert_eq!(allow["hook"], "cgroup-egress", "{allow:#}");
    assert_eq!(allow["src"]["source"], "cgroup", "{allow:#}");
    assert_eq!(allow["src"]["cgroup"], backup.relative(), "{allow:#}");
    assert_eq!(allow["dst"]["identity"], "db", "{allow:#}");
    assert_eq!(allow["dst"]["source"], "cidr", "{allow:#}");
    let deny = wait_for(&agent, "other's denied flow", |e| e["verdict"] == "deny" && e["dst"]["identity"] == "db");
    assert_eq!(deny["hook"], "cgroup-egress", "{deny:#}");
    // other.service matches no selector, so it is identified by its address: the node's side of
    // lxc-db. That address lies in db's /24 but is the node's own, so it is `host`, never db.
    // Both processes sent from it; only backup's cgroup made it `backup`.
    assert_eq!(deny["src"]["ip"], allow["src"]["ip"], "{deny:#}");
    assert_eq!(deny["src"]["identity"], "host", "{deny:#}");
    assert_eq!(deny["src"]["source"], Value::Null, "{deny:#}");
    assert_eq!(deny["reason"], "default-deny", "{deny:#}");
}

#[test]
fn cgroups_created_after_start_are_identified_within_a_second() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("db", 3)).unwrap();
    let scope = Cgroup::new_scope().unwrap();
    let mut options = AgentOptions::for_node(t.node(), fixture("cgroup.yaml"), "enforce");
    options.extra_args = vec!["--cgroup".into(), scope.relative().into()];
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let db = SocketAddr::new(t.ipv4("db"), 5432);
    let _server = tcp_server(t.ns("db"), db).unwrap();

    let backup = scope.child("backup.service").unwrap();
    thread::sleep(Duration::from_secs(1));
    assert!(connect_from(&backup, &t, db, 2000), "a cgroup created after start, one second later\n{}", agent.stderr());
    // A process in a cgroup nested below a matching one inherits its identity.
    let nested = backup.child("worker").unwrap();
    thread::sleep(Duration::from_secs(1));
    assert!(connect_from(&nested, &t, db, 2000), "nested cgroup\n{}", agent.stderr());
}

#[test]
fn a_cgroup_binding_the_map_cannot_hold_is_refused_and_the_others_carry_on() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("db", 3)).unwrap();
    let scope = Cgroup::new_scope().unwrap();
    let backup = scope.child("backup.service").unwrap();
    let mut options = AgentOptions::for_node(t.node(), fixture("cgroup.yaml"), "enforce");
    options.extra_args = vec!["--cgroup".into(), scope.relative().into(), "--capacity".into(), "cgroups=1".into()];
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let db = SocketAddr::new(t.ipv4("db"), 5432);
    let _server = tcp_server(t.ns("db"), db).unwrap();
    assert!(connect_from(&backup, &t, db, 2000), "backup.service fits\n{}", agent.stderr());

    // A second cgroup of backup's, with no room left in the map for it.
    let worker = backup.child("worker").unwrap();
    let refused = wait_for(&agent, "the refused binding", |e| e["kind"] == "identity" && e["result"] == "rejected");
    assert_eq!((refused["source"].as_str(), refused["identity"].as_str()), (Some("cgroup"), Some("backup")), "{refused:#}");
    assert!(refused["binding"].as_str().is_some_and(|b| b.ends_with("backup.service/worker")), "{refused:#}");
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("it holds 1") && detail.contains("--capacity cgroups=N"), "{refused:#}");
    // Closed for what did not fit: the worker is known by its address, the node's, which policy
    // does not let reach db. The rest carries on, and the agent with it.
    assert!(!connect_from(&worker, &t, db, 700), "an unbound cgroup is not backup");
    assert!(connect_from(&backup, &t, db, 2000), "the bound one still is\n{}", agent.stderr());
    assert_eq!(agent.status_json()["mode"], "enforce", "the agent is up\n{}", agent.stderr());
    let refusals = agent.events().iter().filter(|e| e["result"] == "rejected" && e["source"] == "cgroup").count();
    assert_eq!(refusals, 1, "reported once, not on every refresh");
}

fn identities_of(agent: &Agent) -> serde_json::Map<String, Value> {
    let out = run_agent_command(["status", "--json", "--socket", agent.socket().to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["identities"].as_object().expect("status lists identities").clone()
}

#[test]
fn numeric_identities_are_equal_across_restarts_and_across_nodes() {
    ensure_root().unwrap();
    let policy = fixture("topology.yaml");
    // The second node gets the same documents in reverse order: ids must not depend on it.
    let text = std::fs::read_to_string(&policy).unwrap();
    let mut documents: Vec<&str> = text.split("\n---\n").collect();
    documents.reverse();
    let dir = tempfile::tempdir().unwrap();
    let reversed = dir.path().join("reversed.yaml");
    std::fs::write(&reversed, documents.join("\n---\n")).unwrap();

    let node_a = Topology::new(TopologySpec::new().workload("web", 1)).unwrap();
    let node_b = Topology::new(TopologySpec::new().workload("web", 1)).unwrap();
    let first = identities_of(&Agent::start_on(node_a.node(), &policy, "monitor").unwrap());
    assert_eq!(first.len(), 5, "{first:?}");
    assert!(first.values().all(|id| id.as_u64().unwrap() >= 256), "user ids are outside the reserved range: {first:?}");
    let restarted = Agent::start_on(node_a.node(), &policy, "monitor").unwrap();
    let other_node = Agent::start_on(node_b.node(), &reversed, "monitor").unwrap();
    assert_eq!(identities_of(&restarted), first, "after a restart");
    assert_eq!(identities_of(&other_node), first, "on another node, documents in another order");
}

#[test]
fn a_workload_is_identified_by_the_interface_it_sits_behind() {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2).workload("intruder", 9)).unwrap();
    let agent = Agent::start_on(t.node(), fixture("interfaces.yaml"), "enforce").unwrap();
    for api in [t.ipv4("api"), t.ipv6("api")].map(|ip| SocketAddr::new(ip, 8080)) {
        let _server = tcp_server(t.ns("api"), api).unwrap();
        assert!(zt_tests::tcp_connect(t.ns("web"), api, Duration::from_secs(2)).is_ok(), "web → {api}");
        assert!(zt_tests::tcp_connect(t.ns("intruder"), api, Duration::from_millis(700)).is_err(), "intruder → {api}");
    }
    let allow = wait_for(&agent, "web's flow", |e| e["verdict"] == "allow" && e["src"]["identity"] == "web");
    assert_eq!(allow["src"]["source"], "interface", "{allow:#}");
    assert_eq!(allow["interface"], "lxc-web", "{allow:#}");
}
