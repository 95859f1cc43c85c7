//! `zt-agent policy import-k8s`: `networking.k8s.io/v1` NetworkPolicy, read and brought to its
//! meaning (the upstream semantics, made explicit): which pods it isolates in which direction,
//! and what each rule admits; then written as zt policy over pod identities ([`emit`]).
//!
//! Upstream's rules, as applied here:
//! - `policyTypes` absent: Ingress always, Egress when `egress` has rules.
//! - A direction in `policyTypes` isolates the selected pods for it; its rules (none: nothing)
//!   are allowed, and several policies' rules add up (allow-only, a union).
//! - A rule without `from`/`to` admits every peer; without `ports` every port.
//! - A peer: `podSelector` alone, the policy's namespace; `namespaceSelector` alone, every pod
//!   of the matching namespaces; both, the matching pods of the matching namespaces (an AND in
//!   one peer, where two peers are an OR); `ipBlock` alone, addresses in `cidr` outside `except`.
//! - A port: TCP unless `protocol` says UDP or SCTP; a number, a range up to `endPort`, a name
//!   (resolved against the destination pod's container ports), or absent (every port).
//! - A pod's own node always reaches it (upstream: pods cannot block access from their
//!   resident node).
//!
//! Where upstream leaves the choice to the implementation, zt's: an `ipBlock` matches only
//! addresses that are no pod's and not the node's (workloads are known by identity, never by
//! address: a pod's address is its label set's, whatever block it falls in).
//!
//! What zt cannot express is refused, naming the field: selecting pods on a label that pod
//! identities leave out (`identity::pods::IGNORED_LABELS`), IPv4-mapped IPv6 blocks, and names
//! that cannot make a zt policy name.

pub mod emit;
pub mod reference;
pub mod truth_table;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{anyhow, Context as _};
use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::Deserialize;
use serde_json::Value;

pub use super::labels::Selector;
use super::{is_port_name, labels::Requirement, name_problem, parse_prefix, pods::namespace_problem};
use crate::identity::pods::IGNORED_LABELS;

/// One NetworkPolicy, meant explicitly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    pub namespace: String,
    pub name: String,
    /// The pods of `namespace` it selects.
    pub pods: Selector,
    /// `Some` when it isolates them for ingress: the rules that admit (empty: nothing does).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `None`: every peer, in the cluster or not.
    pub peers: Option<Vec<Peer>>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<Port>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces `namespaces` picks.
    Pods { namespaces: Namespaces, pods: Selector },
    /// Addresses in `cidr` outside every `except`.
    Block { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// The policy's own.
    Own(String),
    Matching(Selector),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// zt's protocol of the same name.
    pub fn zt(self) -> super::Protocol {
        match self {
            Protocol::Tcp => super::Protocol::Tcp,
            Protocol::Udp => super::Protocol::Udp,
            Protocol::Sctp => super::Protocol::Sctp,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    pub port: PortRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Every,
    Range(u16, u16),
    /// A container port's name on the destination pod.
    Named(String),
}

impl Isolation {
    /// The zt policy it becomes.
    pub fn zt_name(&self) -> String {
        zt_policy_name(&self.namespace, &self.name)
    }
}

/// `k8s.<namespace>.<name>`: a namespace has no '.', so the first one after `k8s.` ends it.
fn zt_policy_name(namespace: &str, name: &str) -> String {
    format!("k8s.{namespace}.{name}")
}

/// Every NetworkPolicy in `text` (YAML, one or more documents, each a NetworkPolicy or a list
/// of them as `kubectl get -o yaml` prints; other kinds are refused), each brought to its
/// meaning. Errors name the file, the policy and the field.
pub fn parse(text: &str, label: &str) -> Result<Vec<Isolation>, Vec<String>> {
    let mut isolations = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let what = format!("{label}: document {}", index + 1);
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) if matches!(value["kind"].as_str(), Some("List" | "NetworkPolicyList")) => {
                let items = value["items"].as_array().map(Vec::as_slice).unwrap_or_default();
                for (i, item) in items.iter().enumerate() {
                    add_policy(item.clone(), &format!("{what}, items[{i}]"), &mut isolations, &mut errors);
                }
            }
            Ok(value) => add_policy(value, &what, &mut isolations, &mut errors),
            Err(err) => errors.push(format!("{what}: {err}")),
        }
    }
    if errors.is_empty() { Ok(isolations) } else { Err(errors) }
}

/// One NetworkPolicy object (`what` says where it is), brought to its meaning, or its error.
fn add_policy(value: Value, what: &str, isolations: &mut Vec<Isolation>, errors: &mut Vec<String>) {
    if (value["apiVersion"].as_str(), value["kind"].as_str()) != (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) {
        errors.push(format!(
            "{what}: apiVersion/kind: {}/{} is not networking.k8s.io/v1 NetworkPolicy",
            value["apiVersion"].as_str().unwrap_or("?"),
            value["kind"].as_str().unwrap_or("?")
        ));
        return;
    }
    match serde_json::from_value::<NetworkPolicy>(value) {
        Ok(policy) => match meaning(&policy) {
            Ok(isolation) => isolations.push(isolation),
            Err(err) => errors.push(format!("{what} ({}): {err}", policy.metadata.name.as_deref().unwrap_or("?"))),
        },
        Err(err) => errors.push(format!("{what}: {err}")),
    }
}

