//! Hostile input with real packets: fragmented flows, spoofed sources and the node's own
//! addresses, through a real topology and a real agent. Needs root; fails, never skips.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    thread,
    time::Duration,
};

use serde_json::{json, Value};
use zt_tests::{
    ensure_root, tcp_connect, AgentOptions, tcp_server, udp_echo_of, udp_echo_server, udp_send_from, Agent, Sniffer, Topology,
    TopologySpec,
};

const WAIT: Duration = Duration::from_secs(2);
const EVENT_WAIT: Duration = Duration::from_secs(5);

fn policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/topology.yaml")
}

fn topology() -> Topology {
    ensure_root().unwrap();
    Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2).workload("intruder", 9))
        .expect("building the test topology")
}

fn field<'a>(event: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(event, |v, key| &v[key])
}

/// UDP echo servers on api's port 5353, IPv4 and IPv6.
fn api_udp_echo_servers(t: &Topology) -> Vec<zt_tests::Server> {
    [t.ipv4("api"), t.ipv6("api")].into_iter().map(|addr| udp_echo_server(t.ns("api"), SocketAddr::new(addr, 5353)).unwrap()).collect()
}

fn wait_for(agent: &Agent, expected: &[(&str, Value)]) -> Value {
    agent
        .wait_for_event(|e| expected.iter().all(|(path, value)| field(e, path) == value), EVENT_WAIT)
        .unwrap_or_else(|| panic!("no event matching {expected:?}\nevents: {:#?}\nagent log:\n{}", agent.events(), agent.stderr()))
}

#[test]
fn an_allowed_fragmented_udp_flow_arrives_whole_over_ipv4_and_ipv6() {
    let t = topology();
    let _servers = api_udp_echo_servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    // 3000 bytes over a 1500-byte MTU: three fragments each way.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for api in [t.ipv4("api"), t.ipv6("api")] {
        for round in 0..10 {
            udp_echo_of(t.ns("web"), SocketAddr::new(api, 5353), &payload, WAIT)
                .unwrap_or_else(|e| panic!("datagram {round} to {api}: {e:#}\nagent log:\n{}", agent.stderr()));
        }
        // The same datagram from a workload policy does not allow is dropped as its flow.
        assert!(udp_echo_of(t.ns("intruder"), SocketAddr::new(api, 5353), &payload, Duration::from_millis(700)).is_err());
    }
    wait_for(&agent, &[("reason", json!("default-deny")), ("src.identity", json!("intruder")), ("protocol", json!("udp"))]);
    let fragment_drops: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.starts_with("fragment")))
        .collect();
    assert!(fragment_drops.is_empty(), "no fragment of these trains was refused: {fragment_drops:#?}");
}

/// intruder takes web's addresses as its own and sends from them.
fn spoof_web(t: &Topology) -> [(IpAddr, IpAddr); 2] {
    let ns = t.ns("intruder");
    for (addr, prefix) in [(t.ipv4("web"), "/32"), (t.ipv6("web"), "/128")] {
        let out = ns.exec("ip", ["addr", "add", &format!("{addr}{prefix}"), "dev", "eth0", "nodad"]);
        assert!(out.status.success(), "adding {addr}: {}", String::from_utf8_lossy(&out.stderr));
    }
    spoof_web_pairs(t)
}

/// web's and api's addresses, IPv4 and IPv6.
fn spoof_web_pairs(t: &Topology) -> [(IpAddr, IpAddr); 2] {
    [(t.ipv4("web"), t.ipv4("api")), (t.ipv6("web"), t.ipv6("api"))]
}

#[test]
fn a_spoofed_source_is_dropped_in_enforce_mode_and_audited_in_monitor_mode() {
    let t = topology();
    let _servers = api_udp_echo_servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    let pairs = spoof_web(&t);
    let sniffer = Sniffer::start(t.ns("api"), "eth0").unwrap();
    for (web, api) in pairs {
        for _ in 0..5 {
            udp_send_from(t.ns("intruder"), SocketAddr::new(web, 0), SocketAddr::new(api, 5353), b"spoofed").unwrap();
        }
    }
    thread::sleep(Duration::from_millis(300));
    for (web, api) in pairs {
        let event = wait_for(
            &agent,
            &[("reason", json!("spoof")), ("verdict", json!("deny")), ("src.ip", json!(web.to_string())), ("hook", json!("tc-ingress"))],
        );
        assert_eq!(field(&event, "dst.ip"), &json!(api.to_string()), "{event:#}");
        assert_eq!(field(&event, "interface"), &json!(t.workload("intruder").node_interface()), "{event:#}");
    }
    assert_eq!(sniffer.count(|p| p.is_to(zt_tests::sniffer::UDP, 5353)), 0, "a spoofed datagram reached api");
    // web itself, from its own interface, is still allowed.
    udp_echo_of(t.ns("web"), SocketAddr::new(t.ipv4("api"), 5353), b"genuine", WAIT).unwrap();

    // Monitor mode: the same packets pass and are reported as audits.
    zt_tests::run_agent_command(["mode", "monitor", "--socket", agent.socket().to_str().unwrap()]).unwrap();
    for (web, api) in pairs {
        udp_send_from(t.ns("intruder"), SocketAddr::new(web, 0), SocketAddr::new(api, 5353), b"spoofed").unwrap();
    }
    for (web, _) in pairs {
        wait_for(&agent, &[("reason", json!("spoof")), ("verdict", json!("audit")), ("src.ip", json!(web.to_string()))]);
    }
}

