//! `cargo xtask demo`: a small cluster in network namespaces, the agent watching it in monitor
//! mode, then enforcing the same policy without a restart.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use zt_tests::{tcp_connect, tcp_server, Agent, Topology, TopologySpec};

use crate::{agent_bin, build_agent, setup, workspace_root};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Events arrive asynchronously from the agent's ring-buffer reader.
const EVENT_TIMEOUT: Duration = Duration::from_secs(3);

struct Attempt {
    client: &'static str,
    server: &'static str,
    port: u16,
    allowed_by_policy: bool,
    story: &'static str,
}

const ATTEMPTS: [Attempt; 4] = [
    Attempt { client: "web", server: "api", port: 8080, allowed_by_policy: true, story: "the web tier calls the API" },
    Attempt { client: "api", server: "db", port: 5432, allowed_by_policy: true, story: "the API queries its database" },
    Attempt {
        client: "reports",
        server: "api",
        port: 8080,
        allowed_by_policy: true,
        story: "a job on node-b calls the API over the uplink",
    },
    Attempt {
        client: "intruder",
        server: "db",
        port: 5432,
        allowed_by_policy: false,
        story: "a compromised workload probes the database",
    },
];

/// One TCP connection tried in a phase.
struct Flow {
    label: String,
    client: IpAddr,
    server: IpAddr,
    port: u16,
}

/// Set by the Ctrl-C handler, which tears everything down and exits with 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run() -> Result<()> {
    zt_tests::ensure_root()?;
    // The testbed finds the agent the way the tests do. Set before any other thread exists.
    std::env::set_var(zt_tests::agent::AGENT_BIN_ENV, agent_bin());
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: stopping the agent and deleting the demo namespaces");
        zt_tests::cleanup_all();
        std::process::exit(130);
    })
    .context("install the Ctrl-C handler")?;
    let result = guided_run();
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The interrupt probably made this run fail (e.g. the agent got SIGINT too): let the
        // handler's teardown finish instead of exiting under it.
        zt_tests::cleanup_all();
        std::process::exit(130);
    }
    result
}

fn guided_run() -> Result<()> {
    let policy = workspace_root().join("policies/demo.yaml");
    ensure!(policy.is_file(), "{} is missing", policy.display());

    heading("Preparing: toolchain check and agent build");
    setup::run()?;
    build_agent()?;
    let started = Instant::now();

    heading("1. A two-node cluster made of network namespaces");
    println!("Each workload is a namespace with one veth into its node, like a pod. zt attaches");
    println!("to the node side of those veths, so workloads need no change.");
    let topo = Topology::new(
        TopologySpec::new()
            .workload("web", 1)
            .workload("api", 2)
            .workload("db", 3)
            .workload("intruder", 9)
            .remote_workload("reports", 1),
    )?;
    for workload in topo.workloads() {
        println!(
            "  {:<9} {:<10} {:<13} on {} via {}",
            workload.name(),
            workload.ipv4(),
            workload.ipv6(),
            workload.node_name(),
            workload.node_interface()
        );
    }
    println!("  node-a and node-b are joined by uplink0 (10.99.0.0/24, fd00:99::/64).");
    let mut servers = Vec::new();
    for (name, port) in [("api", 8080), ("db", 5432)] {
        for ip in [topo.ipv4(name), topo.ipv6(name)] {
            servers.push(tcp_server(topo.ns(name), SocketAddr::new(ip, port))?);
        }
    }
    println!("  api listens on tcp/8080 and db on tcp/5432 (IPv4 and IPv6); both echo what they get.");

    heading("2. zt-agent on node-a, in monitor mode");
    println!("It compiles policies/demo.yaml into eBPF maps, attaches TC programs to every lxc-* veth");
    println!("and an XDP program to uplink0, and prints one JSON event per flow verdict.");
    println!("Monitor mode drops nothing: what enforce mode would drop is reported as `audit`.");
    let agent = Agent::start_on(topo.node(), &policy, "monitor")?;

    heading("3. Phase 1: monitor");
    println!("Each client connects over IPv4 and IPv6, sends a few bytes and waits for the echo, so a");
    println!("success proves both directions.");
    let mut surprises = attempt_all(&topo, &agent, "monitor");
    println!("Everything connected. The intruder's flow is `audit`: no policy allows it, so enforce");
    println!("mode would drop it.");

    heading("4. Phase 2: enforce");
    println!("Switching the running agent with `zt-agent mode enforce`: one map write, no restart.");
    agent.set_mode("enforce")?;
    surprises += attempt_all(&topo, &agent, "enforce");
    println!("Allowed flows still connect. The intruder's SYNs are dropped where the table says;");
    println!("TCP retries, and each retry is judged (and reported) again.");
    if let Some(deny) = agent.events().iter().find(|event| event["verdict"] == "deny") {
        println!("\nThe first deny, as the agent printed it on stdout (one JSON object per line):");
        println!("{deny}");
    }

    heading("5. Teardown");
    drop(agent);
    drop(servers);
    drop(topo);
    println!("Agent stopped, namespaces deleted ({:.0?} since the build finished).", started.elapsed());
    ensure!(surprises == 0, "{surprises} attempt(s) did not end as expected (marked above)");
    Ok(())
}

