//! Nodes and workloads as namespaces joined by veth pairs (the pod model), optionally a second
//! node behind an uplink veth.
//!
//! Addressing: workload `i` on node-a has `eth0` = 10.20.i.2/24 and fd00:20:i::2/64 (i in hex),
//! its node-side veth `lxc-<name>` = 10.20.i.1/24 and fd00:20:i::1/64, and default routes via
//! the node side. Node-b's workloads use 10.30.i.0/24 and fd00:30:i::/64 the same way. The
//! uplink is 10.99.0.1/24 + fd00:99::1/64 on node-a and .2 / ::2 on node-b.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::{run_ip, Netns};

pub const UPLINK: &str = "uplink0";
const MAX_IFNAME_LEN: usize = 15;
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Which workloads exist, as `(name, index)`; the index picks the workload's subnets.
#[derive(Clone, Debug, Default)]
pub struct TopologySpec {
    local: Vec<(String, u8)>,
    remote: Vec<(String, u8)>,
}

impl TopologySpec {
    pub fn new() -> Self {
        Self::default()
    }

    /// A workload on node-a.
    pub fn workload(mut self, name: &str, index: u8) -> Self {
        self.local.push((name.to_owned(), index));
        self
    }

    /// A workload on node-b; the first one creates node-b and the uplink.
    pub fn remote_workload(mut self, name: &str, index: u8) -> Self {
        self.remote.push((name.to_owned(), index));
        self
    }

    fn validate(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        for (node, workloads) in [("node-a", &self.local), ("node-b", &self.remote)] {
            let mut indexes = BTreeSet::new();
            let mut ifnames = BTreeSet::new();
            for (name, index) in workloads {
                ensure!(
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                    "workload name {name:?}: use ASCII letters, digits and '-'"
                );
                ensure!(names.insert(name), "workload name {name:?} is used twice");
                ensure!(indexes.insert(index), "{node}: workload index {index} is used twice");
                let ifname = node_interface_name(name);
                ensure!(ifnames.insert(ifname.clone()), "{node}: two workloads map to interface {ifname}");
            }
        }
        Ok(())
    }
}

/// A workload: its own namespace with `eth0`, connected to a node.
#[derive(Debug)]
pub struct Workload {
    name: String,
    node_name: String,
    ns: Netns,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    node_interface: String,
}

impl Workload {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node it is connected to ("node-a" or "node-b").
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn ipv4(&self) -> IpAddr {
        self.ipv4.into()
    }

    pub fn ipv6(&self) -> IpAddr {
        self.ipv6.into()
    }

    /// The node-side veth (`lxc-<name>`), where the agent attaches its TC programs.
    pub fn node_interface(&self) -> &str {
        &self.node_interface
    }

    /// The subnet index it was created with (the third octet of its IPv4 address).
    fn index(&self) -> u8 {
        self.ipv4.octets()[2]
    }
}

/// A node namespace: routes between its workloads and, when there are two nodes, the uplink.
#[derive(Debug)]
pub struct Node {
    name: String,
    ns: Netns,
    workload_interfaces: Vec<String>,
    uplink: Option<String>,
}

impl Node {
    /// "node-a" or "node-b" (also what the agent is told with `--node-name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The node-side veths of this node's workloads (for `--attach`).
    pub fn workload_interfaces(&self) -> &[String] {
        &self.workload_interfaces
    }

    /// The uplink interface (for `--uplink`), when the topology has a second node.
    pub fn uplink(&self) -> Option<&str> {
        self.uplink.as_deref()
    }
}

/// Everything in a topology lives in namespaces it created; dropping it deletes them all.
#[derive(Debug)]
pub struct Topology {
    nodes: Vec<Node>,
    workloads: Vec<Workload>,
}

/// Per-node address plan: node-a uses 10.20/16 and fd00:20::/32, node-b 10.30/16 and fd00:30::/32.
struct NodePlan {
    name: &'static str,
    ipv4_octet: u8,
    ipv6_group: u16,
    uplink_ipv4: Ipv4Addr,
    uplink_ipv6: Ipv6Addr,
}

const NODE_PLANS: [NodePlan; 2] = [
    NodePlan {
        name: "node-a",
        ipv4_octet: 20,
        ipv6_group: 0x20,
        uplink_ipv4: Ipv4Addr::new(10, 99, 0, 1),
        uplink_ipv6: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1),
    },
    NodePlan {
        name: "node-b",
        ipv4_octet: 30,
        ipv6_group: 0x30,
        uplink_ipv4: Ipv4Addr::new(10, 99, 0, 2),
        uplink_ipv6: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2),
    },
];

