//! Packet fuzzer: random and mutated frames — fragment trains in and out of order, overlapping,
//! tiny and orphaned fragments, IPv4 options and AH, IPv6 extension chains (short and too long),
//! zero to three VLAN tags, neighbour discovery, truncations, flipped bytes and plain noise —
//! run through the loaded programs with BPF_PROG_TEST_RUN, on a random hook each (TC ingress,
//! TC egress, XDP), under random policy sets (the generator `differential.rs` uses).
//!
//! Each frame is also judged by a model that shares no code with the datapath: it reads the
//! frame with etherparse's header slices the way a receiving stack would, keeps its own fragment
//! trains and conntrack, and asks the agent's reference evaluator about each flow it finds. Its
//! rules are the ones zt documents (docs/hostile-input.md):
//! - ARP passes; IPv6 neighbour discovery (ICMPv6 133-137, hop limit 255, not fragmented)
//!   passes; every other frame is an IP flow or denied.
//! - A flow passes if the evaluator does not deny it, or if it belongs to a flow the model let
//!   through earlier (either direction).
//! - A first fragment is judged by the L4 header it must hold; a later fragment passes only as
//!   part of a train whose first fragment was seen, whose flow passes, and whose L4 header it
//!   does not overlap.
//! - Anything it cannot read — a header cut short, a length field past the frame, more than two
//!   VLAN tags, a seventh IPv6 extension header, hop-by-hop not first — is denied.
//!
//! Checked for every frame: **the kernel never passes a frame the model denies**; a well-formed
//! frame (unmutated, in order) the model passes, the kernel passes too, so fragmented, tagged
//! and extension-header traffic of allowed flows is not broken; and every flow event names the
//! identities of the addresses in the frame. A failure prints the seed, the policy set, the
//! frame in hex and both answers.
//!
//! Environment: `ZT_FUZZ_FRAMES` (default 100000, 10000 per policy set), `ZT_FUZZ_SEED`
//! (decimal or 0x-hex). Needs root (loading BPF programs); fails, never skips, without it.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::{
    Ethernet2HeaderSlice, IpAuthHeaderSlice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice,
    Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice,
};
use fastrand::Rng;
use zt_agent::{
    datapath::{Datapath, Mode},
    events,
    policy::{
        self,
        compile::{self, Compiled},
        eval::{Evaluator, Flow},
    },
};
use zt_common::{programs, proto, FlowEvent, Reason, Verdict};

use common::{
    env_number,
    scenario::{Case, Draw as _, Scenario},
};

const DEFAULT_FRAMES: usize = 100_000;
const FRAMES_PER_SET: usize = 10_000;
const DEFAULT_SEED: u64 = 0x7a74_f022_0000_2026;

const HOOKS: [&str; 3] = [programs::TC_INGRESS, programs::TC_EGRESS, programs::XDP];
const XDP_PASS: u32 = 2;
const XDP_DROP: u32 = 1;
const TC_PASS: u32 = -1i32 as u32; // TC_ACT_UNSPEC
const TC_DROP: u32 = 2; // TC_ACT_SHOT

/// The longest IPv6 extension chain zt walks (docs/hostile-input.md).
const MAX_EXT_HEADERS: usize = 6;
const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_ARP: u16 = 0x0806;
const ETH_VLAN: u16 = 0x8100;
const ETH_QINQ: u16 = 0x88a8;
const IP_HOP_BY_HOP: u8 = 0;
const IP_ROUTING: u8 = 43;
const IP_FRAGMENT: u8 = 44;
const IP_AH: u8 = 51;
const IP_DEST_OPTS: u8 = 60;

