//! NetworkPolicy's meaning, on the upstream documentation's examples and its edge cases; the
//! truth table through the reference and through the imported zt policy.

use std::collections::BTreeMap;

use zt_common::Verdict;

use super::*;
use crate::policy::eval::{Evaluator, Flow};

fn one(yaml: &str) -> Isolation {
    let mut parsed = parse(yaml, "np.yaml").unwrap_or_else(|errors| panic!("{errors:?}"));
    assert_eq!(parsed.len(), 1);
    parsed.remove(0)
}

fn error(yaml: &str) -> String {
    let errors = parse(yaml, "np.yaml").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors[0].clone()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\n";

/// The upstream documentation's example (test-network-policy), whole: the truth table's first
/// case.
fn documented() -> String {
    let table = truth_table::Table::load();
    let case = table.cases.iter().find(|case| case.name == "the documented example").expect("the table has it");
    case.policies.clone()
}

#[test]
fn the_documented_example_means_what_the_documentation_says() {
    let p = one(&documented());
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("default", "test-network-policy"));
    assert!(p.pods.matches(&labels(&[("role", "db")])) && !p.pods.matches(&labels(&[("role", "web")])));
    let ingress = p.ingress.unwrap();
    assert_eq!(ingress.len(), 1);
    let peers = ingress[0].peers.as_ref().unwrap();
    assert_eq!(
        peers[0],
        Peer::Block { cidr: "172.17.0.0/16".parse().unwrap(), except: vec!["172.17.1.0/24".parse().unwrap()] }
    );
    // Three peers, three alternatives: a namespace's every pod, or this namespace's frontends.
    let Peer::Pods { namespaces: Namespaces::Matching(ns), pods } = &peers[1] else { panic!("{:?}", peers[1]) };
    assert!(ns.matches(&labels(&[("project", "myproject")])) && pods.matches(&labels(&[("anything", "at-all")])));
    let Peer::Pods { namespaces: Namespaces::Own(own), pods } = &peers[2] else { panic!("{:?}", peers[2]) };
    assert_eq!(own, "default");
    assert!(pods.matches(&labels(&[("role", "frontend")])));
    assert_eq!(ingress[0].ports, Some(vec![Port { protocol: Protocol::Tcp, port: PortRef::Range(6379, 6379) }]));
    let egress = p.egress.unwrap();
    assert_eq!(egress[0].ports, Some(vec![Port { protocol: Protocol::Tcp, port: PortRef::Range(5978, 5978) }]));
}

#[test]
fn policy_types_default_to_ingress_and_to_egress_when_it_has_rules() {
    let ingress_only = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n"));
    assert_eq!((ingress_only.ingress, ingress_only.egress), (Some(vec![]), None), "default deny ingress, egress untouched");
    let both = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n  egress: [{{to: [{{podSelector: {{}}}}]}}]\n"));
    assert_eq!(both.ingress, Some(vec![]), "ingress is always affected when policyTypes is absent");
    assert_eq!(both.egress.map(|rules| rules.len()), Some(1));
    // An empty egress list is no egress section.
    let empty_egress = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n  egress: []\n"));
    assert_eq!(empty_egress.egress, None);
    let egress_only = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n"));
    assert_eq!((egress_only.ingress, egress_only.egress), (None, Some(vec![])), "default deny egress");
}

