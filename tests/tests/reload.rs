//! Hot reload on a real topology: policy files rewritten under a running agent in enforce mode,
//! with real connections crossing the switches. Needs root; fails, never skips.
//!
//! The tests here run one at a time (they time connections against reloads, and share two
//! cores), each with its own topology and agent.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use zt_tests::{ensure_root, tcp_connect, tcp_server, Agent, Server, Topology, TopologySpec};


const WAIT: Duration = Duration::from_secs(2);
const BLOCKED: Duration = Duration::from_millis(700);
const EVENT_WAIT: Duration = Duration::from_secs(10);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn topology() -> Topology {
    ensure_root().unwrap();
    Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2)).expect("building the test topology")
}

/// TCP echo servers on api, IPv4, one per port.
fn servers(t: &Topology, ports: &[u16]) -> Vec<Server> {
    ports.iter().map(|&port| tcp_server(t.ns("api"), SocketAddr::new(t.ipv4("api"), port)).unwrap()).collect()
}

/// web and api, default-deny both ways, and web → api allowed (by web's egress and api's
/// ingress) on TCP `ports`.
fn policy_allowing(ports: &[u16]) -> String {
    let items: Vec<String> = ports.iter().map(|port| format!("{{protocol: tcp, port: {port}}}")).collect();
    let items = items.join(", ");
    format!(
        "apiVersion: zt/v1
kind: Identity
metadata: {{name: web}}
spec:
  selectors: [{{cidr: 10.20.1.0/24}}, {{cidr: \"fd00:20:1::/64\"}}]
---
apiVersion: zt/v1
kind: Identity
metadata: {{name: api}}
spec:
  selectors: [{{cidr: 10.20.2.0/24}}, {{cidr: \"fd00:20:2::/64\"}}]
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: default-deny}}
spec: {{subject: [any], ingress: [], egress: []}}
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: web}}
spec:
  subject: [web]
  egress: [{{to: [api], ports: [{items}]}}]
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: api}}
spec:
  subject: [api]
  ingress: [{{from: [web], ports: [{items}]}}]
"
    )
}

/// Replaces `path` the way deployment tools do: written aside, renamed over it.
fn replace_file(path: &Path, text: &str) {
    let aside = path.with_extension("yaml.new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn start(t: &Topology, policy: &Path) -> Agent {
    Agent::start_on(t.node(), policy, "enforce").unwrap()
}

fn tcp(t: &Topology, port: u16, timeout: Duration) -> bool {
    tcp_connect(t.ns("web"), SocketAddr::new(t.ipv4("api"), port), timeout).is_ok()
}

fn is_policy_event(event: &Value, result: &str, generation: u64) -> bool {
    event["kind"] == "policy" && event["result"] == result && event["generation"] == generation
}

fn wait_for_policy_event(agent: &Agent, result: &str, generation: u64) -> Value {
    agent.wait_for_event(|e| is_policy_event(e, result, generation), EVENT_WAIT).unwrap_or_else(|| {
        let policy_events: Vec<Value> = agent.events().into_iter().filter(|e| e["kind"] == "policy").collect();
        panic!("no policy event {result} for generation {generation}\npolicy events: {policy_events:#?}\nagent log:\n{}", agent.stderr())
    })
}

/// One connection attempt of the background traffic.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    port: u16,
    started: Instant,
    ended: Instant,
    connected: bool,
}

/// When each generation was certainly the only one in force: from the moment its `applied`
/// event was seen until just before the next policy file was written.
#[derive(Debug)]
struct Window {
    /// Index into the alternating policies: 0 = A, 1 = B.
    policy: usize,
    from: Instant,
    until: Instant,
}

