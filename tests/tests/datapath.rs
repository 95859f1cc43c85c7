//! The loaded kernel programs, driven by BPF_PROG_TEST_RUN with crafted frames: what passes, what
//! is dropped, and under which reason. Needs root (loading BPF programs); fails, never skips.

use std::time::{Duration, Instant};

use aya::{
    maps::{MapData, RingBuf},
    programs::{CgroupSkb, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use zt_agent::{
    datapath::{capacity::Capacities, counters::EventCounts, Datapath, Mode},
    events::{self, limits::EventLimitSettings},
    policy::{self, compile::Compiled},
};
use zt_common::{programs, Direction, FlowEvent, Hook, Reason, Verdict};

const POLICY: &str = r#"
apiVersion: zt/v1
kind: Identity
metadata: {name: web}
spec:
  selectors: [{cidr: 10.20.1.0/24}, {cidr: "fd00:20:1::/64"}]
---
apiVersion: zt/v1
kind: Identity
metadata: {name: api}
spec:
  selectors: [{cidr: 10.20.2.0/24}, {cidr: "fd00:20:2::/64"}]
---
apiVersion: zt/v1
kind: Identity
metadata: {name: intruder}
spec:
  selectors: [{cidr: 10.20.9.0/24}, {cidr: "fd00:20:9::/64"}]
---
apiVersion: zt/v1
kind: Policy
metadata: {name: default-deny}
spec: {subject: [any], ingress: [], egress: []}
---
apiVersion: zt/v1
kind: Policy
metadata: {name: web}
spec:
  subject: [web]
  egress: [{to: [api], ports: [{protocol: tcp, port: 8080}]}]
---
apiVersion: zt/v1
kind: Policy
metadata: {name: api}
spec:
  subject: [api]
  ingress: [{from: [web], ports: [{protocol: tcp, port: 8080}]}]
"#;

const WEB: [u8; 4] = [10, 20, 1, 2];
const API: [u8; 4] = [10, 20, 2, 2];
const INTRUDER: [u8; 4] = [10, 20, 9, 2];
const WEB6: [u8; 16] = [0xfd, 0, 0, 0x20, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const API6: [u8; 16] = [0xfd, 0, 0, 0x20, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

const TC_PASS: u32 = -1i32 as u32; // TC_ACT_UNSPEC: on to the next program
const TC_DROP: u32 = 2; // TC_ACT_SHOT
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn datapath(mode: Mode) -> Datapath {
    datapath_with(&compiled(POLICY), mode)
}

fn datapath_with(compiled: &Compiled, mode: Mode) -> Datapath {
    let mut dp = Datapath::load().expect("loading the datapath needs root and a BPF-capable kernel");
    assert_eq!(dp.install(compiled).unwrap(), 1, "a fresh datapath's first policy is generation 1");
    dp.set_mode(mode).unwrap();
    dp
}

fn compiled(text: &str) -> Compiled {
    let set = policy::parse_str(text, "test.yaml").expect("test policy parses");
    policy::compile::compile(&set).expect("test policy compiles")
}

/// The test policy, with web → api allowed (by web's egress and api's ingress) on TCP `ports`.
fn allowing(ports: &[u16]) -> Compiled {
    let items: Vec<String> = ports.iter().map(|port| format!("{{protocol: tcp, port: {port}}}")).collect();
    compiled(&POLICY.replace("[{protocol: tcp, port: 8080}]", &format!("[{}]", items.join(", "))))
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Pass,
    Drop,
}

/// Runs `frame` through all three hooks and returns the common outcome; the hooks must agree.
fn judge(dp: &mut Datapath, frame: &[u8]) -> Outcome {
    judge_on(dp, frame, &[programs::TC_INGRESS, programs::TC_EGRESS, programs::XDP])
}

fn judge_on(dp: &mut Datapath, frame: &[u8], hooks: &[&str]) -> Outcome {
    let run = |ret: u32, pass: u32, drop: u32, hook: &str| match ret {
        r if r == pass => Outcome::Pass,
        r if r == drop => Outcome::Drop,
        r => panic!("{hook} returned unexpected code {r}"),
    };
    let mut outcomes = Vec::new();
    for &name in hooks.iter().filter(|&&h| h != programs::XDP) {
        let prog: &mut SchedClassifier = dp.program(name).unwrap();
        let ret = prog.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() }).unwrap_or_else(|e| panic!("{name} len {}: {e}", frame.len()));
        outcomes.push(run(ret.return_value, TC_PASS, TC_DROP, name));
    }
    if hooks.contains(&programs::XDP) {
        let xdp: &mut Xdp = dp.program(programs::XDP).unwrap();
        let ret = xdp.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() }).unwrap();
        outcomes.push(run(ret.return_value, XDP_PASS, XDP_DROP, "xdp"));
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "hooks disagree: {outcomes:?}");
    outcomes[0]
}

