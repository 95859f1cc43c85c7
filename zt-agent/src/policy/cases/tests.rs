use std::path::PathBuf;

use super::*;
use crate::policy::parse_str;

const TOPOLOGY: &str = include_str!("../../../../tests/fixtures/topology.yaml");
const PASSING: &str = include_str!("../../../../tests/fixtures/topology-cases.yaml");
const FAILING: &str = include_str!("../../../../tests/fixtures/topology-cases-failing.yaml");

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn compiled() -> Compiled {
    compile::compile(&parse_str(TOPOLOGY, "topology.yaml").unwrap()).unwrap()
}

fn errors(text: &str) -> Vec<String> {
    parse_cases(text, "cases.yaml").expect_err("the cases are invalid").0.iter().map(ToString::to_string).collect()
}

fn offline(cases: &[Case]) -> (Summary, String) {
    let compiled = compiled();
    let mut out = Vec::new();
    let summary = run_cases(cases, &mut Offline::new(&compiled), &mut out).unwrap();
    (summary, String::from_utf8(out).unwrap())
}

#[test]
fn parses_cases_with_their_lines() {
    let cases = parse_cases(PASSING, "cases.yaml").unwrap();
    assert_eq!(cases.len(), 17);
    let first = &cases[0];
    assert_eq!(first.name, "web reaches api");
    assert_eq!(first.location, "cases.yaml:3");
    assert_eq!((first.src, first.dst), ("10.20.1.2".parse().unwrap(), "10.20.2.2".parse().unwrap()));
    assert_eq!((first.protocol, first.port), (Protocol::Tcp, 8080));
    assert_eq!(first.expect.verdict, Verdict::Allow);
    assert_eq!(first.expect.reason, Some(Reason::PolicyAllow));
    assert_eq!(first.expect.rule.as_deref(), Some("api/ingress/0"));
    let ping = &cases[2];
    assert_eq!((ping.protocol, ping.port, &ping.location[..]), (Protocol::Icmp, 8, "cases.yaml:18"));
    let mapped = cases.iter().find(|case| case.name.starts_with("IPv4-mapped")).unwrap();
    assert_eq!(mapped.src, "::ffff:10.20.1.2".parse::<IpAddr>().unwrap());
    assert_eq!(cases[3].expect.rule, None);
}

#[test]
fn every_case_error_is_reported_with_its_position() {
    let text = "\
cases:
  - name: bad addresses
    src: 10.20.1
    dst: fd00::1
    protocol: tcp
    port: 80
    expect: allow
  - name: bad port
    src: 10.0.0.1
    dst: 10.0.0.2
    protocol: udp
    port: 70000
    expect: deny
    rule: api/sideways/0
  - name: icmp with a port
    src: 10.0.0.1
    dst: 10.0.0.2
    protocol: icmp
    port: 8
    expect: deny
    reason: because
  - name: bad port
    src: 10.0.0.1
    dst: 10.0.0.2
    protocol: sctp
    expect: deny
  - name: mixed families
    src: 10.0.0.1
    dst: fd00::2
    protocol: tcp
    type: 3
    expect: allow
";
    assert_eq!(
        errors(text),
        [
            "cases.yaml:3:10: invalid address \"10.20.1\"; write one IPv4 or IPv6 address, e.g. 10.20.1.2 or fd00:20:1::2",
            "cases.yaml:12:11: port 70000 is out of range; use 0-65535",
            "cases.yaml:14:11: invalid rule \"api/sideways/0\"; write POLICY/ingress/INDEX or POLICY/egress/INDEX as events \
             name rules (e.g. api/ingress/0), default-deny, or none",
            "cases.yaml:19:11: port is not valid for icmp; use \"type:\" for the ICMP message type",
            "cases.yaml:21:13: unknown reason \"because\"; expected one of policy-allow, policy-deny, default-deny, \
             not-isolated, control-plane",
            "cases.yaml:22:11: duplicate case name \"bad port\" (first at cases.yaml:8); give each case its own name",
            "cases.yaml:25:15: a sctp case needs the destination port; add \"port:\"",
            "cases.yaml:29:10: fd00::2 and the source 10.0.0.1 are of different address families; a flow has one",
            "cases.yaml:31:11: type is only valid for icmp and icmpv6; use \"port:\" for the tcp destination port",
        ]
    );
}