#[test]
fn an_empty_rule_admits_everything_and_an_empty_selector_selects_every_pod() {
    let allow_all = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n  ingress: [{{}}]\n"));
    assert_eq!(allow_all.ingress, Some(vec![Rule { peers: None, ports: None }]));
    assert!(allow_all.pods.matches(&labels(&[])), "podSelector {{}}: every pod of the namespace");
    let from_namespace = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n  ingress: [{{from: [{{podSelector: {{}}}}]}}]\n"));
    let rules = from_namespace.ingress.unwrap();
    assert_eq!(rules[0].peers, Some(vec![Peer::Pods { namespaces: Namespaces::Own("prod".into()), pods: Selector::default() }]));
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_an_and_in_two_peers_an_or() {
    let and = one(&format!(
        "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n    - from:\n        - namespaceSelector: {{matchLabels: {{team: a}}}}\n          podSelector: {{matchLabels: {{app: client}}}}\n"
    ));
    let peers = and.ingress.unwrap()[0].peers.clone().unwrap();
    assert_eq!(peers.len(), 1);
    let Peer::Pods { namespaces: Namespaces::Matching(ns), pods } = &peers[0] else { panic!() };
    assert!(ns.matches(&labels(&[("team", "a")])) && pods.matches(&labels(&[("app", "client")])));
    assert!(!pods.matches(&labels(&[("app", "other")])));
    let or = one(&format!(
        "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n    - from:\n        - namespaceSelector: {{matchLabels: {{team: a}}}}\n        - podSelector: {{matchLabels: {{app: client}}}}\n"
    ));
    let peers = or.ingress.unwrap()[0].peers.clone().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(matches!(&peers[0], Peer::Pods { namespaces: Namespaces::Matching(_), pods } if pods.requirements.is_empty()));
    assert!(matches!(&peers[1], Peer::Pods { namespaces: Namespaces::Own(ns), .. } if ns == "prod"));
}

#[test]
fn ports_default_to_tcp_and_take_ranges_names_and_sctp() {
    let p = one(&format!(
        "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n    - ports:\n        - port: 80\n        - {{protocol: UDP, port: 53}}\n        - {{protocol: TCP, port: 32000, endPort: 32768}}\n        - {{port: http-alt}}\n        - {{protocol: SCTP}}\n"
    ));
    let ports = p.ingress.unwrap()[0].ports.clone().unwrap();
    assert_eq!(
        ports,
        vec![
            Port { protocol: Protocol::Tcp, port: PortRef::Range(80, 80) },
            Port { protocol: Protocol::Udp, port: PortRef::Range(53, 53) },
            Port { protocol: Protocol::Tcp, port: PortRef::Range(32000, 32768) },
            Port { protocol: Protocol::Tcp, port: PortRef::Named("http-alt".into()) },
            Port { protocol: Protocol::Sctp, port: PortRef::Every },
        ]
    );
}

#[test]
fn what_cannot_be_meant_is_refused_with_its_field() {
    let spec = |body: &str| format!("{HEAD}spec:\n  podSelector: {{}}\n{body}");
    for (yaml, says) in [
        (spec("  ingress: [{ports: [{protocol: ICMP}]}]\n"), "spec.ingress[0].ports[0].protocol: \"ICMP\" is not TCP, UDP or SCTP"),
        (spec("  ingress: [{ports: [{port: 80, endPort: 79}]}]\n"), "spec.ingress[0].ports[0].endPort: 79 is below port 80"),
        (spec("  ingress: [{ports: [{port: http, endPort: 90}]}]\n"), "spec.ingress[0].ports[0].endPort: needs a numeric port, not a named one"),
        (spec("  ingress: [{ports: [{endPort: 90}]}]\n"), "spec.ingress[0].ports[0].endPort: needs a port to start from"),
        (spec("  ingress: [{ports: [{port: 70000}]}]\n"), "spec.ingress[0].ports[0].port: 70000 is not a port (1-65535)"),
        (spec("  ingress: [{ports: [{port: \"80\"}]}]\n"), "spec.ingress[0].ports[0].port: \"80\" is neither a number nor a port name"),
        (spec("  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/24]}}]}]\n"), "spec.egress[0].to[0].ipBlock.except[0]: 10.1.0.0/24 is not strictly inside 10.0.0.0/24"),
        (spec("  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}, podSelector: {}}]}]\n"), "spec.egress[0].to[0].ipBlock: goes alone"),
        (spec("  egress: [{to: [{}]}]\n"), "spec.egress[0].to[0]: a peer needs podSelector, namespaceSelector or ipBlock"),
        (spec("  policyTypes: [Both]\n"), "spec.policyTypes[0]: \"Both\" is not Ingress or Egress"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}\n".into(), "metadata.namespace: missing"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n".into(), "apiVersion/kind: v1/Pod is not networking.k8s.io/v1 NetworkPolicy"),
        // What zt cannot express.
        (spec("  ingress: [{from: [{podSelector: {matchLabels: {pod-template-hash: 5d9f7c}}}]}]\n"), "spec.ingress[0].from[0].podSelector: selects on \"pod-template-hash\", which zt leaves out of pod identities"),
        (format!("{HEAD}spec:\n  podSelector: {{matchExpressions: [{{key: statefulset.kubernetes.io/pod-name, operator: Exists}}]}}\n"), "spec.podSelector: selects on \"statefulset.kubernetes.io/pod-name\""),
        (spec("  egress: [{to: [{ipBlock: {cidr: \"::ffff:10.0.0.0/104\"}}]}]\n"), "spec.egress[0].to[0].ipBlock.cidr: IPv4-mapped prefix ::ffff:10.0.0.0/104; write it as the IPv4 prefix 10.0.0.0/8"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: P, namespace: prod}\nspec: {podSelector: {}}\n".into(), "metadata.name: \"P\" cannot make the zt policy name \"k8s.prod.P\": 'P' is not allowed"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: Prod}\nspec: {podSelector: {}}\n".into(), "metadata.namespace: namespace \"Prod\" is not a Kubernetes namespace name"),
    ] {
        let err = error(&yaml);
        assert!(err.starts_with("np.yaml: document 1"), "{err}");
        assert!(err.contains(says), "{yaml}\n  said: {err}\n  want: {says}");
    }
}