/// Runs `frame`, returning its outcome and how often each hook counted it under (verdict, reason).
fn judge_counted(dp: &mut Datapath, frame: &[u8], verdict: Verdict, reason: Reason) -> (Outcome, u64) {
    let before = dp.counters().unwrap().by_verdict_reason(verdict, reason);
    let outcome = judge(dp, frame);
    (outcome, dp.counters().unwrap().by_verdict_reason(verdict, reason) - before)
}

fn write(builder: PacketBuilderStep, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}
type PacketBuilderStep = etherparse::PacketBuilderStep<etherparse::TcpHeader>;

fn tcp4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    write(PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, dst, 64).tcp(src_port, dst_port, 1, 1024).syn(), &[])
}

fn tcp6(src: [u8; 16], dst: [u8; 16], dst_port: u16) -> Vec<u8> {
    write(PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6(src, dst, 64).tcp(40000, dst_port, 1, 1024).syn(), &[])
}

/// An IPv6 TCP SYN behind `chain` extension headers (each 8 bytes: next header, length 0, pad).
fn tcp6_with_extensions(chain: &[u8], dst_port: u16) -> Vec<u8> {
    let plain = tcp6(WEB6, API6, dst_port);
    let (eth_ip, tcp) = plain.split_at(14 + 40);
    let mut frame = eth_ip.to_vec();
    let mut next = vec![chain[0]];
    next.extend(&chain[1..]);
    next.push(6); // finally TCP
    frame[14 + 6] = next[0];
    for n in &next[1..] {
        frame.extend([*n, 0, 0, 0, 0, 0, 0, 0]);
    }
    frame.extend(tcp);
    let payload_len = (frame.len() - 14 - 40) as u16;
    frame[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    frame
}

fn with_vlan_tags(frame: &[u8], tags: usize) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for _ in 0..tags {
        out.extend([0x81, 0x00, 0x00, 0x64]);
    }
    out.extend(&frame[12..]);
    out
}

#[test]
fn a_datapath_whose_mode_was_never_written_enforces() {
    let mut dp = Datapath::load().expect("loading the datapath needs root and a BPF-capable kernel");
    let mut fragment = tcp4(WEB, API, 40000, 8080);
    fragment[14 + 6..14 + 8].copy_from_slice(&185u16.to_be_bytes());
    let (outcome, n) = judge_counted(&mut dp, &fragment, Verdict::Deny, Reason::FragmentOrphan);
    assert_eq!((outcome, n), (Outcome::Drop, 3));
}

#[test]
fn allowed_flow_passes_and_its_reply_is_established() {
    let mut dp = datapath(Mode::Enforce);
    let (outcome, n) = judge_counted(&mut dp, &tcp4(WEB, API, 40000, 8080), Verdict::Allow, Reason::PolicyAllow);
    assert_eq!((outcome, n), (Outcome::Pass, 1), "first hook admits by policy, the others by conntrack");
    let (outcome, n) = judge_counted(&mut dp, &tcp4(API, WEB, 8080, 40000), Verdict::Allow, Reason::Established);
    assert_eq!((outcome, n), (Outcome::Pass, 3), "the reply is established on every hook");
}

#[test]
fn flows_policy_does_not_allow_are_dropped_in_enforce_mode() {
    let mut dp = datapath(Mode::Enforce);
    let cases = [
        ("lateral move to a protected workload", tcp4(INTRUDER, API, 40000, 8080)),
        ("allowed peers, wrong port", tcp4(WEB, API, 40000, 8081)),
        ("allowed port, wrong direction", tcp4(API, WEB, 40000, 8080)),
        ("an unsolicited 'reply'", tcp4(API, INTRUDER, 8080, 40000)),
    ];
    for (what, frame) in cases {
        let (outcome, n) = judge_counted(&mut dp, &frame, Verdict::Deny, Reason::DefaultDeny);
        assert_eq!((outcome, n), (Outcome::Drop, 3), "{what}");
    }
}

#[test]
fn a_group_of_many_ports_is_judged_exactly_through_its_split_blocks() {
    // 40 ports: 30 crowd one 256-port block (more runs than a block holds), 10 lie far apart.
    let ports: Vec<u16> = (0..30).map(|i| 3 + 7 * i).chain((0..10).map(|i| 40_000 + 1_000 * i)).collect();
    let compiled = allowing(&ports);
    assert!(compiled.policy.iter().any(|block| block.key.level == 3), "the policy reaches the last level");
    let mut dp = datapath_with(&compiled, Mode::Enforce);
    for (n, port) in (0u16..).zip(ports.iter().flat_map(|&port| [port - 1, port, port + 1])) {
        let expected = if ports.contains(&port) { Outcome::Pass } else { Outcome::Drop };
        // Each from its own source port: a new flow, judged by policy.
        assert_eq!(judge_on(&mut dp, &tcp4(WEB, API, 20_000 + n, port), &[programs::XDP]), expected, "port {port}");
    }
}

#[test]
fn ipv6_follows_the_same_policy() {
    let mut dp = datapath(Mode::Enforce);
    assert_eq!(judge(&mut dp, &tcp6(WEB6, API6, 8080)), Outcome::Pass);
    assert_eq!(judge(&mut dp, &tcp6(WEB6, API6, 22)), Outcome::Drop);
}

