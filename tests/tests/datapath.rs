//! The loaded kernel programs, driven by BPF_PROG_TEST_RUN with crafted frames: what passes, what
//! is dropped, and under which reason. Needs root (loading BPF programs); fails, never skips.

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use zt_agent::{
    datapath::{Datapath, Mode},
    policy::{self, compile::Compiled},
};
use zt_common::{counter_index, programs, Reason, Verdict};

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
    let index = counter_index(verdict, reason) as usize;
    let before = dp.counters().unwrap()[index];
    let outcome = judge(dp, frame);
    (outcome, dp.counters().unwrap()[index] - before)
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
    let (outcome, n) = judge_counted(&mut dp, &fragment, Verdict::Deny, Reason::Fragment);
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
    let index = counter_index(Verdict::Deny, Reason::Malformed) as usize;
    for (what, frame, hooks) in cases {
        let before = dp.counters().unwrap()[index];
        assert_eq!(judge_on(&mut dp, &frame, hooks), Outcome::Drop, "{what}");
        assert_eq!(dp.counters().unwrap()[index] - before, hooks.len() as u64, "{what} counted as malformed");
    }
}

#[test]
fn fragments_are_never_a_bypass() {
    let mut dp = datapath(Mode::Enforce);
    // A non-first fragment of an otherwise allowed flow: it carries no ports to judge.
    let mut later = tcp4(WEB, API, 40000, 8080);
    later[14 + 6..14 + 8].copy_from_slice(&185u16.to_be_bytes());
    let (outcome, n) = judge_counted(&mut dp, &later, Verdict::Deny, Reason::Fragment);
    assert_eq!((outcome, n), (Outcome::Drop, 3));
    // The first fragment carries the ports and is judged like any packet.
    let mut first = tcp4(WEB, API, 40000, 8080);
    first[14 + 6] = 0x20; // more fragments, offset 0
    assert_eq!(judge(&mut dp, &first), Outcome::Pass);
    let mut first_denied = tcp4(INTRUDER, API, 40000, 8080);
    first_denied[14 + 6] = 0x20;
    assert_eq!(judge(&mut dp, &first_denied), Outcome::Drop);
    // Any IPv6 fragment header.
    let (outcome, n) =
        judge_counted(&mut dp, &tcp6_with_extensions(&[44], 8080), Verdict::Deny, Reason::Fragment);
    assert_eq!((outcome, n), (Outcome::Drop, 3));
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
fn one_vlan_tag_is_parsed_anything_else_unknown_is_denied() {
    let mut dp = datapath(Mode::Enforce);
    assert_eq!(judge(&mut dp, &with_vlan_tags(&tcp4(WEB, API, 40000, 8080), 1)), Outcome::Pass);
    assert_eq!(judge(&mut dp, &with_vlan_tags(&tcp4(INTRUDER, API, 40000, 8080), 1)), Outcome::Drop);
    let (outcome, n) = judge_counted(
        &mut dp,
        &with_vlan_tags(&tcp4(WEB, API, 40000, 8080), 2),
        Verdict::Deny,
        Reason::UnsupportedProtocol,
    );
    assert_eq!((outcome, n), (Outcome::Drop, 3), "QinQ is not parsed, so it is denied");
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
