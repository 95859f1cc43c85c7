//! The agent's sinks against real receivers: rsyslog over UDP, TCP and TLS (RFC 5424, octet
//! counting, RFC 5425), OCSF and CEF files, a receiver restart, and `zt-agent flows`. Needs root
//! and rsyslog (`cargo xtask setup`); fails, never skips.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;
use zt_tests::{
    agent_bin, ensure_root, tcp_connect, tcp_server, Agent, AgentOptions, Received, Rsyslog, RsyslogInputs, Server,
    TlsFiles, Topology, TopologySpec,
};

const WAIT: Duration = Duration::from_secs(2);
const ARRIVAL: Duration = Duration::from_secs(20);
const UDP_PORT: u16 = 5514;
const TCP_PORT: u16 = 5515;
const TLS_PORT: u16 = 6514;

fn policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/topology.yaml")
}

fn topology() -> Topology {
    ensure_root().unwrap();
    Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2).workload("db", 3).workload("intruder", 9))
        .expect("building the test topology")
}

fn servers(t: &Topology) -> Vec<Server> {
    vec![
        tcp_server(t.ns("api"), SocketAddr::new(t.ipv4("api"), 8080)).unwrap(),
        tcp_server(t.ns("db"), SocketAddr::new(t.ipv4("db"), 5432)).unwrap(),
    ]
}

fn agent(t: &Topology, mode: &str, sinks: &[String]) -> Agent {
    let mut options = AgentOptions::for_node(t.node(), policy(), mode);
    for sink in sinks {
        options.extra_args.extend(["--sink".to_owned(), sink.clone()]);
    }
    Agent::start(t.node().ns(), &options).unwrap()
}

/// Connects from `from` to `to`:`port` (the attempt is what matters, not whether it succeeds).
fn attempt(t: &Topology, from: &str, to: &str, port: u16) {
    let _ = tcp_connect(t.ns(from), SocketAddr::new(t.ipv4(to), port), WAIT);
}

fn until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn flow_event(agent: &Agent, verdict: &str, src: &str, dst: &str, port: u16) -> Value {
    agent
        .wait_for_event(
            |e| e["kind"] == "flow" && e["verdict"] == verdict && e["src"]["identity"] == src && e["dst"]["identity"] == dst && e["dst"]["port"] == port,
            ARRIVAL,
        )
        .unwrap_or_else(|| panic!("no {verdict} event {src}→{dst}:{port}; events: {:#?}\n{}", agent.events(), agent.stderr()))
}

/// The sink's entry in `zt-agent status --json`.
fn sink_stats(agent: &Agent, name: &str) -> Value {
    let status = agent.status().unwrap();
    status["sinks"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_else(|| panic!("no sink {name}: {status:#}"))
}

/// The message of `received` whose MSG is `event`.
fn message_of<'a>(received: &'a [Received], event: &Value) -> Option<&'a Received> {
    received.iter().find(|r| serde_json::from_str::<Value>(&r.msg).ok().as_ref() == Some(event))
}

/// A CA and the receiver's certificate for `localhost`, as files in `dir`.
fn tls_files(dir: &Path) -> TlsFiles {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let files = TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("receiver.pem"), key: dir.join("receiver.key") };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

/// The attributes OCSF 1.1.0 requires of a Network Activity event (class 4001), with the ones
/// its objects require: base event (activity_id, category_uid, class_uid, metadata, severity_id,
/// time, type_uid), metadata (product, version), product (vendor_name), the network class's
/// endpoints, and connection_info (direction_id).
const OCSF_REQUIRED: [&str; 12] = [
    "activity_id",
    "category_uid",
    "class_uid",
    "type_uid",
    "severity_id",
    "time",
    "metadata.version",
    "metadata.product.vendor_name",
    "src_endpoint",
    "dst_endpoint",
    "connection_info.direction_id",
    "metadata.product",
];

fn field<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(value, |v, key| &v[key])
}