#[test]
fn monitor_mode_passes_denials_as_audits_and_the_switch_needs_no_reload() {
    let mut dp = datapath(Mode::Monitor);
    let attack = tcp4(INTRUDER, API, 40001, 8080);
    let (outcome, n) = judge_counted(&mut dp, &attack, Verdict::Audit, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Pass, 1), "audited once, then remembered for the other hooks");
    dp.set_mode(Mode::Enforce).unwrap();
    let (outcome, n) = judge_counted(&mut dp, &attack, Verdict::Deny, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Drop, 3), "an audited flow gets no free pass once enforcing");
}

#[test]
fn truncated_and_inconsistent_headers_are_denied_as_malformed() {
    let mut dp = datapath(Mode::Enforce);
    let good = tcp4(WEB, API, 40000, 8080);
    let mut long_ihl = good.clone();
    long_ihl[14] = 0x4f; // IHL 15: options would run past the TCP header
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44; // IHL 4: header shorter than 20 bytes
    let mut bad_version = good.clone();
    bad_version[14] = 0x55;
    let all = [programs::TC_INGRESS, programs::TC_EGRESS, programs::XDP];
    // The kernel's skb test harness refuses frames shorter than their IP header, so those are
    // judged by the XDP program only (the parser is the same code).
    let xdp = [programs::XDP];
    let cases: [(&str, Vec<u8>, &[&str]); 7] = [
        ("IPv4 header cut", good[..14 + 10].to_vec(), &xdp),
        ("IPv6 header cut", tcp6(WEB6, API6, 8080)[..14 + 30].to_vec(), &xdp),
        ("TCP header cut", good[..14 + 20 + 10].to_vec(), &all),
        ("IPv4 options past the end of the frame", long_ihl, &all),
        ("IHL below 5", short_ihl, &all),
        ("IPv4 ethertype, version 5", bad_version, &all),
        ("extension header cut", tcp6_with_extensions(&[0, 60], 8080)[..14 + 40 + 4].to_vec(), &all),
    ];
    let malformed = |dp: &Datapath| dp.counters().unwrap().by_verdict_reason(Verdict::Deny, Reason::Malformed);
    for (what, frame, hooks) in cases {
        let before = malformed(&dp);
        assert_eq!(judge_on(&mut dp, &frame, hooks), Outcome::Drop, "{what}");
        assert_eq!(malformed(&dp) - before, hooks.len() as u64, "{what} counted as malformed");
    }
}

/// A TCP segment (header + `data`) from `src_port` to `dst_port`, as the bytes a fragment train
/// splits.
fn tcp_segment(src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
    let mut segment = Vec::new();
    segment.extend(src_port.to_be_bytes());
    segment.extend(dst_port.to_be_bytes());
    segment.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x04, 0x00, 0, 0, 0, 0]);
    segment.extend(data);
    segment
}

/// One IPv4 fragment: `data` at byte `offset` of the fragmented datagram.
fn ipv4_fragment(src: [u8; 4], dst: [u8; 4], id: u16, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
    let mut frame = vec![4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 0x08, 0x00];
    let flags_offset = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    frame.extend([0x45, 0]);
    frame.extend(((20 + data.len()) as u16).to_be_bytes());
    frame.extend(id.to_be_bytes());
    frame.extend(flags_offset.to_be_bytes());
    frame.extend([64, 6, 0, 0]);
    frame.extend(src);
    frame.extend(dst);
    frame.extend(data);
    frame
}

/// One IPv6 fragment: `data` at byte `offset` of the fragmentable part, whose first header is
/// `next` (6: TCP; 60: destination options).
fn ipv6_fragment(src: [u8; 16], dst: [u8; 16], next: u8, id: u32, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
    let mut frame = vec![4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 0x86, 0xdd];
    frame.extend([0x60, 0, 0, 0]);
    frame.extend(((8 + data.len()) as u16).to_be_bytes());
    frame.extend([44, 64]);
    frame.extend(src);
    frame.extend(dst);
    frame.extend([next, 0]);
    frame.extend((offset as u16 | more as u16).to_be_bytes());
    frame.extend(id.to_be_bytes());
    frame.extend(data);
    frame
}

