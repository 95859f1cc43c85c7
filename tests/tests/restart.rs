//! Enforcement that outlives the agent: everything it creates is pinned under `--bpffs-dir`, so
//! a SIGTERM or a kill -9 leaves the node enforcing, a new agent adopts the pins without a gap,
//! `detach` removes them, a second agent on the same pins refuses to start, interfaces that
//! appear later are judged from their first packet, and an agent whose programs differ
//! replaces them in place. Real namespaces and traffic; what reaches a workload is counted by a
//! sniffer inside its namespace. Needs root; fails, never skips.
//!
//! Each test has its own topology and its own pin directory (`/sys/fs/bpf/zt-test-<pid>-<n>`,
//! never the agent's default); the two that time traffic across restarts run one at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    maps::{loaded_maps, MapInfo},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_links, loaded_programs, ProgramInfo,
    },
};
use serde_json::Value;
use zt_agent::policy::compile::ip_key;
use zt_tests::{
    agent_bin, ensure_root, http_get, run_agent_command_in,
    sniffer::{self, TCP, UDP},
    tcp_connect, tcp_server,
    traffic::tcp_echo_roundtrip,
    udp_echo_server,
    upgrade_agent_bin, Agent, AgentOptions, BpffsDir, Netns, Server, Sniffer, Topology, TopologySpec,
};

const WAIT: Duration = Duration::from_secs(2);
/// How long a blocked attempt is given before it counts as dropped (one SYN: the first
/// retransmission would come after a second).
const BLOCKED: Duration = Duration::from_millis(700);
const EVENT_WAIT: Duration = Duration::from_secs(5);
/// An allowed round trip, or a new allowed connection, slower than this is a failure: on a
/// veth it takes well under a millisecond, and a dropped packet costs at least a 200 ms
/// retransmission (a dropped SYN a whole second).
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(1);
const ALLOWED: u16 = 8080;
/// TCP and UDP: denied by default (nothing allows it).
const DENIED: u16 = 9090;
/// For agents started beside one that runs (the default port is taken in the node namespace).
const SECOND_METRICS_ADDR: &str = "127.0.0.1:9091";
const METRICS_ADDR: &str = "127.0.0.1:9090";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// For the tests that time traffic across restarts (two cores; each starts many agents).
fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `clients` and `server` (index 2), default-deny both ways for everyone; each client may open
/// TCP 8080 on the server (the client's egress and the server's ingress both allow it), nothing
/// else. Clients are `(name, index)` on node-a (10.20.<index>.0/24).
fn policy(clients: &[(&str, u8)]) -> String {
    let identity = |name: &str, index: u8| {
        format!(
            "apiVersion: zt/v1\nkind: Identity\nmetadata: {{name: {name}}}\nspec:\n  selectors: [{{cidr: 10.20.{index}.0/24}}, {{cidr: \"fd00:20:{index:x}::/64\"}}]\n---\n"
        )
    };
    let names = clients.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ");
    let mut text = String::new();
    for (name, index) in clients {
        text += &identity(name, *index);
    }
    text += &identity("server", 2);
    text += &format!(
        "apiVersion: zt/v1
kind: Policy
metadata: {{name: default-deny}}
spec: {{subject: [any], ingress: [], egress: []}}
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: clients}}
spec:
  subject: [{names}]
  egress: [{{to: [server], ports: [{{protocol: tcp, port: {ALLOWED}}}]}}]
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: server}}
spec:
  subject: [server]
  ingress: [{{from: [{names}], ports: [{{protocol: tcp, port: {ALLOWED}}}]}}]
"
    );
    text
}