#[test]
fn events_reach_rsyslog_over_udp_tcp_and_tls_and_files_hold_ocsf_and_cef() {
    let t = topology();
    let _servers = servers(&t);
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_files(dir.path());
    let rsyslog = Rsyslog::start(
        t.node().ns(),
        RsyslogInputs { udp: Some(UDP_PORT), tcp: Some(TCP_PORT), tls: Some((TLS_PORT, tls.clone())) },
    )
    .unwrap();
    let ocsf_file = dir.path().join("ocsf.jsonl");
    let cef_file = dir.path().join("cef.log");
    let agent = agent(
        &t,
        "monitor",
        &[
            "json:stdout".into(),
            format!("syslog+udp://127.0.0.1:{UDP_PORT}"),
            format!("syslog+tcp://127.0.0.1:{TCP_PORT}"),
            format!("syslog+tls://127.0.0.1:{TLS_PORT},ca={},server-name=localhost", tls.ca.display()),
            format!("ocsf:file={}", ocsf_file.display()),
            format!("cef:file={},verdicts=audit", cef_file.display()),
        ],
    );
    attempt(&t, "intruder", "db", 5432);
    attempt(&t, "web", "api", 8080);
    let audit = flow_event(&agent, "audit", "intruder", "db", 5432);
    let allow = flow_event(&agent, "allow", "web", "api", 8080);

    for input in ["udp", "tcp", "tls"] {
        let received = until(&format!("both events over {input}"), ARRIVAL, || {
            let received = rsyslog.received(input);
            (message_of(&received, &audit).is_some() && message_of(&received, &allow).is_some()).then_some(received)
        });
        let message = message_of(&received, &audit).unwrap();
        // rsyslog read the event's own time, to the microsecond.
        let time = audit["time"].as_str().unwrap();
        println!("{input} message as rsyslog parsed it: {message:?}\n{input} raw: {}", message.raw);
        assert!(message.raw.starts_with(&format!("<133>1 {}Z node-a zt-agent ", &time[..26])), "{}", message.raw);
        // local0 (16) × 8 + notice (5) for an audit.
        assert_eq!(message.pri, 133, "{message:?}");
        assert_eq!(message.version, "1");
        assert_eq!(message.hostname, t.node().name());
        assert_eq!((message.app_name.as_str(), message.msgid.as_str()), ("zt-agent", "flow"));
        assert_eq!(message.procid, agent.pid().to_string());
        assert!(message.timestamp.starts_with(&time[..26]), "{} vs {time}", message.timestamp);
        for param in ["[zt@32473 ", "verdict=\"audit\"", "src.identity=\"intruder\"", "dst.port=\"5432\"", "policy=\"default-deny\""] {
            assert!(message.structured_data.contains(param), "{param} in {}", message.structured_data);
        }
        let allowed = message_of(&received, &allow).unwrap();
        assert_eq!(allowed.pri, 134, "allowed flows are informational");
        assert!(allowed.structured_data.contains("rule=\"api/ingress/0\""), "{allowed:?}");
    }

    let ocsf: Vec<Value> = until("both events in the OCSF file", ARRIVAL, || {
        let lines: Vec<Value> = std::fs::read_to_string(&ocsf_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines.len() >= 2).then_some(lines)
    });
    for event in &ocsf {
        for required in OCSF_REQUIRED {
            assert!(!field(event, required).is_null(), "OCSF requires {required}: {event:#}");
        }
        assert_eq!(event["class_uid"], 4001);
        assert_eq!(event["category_uid"], 4);
        assert_eq!(event["type_uid"].as_u64().unwrap(), 400100 + event["activity_id"].as_u64().unwrap());
    }
    let ocsf_audit = ocsf.iter().find(|e| e["unmapped"]["zt"]["verdict"] == "audit").expect("the audit in OCSF");
    println!("OCSF: {ocsf_audit}");
    assert_eq!(ocsf_audit["src_endpoint"]["ip"], audit["src"]["ip"]);
    assert_eq!(ocsf_audit["dst_endpoint"]["port"], 5432);
    assert_eq!((ocsf_audit["action_id"].as_u64(), ocsf_audit["disposition_id"].as_u64()), (Some(1), Some(1)));
    assert_eq!(ocsf_audit["connection_info"]["protocol_num"], 6);
    assert_eq!(ocsf_audit["unmapped"]["zt"]["src_identity"], "intruder");

    let cef = until("the audit in the CEF file", ARRIVAL, || {
        std::fs::read_to_string(&cef_file).ok().filter(|text| text.contains("act=audit"))
    });
    println!("CEF: {cef}");
    assert_eq!(cef.lines().count(), 1, "verdicts=audit keeps the allowed flow out: {cef}");
    let line = cef.lines().next().unwrap();
    assert!(line.starts_with("CEF:0|zt|zt-agent|"), "{line}");
    for part in ["|audit:default-deny|", " cs1=intruder ", " cs2=db ", " dpt=5432 ", " proto=TCP "] {
        assert!(line.contains(part), "{part} in {line}");
    }
    // Agent events take the same way: a reload's outcome reaches rsyslog as MSGID policy.
    agent.request_reload().unwrap();
    let reload = agent.wait_for_event(|e| e["kind"] == "policy", ARRIVAL).expect("a policy event after SIGHUP");
    let received = until("the policy event over tcp", ARRIVAL, || message_of(&rsyslog.received("tcp"), &reload).cloned());
    println!("policy raw: {}", received.raw);
    assert_eq!((received.msgid.as_str(), received.pri), ("policy", 133), "{received:?}");
    // The same files: nothing to switch, and the event says so.
    assert!(received.structured_data.contains("result=\"unchanged\""), "{received:?}");
    assert!(!std::fs::read_to_string(&ocsf_file).unwrap().contains("\"kind\":\"policy\""), "OCSF carries flows only");

    let tcp = sink_stats(&agent, &format!("syslog+tcp://127.0.0.1:{TCP_PORT}"));
    assert_eq!((tcp["dropped"].as_u64(), tcp["connected"].as_bool()), (Some(0), Some(true)), "{tcp:#}");
}

