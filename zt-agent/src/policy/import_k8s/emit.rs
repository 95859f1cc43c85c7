//! NetworkPolicies' meaning ([`Isolation`]) written as zt policy: one `kind: Policy` per
//! NetworkPolicy, over pod identities, with the same verdicts.
//!
//! - The subject is `{pods: {namespace, <podSelector>}}`; `ingress:`/`egress:` are listed
//!   exactly when the NetworkPolicy isolates that direction, so the subject is default-deny
//!   there. The rules only allow, and zt adds up the allows of every policy of a subject: the
//!   union upstream defines.
//! - A rule without peers admits `any` (every address, in the cluster or not); `podSelector`
//!   becomes `{pods: {namespace: <the policy's>, ...}}`, `namespaceSelector` `{pods:
//!   {namespaceSelector: ...}}`, both one `pods` selector (AND); `ipBlock` a `{cidr, except}`
//!   peer, which matches only addresses no identity owns — no pod's and not the node's.
//! - Ports keep their protocol, number or range, or name (`port: http`, the destination pod's
//!   container port).
//! - Every ingress-isolating policy also admits `host`: upstream, pods cannot block access from
//!   their resident node (kubelet probes come from there).

use std::fmt::Write as _;

use ipnet::IpNet;

use super::{Isolation, Namespaces, Peer, Port, PortRef, Rule, Selector};
use crate::policy::labels::Requirement;

/// The zt policy YAML of `isolations`; `sources` name where they were read, for the header.
pub fn emit(isolations: &[Isolation], sources: &[&str]) -> String {
    let mut out = String::new();
    writeln!(out, "# zt policy imported by `zt-agent policy import-k8s` from {}.", sources.join(", ")).unwrap();
    writeln!(out, "# Each NetworkPolicy is one Policy over pod identities (namespace, labels, service account).").unwrap();
    writeln!(out, "# ipBlock peers are {{cidr: ...}} peers: they match addresses that are no pod's and not the").unwrap();
    writeln!(out, "# node's. Ingress-isolated pods admit their own node (host), as upstream pods always do.").unwrap();
    if isolations.is_empty() {
        writeln!(out, "# No NetworkPolicy found: nothing to import.").unwrap();
    }
    for isolation in isolations {
        policy(&mut out, isolation);
    }
    out
}

fn policy(out: &mut String, isolation: &Isolation) {
    let Isolation { namespace, name, pods, ingress, egress } = isolation;
    writeln!(out, "---\n# NetworkPolicy {namespace}/{name}").unwrap();
    writeln!(out, "apiVersion: zt/v1\nkind: Policy").unwrap();
    writeln!(out, "metadata: {{name: {}}}", scalar(&isolation.zt_name())).unwrap();
    writeln!(out, "spec:\n  subject:\n    - pods: {}", pods_selector(Some(namespace), None, pods)).unwrap();
    if let Some(rules) = ingress {
        writeln!(out, "  ingress:").unwrap();
        for rule in rules {
            write_rule(out, "from", rule);
        }
        writeln!(out, "    - from: [host]  # the pods' own node, which NetworkPolicy never keeps out").unwrap();
    }
    match egress.as_deref() {
        Some([]) => writeln!(out, "  egress: []").unwrap(),
        Some(rules) => {
            writeln!(out, "  egress:").unwrap();
            for rule in rules {
                write_rule(out, "to", rule);
            }
        }
        None => {}
    }
}

fn write_rule(out: &mut String, peers_key: &str, rule: &Rule) {
    match &rule.peers {
        None => writeln!(out, "    - {peers_key}: [any]").unwrap(),
        Some(peers) => {
            writeln!(out, "    - {peers_key}:").unwrap();
            for peer in peers {
                writeln!(out, "        - {}", peer_item(peer)).unwrap();
            }
        }
    }
    if let Some(ports) = &rule.ports {
        writeln!(out, "      ports:").unwrap();
        for port in ports {
            writeln!(out, "        - {}", port_item(port)).unwrap();
        }
    }
}

