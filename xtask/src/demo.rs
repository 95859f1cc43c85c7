//! `cargo xtask demo`: a small cluster in network namespaces, the agent watching it in monitor
//! mode, then enforcing the same policy without a restart, then a certificate expiring.
//!
//! Most workloads are known by their addresses; a host service is known by its cgroup, and one
//! workload by the X.509 SVID it presents.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::Value;
use tempfile::TempDir;
use time::OffsetDateTime;
use zt_tests::{tcp_connect, tcp_server, Agent, AgentOptions, Cgroup, Topology, TopologySpec};

use crate::{agent_bin, build_agent, cargo, run_checked, setup, workspace_root};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Events arrive asynchronously from the agent's ring-buffer reader.
const EVENT_TIMEOUT: Duration = Duration::from_secs(3);
/// The agent rescans its identity sources every 200 ms.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(5);
const BILLING_ID: &str = "spiffe://demo.zt/ns/billing/sa/billing";

/// Who opens a connection.
#[derive(Clone, Copy)]
enum Client {
    /// A workload, from its own namespace and addresses.
    Workload(&'static str),
    /// A host service on node-a: zt-probe run in node-a's namespace inside the cgroup
    /// `<scope>/<cgroup>`, sending from node-a's address toward the server. `by_cgroup`: an
    /// identity selects that cgroup, so the agent names the cgroup in its events; otherwise it
    /// knows the process only by that address.
    HostService { cgroup: &'static str, by_cgroup: bool },
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Workload(name) | Client::HostService { cgroup: name, .. } => name,
        }
    }
}

struct Attempt {
    client: Client,
    server: &'static str,
    port: u16,
    allowed_by_policy: bool,
    story: &'static str,
}

const ATTEMPTS: [Attempt; 7] = [
    Attempt {
        client: Client::Workload("web"),
        server: "api",
        port: 8080,
        allowed_by_policy: true,
        story: "the web tier calls the API",
    },
    Attempt {
        client: Client::Workload("api"),
        server: "db",
        port: 5432,
        allowed_by_policy: true,
        story: "the API queries its database",
    },
    Attempt {
        client: Client::Workload("reports"),
        server: "api",
        port: 8080,
        allowed_by_policy: true,
        story: "a job on node-b calls the API over the uplink",
    },
    Attempt {
        client: Client::Workload("billing"),
        server: "api",
        port: 8080,
        allowed_by_policy: true,
        story: "a workload on node-b known by its certificate",
    },
    Attempt {
        client: Client::HostService { cgroup: "backup.service", by_cgroup: true },
        server: "db",
        port: 5432,
        allowed_by_policy: true,
        story: "a host service on node-a known by its cgroup",
    },
    Attempt {
        client: Client::HostService { cgroup: "other.service", by_cgroup: false },
        server: "db",
        port: 5432,
        allowed_by_policy: false,
        story: "the same program in another cgroup",
    },
    Attempt {
        client: Client::Workload("intruder"),
        server: "db",
        port: 5432,
        allowed_by_policy: false,
        story: "a compromised workload probes the database",
    },
];

/// Phase 3, while no agent runs: the pinned programs judge as before.
const WHILE_DOWN: [Attempt; 2] = [
    Attempt {
        client: Client::Workload("web"),
        server: "api",
        port: 8080,
        allowed_by_policy: true,
        story: "allowed flows carry on",
    },
    Attempt {
        client: Client::Workload("intruder"),
        server: "db",
        port: 5432,
        allowed_by_policy: false,
        story: "and the intruder stays out",
    },
];

/// Phase 4, once billing's certificate has expired: nothing identifies billing any more.
const AFTER_EXPIRY: [Attempt; 2] = [
    Attempt {
        client: Client::Workload("web"),
        server: "api",
        port: 8080,
        allowed_by_policy: true,
        story: "known by its address: unaffected",
    },
    Attempt {
        client: Client::Workload("billing"),
        server: "api",
        port: 8080,
        allowed_by_policy: false,
        story: "its certificate expired: just an address now",
    },
];

