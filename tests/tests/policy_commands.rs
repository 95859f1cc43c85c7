//! `zt-agent policy test`, `suggest` and `import-k8s`, run as the binary (`ZT_AGENT_BIN`).
//!
//! The offline tests need no root. The others load the datapath or run a real topology: they
//! need root and fail, never skip, without it.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::Value;
use zt_tests::{
    ensure_root, ping, run_agent_command, tcp_connect, tcp_server, Agent, AgentOptions, Topology, TopologySpec,
};

const WAIT: Duration = Duration::from_secs(2);
/// How long a blocked attempt is given before it counts as dropped.
const BLOCKED: Duration = Duration::from_millis(700);
const EVENT_WAIT: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn run(args: &[&str]) -> Output {
    run_agent_command(args).expect("running zt-agent (set ZT_AGENT_BIN)")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `zt-agent policy test <cases> --policy <policy> [--offline]`.
fn policy_test(cases: &Path, policy: &Path, offline: bool) -> Output {
    let mut args = vec!["policy", "test", path_str(cases), "--policy", path_str(policy)];
    if offline {
        args.push("--offline");
    }
    run(&args)
}

/// The per-case and summary lines: everything but the header, which names the judge.
fn results(output: &Output) -> Vec<String> {
    let text = stdout(output);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("running "), "no header line:\n{text}\n{}", stderr(output));
    lines.map(str::to_owned).collect()
}

#[test]
fn policy_test_offline_passes_fails_and_points_at_case_errors() {
    let policy = fixture("topology.yaml");
    let passing = policy_test(&fixture("topology-cases.yaml"), &policy, true);
    assert!(passing.status.success(), "{}{}", stdout(&passing), stderr(&passing));
    let lines = results(&passing);
    assert_eq!(lines.len(), 18, "{lines:#?}");
    assert!(lines[..17].iter().all(|line| line.starts_with("ok      ")), "{lines:#?}");
    assert_eq!(lines[17], "17 passed, 0 failed");
    assert!(stdout(&passing).starts_with("running 17 cases from "), "{}", stdout(&passing));

    let failing = policy_test(&fixture("topology-cases-failing.yaml"), &policy, true);
    assert_eq!(failing.status.code(), Some(1), "{}{}", stdout(&failing), stderr(&failing));
    let lines = results(&failing);
    let failed: Vec<&String> = lines.iter().filter(|line| line.starts_with("FAILED  ")).collect();
    assert_eq!(failed.len(), 3, "{lines:#?}");
    assert!(
        failed[0].starts_with("FAILED  intruder reaches db (")
            && failed[0].ends_with(
                "topology-cases-failing.yaml:9): expected allow; got deny, default-deny (egress), rule default-deny"
            ),
        "{}",
        failed[0]
    );
    assert_eq!(lines.last().unwrap(), "1 passed, 3 failed");
    assert_eq!(stderr(&failing).trim(), "zt-agent: 3 of 4 cases failed");

    // A broken cases file: nothing runs, and the error points into it.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    fs::write(&broken, "cases:\n  - name: typo\n    src: 10.20.1.2\n    dst: 10.20.2.2\n    protocol: tcp\n    prot: 80\n    expect: allow\n").unwrap();
    let output = policy_test(&broken, &policy, true);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "", "nothing runs");
    let message = stderr(&output);
    assert!(
        message.starts_with(&format!("zt-agent: {}:6:5: cases[0]: unknown field `prot`", broken.display())),
        "{message}"
    );
    // A rule the policy does not have.
    fs::write(&broken, "cases:\n  - {name: x, src: 10.20.1.2, dst: 10.20.2.2, protocol: tcp, port: 8080, expect: allow, rule: web/ingress/0}\n").unwrap();
    let message = stderr(&policy_test(&broken, &policy, true));
    assert!(message.contains(":2:95: the policy has no rule \"web/ingress/0\""), "{message}");
}

