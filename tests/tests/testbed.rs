//! The testbed itself, without the agent: with nothing filtering, every flow must work, and a
//! flow that cannot work must fail within its timeout. Needs root (fails otherwise).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use zt_tests::{ping, tcp_connect, tcp_server, udp_echo_server, udp_roundtrip, Topology, TopologySpec};

const TIMEOUT: Duration = Duration::from_secs(3);

fn two_nodes() -> Topology {
    Topology::new(TopologySpec::new().workload("web", 1).workload("db", 3).remote_workload("reports", 1)).unwrap()
}

#[test]
fn tcp_udp_and_ping_work_between_workloads_and_across_the_uplink() {
    let topo = two_nodes();
    let db = topo.workload("db");
    let mut servers = Vec::new();
    for ip in [db.ipv4(), db.ipv6()] {
        servers.push(tcp_server(db.ns(), SocketAddr::new(ip, 5432)).unwrap());
        servers.push(udp_echo_server(db.ns(), SocketAddr::new(ip, 5353)).unwrap());
    }
    // Same node (web) and across the uplink (reports), in both directions for ping.
    for client in ["web", "reports"] {
        let ns = topo.ns(client);
        for ip in [db.ipv4(), db.ipv6()] {
            tcp_connect(ns, SocketAddr::new(ip, 5432), TIMEOUT).unwrap();
            udp_roundtrip(ns, SocketAddr::new(ip, 5353), TIMEOUT).unwrap();
            assert!(ping(ns, ip, TIMEOUT), "ping {ip} from {client}");
        }
        for ip in [topo.ipv4(client), topo.ipv6(client)] {
            assert!(ping(db.ns(), ip, TIMEOUT), "ping {ip} from db");
        }
    }
}

#[test]
fn addresses_interfaces_and_nodes_follow_the_plan() {
    let topo = two_nodes();
    assert_eq!(topo.ipv4("db"), "10.20.3.2".parse::<IpAddr>().unwrap());
    assert_eq!(topo.ipv6("db"), "fd00:20:3::2".parse::<IpAddr>().unwrap());
    assert_eq!(topo.ipv4("reports"), "10.30.1.2".parse::<IpAddr>().unwrap());
    assert_eq!(topo.ipv6("reports"), "fd00:30:1::2".parse::<IpAddr>().unwrap());
    let node_a = topo.node();
    assert_eq!(node_a.name(), "node-a");
    assert_eq!(node_a.workload_interfaces(), ["lxc-web", "lxc-db"]);
    assert_eq!(node_a.uplink(), Some("uplink0"));
    let node_b = topo.remote_node().expect("remote workloads create node-b");
    assert_eq!(node_b.workload_interfaces(), ["lxc-reports"]);
    // The interfaces the agent will be told about exist in the node namespace.
    for interface in ["lxc-web", "lxc-db", "uplink0"] {
        let output = node_a.ns().exec("ip", ["link", "show", interface]);
        assert!(output.status.success(), "{interface} in node-a: {}", String::from_utf8_lossy(&output.stderr));
    }
    assert!(Topology::new(TopologySpec::new().workload("web", 1)).unwrap().remote_node().is_none());
}

#[test]
fn failing_flows_fail_within_their_timeout() {
    let topo = Topology::new(TopologySpec::new().workload("web", 1).workload("db", 3)).unwrap();
    let web = topo.ns("web");
    // No server: refused at once.
    assert!(tcp_connect(web, SocketAddr::new(topo.ipv4("db"), 5432), TIMEOUT).is_err());
    assert!(udp_roundtrip(web, SocketAddr::new(topo.ipv6("db"), 5353), TIMEOUT).is_err());
    // Silently dropped on the node, like a policy drop: each call gives up after its timeout.
    let node = topo.node().ns();
    for blackhole in ["10.20.200.0/24", "fd00:20:c8::/64"] {
        let output = node.exec("ip", ["route", "add", "blackhole", blackhole]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    assert!(tcp_connect(web, "10.20.200.2:80".parse().unwrap(), timeout).is_err());
    assert!(udp_roundtrip(web, "[fd00:20:c8::2]:53".parse().unwrap(), timeout).is_err());
    assert!(!ping(web, "10.20.200.2".parse().unwrap(), timeout));
    let elapsed = started.elapsed();
    assert!(elapsed >= 3 * timeout && elapsed < 3 * timeout + Duration::from_secs(2), "took {elapsed:?}");
}

#[test]
fn dropping_the_topology_deletes_its_namespaces() {
    let topo = two_nodes();
    let mut names: Vec<String> = topo.workloads().iter().map(|w| w.ns().name().to_owned()).collect();
    names.push(topo.node().ns().name().to_owned());
    names.push(topo.remote_node().unwrap().ns().name().to_owned());
    let pid = std::process::id();
    for name in &names {
        assert!(name.starts_with(&format!("zt-{pid}-")) && name.len() <= 40, "{name}");
        assert!(Path::new("/run/netns").join(name).exists(), "{name} exists while the topology lives");
    }
    drop(topo);
    for name in &names {
        assert!(!Path::new("/run/netns").join(name).exists(), "{name} is deleted with the topology");
    }
}
