use std::{fs, path::PathBuf};

use super::*;

/// Three identities; a policy appended to this starts on line 25.
const IDENTITIES: &str = "\
apiVersion: zt/v1
kind: Identity
metadata:
  name: web
spec:
  selectors:
    - cidr: 10.20.1.0/24
---
apiVersion: zt/v1
kind: Identity
metadata:
  name: api
spec:
  selectors:
    - cidr: 10.20.2.0/24
---
apiVersion: zt/v1
kind: Identity
metadata:
  name: db
spec:
  selectors:
    - cidr: 10.20.3.0/24
---
";

fn errors(text: &str) -> Vec<String> {
    let errors = parse_str(text, "t.yaml").expect_err("the text is invalid");
    errors.0.iter().map(ToString::to_string).collect()
}

fn single_error(text: &str) -> String {
    let mut errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.remove(0)
}

/// `IDENTITIES` plus a policy whose spec (indented by two) follows `spec:` on line 29.
fn with_policy_spec(spec: &str) -> String {
    format!("{IDENTITIES}apiVersion: zt/v1\nkind: Policy\nmetadata:\n  name: p\nspec:\n{spec}")
}

#[test]
fn demo_policy_parses() {
    let set = parse_str(include_str!("../../../policies/demo.yaml"), "policies/demo.yaml").unwrap();
    let names: Vec<&str> = set.identities().iter().map(|identity| identity.name.as_str()).collect();
    assert_eq!(names, ["web", "api", "db", "intruder", "reports", "backup", "billing"]);
    let db = &set.identities()[2];
    assert_eq!(db.cidrs, ["10.20.3.0/24".parse::<IpNet>().unwrap(), "fd00:20:3::/64".parse().unwrap()]);
    let policies: Vec<&str> = set.policies().iter().map(|policy| policy.name.as_str()).collect();
    assert_eq!(policies, ["default-deny", "web", "api", "db", "reports", "billing", "backup"]);
    let default_deny = &set.policies()[0];
    assert_eq!(default_deny.subjects, [Subject::Any]);
    assert_eq!((default_deny.ingress.as_deref(), default_deny.egress.as_deref()), (Some(&[][..]), Some(&[][..])));
    let api = &set.policies()[2];
    assert_eq!(
        api.ingress.as_deref(),
        Some(
            &[Rule {
                peers: vec![
                    Peer::Identity("web".into()),
                    Peer::Identity("reports".into()),
                    Peer::Identity("billing".into()),
                ],
                ports: Some(vec![PortMatch { protocol: Protocol::Tcp, range: PortRange { first: 8080, last: 8080 } }]),
                named_ports: vec![],
                action: Action::Allow,
            }][..]
        )
    );
}

#[test]
fn rules_parse_ports_types_ranges_and_actions() {
    let set = parse_str(
        &with_policy_spec(
            "  subject: [any]
  ingress:
  egress:
    - to: [world, any, db]
      action: deny
    - to: [api]
      ports:
        - {protocol: udp, port: \"6000-6010\"}
        - {protocol: sctp}
        - {protocol: icmp, type: 8}
        - {protocol: icmpv6}
        - {protocol: tcp, port: '443'}
",
        ),
        "t.yaml",
    )
    .unwrap();
    let policy = &set.policies()[0];
    // A present but empty `ingress:` still isolates.
    assert_eq!(policy.ingress, Some(vec![]));
    let egress = policy.egress.as_ref().unwrap();
    assert_eq!(egress[0].peers, [Peer::World, Peer::Any, Peer::Identity("db".into())]);
    assert_eq!((egress[0].ports.as_ref(), egress[0].action), (None, Action::Deny));
    let range = |first, last| PortRange { first, last };
    let ports: Vec<(Protocol, PortRange)> =
        egress[1].ports.as_ref().unwrap().iter().map(|port| (port.protocol, port.range)).collect();
    assert_eq!(
        ports,
        [
            (Protocol::Udp, range(6000, 6010)),
            (Protocol::Sctp, range(0, 65535)),
            (Protocol::Icmp, range(8, 8)),
            (Protocol::Icmpv6, range(0, 255)),
            (Protocol::Tcp, range(443, 443)),
        ]
    );
    assert_eq!(egress[1].action, Action::Allow);
}

#[test]
fn unknown_identity_points_at_the_name() {
    let text = with_policy_spec(
        "  subject: [db]
  ingress:
    - from: [api, dbb]
      ports:
        - {protocol: tcp, port: 5432}
",
    );
    assert_eq!(
        single_error(&text),
        "t.yaml:32:19: unknown identity \"dbb\" in spec.ingress[0].from; declare it with kind: Identity (known: api, db, web)"
    );
}

#[test]
fn the_same_unknown_name_is_reported_where_each_use_is() {
    let text = with_policy_spec(
        "  subject: [nope]
  egress:
    - to: [db]
    - to: [nope]
",
    );
    let errors = errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with("t.yaml:30:13: unknown identity \"nope\" in spec.subject;"), "{errors:#?}");
    assert!(errors[1].starts_with("t.yaml:33:12: unknown identity \"nope\" in spec.egress[1].to;"), "{errors:#?}");
}