/// Tries every attempt over IPv4 and IPv6, prints the outcomes, then the agent's events for
/// them. Returns how many outcomes differ from what `mode` should give.
fn attempt_all(topo: &Topology, agent: &Agent, mode: &str) -> usize {
    let first_event = agent.events().len();
    let mut surprises = 0;
    let mut flows = Vec::new();
    for attempt in &ATTEMPTS {
        let expect_connected = attempt.allowed_by_policy || mode == "monitor";
        let label = format!("{} → {}:{}", attempt.client, attempt.server, attempt.port);
        let mut outcomes = String::new();
        for (family, client_ip, server_ip) in [
            ("IPv4", topo.ipv4(attempt.client), topo.ipv4(attempt.server)),
            ("IPv6", topo.ipv6(attempt.client), topo.ipv6(attempt.server)),
        ] {
            let server = SocketAddr::new(server_ip, attempt.port);
            let connected = tcp_connect(topo.ns(attempt.client), server, CONNECT_TIMEOUT).is_ok();
            outcomes += &format!("  {family} {}", if connected { "✓ connected" } else { "✗ blocked  " });
            if connected != expect_connected {
                surprises += 1;
                outcomes += " (unexpected!)";
            }
            flows.push(Flow {
                label: format!("{label} {family}"),
                client: client_ip,
                server: server_ip,
                port: attempt.port,
            });
        }
        println!("  {label:<21}{outcomes}   ({})", attempt.story);
    }

    // Wait until each flow was reported in this mode, then show this phase's events for them.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut unreported = Vec::new();
    for flow in &flows {
        let left = deadline.saturating_duration_since(Instant::now());
        if agent.wait_for_event(|event| event["mode"] == mode && is_event_of(event, flow), left).is_none() {
            unreported.push(flow.label.as_str());
        }
    }
    println!("\n  What the agent reported:");
    println!("  {:<7} {:<13} {:<29} {:<13} where", "verdict", "reason", "flow (identities)", "policy");
    let events = agent.events();
    for event in events[first_event..].iter().filter(|event| flows.iter().any(|flow| is_event_of(event, flow))) {
        let family = if text(&event["src"]["ip"]).contains(':') { "IPv6" } else { "IPv4" };
        let flow = format!(
            "{} → {}:{} {family}",
            text(&event["src"]["identity"]),
            text(&event["dst"]["identity"]),
            event["dst"]["port"]
        );
        println!(
            "  {:<7} {:<13} {flow:<29} {:<13} {} on {}",
            text(&event["verdict"]),
            text(&event["reason"]),
            text(&event["policy"]),
            text(&event["hook"]),
            text(&event["interface"]),
        );
    }
    if !unreported.is_empty() {
        println!("  (no {mode} event within {EVENT_TIMEOUT:?} for: {})", unreported.join(", "));
    }
    println!();
    surprises
}

fn is_event_of(event: &Value, flow: &Flow) -> bool {
    let ip = |endpoint: &Value| endpoint["ip"].as_str().and_then(|ip| ip.parse::<IpAddr>().ok());
    ip(&event["src"]) == Some(flow.client)
        && ip(&event["dst"]) == Some(flow.server)
        && event["dst"]["port"] == flow.port
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

fn heading(title: &str) {
    println!("\n== {title}");
}
