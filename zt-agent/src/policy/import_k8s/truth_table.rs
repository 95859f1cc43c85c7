//! The truth table `policy import-k8s` is held to ([`TABLE`]): NetworkPolicy sets from the
//! upstream documentation's cases, with flows between the pods of one small cluster and
//! whether each is allowed. One table for every check — the reference ([`super::reference`]),
//! the imported zt policy in the reference evaluator (the unit tests) and in the loaded kernel
//! program (`tests/tests/import_k8s.rs`) — so they cannot drift apart.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Deserialize;

use super::{
    import, parse,
    reference::{End, Pod},
    Isolation, Protocol,
};
use crate::{
    identity::pods::{Cluster, NamedPorts, PodIdentity},
    policy::{
        self,
        compile::{compile_for, Compiled},
    },
};
use zt_common::identity::HOST;

pub const TABLE: &str = include_str!("truth_table.yaml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// The addresses of the node every pod runs on.
    pub node: Vec<IpAddr>,
    /// Each namespace's labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: BTreeMap<String, TablePod>,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(from = "PodEntry")]
pub struct TablePod {
    pub pod: Pod,
    pub service_account: String,
    pub addresses: Vec<IpAddr>,
}

/// A pod as the table writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodEntry {
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "default_account")]
    service_account: String,
    addresses: Vec<IpAddr>,
    /// Named container ports: (name, protocol, number).
    #[serde(default)]
    ports: Vec<(String, Protocol, u16)>,
}

fn default_account() -> String {
    "default".into()
}

impl From<PodEntry> for TablePod {
    fn from(entry: PodEntry) -> Self {
        let pod = Pod { namespace: entry.namespace, labels: entry.labels, ports: entry.ports };
        TablePod { pod, service_account: entry.service_account, addresses: entry.addresses }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// NetworkPolicy YAML.
    pub policies: String,
    pub flows: Vec<Flow>,
}

/// `[source, destination, protocol, port, allow|deny]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "(String, String, Protocol, u16, Expect)")]
pub struct Flow {
    pub src: String,
    pub dst: String,
    pub protocol: Protocol,
    pub port: u16,
    pub allowed: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

impl From<(String, String, Protocol, u16, Expect)> for Flow {
    fn from((src, dst, protocol, port, expect): (String, String, Protocol, u16, Expect)) -> Self {
        Flow { src, dst, protocol, port, allowed: matches!(expect, Expect::Allow) }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        write!(f, "{} -> {} {:?}/{} {verdict}", self.src, self.dst, self.protocol, self.port)
    }
}

impl Table {
    /// [`TABLE`], read. Panics if it is not a table (it is a fixture, checked by every test).
    pub fn load() -> Table {
        serde_yaml::from_str(TABLE).unwrap_or_else(|err| panic!("truth_table.yaml: {err}"))
    }

    /// What a compile knows: every pod's label set, with the ports its pods name, and the
    /// namespaces' labels.
    pub fn cluster(&self) -> Cluster {
        let mut identities: BTreeMap<PodIdentity, NamedPorts> = BTreeMap::new();
        for (name, table_pod) in &self.pods {
            let pod = &table_pod.pod;
            let identity = PodIdentity::of(&pod.namespace, &table_pod.service_account, &pod.labels)
                .unwrap_or_else(|err| panic!("pod {name}: {err}"));
            let named = identities.entry(identity).or_default();
            for (port_name, protocol, number) in &pod.ports {
                named.entry(port_name.clone()).or_default().insert((protocol.zt().number(), *number));
            }
        }
        Cluster { identities, namespaces: self.namespaces.clone() }
    }

    /// Every address of the pods and the node, with the identity `compiled` gives it (its label
    /// set's; the node's is `host`): what the agent binds as it learns them.
    pub fn bindings(&self, compiled: &Compiled) -> Vec<(IpAddr, u32)> {
        let mut bindings: Vec<(IpAddr, u32)> = self.node.iter().map(|addr| (*addr, HOST)).collect();
        for (name, table_pod) in &self.pods {
            let pod = &table_pod.pod;
            let identity = PodIdentity::of(&pod.namespace, &table_pod.service_account, &pod.labels).expect("checked by cluster()");
            let id = compiled.identities.id(&identity.name()).unwrap_or_else(|| panic!("pod {name} has no identity"));
            bindings.extend(table_pod.addresses.iter().map(|addr| (*addr, id)));
        }
        bindings
    }

    /// The two ends of `flow`: a pod, or the node, takes its address of the other end's family
    /// (IPv4 between two of them).
    pub fn ends(&self, flow: &Flow) -> (End<'_>, End<'_>) {
        let literal = |name: &str| name.parse::<IpAddr>().ok();
        let v4 = literal(&flow.src).or(literal(&flow.dst)).is_none_or(|addr| addr.is_ipv4());
        (self.end(&flow.src, v4), self.end(&flow.dst, v4))
    }

    fn end(&self, name: &str, v4: bool) -> End<'_> {
        let family = |addresses: &[IpAddr]| {
            let found = addresses.iter().find(|addr| addr.is_ipv4() == v4);
            *found.unwrap_or_else(|| panic!("{name} has no IPv{} address", if v4 { 4 } else { 6 }))
        };
        if name == "node" {
            return End { addr: family(&self.node), pod: None, node: true };
        }
        match self.pods.get(name) {
            Some(pod) => End { addr: family(&pod.addresses), pod: Some(&pod.pod), node: false },
            None => {
                let addr = name.parse().unwrap_or_else(|_| panic!("{name:?} is no pod, not the node and no address"));
                End { addr, pod: None, node: false }
            }
        }
    }
}

impl Case {
    /// The case's NetworkPolicies, meant.
    pub fn isolations(&self) -> Result<Vec<Isolation>, String> {
        parse(&self.policies, &self.name).map_err(|errors| errors.join("\n"))
    }

    /// The zt policy imported from the case's NetworkPolicies, and that policy compiled for the
    /// table's cluster (without the address bindings: [`Table::bindings`]).
    pub fn import(&self, table: &Table) -> Result<(String, Compiled), String> {
        let yaml = import(&[(self.name.clone(), self.policies.clone())]).map_err(|errors| errors.join("\n"))?;
        let set = policy::parse_str(&yaml, &self.name).map_err(|errors| format!("{errors}\n{yaml}"))?;
        let compiled = compile_for(&set, &table.cluster()).map_err(|err| format!("{err}\n{yaml}"))?;
        Ok((yaml, compiled))
    }
}