#[test]
fn yaml_syntax_errors_are_offset_to_the_document() {
    let text = with_policy_spec("  subject: [db\n  egress: []\n");
    let error = single_error(&text);
    assert!(error.starts_with("t.yaml:31:9: did not find expected ',' or ']'"), "{error}");
    assert!(error.ends_with("; fix the YAML syntax"), "{error}");
}

#[test]
fn unknown_fields_are_rejected_with_the_expected_ones() {
    let text = with_policy_spec("  subject: [db]\n  egres: []\n");
    assert_eq!(
        single_error(&text),
        "t.yaml:31:3: spec: unknown field `egres`; expected one of `subject`, `mode`, `ingress`, `egress`"
    );
    let text = with_policy_spec("  subject: [db]\n  egress:\n    - to: [db]\n      port: 80\n");
    let error = single_error(&text);
    assert!(
        error.starts_with("t.yaml:33:7: spec.egress[0]: unknown field `port`; expected one of `to`, `ports`, `action`"),
        "{error}"
    );
}

#[test]
fn type_errors_from_serde_keep_their_position() {
    let text = with_policy_spec("  subject: [db]\n  egress:\n    - to: [db]\n      ports: [{protocol: tpc}]\n");
    let error = single_error(&text);
    assert!(
        error.starts_with("t.yaml:33:26: spec.egress[0].ports[0].protocol: unknown variant `tpc`; expected one of"),
        "{error}"
    );
    let text = with_policy_spec("  egress: []\n");
    assert_eq!(single_error(&text), "t.yaml:30:3: spec: missing field `subject`; add it");
}

/// Documents are parsed once and read from the parsed value; what reads only from the text (a
/// plain scalar that YAML resolves to a number, where a name goes) still loads as it does from
/// the text.
#[test]
fn a_document_reads_as_its_text_does() {
    let text = "apiVersion: zt/v1\nkind: Identity\nmetadata: {name: 42}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    let set = parse_str(text, "t.yaml").expect("a numeric name reads as the name \"42\"");
    assert_eq!(set.identities()[0].name, "42");
}

#[test]
fn api_version_and_kind_are_checked() {
    let text = "apiVersion: zt/v2\nkind: Identity\nmetadata: {name: a}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    assert_eq!(single_error(text), "t.yaml:1:13: unsupported apiVersion \"zt/v2\"; use \"apiVersion: zt/v1\"");
    let text = "kind: Identity\nmetadata: {name: a}\n";
    assert_eq!(single_error(text), "t.yaml:1:1: missing apiVersion; add \"apiVersion: zt/v1\"");
    let text = "apiVersion: zt/v1\nkind: NetworkPolicy\n";
    assert_eq!(
        single_error(text),
        "t.yaml:2:7: unknown kind \"NetworkPolicy\"; use \"kind: Identity\" or \"kind: Policy\""
    );
    let text = "apiVersion: zt/v1\n";
    assert_eq!(single_error(text), "t.yaml:1:1: missing kind; add \"kind: Identity\" or \"kind: Policy\"");
    let text = "- just a list\n";
    let error = single_error(text);
    assert!(error.starts_with("t.yaml:1:1: invalid type: sequence; expected a mapping with apiVersion"), "{error}");
}

#[test]
fn names_are_required_and_well_formed() {
    let text = "apiVersion: zt/v1\nkind: Identity\nmetadata: {}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    assert_eq!(single_error(text), "t.yaml:3:1: missing metadata.name; give the identity a name under \"metadata:\"");
    let text = "apiVersion: zt/v1\nkind: Identity\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    assert!(single_error(text).starts_with("t.yaml:1:1: missing metadata.name"));
    let text = "apiVersion: zt/v1\nkind: Identity\nmetadata: {name: Web}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    assert_eq!(
        single_error(text),
        "t.yaml:3:18: invalid identity name \"Web\": start it with a lowercase letter or a digit"
    );
    let text =
        "apiVersion: zt/v1\nkind: Identity\nmetadata: {name: \"a b\"}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    assert_eq!(
        single_error(text),
        "t.yaml:3:18: invalid identity name \"a b\": ' ' is not allowed; use lowercase letters, digits and . _ / : -"
    );
    assert_eq!(name_problem("ns/app:v1.2_x-y"), None);
    assert_eq!(name_problem(&"a".repeat(253)), None);
    assert!(name_problem(&"a".repeat(254)).unwrap().contains("at most 253"));
    assert!(name_problem("").is_some());
}

