//! `cargo xtask bench`, end to end: real packets over a veth pair between two namespaces the
//! bench creates (A sends, B receives), through zt, nftables and iptables holding the same
//! rules, every figure a ratio to no filtering (or a reference) measured in the same run.
//!
//! - **UDP, 64-byte frames.** The generator is the kernel's XDP "live frames" test mode
//!   (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES) run in A: a 15-instruction program
//!   gives each frame a random source port (1024 flows) and redirects it out of A's veth, so B
//!   receives frames as from a NIC, with no socket or IP stack of A's in the way. Counted in B
//!   as what reached UDP (`InDatagrams` + `RcvbufErrors`), a receiver draining with `recvmmsg`.
//!   Where the kernel refuses live frames (EPERM, even to root, on some builds), a packet socket
//!   in A sends the same frames instead, and the results say which generator ran.
//! - **TCP**: one connection A → B, 128 KiB writes, bytes read in B.
//! - **A denied flood**: the same generator, to a port no rule names, each mechanism at its
//!   earliest hook counting its own drops: zt's XDP program (its counters map), iptables' raw
//!   table (the DROP rule's counter), nftables' netdev ingress (a named counter).
//!
//! Policies: the bench policy (`zt_tests::bench_policy`, on UDP or TCP, 1000 identities; A is
//! w2, B is w1) at 10, 1k and 10k rules; the measured flow is rule 1's (w2 → w1:1024).
//! - zt: the datapath the agent loads, in this process, pinned, enforcing, on B's veth: its XDP
//!   program (the veth marked an uplink) or, as another condition, its TC programs (a workload's);
//! - nftables: an `inet` input chain, `ct state established,related accept`, then one lookup of
//!   `ip saddr . ip daddr . <proto> dport` in a set of every rule, policy drop;
//! - iptables (the system's: iptables-nft on Debian 12): the same conntrack rule first, then one
//!   `-s -d -p --dport -j ACCEPT` per rule, the measured flow's last, policy drop.
//!
//! Fair: all three keep state, so established TCP skips the rules in each. One-way UDP never
//! becomes ESTABLISHED in netfilter's conntrack (that needs a reply), so iptables and nftables
//! judge every UDP packet by their rules, while zt's conntrack passes a flow's later packets —
//! each as it is built. A flood packet is a new flow to every mechanism.
//!
//! References, on B's veth in the same run: the **XDP floor** (datapath.rs's program that passes
//! everything: what any XDP program costs here) and, for the flood, the **XDP reference**
//! (zt's parser, one hash lookup, drop: the cheapest drop, so the generator's ceiling). A
//! diagnostic shows what zt's source check (a FIB lookup of the source) costs: its XDP program
//! on a veth not marked an uplink, where it skips the check.
//!
//! Shared, noisy machine: all conditions of a rule size are set up at once (fresh namespaces
//! each) and measured in turn, in 3 rounds of 0.5 s warm-up and 1 s measured; a figure is the
//! median of its rounds, a ratio the median of the rounds' ratios. The generator is one test
//! run of `u32::MAX` frames, ended by a signal: a run's set-up and tear-down take tens of
//! milliseconds, which short runs would leave as idle gaps. It shares a core with B's receive
//! path (veth runs B's NAPI in the sender's softirq), so a filter's cost shows as a lower rate;
//! ns/pkt is 1/rate. B's veth has GRO on in every condition (a veth takes redirected frames
//! only with NAPI, which GRO or an XDP program turns on). XDP on a veth turns its peer's GSO
//! off, so TCP under any XDP program there (the floor's too) is sent as MTU-sized segments; a
//! NIC's XDP costs its sender nothing of the kind.
//!
//! Appends its tables to bench/results/<date>.md and its figures to the .json that
//! `benches/datapath.rs` wrote. Needs root.

use std::{
    any::Any,
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Once,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};
use etherparse::PacketBuilder;
use nix::{
    libc,
    sched::CloneFlags,
    sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal},
};
use serde_json::{json, Value};
use zt_agent::{
    datapath::{capacity::Capacities, Datapath, Mode, PinDir},
    events::limits::EventLimitSettings,
    policy,
};
use zt_common::{programs, Verdict};
use zt_tests::{
    bench_policy::{address, policy_text_for, rule},
    BpffsDir, Netns,
};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const IDENTITIES: usize = 1_000;
/// A is w2, B is w1: rule 1 lets w2 reach w1 on port 1024.
const SENDER: usize = 2;
const RECEIVER: usize = 1;
const RULE: usize = 1;
/// A port no rule names (rules use 1024 and up): the flood's.
const DENIED_PORT: u16 = 9;
/// Per round; every figure has ROUNDS of them.
const ROUNDS: usize = 3;
const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(1);
const A_IF: &str = "wire0";
const B_IF: &str = "wire1";
const A_MAC: [u8; 6] = [2, 0x7a, 0, 0, 0, 1];
const B_MAC: [u8; 6] = [2, 0x7a, 0, 0, 0, 2];
/// 18 bytes of UDP payload: a 60-byte frame, 64 on the wire with its FCS.
const PAYLOAD: [u8; 18] = [0x5a; 18];

fn sender_ip() -> Ipv4Addr {
    let std::net::IpAddr::V4(ip) = address(SENDER, false) else { unreachable!() };
    ip
}

fn receiver_ip() -> Ipv4Addr {
    let std::net::IpAddr::V4(ip) = address(RECEIVER, false) else { unreachable!() };
    ip
}