/// One TCP connection tried in a phase, as the agent's events show it.
struct Flow {
    label: String,
    client: IpAddr,
    /// The client's cgroup (`src.cgroup` in events), when that is what identifies it.
    client_cgroup: Option<String>,
    server: IpAddr,
    port: u16,
}

/// Set by the Ctrl-C handler, which tears everything down and exits with 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What the demo created besides the testbed's agents, namespaces and cgroups (which
/// `zt_tests::cleanup_all` removes), in order of creation. Dropping their owners removes them;
/// this list is for the Ctrl-C handler, which exits without running destructors.
static CREATED: Mutex<Vec<Created>> = Mutex::new(Vec::new());

enum Created {
    Dir(PathBuf),
}

pub fn run() -> Result<()> {
    zt_tests::ensure_root()?;
    // The testbed finds the agent the way the tests do. Set before any other thread exists.
    std::env::set_var(zt_tests::agent::AGENT_BIN_ENV, agent_bin());
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: stopping the agent, deleting the demo namespaces and cgroups");
        cleanup();
        std::process::exit(130);
    })
    .context("install the Ctrl-C handler")?;
    let result = guided_run();
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The interrupt probably made this run fail (e.g. the agent got SIGINT too): let the
        // handler's teardown finish instead of exiting under it.
        cleanup();
        std::process::exit(130);
    }
    result
}