#[test]
fn a_hundred_reloads_under_traffic_never_let_through_what_neither_generation_allows() {
    let _serial = serial();
    let t = topology();
    // 8080: A allows, B denies; 8081: B allows, A denies; 8082: both allow; 8083: neither.
    const BOTH: u16 = 8082;
    const NEITHER: u16 = 8083;
    let allowed_by = [[8080, BOTH], [8081, BOTH]];
    let policies = [policy_allowing(&allowed_by[0]), policy_allowing(&allowed_by[1])];
    let _servers = servers(&t, &[8080, 8081, BOTH, NEITHER]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, &policies[0]).unwrap();
    let agent = start(&t, &path);
    assert!(tcp(&t, 8080, WAIT) && tcp(&t, BOTH, WAIT), "policy A is in force");

    // New connections to every port, on a thread per port, for as long as the reloads last.
    let stop = AtomicBool::new(false);
    let attempts = Mutex::new(Vec::<Attempt>::new());
    const RELOADS: u64 = 100;
    let mut windows = Vec::new();
    thread::scope(|scope| {
        for port in [8080, 8081, BOTH, NEITHER] {
            // Long enough for an allowed connection on a busy machine; short for one that must
            // never connect, which would do so at once.
            let timeout = match port {
                BOTH => Duration::from_secs(1),
                NEITHER => Duration::from_millis(200),
                _ => Duration::from_millis(400),
            };
            let (stop, attempts, t) = (&stop, &attempts, &t);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let connected = tcp(t, port, timeout);
                    attempts.lock().unwrap().push(Attempt { port, started, ended: Instant::now(), connected });
                    if !connected {
                        // A dropped SYN leaves nothing behind; pace the retries a little.
                        thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }

        let mut in_force_since = Instant::now();
        for reload in 1..=RELOADS {
            // Hold each generation long enough for connections to start and end inside it.
            thread::sleep(Duration::from_millis(450));
            let next = (reload % 2) as usize;
            let written = Instant::now();
            windows.push(Window { policy: 1 - next, from: in_force_since, until: written });
            replace_file(&path, &policies[next]);
            wait_for_policy_event(&agent, "applied", reload + 1);
            in_force_since = Instant::now();
        }
        thread::sleep(Duration::from_millis(450));
        windows.push(Window { policy: (RELOADS % 2) as usize, from: in_force_since, until: Instant::now() });
        stop.store(true, Ordering::Relaxed);
    });

    let attempts = attempts.into_inner().unwrap();
    let mut checked_in_windows = 0;
    for a in &attempts {
        match a.port {
            BOTH => assert!(a.connected, "a connection both generations allow failed: {a:?}"),
            NEITHER => assert!(!a.connected, "a connection neither generation allows got through: {a:?}"),
            port => {
                // Inside one generation's window, the outcome is that generation's.
                if let Some(w) = windows.iter().find(|w| w.from <= a.started && a.ended <= w.until) {
                    let allowed = allowed_by[w.policy].contains(&port);
                    assert_eq!(
                        a.connected, allowed,
                        "port {port} while only policy {} was in force: {a:?}",
                        ["A", "B"][w.policy]
                    );
                    checked_in_windows += 1;
                }
            }
        }
    }
    let count = |port: u16, connected: bool| attempts.iter().filter(|a| a.port == port && a.connected == connected).count();
    eprintln!(
        "{} attempts: 8080 {}+/{}-, 8081 {}+/{}-, both {}, neither {}; {checked_in_windows} judged inside one generation",
        attempts.len(),
        count(8080, true),
        count(8080, false),
        count(8081, true),
        count(8081, false),
        count(BOTH, true),
        count(NEITHER, false),
    );
    assert!(count(BOTH, true) >= 100, "too little traffic to mean anything");
    assert!(count(NEITHER, false) >= 100, "too little traffic to mean anything");
    for port in [8080, 8081] {
        assert!(count(port, true) >= 20 && count(port, false) >= 20, "port {port} saw both generations");
    }
    assert!(checked_in_windows >= 100, "only {checked_in_windows} attempts fell inside one generation");

    // Exactly one applied event per reload, generations 2..=101, and nothing rejected.
    let policy_events: Vec<Value> = agent.events().into_iter().filter(|e| e["kind"] == "policy").collect();
    let applied: Vec<u64> =
        policy_events.iter().filter(|e| e["result"] == "applied").map(|e| e["generation"].as_u64().unwrap()).collect();
    assert_eq!(applied, (2..=RELOADS + 1).collect::<Vec<_>>(), "{policy_events:#?}");
    assert_eq!(policy_events.len() as u64, RELOADS, "{policy_events:#?}");
    let status = agent.status().unwrap();
    assert_eq!((status["generation"].as_u64(), status["reloads"].as_u64()), (Some(RELOADS + 1), Some(RELOADS)));
    assert_eq!(status["reloads_rejected"], 0);
}

#[test]
fn an_invalid_policy_is_rejected_and_the_running_policy_keeps_enforcing() {
    let _serial = serial();
    let t = topology();
    let _servers = servers(&t, &[8080, 8081]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy_allowing(&[8080])).unwrap();
    let agent = start(&t, &path);
    assert!(tcp(&t, 8080, WAIT));
    assert!(!tcp(&t, 8081, BLOCKED));

    // Written in place, over the valid file: a rule naming an identity nobody declared.
    let broken = policy_allowing(&[8081]).replace("to: [api]", "to: [apii]");
    let line = 1 + broken.lines().position(|l| l.contains("apii")).unwrap();
    std::fs::write(&path, &broken).unwrap();
    let rejected = wait_for_policy_event(&agent, "rejected", 1);
    let errors: Vec<&str> = rejected["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    let location = format!("{}:{line}:", path.display());
    assert!(
        errors.len() == 1 && errors[0].starts_with(&location) && errors[0].contains("apii"),
        "the error names file, line and the unknown identity: {rejected:#}"
    );
    assert_eq!(rejected["trigger"], "file-change");
    assert!(agent.stderr().contains(&location), "the log has the error too:\n{}", agent.stderr());

    // Generation 1 stays in force.
    assert!(tcp(&t, 8080, WAIT), "the old policy still allows 8080");
    assert!(!tcp(&t, 8081, BLOCKED), "and still denies 8081");
    let status = agent.status().unwrap();
    assert_eq!(status["generation"], 1, "{status:#}");
    assert_eq!(status["reloads"], 0, "{status:#}");
    assert_eq!(status["reloads_rejected"], 1, "{status:#}");
    assert!(status["last_rejection"].as_str().unwrap().contains(&location), "{status:#}");

    // Fixed, it applies.
    std::fs::write(&path, policy_allowing(&[8081])).unwrap();
    let applied = wait_for_policy_event(&agent, "applied", 2);
    assert_eq!(applied["errors"], Value::Array(Vec::new()));
    assert!(tcp(&t, 8081, WAIT), "the fixed policy allows 8081");
    assert!(!tcp(&t, 8080, BLOCKED), "and no longer 8080");

    // SIGHUP reads the files again; the same policy switches nothing.
    agent.request_reload().unwrap();
    let unchanged = wait_for_policy_event(&agent, "unchanged", 2);
    assert_eq!(unchanged["trigger"], "sighup");
    assert!(tcp(&t, 8081, WAIT));
    let status = agent.status().unwrap();
    assert_eq!((status["generation"].as_u64(), status["reloads"].as_u64()), (Some(2), Some(1)), "{status:#}");
    assert_eq!(status["reloads_rejected"], 1, "{status:#}");
    for event in agent.events().iter().filter(|e| e["kind"] == "policy") {
        assert_eq!(event["node"], t.node().name(), "{event:#}");
        assert!(event["time"].as_str().unwrap().ends_with('Z'), "{event:#}");
    }
}

/// A connection that sends a probe and waits for its echo every 100 ms, on its own thread, until
/// an echo fails (or it is stopped).
struct LongLived {
    /// When each echo came back.
    echoes: Arc<Mutex<Vec<Instant>>>,
    /// When the first echo failed.
    failed: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LongLived {
    fn open(t: &Topology, port: u16) -> LongLived {
        let addr = SocketAddr::new(t.ipv4("api"), port);
        let mut stream = t.ns("web").run(|| TcpStream::connect_timeout(&addr, WAIT)).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let (echoes, failed, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(None)), Arc::new(AtomicBool::new(false)));
        let thread = thread::spawn({
            let (echoes, failed, stop) = (echoes.clone(), failed.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 8];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let ok = stream.write_all(&n.to_be_bytes()).is_ok()
                        && stream.read_exact(&mut buf).is_ok()
                        && buf == n.to_be_bytes();
                    if !ok {
                        *failed.lock().unwrap() = Some(Instant::now());
                        return;
                    }
                    echoes.lock().unwrap().push(Instant::now());
                    thread::sleep(Duration::from_millis(100));
                }
            }
        });
        LongLived { echoes, failed, stop, thread: Some(thread) }
    }

    fn last_echo(&self) -> Option<Instant> {
        self.echoes.lock().unwrap().last().copied()
    }

    fn echoes_after(&self, at: Instant) -> usize {
        self.echoes.lock().unwrap().iter().filter(|e| **e > at).count()
    }

    fn failed(&self) -> Option<Instant> {
        *self.failed.lock().unwrap()
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A Kubernetes ConfigMap volume as kubelet writes it: each version in its own `..<timestamp>`
/// directory, `..data` a symlink to the current one, and the visible files symlinks through
/// `..data`. An update renames a new `..data` over the old one — no visible name changes.
fn configmap_version(dir: &Path, version: &str, policy: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("policy.yaml"), policy).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let visible = dir.join("policy.yaml");
    if visible.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/policy.yaml", visible).unwrap();
    }
}