#[test]
fn the_kernel_never_passes_a_frame_the_model_denies() {
    zt_tests::ensure_root().expect("the packet fuzzer loads BPF programs");
    let frames = env_number("ZT_FUZZ_FRAMES").map_or(DEFAULT_FRAMES, |n| n as usize).max(1);
    let seed = env_number("ZT_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let started = Instant::now();
    let mut stats = Stats::default();
    for set in 0..frames.div_ceil(FRAMES_PER_SET) {
        let count = FRAMES_PER_SET.min(frames - set * FRAMES_PER_SET);
        if let Err(report) = fuzz_policy_set(seed, set, count, &mut stats) {
            panic!("{report}");
        }
    }
    eprintln!("packet fuzz: {} frames in {:.1?} (seed {seed:#x})\n{stats}", stats.frames, started.elapsed());
    assert!(stats.frames >= frames);
    stats.check_coverage();
}

fn fuzz_policy_set(seed: u64, set: usize, count: usize, stats: &mut Stats) -> Result<(), String> {
    let mut rng = Rng::with_seed(seed ^ (set as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let scenario = Scenario::generate(&mut rng);
    let parsed = policy::parse_str(&scenario.yaml, "random.yaml").unwrap_or_else(|e| panic!("{e}\n{}", scenario.yaml));
    let compiled = compile::compile(&parsed).unwrap_or_else(|e| panic!("{e}\n{}", scenario.yaml));
    let mut dp = Datapath::load().expect("loading the datapath needs root and a BPF-capable kernel");
    dp.set_mode(Mode::Enforce).unwrap();
    dp.install(&compiled).unwrap();
    let mut ring = dp.take_events().unwrap();
    let mut model = Model::new(&compiled);
    let mut generator = Generator { rng: &mut rng, scenario: &scenario, next_id: 1, recent: Vec::new() };
    let mut sent = 0;
    while sent < count {
        for frame in generator.frames() {
            sent += 1;
            let hook = HOOKS[generator.rng.usize(..HOOKS.len())];
            let seen = model_parse(&frame.bytes);
            let verdict = model.judge(&seen);
            let kernel = run_kernel(&mut dp, &mut ring, hook, &frame.bytes);
            stats.count(&verdict, &kernel);
            let problem = check(&model, &frame, &seen, &verdict, &kernel);
            if let Some(problem) = problem {
                return Err(report(seed, set, sent, &scenario, &compiled, hook, &frame, &seen, &verdict, &kernel, &problem));
            }
        }
    }
    Ok(())
}

/// What the kernel did with a frame.
struct Kernel {
    passed: bool,
    events: Vec<FlowEvent>,
}

fn run_kernel(dp: &mut Datapath, ring: &mut RingBuf<MapData>, hook: &str, frame: &[u8]) -> Kernel {
    let options = || TestRunOptions { data_in: Some(frame), ..Default::default() };
    let xdp = |dp: &mut Datapath| dp.program::<Xdp>(programs::XDP).unwrap().test_run(options());
    let (ret, pass) = if hook == programs::XDP {
        (xdp(dp), XDP_PASS)
    } else {
        match dp.program::<SchedClassifier>(hook).unwrap().test_run(options()) {
            Ok(ret) => (Ok(ret), TC_PASS),
            // The skb test run refuses some frames a real skb can hold (an IPv6 header cut
            // short, for one): those go through XDP, which takes any bytes.
            Err(_) => (xdp(dp), XDP_PASS),
        }
    };
    let ret = ret.unwrap_or_else(|e| panic!("test run of a {}-byte frame {frame:02x?}: {e:?}", frame.len())).return_value;
    assert!(ret == pass || ret == if pass == XDP_PASS { XDP_DROP } else { TC_DROP }, "{hook} returned {ret}");
    let mut events = Vec::new();
    while let Some(record) = ring.next() {
        events.push(events::decode(&record).expect("a ring-buffer record holds a whole FlowEvent"));
    }
    Kernel { passed: ret == pass, events }
}

/// The properties every frame is held to; the first one broken, in words.
fn check(model: &Model, frame: &Frame, seen: &Seen, verdict: &ModelVerdict, kernel: &Kernel) -> Option<String> {
    if kernel.passed && !verdict.allowed {
        return Some(format!("the kernel passed a frame the model denies ({})", verdict.why));
    }
    if frame.clean && verdict.allowed && !kernel.passed {
        let reasons: Vec<&str> = kernel.events.iter().map(|e| Reason::from_u8(e.reason).map_or("?", Reason::name)).collect();
        return Some(format!("the kernel dropped a well-formed frame of an allowed flow (kernel reasons {reasons:?})"));
    }
    if kernel.events.len() > 1 {
        return Some(format!("{} events for one frame", kernel.events.len()));
    }
    for event in &kernel.events {
        if (event.verdict == Verdict::Deny as u8) == kernel.passed {
            return Some("the event's verdict is not what the kernel did".into());
        }
        if let Some((src, dst)) = seen.addresses {
            let expected = (compile::ip_key(src), compile::ip_key(dst), model.evaluator.identity(src), model.evaluator.identity(dst));
            if (event.src_addr, event.dst_addr, event.src_identity, event.dst_identity) != expected {
                return Some(format!(
                    "the event names {} -> {} (identities {} -> {}), the frame {src} -> {dst} ({} -> {})",
                    ip_of(event.src_addr),
                    ip_of(event.dst_addr),
                    event.src_identity,
                    event.dst_identity,
                    expected.2,
                    expected.3
                ));
            }
        }
    }
    None
}

fn ip_of(key: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[allow(clippy::too_many_arguments)]
fn report(
    seed: u64,
    set: usize,
    index: usize,
    scenario: &Scenario,
    compiled: &Compiled,
    hook: &str,
    frame: &Frame,
    seen: &Seen,
    verdict: &ModelVerdict,
    kernel: &Kernel,
    problem: &str,
) -> String {
    let hex: String = frame.bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut events = String::new();
    for e in &kernel.events {
        let reason = Reason::from_u8(e.reason).map_or("?", Reason::name);
        let name = |id| compiled.identities.name(id).unwrap_or("?").to_owned();
        writeln!(
            events,
            "    event: {} {reason} proto {} {}:{} ({}) -> {}:{} ({}) rule {}",
            events::verdict_name(e.verdict),
            e.protocol,
            ip_of(e.src_addr),
            e.src_port,
            name(e.src_identity),
            ip_of(e.dst_addr),
            e.dst_port,
            name(e.dst_identity),
            e.rule_id
        )
        .unwrap();
    }
    format!(
        "{problem}\n  seed {seed:#x}, policy set {set}, frame {index} on {hook} (replay with ZT_FUZZ_SEED={seed:#x})\n\
         --- frame ({}, {} bytes) ---\n  {hex}\n--- model ---\n  {seen:?}\n  {verdict:?}\n\
         --- kernel ---\n  {}\n{events}--- policy YAML ---\n{}",
        frame.what,
        frame.bytes.len(),
        if kernel.passed { "PASS" } else { "DROP" },
        scenario.yaml
    )
}

// ---------------------------------------------------------------------------------------------
// The model: what a frame is

/// A fragment train's key, as RFC 791 and RFC 8200 reassemble: (src, dst, id, protocol).
type TrainKey = (IpAddr, IpAddr, u32, u8);

/// The L4 fields policy and conntrack go by. Ports for TCP, UDP and SCTP; for ICMP and ICMPv6
/// the type as the destination port and the echo identifier as the source port; zero else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct L4 {
    protocol: u8,
    src_port: u16,
    dst_port: u16,
}

#[derive(Debug)]
enum What {
    ControlPlane(&'static str),
    Denied(&'static str),
    Whole(L4),
    /// A first fragment; `l4_end` is where its L4 header ends, from the fragmented data's start.
    First { key: TrainKey, l4: L4, l4_end: usize },
    /// A later fragment at `offset` bytes into the fragmented data.
    Later { key: TrainKey, offset: usize },
}

/// A frame as the model reads it: its addresses when its IP header is whole, and what it is.
#[derive(Debug)]
struct Seen {
    addresses: Option<(IpAddr, IpAddr)>,
    what: What,
}

fn denied(addresses: Option<(IpAddr, IpAddr)>, why: &'static str) -> Seen {
    Seen { addresses, what: What::Denied(why) }
}

fn model_parse(frame: &[u8]) -> Seen {
    let Ok(ethernet) = Ethernet2HeaderSlice::from_slice(frame) else { return denied(None, "no Ethernet header") };
    let mut ether_type = ethernet.ether_type().0;
    let mut rest = &frame[ethernet.slice().len()..];
    let mut tags = 0;
    while ether_type == ETH_VLAN || ether_type == ETH_QINQ {
        if tags == 2 {
            return denied(None, "more than two VLAN tags");
        }
        let Ok(vlan) = SingleVlanHeaderSlice::from_slice(rest) else { return denied(None, "a VLAN tag cut short") };
        ether_type = vlan.ether_type().0;
        rest = &rest[vlan.slice().len()..];
        tags += 1;
    }
    match ether_type {
        ETH_ARP => Seen { addresses: None, what: What::ControlPlane("ARP") },
        ETH_IPV4 => model_ipv4(rest),
        ETH_IPV6 => model_ipv6(rest),
        _ => denied(None, "neither IP nor ARP"),
    }
}

fn model_ipv4(packet: &[u8]) -> Seen {
    let Ok(header) = Ipv4HeaderSlice::from_slice(packet) else { return denied(None, "a bad IPv4 header") };
    let (src, dst) = (IpAddr::V4(header.source_addr()), IpAddr::V4(header.destination_addr()));
    let addresses = Some((src, dst));
    let (header_len, total_len) = (header.slice().len(), usize::from(header.total_len()));
    if total_len < header_len {
        return denied(addresses, "IPv4 total length shorter than its header");
    }
    if total_len > packet.len() {
        return denied(addresses, "IPv4 total length past the frame");
    }
    let mut data = &packet[header_len..total_len];
    let offset = usize::from(header.fragments_offset().value()) * 8;
    let key = (src, dst, u32::from(header.identification()), header.protocol().0);
    if offset != 0 {
        return Seen { addresses, what: What::Later { key, offset } };
    }
    let fragment = header.more_fragments().then_some(key);
    let mut protocol = header.protocol().0;
    let fragmented_len = data.len();
    if protocol == IP_AH {
        let Ok(ah) = IpAuthHeaderSlice::from_slice(data) else { return denied(addresses, "a bad or cut AH header") };
        protocol = ah.next_header().0;
        data = &data[ah.slice().len()..];
        if protocol == IP_AH {
            return denied(addresses, "AH inside AH");
        }
    }
    model_l4(addresses, protocol, data, fragment, fragmented_len - data.len(), false)
}

fn model_ipv6(packet: &[u8]) -> Seen {
    let Ok(header) = Ipv6HeaderSlice::from_slice(packet) else { return denied(None, "a bad IPv6 header") };
    let (src, dst) = (IpAddr::V6(header.source_addr()), IpAddr::V6(header.destination_addr()));
    let addresses = Some((src, dst));
    let payload_len = usize::from(header.payload_length());
    // Zero: a jumbogram, whose length is the frame's.
    let end = if payload_len == 0 { packet.len() } else { header.slice().len() + payload_len };
    if end > packet.len() {
        return denied(addresses, "IPv6 payload length past the frame");
    }
    let mut data = &packet[header.slice().len()..end];
    let mut next = header.next_header().0;
    let mut walked = 0;
    let mut fragment: Option<(TrainKey, usize)> = None;
    while matches!(next, IP_HOP_BY_HOP | IP_ROUTING | IP_DEST_OPTS | IP_AH | IP_FRAGMENT) {
        if walked == MAX_EXT_HEADERS {
            return denied(addresses, "more than six extension headers");
        }
        if next == IP_HOP_BY_HOP && walked > 0 {
            return denied(addresses, "hop-by-hop options not first");
        }
        walked += 1;
        let cut = if fragment.is_some() { "a first fragment without its L4 header" } else { "an extension header cut short" };
        let len = match next {
            IP_FRAGMENT => {
                let Ok(f) = Ipv6FragmentHeaderSlice::from_slice(data) else { return denied(addresses, cut) };
                if fragment.is_some() {
                    return denied(addresses, "two fragment headers");
                }
                next = f.next_header().0;
                let offset = usize::from(f.fragment_offset().value()) * 8;
                let key = (src, dst, f.identification(), next);
                if offset != 0 {
                    return Seen { addresses, what: What::Later { key, offset } };
                }
                if f.more_fragments() {
                    fragment = Some((key, data.len() - f.slice().len()));
                }
                f.slice().len()
            }
            IP_AH => {
                let Ok(ah) = IpAuthHeaderSlice::from_slice(data) else { return denied(addresses, cut) };
                next = ah.next_header().0;
                ah.slice().len()
            }
            _ => {
                let Ok(ext) = Ipv6RawExtHeaderSlice::from_slice(data) else { return denied(addresses, cut) };
                next = ext.next_header().0;
                ext.slice().len()
            }
        };
        data = &data[len..];
    }
    let prefix = fragment.map_or(0, |(_, fragmented_len)| fragmented_len - data.len());
    let neighbour_discovery = header.hop_limit() == 255 && fragment.is_none();
    model_l4(addresses, next, data, fragment.map(|(key, _)| key), prefix, neighbour_discovery)
}

/// The L4 header at the start of `data`: `prefix` bytes of the fragmented data come before it.
fn model_l4(
    addresses: Option<(IpAddr, IpAddr)>,
    protocol: u8,
    data: &[u8],
    fragment: Option<TrainKey>,
    prefix: usize,
    neighbour_discovery: bool,
) -> Seen {
    // The fixed part of each L4 header (RFC 793, 768, 4960, 792, 4443).
    let header_len = match protocol {
        proto::TCP => 20,
        proto::UDP => 8,
        proto::SCTP => 12,
        proto::ICMP | proto::ICMPV6 => 8,
        _ => 0,
    };
    if data.len() < header_len {
        let why = if fragment.is_some() { "a first fragment without its L4 header" } else { "an L4 header cut short" };
        return denied(addresses, why);
    }
    let port = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
    let l4 = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => L4 { protocol, src_port: port(0), dst_port: port(2) },
        proto::ICMPV6 if neighbour_discovery && (133..=137).contains(&data[0]) => {
            return Seen { addresses, what: What::ControlPlane("neighbour discovery") };
        }
        proto::ICMP | proto::ICMPV6 => {
            let echo = if protocol == proto::ICMP { [0, 8] } else { [128, 129] };
            let id = if echo.contains(&data[0]) { port(4) } else { 0 };
            L4 { protocol, src_port: id, dst_port: u16::from(data[0]) }
        }
        _ => L4 { protocol, src_port: 0, dst_port: 0 },
    };
    let what = match fragment {
        Some(key) => What::First { key, l4, l4_end: prefix + header_len },
        None => What::Whole(l4),
    };
    Seen { addresses, what }
}

// ---------------------------------------------------------------------------------------------
// The model: what passes

#[derive(Debug)]
struct ModelVerdict {
    allowed: bool,
    why: &'static str,
}

/// A conntrack key: (src, dst, protocol, src port, dst port).
type CtKey = (IpAddr, IpAddr, u8, u16, u16);

struct Model {
    evaluator: Evaluator,
    /// Both directions of every flow the model let through.
    established: HashSet<CtKey>,
    /// Every first fragment seen, by train: its flow and where its L4 header ends.
    trains: HashMap<TrainKey, Vec<(L4, usize)>>,
}

impl Model {
    fn new(compiled: &Compiled) -> Self {
        Model { evaluator: Evaluator::new(compiled), established: HashSet::new(), trains: HashMap::new() }
    }

    fn judge(&mut self, seen: &Seen) -> ModelVerdict {
        let verdict = |allowed, why| ModelVerdict { allowed, why };
        let (src, dst) = seen.addresses.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        match seen.what {
            What::ControlPlane(why) => verdict(true, why),
            What::Denied(why) => verdict(false, why),
            What::Whole(l4) => self.flow(src, dst, l4),
            What::First { key, l4, l4_end } => {
                self.trains.entry(key).or_default().push((l4, l4_end));
                self.flow(src, dst, l4)
            }
            What::Later { key, offset } => {
                let Some(firsts) = self.trains.get(&key).cloned() else { return verdict(false, "an orphan fragment") };
                let behind: Vec<L4> = firsts.iter().filter(|(_, l4_end)| offset >= *l4_end).map(|(l4, _)| *l4).collect();
                if behind.is_empty() {
                    return verdict(false, "a fragment over its train's L4 header");
                }
                match behind.into_iter().any(|l4| self.flow(src, dst, l4).allowed) {
                    true => verdict(true, "a fragment of an allowed flow"),
                    false => verdict(false, "a fragment of a denied flow"),
                }
            }
        }
    }

    fn flow(&mut self, src: IpAddr, dst: IpAddr, l4: L4) -> ModelVerdict {
        if self.established.contains(&(src, dst, l4.protocol, l4.src_port, l4.dst_port)) {
            return ModelVerdict { allowed: true, why: "established" };
        }
        let decision = self.evaluator.evaluate(&Flow { src, dst, protocol: l4.protocol, dst_port: l4.dst_port });
        if decision.verdict == Verdict::Deny {
            return ModelVerdict { allowed: false, why: "denied by policy" };
        }
        self.established.insert((src, dst, l4.protocol, l4.src_port, l4.dst_port));
        self.established.insert((dst, src, l4.protocol, l4.dst_port, l4.src_port));
        // An echo request's reply keeps the identifier and has the reply's type.
        let reply_type = match (l4.protocol, l4.dst_port) {
            (proto::ICMP, 8) => Some(0),
            (proto::ICMPV6, 128) => Some(129),
            _ => None,
        };
        if let Some(reply_type) = reply_type {
            self.established.insert((dst, src, l4.protocol, l4.src_port, reply_type));
        }
        ModelVerdict { allowed: true, why: "allowed by policy" }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

struct Frame {
    bytes: Vec<u8>,
    /// Well-formed and sent in order: if the model passes it, the kernel must too.
    clean: bool,
    what: String,
}

struct Generator<'a> {
    rng: &'a mut Rng,
    scenario: &'a Scenario,
    /// Fragment train identifiers, each train its own.
    next_id: u32,
    /// Recent packets, whose replies are sent now and then (established flows, or not).
    recent: Vec<Case>,
}

impl Generator<'_> {
    /// One packet's frames: one frame, or a fragment train.
    fn frames(&mut self) -> Vec<Frame> {
        let rng = &mut *self.rng;
        if rng.percent(3) {
            return vec![self.noise()];
        }
        let (src_port, echo_id) = (rng.u16(1024..), rng.u16(..));
        let reply = self.recent.get(rng.usize(..self.recent.len().max(1))).and_then(Case::reply);
        let case = match reply {
            Some(reply) if rng.percent(15) => reply,
            _ => {
                let mut case = Case::generate(rng, self.scenario, src_port, echo_id);
                if rng.percent(4) {
                    // Neighbour discovery's types, in either family, with and without hop limit 255.
                    case.protocol = proto::ICMPV6;
                    case.dst_port = rng.u16(133..138);
                }
                if self.recent.len() == 64 {
                    self.recent.swap_remove(rng.usize(..64));
                }
                self.recent.push(case);
                case
            }
        };
        let hop_limit = if rng.percent(50) { 255 } else { 64 };
        let mut l4 = self.l4_bytes(&case);
        // An L4 header shorter than its protocol's, the IP lengths saying so.
        let short = self.rng.percent(2) && l4_header_len(case.protocol) > 0;
        if short {
            l4.truncate(self.rng.usize(..l4_header_len(case.protocol)));
        }
        let v4 = case.src.is_ipv4();
        let mut what = format!("{case}");
        if short {
            write!(what, ", {} bytes of L4 header", l4.len()).unwrap();
        }
        let (mut frames, mut clean) = if v4 { self.ipv4(&case, &l4, &mut what) } else { self.ipv6(&case, &l4, hop_limit, &mut what) };
        clean &= !short;
        let rng = &mut *self.rng;
        if frames.len() > 1 && rng.percent(30) {
            clean = false;
            self.mutate_train(&mut frames, &mut what);
        }
        let rng = &mut *self.rng;
        let tags = match rng.usize(..100) {
            0..75 => 0,
            75..90 => 1,
            90..98 => 2,
            _ => 3,
        };
        if tags > 0 {
            write!(what, ", {tags} VLAN tags").unwrap();
        }
        clean &= tags <= 2;
        let ether_type = if v4 { ETH_IPV4 } else { ETH_IPV6 };
        frames
            .into_iter()
            .map(|packet| {
                let mut bytes = ethernet(ether_type, tags, &packet);
                let mut clean = clean;
                let mut what = what.clone();
                if self.rng.percent(10) {
                    clean = false;
                    mutate_frame(self.rng, &mut bytes, &mut what);
                }
                Frame { bytes, clean, what }
            })
            .collect()
    }

    fn noise(&mut self) -> Frame {
        let rng = &mut *self.rng;
        let any = rng.u16(..);
        let ether_type = rng.pick(&[ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ, any]);
        let payload: Vec<u8> = (0..rng.usize(..160)).map(|_| rng.u8(..)).collect();
        Frame { bytes: ethernet(ether_type, 0, &payload), clean: false, what: format!("noise, ethertype {ether_type:#06x}") }
    }

    /// The L4 header (as the case's protocol has it) and a payload.
    fn l4_bytes(&mut self, case: &Case) -> Vec<u8> {
        let rng = &mut *self.rng;
        let (sport, dport) = (case.src_port.to_be_bytes(), case.dst_port.to_be_bytes());
        let mut bytes = match case.protocol {
            proto::TCP => {
                let mut h = vec![sport[0], sport[1], dport[0], dport[1], 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0x04, 0];
                h.extend([0; 4]);
                h
            }
            proto::UDP => vec![sport[0], sport[1], dport[0], dport[1], 0, 0, 0, 0],
            proto::SCTP => vec![sport[0], sport[1], dport[0], dport[1], 0, 0, 0, 1, 0, 0, 0, 0],
            proto::ICMP | proto::ICMPV6 => vec![case.dst_port as u8, 0, 0, 0, sport[0], sport[1], 0, 1],
            _ => Vec::new(),
        };
        let payload_len = match rng.usize(..100) {
            0..60 => rng.usize(..64),
            60..90 => rng.usize(64..1400),
            // Test runs take at most a page less headroom: frames stay under 3.4 KB.
            _ => rng.usize(1400..3000),
        };
        bytes.extend((0..payload_len).map(|_| rng.u8(..)));
        if case.protocol == proto::UDP {
            let len = (bytes.len().min(usize::from(u16::MAX)) as u16).to_be_bytes();
            bytes[4..6].copy_from_slice(&len);
        }
        bytes
    }

    /// IPv4 packets: options now and then, AH now and then, fragmented a third of the time.
    fn ipv4(&mut self, case: &Case, l4: &[u8], what: &mut String) -> (Vec<Vec<u8>>, bool) {
        let rng = &mut *self.rng;
        let options: Vec<u8> = if rng.percent(20) { vec![1; 4 * rng.usize(1..11)] } else { Vec::new() };
        let mut data = Vec::new();
        let mut protocol = case.protocol;
        if rng.percent(10) {
            data.extend(auth_header(rng, protocol));
            protocol = IP_AH;
            what.push_str(", AH");
        }
        data.extend_from_slice(l4);
        let id = self.next_id as u16;
        self.next_id += 1;
        let header = |offset: usize, more: bool, len: usize| {
            let (IpAddr::V4(src), IpAddr::V4(dst)) = (case.src, case.dst) else { unreachable!() };
            let ihl = 5 + options.len() / 4;
            let total = (ihl * 4 + len) as u16;
            let frags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            let mut h = vec![0x40 | ihl as u8, 0];
            h.extend(total.to_be_bytes());
            h.extend(id.to_be_bytes());
            h.extend(frags.to_be_bytes());
            h.extend([64, protocol, 0, 0]);
            h.extend(src.octets());
            h.extend(dst.octets());
            h.extend(&options);
            h
        };
        if !options.is_empty() {
            write!(what, ", {} bytes of IPv4 options", options.len()).unwrap();
        }
        let l4_end = data.len() - l4.len() + l4_header_len(case.protocol);
        let (pieces, clean) = self.fragment_plan(data.len(), l4_end, what);
        let packets = pieces
            .into_iter()
            .map(|(offset, len, more)| {
                let mut packet = header(offset, more, len);
                packet.extend_from_slice(&data[offset..offset + len]);
                packet
            })
            .collect();
        (packets, clean)
    }

    /// IPv6 packets: extension chains now and then (too long now and then), fragmented a third
    /// of the time.
    fn ipv6(&mut self, case: &Case, l4: &[u8], hop_limit: u8, what: &mut String) -> (Vec<Vec<u8>>, bool) {
        let (before, after) = self.ipv6_chain(what);
        // The headers after the fragment header are fragmented with the L4 header.
        let mut data = link_headers(self.rng, &after, case.protocol);
        let l4_end = data.len() + l4_header_len(case.protocol);
        data.extend_from_slice(l4);
        let (pieces, clean) = self.fragment_plan(data.len(), l4_end, what);
        let fragmented = pieces.len() > 1 || pieces[0].2;
        let after_first = after.first().copied().unwrap_or(case.protocol);
        let unfragmentable = link_headers(self.rng, &before, if fragmented { IP_FRAGMENT } else { after_first });
        let next = before.first().copied().unwrap_or(if fragmented { IP_FRAGMENT } else { after_first });
        let id = self.next_id;
        self.next_id += 1;
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (case.src, case.dst) else { unreachable!() };
        let packets = pieces
            .into_iter()
            .map(|(offset, len, more)| {
                let mut payload = unfragmentable.clone();
                if fragmented {
                    payload.extend([after_first, 0]);
                    payload.extend(((offset as u16) | u16::from(more)).to_be_bytes());
                    payload.extend(id.to_be_bytes());
                }
                payload.extend_from_slice(&data[offset..offset + len]);
                let mut packet = vec![0x60, 0, 0, 0];
                packet.extend((payload.len() as u16).to_be_bytes());
                packet.extend([next, hop_limit]);
                packet.extend(src.octets());
                packet.extend(dst.octets());
                packet.extend(payload);
                packet
            })
            .collect();
        let walked = before.len() + usize::from(fragmented) + after.len();
        let hop_by_hop_first = !before.iter().skip(1).any(|&h| h == IP_HOP_BY_HOP);
        (packets, clean && walked <= MAX_EXT_HEADERS && hop_by_hop_first)
    }

    /// The extension headers before the fragment header (hop-by-hop, destination options,
    /// routing; a long run of destination options, or a misplaced hop-by-hop, now and then) and
    /// after it (destination options, AH).
    fn ipv6_chain(&mut self, what: &mut String) -> (Vec<u8>, Vec<u8>) {
        let rng = &mut *self.rng;
        let mut before: Vec<u8> = Vec::new();
        if rng.percent(20) {
            before.push(IP_HOP_BY_HOP);
        }
        if rng.percent(10) {
            before.push(IP_DEST_OPTS);
        }
        if rng.percent(10) {
            before.push(IP_ROUTING);
        }
        if rng.percent(3) {
            before.extend(std::iter::repeat_n(IP_DEST_OPTS, rng.usize(4..9)));
        }
        if rng.percent(2) {
            before.push(IP_HOP_BY_HOP);
        }
        let mut after: Vec<u8> = Vec::new();
        if rng.percent(10) {
            after.push(IP_DEST_OPTS);
        }
        if rng.percent(8) {
            after.push(IP_AH);
        }
        if !before.is_empty() || !after.is_empty() {
            write!(what, ", extension headers {before:?} | {after:?}").unwrap();
        }
        (before, after)
    }

    /// Where the fragments go: (offset, length, more fragments) of each, and whether the plan
    /// is well-formed (every fragment after the first, and the first holding the L4 header).
    fn fragment_plan(&mut self, len: usize, l4_end: usize, what: &mut String) -> (Vec<(usize, usize, bool)>, bool) {
        let rng = &mut *self.rng;
        if len < 16 || !rng.percent(35) {
            return (vec![(0, len, false)], true);
        }
        let tiny = rng.percent(10) && l4_end >= 8;
        let first = if tiny {
            (8 * rng.usize(..l4_end / 8)).min((len - 1) / 8 * 8)
        } else {
            let least = l4_end.div_ceil(8) * 8;
            (least + 8 * rng.usize(..64)).min((len - 1) / 8 * 8)
        };
        if !tiny && first < l4_end {
            return (vec![(0, len, false)], true);
        }
        let mut pieces = vec![(0, first, true)];
        let mut offset = first;
        while offset < len {
            let size = (8 * rng.usize(1..180)).min(len - offset);
            pieces.push((offset, size, offset + size < len));
            offset += size;
        }
        write!(what, ", {} fragments{}", pieces.len(), if tiny { ", a tiny first one" } else { "" }).unwrap();
        (pieces, !tiny)
    }

    /// Reorders, drops, repeats or rewrites fragments of a train.
    fn mutate_train(&mut self, frames: &mut Vec<Vec<u8>>, what: &mut String) {
        let rng = &mut *self.rng;
        match rng.usize(..5) {
            0 => {
                rng.shuffle(frames);
                what.push_str(", shuffled");
            }
            1 => {
                frames.remove(0);
                what.push_str(", without its first fragment");
            }
            2 => {
                let i = rng.usize(1..frames.len());
                let copy = frames[i].clone();
                frames.insert(rng.usize(..=frames.len()), copy);
                what.push_str(", a fragment repeated");
            }
            3 => {
                // A later fragment moved over the L4 header: offset 8 (IPv4 fragment offset
                // field, or the IPv6 fragment header's).
                let i = rng.usize(1..frames.len());
                set_fragment_offset(&mut frames[i], 8);
                what.push_str(", a fragment moved to offset 8");
            }
            _ => {
                // The first fragment again, its ports rewritten: two first fragments disagree.
                let mut second = frames[0].clone();
                let at = l4_start(&second);
                if let Some(at) = at.filter(|at| at + 4 <= second.len()) {
                    for byte in &mut second[at..at + 4] {
                        *byte = rng.u8(..);
                    }
                }
                frames.insert(rng.usize(1..=frames.len()), second);
                what.push_str(", a second first fragment with other ports");
            }
        }
    }
}

/// The fixed L4 header length of `protocol`, as the generator writes it.
fn l4_header_len(protocol: u8) -> usize {
    match protocol {
        proto::TCP => 20,
        proto::UDP | proto::ICMP | proto::ICMPV6 => 8,
        proto::SCTP => 12,
        _ => 0,
    }
}

/// The headers of `kinds`, each pointing at the next and the last at `last`; a header's own
/// type is not in its bytes (the one before it, or the IP header, names it).
fn link_headers(rng: &mut Rng, kinds: &[u8], last: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(last);
        match *kind {
            IP_AH => bytes.extend(auth_header(rng, next)),
            // Routing type 4 (segment routing) with no segments left: the receiver moves on.
            IP_ROUTING => bytes.extend([next, 0, 4, 0, 0, 0, 0, 0]),
            _ => {
                let units = rng.usize(..3);
                bytes.extend([next, units as u8]);
                // PadN options filling the header.
                bytes.extend([1, (6 + 8 * units - 2) as u8]);
                bytes.extend(std::iter::repeat_n(0, 6 + 8 * units - 2));
            }
        }
    }
    bytes
}

/// An authentication header: next header, length, SPI, sequence, an ICV of 4 to 12 bytes.
fn auth_header(rng: &mut Rng, next: u8) -> Vec<u8> {
    let icv_words = rng.usize(1..4);
    let mut bytes = vec![next, (icv_words + 1) as u8, 0, 0];
    bytes.extend(rng.u32(..).to_be_bytes());
    bytes.extend(rng.u32(..).to_be_bytes());
    bytes.extend(std::iter::repeat_n(0xa5, 4 * icv_words));
    bytes
}

fn ethernet(ether_type: u16, tags: usize, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    for tag in 0..tags {
        let tpid = if tag == 0 && tags > 1 { ETH_QINQ } else { ETH_VLAN };
        frame.extend(tpid.to_be_bytes());
        frame.extend([0, 100 + tag as u8]);
    }
    frame.extend(ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Truncates a frame, or flips a few of its bytes.
fn mutate_frame(rng: &mut Rng, frame: &mut Vec<u8>, what: &mut String) {
    if rng.percent(50) {
        // Never below an Ethernet header, which no NIC delivers and test runs refuse.
        let len = rng.usize(14..frame.len());
        frame.truncate(len);
        write!(what, ", cut to {len} bytes").unwrap();
    } else {
        for _ in 0..1 + rng.usize(..3) {
            let at = rng.usize(..frame.len().min(96));
            frame[at] ^= 1 << rng.u8(..8);
            write!(what, ", bit flipped at {at}").unwrap();
        }
    }
}

/// Sets the fragment offset of a packet (before the Ethernet header is added) to `offset`.
fn set_fragment_offset(packet: &mut [u8], offset: u16) {
    if packet[0] >> 4 == 4 {
        let flags = u16::from_be_bytes([packet[6], packet[7]]) & 0xe000;
        packet[6..8].copy_from_slice(&(flags | (offset / 8)).to_be_bytes());
    } else if let Some(at) = ipv6_fragment_header(packet) {
        let more = packet[at + 3] & 1;
        packet[at + 2..at + 4].copy_from_slice(&(offset | u16::from(more)).to_be_bytes());
    }
}

/// Where the fragment header of an IPv6 packet (before the Ethernet header) starts.
fn ipv6_fragment_header(packet: &[u8]) -> Option<usize> {
    let (mut next, mut at) = (packet[6], 40);
    while matches!(next, IP_HOP_BY_HOP | IP_ROUTING | IP_DEST_OPTS) && at + 8 <= packet.len() {
        next = packet[at];
        at += (usize::from(packet[at + 1]) + 1) * 8;
    }
    (next == IP_FRAGMENT && at + 8 <= packet.len()).then_some(at)
}

/// Where the L4 header of a generated first fragment starts (AH and extension headers skipped).
fn l4_start(packet: &[u8]) -> Option<usize> {
    if packet[0] >> 4 == 4 {
        let mut at = usize::from(packet[0] & 0xf) * 4;
        if packet[9] == IP_AH {
            at += (usize::from(*packet.get(at + 1)?) + 2) * 4;
        }
        return Some(at);
    }
    let mut at = ipv6_fragment_header(packet)?;
    let mut next = packet[at];
    at += 8;
    while matches!(next, IP_DEST_OPTS | IP_AH) && at + 8 <= packet.len() {
        let len = if next == IP_AH { (usize::from(packet[at + 1]) + 2) * 4 } else { (usize::from(packet[at + 1]) + 1) * 8 };
        next = packet[at];
        at += len;
    }
    Some(at)
}

// ---------------------------------------------------------------------------------------------
// Coverage

/// What the frames exercised: agreement means little if the generator never reaches a case.
#[derive(Default)]
struct Stats {
    frames: usize,
    /// (model's why, kernel passed) → frames.
    outcomes: BTreeMap<(&'static str, bool), usize>,
    /// Kernel event reasons.
    reasons: BTreeMap<&'static str, usize>,
}

impl Stats {
    fn count(&mut self, verdict: &ModelVerdict, kernel: &Kernel) {
        self.frames += 1;
        *self.outcomes.entry((verdict.why, kernel.passed)).or_default() += 1;
        for event in &kernel.events {
            *self.reasons.entry(Reason::from_u8(event.reason).map_or("?", Reason::name)).or_default() += 1;
        }
    }

    fn check_coverage(&self) {
        let passed = |why: &str| self.outcomes.get(&(why, true)).copied().unwrap_or(0);
        let seen = |why: &str| passed(why) + self.outcomes.get(&(why, false)).copied().unwrap_or(0);
        for why in ["a fragment of an allowed flow", "allowed by policy", "established", "ARP", "neighbour discovery"] {
            assert!(passed(why) >= 10, "only {} frames passed as {why}\n{self}", passed(why));
        }
        for why in [
            "an orphan fragment",
            "a fragment over its train's L4 header",
            "a fragment of a denied flow",
            "a first fragment without its L4 header",
            "more than six extension headers",
            "hop-by-hop options not first",
            "more than two VLAN tags",
            "an L4 header cut short",
            "denied by policy",
        ] {
            assert!(seen(why) >= 10, "only {} frames were {why}\n{self}", seen(why));
        }
        for reason in [
            Reason::FragmentOrphan,
            Reason::FragmentOverlap,
            Reason::FragmentTiny,
            Reason::FragmentSplitHeaders,
            Reason::ExtHeaderLimit,
            Reason::Malformed,
            Reason::UnsupportedProtocol,
        ] {
            let n = self.reasons.get(reason.name()).copied().unwrap_or(0);
            assert!(n >= 10, "only {n} events said {}\n{self}", reason.name());
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for ((why, passed), n) in &self.outcomes {
            writeln!(f, "  model: {why:<45} kernel {:<4} {n}", if *passed { "PASS" } else { "DROP" })?;
        }
        for (reason, n) in &self.reasons {
            writeln!(f, "  kernel event reason {reason:<28} {n}")?;
        }
        Ok(())
    }
}