#[test]
fn structural_errors_point_into_the_file() {
    let unknown_key = "cases:\n  - name: x\n    src: 10.0.0.1\n    dst: 10.0.0.2\n    protocol: tcp\n    port: 1\n    expect: allow\n    verdict: allow\n";
    assert_eq!(
        errors(unknown_key),
        ["cases.yaml:8:5: cases[0]: unknown field `verdict`; expected one of `name`, `src`, `dst`, `protocol`, `port`, `type`, `expect`, `reason`, `rule`"]
    );
    let bad_protocol = "cases:\n  - {name: x, src: 10.0.0.1, dst: 10.0.0.2, protocol: http, port: 80, expect: allow}\n";
    let message = &errors(bad_protocol)[0];
    assert!(
        message.starts_with("cases.yaml:2:55: cases[0].protocol: unknown variant `http`; expected one of `tcp`"),
        "{message}"
    );
    let bad_expect = "cases:\n  - {name: x, src: 10.0.0.1, dst: 10.0.0.2, protocol: tcp, port: 80, expect: pass}\n";
    assert!(
        errors(bad_expect)[0].contains("unknown variant `pass`; expected one of `allow`, `deny`, `audit`"),
        "{:?}",
        errors(bad_expect)
    );
    let missing = "cases:\n  - {name: x, src: 10.0.0.1, dst: 10.0.0.2, protocol: tcp, port: 80}\n";
    assert!(errors(missing)[0].contains("missing field `expect`; add it"), "{:?}", errors(missing));
    assert_eq!(errors("cases: []\n"), ["cases.yaml:1:8: there are no cases; list them under \"cases:\""]);
    assert_eq!(
        errors("cases:\n  - [a, b]\n"),
        ["cases.yaml:2:5: cases[0]: invalid type: sequence; expected a case: a mapping with name, src, dst, protocol, port or type, and expect"]
    );
    assert_eq!(
        errors("- a\n"),
        ["cases.yaml:1:1: invalid type: sequence; expected a mapping with the list \"cases:\""]
    );
    let syntax = errors("cases:\n  - {name: x\n");
    assert!(syntax[0].starts_with("cases.yaml:3:1: ") && syntax[0].ends_with("; fix the YAML syntax"), "{syntax:?}");
}

#[test]
fn the_passing_file_passes_offline() {
    let cases = parse_cases(PASSING, "topology-cases.yaml").unwrap();
    let (summary, out) = offline(&cases);
    assert_eq!(summary, Summary { passed: 17, failed: 0 }, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "ok      web reaches api: allow, policy-allow (ingress), rule api/ingress/0");
    assert_eq!(lines[7], "ok      intruder cannot reach db: deny, default-deny (egress), rule default-deny");
    assert_eq!(lines[13], "ok      world cannot reach web: deny, default-deny (ingress), rule default-deny");
    assert_eq!(lines[15], "ok      world to world is no policy's business: allow, not-isolated, rule none");
    assert_eq!(lines[16], "ok      neighbour discovery always passes: allow, control-plane, rule none");
    assert_eq!(lines[17], "17 passed, 0 failed");
    assert_eq!(lines.len(), 18);
}

#[test]
fn the_failing_file_reports_expected_and_actual() {
    let cases = parse_cases(FAILING, "failing.yaml").unwrap();
    let (summary, out) = offline(&cases);
    assert_eq!(summary, Summary { passed: 1, failed: 3 });
    assert_eq!(
        out,
        "\
ok      web reaches api: allow, policy-allow (ingress), rule api/ingress/0
FAILED  intruder reaches db (failing.yaml:9): expected allow; got deny, default-deny (egress), rule default-deny
FAILED  web reaches api by the reports rule (failing.yaml:15): expected allow, rule api/ingress/1; got allow, policy-allow (ingress), rule api/ingress/0
FAILED  db refuses web explicitly (failing.yaml:22): expected deny, policy-deny; got deny, default-deny (egress), rule default-deny
1 passed, 3 failed
"
    );
}

#[test]
fn run_fails_unless_every_case_passes() {
    let policy = [fixture("topology.yaml")];
    let mut out = Vec::new();
    run(&fixture("topology-cases.yaml"), &policy, true, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    let header = out.lines().next().unwrap();
    assert!(header.starts_with("running 17 cases from ") && header.ends_with(" with the reference evaluator"), "{out}");
    assert!(out.ends_with("17 passed, 0 failed\n"), "{out}");

    let mut out = Vec::new();
    let err = run(&fixture("topology-cases-failing.yaml"), &policy, true, &mut out).unwrap_err();
    assert_eq!(err.to_string(), "3 of 4 cases failed");
    assert!(String::from_utf8(out).unwrap().ends_with("1 passed, 3 failed\n"));
}

#[test]
fn a_rule_the_policy_does_not_have_is_a_case_file_error() {
    let text = "cases:\n  - name: x\n    src: 10.20.1.2\n    dst: 10.20.2.2\n    protocol: tcp\n    port: 8080\n    expect: allow\n    rule: api/ingress/7\n";
    let cases = parse_cases(text, "cases.yaml").unwrap();
    let errors = check_rules(&cases, &compiled(), "cases.yaml").unwrap_err();
    assert_eq!(
        errors.to_string(),
        "cases.yaml:8:11: the policy has no rule \"api/ingress/7\"; rules are named POLICY/DIRECTION/INDEX, counting from 0"
    );
    // Policy names may hold '/': the rule is split at its last two.
    assert_eq!(rule_syntax_problem("team/a/egress/12"), None);
    assert!(rule_syntax_problem("api/ingress").is_some());
    assert!(rule_syntax_problem("/ingress/0").is_some());
}