/// Cases beyond the fixture's: the same ICMP message twice (its conntrack key has nothing per
/// case, so the kernel run starts a fresh datapath for the second), ICMP in the other address
/// family, neighbour discovery's types over IPv4 (judged by policy there), port 0.
const EDGE_CASES: &str = "\
cases:
  - {name: world unreachable once, src: 8.8.8.8, dst: 9.9.9.9, protocol: icmp, type: 3, expect: allow, reason: not-isolated}
  - {name: world unreachable twice, src: 8.8.8.8, dst: 9.9.9.9, protocol: icmp, type: 3, expect: allow, reason: not-isolated}
  - {name: web ping over IPv6 with ICMPv4, src: \"fd00:20:1::2\", dst: \"fd00:20:2::2\", protocol: icmp, type: 8, expect: allow, rule: api/ingress/0}
  - {name: ICMPv6 echo over IPv4, src: 10.20.1.2, dst: 10.20.2.2, protocol: icmpv6, type: 128, expect: allow, rule: api/ingress/0}
  - {name: neighbour discovery over IPv4 is policy's, src: 10.20.9.2, dst: 10.20.3.2, protocol: icmpv6, type: 136, expect: deny, rule: default-deny}
  - {name: tcp port 0, src: 10.20.1.2, dst: 10.20.2.2, protocol: tcp, port: 0, expect: deny, rule: default-deny}
  - {name: api answers web on port 8080 only as a reply, src: 10.20.2.2, dst: 10.20.1.2, protocol: tcp, port: 8080, expect: deny}
  - {name: reports by udp, src: 10.30.1.2, dst: 10.20.2.2, protocol: udp, port: 8080, expect: deny}
";

#[test]
fn policy_test_in_the_kernel_gives_the_reference_evaluators_results() {
    ensure_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let edge = dir.path().join("edge.yaml");
    fs::write(&edge, EDGE_CASES).unwrap();
    let policy = fixture("topology.yaml");
    for (cases, passes) in
        [(fixture("topology-cases.yaml"), true), (fixture("topology-cases-failing.yaml"), false), (edge, true)]
    {
        let kernel = policy_test(&cases, &policy, false);
        let offline = policy_test(&cases, &policy, true);
        let header = stdout(&kernel).lines().next().unwrap_or_default().to_owned();
        assert!(
            header.ends_with("in the kernel datapath (XDP, BPF_PROG_TEST_RUN)"),
            "{}\n{}",
            stdout(&kernel),
            stderr(&kernel)
        );
        assert_eq!(results(&kernel), results(&offline), "{}: kernel and reference evaluator differ", cases.display());
        assert_eq!(kernel.status.success(), passes, "{}{}", stdout(&kernel), stderr(&kernel));
        assert_eq!(kernel.status.code(), offline.status.code());
    }
}

/// `policies/rollout.yaml` on the demo's identities: CIDR peers with exceptions and a staged
/// policy, judged by the loaded program on an enforcing datapath, and by the reference evaluator.
#[test]
fn cidr_peers_and_staged_policies_in_the_kernel_as_documented() {
    ensure_root().unwrap();
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (demo, rollout) = (policies.join("demo.yaml"), policies.join("rollout.yaml"));
    let cases = fixture("rollout-cases.yaml");
    let args = |offline: bool| {
        let mut args = vec!["policy", "test", path_str(&cases), "--policy", path_str(&demo), "--policy", path_str(&rollout)];
        if offline {
            args.push("--offline");
        }
        run(&args)
    };
    let (kernel, offline) = (args(false), args(true));
    assert!(kernel.status.success(), "{}{}", stdout(&kernel), stderr(&kernel));
    assert!(offline.status.success(), "{}{}", stdout(&offline), stderr(&offline));
    assert!(stdout(&kernel).contains("in the kernel datapath"), "{}", stdout(&kernel));
    assert_eq!(results(&kernel), results(&offline));
    assert!(stdout(&kernel).contains("7 passed, 0 failed"), "{}", stdout(&kernel));
}

// ---------------------------------------------------------------------------------------------
// suggest

fn tcp(t: &Topology, from: &str, to: SocketAddr, timeout: Duration) -> bool {
    tcp_connect(t.ns(from), to, timeout).is_ok()
}

fn matches(event: &Value, expected: &[(&str, &str)]) -> bool {
    expected.iter().all(|(path, value)| {
        let field = path.split('.').fold(event, |v, key| &v[key]);
        field.as_str() == Some(value) || field.as_u64().is_some_and(|n| n.to_string() == *value)
    })
}

fn wait_for(agent: &Agent, expected: &[(&str, &str)]) -> Value {
    agent.wait_for_event(|e| matches(e, expected), EVENT_WAIT).unwrap_or_else(|| {
        panic!("no event matching {expected:?}\nevents: {:#?}\nagent log:\n{}", agent.events(), agent.stderr())
    })
}

/// Monitor mode records what default-deny would deny; the suggestion made from those audits,
/// loaded with the policy in enforce mode, lets exactly those flows through.
#[test]
fn suggest_turns_real_audits_into_rules_that_admit_exactly_those_flows() {
    ensure_root().unwrap();
    let t = Topology::new(
        TopologySpec::new().workload("web", 1).workload("api", 2).workload("db", 3).workload("intruder", 9),
    )
    .expect("building the test topology");
    let mut servers = Vec::new();
    for name in ["db", "intruder"] {
        for addr in [t.ipv4(name), t.ipv6(name)] {
            servers.push(tcp_server(t.ns(name), SocketAddr::new(addr, 5432)).unwrap());
        }
    }
    for addr in [t.ipv4("api"), t.ipv6("api")] {
        servers.push(tcp_server(t.ns("api"), SocketAddr::new(addr, 8080)).unwrap());
    }
    let db = |addr: IpAddr| SocketAddr::new(addr, 5432);
    let base = fixture("topology.yaml");

    // 1. Monitor mode: intruder → db tcp/5432 (both families) and intruder pings api are
    //    audited; web → api is allowed and reported as such.
    let events = {
        let agent = Agent::start_on(t.node(), &base, "monitor").unwrap();
        assert!(tcp(&t, "intruder", db(t.ipv4("db")), WAIT), "monitor mode passes intruder → db");
        assert!(tcp(&t, "intruder", db(t.ipv6("db")), WAIT), "monitor mode passes intruder → db (IPv6)");
        assert!(ping(t.ns("intruder"), t.ipv4("api"), WAIT), "monitor mode passes intruder's ping");
        assert!(tcp(&t, "web", SocketAddr::new(t.ipv4("api"), 8080), WAIT));
        for dst in [t.ipv4("db").to_string(), t.ipv6("db").to_string()] {
            let expected = [
                ("verdict", "audit"),
                ("reason", "default-deny"),
                ("src.identity", "intruder"),
                ("dst.ip", &dst),
                ("dst.port", "5432"),
            ];
            wait_for(&agent, &expected);
        }
        wait_for(&agent, &[("verdict", "audit"), ("protocol", "icmp"), ("src.identity", "intruder")]);
        wait_for(&agent, &[("verdict", "allow"), ("src.identity", "web"), ("dst.identity", "api")]);
        agent.events()
    };
    let dir = tempfile::tempdir().unwrap();
    let events_file = dir.path().join("events.jsonl");
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    fs::write(&events_file, lines.join("\n") + "\n").unwrap();

    // 2. The suggestion, checked with the policy it was made for.
    let output = run(&["policy", "suggest", "--from", path_str(&events_file), "--policy", path_str(&base)]);
    assert!(output.status.success(), "{}\nevents:\n{}", stderr(&output), lines.join("\n"));
    let suggestion = stdout(&output);
    let suggested = dir.path().join("suggested.yaml");
    fs::write(&suggested, &suggestion).unwrap();
    for expected in [
        "metadata: {name: suggested-intruder}",
        "metadata: {name: suggested-db}",
        "metadata: {name: suggested-api}",
        "        - {protocol: tcp, port: 5432}  # 2 events",
        "        - {protocol: icmp, type: 8}  # 1 event",
    ] {
        assert!(suggestion.lines().any(|line| line == expected), "no line {expected:?} in\n{suggestion}");
    }
    assert!(suggestion.contains("verdict \"allow\" (not an audit)"), "{suggestion}");
    assert!(!suggestion.contains("subject: [web]"), "web was only allowed, it needs nothing:\n{suggestion}");
    let check = run(&["policy", "check", path_str(&base), path_str(&suggested)]);
    assert!(check.status.success(), "{}\n{suggestion}", stderr(&check));
    eprintln!("suggestion:\n{suggestion}\npolicy check: {}", stdout(&check).trim());

    // 3. Enforce with both: the observed flows connect, their neighbours stay blocked.
    let mut options = AgentOptions::for_node(t.node(), &base, "enforce");
    options.policies.push(suggested.clone());
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    assert!(tcp(&t, "intruder", db(t.ipv4("db")), WAIT), "the observed flow connects\n{suggestion}");
    assert!(tcp(&t, "intruder", db(t.ipv6("db")), WAIT), "the observed flow connects over IPv6\n{suggestion}");
    assert!(ping(t.ns("intruder"), t.ipv4("api"), WAIT), "the observed ping passes\n{suggestion}");
    wait_for(
        &agent,
        &[
            ("verdict", "allow"),
            ("src.identity", "intruder"),
            ("dst.identity", "db"),
            ("rule", "suggested-db/ingress/0"),
        ],
    );
    assert!(
        !tcp(&t, "intruder", SocketAddr::new(t.ipv4("api"), 8080), BLOCKED),
        "intruder → api:8080 was never observed"
    );
    wait_for(
        &agent,
        &[("verdict", "deny"), ("reason", "default-deny"), ("src.identity", "intruder"), ("dst.identity", "api")],
    );
    assert!(!tcp(&t, "db", SocketAddr::new(t.ipv4("intruder"), 5432), BLOCKED), "the observed flow reversed");
    assert!(!ping(t.ns("intruder"), t.ipv6("api"), BLOCKED), "ICMPv6 echo was never observed");
    assert!(!ping(t.ns("intruder"), t.ipv4("db"), BLOCKED), "intruder → db allows tcp/5432, not ping");
    // What the base allowed still passes.
    assert!(tcp(&t, "web", SocketAddr::new(t.ipv4("api"), 8080), WAIT));
    drop(servers);
}

#[test]
fn suggest_prints_rules_and_names_the_lines_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let audit = |src: &str, dst: &str, port: u16| {
        serde_json::json!({
            "kind": "flow", "verdict": "audit", "mode": "monitor", "reason": "default-deny", "protocol": "tcp",
            "src": {"ip": "10.20.9.2", "port": 40000, "identity": src},
            "dst": {"ip": "10.20.3.2", "port": port, "identity": dst},
        })
        .to_string()
    };
    fs::write(&events, format!("{}\n{}\n", audit("intruder", "db", 5432), audit("intruder", "db", 5433))).unwrap();
    let base = fixture("topology.yaml");
    let output = run(&["policy", "suggest", "--from", path_str(&events), "--policy", path_str(&base)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("        - {protocol: tcp, port: \"5432-5433\"}  # 2 events\n"),
        "{}",
        stdout(&output)
    );
    let alone = run(&["policy", "suggest", "--from", path_str(&events)]);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert!(stdout(&alone).contains("# Without --policy"), "{}", stdout(&alone));

    fs::write(&events, format!("{}\n{}\n", audit("intruder", "db", 5432), audit("ghost", "db", 1))).unwrap();
    let unknown = run(&["policy", "suggest", "--from", path_str(&events), "--policy", path_str(&base)]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(stdout(&unknown), "");
    let message = stderr(&unknown);
    assert!(
        message.starts_with(&format!(
            "zt-agent: {}:2: identity \"ghost\" is not declared in the policy",
            events.display()
        )),
        "{message}"
    );

    fs::write(&events, format!("{}\nnot json\n", audit("intruder", "db", 5432))).unwrap();
    let malformed = run(&["policy", "suggest", "--from", path_str(&events)]);
    assert_eq!(malformed.status.code(), Some(1));
    assert_eq!(
        stderr(&malformed).trim(),
        format!("zt-agent: {}:2: not a JSON event: expected ident (column 2)", events.display())
    );
}

/// `zt-agent policy check … | head` ends quietly when the reader has gone, as command-line
/// tools do.
#[test]
fn a_command_whose_reader_has_gone_ends_without_a_panic() {
    use std::os::unix::process::ExitStatusExt as _;
    // A pipe whose reader is closed before the command starts: its first write finds no one.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/demo.yaml");
    let output = std::process::Command::new(zt_tests::agent_bin().unwrap())
        .args(["policy", "check", path_str(&demo)])
        .stdout(writer)
        .output()
        .unwrap();
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    assert_eq!(output.status.signal(), Some(nix::sys::signal::Signal::SIGPIPE as i32), "{}", stderr(&output));
}

#[test]
fn policy_check_refuses_devices_fifos_and_oversized_files_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let huge = dir.path().join("huge.yaml");
    std::fs::write(&huge, "# padding\n".repeat(500_000)).unwrap();
    for (path, says) in [
        (Path::new("/dev/zero"), "not a regular file (a character device)"),
        (fifo.as_path(), "not a regular file (a FIFO)"),
        (huge.as_path(), "it is 4.8 MiB; the limit is 4 MiB"),
    ] {
        let output = run(&["policy", "check", path_str(path)]);
        assert!(!output.status.success(), "{}", path.display());
        assert!(stderr(&output).contains(says), "{}: {}", path.display(), stderr(&output));
    }
}

#[test]
fn import_k8s_writes_policy_that_loads_and_names_the_field_it_cannot_express() {
    use zt_agent::policy::import_k8s::truth_table::Table;

    let dir = tempfile::tempdir().unwrap();
    let table = Table::load();
    let documented = dir.path().join("documented.yaml");
    fs::write(&documented, &table.cases[0].policies).unwrap();
    let imported = dir.path().join("imported.yaml");
    let output = run(&["policy", "import-k8s", path_str(&documented), "--output", path_str(&imported)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    let yaml = fs::read_to_string(&imported).unwrap();
    assert!(yaml.contains("metadata: {name: k8s.default.test-network-policy}\n"), "{yaml}");
    let check = run(&["policy", "check", path_str(&imported)]);
    assert!(check.status.success(), "{}{}\n{yaml}", stdout(&check), stderr(&check));
    let to_stdout = run(&["policy", "import-k8s", path_str(&documented)]);
    assert!(to_stdout.status.success(), "{}", stderr(&to_stdout));
    assert_eq!(stdout(&to_stdout), yaml);

    let unexpressible = dir.path().join("sts.yaml");
    fs::write(
        &unexpressible,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-0, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {statefulset.kubernetes.io/pod-name: web-0}}}\n",
    )
    .unwrap();
    let refused = run(&["policy", "import-k8s", path_str(&documented), path_str(&unexpressible)]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(stdout(&refused), "", "nothing is written when anything is refused");
    assert!(
        stderr(&refused).starts_with(&format!(
            "zt-agent: {}: document 1 (web-0): spec.podSelector: selects on \"statefulset.kubernetes.io/pod-name\"",
            unexpressible.display()
        )),
        "{}",
        stderr(&refused)
    );
}