/// Runs `program args…` in `ns`; panics with its stderr when it fails.
fn run(ns: &Netns, program: &str, args: &[&str]) -> String {
    let output = ns.exec(program, args);
    assert!(output.status.success(), "`{program} {}` in {ns}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Two namespaces joined by a veth pair: A (`wire0`, w2's address) and B (`wire1`, w1's).
struct Pair {
    a: Netns,
    b: Netns,
}

impl Pair {
    fn new() -> Pair {
        let (a, b) = (Netns::new("wire-a").unwrap(), Netns::new("wire-b").unwrap());
        // IPv4 only: no neighbour discovery or MLD beside the measured traffic.
        for ns in [&a, &b] {
            run(ns, "sysctl", &["-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        let mac = |m: [u8; 6]| m.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":");
        let (a_mac, b_mac) = (mac(A_MAC), mac(B_MAC));
        run(&a, "ip", &["link", "add", A_IF, "address", &a_mac, "type", "veth", "peer", "name", B_IF, "address", &b_mac, "netns", b.name()]);
        for (ns, interface, ip) in [(&a, A_IF, sender_ip()), (&b, B_IF, receiver_ip())] {
            run(ns, "ip", &["addr", "add", &format!("{ip}/16"), "dev", interface]);
            run(ns, "ip", &["link", "set", interface, "up"]);
        }
        // B routes, as a node does (zt checks an uplink packet's source against B's routes).
        run(&b, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        // NAPI on B's veth in every condition: redirected frames need it (XDP turns it on too).
        run(&b, "ethtool", &["-K", B_IF, "gro", "on"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !run(&b, "ip", &["-br", "link", "show", B_IF]).contains(" UP ") {
            assert!(Instant::now() < deadline, "{B_IF} never came up");
            thread::sleep(Duration::from_millis(10));
        }
        Pair { a, b }
    }

    fn sender_ifindex(&self) -> u32 {
        run(&self.a, "cat", &[&format!("/sys/class/net/{A_IF}/ifindex")]).trim().parse().unwrap()
    }
}

/// Starts a thread that enters `ns` and runs `f` there.
fn spawn_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let file = fs::File::open(ns.path()).unwrap();
    thread::spawn(move || {
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

// ---- The generator: a raw XDP program in BPF_PROG_TEST_RUN's live-frames mode ----

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// One BPF instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64 | ((dst | src << 4) as u64) << 8 | (off as u16 as u64) << 16 | (imm as u32 as u64) << 32
}

/// Sets a random UDP source port in 1024..2048 (1024 flows), then redirects out of `ifindex`.
fn generator_program(ifindex: u32) -> Vec<u64> {
    vec![
        insn(0xbf, 6, 1, 0, 0),    // r6 = ctx
        insn(0x85, 0, 0, 0, 7),    // r0 = bpf_get_prandom_u32()
        insn(0x61, 2, 6, 0, 0),    // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),    // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),    // r4 = r2
        insn(0x07, 4, 0, 0, 42),   // r4 += 42 (Ethernet, IPv4, UDP headers)
        insn(0x2d, 4, 3, 4, 0),    // if r4 > r3 skip the next four
        insn(0x57, 0, 0, 0, 1023), // r0 &= 1023
        insn(0x07, 0, 0, 0, 1024), // r0 += 1024
        insn(0xdc, 0, 0, 0, 16),   // r0 = htons(r0)
        insn(0x6b, 2, 0, 34, 0),   // *(u16 *)(r2 + 34) = r0: the UDP source port
        insn(0xb7, 1, 0, 0, ifindex as i32),
        insn(0xb7, 2, 0, 0, 0),
        insn(0x85, 0, 0, 0, 23), // return bpf_redirect(ifindex, 0)
        insn(0x95, 0, 0, 0, 0),
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
}

fn load_generator(ifindex: u32) -> OwnedFd {
    let insns = generator_program(ifindex);
    let license = c"GPL";
    let mut log = vec![0u8; 65_536];
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf.
    let mut attr = [0u64; 16];
    attr[0] = BPF_PROG_TYPE_XDP as u64 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | (log.len() as u64) << 32;
    attr[4] = log.as_mut_ptr() as u64;
    let fd = bpf(BPF_PROG_LOAD, &mut attr);
    assert!(fd >= 0, "loading the generator: {}\n{}", std::io::Error::last_os_error(), String::from_utf8_lossy(&log));
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Which generator sends: XDP live frames where the kernel allows them, else a packet socket
/// (some kernels refuse live frames with EPERM even to root). Said in the results.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GeneratorKind {
    LiveFrames,
    PacketSocket,
}

impl GeneratorKind {
    fn describe(self) -> &'static str {
        match self {
            Self::LiveFrames => "XDP live frames (BPF_PROG_TEST_RUN)",
            Self::PacketSocket => {
                "a packet socket (AF_PACKET, qdisc bypassed, `sendmmsg` of 64 frames; this kernel refuses XDP live frames with EPERM), which costs the sending core more per frame"
            }
        }
    }
}

/// Whether this kernel runs the generator in live-frames mode: one frame, in a namespace of
/// its own with nothing but loopback (where it is redirected to nothing and freed).
fn generator_kind() -> GeneratorKind {
    static KIND: std::sync::OnceLock<GeneratorKind> = std::sync::OnceLock::new();
    *KIND.get_or_init(|| {
        let probe = Netns::new("wire-probe").unwrap();
        let program = load_generator(1);
        let frame = udp_frame(1024);
        let allowed = spawn_in(&probe, move || test_run_live(&program, &frame, 1)).join().unwrap();
        match allowed {
            Ok(()) => GeneratorKind::LiveFrames,
            Err(error) if error.raw_os_error() == Some(libc::EPERM) => GeneratorKind::PacketSocket,
            Err(error) => panic!("the generator's probe run: {error}"),
        }
    })
}

/// One BPF_PROG_TEST_RUN of `frame` in live-frames mode, `repeat` times.
fn test_run_live(program: &OwnedFd, frame: &[u8], repeat: u32) -> std::io::Result<()> {
    // union bpf_attr, BPF_PROG_TEST_RUN: prog_fd, data_size_in, data_in, repeat, flags.
    let mut attr = [0u64; 16];
    attr[0] = program.as_raw_fd() as u64;
    attr[1] = frame.len() as u64;
    attr[2] = frame.as_ptr() as u64;
    attr[4] = repeat as u64;
    attr[8] = BPF_F_TEST_XDP_LIVE_FRAMES as u64;
    if bpf(BPF_PROG_TEST_RUN, &mut attr) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// One I/O vector per buffer, for `sendmmsg` and `recvmmsg`.
fn iovecs_of<'a>(buffers: impl Iterator<Item = &'a mut [u8]>) -> Vec<libc::iovec> {
    buffers.map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect()
}

/// One message header per I/O vector. The headers point into `iovecs` (and those into their
/// buffers), which must outlive them and stay where they are.
fn message_headers(iovecs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovecs
        .iter_mut()
        .map(|iov| {
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect()
}

/// Sends frames out of A's `ifindex` through a packet socket until `stop`: batches of 64, each
/// frame with its own source port of the 1024 flows, as the XDP generator's random ones.
fn send_through_packet_socket(ifindex: u32, frame: &[u8], stop: &AtomicBool) -> std::io::Result<()> {
    const BATCH: usize = 64;
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    address.sll_ifindex = ifindex as i32;
    let ok = unsafe {
        libc::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, (&one as *const libc::c_int).cast(), 4) == 0
            && libc::bind(fd, (&address as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    let mut frames: Vec<Vec<u8>> = vec![frame.to_vec(); BATCH];
    let mut iovecs = iovecs_of(frames.iter_mut().map(|f| f.as_mut_slice()));
    let mut messages = message_headers(&mut iovecs);
    let mut flow = 0u16;
    while !stop.load(Ordering::Relaxed) {
        // Through the buffers the headers point at (moving nothing).
        for frame in &mut frames {
            frame[34..36].copy_from_slice(&(1024 + flow).to_be_bytes());
            flow = (flow + 1) % 1024;
        }
        let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), BATCH as u32, 0) };
        if sent < 0 {
            let error = std::io::Error::last_os_error();
            // A full transmit path: try again.
            if !matches!(error.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)) {
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Sends `frame` out of A's veth until dropped. Live frames: one test run of `u32::MAX`
/// frames, ended by a signal: each run's start and end cost tens of milliseconds (the kernel
/// sets up and tears down a page pool), which short runs would spread over the measured
/// interval as idle gaps.
struct Generator {
    stop: Arc<AtomicBool>,
    thread: Option<(JoinHandle<()>, libc::pthread_t)>,
}

extern "C" fn interrupt(_: libc::c_int) {}

impl Generator {
    fn start(pair: &Pair, frame: Vec<u8>) -> Generator {
        static HANDLER: Once = Once::new();
        // No SA_RESTART: the signal ends the test run (EINTR) instead of restarting it.
        let action = SigAction::new(SigHandler::Handler(interrupt), SaFlags::empty(), SigSet::empty());
        HANDLER.call_once(|| unsafe { sigaction(Signal::SIGUSR1, &action) }.map(drop).unwrap());
        let kind = generator_kind();
        let ifindex = pair.sender_ifindex();
        let program = load_generator(ifindex);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // In A: a live frame's redirect looks its target up in the runner's namespace.
        let thread = spawn_in(&pair.a, move || {
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            if kind == GeneratorKind::PacketSocket {
                send_through_packet_socket(ifindex, &frame, &flag).unwrap_or_else(|e| panic!("the packet socket generator: {e}"));
                return;
            }
            while !flag.load(Ordering::Relaxed) {
                if let Err(error) = test_run_live(&program, &frame, u32::MAX) {
                    assert!(error.raw_os_error() == Some(libc::EINTR), "the generator's test run: {error}");
                }
            }
        });
        let id = rx.recv().unwrap();
        Generator { stop, thread: Some((thread, id)) }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some((thread, id)) = self.thread.take() else { return };
        // Until it notices: a signal between two runs interrupts nothing.
        while !thread.is_finished() {
            unsafe { libc::pthread_kill(id, libc::SIGUSR1) };
            thread::sleep(Duration::from_millis(5));
        }
        // A failed test run panics in the thread; say so here.
        if thread.join().is_err() && !thread::panicking() {
            panic!("the generator failed");
        }
    }
}

/// A 64-byte UDP frame from A to B's `port`, UDP checksum 0 (none): the generator rewrites the
/// source port.
fn udp_frame(port: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(A_MAC, B_MAC).ipv4(sender_ip().octets(), receiver_ip().octets(), 64).udp(1024, port);
    let mut frame = Vec::with_capacity(builder.size(PAYLOAD.len()));
    builder.write(&mut frame, &PAYLOAD).unwrap();
    frame[40..42].fill(0);
    assert_eq!(frame.len(), 60);
    frame
}

// ---- Receivers ----

/// Drains a UDP socket in B with `recvmmsg` until stopped.
struct UdpSink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    fn start(pair: &Pair, port: u16) -> UdpSink {
        let socket = pair.b.run(|| UdpSocket::bind((receiver_ip(), port))).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let size: libc::c_int = 8 << 20;
        let fd = socket.as_raw_fd();
        unsafe {
            let value = (&size as *const libc::c_int).cast();
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, value, size_of::<libc::c_int>() as u32);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            const BATCH: usize = 64;
            let mut buffers = vec![[0u8; 64]; BATCH];
            let mut iovecs = iovecs_of(buffers.iter_mut().map(|b| b.as_mut_slice()));
            let mut headers = message_headers(&mut iovecs);
            while !flag.load(Ordering::Relaxed) {
                unsafe { libc::recvmmsg(fd, headers.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
            }
            drop(socket);
        });
        UdpSink { stop, thread: Some(thread) }
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().unwrap().join();
    }
}

/// Datagrams that reached UDP in B: queued to the socket or refused by its full buffer.
fn udp_delivered(pair: &Pair) -> u64 {
    let snmp = pair.b.run(|| fs::read_to_string("/proc/thread-self/net/snmp")).unwrap();
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let value = |name: &str| -> u64 {
        let at = names.split_whitespace().position(|n| n == name).unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    };
    value("InDatagrams") + value("RcvbufErrors")
}

/// One TCP connection A → B, written to with 128 KiB writes until stopped; bytes read in B.
struct TcpFlow {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpFlow {
    fn start(pair: &Pair, port: u16) -> TcpFlow {
        let listener = pair.b.run(|| TcpListener::bind((receiver_ip(), port))).unwrap();
        let addr = SocketAddr::from((receiver_ip(), port));
        let mut sender = pair.a.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5))).expect("the rules allow the TCP flow");
        let (mut receiver, _) = listener.accept().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        for stream in [&sender, &receiver] {
            stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            stream.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
        }
        let (flag, count) = (stop.clone(), received.clone());
        let reader = thread::spawn(move || {
            let mut buffer = vec![0u8; 256 << 10];
            while !flag.load(Ordering::Relaxed) {
                if let Ok(n) = receiver.read(&mut buffer) {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        let flag = stop.clone();
        let writer = thread::spawn(move || {
            let buffer = vec![0x5au8; 128 << 10];
            while !flag.load(Ordering::Relaxed) {
                let _ = sender.write(&buffer);
            }
        });
        TcpFlow { stop, received, threads: vec![reader, writer] }
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

// ---- The filters ----

#[derive(Clone, Copy, PartialEq, Debug)]
enum Filter {
    None,
    /// datapath.rs's floor, an XDP program that passes everything: what any XDP program costs.
    XdpFloor,
    ZtXdp,
    /// Diagnostic: zt's XDP program on a veth not marked an uplink, so without its source check.
    ZtXdpUnchecked,
    ZtTc,
    Nft,
    Iptables,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::None => "no filtering",
            Filter::XdpFloor => "XDP floor",
            Filter::ZtXdp => "zt, XDP",
            Filter::ZtXdpUnchecked => "zt, XDP, no source check (diagnostic)",
            Filter::ZtTc => "zt, TC",
            Filter::Nft => "nftables",
            Filter::Iptables => "iptables",
        }
    }
}

const FILTERS: [Filter; 7] =
    [Filter::None, Filter::XdpFloor, Filter::ZtXdp, Filter::ZtXdpUnchecked, Filter::ZtTc, Filter::Nft, Filter::Iptables];

/// Where zt's programs go on B's veth.
#[derive(Clone, Copy, PartialEq)]
enum Attach {
    /// XDP, the veth marked an uplink, as `--uplink` does.
    Uplink,
    /// TC ingress and egress, the veth marked a workload's, as `--attach` does.
    Workload,
    /// XDP attached directly, the veth not marked: zt skips its source check there.
    Unmarked,
}

/// zt's datapath as the agent loads it, pinned in a directory of this run's, enforcing.
struct Zt {
    datapath: Datapath,
    _pins: Arc<BpffsDir>,
}

impl Zt {
    fn start(pair: &Pair, rules: usize, protocol: &str, attach: Attach) -> Zt {
        let pins = BpffsDir::new(&pair.b).unwrap();
        let dir = PinDir::open(pins.path()).unwrap();
        let mut datapath = Datapath::load_pinned(dir, Some(Mode::Enforce), Capacities::default()).expect("loading the datapath needs root");
        // The agent's default event limits: a flood is counted, not reported packet by packet.
        let limits = EventLimitSettings { window: Duration::from_secs(1), rate: 5_000, burst: 10_000 };
        datapath.set_event_limits(&limits).unwrap();
        let set = policy::parse_str(&policy_text_for(rules, IDENTITIES, protocol), "wire.yaml").expect("the bench policy parses");
        datapath.install(&policy::compile::compile(&set).expect("the bench policy compiles")).expect("the bench policy fits");
        let attached = pair.b.run(|| match attach {
            Attach::Uplink => datapath.attach_uplink(B_IF),
            Attach::Workload => datapath.attach_workload(B_IF),
            Attach::Unmarked => {
                let program = datapath.program::<Xdp>(programs::XDP)?;
                program.attach(B_IF, XdpMode::Driver).map(|_| ()).map_err(Into::into)
            }
        });
        attached.unwrap_or_else(|e| panic!("attaching zt to {B_IF}: {e:#}"));
        Zt { datapath, _pins: pins }
    }

    fn packets(&self, verdict: Verdict) -> u64 {
        self.datapath.counters().unwrap().all().filter(|c| c.verdict == verdict).map(|c| c.packets).sum()
    }
}

/// The rules as (source, destination, port), the measured flow's last.
fn rule_tuples(rules: usize) -> Vec<(Ipv4Addr, Ipv4Addr, u16)> {
    let v4 = |i| match address(i, false) {
        std::net::IpAddr::V4(ip) => ip,
        _ => unreachable!(),
    };
    let order = (0..rules).filter(|&k| k != RULE).chain([RULE]);
    order.map(|k| rule(k, IDENTITIES)).map(|(peer, subject, port)| (v4(peer), v4(subject), port)).collect()
}

/// Loads a ruleset file with `loader` (`nft -f`, `iptables-restore`) in B.
fn load_rules(pair: &Pair, loader: &[&str], text: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), text).unwrap();
    let mut args: Vec<&str> = loader[1..].to_vec();
    args.push(file.path().to_str().unwrap());
    run(&pair.b, loader[0], &args);
}

/// nftables, the best-practice way: conntrack first, then one set lookup, policy drop.
fn nft_input(rules: usize, protocol: &str) -> String {
    let mut text = format!(
        "table inet zt {{\n  set allowed {{\n    type ipv4_addr . ipv4_addr . inet_service\n    size {}\n    elements = {{\n",
        rules.max(1) * 2
    );
    for (src, dst, port) in rule_tuples(rules) {
        writeln!(text, "      {src} . {dst} . {port},").unwrap();
    }
    writeln!(text, "    }}\n  }}\n  chain input {{\n    type filter hook input priority filter; policy drop;").unwrap();
    writeln!(text, "    ct state established,related accept\n    ip saddr . ip daddr . {protocol} dport @allowed accept\n  }}\n}}").unwrap();
    text
}

/// iptables, linear: conntrack first, one rule per rule (the measured flow's last), policy drop.
fn iptables_input(rules: usize, protocol: &str) -> String {
    let mut text = String::from("*filter\n:INPUT DROP [0:0]\n-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for (src, dst, port) in rule_tuples(rules) {
        writeln!(text, "-A INPUT -s {src}/32 -d {dst}/32 -p {protocol} -m {protocol} --dport {port} -j ACCEPT").unwrap();
    }
    text.push_str("COMMIT\n");
    text
}

/// Installs `filter` in B; returns what must live while it is measured (zt's datapath, the
/// reference programs, or nothing).
fn install(pair: &Pair, filter: Filter, rules: usize, protocol: &str) -> Box<dyn Any> {
    match filter {
        Filter::None => Box::new(()),
        Filter::XdpFloor => Box::new(attach_reference(pair, programs::REFERENCE_FLOOR)),
        Filter::ZtXdp => Box::new(Zt::start(pair, rules, protocol, Attach::Uplink)),
        Filter::ZtXdpUnchecked => Box::new(Zt::start(pair, rules, protocol, Attach::Unmarked)),
        Filter::ZtTc => Box::new(Zt::start(pair, rules, protocol, Attach::Workload)),
        Filter::Nft => {
            load_rules(pair, &["nft", "-f"], &nft_input(rules, protocol));
            Box::new(())
        }
        Filter::Iptables => {
            load_rules(pair, &["iptables-restore"], &iptables_input(rules, protocol));
            Box::new(())
        }
    }
}

// ---- Measures ----

/// One condition, in namespaces of its own, kept while its rounds run.
struct Setup<K> {
    kind: K,
    pair: Pair,
    /// What must live while it is measured: zt's datapath, the reference programs, or nothing.
    installed: Box<dyn Any>,
}

/// Each condition's figure in each of [`ROUNDS`] rounds. A round measures every condition once,
/// in turn, so a slow moment of the (shared) machine falls on all of them alike.
fn interleaved<K>(setups: &[Setup<K>], mut once: impl FnMut(&Setup<K>) -> f64) -> Vec<Vec<f64>> {
    let mut figures = vec![Vec::new(); setups.len()];
    for _ in 0..ROUNDS {
        for (setup, figures) in setups.iter().zip(&mut figures) {
            figures.push(once(setup));
        }
    }
    figures
}

/// Warm-up, then `sample` before and after the measured interval; its increase per second.
fn rate(mut sample: impl FnMut() -> u64) -> f64 {
    thread::sleep(WARMUP);
    let (before, started) = (sample(), Instant::now());
    thread::sleep(MEASURE);
    let after = sample();
    (after - before) as f64 / started.elapsed().as_secs_f64()
}

fn filter_setups(rules: usize, protocol: &str) -> Vec<Setup<Filter>> {
    FILTERS
        .iter()
        .map(|&filter| {
            let pair = Pair::new();
            let installed = install(&pair, filter, rules, protocol);
            Setup { kind: filter, pair, installed }
        })
        .collect()
}

/// UDP datagrams per second that reach B's socket layer.
fn udp_once(setup: &Setup<Filter>) -> f64 {
    let _sink = UdpSink::start(&setup.pair, 1024);
    let generator = Generator::start(&setup.pair, udp_frame(1024));
    let pps = rate(|| udp_delivered(&setup.pair));
    drop(generator);
    if let Some(zt) = setup.installed.downcast_ref::<Zt>() {
        let counters = zt.datapath.counters().unwrap();
        let denied: Vec<_> = counters.nonzero().filter(|c| c.verdict == Verdict::Deny).collect();
        assert!(denied.is_empty(), "zt denied some of the allowed flow: {denied:?}");
    }
    assert!(pps > 0.0, "{}: nothing reached B", setup.kind.name());
    pps
}

/// TCP Gbit/s from A to B, a new connection each round.
fn tcp_once(setup: &Setup<Filter>) -> f64 {
    let flow = TcpFlow::start(&setup.pair, 1024);
    let bytes_per_s = rate(|| flow.received.load(Ordering::Relaxed));
    assert!(bytes_per_s > 0.0, "{}: the TCP flow carried nothing", setup.kind.name());
    bytes_per_s * 8.0 / 1e9
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Dropper {
    /// datapath.rs's lookup reference: zt's parser and one hash lookup, then XDP_DROP.
    Reference,
    ZtXdp,
    /// Diagnostic: zt's XDP program on a veth not marked an uplink, so without its source check.
    ZtXdpUnchecked,
    IptablesRaw,
    NftNetdev,
}

impl Dropper {
    fn name(self) -> &'static str {
        match self {
            Dropper::Reference => "XDP reference",
            Dropper::ZtXdp => "zt, XDP",
            Dropper::ZtXdpUnchecked => "zt, XDP, no source check (diagnostic)",
            Dropper::IptablesRaw => "iptables raw",
            Dropper::NftNetdev => "nftables netdev",
        }
    }
}

const DROPPERS: [Dropper; 5] =
    [Dropper::Reference, Dropper::ZtXdp, Dropper::ZtXdpUnchecked, Dropper::IptablesRaw, Dropper::NftNetdev];

/// iptables' raw table: the rules (ACCEPT ends the raw table's walk), then DROP.
fn iptables_raw(rules: usize) -> String {
    let mut text = String::from("*raw\n");
    for (src, dst, port) in rule_tuples(rules) {
        writeln!(text, "-A PREROUTING -s {src}/32 -d {dst}/32 -p udp -m udp --dport {port} -j ACCEPT").unwrap();
    }
    text.push_str("-A PREROUTING -j DROP\nCOMMIT\n");
    text
}

/// nftables on B's veth ingress: the set lookup, then a counted drop.
fn nft_netdev(rules: usize) -> String {
    let mut text = format!("table netdev zt {{\n  counter drops {{}}\n  set allowed {{\n    type ipv4_addr . ipv4_addr . inet_service\n    size {}\n    elements = {{\n", rules.max(1) * 2);
    for (src, dst, port) in rule_tuples(rules) {
        writeln!(text, "      {src} . {dst} . {port},").unwrap();
    }
    writeln!(text, "    }}\n  }}\n  chain ingress {{\n    type filter hook ingress device \"{B_IF}\" priority 0; policy accept;").unwrap();
    writeln!(text, "    ip saddr . ip daddr . udp dport @allowed accept\n    counter name \"drops\" drop\n  }}\n}}").unwrap();
    text
}

/// The reference programs, `name` attached to B's veth (natively, as zt's uplink XDP).
fn attach_reference(pair: &Pair, name: &str) -> Ebpf {
    let mut references = zt_agent::datapath::reference_programs().expect("the reference programs load");
    let program: &mut Xdp = references.program_mut(name).unwrap().try_into().unwrap();
    pair.b.run(|| program.attach(B_IF, XdpMode::Driver)).expect("native XDP on a veth");
    references
}

/// The frames B's veth saw its XDP program drop (`ethtool -S`, per queue).
fn xdp_drops(pair: &Pair) -> u64 {
    let stats = run(&pair.b, "ethtool", &["-S", B_IF]);
    let drops = stats.lines().filter_map(|l| l.trim().strip_prefix("rx_queue_")?.split_once("_xdp_drops: ").map(|(_, n)| n.to_owned()));
    drops.map(|n| n.parse::<u64>().unwrap()).sum()
}

/// The packets iptables' final raw DROP rule counted.
fn iptables_raw_drops(pair: &Pair) -> u64 {
    let listing = run(&pair.b, "iptables", &["-t", "raw", "-vnxL", "PREROUTING"]);
    let last = listing.lines().rev().find(|line| !line.trim().is_empty()).unwrap();
    assert!(last.contains("DROP"), "the raw table's last rule is not the DROP: {last}");
    last.split_whitespace().next().unwrap().parse().unwrap()
}

fn nft_drops(pair: &Pair) -> u64 {
    let listing = run(&pair.b, "nft", &["list", "counter", "netdev", "zt", "drops"]);
    let packets = listing.split_whitespace().skip_while(|w| *w != "packets").nth(1).unwrap();
    packets.parse().unwrap()
}

fn dropper_setups(rules: usize) -> Vec<Setup<Dropper>> {
    DROPPERS
        .iter()
        .map(|&dropper| {
            let pair = Pair::new();
            let installed: Box<dyn Any> = match dropper {
                Dropper::Reference => Box::new(attach_reference(&pair, programs::REFERENCE_LOOKUP)),
                Dropper::ZtXdp => Box::new(Zt::start(&pair, rules, "udp", Attach::Uplink)),
                Dropper::ZtXdpUnchecked => Box::new(Zt::start(&pair, rules, "udp", Attach::Unmarked)),
                Dropper::IptablesRaw => {
                    load_rules(&pair, &["iptables-restore"], &iptables_raw(rules));
                    Box::new(())
                }
                Dropper::NftNetdev => {
                    load_rules(&pair, &["nft", "-f"], &nft_netdev(rules));
                    Box::new(())
                }
            };
            Setup { kind: dropper, pair, installed }
        })
        .collect()
}

/// Packets per second of a flood it denies that the mechanism drops, by its own counter.
fn drop_once(setup: &Setup<Dropper>) -> f64 {
    let (pair, dropper) = (&setup.pair, setup.kind);
    let before = udp_delivered(pair);
    let generator = Generator::start(pair, udp_frame(DENIED_PORT));
    let dropped = rate(|| match dropper {
        // It has no counter of its own: the veth counts its XDP drops.
        Dropper::Reference => xdp_drops(pair),
        Dropper::ZtXdp | Dropper::ZtXdpUnchecked => setup.installed.downcast_ref::<Zt>().unwrap().packets(Verdict::Deny),
        Dropper::IptablesRaw => iptables_raw_drops(pair),
        Dropper::NftNetdev => nft_drops(pair),
    });
    drop(generator);
    assert_eq!(udp_delivered(pair), before, "{}: some of the flood got through", dropper.name());
    assert!(dropped > 0.0, "{}: counted no drops", dropper.name());
    dropped
}

// ---- Report ----

/// A filter's figures at one rule size, one a round.
struct Row {
    rules: usize,
    filter: Filter,
    udp_pps: Vec<f64>,
    tcp_gbps: Vec<f64>,
}

/// A mechanism's drop rates at one rule size, one a round.
struct DropRow {
    rules: usize,
    dropper: Dropper,
    per_s: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

/// The median over rounds of `a / b`, each round's figures divided by each other.
fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>())
}

/// "on"/"off": A's veth TSO, without and with zt's XDP program on B's veth.
fn sender_tso() -> (String, String) {
    let pair = Pair::new();
    let tso = || {
        let features = run(&pair.a, "ethtool", &["-k", A_IF]);
        let line = features.lines().find(|l| l.starts_with("tcp-segmentation-offload:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().to_owned()
    };
    let without = tso();
    let _zt = Zt::start(&pair, 10, "tcp", Attach::Uplink);
    (without, tso())
}

fn log<K: Copy>(what: &str, rules: usize, setups: &[Setup<K>], name: impl Fn(K) -> &'static str, figures: &[Vec<f64>]) {
    for (setup, figures) in setups.iter().zip(figures) {
        eprintln!("bench: wire, {rules} rules, {what}, {}: median {:.3} of {figures:.3?}", name(setup.kind), median(figures));
    }
}

fn main() {
    let date = String::from_utf8(std::process::Command::new("date").arg("+%F").output().unwrap().stdout).unwrap();
    let date = date.trim();
    let started = Instant::now();
    let tso = sender_tso();
    let mut rows = Vec::new();
    let mut drops = Vec::new();
    for rules in SIZES {
        let setups = filter_setups(rules, "udp");
        let udp = interleaved(&setups, udp_once);
        log("UDP pps", rules, &setups, Filter::name, &udp);
        drop(setups);
        let setups = filter_setups(rules, "tcp");
        let tcp = interleaved(&setups, tcp_once);
        log("TCP Gbit/s", rules, &setups, Filter::name, &tcp);
        for ((filter, udp_pps), tcp_gbps) in FILTERS.into_iter().zip(udp).zip(tcp) {
            rows.push(Row { rules, filter, udp_pps, tcp_gbps });
        }
        drop(setups);
        let setups = dropper_setups(rules);
        let rates = interleaved(&setups, drop_once);
        log("drops/s", rules, &setups, Dropper::name, &rates);
        drops.extend(DROPPERS.into_iter().zip(rates).map(|(dropper, per_s)| DropRow { rules, dropper, per_s }));
    }
    eprintln!("bench: wire took {:.0} s", started.elapsed().as_secs_f64());
    let md = report(&rows, &drops, &tso);
    print!("{md}");
    append_results(date, &md, results_json(&rows, &drops, &tso));
}

fn row(rows: &[Row], rules: usize, filter: Filter) -> &Row {
    rows.iter().find(|r| r.rules == rules && r.filter == filter).unwrap()
}

fn drop_row(drops: &[DropRow], rules: usize, dropper: Dropper) -> &DropRow {
    drops.iter().find(|d| d.rules == rules && d.dropper == dropper).unwrap()
}

fn report(rows: &[Row], drops: &[DropRow], tso: &(String, String)) -> String {
    let mut md = String::new();
    writeln!(md, "\n## End to end over a veth pair: UDP 64-byte frames, TCP, a denied flood\n").unwrap();
    writeln!(md, "`tests/benches/wire.rs` (its doc comment has the method): namespaces A → B, the bench policy's rules ({IDENTITIES} identities) in each filter, the measured flow allowed by the rule iptables holds last. Every condition of a rule size is set up at once, then measured in {ROUNDS} interleaved rounds ({} ms warm-up, {} ms measured each); a figure is the median over rounds, a ratio the median of the rounds' ratios.", WARMUP.as_millis(), MEASURE.as_millis()).unwrap();
    let reference: Vec<f64> = drops.iter().filter(|d| d.dropper == Dropper::Reference).flat_map(|d| d.per_s.iter().copied()).collect();
    writeln!(md, "Generator: {}.", generator_kind().describe()).unwrap();
    writeln!(md, "The generator with the cheapest drop on B's veth (the XDP reference below) takes {:.0} ns a frame of every ns/pkt. A's veth TSO: {} without XDP on B's veth, {} with zt's (the veth driver turns its peer's GSO off under any XDP program: see the XDP floor's TCP; a NIC's XDP costs its sender nothing of the kind).\n", 1e9 / median(&reference), tso.0, tso.1).unwrap();
    writeln!(md, "| rules | filter | UDP kpps | ns/pkt | × none | TCP Gbit/s | × none |\n|---:|---|---:|---:|---:|---:|---:|").unwrap();
    for r in rows {
        let none = row(rows, r.rules, Filter::None);
        let (udp, tcp) = (median(&r.udp_pps), median(&r.tcp_gbps));
        writeln!(md, "| {} | {} | {:.0} | {:.0} | {:.2} | {tcp:.1} | {:.2} |", r.rules, r.filter.name(), udp / 1e3, 1e9 / udp, ratio(&r.udp_pps, &none.udp_pps), ratio(&r.tcp_gbps, &none.tcp_gbps)).unwrap();
    }
    writeln!(md, "\nzt against the others, × their figure (the XDP floor: an XDP program that passes everything, on the same veth):\n").unwrap();
    writeln!(md, "| rules | zt hook | UDP × nftables | UDP × iptables | TCP × nftables | TCP × iptables | UDP × XDP floor | TCP × XDP floor |\n|---:|---|---:|---:|---:|---:|---:|---:|").unwrap();
    for r in rows.iter().filter(|r| matches!(r.filter, Filter::ZtXdp | Filter::ZtTc)) {
        let (nft, ipt, floor) = (row(rows, r.rules, Filter::Nft), row(rows, r.rules, Filter::Iptables), row(rows, r.rules, Filter::XdpFloor));
        let hook = if r.filter == Filter::ZtXdp { "XDP" } else { "TC" };
        let vs_floor = if r.filter == Filter::ZtXdp { format!("{:.2} | {:.2}", ratio(&r.udp_pps, &floor.udp_pps), ratio(&r.tcp_gbps, &floor.tcp_gbps)) } else { "— | —".into() };
        writeln!(md, "| {} | {hook} | {:.2} | {:.2} | {:.2} | {:.2} | {vs_floor} |", r.rules, ratio(&r.udp_pps, &nft.udp_pps), ratio(&r.udp_pps, &ipt.udp_pps), ratio(&r.tcp_gbps, &nft.tcp_gbps), ratio(&r.tcp_gbps, &ipt.tcp_gbps)).unwrap();
    }
    writeln!(md, "\nA denied flood (UDP to a port no rule names): packets dropped per second at each mechanism's earliest hook, by its own counter. The XDP reference (zt's parser, one hash lookup, drop) is the least a drop on B's veth costs with this generator; zt without its source check is a diagnostic (its XDP program on a veth not marked an uplink):\n").unwrap();
    writeln!(md, "| rules | zt XDP kpps | × XDP reference | iptables raw kpps | nftables netdev kpps | zt × iptables raw | zt × nftables netdev | XDP reference kpps | zt without its source check kpps |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for rules in SIZES {
        let per_s = |d: Dropper| &drop_row(drops, rules, d).per_s;
        let (zt, ipt, nft, reference) = (per_s(Dropper::ZtXdp), per_s(Dropper::IptablesRaw), per_s(Dropper::NftNetdev), per_s(Dropper::Reference));
        let unchecked = per_s(Dropper::ZtXdpUnchecked);
        writeln!(md, "| {rules} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} |", median(zt) / 1e3, ratio(zt, reference), median(ipt) / 1e3, median(nft) / 1e3, ratio(zt, ipt), ratio(zt, nft), median(reference) / 1e3, median(unchecked) / 1e3).unwrap();
    }
    md
}

fn results_json(rows: &[Row], drops: &[DropRow], tso: &(String, String)) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let (none, nft, ipt) = (row(rows, r.rules, Filter::None), row(rows, r.rules, Filter::Nft), row(rows, r.rules, Filter::Iptables));
            json!({"rules": r.rules, "filter": r.filter.name(),
                "udp_pps": median(&r.udp_pps), "udp_pps_rounds": r.udp_pps, "udp_vs_none": ratio(&r.udp_pps, &none.udp_pps),
                "udp_vs_nftables": ratio(&r.udp_pps, &nft.udp_pps), "udp_vs_iptables": ratio(&r.udp_pps, &ipt.udp_pps),
                "tcp_gbps": median(&r.tcp_gbps), "tcp_gbps_rounds": r.tcp_gbps, "tcp_vs_none": ratio(&r.tcp_gbps, &none.tcp_gbps),
                "tcp_vs_nftables": ratio(&r.tcp_gbps, &nft.tcp_gbps), "tcp_vs_iptables": ratio(&r.tcp_gbps, &ipt.tcp_gbps)})
        })
        .collect();
    let drops: Vec<Value> = drops
        .iter()
        .map(|d| {
            let (zt, reference) = (&drop_row(drops, d.rules, Dropper::ZtXdp).per_s, &drop_row(drops, d.rules, Dropper::Reference).per_s);
            json!({"rules": d.rules, "mechanism": d.dropper.name(), "drops_per_s": median(&d.per_s), "rounds": d.per_s,
                "vs_reference": ratio(&d.per_s, reference), "zt_vs_this": ratio(zt, &d.per_s)})
        })
        .collect();
    json!({
        "identities": IDENTITIES, "rounds": ROUNDS, "warmup_s": WARMUP.as_secs_f64(), "measure_s": MEASURE.as_secs_f64(),
        "sender_tso": {"without_xdp": tso.0, "with_zt_xdp": tso.1}, "generator": generator_kind().describe(),
        "rows": rows, "drops": drops,
    })
}

/// Appends to the day's .md and adds `wire` to its .json (both written by benches/datapath.rs).
fn append_results(date: &str, md: &str, wire: Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    fs::create_dir_all(&dir).unwrap();
    let md_path = dir.join(format!("{date}.md"));
    let mut text = fs::read_to_string(&md_path).unwrap_or_default();
    text.push_str(md);
    fs::write(&md_path, text).unwrap();
    let json_path = dir.join(format!("{date}.json"));
    let mut results: Value = fs::read_to_string(&json_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_else(|| json!({}));
    results["wire"] = wire;
    fs::write(&json_path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    eprintln!("bench: appended to {}", md_path.display());
}