/// The zt policy of every NetworkPolicy in `files` (label, text): YAML that loads on its own.
/// Errors name the file, the document, the policy and the field.
pub fn import(files: &[(String, String)]) -> Result<String, Vec<String>> {
    let mut isolations = Vec::new();
    let mut errors = Vec::new();
    let mut first_seen: BTreeMap<(String, String), &str> = BTreeMap::new();
    for (label, text) in files {
        match parse(text, label) {
            Ok(parsed) => {
                for isolation in parsed {
                    let key = (isolation.namespace.clone(), isolation.name.clone());
                    match first_seen.get(&key) {
                        // One object in the cluster: which of the two is meant cannot be told.
                        Some(first) => errors.push(format!(
                            "{label}: NetworkPolicy {}/{}: metadata.name: also in {first}; keep one of them",
                            key.0, key.1
                        )),
                        None => {
                            first_seen.insert(key, label);
                            isolations.push(isolation);
                        }
                    }
                }
            }
            Err(more) => errors.extend(more),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let labels: Vec<&str> = files.iter().map(|(label, _)| label.as_str()).collect();
    let yaml = emit::emit(&isolations, &labels);
    // Every refusal is made above, with its field: a set that does not load is a bug here.
    if let Err(errors) = super::parse_str(&yaml, "<imported>") {
        return Err(vec![format!("the imported policy does not load (a bug in import-k8s):\n{errors}\n--- imported ---\n{yaml}")]);
    }
    Ok(yaml)
}

/// `zt-agent policy import-k8s <files>...` (`-` for stdin): the zt policy, as YAML.
pub fn run(files: &[PathBuf]) -> anyhow::Result<String> {
    use crate::bounded::{read_stdin, read_text, POLICY_FILE_LIMIT};
    let mut texts = Vec::new();
    for file in files {
        let (label, text) = if file.as_os_str() == "-" {
            ("<stdin>".to_owned(), read_stdin(POLICY_FILE_LIMIT).context("reading NetworkPolicies from stdin")?)
        } else {
            let label = file.display().to_string();
            let text = read_text(file, POLICY_FILE_LIMIT).with_context(|| format!("cannot read {label}"))?;
            (label, text)
        };
        texts.push((label, text));
    }
    import(&texts).map_err(|errors| anyhow!(errors.join("\n")))
}

fn meaning(policy: &NetworkPolicy) -> Result<Isolation, String> {
    let name = policy.metadata.name.clone().ok_or("metadata.name: missing")?;
    // Namespaced: without one, kubectl would apply it to the namespace it is pointed at, which
    // an import cannot know.
    let namespace = policy.metadata.namespace.clone().ok_or("metadata.namespace: missing; give each NetworkPolicy its namespace")?;
    if let Some(problem) = namespace_problem(&namespace) {
        return Err(format!("metadata.namespace: {problem}"));
    }
    let zt_name = zt_policy_name(&namespace, &name);
    if let Some(problem) = name_problem(&zt_name) {
        return Err(format!("metadata.name: {name:?} cannot make the zt policy name {zt_name:?}: {problem}"));
    }
    let spec = policy.spec.as_ref().ok_or("spec: missing")?;
    let pods = pod_selector(&spec.pod_selector.clone().unwrap_or_default(), "spec.podSelector")?;
    let has_egress_rules = spec.egress.as_ref().is_some_and(|rules| !rules.is_empty());
    let types: Vec<String> = match &spec.policy_types {
        Some(types) => types.clone(),
        None if has_egress_rules => vec!["Ingress".into(), "Egress".into()],
        None => vec!["Ingress".into()],
    };
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err(format!("spec.policyTypes[{i}]: {t:?} is not Ingress or Egress"));
        }
    }
    // A direction the policy isolates: its rules, each (peers, ports).
    let direction = |wanted: &str, key: &str, peers_key: &str, rules: Vec<RuleParts>| {
        if !types.iter().any(|t| t == wanted) {
            return Ok(None);
        }
        let rules = rules.into_iter().enumerate();
        rules.map(|(i, (peers, ports))| rule(peers, ports, &format!("spec.{key}[{i}]"), peers_key, &namespace)).collect::<Result<Vec<_>, _>>().map(Some)
    };
    let ingress = direction("Ingress", "ingress", "from", spec.ingress.iter().flatten().map(|r| (&r.from, &r.ports)).collect())?;
    let egress = direction("Egress", "egress", "to", spec.egress.iter().flatten().map(|r| (&r.to, &r.ports)).collect())?;
    Ok(Isolation { namespace, name, pods, ingress, egress })
}