fn peer_item(peer: &Peer) -> String {
    match peer {
        Peer::Block { cidr, except } if except.is_empty() => format!("{{cidr: {}}}", prefix(cidr)),
        Peer::Block { cidr, except } => {
            let except: Vec<String> = except.iter().map(prefix).collect();
            format!("{{cidr: {}, except: [{}]}}", prefix(cidr), except.join(", "))
        }
        // A peer's podSelector alone is the policy's namespace, not every namespace.
        Peer::Pods { namespaces: Namespaces::Own(namespace), pods } => {
            format!("{{pods: {}}}", pods_selector(Some(namespace), None, pods))
        }
        Peer::Pods { namespaces: Namespaces::Matching(namespaces), pods } => {
            format!("{{pods: {}}}", pods_selector(None, Some(namespaces), pods))
        }
    }
}

fn port_item(port: &Port) -> String {
    let protocol = port.protocol.zt().name();
    match &port.port {
        PortRef::Every => format!("{{protocol: {protocol}}}"),
        PortRef::Range(first, last) if first == last => format!("{{protocol: {protocol}, port: {first}}}"),
        PortRef::Range(first, last) => format!("{{protocol: {protocol}, port: \"{first}-{last}\"}}"),
        PortRef::Named(name) => format!("{{protocol: {protocol}, port: {}}}", scalar(name)),
    }
}

/// `{namespace: ..., namespaceSelector: {...}, matchLabels: {...}, matchExpressions: [...]}`,
/// with what is given.
fn pods_selector(namespace: Option<&str>, namespaces: Option<&Selector>, labels: &Selector) -> String {
    let mut parts = Vec::new();
    if let Some(namespace) = namespace {
        parts.push(format!("namespace: {}", scalar(namespace)));
    }
    if let Some(namespaces) = namespaces {
        parts.push(format!("namespaceSelector: {{{}}}", label_selector(namespaces).join(", ")));
    }
    parts.extend(label_selector(labels));
    format!("{{{}}}", parts.join(", "))
}

/// `matchLabels: {...}` and `matchExpressions: [...]`, those that are not empty. The leading
/// single-value `In`s in increasing key order (which is what `matchLabels` reads as) are
/// `matchLabels`, the rest expressions: read back, the requirements come in the same order.
fn label_selector(selector: &Selector) -> Vec<String> {
    let requirements = &selector.requirements;
    let mut previous: Option<&str> = None;
    let as_labels = requirements
        .iter()
        .take_while(|requirement| match requirement {
            Requirement::In(key, values) if values.len() == 1 && previous.is_none_or(|p| p < key.as_str()) => {
                previous = Some(key);
                true
            }
            _ => false,
        })
        .count();
    let (labels, expressions) = requirements.split_at(as_labels);
    let mut parts = Vec::new();
    if !labels.is_empty() {
        let pairs = labels.iter().map(|requirement| match requirement {
            Requirement::In(key, values) => format!("{}: {}", scalar(key), scalar(&values[0])),
            _ => unreachable!("only single-value In requirements are taken as labels"),
        });
        parts.push(format!("matchLabels: {{{}}}", pairs.collect::<Vec<_>>().join(", ")));
    }
    if !expressions.is_empty() {
        let items = expressions.iter().map(|requirement| {
            let (key, operator, values) = match requirement {
                Requirement::In(key, values) => (key, "In", values.as_slice()),
                Requirement::NotIn(key, values) => (key, "NotIn", values.as_slice()),
                Requirement::Exists(key) => (key, "Exists", &[][..]),
                Requirement::DoesNotExist(key) => (key, "DoesNotExist", &[][..]),
            };
            let values: Vec<String> = values.iter().map(|value| scalar(value)).collect();
            match values.is_empty() {
                true => format!("{{key: {}, operator: {operator}}}", scalar(key)),
                false => format!("{{key: {}, operator: {operator}, values: [{}]}}", scalar(key), values.join(", ")),
            }
        });
        parts.push(format!("matchExpressions: [{}]", items.collect::<Vec<_>>().join(", ")));
    }
    parts
}

