//! Real packets through a real topology: namespaces as workloads on veths, a second node behind
//! an uplink, the agent attached in the node namespace. Needs root; fails, never skips.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde_json::Value;
use zt_tests::{
    ensure_root, ping, run_agent_command, tcp_connect, tcp_server, udp_echo_server, udp_roundtrip, Agent, Server,
    Topology, TopologySpec,
};

const WAIT: Duration = Duration::from_secs(2);
/// How long a blocked attempt is given before it counts as dropped.
const BLOCKED: Duration = Duration::from_millis(700);
const EVENT_WAIT: Duration = Duration::from_secs(5);

fn policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/topology.yaml")
}

fn topology() -> Topology {
    ensure_root().unwrap();
    Topology::new(
        TopologySpec::new()
            .workload("web", 1)
            .workload("api", 2)
            .workload("db", 3)
            .workload("intruder", 9)
            .remote_workload("reports", 1)
            .remote_workload("stranger", 2),
    )
    .expect("building the test topology")
}

/// Servers on api (tcp 8080 + 8081, udp 5353), db (tcp 5432) and web (tcp 9000), v4 and v6.
fn servers(t: &Topology) -> Vec<Server> {
    let mut servers = Vec::new();
    for family in [Family::V4, Family::V6] {
        let at = |name: &str, port| SocketAddr::new(family.addr(t, name), port);
        servers.push(tcp_server(t.ns("api"), at("api", 8080)).unwrap());
        servers.push(tcp_server(t.ns("api"), at("api", 8081)).unwrap());
        servers.push(udp_echo_server(t.ns("api"), at("api", 5353)).unwrap());
        servers.push(tcp_server(t.ns("db"), at("db", 5432)).unwrap());
        servers.push(tcp_server(t.ns("web"), at("web", 9000)).unwrap());
    }
    servers
}

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn addr(self, t: &Topology, name: &str) -> IpAddr {
        match self {
            Family::V4 => t.ipv4(name),
            Family::V6 => t.ipv6(name),
        }
    }
}

fn tcp(t: &Topology, from: &str, to: &str, port: u16, family: Family, timeout: Duration) -> bool {
    tcp_connect(t.ns(from), SocketAddr::new(family.addr(t, to), port), timeout).is_ok()
}

fn udp(t: &Topology, from: &str, to: &str, port: u16, family: Family, timeout: Duration) -> bool {
    udp_roundtrip(t.ns(from), SocketAddr::new(family.addr(t, to), port), timeout).is_ok()
}

fn icmp(t: &Topology, from: &str, to: &str, family: Family, timeout: Duration) -> bool {
    ping(t.ns(from), family.addr(t, to), timeout)
}

fn field<'a>(event: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(event, |v, key| &v[key])
}

/// An event matching all `(path, value)` pairs, e.g. `("src.identity", "intruder")`.
fn matches(event: &Value, expected: &[(&str, Value)]) -> bool {
    expected.iter().all(|(path, value)| field(event, path) == value)
}

fn wait_for(agent: &Agent, expected: &[(&str, Value)]) -> Value {
    agent.wait_for_event(|e| matches(e, expected), EVENT_WAIT).unwrap_or_else(|| {
        panic!(
            "no event matching {expected:?}\nevents: {:#?}\nagent log:\n{}",
            agent.events(),
            agent.stderr()
        )
    })
}

#[test]
fn enforce_mode_allows_declared_flows_with_replies_and_drops_everything_else() {
    let t = topology();
    let _servers = servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    for family in [Family::V4, Family::V6] {
        // Allowed, and the echo proves the replies came back.
        assert!(tcp(&t, "web", "api", 8080, family, WAIT), "{family:?} web→api tcp 8080");
        assert!(udp(&t, "web", "api", 5353, family, WAIT), "{family:?} web→api udp 5353");
        assert!(icmp(&t, "web", "api", family, WAIT), "{family:?} web→api ping");
        assert!(tcp(&t, "api", "db", 5432, family, WAIT), "{family:?} api→db tcp 5432");
        // Everything else.
        assert!(!tcp(&t, "intruder", "db", 5432, family, BLOCKED), "{family:?} intruder→db");
        assert!(!tcp(&t, "intruder", "api", 8080, family, BLOCKED), "{family:?} intruder→api");
        assert!(!udp(&t, "intruder", "api", 5353, family, BLOCKED), "{family:?} intruder→api udp");
        assert!(!icmp(&t, "intruder", "api", family, BLOCKED), "{family:?} intruder ping api");
        assert!(!tcp(&t, "web", "api", 8081, family, BLOCKED), "{family:?} web→api on an unlisted port");
        assert!(!tcp(&t, "web", "db", 5432, family, BLOCKED), "{family:?} web skipping a tier");
        assert!(!tcp(&t, "api", "web", 9000, family, BLOCKED), "{family:?} api→web, the allowed direction reversed");
        assert!(!icmp(&t, "api", "web", family, BLOCKED), "{family:?} api ping web");
    }
    let status = run_agent_command(["status", "--json", "--socket", agent.socket().to_str().unwrap()]).unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["mode"], "enforce");
    assert!(status["packets"]["deny/default-deny"].as_u64().unwrap() > 0, "{status:#}");
    assert!(status["packets"]["allow/established"].as_u64().unwrap() > 0, "{status:#}");
}

