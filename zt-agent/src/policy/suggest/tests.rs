use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::PathBuf,
};

use fastrand::Rng;
use serde_json::json;
use zt_common::{proto, Reason, Verdict};

use super::*;
use crate::policy::{
    compile::compile,
    eval::{Decision, Evaluator, Flow},
    parse_str,
};

const TOPOLOGY: &str = include_str!("../../../../tests/fixtures/topology.yaml");

fn topology_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/topology.yaml")
}

/// A flow event as the agent prints it.
fn event(verdict: &str, reason: &str, src: (&str, &str), dst: (&str, &str), protocol: &str, port: u16) -> String {
    let icmp = protocol.starts_with("icmp");
    let mut event = json!({
        "kind": "flow", "time": "2026-11-26T21:29:59.970455871Z", "node": "node-a",
        "verdict": verdict, "mode": "monitor", "reason": reason, "direction": "egress",
        "hook": "tc-ingress", "interface": "lxc-x", "protocol": protocol,
        "src": {"ip": src.1, "port": if icmp { None } else { Some(40000) }, "identity": src.0, "identity_id": 300, "source": "cidr"},
        "dst": {"ip": dst.1, "port": if icmp { None } else { Some(port) }, "identity": dst.0, "identity_id": 301, "source": "cidr"},
        "policy": "default-deny", "rule": null, "generation": 1,
    });
    if icmp {
        event["icmp"] = json!({"type": port, "id": 7});
    }
    event.to_string()
}

fn audit(src: &str, dst: &str, protocol: &str, port: u16) -> String {
    event("audit", "default-deny", (src, &host(src, 4)), (dst, &host(dst, 4)), protocol, port)
}

/// An address of a topology identity: 10.20.<n>.7 or fd00:20:<n>::7.
fn host(name: &str, family: u8) -> String {
    let (a, n) = match name {
        "web" => (20, 1),
        "api" => (20, 2),
        "db" => (20, 3),
        "intruder" => (20, 9),
        "reports" => (30, 1),
        _ => return if family == 4 { "8.8.8.8".into() } else { "2001:db8::8".into() },
    };
    if family == 4 {
        format!("10.{a}.{n}.7")
    } else {
        format!("fd00:{a}:{n}::7")
    }
}

fn context<'a>(policy: &'a [PathBuf]) -> Context<'a> {
    Context { from: "events.jsonl", policy }
}

fn observed(flows: &[(&str, &str, Protocol, u16)]) -> BTreeSet<ObservedFlow> {
    flows
        .iter()
        .map(|(src, dst, protocol, port)| ObservedFlow {
            src: (*src).into(),
            dst: (*dst).into(),
            protocol: *protocol,
            port: *port,
        })
        .collect()
}