#[test]
fn a_restarted_receiver_gets_what_fit_in_the_queue_and_the_rest_is_counted() {
    const QUEUE: u64 = 4;
    const DURING_OUTAGE: u16 = 12;
    let t = topology();
    let _servers = servers(&t);
    let mut rsyslog = Rsyslog::start(t.node().ns(), RsyslogInputs { tcp: Some(TCP_PORT), ..Default::default() }).unwrap();
    // Flows concerning db only, so nothing else (an IPv6 multicast report, say) takes a place.
    let agent = agent(
        &t,
        "monitor",
        &["json:stdout".into(), format!("syslog+tcp://127.0.0.1:{TCP_PORT},queue={QUEUE},identity=db,name=siem")],
    );
    // The sink takes db's flows and every agent event (its start, identities, reloads).
    let offered = || {
        agent
            .events()
            .into_iter()
            .filter(|e| e["kind"] != "flow" || e["src"]["identity"] == "db" || e["dst"]["identity"] == "db")
            .collect::<Vec<_>>()
    };

    attempt(&t, "intruder", "db", 5432);
    let before = flow_event(&agent, "audit", "intruder", "db", 5432);
    until("the first event in rsyslog", ARRIVAL, || message_of(&rsyslog.received("tcp"), &before).map(|_| ()));

    rsyslog.stop();
    until("the sink to see the receiver gone", ARRIVAL, || (sink_stats(&agent, "siem")["connected"] == false).then_some(()));
    // Each attempt to a closed port is a new flow, audited once.
    for _ in 0..DURING_OUTAGE {
        attempt(&t, "intruder", "db", 7001);
    }
    let outage = until("the outage's events on stdout", ARRIVAL, || {
        let outage: Vec<Value> = offered().into_iter().filter(|e| e["dst"]["port"] == 7001).collect();
        (outage.len() >= DURING_OUTAGE as usize).then_some(outage)
    });
    until("the queue to fill", ARRIVAL, || {
        let stats = sink_stats(&agent, "siem");
        (stats["queued"].as_u64().unwrap() + stats["dropped"].as_u64().unwrap() == outage.len() as u64).then_some(())
    });

    rsyslog.restart().unwrap();
    let stats = until("the queue to drain", ARRIVAL, || {
        let stats = sink_stats(&agent, "siem");
        (stats["connected"] == true && stats["queued"] == 0).then_some(stats)
    });
    let offered = offered();
    let delivered = stats["delivered"].as_u64().unwrap();
    let dropped = stats["dropped"].as_u64().unwrap();
    let received = until("rsyslog to write what was delivered", ARRIVAL, || {
        let received = rsyslog.received("tcp");
        (received.len() as u64 >= delivered).then_some(received)
    });
    let arrived: Vec<Value> = received.iter().map(|r| serde_json::from_str(&r.msg).unwrap()).collect();
    println!("after the restart: {stats}");

    assert_eq!(delivered + dropped, offered.len() as u64, "every event offered is delivered or counted as dropped: {stats:#}");
    assert_eq!(arrived.len() as u64, delivered, "rsyslog has exactly what the sink delivered: {stats:#}");
    assert!(arrived.iter().all(|event| offered.contains(event)), "only the agent's events arrive");
    let distinct: HashSet<String> = arrived.iter().map(Value::to_string).collect();
    assert_eq!(distinct.len(), arrived.len(), "nothing arrives twice");
    let arrived_from_outage = arrived.iter().filter(|e| e["dst"]["port"] == 7001).count() as u64;
    assert_eq!(arrived_from_outage, QUEUE, "what fit in the queue during the outage arrived after it: {stats:#}");
    assert_eq!(dropped, outage.len() as u64 - QUEUE, "the rest of the outage was dropped and counted: {stats:#}");
    assert!(stats["reconnects"].as_u64().unwrap() >= 1, "{stats:#}");
}