#[test]
fn monitor_mode_passes_everything_and_reports_would_be_denials_as_audits() {
    let t = topology();
    let _servers = servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "monitor").unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(tcp(&t, "web", "api", 8080, family, WAIT), "{family:?} allowed flow");
        assert!(tcp(&t, "intruder", "db", 5432, family, WAIT), "{family:?} monitor mode drops nothing");
        assert!(udp(&t, "intruder", "api", 5353, family, WAIT), "{family:?} monitor mode drops nothing (udp)");
        assert!(icmp(&t, "intruder", "api", family, WAIT), "{family:?} monitor mode drops nothing (icmp)");
        let db = family.addr(&t, "db").to_string();
        let audit = wait_for(
            &agent,
            &[
                ("verdict", "audit".into()),
                ("mode", "monitor".into()),
                ("reason", "default-deny".into()),
                ("policy", "default-deny".into()),
                ("protocol", "tcp".into()),
                ("src.identity", "intruder".into()),
                ("dst.identity", "db".into()),
                ("dst.ip", db.into()),
                ("dst.port", 5432.into()),
            ],
        );
        // The intruder's own egress is default-deny, so that is the direction that decided.
        assert_eq!(audit["direction"], "egress", "{audit:#}");
        assert_eq!(audit["hook"], "tc-ingress", "{audit:#}");
        assert_eq!(audit["interface"], "lxc-intruder", "{audit:#}");
        wait_for(&agent, &[("verdict", "audit".into()), ("protocol", "udp".into()), ("src.identity", "intruder".into())]);
        let icmp_proto = match family {
            Family::V4 => "icmp",
            Family::V6 => "icmpv6",
        };
        wait_for(&agent, &[("verdict", "audit".into()), ("protocol", icmp_proto.into()), ("src.identity", "intruder".into())]);
    }
    assert!(
        !agent.events().iter().any(|e| e["verdict"] == "deny"),
        "monitor mode must not deny: {:#?}",
        agent.events()
    );
}

#[test]
fn events_name_both_identities_and_the_deciding_policy() {
    let t = topology();
    let _servers = servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    assert!(tcp(&t, "web", "api", 8080, Family::V4, WAIT));
    let allow = wait_for(&agent, &[("verdict", "allow".into()), ("src.identity", "web".into())]);
    assert_eq!(allow["reason"], "policy-allow");
    assert_eq!(allow["dst"]["identity"], "api");
    assert_eq!(allow["dst"]["port"], 8080);
    assert_eq!(allow["src"]["ip"], t.ipv4("web").to_string());
    // api's ingress consent is named when both ends consent.
    assert_eq!(allow["policy"], "api");
    assert_eq!(allow["rule"], "api/ingress/0");
    assert_eq!(allow["node"], t.node().name());
    assert!(allow["time"].as_str().unwrap().ends_with('Z'), "{allow:#}");

    // db's ingress refuses web even though web's own egress policy says nothing about db.
    assert!(!tcp(&t, "web", "db", 5432, Family::V6, BLOCKED));
    let deny = wait_for(&agent, &[("verdict", "deny".into()), ("src.identity", "web".into()), ("dst.identity", "db".into())]);
    assert_eq!(deny["reason"], "default-deny");
    assert_eq!(deny["policy"], "default-deny");
    assert_eq!(deny["rule"], Value::Null);
    assert_eq!(deny["protocol"], "tcp");
    assert_eq!(deny["dst"]["ip"], t.ipv6("db").to_string());
}