#[test]
fn reserved_names_cannot_be_declared_or_misused() {
    let text = "apiVersion: zt/v1\nkind: Identity\nmetadata:\n  name: world\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    assert_eq!(
        single_error(text),
        "t.yaml:4:9: identity name \"world\" is reserved; choose another name (any, unknown, world and host have fixed meanings)"
    );
    let text = with_policy_spec("  subject: [world]\n  ingress:\n    - from: [unknown]\n");
    let errors = errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with("t.yaml:30:13: world cannot be a subject"), "{errors:#?}");
    assert_eq!(
        errors[1],
        "t.yaml:32:14: reserved identity \"unknown\" cannot be used in spec.ingress[0].from; use a declared identity, world, host, or any"
    );
    // The node itself is a peer, never a subject.
    let text = with_policy_spec("  subject: [host]\n  ingress:\n    - from: [any]\n");
    assert!(single_error(&text).contains("reserved identity \"host\" cannot be used in spec.subject"), "{}", single_error(&text));
    let text = with_policy_spec("  subject: [any]\n  ingress:\n    - from: [host]\n");
    assert!(super::parse_str(&text, "t.yaml").is_ok(), "host is a valid peer");
}

#[test]
fn cidrs_must_be_valid_canonical_and_owned_once() {
    let identity = |name: &str, cidr: &str| {
        format!("---\napiVersion: zt/v1\nkind: Identity\nmetadata:\n  name: {name}\nspec:\n  selectors:\n    - cidr: {cidr}\n")
    };
    // Each document is 8 lines, its cidr on its last line.
    let text = [
        identity("a", "10.20.3.0/33"),
        identity("b", "10.20.3.5/24"),
        identity("c", "10.20.3.7"),
        identity("d", "10.20.3.0/24"),
        identity("e", "'fd00:20:3::/64'"),
        identity("f", "'fd00:20:3:0::/64'"),
        identity("g", "0.0.0.0/0"),
        identity("h", "'::ffff:10.0.0.0/104'"),
    ]
    .concat();
    assert_eq!(errors(&text), [
        "t.yaml:8:13: invalid CIDR \"10.20.3.0/33\"; write ADDRESS/PREFIX-LENGTH, e.g. 10.20.3.0/24 or fd00:20:3::/64",
        "t.yaml:16:13: CIDR 10.20.3.5/24 has host bits set; did you mean 10.20.3.0/24?",
        "t.yaml:24:13: invalid CIDR \"10.20.3.7\"; for a single address write 10.20.3.7/32",
        "t.yaml:48:13: prefix fd00:20:3::/64 is already declared by identity \"e\" (at t.yaml:40:13); \
         an address prefix belongs to one identity, remove one of them",
        "t.yaml:56:13: 0.0.0.0/0 is every address, which zt calls world; use world in from/to instead",
        "t.yaml:64:13: IPv4-mapped prefix ::ffff:10.0.0.0/104; write it as the IPv4 prefix 10.0.0.0/8",
    ]);
}

#[test]
fn identities_need_selectors() {
    let text = "apiVersion: zt/v1\nkind: Identity\nmetadata: {name: a}\nspec:\n  selectors: []\n";
    assert_eq!(
        single_error(text),
        "t.yaml:5:3: identity \"a\" has no selectors; add at least one (\"- cidr: PREFIX\", \"- cgroup: PATH\", \
         \"- spiffe: ID\" or \"- interface: NAME\") under spec.selectors"
    );
}

