//! The Prometheus endpoint of a real agent in a testbed topology, under real traffic: `/metrics`
//! follows what was sent and passes `promtool check metrics`, `/healthz` and `/readyz` answer,
//! and a flood of denied packets is counted exactly, bounded in events, and leaves the agent's
//! memory bounded. The endpoint is scraped on the loopback of the node's namespace, where the
//! agent runs. Needs root, curl and promtool (`cargo xtask setup`); fails, never skips.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use zt_agent::events::limits::EventLimitSettings;
use zt_tests::{ensure_root, http_get, tcp_connect, tcp_server, Agent, AgentOptions, Netns, Topology, TopologySpec};

/// The default `--metrics-addr`, on the node namespace's own loopback.
const METRICS: &str = "127.0.0.1:9090";
const WAIT: Duration = Duration::from_secs(2);
/// How long counters and events get to settle after traffic (a deadline, not an expectation).
const SETTLE: Duration = Duration::from_secs(10);

/// A directory holding the fixture policy, so a test can change the set the agent watches.
fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/metrics.yaml");
    std::fs::copy(fixture, dir.path().join("metrics.yaml")).unwrap();
    dir
}

fn topology() -> Topology {
    ensure_root().unwrap();
    Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2).workload("intruder", 9))
        .expect("building the test topology")
}

fn start(t: &Topology, policy: &Path, event_limits: &[&str]) -> Agent {
    let mut options = AgentOptions::for_node(t.node(), policy, "enforce");
    options.extra_args = event_limits.iter().map(|s| s.to_string()).collect();
    Agent::start(t.node().ns(), &options).unwrap()
}

fn get(t: &Topology, path: &str) -> (u16, String) {
    http_get(t.node().ns(), METRICS.parse().unwrap(), path).unwrap()
}

/// One scrape of `/metrics` (Prometheus text format).
struct Scrape(String);

impl Scrape {
    fn take(t: &Topology) -> Scrape {
        let (status, body) = get(t, "/metrics");
        assert_eq!(status, 200, "{body}");
        Scrape(body)
    }

    /// The sample of `name` with exactly `labels`; a counter series not written yet is 0.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        wanted.sort();
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample {line:?}"));
            let (sample_name, sample_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut got: Vec<String> = sample_labels.split(',').filter(|l| !l.is_empty()).map(str::to_owned).collect();
            got.sort();
            if sample_name == name && got == wanted {
                return value.parse().unwrap_or_else(|_| panic!("{line:?} has no number"));
            }
        }
        assert!(name.ends_with("_total"), "no sample {name}{labels:?} in\n{}", self.0);
        0.0
    }

    fn packets(&self, verdict: &str, reason: &str, direction: &str, hook: &str) -> u64 {
        let labels = [("verdict", verdict), ("reason", reason), ("direction", direction), ("hook", hook)];
        self.value("zt_packets_total", &labels) as u64
    }

    fn events(&self, outcome: &str) -> u64 {
        self.value("zt_flow_events_total", &[("outcome", outcome)]) as u64
    }

    /// Every packet whose verdict raises an event: denied, audited, or newly allowed by a rule.
    fn reported_packets(&self) -> u64 {
        let mut total = 0.0;
        for line in self.0.lines().filter(|l| l.starts_with("zt_packets_total{")) {
            let reported = !line.contains("verdict=\"allow\"") || line.contains("reason=\"policy-allow\"");
            if reported {
                total += line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap();
            }
        }
        total as u64
    }

    fn all_events(&self) -> u64 {
        self.events("emitted") + self.events("suppressed") + self.events("lost")
    }
}