fn guided_run() -> Result<()> {
    let policy = workspace_root().join("policies/demo.yaml");
    ensure!(policy.is_file(), "{} is missing", policy.display());

    heading("Preparing: toolchain check, agent and probe build");
    setup::run()?;
    build_agent()?;
    run_checked(
        cargo().args(["build", "--package", "zt-tests", "--bin", "zt-probe"]),
        "see the compiler errors above",
    )?;
    let probe = agent_bin().with_file_name("zt-probe");
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
            .remote_workload("reports", 1)
            .remote_workload("billing", 2),
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
    let services = HostServices::new(&["backup.service", "other.service"])?;
    println!("  Host services on node-a run in cgroups {}/{{backup,other}}.service.", services.scope.relative());
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
    println!("Most identities are address prefixes (`cidr`). Two are not:");
    println!("  backup   processes in a cgroup matching */backup.service (`--cgroup` adds cgroup hooks)");
    println!("  billing  whoever presents an X.509 SVID for {BILLING_ID}");
    println!("           signed by a CA in the agent's trust bundle (`--svid-dir`, `--trust-bundle`)");
    let certificates = Certificates::new()?;
    certificates.bind("billing", &[topo.ipv4("billing"), topo.ipv6("billing")])?;
    certificates
        .present("billing", &certificates.svid(BILLING_ID, -time::Duration::minutes(5), time::Duration::hours(1))?)?;
    println!(
        "The demo made a CA and an SVID for billing valid for one hour, in {}.",
        certificates.dir.path().display()
    );
    let mut options = AgentOptions::for_node(topo.node(), &policy, "monitor");
    options.extra_args = [
        "--cgroup",
        services.scope.relative(),
        "--svid-dir",
        &certificates.svids().display().to_string(),
        "--trust-bundle",
        &certificates.bundle().display().to_string(),
    ]
    .map(str::to_owned)
    .into();
    let mut agent = Agent::start(topo.node().ns(), &options)?;
    let bound = wait_for_identity_event(&agent, "bound")?;
    println!("\n  {}", identity_line(&bound));

    let cluster = Cluster { topo: &topo, services: &services, probe: &probe };
    heading("3. Phase 1: monitor");
    println!("Each client connects over IPv4 and IPv6, sends a few bytes and waits for the echo, so a");
    println!("success proves both directions. The host services run the same program, zt-probe.");
    let mut surprises = cluster.attempt_all(&ATTEMPTS, &agent, "monitor")?;
    println!("Everything connected. `audit` marks what enforce mode would drop: the intruder, and");
    println!("other.service: no identity selects its cgroup, so the agent knows it by the address it");
    println!("sends from, node-a's side of lxc-db. That address lies in db's subnet but is node-a's own,");
    println!("so it is `host` (never db), and no policy lets host reach db.");

    heading("4. Phase 2: enforce");
    println!("Switching the running agent with `zt-agent mode enforce`: one map write, no restart.");
    agent.set_mode("enforce")?;
    surprises += cluster.attempt_all(&ATTEMPTS, &agent, "enforce")?;
    println!("Allowed flows still connect. Denied SYNs are dropped where the table says (other.service's");
    println!("by the cgroup hook, as its socket sends them); TCP retries, and each retry is judged (and");
    println!("reported) again.");
    let intruder_denied = |event: &&Value| event["verdict"] == "deny" && event["src"]["identity"] == "intruder";
    if let Some(deny) = agent.events().iter().find(intruder_denied) {
        println!("\nThe intruder's first deny, as the agent printed it on stdout (one JSON object per line):");
        println!("{deny}");
    }

    heading("5. Phase 3: the agent is killed");
    println!("`kill -9` of the agent. Its maps, programs and links are pinned in");
    println!("{}, so nothing is detached: the programs keep judging with", agent.bpffs_dir().path().display());
    println!("the last policy and mode while no agent runs.");
    agent.kill9();
    surprises += cluster.attempt_without_agent(&WHILE_DOWN)?;
    println!("A new agent started on the same directory adopts that state: its policy is applied as a");
    println!("reload, and each pinned link is switched to its programs in one atomic update.");
    options.mode = None;
    options.bpffs_dir = Some(agent.bpffs_dir().clone());
    drop(agent);
    let agent = Agent::start(topo.node().ns(), &options)?;
    let status = agent.status_json();
    println!(
        "\n  started: {}, generation {} (was {}), {} links adopted, mode {} kept",
        status["start"]["kind"].as_str().unwrap_or("?"),
        status["generation"],
        status["start"]["previous_generation"],
        status["start"]["links_adopted"],
        status["mode"].as_str().unwrap_or("?")
    );
    let while_down = |event: &Value| event["verdict"] == "deny" && event["src"]["identity"] == "intruder";
    if let Some(deny) = agent.wait_for_event(while_down, EVENT_TIMEOUT) {
        println!("\nThe intruder's attempts while no agent ran waited in the pinned ring buffer; the new");
        println!("agent reported them, e.g.:\n{deny}");
    }

    heading("6. Phase 4: certificates expire");
    println!("SVIDs are short-lived: billing must present a renewed one before this one expires. It");
    println!("presents one that expired yesterday instead (written aside, then renamed over).");
    certificates
        .present("billing", &certificates.svid(BILLING_ID, -time::Duration::days(2), -time::Duration::days(1))?)?;
    let revoked = wait_for_identity_event(&agent, "revoked")?;
    println!("\n  {}\n", identity_line(&revoked));
    surprises += cluster.attempt_all(&AFTER_EXPIRY, &agent, "enforce")?;
    println!("billing's addresses are `world` again, which no policy lets in; nothing restarted.");

    heading("7. Teardown");
    drop(agent);
    drop(servers);
    drop(services);
    drop(certificates);
    drop(topo);
    println!(
        "Agent stopped and its pins removed (`zt-agent detach`); namespaces, cgroups and certificates deleted \
         ({:.0?} since the build finished).",
        started.elapsed()
    );
    ensure!(surprises == 0, "{surprises} attempt(s) did not end as expected (marked above)");
    Ok(())
}

/// What the attempts run in.
struct Cluster<'a> {
    topo: &'a Topology,
    services: &'a HostServices,
    probe: &'a Path,
}