#[test]
fn mode_switch_takes_effect_without_reloading() {
    let t = topology();
    let _servers = servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "monitor").unwrap();
    let pid = agent.pid();
    assert!(tcp(&t, "intruder", "db", 5432, Family::V4, WAIT), "monitor: the attempt goes through");
    agent.set_mode("enforce").unwrap();
    assert!(!tcp(&t, "intruder", "db", 5432, Family::V4, BLOCKED), "enforce: the same attempt is dropped");
    assert!(tcp(&t, "api", "db", 5432, Family::V4, WAIT), "enforce: allowed flows still work");
    wait_for(&agent, &[("verdict", "deny".into()), ("mode", "enforce".into()), ("src.identity", "intruder".into())]);
    agent.set_mode("monitor").unwrap();
    assert!(tcp(&t, "intruder", "db", 5432, Family::V4, WAIT), "back to monitor");
    assert_eq!(agent.pid(), pid, "the same agent process throughout");
}

#[test]
fn xdp_on_the_uplink_judges_traffic_from_another_node() {
    let t = topology();
    let _servers = servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(tcp(&t, "reports", "api", 8080, family, WAIT), "{family:?} reports→api is allowed");
        assert!(!tcp(&t, "reports", "db", 5432, family, BLOCKED), "{family:?} reports→db is not");
        assert!(!tcp(&t, "stranger", "api", 8080, family, BLOCKED), "{family:?} an undeclared remote workload");
    }
    let deny = wait_for(&agent, &[("verdict", "deny".into()), ("hook", "xdp".into()), ("src.identity", "world".into())]);
    assert_eq!(deny["dst"]["identity"], "api");
    assert_eq!(deny["direction"], "ingress");
    assert_eq!(deny["interface"], "uplink0");
    wait_for(&agent, &[("verdict", "allow".into()), ("hook", "xdp".into()), ("src.identity", "reports".into())]);
}

#[test]
fn a_malformed_policy_is_rejected_before_anything_is_attached() {
    let t = topology();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: zt/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  subject: [nobody]\n  ingress: []\n",
    )
    .unwrap();
    let err = Agent::start_on(t.node(), &bad, "enforce").err().expect("the agent must refuse the policy");
    let message = format!("{err:#}");
    assert!(message.contains("bad.yaml:5:"), "error names file and line: {message}");
    assert!(message.contains("nobody"), "error names the unknown identity: {message}");
    // Nothing was attached: traffic flows as if zt were not there.
    let _servers = servers(&t);
    assert!(tcp(&t, "intruder", "db", 5432, Family::V4, WAIT));
}

#[test]
fn a_staged_policy_reports_what_it_would_deny_and_changes_nothing_that_passes() {
    let t = topology();
    let _servers = servers(&t);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(policy(), dir.path().join("topology.yaml")).unwrap();
    // Staged: would deny api → db, which the policy in force allows. (Rules add up across
    // policies, so only a deny can take away what another policy allows.)
    let staged = "apiVersion: zt/v1\nkind: Policy\nmetadata: {name: db-lockdown}\nspec:\n  subject: [db]\n  mode: monitor\n  ingress: [{from: [api], action: deny}]\n";
    std::fs::write(dir.path().join("staged.yaml"), staged).unwrap();
    let agent = Agent::start_on(t.node(), dir.path(), "enforce").unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(tcp(&t, "api", "db", 5432, family, WAIT), "{family:?} api→db passes while the lockdown is staged");
        assert!(!tcp(&t, "intruder", "db", 5432, family, BLOCKED), "{family:?} what was denied stays denied");
    }
    let audit = wait_for(
        &agent,
        &[
            ("verdict", "audit".into()),
            ("staged", true.into()),
            ("mode", "enforce".into()),
            ("reason", "policy-deny".into()),
            ("direction", "ingress".into()),
            ("src.identity", "api".into()),
            ("dst.identity", "db".into()),
            ("dst.port", 5432.into()),
        ],
    );
    assert_eq!((&audit["policy"], &audit["rule"]), (&"db-lockdown".into(), &"db-lockdown/ingress/0".into()), "{audit:#}");
    // The intruder's denial is the enforced one: a deny, not a staged audit.
    let denied = wait_for(&agent, &[("verdict", "deny".into()), ("src.identity", "intruder".into()), ("dst.identity", "db".into())]);
    assert!(denied.get("staged").is_none(), "{denied:#}");
}