#[test]
fn fragments_are_judged_as_their_flow() {
    let mut dp = datapath(Mode::Enforce);
    let allowed = tcp_segment(40000, 8080, &[7; 40]);
    // Cut after 24 bytes: the first fragment holds the whole TCP header.
    let (head, tail) = allowed.split_at(24);
    let (outcome, n) = judge_counted(&mut dp, &ipv4_fragment(WEB, API, 1, 0, true, head), Verdict::Allow, Reason::PolicyAllow);
    assert_eq!((outcome, n), (Outcome::Pass, 1), "the first fragment is judged by its ports");
    let (outcome, n) = judge_counted(&mut dp, &ipv4_fragment(WEB, API, 1, 24, false, tail), Verdict::Allow, Reason::Established);
    assert_eq!((outcome, n), (Outcome::Pass, 3), "the fragment after it belongs to the admitted flow");

    let denied = tcp_segment(40000, 22, &[7; 40]);
    let (head, tail) = denied.split_at(24);
    assert_eq!(judge(&mut dp, &ipv4_fragment(WEB, API, 2, 0, true, head)), Outcome::Drop);
    let (outcome, n) = judge_counted(&mut dp, &ipv4_fragment(WEB, API, 2, 24, false, tail), Verdict::Deny, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Drop, 3), "a fragment of a denied flow is denied as that flow");

    // IPv6: the same, with the fragment header.
    let (head, tail) = allowed.split_at(24);
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 9, 0, true, head)), Outcome::Pass);
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 9, 24, false, tail)), Outcome::Pass);
    let (head, tail) = denied.split_at(24);
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 10, 0, true, head)), Outcome::Drop);
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 10, 24, false, tail)), Outcome::Drop);
    // An atomic fragment (offset 0, no more fragments) is a whole packet.
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 11, 0, false, &allowed)), Outcome::Pass);
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 12, 0, false, &denied)), Outcome::Drop);
}

#[test]
fn evasive_fragments_are_dropped_each_with_its_reason() {
    let mut dp = datapath(Mode::Enforce);
    let mut ring = dp.take_events().unwrap();
    let segment = tcp_segment(40000, 8080, &[7; 40]);
    let (head, tail) = segment.split_at(24);

    // Out of order: the later fragment comes first, so nothing says which flow it belongs to.
    let later_first = ipv4_fragment(WEB, API, 20, 24, false, tail);
    let (outcome, n) = judge_counted(&mut dp, &later_first, Verdict::Deny, Reason::FragmentOrphan);
    assert_eq!((outcome, n), (Outcome::Drop, 3));
    let orphan = drain(&mut ring).into_iter().find(|e| e.reason == Reason::FragmentOrphan as u8).expect("an orphan event");
    let identities = compiled(POLICY).identities;
    let (web, api) = (identities.id("web").unwrap(), identities.id("api").unwrap());
    assert_eq!((orphan.src_identity, orphan.dst_identity), (web, api), "fragment events name the ends by address");
    let v6_orphan = ipv6_fragment(WEB6, API6, 6, 21, 24, false, tail);
    assert_eq!(judge_counted(&mut dp, &v6_orphan, Verdict::Deny, Reason::FragmentOrphan), (Outcome::Drop, 3));

    // Overlap: after an allowed first fragment, one at offset 8 would rewrite the TCP header
    // (its ports among them) after the verdict was taken on it.
    assert_eq!(judge(&mut dp, &ipv4_fragment(WEB, API, 22, 0, true, head)), Outcome::Pass);
    let rewrite = ipv4_fragment(WEB, API, 22, 8, false, &tcp_segment(40000, 22, &[])[8..]);
    assert_eq!(judge_counted(&mut dp, &rewrite, Verdict::Deny, Reason::FragmentOverlap), (Outcome::Drop, 3));
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 6, 23, 0, true, head)), Outcome::Pass);
    let rewrite6 = ipv6_fragment(WEB6, API6, 6, 23, 16, false, &segment[16..]);
    assert_eq!(judge_counted(&mut dp, &rewrite6, Verdict::Deny, Reason::FragmentOverlap), (Outcome::Drop, 3));

    // Tiny: a first fragment of 8 bytes holds the ports but not the rest of the TCP header.
    let tiny = ipv4_fragment(WEB, API, 24, 0, true, &segment[..8]);
    assert_eq!(judge_counted(&mut dp, &tiny, Verdict::Deny, Reason::FragmentTiny), (Outcome::Drop, 3));
    let tiny6 = ipv6_fragment(WEB6, API6, 6, 25, 0, true, &segment[..8]);
    assert_eq!(judge_counted(&mut dp, &tiny6, Verdict::Deny, Reason::FragmentTiny), (Outcome::Drop, 3));
    // ...and the fragment after a tiny one has no train to join.
    let after_tiny = ipv4_fragment(WEB, API, 24, 8, false, &segment[8..]);
    assert_eq!(judge_counted(&mut dp, &after_tiny, Verdict::Deny, Reason::FragmentOrphan), (Outcome::Drop, 3));

    // IPv6 header chain split: a 16-byte destination-options header cut by the first fragment,
    // so TCP starts in a later one.
    let mut chain = vec![6, 1];
    chain.extend([0; 14]);
    chain.extend(&segment);
    let split = ipv6_fragment(WEB6, API6, 60, 26, 0, true, &chain[..8]);
    assert_eq!(judge_counted(&mut dp, &split, Verdict::Deny, Reason::FragmentSplitHeaders), (Outcome::Drop, 3));
    // The whole chain in the first fragment is fine.
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 60, 27, 0, true, &chain[..40])), Outcome::Pass);
    assert_eq!(judge(&mut dp, &ipv6_fragment(WEB6, API6, 60, 27, 40, false, &chain[40..])), Outcome::Pass);
}