impl Cluster<'_> {
    /// Tries every attempt over IPv4 and IPv6, prints the outcomes, then the agent's events for
    /// them. Returns how many outcomes differ from what `mode` should give.
    fn attempt_all(&self, attempts: &[Attempt], agent: &Agent, mode: &str) -> Result<usize> {
        let first_event = agent.events().len();
        let (surprises, flows) = self.try_each(attempts, mode)?;

        // Wait until each flow was reported in this mode, then show this phase's events for them.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let unreported: Vec<&str> = flows
            .iter()
            .filter(|flow| {
                let left = deadline.saturating_duration_since(Instant::now());
                wait_for_new_event(agent, first_event, |event| event["mode"] == mode && is_event_of(event, flow), left)
                    .is_none()
            })
            .map(|flow| flow.label.as_str())
            .collect();
        println!("\n  What the agent reported (each end as identity(how it was identified)):");
        println!("  {:<7} {:<13} {:<42} {:<13} where", "verdict", "reason", "flow", "policy");
        let events = agent.events();
        for event in events[first_event..].iter().filter(|event| flows.iter().any(|flow| is_event_of(event, flow))) {
            let family = if text(&event["src"]["ip"]).contains(':') { "IPv6" } else { "IPv4" };
            let flow =
                format!("{} → {}:{} {family}", endpoint(&event["src"]), endpoint(&event["dst"]), event["dst"]["port"]);
            let place = match event["interface"].as_str() {
                Some(interface) => format!("{} on {interface}", text(&event["hook"])),
                None => text(&event["hook"]).to_owned(),
            };
            println!(
                "  {:<7} {:<13} {flow:<42} {:<13} {place}",
                text(&event["verdict"]),
                text(&event["reason"]),
                text(&event["policy"]),
            );
        }
        if !unreported.is_empty() {
            println!("  (no {mode} event within {EVENT_TIMEOUT:?} for: {})", unreported.join(", "));
        }
        println!();
        Ok(surprises)
    }

    /// One TCP echo round trip from `client` to `server`; whether it succeeded.
    /// Like [`attempt_all`](Self::attempt_all) in enforce mode, with no agent to report events.
    fn attempt_without_agent(&self, attempts: &[Attempt]) -> Result<usize> {
        Ok(self.try_each(attempts, "enforce")?.0)
    }

    /// Tries every attempt over IPv4 and IPv6 and prints the outcomes. Returns how many differ
    /// from what `mode` should give, and the flows tried.
    fn try_each(&self, attempts: &[Attempt], mode: &str) -> Result<(usize, Vec<Flow>)> {
        let mut surprises = 0;
        let mut flows = Vec::new();
        for attempt in attempts {
            let expect_connected = attempt.allowed_by_policy || mode == "monitor";
            let label = format!("{} → {}:{}", attempt.client.name(), attempt.server, attempt.port);
            let mut outcomes = String::new();
            for (family, server_ip) in
                [("IPv4", self.topo.ipv4(attempt.server)), ("IPv6", self.topo.ipv6(attempt.server))]
            {
                let connected = self.connect(attempt.client, SocketAddr::new(server_ip, attempt.port))?;
                // The Ctrl-C handler may have killed the client and deleted its namespace: that is no
                // outcome to print.
                ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                outcomes += &format!("  {family} {}", if connected { "✓ connected" } else { "✗ blocked  " });
                if connected != expect_connected {
                    surprises += 1;
                    outcomes += " (unexpected!)";
                }
                let (client, client_cgroup) = match attempt.client {
                    Client::Workload(name) => {
                        (if server_ip.is_ipv4() { self.topo.ipv4(name) } else { self.topo.ipv6(name) }, None)
                    }
                    Client::HostService { cgroup, by_cgroup } => {
                        (node_side(server_ip), by_cgroup.then(|| self.services.get(cgroup).relative().to_owned()))
                    }
                };
                flows.push(Flow {
                    label: format!("{label} {family}"),
                    client,
                    client_cgroup,
                    server: server_ip,
                    port: attempt.port,
                });
            }
            println!("  {label:<25}{outcomes}   ({})", attempt.story);
        }
        Ok((surprises, flows))
    }

    fn connect(&self, client: Client, server: SocketAddr) -> Result<bool> {
        match client {
            Client::Workload(name) => Ok(tcp_connect(self.topo.ns(name), server, CONNECT_TIMEOUT).is_ok()),
            Client::HostService { cgroup, .. } => {
                // Through sh only to silence the probe's message about a blocked connection; `exec`
                // keeps the probe itself in the cgroup.
                let probe = self.probe.display().to_string();
                let args = [
                    "-c",
                    r#"exec "$0" "$@" 2>/dev/null"#,
                    &probe,
                    "tcp",
                    &server.to_string(),
                    &CONNECT_TIMEOUT.as_millis().to_string(),
                ];
                self.services.get(cgroup).run(self.topo.node().ns(), Path::new("/bin/sh"), &args)
            }
        }
    }
}