/// Runs `zt-agent flows` with `args` against the agent; its stdout.
fn flows(agent: &Agent, args: &[&str]) -> String {
    let output = Command::new(agent_bin().unwrap())
        .arg("flows")
        .args(args)
        .arg("--socket")
        .arg(agent.socket())
        .output()
        .unwrap();
    assert!(output.status.success(), "zt-agent flows {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn zt_agent_flows_shows_recent_and_live_events_of_the_running_agent() {
    let t = topology();
    let _servers = servers(&t);
    let agent = agent(&t, "enforce", &[]);
    attempt(&t, "intruder", "db", 5432);
    let deny = flow_event(&agent, "deny", "intruder", "db", 5432);

    let recent: Vec<Value> = flows(&agent, &["--json", "--verdict", "deny"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(recent.contains(&deny), "recent denials include {deny:#}: {recent:#?}");
    assert!(recent.iter().all(|e| e["verdict"] == "deny"));
    assert!(flows(&agent, &["--json", "--identity", "web"]).lines().all(|l| l.contains("\"web\"")), "only web's flows");
    let human = flows(&agent, &["--identity", "intruder"]);
    let line = human.lines().find(|l| l.contains(":5432")).unwrap_or_else(|| panic!("{human}"));
    println!("zt-agent flows: {line}");
    assert!(line.contains(" deny ") && line.contains("intruder 10.20.9.") && line.contains("-> db 10.20.3."), "{line}");

    let mut follower = Command::new(agent_bin().unwrap())
        .args(["flows", "--follow", "--json", "--identity", "db", "--socket"])
        .arg(agent.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    attempt(&t, "intruder", "db", 7002);
    let live = flow_event(&agent, "deny", "intruder", "db", 7002);
    let deadline = Instant::now() + ARRIVAL;
    let streamed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("the live event reaches `zt-agent flows --follow`");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["dst"]["port"] == 7002 {
            break event;
        }
    };
    assert_eq!(streamed, live);
    follower.kill().unwrap();
    follower.wait().unwrap();
    reader.join().unwrap();
    let clients = sink_stats(&agent, "flows");
    assert!(clients["delivered"].as_u64().unwrap() >= 1, "{clients:#}");
}