#[test]
fn port_and_type_are_checked_per_protocol() {
    let text = with_policy_spec(
        "  subject: [db]
  ingress:
    - from: [api]
      ports:
        - {protocol: tcp, port: 70000}
        - {protocol: udp, port: 0}
        - {protocol: tcp, port: \"90-80\"}
        - {protocol: sctp, port: \"http--x\"}
        - {protocol: icmp, port: 8}
        - {protocol: tcp, type: 8}
        - {protocol: icmpv6, type: 256}
",
    );
    assert_eq!(errors(&text), [
        "t.yaml:34:33: port 70000 is out of range; use 1-65535",
        "t.yaml:35:33: port 0 is out of range; use 1-65535",
        "t.yaml:36:33: invalid port range \"90-80\"; write \"LO-HI\" with 1 <= LO <= HI <= 65535, e.g. \"6000-6010\"",
        "t.yaml:37:34: invalid port \"http--x\"; a port name is 1-15 lowercase letters, digits and '-', with a \
         letter, no '-' at either end or twice in a row (as a pod's containerPort names it)",
        "t.yaml:38:34: port is not valid for icmp; use \"type:\" to match an ICMP message type",
        "t.yaml:39:33: type is only valid for icmp and icmpv6; use \"port:\" to match tcp ports",
        "t.yaml:40:36: ICMP type 256 is out of range; use 0-255",
    ]);
}

#[test]
fn ports_by_name_are_kept_apart_from_numbers() {
    let set = parse_str(
        &with_policy_spec(
            "  subject: [db]
  ingress:
    - from: [api]
      ports: [{protocol: tcp, port: http}, {protocol: tcp, port: \"8080\"}, {protocol: sctp, port: diameter-2}]
    - from: [api]
      ports: [{protocol: udp, port: dns}]
",
        ),
        "t.yaml",
    )
    .unwrap();
    let rules = set.policies()[0].ingress.as_ref().unwrap();
    let named = |protocol, name: &str| NamedPort { protocol, name: name.into() };
    assert_eq!(rules[0].named_ports, [named(Protocol::Tcp, "http"), named(Protocol::Sctp, "diameter-2")]);
    assert_eq!(rules[0].ports, Some(vec![PortMatch { protocol: Protocol::Tcp, range: PortRange { first: 8080, last: 8080 } }]));
    // Only names: no numbered port, and still not every port.
    assert_eq!((rules[1].ports.as_deref(), rules[1].named_ports.as_slice()), (Some(&[][..]), &[named(Protocol::Udp, "dns")][..]));
    let text = with_policy_spec("  subject: [db]\n  ingress: [{from: [api], ports: [{protocol: icmp, port: echo}]}]\n");
    assert!(single_error(&text).ends_with("port is not valid for icmp; use \"type:\" to match an ICMP message type"));
}

#[test]
fn policies_need_a_direction_and_non_empty_lists() {
    let text = with_policy_spec("  subject: [db]\n");
    assert_eq!(
        single_error(&text),
        "t.yaml:29:1: policy \"p\" has neither ingress nor egress; add \"ingress:\" and/or \"egress:\" rules \
         (an empty list denies everything in that direction)"
    );
    let text = with_policy_spec("  subject: []\n  egress:\n    - to: []\n    - to: [db]\n      ports: []\n");
    assert_eq!(
        errors(&text),
        [
            "t.yaml:30:12: spec.subject is empty; list the identities this policy protects, or [any]",
            "t.yaml:32:11: spec.egress[0].to is empty, so the rule matches nothing; list peers, or [any]",
            "t.yaml:34:14: spec.egress[1].ports is empty; omit \"ports\" to match any protocol and port",
        ]
    );
}

#[test]
fn duplicate_names_point_at_the_first_declaration() {
    let policy = "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {name: p}\nspec: {subject: [db], egress: []}\n";
    let text = format!("{IDENTITIES}{policy}{policy}---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: web}}\nspec: {{selectors: [{{cidr: 10.9.0.0/16}}]}}\n");
    assert_eq!(
        errors(&text),
        [
            "t.yaml:33:18: duplicate policy \"p\" (first declared at t.yaml:28:18); rename or remove one of them",
            "t.yaml:38:18: duplicate identity \"web\" (first declared at t.yaml:4:9); rename or remove one of them",
        ]
    );
}

#[test]
fn all_errors_are_reported_sorted_by_position() {
    let text =
        with_policy_spec("  subject: [dbb]\n  ingress:\n    - from: [web]\n      ports: [{protocol: tcp, port: 0}]\n")
            .replace("10.20.2.0/24", "10.20.2.1/24")
            .replace("name: web", "name: Web");
    let lines: Vec<(usize, usize)> =
        parse_str(&text, "t.yaml").unwrap_err().0.iter().map(|error| (error.line, error.col)).collect();
    // Bad name, host bits, unknown subject, unknown peer (web was not declared), bad port.
    assert_eq!(lines, [(4, 9), (15, 13), (30, 13), (32, 14), (33, 37)]);
    let display = parse_str(&text, "t.yaml").unwrap_err().to_string();
    assert_eq!(display.lines().count(), 5);
    assert!(display.lines().all(|line| line.starts_with("t.yaml:")), "{display}");
}

#[test]
fn document_separators_and_empty_documents() {
    let text = "# leading comment\n--- # identities\n\n# only a comment\n---\napiVersion: zt/v1\nkind: Identity\nmetadata: {name: a}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n---\n---\napiVersion: zt/v1\nkind: Policy\nmetadata: {name: p}\nspec: {subject: [b], egress: []}\n";
    assert_eq!(split_documents(text).iter().map(|(line, _)| *line).collect::<Vec<_>>(), [6, 12]);
    assert!(single_error(text).starts_with("t.yaml:15:18: unknown identity \"b\""));
    assert!(is_document_separator("---"));
    assert!(is_document_separator("---   # x"));
    assert!(!is_document_separator("----"));
    assert!(!is_document_separator("---#x"));
    assert!(!is_document_separator(" ---"));
    assert_eq!(parse_str("", "t.yaml").unwrap().identities().len(), 0);
}

#[test]
fn crlf_line_endings_and_utf8_keep_columns() {
    let text =
        "apiVersion: zt/v1\r\nkind: Identity\r\nmetadata: {name: \"é\"}\r\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\r\n";
    assert_eq!(
        single_error(text),
        "t.yaml:3:18: invalid identity name \"é\": start it with a lowercase letter or a digit"
    );
}

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zt-policy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn directories_load_their_yaml_files_in_order() {
    let scratch = ScratchDir::new("dir");
    let identity = |name: &str, cidr: &str| {
        format!(
            "apiVersion: zt/v1\nkind: Identity\nmetadata: {{name: {name}}}\nspec: {{selectors: [{{cidr: {cidr}}}]}}\n"
        )
    };
    fs::write(scratch.0.join("b.yml"), identity("b", "10.2.0.0/16")).unwrap();
    fs::write(scratch.0.join("a.yaml"), identity("a", "10.1.0.0/16")).unwrap();
    fs::write(scratch.0.join("notes.txt"), "not: [yaml").unwrap();
    let set = load_paths(std::slice::from_ref(&scratch.0)).unwrap();
    let names: Vec<&str> = set.identities().iter().map(|identity| identity.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);

    // Names are global across files.
    let extra = scratch.0.join("extra.yaml");
    fs::write(&extra, format!("# the same name again\n{}", identity("a", "10.3.0.0/16"))).unwrap();
    let errors = load_paths(std::slice::from_ref(&scratch.0)).unwrap_err();
    let first = scratch.0.join("a.yaml");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].file, extra.display().to_string());
    assert_eq!((errors.0[0].line, errors.0[0].col), (4, 18));
    assert!(errors.0[0].message.contains(&format!("first declared at {}:3:18", first.display())), "{errors}");
}

#[test]
fn unreadable_paths_and_empty_directories_are_errors() {
    let scratch = ScratchDir::new("empty");
    let missing = scratch.0.join("missing.yaml");
    let errors = load_paths(&[scratch.0.clone(), missing.clone()]).unwrap_err();
    assert_eq!(errors.0.len(), 2, "{errors}");
    let messages: Vec<String> = errors.0.iter().map(|error| format!("{}:{}", error.file, error.message)).collect();
    assert!(messages.iter().any(|m| m.starts_with(&format!("{}:no *.yaml", scratch.0.display()))), "{messages:?}");
    assert!(
        messages.iter().any(|m| m.starts_with(&format!("{}:cannot read the file", missing.display()))),
        "{messages:?}"
    );
}

#[test]
fn devices_fifos_and_oversized_files_are_refused_in_the_file_error_style() {
    let scratch = ScratchDir::new("bounded");
    let fifo = scratch.0.join("fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let huge = scratch.0.join("huge.yaml");
    fs::File::create(&huge).unwrap().set_len(crate::bounded::POLICY_FILE_LIMIT + 1).unwrap();
    let errors = load_paths(&[PathBuf::from("/dev/zero"), fifo.clone(), huge.clone()]).unwrap_err();
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "/dev/zero:1:1: cannot read the file: not a regular file (a character device); check the path and its \
             permissions"
                .to_owned(),
            format!(
                "{}:1:1: cannot read the file: not a regular file (a FIFO); check the path and its permissions",
                fifo.display()
            ),
            format!(
                "{}:1:1: cannot read the file: it is 4194305 bytes; the limit is 4194304 bytes; split it into \
                 several files, or trim it",
                huge.display()
            ),
        ]
    );
}

#[test]
fn a_policy_set_over_its_total_limit_is_refused_at_the_file_that_crosses_it() {
    use crate::bounded::{POLICY_FILE_LIMIT, POLICY_SET_LIMIT};
    let scratch = ScratchDir::new("set-limit");
    // Sparse files at the file limit: the set limit is crossed by the one after the 16th.
    let count = POLICY_SET_LIMIT / POLICY_FILE_LIMIT + 1;
    for i in 0..count {
        fs::File::create(scratch.0.join(format!("{i:02}.yaml"))).unwrap().set_len(POLICY_FILE_LIMIT).unwrap();
    }
    let errors = load_paths(std::slice::from_ref(&scratch.0)).unwrap_err();
    let last = errors.0.last().unwrap();
    assert_eq!(last.file, scratch.0.join(format!("{:02}.yaml", count - 1)).display().to_string());
    assert!(last.message.contains("over 64 MiB together, the limit of a policy set"), "{}", last.message);
}

/// One identity whose selectors are `items` (each a `- key: value` line), starting on line 7.
fn identity_with(name: &str, items: &[&str]) -> String {
    let items: String = items.iter().map(|item| format!("    - {item}\n")).collect();
    format!("---\napiVersion: zt/v1\nkind: Identity\nmetadata:\n  name: {name}\nspec:\n  selectors:\n{items}")
}

#[test]
fn every_selector_kind_parses_into_the_model() {
    let text = identity_with(
        "\"spiffe://prod.example/ns/shop/sa/api\"",
        &[
            "cidr: 10.20.2.0/24",
            "cgroup: system.slice/postgresql.service",
            "cgroup: \"kubepods.slice/**/cri-containerd-*.scope\"",
            "spiffe: spiffe://prod.example/ns/shop/sa/api",
            "spiffe: \"spiffe://prod.example/ns/shop/sa/*\"",
            "interface: lxc-api",
            "{cidr: 'fd00:20:2::/64'}",
        ],
    );
    let set = parse_str(&text, "t.yaml").unwrap();
    assert_eq!(
        set.identities(),
        [Identity {
            name: "spiffe://prod.example/ns/shop/sa/api".into(),
            cidrs: vec!["10.20.2.0/24".parse().unwrap(), "fd00:20:2::/64".parse().unwrap()],
            cgroups: vec![
                CgroupSelector::Exact("system.slice/postgresql.service".into()),
                CgroupSelector::Glob("kubepods.slice/**/cri-containerd-*.scope".into()),
            ],
            spiffe: vec![
                SpiffeSelector::Exact("spiffe://prod.example/ns/shop/sa/api".into()),
                SpiffeSelector::Pattern("spiffe://prod.example/ns/shop/sa/*".into()),
            ],
            interfaces: vec!["lxc-api".into()],
        }]
    );
}

#[test]
fn selector_errors_point_at_their_values() {
    // Lines 8 to 17; values start at column 13 (cidr), 15 (cgroup, spiffe) or 18 (interface).
    let text = identity_with(
        "a",
        &[
            "cidr: 10.0.0.0/8",
            "cgroup: /sys/fs/cgroup/system.slice/x.service",
            "cgroup: a//b",
            "cgroup: \"a/b**\"",
            "spiffe: spiffe://Prod.example/a",
            "spiffe: spiffe://td/a?x",
            "spiffe: \"spiffe://td/**/a**\"",
            "interface: veth1234567890abc",
            "interface: \"eth0:1\"",
            "interface: ..",
        ],
    );
    assert_eq!(
        errors(&text),
        [
            "t.yaml:9:15: cgroup path \"/sys/fs/cgroup/system.slice/x.service\" is absolute; write it relative to \
             the cgroup v2 root (no leading '/'), did you mean \"system.slice/x.service\"?",
            "t.yaml:10:15: cgroup path \"a//b\" has an empty segment (\"//\"); remove the extra '/'",
            "t.yaml:11:15: cgroup glob \"a/b**\" has \"**\" inside the segment \"b**\"; \"**\" must be a whole segment \
             (as in kubepods.slice/**/x.scope), use \"*\" to match within a segment",
            "t.yaml:12:15: 'P' is not allowed in the trust domain \"Prod.example\" of SPIFFE ID \
             \"spiffe://Prod.example/a\"; write it in lowercase: \"prod.example\"",
            "t.yaml:13:15: SPIFFE ID \"spiffe://td/a?x\" has a query (\"?x\"); SPIFFE IDs have none, remove it",
            "t.yaml:14:15: SPIFFE pattern \"spiffe://td/**/a**\" has \"**\" inside the segment \"a**\"; \"**\" must be \
             a whole segment (as in spiffe://td/ns/**), use \"*\" to match within a segment",
            "t.yaml:15:18: interface name \"veth1234567890abc\" is 17 bytes long; Linux interface names have at most 15",
            "t.yaml:16:18: ':' is not allowed in an interface name (\"eth0:1\"); Linux interface names have no '/', ':' \
             or whitespace",
            "t.yaml:17:18: \"..\" is not a valid interface name; write the interface's name, e.g. lxc-api",
        ]
    );
}

#[test]
fn a_selector_has_exactly_one_known_key() {
    let text = identity_with(
        "a",
        &["cidr: 10.0.0.0/8\n      cgroup: a.slice", "{interface: eth0, spiffe: 'spiffe://td/a'}", "cidr:", "{}"],
    );
    assert_eq!(
        errors(&text),
        [
            "t.yaml:9:7: a selector has exactly one key, this one has cidr, cgroup; make each its own list item \
             (\"- cgroup: ...\")",
            "t.yaml:10:25: a selector has exactly one key, this one has interface, spiffe; make each its own list \
             item (\"- spiffe: ...\")",
            "t.yaml:11:7: selector has no value; write one of \"cidr: PREFIX\", \"cgroup: PATH\", \"spiffe: ID\", \
             \"interface: NAME\"",
            "t.yaml:12:7: selector has no value; write one of \"cidr: PREFIX\", \"cgroup: PATH\", \"spiffe: ID\", \
             \"interface: NAME\"",
        ]
    );
    let text = identity_with("a", &["cgroups: a.slice"]);
    assert_eq!(
        single_error(&text),
        "t.yaml:8:7: spec.selectors[0]: unknown field `cgroups`; expected one of `cidr`, `cgroup`, `spiffe`, `interface`"
    );
}

#[test]
fn the_same_selector_in_two_places_is_rejected() {
    // Each identity is 9 lines; its selectors on lines 8 and 9 (+ 9 per identity).
    let text = [
        identity_with("a", &["cgroup: system.slice/pg.service", "spiffe: spiffe://td/ns/a"]),
        identity_with("b", &["cgroup: system.slice/pg.service", "interface: lxc-a"]),
        identity_with("c", &["spiffe: spiffe://td/ns/a", "interface: lxc-a"]),
        identity_with("d", &["cgroup: \"system.slice/*\"", "spiffe: \"spiffe://td/ns/*\""]),
        identity_with("e", &["cgroup: \"system.slice/*\"", "spiffe: \"spiffe://td/ns/*\""]),
        identity_with("f", &["interface: lxc-f", "interface: lxc-f"]),
    ]
    .concat();
    assert_eq!(
        errors(&text),
        [
            "t.yaml:17:15: cgroup path \"system.slice/pg.service\" is already declared by identity \"a\" (at t.yaml:8:15); \
             a cgroup selector belongs to one identity, remove one of them",
            "t.yaml:26:15: SPIFFE ID \"spiffe://td/ns/a\" is already declared by identity \"a\" (at t.yaml:9:15); \
             a SPIFFE selector belongs to one identity, remove one of them",
            "t.yaml:27:18: interface \"lxc-a\" is already declared by identity \"b\" (at t.yaml:18:18); \
             an interface belongs to one identity, remove one of them",
            "t.yaml:44:15: cgroup glob \"system.slice/*\" is already declared by identity \"d\" (at t.yaml:35:15); \
             a cgroup selector belongs to one identity, remove one of them",
            "t.yaml:45:15: SPIFFE pattern \"spiffe://td/ns/*\" is already declared by identity \"d\" (at t.yaml:36:15); \
             a SPIFFE selector belongs to one identity, remove one of them",
            "t.yaml:54:18: interface \"lxc-f\" is already declared by identity \"f\" (at t.yaml:53:18); \
             an interface belongs to one identity, remove one of them",
        ]
    );
    // Overlapping (but different) patterns are fine: precedence decides.
    let text = [
        identity_with("a", &["cgroup: system.slice/pg.service", "spiffe: spiffe://td/ns/a"]),
        identity_with("b", &["cgroup: \"system.slice/*\"", "spiffe: \"spiffe://td/ns/*\""]),
        identity_with("c", &["cgroup: \"system.slice/**\"", "spiffe: \"spiffe://td/**\""]),
    ]
    .concat();
    assert_eq!(parse_str(&text, "t.yaml").map(|set| set.identities().len()), Ok(3));
}

#[test]
fn example_identities_check_alone_and_with_the_demo() {
    let text = include_str!("../../../policies/identities.yaml");
    let set = parse_str(text, "policies/identities.yaml").unwrap_or_else(|errors| panic!("{errors}"));
    let identities = set.identities();
    assert!(identities.iter().any(|identity| !identity.cidrs.is_empty()));
    assert!(identities.iter().flat_map(|identity| &identity.cgroups).any(CgroupSelector::is_glob));
    assert!(identities.iter().flat_map(|identity| &identity.cgroups).any(|selector| !selector.is_glob()));
    assert!(identities.iter().flat_map(|identity| &identity.spiffe).any(SpiffeSelector::is_pattern));
    assert!(identities.iter().flat_map(|identity| &identity.spiffe).any(|selector| !selector.is_pattern()));
    assert!(identities.iter().any(|identity| !identity.interfaces.is_empty()));
    assert!(compile::compile(&set).is_ok());
    // `--policy policies/` loads it together with the demo: no name or selector may clash.
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
    let both = load_paths(&[dir]).unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(both.identities().len(), identities.len() + 7);
}

#[test]
fn cidr_peers_and_staged_mode_parse() {
    let text = with_policy_spec(
        "  subject: [web]
  mode: monitor
  egress:
    - to: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}, db]
    - to: [{cidr: '2001:db8::/32'}]
",
    );
    let set = parse_str(&text, "t.yaml").unwrap();
    let policy = &set.policies()[0];
    assert_eq!(policy.mode, PolicyMode::Monitor);
    let egress = policy.egress.as_deref().unwrap();
    assert_eq!(
        egress[0].peers,
        [
            Peer::Cidr {
                net: "0.0.0.0/0".parse().unwrap(),
                except: vec!["10.0.0.0/8".parse().unwrap(), "192.168.0.0/16".parse().unwrap()],
            },
            Peer::Identity("db".into()),
        ]
    );
    assert_eq!(egress[1].peers, [Peer::Cidr { net: "2001:db8::/32".parse().unwrap(), except: vec![] }]);
    // Without `mode`, a policy is enforced.
    let set = parse_str(&with_policy_spec("  subject: [web]\n  egress: []\n"), "t.yaml").unwrap();
    assert_eq!(set.policies()[0].mode, PolicyMode::Enforce);
}