/// The demo's cgroup scope on node-a and its children.
struct HostServices {
    /// Declared before `scope`, so dropped first: a cgroup with children cannot be removed.
    children: Vec<(&'static str, Cgroup)>,
    scope: Cgroup,
}

impl HostServices {
    fn new(names: &[&'static str]) -> Result<Self> {
        // Should a child fail, dropping `services` removes what exists, children first.
        let mut services = HostServices { children: Vec::new(), scope: Cgroup::new_scope()? };
        for &name in names {
            let child = services.scope.child(name)?;
            services.children.push((name, child));
        }
        Ok(services)
    }

    fn get(&self, name: &str) -> &Cgroup {
        &self.children.iter().find(|(child, _)| *child == name).expect("a host service the demo created").1
    }
}

/// The demo's CA (the agent's trust bundle) and the SVID directory where workloads present
/// their certificates (`svids/<workload>/svid.pem` and `bind.yaml`), in a temporary directory.
struct Certificates {
    dir: TempDir,
    ca: Issuer<'static, KeyPair>,
}

impl Certificates {
    fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("zt-demo-certs-").tempdir()?;
        remember(Created::Dir(dir.path().to_owned()));
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "zt demo CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(3);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(1);
        let key = KeyPair::generate()?;
        fs::write(dir.path().join("ca.pem"), params.self_signed(&key)?.pem())?;
        let certificates = Certificates { dir, ca: Issuer::new(params, key) };
        fs::create_dir(certificates.svids())?;
        Ok(certificates)
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn svids(&self) -> PathBuf {
        self.dir.path().join("svids")
    }

    /// Binds what `workload` will present to the addresses it sends from.
    fn bind(&self, workload: &str, addresses: &[IpAddr]) -> Result<()> {
        let dir = self.svids().join(workload);
        fs::create_dir_all(&dir)?;
        let quoted: Vec<String> = addresses.iter().map(|address| format!("\"{address}\"")).collect();
        fs::write(dir.join("bind.yaml"), format!("addresses: [{}]\n", quoted.join(", ")))?;
        Ok(())
    }

    /// An SVID for `spiffe_id`, valid from `not_before` to `not_after` (relative to now).
    fn svid(&self, spiffe_id: &str, not_before: time::Duration, not_after: time::Duration) -> Result<String> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, spiffe_id);
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(spiffe_id)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = OffsetDateTime::now_utc() + not_before;
        params.not_after = OffsetDateTime::now_utc() + not_after;
        Ok(params.signed_by(&KeyPair::generate()?, &self.ca)?.pem())
    }

    /// Presents `pem` as `workload`'s certificate the way a rotation tool must: written aside,
    /// then renamed over, so the agent never reads half a file.
    fn present(&self, workload: &str, pem: &str) -> Result<()> {
        let dir = self.svids().join(workload);
        fs::write(dir.join("svid.pem.new"), pem)?;
        fs::rename(dir.join("svid.pem.new"), dir.join("svid.pem"))?;
        Ok(())
    }
}