/// IPv6 prefixes quoted: their colons are YAML indicators in flow collections.
fn prefix(net: &IpNet) -> String {
    match net {
        IpNet::V4(_) => net.to_string(),
        IpNet::V6(_) => format!("\"{net}\""),
    }
}

/// A string as a YAML flow scalar: plain when nothing else can be read into it (no number, no
/// boolean or null, no flow indicator), else double-quoted.
fn scalar(text: &str) -> String {
    let plain = text.starts_with(|c: char| c.is_ascii_alphabetic())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        && !matches!(
            text.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        text.to_owned()
    } else {
        // A JSON string is a YAML double-quoted scalar.
        serde_json::to_string(text).expect("a string serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{self, import_k8s::parse, PodSelector, Subject};

    #[test]
    fn scalars_are_plain_only_when_they_cannot_be_read_otherwise() {
        for plain in ["db", "app.kubernetes.io/name", "Frontend", "a-b_c.d"] {
            assert_eq!(scalar(plain), plain);
        }
        for (text, quoted) in [("true", "\"true\""), ("No", "\"No\""), ("", "\"\""), ("1", "\"1\""), ("a b", "\"a b\""), ("x:y", "\"x:y\""), ("q\"", "\"q\\\"\"")] {
            assert_eq!(scalar(text), quoted);
        }
    }

    #[test]
    fn selectors_come_back_as_they_went_whatever_their_labels_hold() {
        // Values YAML would read as other things, a matchLabels key repeated as an expression,
        // and every operator.
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: tricky, namespace: prod}
spec:
  podSelector:
    matchLabels: {enabled: "true", version: "1.0", app: "", tier: "null"}
    matchExpressions:
      - {key: app, operator: In, values: [""]}
      - {key: zone, operator: NotIn, values: ["on", "2"]}
      - {key: app.kubernetes.io/part-of, operator: Exists}
      - {key: legacy, operator: DoesNotExist}
  egress:
    - to:
        - namespaceSelector: {}
          podSelector: {matchExpressions: [{key: role, operator: In, values: [a, b]}]}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      ports: [{port: "true"}, {protocol: UDP, port: 53, endPort: 54}]
"#;
        let isolation = parse(yaml, "np.yaml").unwrap().remove(0);
        let emitted = emit(std::slice::from_ref(&isolation), &["np.yaml"]);
        let set = policy::parse_str(&emitted, "emitted.yaml").unwrap_or_else(|errors| panic!("{errors}\n{emitted}"));
        let zt = &set.policies()[0];
        assert_eq!(zt.name, "k8s.prod.tricky");
        let expected_subject = PodSelector {
            namespace: Some("prod".into()),
            namespaces: None,
            labels: isolation.pods.clone(),
            service_account: None,
        };
        assert_eq!(zt.subjects, [Subject::Pods(Box::new(expected_subject))]);
        let rule = &zt.egress.as_ref().unwrap()[0];
        let Some(Peer::Pods { namespaces: Namespaces::Matching(all), pods }) = isolation.egress.as_ref().unwrap()[0].peers.as_ref().map(|p| p[0].clone()) else {
            panic!()
        };
        assert_eq!(
            rule.peers[0],
            policy::Peer::Pods(Box::new(PodSelector { namespace: None, namespaces: Some(all), labels: pods, service_account: None }))
        );
        let named = policy::NamedPort { protocol: policy::Protocol::Tcp, name: "true".into() };
        assert_eq!(rule.named_ports, [named]);
        let udp = policy::PortMatch { protocol: policy::Protocol::Udp, range: policy::PortRange { first: 53, last: 54 } };
        assert_eq!(rule.ports, Some(vec![udp]));
        // Without policyTypes, rules in egress isolate both directions; ingress admits the node.
        let host = policy::Rule { peers: vec![policy::Peer::Host], ports: None, named_ports: vec![], action: policy::Action::Allow };
        assert_eq!((zt.ingress.as_deref(), zt.egress.as_ref().map(Vec::len)), (Some(&[host][..]), Some(1)));
    }
}