/// The policy written to a file of its own; the directory lives as long as the returned guard.
fn policy_file(clients: &[(&str, u8)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    fs::write(&path, policy(clients)).unwrap();
    (dir, path)
}

/// client (index 1) and server (index 2) on node-a.
fn topology() -> Topology {
    ensure_root().unwrap();
    Topology::new(TopologySpec::new().workload("client", 1).workload("server", 2)).expect("building the test topology")
}

/// TCP echo servers on the server workload: the allowed port and the denied one (so a denied
/// SYN that got through would complete its handshake), IPv4 and IPv6.
fn servers(t: &Topology) -> Vec<Server> {
    let server = t.workload("server");
    let mut servers = Vec::new();
    for ip in [server.ipv4(), server.ipv6()] {
        for port in [ALLOWED, DENIED] {
            servers.push(tcp_server(server.ns(), SocketAddr::new(ip, port)).unwrap());
        }
    }
    servers
}

fn tcp(ns: &Netns, ip: IpAddr, port: u16, timeout: Duration) -> bool {
    tcp_connect(ns, SocketAddr::new(ip, port), timeout).is_ok()
}

/// What reached the server on the denied port (TCP or UDP), from any source.
fn is_denied_packet(p: &zt_tests::Packet) -> bool {
    p.is_to(TCP, DENIED) || p.is_to(UDP, DENIED)
}

/// Its status's `start` object (`kind`, `programs_replaced`, `migrated_maps`,
/// `events_lost_while_down`), checked for shape.
fn start_info(agent: &Agent) -> Value {
    let status = agent.status_json();
    let start = status["start"].clone();
    assert!(
        start["kind"].is_string()
            && start["programs_replaced"].is_u64()
            && start["migrated_maps"].is_array()
            && start["events_lost_while_down"].is_u64(),
        "status.start must be {{kind, programs_replaced, migrated_maps, events_lost_while_down}}: {status:#}"
    );
    start
}

fn generation(agent: &Agent) -> u64 {
    let status = agent.status_json();
    status["generation"].as_u64().unwrap_or_else(|| panic!("no generation in {status:#}"))
}

/// `/readyz` of the agent in `node_ns` (on the default metrics address): 200, and the body
/// says how it started.
fn assert_readyz_says(node_ns: &Netns, kind: &str) {
    let (code, body) = http_get(node_ns, METRICS_ADDR.parse().unwrap(), "/readyz").unwrap();
    assert_eq!(code, 200, "/readyz: {body}");
    assert!(body.contains(kind), "/readyz must say {kind:?}: {body:?}");
}

// ---- Traffic that runs across restarts --------------------------------------------------------

/// What the background traffic saw; every failure is kept with when it happened.
#[derive(Default)]
struct TrafficLog {
    /// Echoes on the one long-lived allowed connection.
    echoes: AtomicU64,
    /// Its first failure (the connection is then given up).
    echo_failure: Mutex<Option<(Instant, String)>>,
    /// Its slowest round trip.
    slowest_echo: Mutex<Duration>,
    /// Retransmissions on it (TCP_INFO), read when it stopped: a packet lost, e.g. in a gap.
    echo_retransmissions: AtomicU64,
    /// New allowed connections that completed a round trip, and those that did not.
    connections: AtomicU64,
    connection_failures: Mutex<Vec<(Instant, String)>>,
    /// SYNs and datagrams sent to the denied port; handshakes on it that completed.
    denied_sent: AtomicU64,
    denied_connected: Mutex<Vec<Instant>>,
}

/// Sets the flag when dropped: a failing assertion in a scope still stops the traffic threads
/// (the scope would wait for them forever otherwise).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One allowed connection, client → server, round-tripping 8 bytes every 10 ms until `stop`.
fn echo_loop(server: SocketAddr, stop: &AtomicBool, log: &TrafficLog) {
    let fail = |message: String| *log.echo_failure.lock().unwrap() = Some((Instant::now(), message));
    let mut stream = match TcpStream::connect_timeout(&server, WAIT) {
        Ok(stream) => stream,
        Err(e) => return fail(format!("connect: {e}")),
    };
    stream.set_read_timeout(Some(ROUND_TRIP_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(ROUND_TRIP_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut n = 0u64;
    let mut buf = [0u8; 8];
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = Instant::now();
        if let Err(e) = stream.write_all(&n.to_be_bytes()).and_then(|()| stream.read_exact(&mut buf)) {
            return fail(format!("round trip {n}: {e} after {:?}", sent.elapsed()));
        }
        let took = sent.elapsed();
        if buf != n.to_be_bytes() {
            return fail(format!("round trip {n}: echo {buf:?} differs"));
        }
        log.echoes.fetch_add(1, Ordering::Relaxed);
        let mut slowest = log.slowest_echo.lock().unwrap();
        *slowest = (*slowest).max(took);
        drop(slowest);
        thread::sleep(Duration::from_millis(10));
    }
    log.echo_retransmissions.store(total_retransmissions(&stream), Ordering::Relaxed);
}

fn total_retransmissions(stream: &TcpStream) -> u64 {
    use nix::libc;
    // SAFETY: all-zero is a valid tcp_info; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        info.tcpi_total_retrans.into()
    } else {
        u64::MAX
    }
}

/// New allowed connections, one after the other, each proving a round trip within the timeout.
fn connect_loop(server: SocketAddr, stop: &AtomicBool, log: &TrafficLog) {
    while !stop.load(Ordering::Relaxed) {
        match tcp_echo_roundtrip(server, ROUND_TRIP_TIMEOUT) {
            Ok(()) => {
                log.connections.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log.connection_failures.lock().unwrap().push((Instant::now(), format!("{e:#}"))),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SYNs to the denied port, each from a new socket (one SYN per attempt: it is abandoned long
/// before the first retransmission). A handshake that completes is a leak.
fn syn_loop(server: SocketAddr, stop: &AtomicBool, log: &TrafficLog) {
    while !stop.load(Ordering::Relaxed) {
        let connected = TcpStream::connect_timeout(&server, Duration::from_millis(25)).is_ok();
        log.denied_sent.fetch_add(1, Ordering::Relaxed);
        if connected {
            log.denied_connected.lock().unwrap().push(Instant::now());
        }
    }
}

/// Datagrams to the denied UDP port, IPv4 and IPv6, every 2 ms.
fn udp_loop(servers: [SocketAddr; 2], stop: &AtomicBool, log: &TrafficLog) {
    let v4 = UdpSocket::bind("0.0.0.0:0").unwrap();
    let v6 = UdpSocket::bind("[::]:0").unwrap();
    while !stop.load(Ordering::Relaxed) {
        for (socket, server) in [(&v4, servers[0]), (&v6, servers[1])] {
            // An ICMP error for an earlier datagram can fail a send; it still went out.
            let _ = socket.send_to(b"zt-denied", server);
            log.denied_sent.fetch_add(1, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// When each agent was killed and when its successor was ready, for failure messages.
struct Round {
    round: usize,
    killed: Instant,
    ready: Instant,
}

/// Runs the traffic of [`traffic_threads`] from client to server while `rounds` runs, then checks
/// what it saw: every allowed round trip and connection succeeded, and not one packet to the
/// denied port reached the server.
fn under_traffic(t: &Topology, rounds: impl FnOnce() -> Vec<Round>) {
    let (client, server) = (t.workload("client"), t.workload("server"));
    let sniffer = Sniffer::start(server.ns(), "eth0").unwrap();
    let log = TrafficLog::default();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let rounds = thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let (stop, log) = (&stop, &log);
        let allowed = SocketAddr::new(server.ipv4(), ALLOWED);
        let denied = [SocketAddr::new(server.ipv4(), DENIED), SocketAddr::new(server.ipv6(), DENIED)];
        scope.spawn(move || client.ns().run(|| echo_loop(allowed, stop, log)));
        scope.spawn(move || client.ns().run(|| connect_loop(allowed, stop, log)));
        scope.spawn(move || client.ns().run(|| connect_loop(SocketAddr::new(server.ipv6(), ALLOWED), stop, log)));
        scope.spawn(move || client.ns().run(|| syn_loop(denied[0], stop, log)));
        scope.spawn(move || client.ns().run(|| syn_loop(denied[1], stop, log)));
        scope.spawn(move || client.ns().run(|| udp_loop(denied, stop, log)));
        // Traffic under the first agent before anything happens to it.
        thread::sleep(Duration::from_millis(500));
        let rounds = rounds();
        thread::sleep(Duration::from_millis(500));
        rounds
    });
    sniffer.settle(Duration::from_secs(1));
    let elapsed = started.elapsed();

    let at = |instant: Instant| -> String {
        let offset = instant.saturating_duration_since(started);
        let round = rounds.iter().rev().find(|r| r.killed <= instant);
        match round {
            Some(r) if instant < r.ready => {
                format!("{offset:?} (round {}: no agent or the next one starting)", r.round)
            }
            Some(r) => format!("{offset:?} (after round {})", r.round),
            None => format!("{offset:?} (first agent)"),
        }
    };
    let echoes = log.echoes.load(Ordering::Relaxed);
    let connections = log.connections.load(Ordering::Relaxed);
    let denied_sent = log.denied_sent.load(Ordering::Relaxed);
    let leaked = sniffer.packets(is_denied_packet);
    let allowed_seen = sniffer.count(|p| p.is_to(TCP, ALLOWED));
    eprintln!(
        "{elapsed:?}, {} rounds: {echoes} echoes on one connection (slowest {:?}, {} retransmissions), \
         {connections} new allowed connections, {denied_sent} denied SYNs and datagrams sent; the sniffer saw {} \
         packets to the denied port and {} in all ({allowed_seen} to the allowed port)",
        rounds.len(),
        *log.slowest_echo.lock().unwrap(),
        log.echo_retransmissions.load(Ordering::Relaxed),
        leaked.len(),
        sniffer.seen(),
    );

    if let Some((when, message)) = &*log.echo_failure.lock().unwrap() {
        panic!("the long-lived allowed connection failed at {}: {message}", at(*when));
    }
    let failures = log.connection_failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} new allowed connections failed (of {}), e.g.:\n{}",
        failures.len(),
        connections + failures.len() as u64,
        failures.iter().take(10).map(|(when, e)| format!("  at {}: {e}", at(*when))).collect::<Vec<_>>().join("\n")
    );
    let denied_connected = log.denied_connected.lock().unwrap();
    let leaked_report =
        leaked.iter().take(10).map(|p| format!("  at {}: {p:?}", at(p.at))).collect::<Vec<_>>().join("\n");
    assert!(
        leaked.is_empty() && denied_connected.is_empty(),
        "{} packets to the denied port reached the server and {} denied handshakes completed; first ones:\n{leaked_report}",
        leaked.len(),
        denied_connected.len()
    );
    sniffer::ensure_complete(&sniffer).unwrap();
    // The traffic was there, and the sniffer sees what arrives.
    let seconds = elapsed.as_secs_f64();
    assert!(echoes as f64 >= 20.0 * seconds, "only {echoes} echoes in {elapsed:?}");
    assert!(connections as f64 >= 5.0 * seconds, "only {connections} new connections in {elapsed:?}");
    assert!(denied_sent as f64 >= 200.0 * seconds, "only {denied_sent} denied packets sent in {elapsed:?}");
    assert!(allowed_seen as u64 > echoes, "the sniffer saw only {allowed_seen} packets to the allowed port");
}

// ---- Pins ---------------------------------------------------------------------------------------

/// What is pinned under `<dir>/v1`, as the kernel describes each object: pin path → ids.
#[derive(Debug, Default)]
struct Pins {
    /// pin → (link id, program id)
    links: BTreeMap<PathBuf, (u32, u32)>,
    /// pin → program id
    programs: BTreeMap<PathBuf, u32>,
    /// pin → map id
    maps: BTreeMap<PathBuf, u32>,
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return files };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every pin under `<dir>/v1`, by the kind its top directory names (`links…`, `programs…`,
/// `maps…`: `maps/` and any staging directory beside it).
fn read_pins(dir: &BpffsDir) -> Pins {
    let root = dir.pins();
    let mut pins = Pins::default();
    for pin in files_under(&root) {
        let top = pin.strip_prefix(&root).unwrap().components().next().unwrap();
        let top = top.as_os_str().to_string_lossy();
        if top.starts_with("links") {
            let link = FdLink::from(PinnedLink::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display())));
            let info = link.info().unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
            pins.links.insert(pin, (info.id(), info.program_id()));
            // Dropping `link` closes our descriptor; the pin keeps the link.
        } else if top.starts_with("programs") {
            let info = ProgramInfo::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
            pins.programs.insert(pin, info.id());
        } else if top.starts_with("maps") {
            let info = MapInfo::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
            pins.maps.insert(pin, info.id());
        } else {
            panic!("{}: a pin outside links/, programs/ and maps/", pin.display());
        }
    }
    pins
}

/// Every loaded program's tag, by id (other tests load programs too; ids tell them apart).
fn program_tags() -> BTreeMap<u32, u64> {
    loaded_programs().filter_map(Result::ok).map(|p| (p.id(), p.tag())).collect()
}

fn loaded_program_ids() -> BTreeSet<u32> {
    loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect()
}

fn loaded_link_ids() -> BTreeSet<u32> {
    loaded_links().filter_map(Result::ok).map(|l| l.id()).collect()
}

fn loaded_map_ids() -> BTreeSet<u32> {
    loaded_maps().filter_map(Result::ok).map(|m| m.id()).collect()
}

/// Each pinned link: (link id, program id, program tag).
fn pinned_link_programs(dir: &BpffsDir) -> BTreeMap<PathBuf, (u32, u32, u64)> {
    let tags = program_tags();
    read_pins(dir)
        .links
        .into_iter()
        .map(|(pin, (link, program))| {
            let tag =
                *tags.get(&program).unwrap_or_else(|| panic!("{}: program {program} is not loaded", pin.display()));
            (pin, (link, program, tag))
        })
        .collect()
}

/// `pin` as `detach --json` reported it names `ours` (absolute, or relative to the directory or
/// to its `v1`).
fn same_pin(reported: &str, ours: &Path, dir: &BpffsDir) -> bool {
    let reported = Path::new(reported);
    reported == ours || dir.path().join(reported) == ours || dir.pins().join(reported) == ours
}

// ---- Tests --------------------------------------------------------------------------------------

fn enforcing_options(t: &Topology, policy: &Path) -> AgentOptions {
    AgentOptions::for_node(t.node(), policy, "enforce")
}

#[test]
fn kill9_and_restart_twenty_times_under_traffic() {
    let _serial = serial();
    let t = topology();
    let _servers = servers(&t);
    let (_policy_dir, policy) = policy_file(&[("client", 1)]);
    let options = enforcing_options(&t, &policy);
    let mut agent = Agent::start(t.node().ns(), &options).unwrap();
    assert_eq!(start_info(&agent)["kind"], "fresh", "the first agent has nothing to adopt");
    assert_readyz_says(t.node().ns(), "fresh");
    let dir = agent.bpffs_dir().clone();
    let (client, server) = (t.workload("client"), t.workload("server"));
    assert!(tcp(client.ns(), server.ipv4(), ALLOWED, WAIT), "the allowed flow works");
    assert!(!tcp(client.ns(), server.ipv4(), DENIED, BLOCKED), "the denied one does not");
    let mut generation_before = generation(&agent);
    assert_eq!(generation_before, 1);

    under_traffic(&t, || {
        let mut rounds = Vec::new();
        for round in 1..=20 {
            agent.kill9();
            let killed = Instant::now();
            // Nobody running for a moment: the pinned programs judge alone.
            thread::sleep(Duration::from_millis(100));
            // Every other round without --mode: adopting keeps the pinned mode.
            let mode = (round % 2 == 0).then(|| "enforce".to_owned());
            let options = AgentOptions { mode: mode.clone(), bpffs_dir: Some(dir.clone()), ..options.clone() };
            agent = Agent::start(t.node().ns(), &options)
                .unwrap_or_else(|e| panic!("round {round}: restarting on {}: {e:#}", dir.path().display()));
            let ready = Instant::now();
            rounds.push(Round { round, killed, ready });

            let status = agent.status_json();
            assert_eq!(status["start"]["kind"], "adopted", "round {round} ({mode:?}): {status:#}");
            start_info(&agent);
            assert_eq!(status["mode"], "enforce", "round {round} (--mode {mode:?}): {status:#}");
            let generation = status["generation"].as_u64().unwrap();
            assert_eq!(generation, generation_before + 1, "round {round}: adopting is one switch, like a reload");
            generation_before = generation;
            assert_readyz_says(t.node().ns(), "adopted");
            // Some traffic under this agent before the next kill.
            thread::sleep(Duration::from_millis(300));
        }
        rounds
    });

    // The last agent still enforces, and its status counts what it judged.
    assert!(!tcp(client.ns(), server.ipv4(), DENIED, BLOCKED), "still denied after 20 restarts");
    assert!(tcp(client.ns(), server.ipv4(), ALLOWED, WAIT), "still allowed after 20 restarts");
    assert_eq!(generation(&agent), 21);
}

/// Creates a map (`map_type`, key size, value size, max entries, flags) with raw syscalls, fills
/// it with `entries` and pins it at `path`: maps of layouts no object of today declares.
fn pin_raw_map(path: &Path, map_type: u64, (key_size, value_size, max_entries, flags): (u64, u64, u64, u64), entries: &[(&[u8], &[u8])]) {
    use nix::libc;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr))
    };
    // BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags.
    let mut attr = [0u64; 16];
    attr[0] = map_type | key_size << 32;
    attr[1] = value_size | max_entries << 32;
    attr[2] = flags;
    let fd = bpf(0, &mut attr);
    assert!(fd >= 0, "creating {}: {}", path.display(), std::io::Error::last_os_error());
    for (key, value) in entries {
        assert_eq!((key.len() as u64, value.len() as u64), (key_size, value_size));
        // BPF_MAP_UPDATE_ELEM: map_fd, key, value, flags.
        let mut attr = [0u64; 16];
        attr[0] = fd as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_ptr() as u64;
        assert_eq!(bpf(2, &mut attr), 0, "writing into {}: {}", path.display(), std::io::Error::last_os_error());
    }
    // BPF_OBJ_PIN: pathname, bpf_fd.
    let pin = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = pin.as_ptr() as u64;
    attr[1] = fd as u64;
    assert_eq!(bpf(6, &mut attr), 0, "pinning {}: {}", path.display(), std::io::Error::last_os_error());
    unsafe { libc::close(fd as i32) };
}

/// The bytes of a plain-data value, as the kernel stores it.
fn bytes_of<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: `T` is a repr(C) plain-data type here; its bytes are all initialised.
    unsafe { std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Pins `config` at `path` as zt did before the config word: a hash (no preallocation) of one
/// `Config` under key 0.
fn pin_previous_config(path: &Path, config: zt_common::Config) {
    let size = std::mem::size_of_val(&config) as u64;
    pin_raw_map(path, 1, (4, size, 1, 1), &[(&0u32.to_ne_bytes(), bytes_of(&config))]);
}

/// An agent finding the config an agent before the config word pinned (a hash) migrates it to
/// the word with its mode and generation: no `--mode` needed, and the node stays in its mode.
#[test]
fn a_config_pinned_before_the_config_word_migrates_with_its_mode_and_generation() {
    let t = topology();
    let (_policy_dir, policy) = policy_file(&[("client", 1)]);
    let dir = BpffsDir::new(t.node().ns()).unwrap();
    // The pin layout (`v1/maps/…`) is the one the previous release wrote too.
    let maps = dir.path().join("v1/maps");
    fs::create_dir_all(&maps).unwrap();
    let previous = zt_common::Config { mode: zt_common::mode::MONITOR, generation: 41, slot: 1 };
    pin_previous_config(&maps.join(zt_common::maps::CONFIG), previous);
    let options = AgentOptions { bpffs_dir: Some(dir.clone()), mode: None, ..enforcing_options(&t, &policy) };
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let start = start_info(&agent);
    assert_eq!(start["kind"], "adopted", "{start:#}");
    assert_eq!(start["previous_generation"], 41, "{start:#}");
    assert!(start["migrated_maps"].as_array().unwrap().iter().any(|m| m == zt_common::maps::CONFIG), "{start:#}");
    let status = agent.status_json();
    assert_eq!(status["mode"], "monitor", "the pinned mode carried over: {status:#}");
    assert_eq!(generation(&agent), 42, "the next generation after the pinned one");
}

/// Pins a conntrack as zt kept it before one entry per flow: an LRU hash of 32-byte entries,
/// one per direction.
fn pin_previous_conntrack(path: &Path, entries: &[(zt_common::CtKey, [u8; 32])]) {
    let entries: Vec<(&[u8], &[u8])> = entries.iter().map(|(key, value)| (bytes_of(key), &value[..])).collect();
    pin_raw_map(path, 9, (std::mem::size_of::<zt_common::CtKey>() as u64, 32, 1024, 0), &entries);
}

/// A flow that an agent of the layout before (an entry per direction) admitted carries on, both
/// ways, once the new agent has merged its two entries into one: here a UDP flow to the denied
/// port, which only its migrated entry lets through.
#[test]
fn a_flow_pinned_as_an_entry_per_direction_migrates_and_stays_established() {
    let t = topology();
    let (client, server) = (t.workload("client"), t.workload("server"));
    let echo = udp_echo_server(server.ns(), SocketAddr::new(server.ipv4(), DENIED)).unwrap();
    let (_policy_dir, policy) = policy_file(&[("client", 1)]);
    let dir = BpffsDir::new(t.node().ns()).unwrap();
    let maps = dir.path().join("v1/maps");
    fs::create_dir_all(&maps).unwrap();
    // client:40000 → server:DENIED/udp and its reply, admitted under generation 1 just now.
    let key = |src: IpAddr, dst: IpAddr, src_port, dst_port| zt_common::CtKey {
        src: ip_key(src),
        dst: ip_key(dst),
        src_port,
        dst_port,
        protocol: 17,
        _pad: [0; 3],
    };
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let entry = |flags: u32| {
        // last_seen_ns, rule_id, generation, flags, ifindex, port, padding.
        let mut value = [0u8; 32];
        value[..8].copy_from_slice(&((now.tv_sec() as u64) * 1_000_000_000 + now.tv_nsec() as u64).to_ne_bytes());
        value[12..16].copy_from_slice(&1u32.to_ne_bytes());
        value[16..20].copy_from_slice(&flags.to_ne_bytes());
        value[24..26].copy_from_slice(&DENIED.to_ne_bytes());
        value
    };
    pin_previous_conntrack(
        &maps.join(zt_common::maps::CONNTRACK),
        &[
            (key(client.ipv4(), server.ipv4(), 40_000, DENIED), entry(0)),
            (key(server.ipv4(), client.ipv4(), DENIED, 40_000), entry(2)),
        ],
    );
    let options = AgentOptions { bpffs_dir: Some(dir.clone()), ..enforcing_options(&t, &policy) };
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let start = start_info(&agent);
    assert!(start["migrated_maps"].as_array().unwrap().iter().any(|m| m == zt_common::maps::CONNTRACK), "{start:#}");
    assert_eq!(generation(&agent), 1, "the generation the pinned flow was admitted under");
    let round_trip = |port: u16| {
        client.ns().run(|| -> std::io::Result<()> {
            let socket = UdpSocket::bind(SocketAddr::new(client.ipv4(), port))?;
            socket.set_read_timeout(Some(BLOCKED))?;
            socket.send_to(b"migrated", echo.addr())?;
            let mut buf = [0u8; 16];
            socket.recv_from(&mut buf).map(drop)
        })
    };
    for round in 0..3 {
        round_trip(40_000).unwrap_or_else(|e| panic!("round {round}: the migrated flow, both ways: {e}\n{}", agent.stderr()));
    }
    assert!(round_trip(40_001).is_err(), "another source port is a new flow, which policy denies");
}

#[test]
fn sigterm_leaves_enforcement_and_detach_removes_everything() {
    let t = topology();
    let _servers = servers(&t);
    let (client, server) = (t.workload("client"), t.workload("server"));
    let sniffer = Sniffer::start(server.ns(), "eth0").unwrap();
    let (_policy_dir, policy) = policy_file(&[("client", 1)]);
    let dir = BpffsDir::new(t.node().ns()).unwrap();
    let options = AgentOptions { bpffs_dir: Some(dir.clone()), ..enforcing_options(&t, &policy) };
    let mut agent = Agent::start(t.node().ns(), &options).unwrap();
    assert!(tcp(client.ns(), server.ipv4(), ALLOWED, WAIT), "allowed with the agent running");
    assert!(!tcp(client.ns(), server.ipv4(), DENIED, BLOCKED), "denied with the agent running");

    let status = agent.terminate().unwrap();
    assert!(status.success(), "SIGTERM: the agent exits 0, got {status}; stderr:\n{}", agent.stderr());
    assert!(!agent.is_running());

    // Nobody running: the pinned programs keep judging, with the last policy and mode.
    for ip in [server.ipv4(), server.ipv6()] {
        assert!(!tcp(client.ns(), ip, DENIED, BLOCKED), "{ip}: still denied after SIGTERM");
        assert!(tcp(client.ns(), ip, ALLOWED, WAIT), "{ip}: still allowed after SIGTERM");
    }
    sniffer.settle(Duration::from_secs(1));
    let leaked = sniffer.packets(is_denied_packet);
    assert!(leaked.is_empty(), "denied packets reached the server: {leaked:#?}");
    assert!(sniffer.count(|p| p.is_to(TCP, ALLOWED)) > 0, "the sniffer sees what arrives");

    // What is pinned, as the kernel knows it.
    let pins = read_pins(&dir);
    let attached = t.node().workload_interfaces().len();
    assert_eq!(pins.links.len(), 2 * attached, "TC ingress + egress links on {attached} interfaces: {pins:#?}");
    let pinned_programs: BTreeSet<u32> = pins.programs.values().copied().collect();
    for (pin, (_, program)) in &pins.links {
        assert!(pinned_programs.contains(program), "{}: its program {program} is not pinned: {pins:#?}", pin.display());
    }
    assert!(!pins.maps.is_empty(), "no map pinned: {pins:#?}");
    // Every map the pinned programs use (pinned or not, e.g. .rodata) must go with them.
    let mut kernel_maps: BTreeSet<u32> = pins.maps.values().copied().collect();
    for info in loaded_programs().filter_map(Result::ok).filter(|p| pinned_programs.contains(&p.id())) {
        kernel_maps.extend(info.map_ids().unwrap().unwrap_or_default());
    }
    let link_ids: BTreeSet<u32> = pins.links.values().map(|(link, _)| *link).collect();

    let output = dir.detach(true).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "detach failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let removed: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("`detach --json` must print one JSON object ({e}): {stdout}"));
    let reported = |kind: &str| -> Vec<Value> {
        removed[kind].as_array().unwrap_or_else(|| panic!("no {kind:?} array in {removed:#}")).clone()
    };
    let id = |entry: &Value, field: &str| -> u32 {
        entry[field].as_u64().unwrap_or_else(|| panic!("no {field:?} in {entry}")) as u32
    };
    let check_pin = |entry: &Value, ours: &BTreeMap<PathBuf, u32>| {
        let pin = entry["pin"].as_str().unwrap_or_else(|| panic!("no pin in {entry}"));
        let ours = ours.iter().find(|(path, _)| same_pin(pin, path, &dir));
        let (path, ours_id) = ours.unwrap_or_else(|| panic!("{entry} names no pin we saw: {pins:#?}"));
        assert_eq!(*ours_id, id(entry, "id"), "{entry}: {} has another id", path.display());
    };
    let links = reported("links");
    let link_pins: BTreeMap<PathBuf, u32> = pins.links.iter().map(|(p, (link, _))| (p.clone(), *link)).collect();
    for entry in &links {
        check_pin(entry, &link_pins);
        let program = pins.links.values().find(|(link, _)| *link == id(entry, "id")).unwrap().1;
        assert_eq!(id(entry, "program_id"), program, "{entry}");
    }
    let programs = reported("programs");
    programs.iter().for_each(|entry| check_pin(entry, &pins.programs));
    let maps = reported("maps");
    maps.iter().for_each(|entry| check_pin(entry, &pins.maps));
    let ids = |entries: &[Value]| entries.iter().map(|e| id(e, "id")).collect::<BTreeSet<u32>>();
    assert_eq!(ids(&links), link_ids, "detach reports every pinned link: {removed:#}");
    assert_eq!(ids(&programs), pinned_programs, "detach reports every pinned program: {removed:#}");
    assert_eq!(ids(&maps), pins.maps.values().copied().collect(), "detach reports every pinned map: {removed:#}");
    assert!(!dir.path().exists(), "detach removes {}", dir.path().display());

    // Gone from the kernel (freeing is deferred a little after the last reference goes).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let still_links: Vec<u32> = loaded_link_ids().intersection(&link_ids).copied().collect();
        let still_programs: Vec<u32> = loaded_program_ids().intersection(&pinned_programs).copied().collect();
        let still_maps: Vec<u32> = loaded_map_ids().intersection(&kernel_maps).copied().collect();
        if still_links.is_empty() && still_programs.is_empty() && still_maps.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in the kernel 10 s after detach: links {still_links:?}, programs {still_programs:?}, maps {still_maps:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // Nothing attached any more: what was denied passes.
    assert!(tcp(client.ns(), server.ipv4(), DENIED, WAIT), "after detach nothing judges the flow");
    sniffer.settle(Duration::from_secs(1));
    assert!(sniffer.count(is_denied_packet) > 0, "the sniffer sees the formerly denied flow arrive");
    sniffer::ensure_complete(&sniffer).unwrap();
}

#[test]
fn a_second_agent_on_the_same_dir_refuses_to_start() {
    let t = topology();
    let _servers = servers(&t);
    let (client, server) = (t.workload("client"), t.workload("server"));
    let (policy_dir, policy) = policy_file(&[("client", 1)]);
    let mut first = Agent::start(t.node().ns(), &enforcing_options(&t, &policy)).unwrap();
    let dir = first.bpffs_dir().clone();
    let links_before = read_pins(&dir).links;
    assert!(!links_before.is_empty(), "the first agent pins its links");

    // Same namespace, same pins; its own socket and metrics port, so only the pins collide.
    let mut second = enforcing_options(&t, &policy);
    second.extra_args = vec!["--metrics-addr".into(), SECOND_METRICS_ADDR.into()];
    let socket = policy_dir.path().join("second.sock");
    let started = Instant::now();
    let output = run_agent_command_in(t.node().ns(), second.run_args(&socket, dir.path()), Duration::from_secs(20))
        .expect("the second agent must exit by itself");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the second agent must fail, got {}; stderr:\n{stderr}", output.status);
    assert!(stderr.contains("another zt-agent"), "stderr must say why: {stderr}");
    assert!(took < Duration::from_secs(5), "it must fail quickly, took {took:?}");
    assert!(!socket.exists(), "the second agent never became ready");

    // Nor may detach pull the pins from under the running agent.
    let detach = dir.detach(true).unwrap();
    let detach_stderr = String::from_utf8_lossy(&detach.stderr);
    assert!(
        !detach.status.success(),
        "detach must refuse while an agent runs: {}",
        String::from_utf8_lossy(&detach.stdout)
    );
    assert!(detach_stderr.contains("another zt-agent"), "detach stderr must say why: {detach_stderr}");

    // The first agent noticed nothing.
    assert!(first.is_running(), "the first agent still runs");
    assert_eq!(read_pins(&dir).links, links_before, "its links are untouched");
    let start = start_info(&first);
    assert_eq!(start["kind"], "fresh");
    assert_eq!(generation(&first), 1);
    assert!(tcp(client.ns(), server.ipv4(), ALLOWED, WAIT), "the first agent still allows");
    assert!(!tcp(client.ns(), server.ipv4(), DENIED, BLOCKED), "and still denies");

    // Once it exited, the pins are free: an agent adopts them.
    let status = first.terminate().unwrap();
    assert!(status.success(), "{status}");
    let options = AgentOptions { bpffs_dir: Some(dir.clone()), ..enforcing_options(&t, &policy) };
    let next = Agent::start(t.node().ns(), &options).unwrap();
    assert_eq!(start_info(&next)["kind"], "adopted");
    assert_eq!(generation(&next), 2);
}

#[test]
fn an_interface_created_after_start_is_judged_from_its_first_packet() {
    ensure_root().unwrap();
    // `lt-*` workloads are the agent's (by pattern); the server's interface is not attached,
    // so only the new workload's own interface can stop what it sends.
    let mut t = Topology::new(TopologySpec::new().workload("lt-first", 1).workload("server", 2))
        .expect("building the test topology");
    let _servers = servers(&t);
    let server = t.workload("server");
    let (server_ns_sniffer, server_v4) = (Sniffer::start(server.ns(), "eth0").unwrap(), server.ipv4());
    let (_policy_dir, policy) = policy_file(&[("lt-first", 1), ("lt-second", 3)]);
    let mut options = enforcing_options(&t, &policy);
    options.attach = vec!["lxc-lt-*".into()];
    let agent = Agent::start(t.node().ns(), &options).unwrap();
    let attachments = |agent: &Agent| -> BTreeSet<(String, String)> {
        let status = agent.status_json();
        status["attachments"]
            .as_array()
            .unwrap_or_else(|| panic!("no attachments in {status:#}"))
            .iter()
            .map(|a| (a["interface"].as_str().unwrap().to_owned(), a["hook"].as_str().unwrap().to_owned()))
            .collect()
    };
    let hooks = |interface: &str| {
        BTreeSet::from([
            (interface.to_owned(), "tc-ingress".to_owned()),
            (interface.to_owned(), "tc-egress".to_owned()),
        ])
    };
    assert_eq!(
        attachments(&agent),
        hooks("lxc-lt-first"),
        "the pattern matches lt-first's interface, not the server's"
    );
    assert!(tcp(t.ns("lt-first"), server_v4, ALLOWED, WAIT));
    assert!(!tcp(t.ns("lt-first"), server_v4, DENIED, BLOCKED));

    // Control: a new workload the pattern does not match, its SYN sent the moment it exists,
    // reaches the server (nothing judges it). So a SYN sent that early can arrive.
    let other = t.add_workload("other", 4).unwrap();
    let other_v4 = other.ipv4();
    assert!(tcp(other.ns(), server_v4, DENIED, WAIT), "an unjudged new workload reaches the server at once");

    // The new workload: its very first SYN, to the denied port, is dropped.
    let second = t.add_workload("lt-second", 3).unwrap();
    let second_v4 = second.ipv4();
    let connected = tcp(second.ns(), server_v4, DENIED, BLOCKED);
    server_ns_sniffer.settle(Duration::from_secs(1));
    let arrived = server_ns_sniffer.packets(|p| p.src == second_v4);
    assert!(!connected, "the first SYN from the new workload must be dropped (it connected)");
    assert!(arrived.iter().all(|p| !p.is_to(TCP, DENIED)), "it reached the server: {arrived:#?}");
    assert!(
        server_ns_sniffer.count(|p| p.src == other_v4 && p.is_to(TCP, DENIED)) > 0,
        "the control's SYN was seen by the sniffer"
    );
    sniffer::ensure_complete(&server_ns_sniffer).unwrap();
    let deny = agent
        .wait_for_event(
            |e| {
                e["kind"] == "flow"
                    && e["verdict"] == "deny"
                    && e["protocol"] == "tcp"
                    && e["src"]["ip"] == second_v4.to_string()
                    && e["dst"]["port"] == DENIED
            },
            EVENT_WAIT,
        )
        .unwrap_or_else(|| {
            panic!(
                "no deny event for lt-second → server:{DENIED}\nevents: {:#?}\nagent log:\n{}",
                agent.events(),
                agent.stderr()
            )
        });
    assert_eq!(deny["interface"], "lxc-lt-second", "{deny:#}");
    assert_eq!(deny["hook"], "tc-ingress", "{deny:#}");
    assert_eq!(deny["src"]["identity"], "lt-second", "{deny:#}");
    assert_eq!(deny["mode"], "enforce", "{deny:#}");

    // Allowed flows from it work; it is attached; nothing else is.
    assert!(tcp(second.ns(), server_v4, ALLOWED, WAIT), "the new workload's allowed flow works");
    let mut expected = hooks("lxc-lt-first");
    expected.extend(hooks("lxc-lt-second"));
    assert_eq!(attachments(&agent), expected);

    // Gone, it is forgotten.
    t.remove_workload("lt-second");
    let deadline = Instant::now() + Duration::from_secs(3);
    while attachments(&agent) != hooks("lxc-lt-first") {
        assert!(
            Instant::now() < deadline,
            "lxc-lt-second still listed 3 s after it disappeared: {:?}",
            attachments(&agent)
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(tcp(t.ns("lt-first"), server_v4, ALLOWED, WAIT), "the others carry on");
}

#[test]
fn upgrade_replaces_the_datapath_without_a_gap() {
    let upgrade = upgrade_agent_bin().unwrap();
    let current = agent_bin().unwrap();
    let _serial = serial();
    let t = topology();
    let _servers = servers(&t);
    let (_policy_dir, policy) = policy_file(&[("client", 1)]);
    let options = enforcing_options(&t, &policy);
    let mut agent = Agent::start_bin(&current, t.node().ns(), &options).unwrap();
    assert_eq!(start_info(&agent)["kind"], "fresh");
    let dir = agent.bpffs_dir().clone();
    let original = pinned_link_programs(&dir);
    assert_eq!(original.len(), 2 * t.node().workload_interfaces().len(), "TC links pinned: {original:#?}");
    let mut generation_before = generation(&agent);

    under_traffic(&t, || {
        let mut rounds = Vec::new();
        let mut before = original.clone();
        for (round, bin) in [(1, &upgrade), (2, &current)] {
            agent.kill9();
            let killed = Instant::now();
            thread::sleep(Duration::from_millis(100));
            let options = AgentOptions { bpffs_dir: Some(dir.clone()), ..options.clone() };
            agent = Agent::start_bin(bin, t.node().ns(), &options)
                .unwrap_or_else(|e| panic!("round {round}: starting {} on the pins: {e:#}", bin.display()));
            rounds.push(Round { round, killed, ready: Instant::now() });

            let status = agent.status_json();
            assert_eq!(status["start"]["kind"], "adopted", "{}: {status:#}", bin.display());
            let replaced = start_info(&agent)["programs_replaced"].as_u64().unwrap();
            assert!(replaced > 0, "{}: programs whose tag differs are replaced: {status:#}", bin.display());
            assert_eq!(status["mode"], "enforce", "{status:#}");
            let generation = status["generation"].as_u64().unwrap();
            assert_eq!(generation, generation_before + 1, "{}: {status:#}", bin.display());
            generation_before = generation;

            // The same links (BPF_LINK_UPDATE keeps them; nothing was detached), new programs.
            let now = pinned_link_programs(&dir);
            assert_eq!(now.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "the same link pins");
            for (pin, (link, program, tag)) in &now {
                let (old_link, old_program, old_tag) = before[pin];
                assert_eq!(*link, old_link, "{}: the link itself stays (updated, not replaced)", pin.display());
                assert_ne!(*program, old_program, "{}: another program runs behind the link", pin.display());
                assert_ne!(*tag, old_tag, "{}: with another tag ({}): {status:#}", pin.display(), bin.display());
            }
            before = now;
            thread::sleep(Duration::from_millis(1000));
        }
        // Back on the current binary: the original programs' tags again.
        for (pin, (_, _, tag)) in &before {
            assert_eq!(*tag, original[pin].2, "{}: back to the current binary's program", pin.display());
        }
        rounds
    });
    assert_eq!(agent.bin(), current.as_path());
}