#[test]
fn a_configmap_update_is_applied_like_any_file_change() {
    let _serial = serial();
    let t = topology();
    let _servers = servers(&t, &[8080, 8081]);
    let dir = tempfile::tempdir().unwrap();
    configmap_version(dir.path(), "2026_11_26_01", &policy_allowing(&[8080]));
    let agent = start(&t, dir.path());
    assert!(tcp(&t, 8080, WAIT));
    assert!(!tcp(&t, 8081, BLOCKED));

    configmap_version(dir.path(), "2026_11_26_02", &policy_allowing(&[8081]));
    let applied = wait_for_policy_event(&agent, "applied", 2);
    assert_eq!(applied["trigger"], "file-change");
    assert!(tcp(&t, 8081, WAIT), "the new version allows 8081");
    assert!(!tcp(&t, 8080, BLOCKED), "and no longer 8080");
}

/// A policy changed while the agent starts (after it read the files, while it loads its
/// programs) is applied once it runs: the files are watched before they are read.
#[test]
fn a_change_made_while_the_agent_starts_is_applied() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let _serial = serial();
    let t = topology();
    let _servers = servers(&t, &[8080, 8081]);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, policy_allowing(&[8080])).unwrap();
    // The moment the agent closes the file it read, the file is replaced: the agent is then
    // still loading its programs, long before it is ready.
    let inotify = Inotify::init(InitFlags::empty()).unwrap();
    inotify.add_watch(&policy, AddWatchFlags::IN_CLOSE_NOWRITE).unwrap();
    let changer = thread::spawn({
        let policy = policy.clone();
        move || {
            inotify.read_events().unwrap();
            replace_file(&policy, &policy_allowing(&[8081]));
        }
    });
    let agent = start(&t, &policy);
    changer.join().unwrap();
    let applied = wait_for_policy_event(&agent, "applied", 2);
    assert_eq!(applied["trigger"], "file-change");
    // The event times the reload's phases, in milliseconds.
    let phases: Vec<&str> = applied["phases_ms"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(phases, ["load", "compile", "stage", "switch"], "{applied:#}");
    assert!(applied["phases_ms"]["load"].as_f64().unwrap() > 0.0, "{applied:#}");
    assert!(tcp(&t, 8081, WAIT), "the changed policy allows 8081");
    assert!(!tcp(&t, 8080, BLOCKED), "and no longer 8080");
}