#[test]
fn audits_of_default_deny_become_flows_and_everything_else_is_counted() {
    let lines = [
        audit("intruder", "db", "tcp", 5432),
        audit("intruder", "db", "tcp", 5432),
        String::new(),
        event("audit", "default-deny", ("intruder", "fd00:20:9::7"), ("db", "fd00:20:3::7"), "tcp", 5432),
        audit("intruder", "api", "icmp", 8),
        event("allow", "policy-allow", ("web", "10.20.1.7"), ("api", "10.20.2.7"), "tcp", 8080),
        event("deny", "default-deny", ("web", "10.20.1.7"), ("db", "10.20.3.7"), "tcp", 5432),
        event("audit", "policy-deny", ("web", "10.20.1.7"), ("db", "10.20.3.7"), "tcp", 22),
        event("audit", "malformed", ("web", "10.20.1.7"), ("db", "10.20.3.7"), "tcp", 1),
        event("audit", "default-deny", ("world", "8.8.8.8"), ("web", "10.20.1.7"), "tcp", 80),
        event("audit", "default-deny", ("web", "10.20.1.7"), ("unknown", "10.99.0.1"), "tcp", 80),
        event("audit", "default-deny", ("web", "10.20.1.7"), ("api", "10.20.2.7"), "47", 0),
        event("audit", "default-deny", ("web", "10.20.1.7"), ("api", "10.20.2.7"), "udp", 0),
        json!({"kind": "identity", "source": "certificate", "result": "bound"}).to_string(),
    ];
    let observations = parse_events(&lines.join("\n"), "events.jsonl").unwrap();
    assert_eq!(observations.events, 13, "blank lines are not events");
    let flows: Vec<(ObservedFlow, usize)> = observations.flows.clone().into_iter().collect();
    let expected = observed(&[("intruder", "api", Protocol::Icmp, 8), ("intruder", "db", Protocol::Tcp, 5432)]);
    assert_eq!(flows.iter().map(|(flow, _)| flow.clone()).collect::<BTreeSet<_>>(), expected);
    assert_eq!(flows.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(observations.audits(), 4);
    let skipped: Vec<(Skip, usize)> = observations.skipped.clone().into_iter().collect();
    assert_eq!(
        skipped,
        [
            (Skip::NotFlow("identity".into()), 1),
            (Skip::NotAudit("allow".into()), 1),
            (Skip::NotAudit("deny".into()), 1),
            (Skip::NotDefaultDeny("malformed".into()), 1),
            (Skip::NotDefaultDeny("policy-deny".into()), 1),
            (Skip::WorldEnd, 1),
            (Skip::UnknownEnd, 1),
            (Skip::UnnamedProtocol("47".into()), 1),
            (Skip::PortZero, 1),
        ]
    );
    assert_eq!(observations.first_seen.get("intruder"), Some(&1));
    assert_eq!(observations.first_seen.get("api"), Some(&5));
}

#[test]
fn malformed_lines_are_errors_naming_their_line() {
    let good = audit("intruder", "db", "tcp", 5432);
    let text = [
        good.as_str(),
        "{not json",
        "[1, 2]",
        r#"{"kind":"flow","reason":"default-deny"}"#,
        &good.replace(r#""port":5432"#, r#""port":"5432""#),
        &good.replace(r#""protocol":"tcp""#, r#""protocol":"http""#),
        &good.replace(r#""identity":"db""#, r#""identity":"DB""#),
        r#"{"kind":"flow","verdict":"audit","reason":"default-deny","protocol":"icmp","src":{"identity":"a"},"dst":{"identity":"b"}}"#,
        good.as_str(),
    ]
    .join("\n");
    let err = parse_events(&text, "events.jsonl").unwrap_err().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 7, "{err}");
    assert_eq!(lines[0], "events.jsonl:2: not a JSON event: key must be a string (column 2)");
    assert_eq!(lines[1], "events.jsonl:3: not a JSON event: expected an object, one per line");
    assert_eq!(lines[2], "events.jsonl:4: a flow event needs \"verdict\"");
    assert_eq!(lines[3], "events.jsonl:5: \"dst.port\" is \"5432\"; expected a number");
    assert_eq!(
        lines[4],
        "events.jsonl:6: unknown protocol \"http\"; expected tcp, udp, sctp, icmp, icmpv6 or a protocol number"
    );
    assert_eq!(
        lines[5],
        "events.jsonl:7: \"dst.identity\" is not an identity name (\"DB\": start it with a lowercase letter or a digit)"
    );
    assert_eq!(lines[6], "events.jsonl:8: this audit needs \"icmp.type\" (a number)");
}

#[test]
fn the_suggestion_is_sorted_commented_and_exact() {
    let events = [
        audit("intruder", "db", "tcp", 5432),
        audit("web", "db", "tcp", 5432),
        audit("intruder", "db", "tcp", 5432),
        audit("web", "api", "tcp", 8002),
        audit("web", "api", "tcp", 8000),
        audit("web", "api", "tcp", 8001),
        audit("web", "api", "tcp", 8004),
        audit("web", "api", "icmp", 8),
        event("allow", "policy-allow", ("web", "10.20.1.7"), ("api", "10.20.2.7"), "tcp", 8080),
        event("audit", "default-deny", ("world", "8.8.8.8"), ("web", "10.20.1.7"), "tcp", 80),
    ]
    .join("\n");
    let observations = parse_events(&events, "events.jsonl").unwrap();
    let policy = [topology_path()];
    let suggestion = suggest(&observations, Some(&parse_str(TOPOLOGY, "topology.yaml").unwrap()), &context(&policy))
        .unwrap()
        .replace(&topology_path().display().to_string(), "topology.yaml");
    let expected = r#"# Suggested by `zt-agent policy suggest` from events.jsonl.
# Allows the 7 flows seen in 8 audit events of default-deny, and nothing else: each
# flow in its sender's egress and its receiver's ingress, as both ends must consent.
# Load it together with topology.yaml.
---
apiVersion: zt/v1
kind: Policy
metadata: {name: suggested-api}
spec:
  subject: [api]
  ingress:
    - from: [web]  # 5 events
      ports:
        - {protocol: tcp, port: "8000-8002"}  # 3 events
        - {protocol: tcp, port: 8004}  # 1 event
        - {protocol: icmp, type: 8}  # 1 event
---
apiVersion: zt/v1
kind: Policy
metadata: {name: suggested-db}
spec:
  subject: [db]
  ingress:
    - from: [intruder]  # 2 events
      ports:
        - {protocol: tcp, port: 5432}  # 2 events
    - from: [web]  # 1 event
      ports:
        - {protocol: tcp, port: 5432}  # 1 event
---
apiVersion: zt/v1
kind: Policy
metadata: {name: suggested-intruder}
spec:
  subject: [intruder]
  egress:
    - to: [db]  # 2 events
      ports:
        - {protocol: tcp, port: 5432}  # 2 events
---
apiVersion: zt/v1
kind: Policy
metadata: {name: suggested-web}
spec:
  subject: [web]
  egress:
    - to: [api]  # 5 events
      ports:
        - {protocol: tcp, port: "8000-8002"}  # 3 events
        - {protocol: tcp, port: 8004}  # 1 event
        - {protocol: icmp, type: 8}  # 1 event
    - to: [db]  # 1 event
      ports:
        - {protocol: tcp, port: 5432}  # 1 event
# Skipped 2 of 10 events:
#        1  verdict "allow" (not an audit)
#        1  world at one end (declare the range as an identity to write rules for it)
"#;
    assert_eq!(suggestion, expected);
    // The same events in another order give the same text.
    let mut reversed: Vec<&str> = events.lines().collect();
    reversed.reverse();
    let again = suggest(
        &parse_events(&reversed.join("\n"), "events.jsonl").unwrap(),
        Some(&parse_str(TOPOLOGY, "topology.yaml").unwrap()),
        &context(&policy),
    )
    .unwrap()
    .replace(&topology_path().display().to_string(), "topology.yaml");
    assert_eq!(again, expected);
}

/// For every pair of the set's identities (and world) in both families, every protocol and the
/// ports around those observed: `combined` allows the flow if `base` does or it was observed,
/// and otherwise decides it as `base` does.
fn assert_allows_exactly(base: &PolicySet, combined: &PolicySet, observed: &BTreeSet<ObservedFlow>, label: &str) {
    let (base_compiled, combined_compiled) = (compile(base).unwrap(), compile(combined).unwrap());
    let (before, after) = (Evaluator::new(&base_compiled), Evaluator::new(&combined_compiled));
    let mut ports: BTreeMap<Protocol, BTreeSet<u16>> = BTreeMap::new();
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp, Protocol::Icmpv6] {
        let fixed: &[u16] = if protocol.has_ports() { &[1, 22, 80, 5432, 8080, 65535] } else { &[0, 3, 8, 128] };
        ports.entry(protocol).or_default().extend(fixed);
    }
    for flow in observed {
        let around = ports.entry(flow.protocol).or_default();
        around.extend([flow.port.saturating_sub(1), flow.port, flow.port.saturating_add(1)]);
    }
    // (name, IPv4 address, IPv6 address): a host in each identity's first prefix of each family.
    let mut ends: Vec<(Option<String>, Option<IpAddr>, Option<IpAddr>)> =
        vec![(None, Some("192.0.2.1".parse().unwrap()), Some("2001:db8::1".parse().unwrap()))];
    for identity in base.identities() {
        let host = |v4: bool| {
            let net = identity.cidrs.iter().find(|net| net.network().is_ipv4() == v4)?;
            net.hosts().next().or(Some(net.network()))
        };
        ends.push((Some(identity.name.clone()), host(true), host(false)));
    }
    let mut seen = BTreeSet::new();
    for (src_name, src4, src6) in &ends {
        for (dst_name, dst4, dst6) in &ends {
            for (src, dst) in [(src4, dst4), (src6, dst6)] {
                let (Some(src), Some(dst)) = (src, dst) else { continue };
                for (&protocol, ports) in &ports {
                    for &port in ports {
                        let flow = Flow { src: *src, dst: *dst, protocol: protocol.number(), dst_port: port };
                        let (was, is): (Decision, Decision) = (before.evaluate(&flow), after.evaluate(&flow));
                        let key = src_name.clone().zip(dst_name.clone()).map(|(src, dst)| ObservedFlow {
                            src,
                            dst,
                            protocol,
                            port,
                        });
                        if key.as_ref().is_some_and(|key| observed.contains(key)) {
                            assert_eq!(is.verdict, Verdict::Allow, "{label}: observed {flow:?} is not allowed: {is:?}");
                            seen.insert(key.unwrap());
                        } else {
                            assert_eq!(
                                is.verdict, was.verdict,
                                "{label}: unobserved {flow:?} ({src_name:?} -> {dst_name:?}) changed: {was:?} -> {is:?}"
                            );
                        }
                    }
                }
            }
        }
    }
    assert_eq!(&seen, observed, "{label}: every observed flow was checked");
}

#[test]
fn with_the_topology_policy_the_suggestion_allows_exactly_the_observed_flows() {
    let flows = [
        ("intruder", "db", Protocol::Tcp, 5432),
        ("intruder", "api", Protocol::Udp, 5353),
        ("intruder", "api", Protocol::Icmp, 8),
        ("web", "db", Protocol::Tcp, 5432),
        ("db", "db", Protocol::Sctp, 9),
        ("reports", "web", Protocol::Icmpv6, 128),
        ("api", "web", Protocol::Tcp, 9000),
        ("api", "web", Protocol::Tcp, 9001),
    ];
    let mut lines = Vec::new();
    for (src, dst, protocol, port) in flows {
        let name = protocol.name();
        lines.push(event("audit", "default-deny", (src, &host(src, 4)), (dst, &host(dst, 4)), name, port));
        lines.push(event("audit", "default-deny", (src, &host(src, 6)), (dst, &host(dst, 6)), name, port));
    }
    let observations = parse_events(&lines.join("\n"), "events.jsonl").unwrap();
    let policy = [topology_path()];
    let base = super::super::load_paths(&policy).unwrap();
    let suggestion = suggest(&observations, Some(&base), &context(&policy)).unwrap();
    // `policy check` on both files: they load and compile together.
    let combined =
        load_paths_with(&policy, "suggested.yaml", &suggestion).unwrap_or_else(|e| panic!("{e}\n{suggestion}"));
    compile(&combined).unwrap();
    assert_eq!(combined.policies().len(), base.policies().len() + 5, "{suggestion}");
    assert_allows_exactly(&base, &combined, &observed(&flows), &suggestion);
    // Nearby flows stay denied, by name: other ports, protocols, the reverse, other pairs.
    let evaluator = Evaluator::new(&compile(&combined).unwrap());
    let flow = |src: &str, dst: &str, protocol: u8, port: u16| Flow {
        src: host(src, 4).parse().unwrap(),
        dst: host(dst, 4).parse().unwrap(),
        protocol,
        dst_port: port,
    };
    for allowed in [flow("intruder", "db", proto::TCP, 5432), flow("api", "web", proto::TCP, 9001)] {
        assert_eq!(evaluator.evaluate(&allowed).verdict, Verdict::Allow, "{allowed:?}");
    }
    for denied in [
        flow("intruder", "db", proto::TCP, 5433),
        flow("intruder", "db", proto::UDP, 5432),
        flow("db", "intruder", proto::TCP, 5432),
        flow("intruder", "api", proto::TCP, 8080),
        flow("intruder", "api", proto::ICMP, 0),
        flow("intruder", "web", proto::TCP, 5432),
        flow("api", "web", proto::TCP, 9002),
    ] {
        let decision = evaluator.evaluate(&denied);
        assert_eq!((decision.verdict, decision.reason), (Verdict::Deny, Reason::DefaultDeny), "{denied:?}");
    }
}

#[test]
fn without_a_policy_both_ends_get_rules_and_the_output_loads() {
    let events = [audit("intruder", "db", "tcp", 5432), audit("db", "intruder", "udp", 53)].join("\n");
    let suggestion = suggest(&parse_events(&events, "e").unwrap(), None, &context(&[])).unwrap();
    assert!(suggestion.contains("# Without --policy every end gets rules"), "{suggestion}");
    // It loads together with the topology identities, and alone names only those identities.
    let combined = parse_str(&format!("{TOPOLOGY}\n{suggestion}"), "t.yaml").unwrap();
    let names: Vec<&str> = combined.policies().iter().map(|p| p.name.as_str()).collect();
    assert!(names.ends_with(&["suggested-db", "suggested-intruder"]), "{names:?}");
    let db = combined.policies().iter().find(|p| p.name == "suggested-db").unwrap();
    assert_eq!((db.ingress.as_ref().unwrap().len(), db.egress.as_ref().unwrap().len()), (1, 1));
}

#[test]
fn names_must_be_declared_in_the_policy_and_policy_names_are_not_reused() {
    let policy = [topology_path()];
    let base = super::super::load_paths(&policy).unwrap();
    let events =
        [audit("intruder", "db", "tcp", 5432), audit("ghost", "db", "tcp", 1), audit("db", "phantom", "tcp", 1)]
            .join("\n");
    let err = suggest(&parse_events(&events, "events.jsonl").unwrap(), Some(&base), &context(&policy)).unwrap_err();
    let message = err.to_string();
    let lines: Vec<&str> = message.lines().collect();
    assert_eq!(lines.len(), 2, "{message}");
    assert!(lines[0].starts_with("events.jsonl:2: identity \"ghost\" is not declared in the policy ("), "{message}");
    assert!(lines[1].starts_with("events.jsonl:3: identity \"phantom\" is not declared"), "{message}");

    // A base that already has suggested-db (say, from an earlier suggestion) gets suggested-db-2.
    let earlier =
        "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {name: suggested-db}\nspec: {subject: [db], ingress: []}\n";
    let base = parse_str(&format!("{TOPOLOGY}\n{earlier}"), "base.yaml").unwrap();
    let events = audit("intruder", "db", "tcp", 5432);
    let suggestion = suggest(&parse_events(&events, "e").unwrap(), Some(&base), &context(&policy)).unwrap();
    assert!(suggestion.contains("metadata: {name: suggested-db-2}"), "{suggestion}");
    parse_str(&format!("{TOPOLOGY}\n{earlier}\n{suggestion}"), "all.yaml").unwrap();

    let mut taken = BTreeSet::new();
    let long = "a".repeat(253);
    let name = unique_policy_name(&long, &mut taken);
    assert_eq!(name.len(), 253);
    let second = unique_policy_name(&long, &mut taken);
    assert!(second.ends_with("-2") && second.len() == 253, "{second}");
    assert_eq!(yaml_name("spiffe://td/a"), "\"spiffe://td/a\"");
    assert_eq!(yaml_name("1db"), "\"1db\"");
    assert_eq!(yaml_name("db.prod-1"), "db.prod-1");
}

#[test]
fn ends_the_policy_does_not_isolate_get_no_rules_in_that_direction() {
    // db is isolated for ingress only, intruder for nothing: intruder → db needs db's ingress
    // alone, and a rule list in intruder's egress would newly deny whatever intruder sends.
    let base = "\
apiVersion: zt/v1
kind: Identity
metadata: {name: intruder}
spec: {selectors: [{cidr: 10.20.9.0/24}]}
---
apiVersion: zt/v1
kind: Identity
metadata: {name: db}
spec: {selectors: [{cidr: 10.20.3.0/24}]}
---
apiVersion: zt/v1
kind: Policy
metadata: {name: db}
spec: {subject: [db], ingress: []}
";
    let set = parse_str(base, "base.yaml").unwrap();
    let events = [audit("intruder", "db", "tcp", 5432), audit("intruder", "db", "tcp", 5432)].join("\n");
    let suggestion = suggest(&parse_events(&events, "e").unwrap(), Some(&set), &context(&[])).unwrap();
    assert!(!suggestion.contains("suggested-intruder"), "{suggestion}");
    assert!(suggestion.contains("#   egress of intruder, for 1 flow"), "{suggestion}");
    let combined = parse_str(&format!("{base}\n{suggestion}"), "all.yaml").unwrap();
    assert_allows_exactly(&set, &combined, &observed(&[("intruder", "db", Protocol::Tcp, 5432)]), &suggestion);
}

/// Random policy sets and the events a monitor-mode node would record under them: every
/// suggestion loads with its policy and allows exactly the flows audited as default-deny.
#[test]
fn random_policies_and_events_get_exact_suggestions() {
    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
    const PORTS: [u16; 6] = [22, 80, 81, 443, 5432, 8080];
    let mut rng = Rng::with_seed(0x5e_9e57);
    let mut suggested_flows = 0;
    for case in 0..150 {
        let mut yaml = String::new();
        for (i, name) in NAMES.iter().enumerate() {
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: {name}}}\nspec: {{selectors: [{{cidr: 10.0.{i}.0/24}}, {{cidr: \"fd00:{i}::/64\"}}]}}"
            )
            .unwrap();
        }
        for p in 0..rng.usize(1..5) {
            let subject = if rng.usize(..4) == 0 { "any" } else { NAMES[rng.usize(..NAMES.len())] };
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: p{p}}}\nspec:\n  subject: [{subject}]"
            )
            .unwrap();
            let ingress = rng.bool();
            let egress = !ingress || rng.bool();
            for (present, list, peer_key) in [(ingress, "ingress", "from"), (egress, "egress", "to")] {
                if !present {
                    continue;
                }
                let rules: Vec<String> = (0..rng.usize(..3))
                    .map(|_| {
                        let peer = if rng.usize(..5) == 0 { "any" } else { NAMES[rng.usize(..NAMES.len())] };
                        let port = PORTS[rng.usize(..PORTS.len())];
                        let action = if rng.usize(..4) == 0 { ", action: deny" } else { "" };
                        format!("{{{peer_key}: [{peer}], ports: [{{protocol: tcp, port: {port}}}]{action}}}")
                    })
                    .collect();
                writeln!(yaml, "  {list}: [{}]", rules.join(", ")).unwrap();
            }
        }
        let set = parse_str(&yaml, "random.yaml").unwrap_or_else(|e| panic!("case {case}: {e}\n{yaml}"));
        let evaluator = Evaluator::new(&compile(&set).unwrap());
        // Monitor mode: what the base denies by default is audited as such.
        let mut lines = Vec::new();
        let mut audited = BTreeSet::new();
        for _ in 0..rng.usize(1..40) {
            let (src, dst) = (rng.usize(..NAMES.len()), rng.usize(..NAMES.len()));
            let (protocol, port) = match rng.usize(..10) {
                0 => (Protocol::Udp, PORTS[rng.usize(..PORTS.len())]),
                1 => (Protocol::Icmp, 8),
                _ => (Protocol::Tcp, PORTS[rng.usize(..PORTS.len())]),
            };
            let v6 = rng.bool();
            let addr = |i: usize| if v6 { format!("fd00:{i}::5") } else { format!("10.0.{i}.5") };
            let flow = Flow {
                src: addr(src).parse().unwrap(),
                dst: addr(dst).parse().unwrap(),
                protocol: protocol.number(),
                dst_port: port,
            };
            let decision = evaluator.evaluate(&flow);
            let (verdict, reason) = match (decision.verdict, decision.reason) {
                (Verdict::Allow, reason) => ("allow", reason.name()),
                (_, reason) => ("audit", reason.name()),
            };
            if decision.reason == Reason::NotIsolated {
                continue;
            }
            if decision.reason == Reason::DefaultDeny {
                audited.insert(ObservedFlow { src: NAMES[src].into(), dst: NAMES[dst].into(), protocol, port });
            }
            let (src, dst) = ((NAMES[src], addr(src)), (NAMES[dst], addr(dst)));
            lines.push(event(verdict, reason, (src.0, &src.1), (dst.0, &dst.1), protocol.name(), port));
        }
        let observations = parse_events(&lines.join("\n"), "events.jsonl").unwrap();
        let suggestion = suggest(&observations, Some(&set), &context(&[])).unwrap();
        let combined = parse_str(&format!("{yaml}\n{suggestion}"), "all.yaml")
            .unwrap_or_else(|e| panic!("case {case}: {e}\n{yaml}\n{suggestion}"));
        assert_allows_exactly(&set, &combined, &audited, &format!("case {case}\n{yaml}\n{suggestion}"));
        suggested_flows += audited.len();
    }
    assert!(suggested_flows > 300, "the generator audits too few flows: {suggested_flows}");
}

#[test]
fn run_reads_the_events_file_with_and_without_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    fs::write(&events, [audit("intruder", "db", "tcp", 5432), audit("web", "db", "udp", 53)].join("\n") + "\n")
        .unwrap();
    // Alone, the suggestion names identities it does not declare: it is not checked by itself.
    let alone = run(&events, &[]).unwrap();
    assert!(alone.contains("metadata: {name: suggested-intruder}"), "{alone}");
    let with_policy = run(&events, &[topology_path()]).unwrap();
    let combined = load_paths_with(&[topology_path()], "suggested.yaml", &with_policy).unwrap();
    assert_eq!(combined.policies().len(), 5 + 3);
    let err = run(&dir.path().join("missing.jsonl"), &[]).unwrap_err();
    assert!(format!("{err:#}").starts_with("cannot read the events file "), "{err:#}");
    // The policy's own errors come first.
    let err = run(&events, &[dir.path().join("nothing.yaml")]).unwrap_err();
    assert!(err.to_string().contains("nothing.yaml:1:1: cannot read the file"), "{err}");
}