#[test]
fn full_conntrack_and_fragment_tables_fail_closed() {
    const CAPACITY: u64 = 64;
    /// Sixteen times what each table holds.
    const FLOWS: u16 = 16 * CAPACITY as u16;
    let settings = [format!("conntrack={CAPACITY}").parse().unwrap(), format!("fragments={CAPACITY}").parse().unwrap()];
    let mut dp = Datapath::load_sized(Capacities::new(&settings).unwrap()).expect("loading the datapath needs root");
    dp.install(&compiled(POLICY)).unwrap();
    dp.set_mode(Mode::Enforce).unwrap();
    let xdp = [programs::XDP];
    let count = |dp: &Datapath, verdict, reason| dp.counters().unwrap().by_verdict_reason(verdict, reason);
    // Run `frames` through XDP; how many passed, and how many were counted under each reason.
    let run = |dp: &mut Datapath, frames: &[Vec<u8>], reasons: &[(Verdict, Reason)]| {
        let before: Vec<u64> = reasons.iter().map(|&(v, r)| count(dp, v, r)).collect();
        let passed = frames.iter().filter(|frame| judge_on(dp, frame, &xdp) == Outcome::Pass).count() as u64;
        let counted: Vec<u64> = reasons.iter().zip(before).map(|(&(v, r), before)| count(dp, v, r) - before).collect();
        (passed, counted)
    };

    // Connections web → api and fragment trains (each its own flow), far more than fit.
    let segment = |port: u16| tcp_segment(port, 8080, &[7; 40]);
    let opens: Vec<Vec<u8>> = (0..FLOWS).map(|i| tcp4(WEB, API, 41000 + i, 8080)).collect();
    let firsts: Vec<Vec<u8>> = (0..FLOWS).map(|i| ipv4_fragment(WEB, API, i, 0, true, &segment(45000 + i)[..24])).collect();
    for frames in [&opens, &firsts] {
        let (passed, counted) = run(&mut dp, frames, &[(Verdict::Deny, Reason::TableFull)]);
        // The LRU tables make room; a flow they cannot hold is refused as table-full, never
        // passed without an entry.
        assert_eq!(passed + counted[0], u64::from(FLOWS), "an allowed flow is refused only as table-full");
        assert!(passed >= u64::from(FLOWS) / 2, "{passed} of {FLOWS} passed");
    }
    let usage = dp.probe().unwrap().map_usage().unwrap();
    for name in ["conntrack", "fragments"] {
        let map = usage.iter().find(|m| m.name == name).unwrap();
        assert_eq!(map.capacity, CAPACITY, "{name}");
        assert!(map.entries <= CAPACITY, "{name}: {} entries", map.entries);
    }

    // Every connection's reply: established while its entry lasts; once evicted, a new flow
    // that no policy allows (api may not open connections to web), dropped. Never passed.
    let replies: Vec<Vec<u8>> = (0..FLOWS).map(|i| tcp4(API, WEB, 8080, 41000 + i)).collect();
    let reasons = [(Verdict::Allow, Reason::Established), (Verdict::Deny, Reason::DefaultDeny)];
    let (passed, counted) = run(&mut dp, &replies, &reasons);
    assert_eq!(counted, [passed, u64::from(FLOWS) - passed], "each reply passed as established or was denied");
    assert!(passed <= CAPACITY, "{passed} replies passed: more than conntrack holds");
    // Every train's rest: judged as its flow while the train is known, an orphan once evicted.
    let rests: Vec<Vec<u8>> = (0..FLOWS).map(|i| ipv4_fragment(WEB, API, i, 24, false, &segment(45000 + i)[24..])).collect();
    let (passed, counted) = run(&mut dp, &rests, &[(Verdict::Deny, Reason::FragmentOrphan)]);
    assert_eq!(counted[0], u64::from(FLOWS) - passed, "a fragment is dropped only as an orphan");
    assert!(passed <= CAPACITY, "{passed} fragments passed: more trains than the table holds");
}

#[test]
fn ipv6_extension_chains_are_walked_up_to_the_limit() {
    let mut dp = datapath(Mode::Enforce);
    assert_eq!(judge(&mut dp, &tcp6_with_extensions(&[0, 60, 43], 8080)), Outcome::Pass, "3 headers, allowed port");
    assert_eq!(judge(&mut dp, &tcp6_with_extensions(&[0, 60, 43], 22)), Outcome::Drop, "3 headers, denied port");
    let too_long = [0, 60, 60, 60, 60, 60, 60];
    let (outcome, n) =
        judge_counted(&mut dp, &tcp6_with_extensions(&too_long, 8080), Verdict::Deny, Reason::ExtHeaderLimit);
    assert_eq!((outcome, n), (Outcome::Drop, 3), "a chain longer than the walk is denied, not skipped");
}