impl Topology {
    pub fn new(spec: TopologySpec) -> Result<Topology> {
        spec.validate()?;
        let mut topology = Topology { nodes: Vec::new(), workloads: Vec::new() };
        let node_specs: &[&Vec<(String, u8)>] =
            if spec.remote.is_empty() { &[&spec.local] } else { &[&spec.local, &spec.remote] };
        for (plan, workloads) in NODE_PLANS.iter().zip(node_specs) {
            let node = new_node(plan)?;
            let mut node = Node { name: plan.name.to_owned(), ns: node, workload_interfaces: Vec::new(), uplink: None };
            for (name, index) in workloads.iter() {
                let workload = add_workload(&node, plan, name, *index)
                    .with_context(|| format!("{}: add workload {name} (index {index})", plan.name))?;
                node.workload_interfaces.push(workload.node_interface.clone());
                topology.workloads.push(workload);
            }
            topology.nodes.push(node);
        }
        if let [node_a, node_b] = &mut topology.nodes[..] {
            connect_uplink(node_a, node_b).context("connect node-a and node-b")?;
        }
        let namespaces = topology.nodes.iter().map(|n| &n.ns).chain(topology.workloads.iter().map(|w| &w.ns));
        for ns in namespaces {
            wait_until_links_up(ns)?;
        }
        Ok(topology)
    }

    /// node-a, the node every topology has.
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }

    /// node-b, present when the spec has remote workloads.
    pub fn remote_node(&self) -> Option<&Node> {
        self.nodes.get(1)
    }

    /// Panics on an unknown name (a typo in a test).
    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name:?} in this topology"))
    }

    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// Adds workload `name` (subnet `index`) to node-a now, e.g. under a running agent: its
    /// node-side veth `lxc-<name>` appears in the node namespace the moment the veth pair is
    /// created, and is configured and up (both ends) when this returns.
    pub fn add_workload(&mut self, name: &str, index: u8) -> Result<&Workload> {
        let mut spec = TopologySpec::new();
        for workload in self.workloads.iter().filter(|w| w.node_name == self.nodes[0].name) {
            spec = spec.workload(&workload.name, workload.index());
        }
        spec.workload(name, index).validate()?;
        let plan = &NODE_PLANS[0];
        let workload = add_workload(&self.nodes[0], plan, name, index)
            .with_context(|| format!("{}: add workload {name} (index {index})", plan.name))?;
        wait_until_links_up(&workload.ns)?;
        wait_until_links_up(&self.nodes[0].ns)?;
        self.nodes[0].workload_interfaces.push(workload.node_interface.clone());
        self.workloads.push(workload);
        Ok(self.workloads.last().expect("just pushed"))
    }

    /// Deletes workload `name`'s namespace, and with it both ends of its veth.
    pub fn remove_workload(&mut self, name: &str) {
        let position = self
            .workloads
            .iter()
            .position(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name:?} in this topology"));
        let workload = self.workloads.remove(position);
        for node in &mut self.nodes {
            node.workload_interfaces.retain(|i| *i != workload.node_interface);
        }
    }

    /// The namespace of workload `name`.
    pub fn ns(&self, name: &str) -> &Netns {
        &self.workload(name).ns
    }

    pub fn ipv4(&self, name: &str) -> IpAddr {
        self.workload(name).ipv4()
    }

    pub fn ipv6(&self, name: &str) -> IpAddr {
        self.workload(name).ipv6()
    }
}

/// Interfaces created later skip duplicate address detection: until a node-side link-local
/// address has passed DAD (a second or more), the node cannot resolve a workload's IPv6 address
/// for traffic it forwards, since its neighbour solicitations need a valid link-local source.
const NO_DAD: &str = "net.ipv6.conf.default.accept_dad=0";

fn new_node(plan: &NodePlan) -> Result<Netns> {
    let ns = Netns::new(plan.name)?;
    ns.exec_checked("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", NO_DAD])?;
    Ok(ns)
}