#[test]
fn pod_identities_get_pods_selectors_that_admit_their_flows() {
    let base_text = "apiVersion: zt/v1\nkind: Policy\nmetadata: {name: shop}\nspec: {subject: [{pods: {namespace: shop}}], ingress: []}\n";
    let base = parse_str(base_text, "base.yaml").unwrap();
    let (web, api) = ("k8s:shop:web:app=web,tier=Front", "k8s:shop:api:app=api");
    let events = [audit(web, api, "tcp", 8080), audit(web, api, "tcp", 8080)].join("\n");
    let observations = parse_events(&events, "events.jsonl").unwrap();
    let context = Context { from: "events.jsonl", policy: &[] };
    let text = suggest(&observations, Some(&base), &context).unwrap();
    assert!(
        text.contains("subject: [{pods: {namespace: \"shop\", serviceAccount: \"api\", matchLabels: {\"app\": \"api\"}}}]"),
        "{text}"
    );
    assert!(text.contains("metadata: {name: \"suggested-k8s:shop:api:app-api\"}"), "{text}");
    assert!(!text.contains("egress:"), "web is not isolated for egress, so it gets no rules:\n{text}");

    // With it, the shop's api admits web's pods on 8080, and only that.
    let combined = parse_str(&format!("{base_text}---\n{text}"), "combined.yaml").unwrap();
    let pod = |name: &str| identity::pods::PodIdentity::from_name(name).unwrap();
    let cluster = Cluster { identities: [(pod(web), Default::default()), (pod(api), Default::default())].into(), namespaces: Default::default() };
    let mut compiled = compile::compile_for(&combined, &cluster).unwrap();
    let (web_id, api_id) = (compiled.identities.id(web).unwrap(), compiled.identities.id(api).unwrap());
    compiled.ipcache.extend([("10.30.0.1".parse::<IpAddr>().unwrap().into(), web_id), ("10.30.0.2".parse::<IpAddr>().unwrap().into(), api_id)]);
    let evaluator = Evaluator::new(&compiled);
    let verdict = |port| {
        let flow = Flow { src: "10.30.0.1".parse().unwrap(), dst: "10.30.0.2".parse().unwrap(), protocol: proto::TCP, dst_port: port };
        evaluator.evaluate(&flow).verdict
    };
    assert_eq!((verdict(8080), verdict(8081)), (Verdict::Allow, Verdict::Deny));
}