/// Scrapes until `settled` holds (counters catch up with packets still in flight), at most
/// [`SETTLE`]; returns the last scrape either way, for the assertions to judge.
fn scrape_until(t: &Topology, settled: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + SETTLE;
    loop {
        let scrape = Scrape::take(t);
        if settled(&scrape) || Instant::now() >= deadline {
            return scrape;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn promtool_check(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: `cargo xtask setup` installs it (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool check metrics ({}): {said}\n{text}", output.status);
}

/// Sends `count` datagrams of one flow from `ns` to `dst`.
fn udp_datagrams(ns: &Netns, dst: SocketAddr, count: usize) {
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..count {
            socket.send_to(b"zt-metrics-test", dst).unwrap();
        }
    });
}

fn flow_events(agent: &Agent) -> Vec<Value> {
    agent.events().into_iter().filter(|e| e["kind"] == "flow").collect()
}

#[test]
fn metrics_follow_real_traffic_and_pass_promtool() {
    let t = topology();
    let api = SocketAddr::new(t.ipv4("api"), 8080);
    let _server = tcp_server(t.ns("api"), api).unwrap();
    let policy = policy_dir();
    let agent = start(&t, policy.path(), &["--event-window", "1h"]);

    assert_eq!(get(&t, "/healthz"), (200, "ok\n".to_owned()));
    let (status, body) = get(&t, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready: policy generation 1 in force, 6 programs attached"), "{body}");

    let before = Scrape::take(&t);
    for _ in 0..3 {
        tcp_connect(t.ns("web"), api, WAIT).unwrap();
    }
    // 20 datagrams of one flow api's ingress refuses: one event, 19 suppressed by the window.
    let denied = SocketAddr::new(t.ipv4("api"), 5353);
    udp_datagrams(t.ns("intruder"), denied, 20);
    let policy_deny = |s: &Scrape| s.packets("deny", "policy-deny", "ingress", "tc-ingress");
    let after = scrape_until(&t, |s| policy_deny(s) - policy_deny(&before) >= 20 && s.all_events() == s.reported_packets());

    assert_eq!(policy_deny(&after) - policy_deny(&before), 20, "every denied datagram, on the hook and direction that refused it");
    let new_flows = |s: &Scrape| s.packets("allow", "policy-allow", "ingress", "tc-ingress");
    assert_eq!(new_flows(&after) - new_flows(&before), 3, "one policy decision per connection");
    for hook in ["tc-ingress", "tc-egress"] {
        let established = |s: &Scrape| s.packets("allow", "established", "none", hook);
        assert!(established(&after) > established(&before), "replies and later packets pass as established on {hook}");
    }
    assert!(after.events("suppressed") - before.events("suppressed") >= 19);
    assert_eq!(after.all_events(), after.reported_packets(), "every reported packet is emitted, suppressed or lost");

    // The agent printed every event the kernel emitted; the refused flow's only one among them.
    let deadline = Instant::now() + SETTLE;
    let scrape = loop {
        let scrape = Scrape::take(&t);
        if flow_events(&agent).len() as u64 == scrape.events("emitted") || Instant::now() >= deadline {
            break scrape;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let events = flow_events(&agent);
    assert_eq!(events.len() as u64, scrape.events("emitted"), "{events:#?}");
    let refused: Vec<_> = events.iter().filter(|e| e["protocol"] == "udp" && e["src"]["identity"] == "intruder").collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!((refused[0]["reason"].as_str(), refused[0]["suppressed"].as_u64()), (Some("policy-deny"), Some(0)));

    assert_eq!(scrape.value("zt_mode", &[("mode", "enforce")]), 1.0);
    assert_eq!(scrape.value("zt_mode", &[("mode", "monitor")]), 0.0);
    assert_eq!(scrape.value("zt_policy_generation", &[]), 1.0);
    assert_eq!(scrape.value("zt_policy_rules", &[]), 3.0);
    assert_eq!(scrape.value("zt_policy_identities", &[]), 3.0);
    assert!(scrape.value("zt_policy_last_apply_duration_seconds", &[]) > 0.0);
    assert!(scrape.value("zt_map_entries", &[("map", "conntrack")]) >= 3.0, "an entry for each of 3 connections");
    assert!(scrape.value("zt_map_entries", &[("map", "event_flows")]) >= 4.0);
    assert_eq!(scrape.value("zt_map_max_entries", &[("map", "conntrack")]), 262_144.0);
    assert_eq!(scrape.value("zt_map_entries", &[("map", "policy")]), 3.0, "the generation in force only");

    // `status` reads the same counters.
    let status = agent.status().unwrap();
    let by_hook = status["packets_by_hook"].as_array().unwrap();
    let refused_packets = by_hook
        .iter()
        .find(|p| p["reason"] == "policy-deny" && p["hook"] == "tc-ingress")
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(refused_packets["packets"].as_u64(), Some(policy_deny(&after)), "{status:#}");
    assert_eq!(status["events"]["suppressed"].as_u64().map(|n| n >= 19), Some(true), "{status:#}");

    // A reload that changes the policy moves the generation and counts as applied.
    let spare = "apiVersion: zt/v1\nkind: Identity\nmetadata: {name: spare}\nspec: {selectors: [{cidr: 10.99.0.0/24}]}\n";
    std::fs::write(policy.path().join("spare.yaml"), spare).unwrap();
    let reloaded = scrape_until(&t, |s| s.value("zt_policy_generation", &[]) == 2.0);
    assert_eq!(reloaded.value("zt_policy_generation", &[]), 2.0);
    assert_eq!(reloaded.value("zt_policy_reloads_total", &[("result", "applied")]), 1.0);
    assert_eq!(reloaded.value("zt_policy_reloads_total", &[("result", "rejected")]), 0.0);
    assert_eq!(reloaded.value("zt_policy_identities", &[]), 4.0, "the new set is the one counted");

    promtool_check(&reloaded.0);
}

/// `ip -s` statistics of `interface` in `ns`: (direction, counter), e.g. ("tx", "dropped").
fn link_stat(ns: &Netns, interface: &str, direction: &str, counter: &str) -> u64 {
    let output = ns.exec("ip", ["-j", "-s", "link", "show", "dev", interface]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let links: Value = serde_json::from_slice(&output.stdout).unwrap();
    links[0]["stats64"][direction][counter].as_u64().unwrap_or_else(|| panic!("no {direction} {counter} in {links}"))
}

/// Sends denied datagrams from `ns` to `dst`, each to another port (so, other flows), as fast
/// as the socket takes them, for at most `limit` or `max` datagrams; returns how many were sent.
fn flood(ns: &Netns, dst: IpAddr, limit: Duration, max: u64) -> u64 {
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let deadline = Instant::now() + limit;
        let mut sent = 0;
        while sent < max && Instant::now() < deadline {
            for _ in 0..1000 {
                let port = 1000 + (sent % 20_000) as u16;
                // A datagram the veth could not take is not an error for UDP; see tx_dropped.
                if socket.send_to(b"flood", (dst, port)).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    })
}

fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_denied_flood_is_counted_exactly_with_bounded_events_and_memory() {
    let t = topology();
    let (rate, burst) = (100, 100);
    let policy = policy_dir();
    let agent = start(&t, policy.path(), &["--event-rate", &format!("{rate}/s"), "--event-burst", &burst.to_string(), "--event-window", "1s"]);
    let api = t.ipv4("api");
    let policy_deny = |s: &Scrape| s.packets("deny", "policy-deny", "ingress", "tc-ingress");

    // Resolve the gateway first, so that no datagram waits for (or is dropped by) ARP.
    udp_datagrams(t.ns("intruder"), SocketAddr::new(api, 9), 1);
    let before = scrape_until(&t, |s| policy_deny(s) >= 1);
    assert_eq!(policy_deny(&before), 1);
    let dropped_before = link_stat(t.ns("intruder"), "eth0", "tx", "dropped");

    let started = Instant::now();
    let sent = flood(t.ns("intruder"), api, Duration::from_secs(3), 2_000_000);
    let dropped = link_stat(t.ns("intruder"), "eth0", "tx", "dropped") - dropped_before;
    // Packets the veth could not queue never reached the kernel's hooks; every other one did.
    let seen = sent - dropped;
    let after = scrape_until(&t, |s| policy_deny(s) - policy_deny(&before) >= seen && s.all_events() == s.reported_packets());
    let elapsed = started.elapsed();
    eprintln!("flood: {sent} datagrams sent, {dropped} dropped by the veth, in {elapsed:?}");
    assert!(sent > 10_000, "the flood sent only {sent} datagrams");

    assert_eq!(policy_deny(&after) - policy_deny(&before), seen, "every datagram the kernel saw is counted once");
    assert_eq!(after.all_events(), after.reported_packets(), "emitted + suppressed + lost == every denied packet");
    let emitted = after.events("emitted") - before.events("emitted");
    let suppressed = after.events("suppressed") - before.events("suppressed");
    let lost = after.events("lost") - before.events("lost");
    assert!(emitted + suppressed + lost >= seen, "{emitted} + {suppressed} + {lost} < {seen}");
    // Each CPU's bucket: its share of the burst, then one event per interval (measured time).
    let cpus = aya::util::online_cpus().unwrap().len() as u32;
    let per_cpu = EventLimitSettings { window: Duration::from_secs(1), rate, burst }.per_cpu(cpus);
    let bound = u64::from(cpus) * (per_cpu.burst + elapsed.as_nanos() as u64 / per_cpu.interval_ns + 1);
    assert!(emitted <= bound, "{emitted} events emitted, more than the token buckets allow ({bound}) in {elapsed:?}");

    // The agent stayed up and small: the kernel held the flood back, nothing queued up.
    let (status, _) = get(&t, "/healthz");
    assert_eq!(status, 200);
    let (rss, peak) = (memory_kib(agent.pid(), "VmRSS:"), memory_kib(agent.pid(), "VmHWM:"));
    eprintln!("flood: agent VmRSS {rss} KiB, VmHWM {peak} KiB; events {emitted} emitted, {suppressed} suppressed, {lost} lost");
    assert!(peak < 256 * 1024, "the agent's peak resident memory is {peak} KiB");
}