#[test]
fn several_documents_parse_and_every_error_is_reported() {
    let two = format!("{HEAD}spec: {{podSelector: {{}}}}\n---\n{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress]}}\n");
    assert_eq!(parse(&two, "np.yaml").unwrap().len(), 2);
    let bad = format!("{HEAD}spec: {{podSelector: {{}}, policyTypes: [X]}}\n---\napiVersion: v1\nkind: Service\n");
    let errors = parse(&bad, "np.yaml").unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[1].starts_with("np.yaml: document 2"), "{errors:?}");
}

#[test]
fn ipblocks_mean_their_network_and_lists_are_read_item_by_item() {
    // Upstream reads a block with host bits as its network.
    let p = one(&format!("{HEAD}spec:\n  podSelector: {{}}\n  egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.7/24, except: [10.0.0.9/30]}}}}]}}]\n"));
    let block = Peer::Block { cidr: "10.0.0.0/24".parse().unwrap(), except: vec!["10.0.0.8/30".parse().unwrap()] };
    assert_eq!(p.egress.unwrap()[0].peers, Some(vec![block]));
    // `kubectl get networkpolicies -o yaml` prints a List.
    let list = "apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: a, namespace: prod}, spec: {podSelector: {}}}\n  - {apiVersion: v1, kind: Service, metadata: {name: s}}\n";
    let errors = parse(list, "list.yaml").unwrap_err();
    assert_eq!(errors, ["list.yaml: document 1, items[1]: apiVersion/kind: v1/Service is not networking.k8s.io/v1 NetworkPolicy"]);
    let list = list.replace("  - {apiVersion: v1, kind: Service, metadata: {name: s}}\n", "");
    assert_eq!(parse(&list, "list.yaml").unwrap()[0].name, "a");
}

#[test]
fn one_policy_in_two_files_is_refused() {
    let policy = format!("{HEAD}spec: {{podSelector: {{}}}}\n");
    let files = [("a.yaml".to_owned(), policy.clone()), ("b.yaml".to_owned(), policy)];
    assert_eq!(import(&files).unwrap_err(), ["b.yaml: NetworkPolicy prod/p: metadata.name: also in a.yaml; keep one of them"]);
}

#[test]
fn the_imported_policy_reads_as_zt_policy() {
    let files = [("np.yaml".to_owned(), documented())];
    let yaml = import(&files).unwrap();
    let expected = "\
---
# NetworkPolicy default/test-network-policy
apiVersion: zt/v1
kind: Policy
metadata: {name: k8s.default.test-network-policy}
spec:
  subject:
    - pods: {namespace: default, matchLabels: {role: db}}
  ingress:
    - from:
        - {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
        - {pods: {namespaceSelector: {matchLabels: {project: myproject}}}}
        - {pods: {namespace: default, matchLabels: {role: frontend}}}
      ports:
        - {protocol: tcp, port: 6379}
    - from: [host]  # the pods' own node, which NetworkPolicy never keeps out
  egress:
    - to:
        - {cidr: 10.0.0.0/24}
      ports:
        - {protocol: tcp, port: 5978}
";
    assert!(yaml.starts_with("# zt policy imported by `zt-agent policy import-k8s` from np.yaml."), "{yaml}");
    assert!(yaml.ends_with(expected), "{yaml}");
    assert!(import(&[]).unwrap().contains("No NetworkPolicy found"));
}

/// Every flow of the table, through the reference and through the imported zt policy compiled
/// for the table's cluster, with the pods' and the node's addresses bound as the agent binds
/// them.
#[test]
fn the_truth_table_holds_in_the_reference_and_in_the_imported_policy() {
    let table = truth_table::Table::load();
    // (denied, allowed) flows: the table must have plenty of each, or agreeing proves little.
    let mut verdicts = (0, 0);
    for case in &table.cases {
        let isolations = case.isolations().unwrap_or_else(|err| panic!("{}: {err}", case.name));
        let (yaml, compiled) = case.import(&table).unwrap_or_else(|err| panic!("{}: {err}", case.name));
        let mut bound = compiled.clone();
        bound.ipcache.extend(table.bindings(&compiled).into_iter().map(|(addr, id)| (ipnet::IpNet::from(addr), id)));
        let evaluator = Evaluator::new(&bound);
        for flow in &case.flows {
            let (src, dst) = table.ends(flow);
            let by_reference = reference::allows(&isolations, &table.namespaces, src, dst, flow.protocol, flow.port);
            assert_eq!(by_reference, flow.allowed, "{}: the reference disagrees with {flow}", case.name);
            let packet = Flow { src: src.addr, dst: dst.addr, protocol: flow.protocol.zt().number(), dst_port: flow.port };
            let decision = evaluator.evaluate(&packet);
            assert_eq!(decision.verdict == Verdict::Allow, flow.allowed, "{}: {flow}, but {decision:?}\n{yaml}", case.name);
            if flow.allowed { verdicts.1 += 1 } else { verdicts.0 += 1 }
        }
    }
    assert!(verdicts.0 >= 30 && verdicts.1 >= 30, "(denied, allowed) flows: {verdicts:?}");
}
