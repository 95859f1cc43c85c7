//! What a set of NetworkPolicies allows, decided directly from their meaning ([`Isolation`]),
//! flow by flow, as the upstream documentation defines it: the oracle the imported zt policy is
//! held to (through the reference evaluator and the loaded program), on the truth table of
//! [`super::truth_table`].

use std::{collections::BTreeMap, net::IpAddr};

use super::{Isolation, Namespaces, Peer, PortRef, Protocol, Rule};

/// A pod, as NetworkPolicies see it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Named container ports: (name, protocol, number).
    pub ports: Vec<(String, Protocol, u16)>,
}

/// One end of a flow: an address, and the pod it belongs to, if any.
#[derive(Clone, Copy, Debug)]
pub struct End<'a> {
    pub addr: IpAddr,
    pub pod: Option<&'a Pod>,
    /// The address is the node's the pods run on.
    pub node: bool,
}

/// Whether the flow from `src` to `dst` on `protocol`/`port` is allowed: by the sender's
/// egress if any policy isolates it for egress, and by the receiver's ingress if any isolates
/// it for ingress — except that a pod's own node always reaches it. `namespaces` holds each
/// namespace's labels.
pub fn allows(
    policies: &[Isolation],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    src: End,
    dst: End,
    protocol: Protocol,
    port: u16,
) -> bool {
    let admits = |rules: &[&Rule], peer: End| {
        rules.iter().any(|rule| {
            let peer_ok = rule.peers.as_ref().is_none_or(|peers| peers.iter().any(|p| matches(p, peer, namespaces)));
            let port_ok = rule.ports.as_ref().is_none_or(|ports| {
                ports.iter().any(|p| {
                    p.protocol == protocol
                        && match &p.port {
                            PortRef::Every => true,
                            PortRef::Range(from, to) => (*from..=*to).contains(&port),
                            // Named ports are the destination pod's container ports.
                            PortRef::Named(name) => dst.pod.is_some_and(|pod| {
                                pod.ports.iter().any(|(n, proto, number)| n == name && *proto == protocol && *number == port)
                            }),
                        }
                })
            });
            peer_ok && port_ok
        })
    };
    // The rules of every policy that selects `end` for a direction; None if none isolates it.
    let rules_for = |end: End, direction: fn(&Isolation) -> &Option<Vec<Rule>>| -> Option<Vec<&Rule>> {
        let pod = end.pod?;
        let mut isolated = false;
        let mut rules = Vec::new();
        for policy in policies.iter().filter(|p| p.namespace == pod.namespace && p.pods.matches(&pod.labels)) {
            if let Some(list) = direction(policy) {
                isolated = true;
                rules.extend(list);
            }
        }
        isolated.then_some(rules)
    };
    let egress_ok = rules_for(src, |p| &p.egress).is_none_or(|rules| admits(&rules, dst));
    let ingress_ok = src.node || rules_for(dst, |p| &p.ingress).is_none_or(|rules| admits(&rules, src));
    egress_ok && ingress_ok
}

fn matches(peer: &Peer, end: End, namespaces: &BTreeMap<String, BTreeMap<String, String>>) -> bool {
    match peer {
        // Upstream leaves open whether a block selects pods' (or the node's) addresses; zt's
        // choice: it does not, they are known by identity.
        Peer::Block { cidr, except } => {
            end.pod.is_none() && !end.node && cidr.contains(&end.addr) && !except.iter().any(|e| e.contains(&end.addr))
        }
        Peer::Pods { namespaces: scope, pods } => end.pod.is_some_and(|pod| {
            let namespace_ok = match scope {
                Namespaces::Own(own) => pod.namespace == *own,
                Namespaces::Matching(selector) => namespaces.get(&pod.namespace).is_some_and(|labels| selector.matches(labels)),
            };
            namespace_ok && pods.matches(&pod.labels)
        }),
    }
}