/// Established packets skip the source check only on the interface where their flow's source
/// was checked: a packet that copies an established flow's addresses and ports exactly, sent
/// from another workload, is checked there and dropped.
#[test]
fn a_spoofed_packet_riding_an_established_flow_is_dropped() {
    let t = topology();
    let _servers = api_udp_echo_servers(&t);
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    let sniffer = Sniffer::start(t.ns("api"), "eth0").unwrap();
    const FLOW_PORT: u16 = 40_123;
    let from_flow = |p: &zt_tests::Packet, web: IpAddr| p.is_to(zt_tests::sniffer::UDP, 5353) && p.src == web && p.src_port == FLOW_PORT;
    // web's flow to api, admitted both ways (api echoes).
    for (web, api) in spoof_web_pairs(&t) {
        udp_send_from(t.ns("web"), SocketAddr::new(web, FLOW_PORT), SocketAddr::new(api, 5353), b"genuine").unwrap();
    }
    thread::sleep(Duration::from_millis(300));
    for (web, api) in spoof_web(&t) {
        assert_eq!(sniffer.count(|p| from_flow(p, web)), 1, "web's own datagram to {api} arrived");
        for _ in 0..5 {
            udp_send_from(t.ns("intruder"), SocketAddr::new(web, FLOW_PORT), SocketAddr::new(api, 5353), b"spoofed").unwrap();
        }
    }
    thread::sleep(Duration::from_millis(300));
    for (web, api) in spoof_web_pairs(&t) {
        wait_for(
            &agent,
            &[("reason", json!("spoof")), ("src.ip", json!(web.to_string())), ("src.port", json!(FLOW_PORT)), ("hook", json!("tc-ingress"))],
        );
        assert_eq!(sniffer.count(|p| from_flow(p, web)), 1, "a spoofed datagram on web's flow reached {api}");
    }
}

#[test]
fn a_node_process_sending_from_the_nodes_address_in_a_workload_subnet_is_host() {
    let t = topology();
    let _server = tcp_server(t.ns("api"), SocketAddr::new(t.ipv4("api"), 8080)).unwrap();
    let agent = Agent::start_on(t.node(), policy(), "enforce").unwrap();
    // The node's side of api's veth is 10.20.2.1: inside api's 10.20.2.0/24.
    let api = SocketAddr::new(t.ipv4("api"), 8080);
    assert!(tcp_connect(t.node().ns(), api, Duration::from_millis(700)).is_err(), "host is not allowed to reach api");
    let event = wait_for(&agent, &[("reason", json!("default-deny")), ("dst.identity", json!("api")), ("src.identity", json!("host"))]);
    assert_eq!(field(&event, "src.ip"), &json!("10.20.2.1"), "{event:#}");
}

#[test]
fn a_policy_over_the_nodes_capacity_is_rejected_whole_and_the_running_one_stays() {
    let t = topology();
    let _server = tcp_server(t.ns("api"), SocketAddr::new(t.ipv4("api"), 8080)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let fixture = std::fs::read_to_string(policy()).unwrap();
    std::fs::write(&path, &fixture).unwrap();
    let mut options = AgentOptions::for_node(t.node(), &path, "enforce");
    // The fixture needs 12 ipcache entries per generation, the node's own addresses a few more.
    options.extra_args = vec!["--capacity".into(), "ipcache=40".into()];
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let api = SocketAddr::new(t.ipv4("api"), 8080);
    assert!(tcp_connect(t.ns("web"), api, WAIT).is_ok());

    // 40 more identities, one prefix each: over 50 entries do not fit in 40.
    let mut bigger = fixture.clone();
    for i in 0..40 {
        bigger.push_str(&format!(
            "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: extra-{i}}}\nspec: {{selectors: [{{cidr: 10.50.{i}.0/24}}]}}\n"
        ));
    }
    std::fs::write(&path, &bigger).unwrap();
    let rejected = wait_for(&agent, &[("kind", json!("policy")), ("result", json!("rejected"))]);
    let errors = rejected["errors"].to_string();
    assert!(errors.contains("ipcache entries and this node holds 40") && errors.contains("--capacity ipcache=N"), "{rejected:#}");
    // Generation 1 stays whole: web still reaches api, intruder still does not.
    assert!(tcp_connect(t.ns("web"), api, WAIT).is_ok());
    assert!(tcp_connect(t.ns("intruder"), api, Duration::from_millis(700)).is_err());
    assert_eq!(agent.status_json()["generation"], 1);
}

#[test]
fn an_over_long_admin_request_is_refused_and_the_agent_keeps_answering() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let t = topology();
    let agent = Agent::start_on(t.node(), policy(), "monitor").unwrap();
    let mut stream = std::os::unix::net::UnixStream::connect(agent.socket()).unwrap();
    // Past the 64 KiB limit, without a newline: the agent answers without waiting for one.
    stream.write_all(&vec![b' '; 70 << 10]).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    assert!(reply.contains("request longer than 65536 bytes"), "{reply}");
    assert_eq!(agent.status_json()["mode"], "monitor", "the next client is served");
}