#[test]
fn one_or_two_vlan_tags_are_parsed_anything_else_unknown_is_denied() {
    let mut dp = datapath(Mode::Enforce);
    for tags in [1, 2] {
        assert_eq!(judge(&mut dp, &with_vlan_tags(&tcp4(WEB, API, 40000, 8080), tags)), Outcome::Pass, "{tags} tags");
        assert_eq!(judge(&mut dp, &with_vlan_tags(&tcp4(INTRUDER, API, 40000, 8080), tags)), Outcome::Drop, "{tags} tags");
    }
    // 802.1ad outer tag over an 802.1Q inner one.
    let mut qinq = with_vlan_tags(&tcp4(INTRUDER, API, 40000, 8080), 2);
    qinq[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    assert_eq!(judge_counted(&mut dp, &qinq, Verdict::Deny, Reason::DefaultDeny), (Outcome::Drop, 3));
    let (outcome, n) = judge_counted(
        &mut dp,
        &with_vlan_tags(&tcp4(WEB, API, 40000, 8080), 3),
        Verdict::Deny,
        Reason::UnsupportedProtocol,
    );
    assert_eq!((outcome, n), (Outcome::Drop, 3), "a third tag is not parsed, so it is denied");
    let mut lldp = vec![0u8; 60];
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    let (outcome, n) = judge_counted(&mut dp, &lldp, Verdict::Deny, Reason::UnsupportedProtocol);
    assert_eq!((outcome, n), (Outcome::Drop, 3));
}

#[test]
fn arp_and_neighbour_discovery_always_pass() {
    let mut dp = datapath(Mode::Enforce);
    let mut arp = vec![0u8; 14 + 28];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (outcome, n) = judge_counted(&mut dp, &arp, Verdict::Allow, Reason::ControlPlane);
    assert_eq!((outcome, n), (Outcome::Pass, 3));
    // Neighbour solicitation from a workload nobody allows to talk.
    let intruder6 = [0xfd, 0, 0, 0x20, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let ns = write_icmp6(PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6(intruder6, API6, 255), 135);
    let (outcome, n) = judge_counted(&mut dp, &ns, Verdict::Allow, Reason::ControlPlane);
    assert_eq!((outcome, n), (Outcome::Pass, 3));
    // Echo requests are not neighbour discovery.
    let ping = write_icmp6(PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6(intruder6, API6, 64), 128);
    assert_eq!(judge(&mut dp, &ping), Outcome::Drop);
    // Nor is a solicitation that crossed a router (receivers discard it, RFC 4861), nor ICMPv6's
    // numbers over IPv4: policy judges them, and nobody allows the intruder.
    let routed = write_icmp6(PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6(intruder6, API6, 254), 135);
    assert_eq!(judge(&mut dp, &routed), Outcome::Drop);
    let mut over_ipv4 = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(INTRUDER, API, 255)
        .write(&mut over_ipv4, etherparse::IpNumber(58), &[135, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    assert_eq!(judge(&mut dp, &over_ipv4), Outcome::Drop);
}

fn write_icmp6(builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>, icmp_type: u8) -> Vec<u8> {
    let builder = builder.icmpv6(etherparse::Icmpv6Type::Unknown {
        type_u8: icmp_type,
        code_u8: 0,
        bytes5to8: [0, 1, 0, 1],
    });
    let mut frame = Vec::new();
    builder.write(&mut frame, &[0; 16]).unwrap();
    frame
}

#[test]
fn a_reload_cuts_established_flows_it_no_longer_allows_and_keeps_the_others() {
    let mut dp = datapath_with(&allowing(&[8080, 8443]), Mode::Enforce);
    let (revoked, revoked_reply) = (tcp4(WEB, API, 40000, 8080), tcp4(API, WEB, 8080, 40000));
    let (kept, kept_reply) = (tcp4(WEB, API, 40001, 8443), tcp4(API, WEB, 8443, 40001));
    // A revoked flow whose first packet after the reload is a reply.
    let (answered, answer) = (tcp4(WEB, API, 40002, 8080), tcp4(API, WEB, 8080, 40002));
    for frame in [&revoked, &revoked_reply, &kept, &kept_reply, &answered, &answer] {
        assert_eq!(judge(&mut dp, frame), Outcome::Pass, "generation 1 allows tcp 8080 and 8443");
    }

    // Built aside, the next generation changes nothing until the switch.
    let next = allowing(&[8443]);
    dp.stage(&next).unwrap();
    assert_eq!(judge(&mut dp, &tcp4(WEB, API, 40003, 8080)), Outcome::Pass, "a staged policy is not in force");
    let (outcome, n) = judge_counted(&mut dp, &revoked, Verdict::Allow, Reason::Established);
    assert_eq!((outcome, n), (Outcome::Pass, 3));
    assert_eq!(dp.switch().unwrap(), 2);
    let config = dp.config().unwrap();
    assert_eq!((config.generation, config.mode), (2, zt_common::mode::ENFORCE), "the switch keeps the mode");
    let entries = dp.slot_entries().unwrap();
    assert_eq!(entries[1 - config.slot as usize], (0, 0, 0), "the old generation's slot is emptied");

    let (outcome, n) = judge_counted(&mut dp, &revoked, Verdict::Deny, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Drop, 3), "a flow generation 2 does not allow is cut on its next packet");
    let (outcome, n) = judge_counted(&mut dp, &revoked_reply, Verdict::Deny, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Drop, 3), "its replies are no longer established either");
    let (outcome, n) = judge_counted(&mut dp, &kept, Verdict::Allow, Reason::Established);
    assert_eq!((outcome, n), (Outcome::Pass, 3), "a flow generation 2 still allows carries on, established");
    let (outcome, n) = judge_counted(&mut dp, &kept_reply, Verdict::Allow, Reason::Established);
    assert_eq!((outcome, n), (Outcome::Pass, 3), "and so do its replies");

    // The reply is judged for the flow it answers (web → api tcp 8080, revoked), then as a new
    // flow of its own (api → web, which nothing allows).
    let (outcome, n) = judge_counted(&mut dp, &answer, Verdict::Deny, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Drop, 3), "the reply of a revoked flow is dropped");
    assert_eq!(judge(&mut dp, &answered), Outcome::Drop, "and the flow's own direction with it");
    assert_eq!(judge(&mut dp, &tcp4(WEB, API, 40004, 8080)), Outcome::Drop, "new flows follow generation 2");
    assert_eq!(judge(&mut dp, &tcp4(WEB, API, 40005, 8443)), Outcome::Pass);
}

#[test]
fn monitor_mode_reports_what_a_reload_would_cut_and_lets_it_pass() {
    let mut dp = datapath_with(&allowing(&[8080]), Mode::Monitor);
    let flow = tcp4(WEB, API, 40000, 8080);
    assert_eq!(judge(&mut dp, &flow), Outcome::Pass);
    assert_eq!(dp.install(&allowing(&[8443])).unwrap(), 2);
    let (outcome, n) = judge_counted(&mut dp, &flow, Verdict::Audit, Reason::DefaultDeny);
    assert_eq!((outcome, n), (Outcome::Pass, 1), "audited once under generation 2, then remembered");
    dp.set_mode(Mode::Enforce).unwrap();
    assert_eq!(judge(&mut dp, &flow), Outcome::Drop, "enforcing, the audited flow is cut");
}

// Counters by direction and hook, and the bounds on flow events (`zt_common::EventLimits`).

/// Runs `frame` `times` times through one hook (BPF_PROG_TEST_RUN repeats it in the kernel).
fn run_on(dp: &mut Datapath, hook: &str, frame: &[u8], times: u32) {
    let options = TestRunOptions { data_in: Some(frame), repeat: times, ..Default::default() };
    match hook {
        programs::XDP => dp.program::<Xdp>(hook).unwrap().test_run(options),
        programs::CGROUP_INGRESS | programs::CGROUP_EGRESS => dp.program::<CgroupSkb>(hook).unwrap().test_run(options),
        _ => dp.program::<SchedClassifier>(hook).unwrap().test_run(options),
    }
    .unwrap_or_else(|e| panic!("{hook}: {e}"));
}

/// Every event waiting on the ring buffer.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    std::iter::from_fn(|| ring.next().map(|record| events::decode(&record).expect("a whole FlowEvent"))).collect()
}

