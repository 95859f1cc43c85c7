//! `networking.k8s.io/v1` NetworkPolicy, read and brought to its meaning (the upstream
//! semantics, made explicit): which pods it isolates in which direction, and what each rule
//! admits. The first part of `zt-agent policy import-k8s`; turning this into zt policy over
//! pod identities comes with them (docs/kubernetes.md).
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

pub mod reference;

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;
use serde_json::Value;

pub use super::labels::Selector;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
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

/// Every NetworkPolicy in `text` (YAML, one or more documents; other kinds are refused), each
/// brought to its meaning. Errors name the file, the policy and the field.
pub fn parse(text: &str, label: &str) -> Result<Vec<Isolation>, Vec<String>> {
    let mut isolations = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(err) => {
                errors.push(format!("{label}: document {}: {err}", index + 1));
                continue;
            }
        };
        let what = format!("{label}: document {}", index + 1);
        if (value["apiVersion"].as_str(), value["kind"].as_str()) != (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) {
            errors.push(format!(
                "{what}: apiVersion/kind: {}/{} is not networking.k8s.io/v1 NetworkPolicy",
                value["apiVersion"].as_str().unwrap_or("?"),
                value["kind"].as_str().unwrap_or("?")
            ));
            continue;
        }
        match serde_json::from_value::<NetworkPolicy>(value) {
            Ok(policy) => match meaning(&policy) {
                Ok(isolation) => isolations.push(isolation),
                Err(err) => errors.push(format!("{what} ({}): {err}", policy.metadata.name.as_deref().unwrap_or("?"))),
            },
            Err(err) => errors.push(format!("{what}: {err}")),
        }
    }
    if errors.is_empty() { Ok(isolations) } else { Err(errors) }
}

fn meaning(policy: &NetworkPolicy) -> Result<Isolation, String> {
    let name = policy.metadata.name.clone().ok_or("metadata.name: missing")?;
    // Namespaced: without one, kubectl would apply it to the namespace it is pointed at, which
    // an import cannot know.
    let namespace = policy.metadata.namespace.clone().ok_or("metadata.namespace: missing; give each NetworkPolicy its namespace")?;
    let spec = policy.spec.as_ref().ok_or("spec: missing")?;
    let pods = Selector::from_api(&spec.pod_selector.clone().unwrap_or_default(), "spec.podSelector")?;
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
    let direction = |wanted: &str, key: &str, peers_key: &str, rules: Vec<(&Option<Vec<NetworkPolicyPeer>>, &Option<Vec<NetworkPolicyPort>>)>| {
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
            let cidr: IpNet = block.cidr.parse().map_err(|_| format!("{at}.ipBlock.cidr: {:?} is not a CIDR", block.cidr))?;
            let mut except = Vec::new();
            for (k, text) in block.except.iter().flatten().enumerate() {
                let net: IpNet = text.parse().map_err(|_| format!("{at}.ipBlock.except[{k}]: {text:?} is not a CIDR"))?;
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
                Some(selector) => Selector::from_api(selector, &format!("{at}.podSelector"))?,
                None => Selector::default(),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
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

/// An IANA service name, as a container port's name must be (and so a named port here).
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests;