#[test]
fn cidr_peer_mistakes_are_explained_where_they_are() {
    let cases = [
        ("[{cidr: 10.9.0.1/16}]", "t.yaml:32:19: CIDR 10.9.0.1/16 has host bits set; did you mean 10.9.0.0/16?"),
        (
            "[{cidr: 10.9.0.0/16, except: [10.8.0.0/24]}]",
            "t.yaml:32:41: except 10.8.0.0/24 is not inside 10.9.0.0/16; list only narrower ranges within cidr that \
             the rule should leave out",
        ),
        (
            "[{cidr: 10.9.0.0/16, except: [10.9.0.0/16]}]",
            "t.yaml:32:41: except 10.9.0.0/16 is not inside 10.9.0.0/16; list only narrower ranges within cidr that \
             the rule should leave out",
        ),
        (
            "[{cidr: 10.20.2.128/25}]",
            "t.yaml:32:19: cidr 10.20.2.128/25 lies inside 10.20.2.0/24, which identity \"api\" owns, so it matches \
             no address (a cidr peer matches only addresses no identity owns); name \"api\" instead",
        ),
        (
            "[{cidr: 10.9.0.0/16, exclude: [10.9.1.0/24]}]",
            "t.yaml:32:32: spec.egress[0].to[0]: unknown field `exclude`; expected one of `cidr`, `except`, `pods`",
        ),
        ("[{except: [10.9.1.0/24]}]", "t.yaml:32:12: a peer map needs cidr (an address range) or pods (a pod selector)"),
    ];
    for (peers, expected) in cases {
        let text = with_policy_spec(&format!("  subject: [web]\n  egress:\n    - to: {peers}\n"));
        let error = single_error(&text);
        assert!(error.starts_with(expected), "{peers}:\n{error}\nexpected:\n{expected}");
    }
    let text = with_policy_spec("  subject: [web]\n  mode: audit\n  egress: []\n");
    let error = single_error(&text);
    assert!(error.starts_with("t.yaml:31:9: spec.mode: unknown variant `audit`; expected `enforce` or `monitor`"), "{error}");
}