fn limits(window: Duration, rate: u64, burst: u64) -> EventLimitSettings {
    EventLimitSettings { window, rate, burst }
}

const WORLD: [u8; 4] = [192, 0, 2, 7];

#[test]
fn counters_are_exact_by_verdict_reason_direction_and_hook() {
    let mut dp = datapath(Mode::Enforce);
    let before = dp.counters().unwrap();
    // The intruder's own egress refuses; an unknown sender meets api's ingress; web → api passes
    // on its first hook and is established on the others.
    let intruder = tcp4(INTRUDER, API, 40000, 8080);
    let stranger = tcp4(WORLD, API, 40000, 8080);
    let allowed = tcp4(WEB, API, 40000, 8080);
    let runs: [(&[u8], &str, u32); 9] = [
        (&intruder, programs::TC_INGRESS, 2),
        (&intruder, programs::TC_EGRESS, 3),
        (&intruder, programs::XDP, 4),
        (&intruder, programs::CGROUP_EGRESS, 5),
        (&stranger, programs::XDP, 6),
        (&stranger, programs::CGROUP_INGRESS, 7),
        (&allowed, programs::TC_INGRESS, 1),
        (&allowed, programs::TC_EGRESS, 8),
        (&allowed, programs::XDP, 9),
    ];
    for (frame, hook, times) in runs {
        run_on(&mut dp, hook, frame, times);
    }
    let counted = dp.counters().unwrap().since(&before);
    let mut got: Vec<_> = counted.nonzero().map(|c| (c.verdict, c.reason, c.direction, c.hook, c.packets)).collect();
    let (deny, allow) = (Verdict::Deny, Verdict::Allow);
    let mut expected = vec![
        (deny, Reason::DefaultDeny, Direction::Egress, Hook::TcIngress, 2),
        (deny, Reason::DefaultDeny, Direction::Egress, Hook::TcEgress, 3),
        (deny, Reason::DefaultDeny, Direction::Egress, Hook::Xdp, 4),
        (deny, Reason::DefaultDeny, Direction::Egress, Hook::CgroupEgress, 5),
        (deny, Reason::DefaultDeny, Direction::Ingress, Hook::Xdp, 6),
        (deny, Reason::DefaultDeny, Direction::Ingress, Hook::CgroupIngress, 7),
        (allow, Reason::PolicyAllow, Direction::Ingress, Hook::TcIngress, 1),
        (allow, Reason::Established, Direction::None, Hook::TcEgress, 8),
        (allow, Reason::Established, Direction::None, Hook::Xdp, 9),
    ];
    got.sort_by_key(|c| format!("{c:?}"));
    expected.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(got, expected);
    // Unlimited (never configured): every reported verdict became an event.
    assert_eq!(counted.events(), EventCounts { emitted: 2 + 3 + 4 + 5 + 6 + 7 + 1, suppressed: 0, lost: 0 });
}