#[test]
fn a_reload_cuts_established_connections_it_no_longer_allows_within_a_second() {
    let _serial = serial();
    let t = topology();
    let _servers = servers(&t, &[8080, 8081]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy_allowing(&[8080, 8081])).unwrap();
    let agent = start(&t, &path);
    let (revoked, kept) = (LongLived::open(&t, 8080), LongLived::open(&t, 8081));
    thread::sleep(Duration::from_millis(500));
    assert!(revoked.echoes_after(Instant::now() - Duration::from_millis(400)) > 0, "both connections echo");
    assert!(kept.echoes_after(Instant::now() - Duration::from_millis(400)) > 0, "both connections echo");

    let written = Instant::now();
    replace_file(&path, &policy_allowing(&[8081]));
    wait_for_policy_event(&agent, "applied", 2);
    let applied = Instant::now();
    thread::sleep(Duration::from_millis(1500));

    let cut = revoked.failed().expect("the connection whose allow was removed is cut");
    let last = revoked.last_echo().unwrap();
    assert!(
        last < applied + Duration::from_secs(1),
        "its last echo came {:?} after the reload was applied",
        last.saturating_duration_since(applied)
    );
    eprintln!(
        "reload applied {:?} after the write; last echo of the revoked connection {:?} after it, failure noticed {:?} after it",
        applied - written,
        last.saturating_duration_since(applied),
        cut.saturating_duration_since(applied)
    );
    assert_eq!(kept.failed(), None, "the connection whose allow remains keeps working");
    assert!(kept.echoes_after(applied + Duration::from_secs(1)) >= 3, "and keeps echoing");

    // The cut is reported like any denial: the revoked flow's next packet, under generation 2.
    let port = revoked_local_port_event(&agent);
    assert_eq!(port["reason"], "default-deny", "{port:#}");
    assert_eq!(port["generation"], 2, "{port:#}");
}

/// The deny event of the revoked connection (web → api tcp 8080, or its reply).
fn revoked_local_port_event(agent: &Agent) -> Value {
    let is_revoked = |e: &Value| {
        e["kind"] == "flow"
            && e["verdict"] == "deny"
            && e["protocol"] == "tcp"
            && ((e["dst"]["identity"] == "api" && e["dst"]["port"] == 8080)
                || (e["src"]["identity"] == "api" && e["src"]["port"] == 8080))
    };
    agent.wait_for_event(is_revoked, EVENT_WAIT).unwrap_or_else(|| {
        panic!("no deny event for the revoked connection\nevents: {:#?}\nagent log:\n{}", agent.events(), agent.stderr())
    })
}