fn add_workload(node: &Node, plan: &NodePlan, name: &str, index: u8) -> Result<Workload> {
    let ns = Netns::new(name)?;
    ns.exec_checked("sysctl", &["-q", "-w", NO_DAD])?;
    let node_interface = node_interface_name(name);
    let ipv4_host = |host| Ipv4Addr::new(10, plan.ipv4_octet, index, host);
    let ipv6_host = |host| Ipv6Addr::new(0xfd00, plan.ipv6_group, index.into(), 0, 0, 0, 0, host);
    let (node_ns, workload_ns) = (node.ns.name(), ns.name());

    let veth = format!("-n {node_ns} link add {node_interface} type veth peer name eth0 netns {workload_ns}");
    run_ip(veth.split(' '))?;
    configure_interface(node_ns, &node_interface, ipv4_host(1), ipv6_host(1))?;
    configure_interface(workload_ns, "eth0", ipv4_host(2), ipv6_host(2))?;
    run_ip(["-n", workload_ns, "route", "add", "default", "via", &ipv4_host(1).to_string()])?;
    run_ip(["-n", workload_ns, "-6", "route", "add", "default", "via", &ipv6_host(1).to_string()])?;
    Ok(Workload {
        name: name.to_owned(),
        node_name: node.name.clone(),
        ns,
        ipv4: ipv4_host(2),
        ipv6: ipv6_host(2),
        node_interface,
    })
}

fn connect_uplink(node_a: &mut Node, node_b: &mut Node) -> Result<()> {
    let [plan_a, plan_b] = &NODE_PLANS;
    let (ns_a, ns_b) = (node_a.ns.name(), node_b.ns.name());
    run_ip(format!("-n {ns_a} link add {UPLINK} type veth peer name {UPLINK} netns {ns_b}").split(' '))?;
    for (node, plan, peer) in [(&mut *node_a, plan_a, plan_b), (&mut *node_b, plan_b, plan_a)] {
        configure_interface(node.ns.name(), UPLINK, plan.uplink_ipv4, plan.uplink_ipv6)?;
        let peer_ipv4_subnet = format!("10.{}.0.0/16", peer.ipv4_octet);
        let peer_ipv6_subnet = format!("fd00:{:x}::/32", peer.ipv6_group);
        run_ip(["-n", node.ns.name(), "route", "add", &peer_ipv4_subnet, "via", &peer.uplink_ipv4.to_string()])?;
        run_ip(["-n", node.ns.name(), "-6", "route", "add", &peer_ipv6_subnet, "via", &peer.uplink_ipv6.to_string()])?;
        node.uplink = Some(UPLINK.to_owned());
    }
    Ok(())
}

/// /24 and /64 addresses (`nodad`: usable at once, no duplicate-address detection wait), link up.
fn configure_interface(ns: &str, ifname: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<()> {
    run_ip(["-n", ns, "addr", "add", &format!("{ipv4}/24"), "dev", ifname])?;
    run_ip(["-n", ns, "addr", "add", &format!("{ipv6}/64"), "dev", ifname, "nodad"])?;
    run_ip(["-n", ns, "link", "set", ifname, "up"])
}

/// Waits until the kernel reports every link in `ns` operationally up. Carrier changes are
/// applied asynchronously (linkwatch, up to a second when many links change at once) and until
/// then the device's qdisc drops what is sent, e.g. the first neighbour replies.
fn wait_until_links_up(ns: &Netns) -> Result<()> {
    let deadline = Instant::now() + LINK_UP_TIMEOUT;
    loop {
        let links = ns.exec_checked("ip", &["-br", "link", "show"])?;
        let links = String::from_utf8_lossy(&links.stdout);
        let all_up = links.lines().all(|line| {
            let mut columns = line.split_whitespace();
            columns.next() == Some("lo") || columns.next() == Some("UP")
        });
        if all_up {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("links in {ns} not up after {LINK_UP_TIMEOUT:?}:\n{links}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `lxc-<name>`, cut to the kernel's 15-character interface name limit.
fn node_interface_name(workload: &str) -> String {
    format!("lxc-{workload}").chars().take(MAX_IFNAME_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        assert_eq!(node_interface_name("db"), "lxc-db");
        assert_eq!(node_interface_name("a-very-long-workload"), "lxc-a-very-long");
    }

    #[test]
    fn spec_rejects_ambiguous_workloads() {
        assert!(TopologySpec::new().workload("web", 1).workload("web", 2).validate().is_err());
        assert!(TopologySpec::new().workload("web", 1).workload("api", 1).validate().is_err());
        assert!(TopologySpec::new().workload("web", 1).remote_workload("web", 2).validate().is_err());
        assert!(TopologySpec::new().workload("reporting-db-1", 1).workload("reporting-db-2", 2).validate().is_err());
        assert!(TopologySpec::new().workload("we b", 1).validate().is_err());
        assert!(TopologySpec::new().workload("web", 1).remote_workload("reports", 1).validate().is_ok());
    }
}