#[test]
fn a_flows_repeats_within_the_window_raise_one_event_and_the_next_says_how_many_were_suppressed() {
    let mut dp = datapath(Mode::Enforce);
    let mut ring = dp.take_events().unwrap();
    dp.set_event_limits(&limits(Duration::from_secs(3600), 0, 0)).unwrap();
    let flood = tcp4(INTRUDER, API, 40000, 8080);
    run_on(&mut dp, programs::XDP, &flood, 50);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "one event for 50 denials within the window");
    assert_eq!((events[0].suppressed, events[0].src_port), (0, 40000));
    let counters = dp.counters().unwrap();
    assert_eq!(counters.events(), EventCounts { emitted: 1, suppressed: 49, lost: 0 });

    // Another flow has its own window.
    run_on(&mut dp, programs::XDP, &tcp4(INTRUDER, API, 40001, 8080), 3);
    assert_eq!(drain(&mut ring).iter().map(|e| e.src_port).collect::<Vec<_>>(), [40001]);

    // The window ends (shortened to a nanosecond): the flow's next event carries the count.
    dp.set_event_limits(&limits(Duration::from_nanos(1), 0, 0)).unwrap();
    run_on(&mut dp, programs::XDP, &flood, 1);
    let events = drain(&mut ring);
    assert_eq!(events.iter().map(|e| (e.src_port, e.suppressed)).collect::<Vec<_>>(), [(40000, 49)]);

    // Within a new window, another verdict for the same flow is reported at once.
    dp.set_event_limits(&limits(Duration::from_secs(3600), 0, 0)).unwrap();
    dp.set_mode(Mode::Monitor).unwrap();
    run_on(&mut dp, programs::XDP, &flood, 1);
    let events = drain(&mut ring);
    assert_eq!(events.iter().map(|e| (e.verdict, e.suppressed)).collect::<Vec<_>>(), [(Verdict::Audit as u8, 0)]);
    let counters = dp.counters().unwrap();
    assert_eq!(counters.events().total(), counters.reported_packets(), "every reported packet is accounted for");
}

#[test]
fn the_token_bucket_caps_events_across_flows_and_every_suppressed_one_is_counted() {
    // One CPU's bucket: the test thread stays on CPU 0, where BPF_PROG_TEST_RUN runs the program.
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
    let mut dp = datapath(Mode::Enforce);
    let mut ring = dp.take_events().unwrap();
    let settings = limits(Duration::ZERO, 1, 16);
    let cpus = aya::util::online_cpus().unwrap().len() as u32;
    let per_cpu = settings.per_cpu(cpus);
    dp.set_event_limits(&settings).unwrap();

    const FLOWS: u16 = 400;
    let started = Instant::now();
    for port in 0..FLOWS {
        run_on(&mut dp, programs::XDP, &tcp4(INTRUDER, API, 20000 + port, 8080), 1);
    }
    let elapsed = started.elapsed();
    let emitted = drain(&mut ring);
    let counters = dp.counters().unwrap();
    let events = counters.events();
    assert_eq!(events.emitted, emitted.len() as u64);
    assert_eq!(events.total(), u64::from(FLOWS), "emitted + suppressed + lost == denied packets: {events:?}");
    assert_eq!(counters.reported_packets(), u64::from(FLOWS));
    // The burst passes, then one event per interval (measured, not assumed).
    let refills = elapsed.as_nanos() as u64 / per_cpu.interval_ns + 1;
    assert!(
        events.emitted >= per_cpu.burst && events.emitted <= per_cpu.burst + refills,
        "{events:?} with a burst of {} and {refills} refills in {elapsed:?}",
        per_cpu.burst
    );

    // Without a rate, each flow's next event says how many of its own were held back.
    dp.set_event_limits(&EventLimitSettings::UNLIMITED).unwrap();
    for port in 0..FLOWS {
        run_on(&mut dp, programs::XDP, &tcp4(INTRUDER, API, 20000 + port, 8080), 1);
    }
    let next = drain(&mut ring);
    assert_eq!(next.len(), usize::from(FLOWS));
    let carried: u64 = next.iter().map(|e| e.suppressed).sum();
    assert_eq!(carried, events.suppressed, "the suppressed events are carried by their flows' next events");
    assert!(next.iter().all(|e| e.suppressed <= 1));
}