/// The agent's next certificate event for billing with `result` (bound, revoked, …).
fn wait_for_identity_event(agent: &Agent, result: &str) -> Result<Value> {
    let matches =
        |event: &Value| event["kind"] == "identity" && event["workload"] == "billing" && event["result"] == result;
    agent.wait_for_event(matches, IDENTITY_TIMEOUT).with_context(|| {
        format!(
            "no `{result}` identity event for billing within {IDENTITY_TIMEOUT:?}; events: {:?}\nagent log:\n{}",
            agent.events().iter().filter(|event| event["kind"] == "identity").collect::<Vec<_>>(),
            agent.stderr()
        )
    })
}

/// A certificate event in one line, e.g. `certificate event: billing bound (verified):
/// 10.30.2.2, fd00:30:2::2 are spiffe://… until …`.
fn identity_line(event: &Value) -> String {
    let addresses: Vec<&str> = event["addresses"].as_array().into_iter().flatten().map(text).collect();
    let head = format!(
        "{} event: {} {} ({}): {}",
        text(&event["source"]),
        text(&event["workload"]),
        text(&event["result"]),
        event["detail"].as_str().unwrap_or(text(&event["reason"])),
        addresses.join(", "),
    );
    match event["result"].as_str() {
        Some("bound" | "rotated") => {
            format!("{head} are {} until {}", text(&event["spiffe_id"]), text(&event["not_after"]))
        }
        _ => format!("{head} are no longer {}", text(&event["spiffe_id"])),
    }
}

/// Polls `agent`'s events from index `first` on until one satisfies `predicate`.
fn wait_for_new_event(
    agent: &Agent,
    first: usize,
    predicate: impl Fn(&Value) -> bool,
    timeout: Duration,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(event) = agent.events().get(first..).into_iter().flatten().find(|event| predicate(event)) {
            return Some(event.clone());
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn is_event_of(event: &Value, flow: &Flow) -> bool {
    let ip = |endpoint: &Value| endpoint["ip"].as_str().and_then(|ip| ip.parse::<IpAddr>().ok());
    ip(&event["src"]) == Some(flow.client)
        && event["src"]["cgroup"].as_str() == flow.client_cgroup.as_deref()
        && ip(&event["dst"]) == Some(flow.server)
        && event["dst"]["port"] == flow.port
}

/// An endpoint as `identity(source)`; reserved identities such as `world` have no source.
fn endpoint(end: &Value) -> String {
    match end["source"].as_str() {
        Some(source) => format!("{}({source})", text(&end["identity"])),
        None => text(&end["identity"]).to_owned(),
    }
}

/// Node-a's own address on the veth toward the workload at `ip`, which host services send from
/// (the testbed gives the node side `.1` / `::1` in the workload's subnets).
fn node_side(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            Ipv4Addr::new(a, b, c, 1).into()
        }
        IpAddr::V6(ip) => {
            let mut segments = ip.segments();
            segments[7] = 1;
            Ipv6Addr::from(segments).into()
        }
    }
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

fn heading(title: &str) {
    println!("\n== {title}");
}

fn remember(created: Created) {
    CREATED.lock().unwrap_or_else(|e| e.into_inner()).push(created);
}

/// Stops the agent, deletes the namespaces and cgroups, and deletes the certificate directory.
/// Whatever is already gone is skipped.
fn cleanup() {
    zt_tests::cleanup_all();
    // Held throughout, so that a concurrent call (handler and main thread) returns only once
    // everything is gone.
    let mut created = CREATED.lock().unwrap_or_else(|e| e.into_inner());
    for item in created.drain(..).rev() {
        match item {
            Created::Dir(path) => {
                let _ = fs::remove_dir_all(path);
            }
        }
    }
}