#[test]
fn pods_selectors_parse_as_subjects_and_peers() {
    let set = parse_str(
        &with_policy_spec(
            "  subject: [web, {pods: {namespace: shop, matchLabels: {app: cart}}}]\n\
             \x20 ingress:\n\
             \x20   - from:\n\
             \x20       - pods: {namespaceSelector: {matchLabels: {team: a}}, serviceAccount: api,\n\
             \x20                matchExpressions: [{key: tier, operator: In, values: [front, edge]}]}\n\
             \x20       - {cidr: 10.9.0.0/16}\n",
        ),
        "t.yaml",
    )
    .unwrap();
    let policy = &set.policies()[0];
    let Subject::Pods(cart) = &policy.subjects[1] else { panic!("{:?}", policy.subjects) };
    assert_eq!(cart.namespace.as_deref(), Some("shop"));
    assert_eq!(cart.labels.requirements, [labels::Requirement::In("app".into(), vec!["cart".into()])]);
    let Peer::Pods(peer) = &policy.ingress.as_ref().unwrap()[0].peers[0] else { panic!() };
    assert_eq!(peer.service_account.as_deref(), Some("api"));
    assert_eq!(peer.namespace, None);
    assert_eq!(
        peer.namespaces.as_ref().unwrap().requirements,
        [labels::Requirement::In("team".into(), vec!["a".into()])]
    );
    assert_eq!(peer.labels.requirements, [labels::Requirement::In("tier".into(), vec!["front".into(), "edge".into()])]);
    assert!(matches!(policy.ingress.as_ref().unwrap()[0].peers[1], Peer::Cidr { .. }));
}

