//! What a set of NetworkPolicies allows, decided directly from their meaning ([`Isolation`]),
//! flow by flow, as the upstream documentation defines it: the oracle the imported zt policy is
//! held to (through the reference evaluator and the loaded program).

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
}

/// Whether the flow from `src` to `dst` on `protocol`/`port` is allowed: by the sender's
/// egress if any policy isolates it for egress, and by the receiver's ingress if any isolates
/// it for ingress. `namespaces` holds each namespace's labels.
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
    let ingress_ok = rules_for(dst, |p| &p.ingress).is_none_or(|rules| admits(&rules, src));
    egress_ok && ingress_ok
}

fn matches(peer: &Peer, end: End, namespaces: &BTreeMap<String, BTreeMap<String, String>>) -> bool {
    match peer {
        Peer::Block { cidr, except } => cidr.contains(&end.addr) && !except.iter().any(|e| e.contains(&end.addr)),
        Peer::Pods { namespaces: scope, pods } => end.pod.is_some_and(|pod| {
            let namespace_ok = match scope {
                Namespaces::Own(own) => pod.namespace == *own,
                Namespaces::Matching(selector) => namespaces.get(&pod.namespace).is_some_and(|labels| selector.matches(labels)),
            };
            namespace_ok && pods.matches(&pod.labels)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::import_k8s::parse;

    /// The cluster of the truth table: namespace `default` (db, frontend, other), `myproject`
    /// and `otherns` with a client each, and a few addresses outside it.
    struct Cluster {
        pods: BTreeMap<&'static str, (IpAddr, Pod)>,
        namespaces: BTreeMap<String, BTreeMap<String, String>>,
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn cluster() -> Cluster {
        let pod = |namespace: &str, pairs: &[(&str, &str)], ports: Vec<(String, Protocol, u16)>| Pod {
            namespace: namespace.into(),
            labels: labels(pairs),
            ports,
        };
        let pods = BTreeMap::from([
            ("db", ("10.244.0.10".parse().unwrap(), pod("default", &[("role", "db")], vec![("redis".into(), Protocol::Tcp, 6379)]))),
            ("frontend", ("10.244.0.11".parse().unwrap(), pod("default", &[("role", "frontend")], vec![]))),
            ("other", ("10.244.0.12".parse().unwrap(), pod("default", &[("role", "other")], vec![]))),
            ("default-client", ("10.244.0.13".parse().unwrap(), pod("default", &[("app", "client")], vec![]))),
            ("myproject-client", ("10.244.1.10".parse().unwrap(), pod("myproject", &[("app", "client")], vec![]))),
            ("myproject-other", ("10.244.1.11".parse().unwrap(), pod("myproject", &[("app", "other")], vec![]))),
            ("otherns-client", ("10.244.2.10".parse().unwrap(), pod("otherns", &[("app", "client")], vec![]))),
        ]);
        let namespaces = BTreeMap::from([
            ("default".to_owned(), labels(&[("kubernetes.io/metadata.name", "default")])),
            ("myproject".to_owned(), labels(&[("project", "myproject")])),
            ("otherns".to_owned(), labels(&[("project", "other")])),
        ]);
        Cluster { pods, namespaces }
    }

    impl Cluster {
        /// A pod by name, or an address outside the cluster.
        fn end(&self, name: &str) -> End<'_> {
            match self.pods.get(name) {
                Some((addr, pod)) => End { addr: *addr, pod: Some(pod) },
                None => End { addr: name.parse().unwrap_or_else(|_| panic!("no pod or address {name}")), pod: None },
            }
        }
    }

    const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

    /// The upstream documentation's test-network-policy, and the patterns of its "default
    /// policies" and selector sections, each with the flows that tell them apart.
    #[allow(clippy::type_complexity)]
    fn truth_table() -> Vec<(&'static str, String, Vec<(&'static str, &'static str, Protocol, u16, bool)>)> {
        use Protocol::*;
        vec![
            ("the documented example", super::super::tests::DOCUMENTED.to_owned(), vec![
                ("frontend", "db", Tcp, 6379, true),
                ("frontend", "db", Tcp, 6380, false),
                ("frontend", "db", Udp, 6379, false),
                ("other", "db", Tcp, 6379, false),
                ("myproject-client", "db", Tcp, 6379, true),
                ("otherns-client", "db", Tcp, 6379, false),
                ("172.17.0.5", "db", Tcp, 6379, true),
                ("172.17.1.5", "db", Tcp, 6379, false),
                ("db", "10.0.0.7", Tcp, 5978, true),
                ("db", "10.0.1.7", Tcp, 5978, false),
                ("db", "10.0.0.7", Tcp, 80, false),
                ("db", "frontend", Tcp, 80, false),
                ("frontend", "other", Tcp, 80, true),
            ]),
            ("default deny ingress", format!("{NP}metadata: {{name: deny, namespace: default}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"), vec![
                ("frontend", "other", Tcp, 80, false),
                ("myproject-client", "db", Tcp, 6379, false),
                ("db", "10.0.0.7", Tcp, 443, true),
                ("db", "myproject-client", Tcp, 80, true),
            ]),
            ("deny ingress, then allow all ingress to db: a union", format!(
                "{NP}metadata: {{name: deny, namespace: default}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n---\n\
                 {NP}metadata: {{name: db, namespace: default}}\nspec: {{podSelector: {{matchLabels: {{role: db}}}}, ingress: [{{}}]}}\n"
            ), vec![
                ("other", "db", Tcp, 1, true),
                ("172.17.1.5", "db", Udp, 53, true),
                ("frontend", "other", Tcp, 80, false),
            ]),
            ("default deny egress", format!("{NP}metadata: {{name: deny, namespace: default}}\nspec: {{podSelector: {{}}, policyTypes: [Egress]}}\n"), vec![
                ("frontend", "db", Tcp, 6379, false),
                ("db", "10.0.0.7", Tcp, 443, false),
                ("myproject-client", "db", Tcp, 6379, true),
            ]),
            ("namespace AND pod selector in one peer", format!(
                "{NP}metadata: {{name: and, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{role: db}}}}\n  ingress:\n    - from:\n        - namespaceSelector: {{matchLabels: {{project: myproject}}}}\n          podSelector: {{matchLabels: {{app: client}}}}\n"
            ), vec![
                ("myproject-client", "db", Tcp, 6379, true),
                ("myproject-other", "db", Tcp, 6379, false),
                ("otherns-client", "db", Tcp, 6379, false),
                ("default-client", "db", Tcp, 6379, false),
            ]),
            ("namespace OR pod selector in two peers", format!(
                "{NP}metadata: {{name: or, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{role: db}}}}\n  ingress:\n    - from:\n        - namespaceSelector: {{matchLabels: {{project: myproject}}}}\n        - podSelector: {{matchLabels: {{app: client}}}}\n"
            ), vec![
                ("myproject-client", "db", Tcp, 6379, true),
                ("myproject-other", "db", Tcp, 6379, true),
                ("default-client", "db", Tcp, 6379, true),
                ("otherns-client", "db", Tcp, 6379, false),
            ]),
            ("a named port, a range and SCTP", format!(
                "{NP}metadata: {{name: ports, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{role: db}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n    - ports: [{{port: redis}}, {{protocol: SCTP, port: 9999}}]\n  egress:\n    - to: [{{ipBlock: {{cidr: 10.0.0.0/24}}}}]\n      ports: [{{port: 32000, endPort: 32768}}]\n"
            ), vec![
                ("frontend", "db", Tcp, 6379, true),
                ("frontend", "db", Tcp, 6380, false),
                ("frontend", "db", Sctp, 9999, true),
                ("frontend", "db", Tcp, 9999, false),
                ("db", "10.0.0.7", Tcp, 32000, true),
                ("db", "10.0.0.7", Tcp, 32768, true),
                ("db", "10.0.0.7", Tcp, 32769, false),
                ("db", "10.0.0.7", Udp, 32000, false),
                // The name is the destination's: frontend has no port called redis.
                ("db", "frontend", Tcp, 6379, false),
            ]),
        ]
    }

    #[test]
    fn the_reference_gives_the_documented_verdicts() {
        let cluster = cluster();
        for (case, yaml, flows) in truth_table() {
            let policies = parse(&yaml, case).unwrap_or_else(|e| panic!("{case}: {e:?}"));
            for (src, dst, protocol, port, allowed) in flows {
                let got = allows(&policies, &cluster.namespaces, cluster.end(src), cluster.end(dst), protocol, port);
                assert_eq!(got, allowed, "{case}: {src} -> {dst} {protocol:?}/{port}");
            }
        }
    }
}