/// A rule's peers (`from` or `to`) and ports, as the API has them.
type RuleParts<'a> = (&'a Option<Vec<NetworkPolicyPeer>>, &'a Option<Vec<NetworkPolicyPort>>);

fn rule(
    peers: &Option<Vec<NetworkPolicyPeer>>,
    ports: &Option<Vec<NetworkPolicyPort>>,
    at: &str,
    peers_key: &str,
    namespace: &str,
) -> Result<Rule, String> {
    // An empty list is what an absent one is: the API server stores both alike.
    let peers = match peers.as_deref() {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter().enumerate().map(|(j, p)| peer(p, &format!("{at}.{peers_key}[{j}]"), namespace)).collect::<Result<_, _>>()?,
        ),
    };
    let ports = match ports.as_deref() {
        None | Some([]) => None,
        Some(list) => Some(list.iter().enumerate().map(|(j, p)| port(p, &format!("{at}.ports[{j}]"))).collect::<Result<_, _>>()?),
    };
    Ok(Rule { peers, ports })
}

fn peer(peer: &NetworkPolicyPeer, at: &str, namespace: &str) -> Result<Peer, String> {
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(block), None, None) => {
            let cidr = block_prefix(&block.cidr, &format!("{at}.ipBlock.cidr"))?;
            let mut except = Vec::new();
            for (k, text) in block.except.iter().flatten().enumerate() {
                let net = block_prefix(text, &format!("{at}.ipBlock.except[{k}]"))?;
                if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
                    return Err(format!("{at}.ipBlock.except[{k}]: {net} is not strictly inside {cidr}"));
                }
                except.push(net);
            }
            Ok(Peer::Block { cidr, except })
        }
        (Some(_), _, _) => Err(format!("{at}.ipBlock: goes alone, without namespaceSelector or podSelector")),
        (None, None, None) => Err(format!("{at}: a peer needs podSelector, namespaceSelector or ipBlock")),
        (None, namespaces, pods) => {
            let namespaces = match namespaces {
                Some(selector) => Namespaces::Matching(Selector::from_api(selector, &format!("{at}.namespaceSelector"))?),
                None => Namespaces::Own(namespace.to_owned()),
            };
            let pods = match pods {
                Some(selector) => pod_selector(selector, &format!("{at}.podSelector"))?,
                None => Selector::default(),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

/// A pod label selector, on labels pod identities keep: one on a label they leave out would
/// match every label set or none, whatever the pods carry.
fn pod_selector(selector: &LabelSelector, at: &str) -> Result<Selector, String> {
    let selector = Selector::from_api(selector, at)?;
    let mut keys = selector.requirements.iter().map(|requirement| match requirement {
        Requirement::In(key, _) | Requirement::NotIn(key, _) | Requirement::Exists(key) | Requirement::DoesNotExist(key) => key,
    });
    match keys.find(|key| IGNORED_LABELS.contains(&key.as_str())) {
        Some(key) => Err(format!(
            "{at}: selects on {key:?}, which zt leaves out of pod identities (it differs per pod or per rollout, \
             not per workload); select on the workload's own labels"
        )),
        None => Ok(selector),
    }
}

/// An ipBlock prefix as upstream reads it (host bits masked off), if zt can express it.
fn block_prefix(text: &str, at: &str) -> Result<IpNet, String> {
    let net: IpNet = text.parse().map_err(|_| format!("{at}: {text:?} is not a CIDR"))?;
    parse_prefix(&net.trunc().to_string()).map_err(|problem| format!("{at}: {problem}"))
}

fn port(port: &NetworkPolicyPort, at: &str) -> Result<Port, String> {
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => return Err(format!("{at}.protocol: {other:?} is not TCP, UDP or SCTP")),
    };
    let number = |n: i32, field: &str| {
        u16::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| format!("{at}.{field}: {n} is not a port (1-65535)"))
    };
    let port = match (&port.port, port.end_port) {
        (None, None) => PortRef::Every,
        (None, Some(_)) => return Err(format!("{at}.endPort: needs a port to start from")),
        (Some(IntOrString::Int(n)), None) => {
            let n = number(*n, "port")?;
            PortRef::Range(n, n)
        }
        (Some(IntOrString::Int(n)), Some(end)) => {
            let (n, end) = (number(*n, "port")?, number(end, "endPort")?);
            if end < n {
                return Err(format!("{at}.endPort: {end} is below port {n}"));
            }
            PortRef::Range(n, end)
        }
        (Some(IntOrString::String(name)), None) if is_port_name(name) => PortRef::Named(name.clone()),
        (Some(IntOrString::String(name)), None) => {
            return Err(format!(
                "{at}.port: {name:?} is neither a number nor a port name (1-15 lowercase letters, digits and '-', \
                 with a letter, no '-' at either end or twice in a row)"
            ))
        }
        (Some(IntOrString::String(_)), Some(_)) => return Err(format!("{at}.endPort: needs a numeric port, not a named one")),
    };
    Ok(Port { protocol, port })
}

#[cfg(test)]
mod tests;