#[test]
fn malformed_pods_selectors_are_pointed_at() {
    let spec = |peer: &str| with_policy_spec(&format!("  subject: [web]\n  ingress:\n    - from:\n        - {peer}\n"));
    assert_eq!(
        single_error(&spec("pods: {namespace: Shop}")),
        "t.yaml:33:29: namespace \"Shop\" is not a Kubernetes namespace name: 1-63 lowercase letters, digits and '-', \
         not starting or ending with '-'"
    );
    assert_eq!(
        single_error(&spec("pods: {matchExpressions: [{key: app, operator: In}]}")),
        "t.yaml:33:17: matchExpressions[0].values: In needs at least one value; fix the selector"
    );
    assert_eq!(
        single_error(&spec("{pods: {}, cidr: 10.0.0.0/8}")),
        "t.yaml:33:12: a peer has one of cidr and pods; make each its own list item"
    );
    assert_eq!(
        single_error(&spec("{pods: {}, except: [10.0.0.0/8]}")),
        "t.yaml:33:22: except goes with cidr, not with pods; to leave pods out, narrow the selector"
    );
    let unknown = single_error(&spec("pods: {labels: {app: web}}"));
    assert!(unknown.contains("pods: unknown field `labels`; expected one of `namespace`, `namespaceSelector`"), "{unknown}");
}

#[test]
fn pod_identity_names_cannot_be_declared() {
    let text = "apiVersion: zt/v1\nkind: Identity\nmetadata: {name: \"k8s:shop:web:\"}\nspec: {selectors: [{cidr: 10.0.0.0/8}]}\n";
    let error = single_error(text);
    assert!(error.contains("starts with \"k8s:\", which names pod identities"), "{error}");
}
