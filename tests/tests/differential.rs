//! Differential test: the kernel datapath (parse → conntrack → identify → policy → verdict, the
//! real programs, loaded in-process) against the agent's reference evaluator
//! (`zt_agent::policy::eval::Evaluator`), on random policy sets and random flows.
//!
//! Each policy set is generated as YAML text from a seeded RNG, parsed, compiled and installed in
//! a fresh `Datapath` in enforce mode. Each flow is a crafted frame run through the XDP program
//! with BPF_PROG_TEST_RUN; the return code (XDP_PASS = allow, XDP_DROP = deny) and the flow
//! event it emits (reason, direction, rule, both identities, the 5-tuple) must be exactly what
//! the evaluator predicts, including "no event" for flows no policy concerns (`not-isolated`).
//! On a mismatch the test fails with the policy YAML, the flow and both answers.
//!
//! Each datapath is then reloaded with a second random policy set (a new generation in the other
//! slot, switched to atomically), and the flows the first set admitted are sent again, forward
//! or as their replies: each must be judged again under the second set — passed silently as
//! established if the second set allows the flow it belongs to, else revoked (both conntrack
//! entries forgotten) and the packet judged as a new flow, with its event — followed by new
//! flows under the second set.
//!
//! Environment:
//! - `ZT_DIFF_CASES`: total number of new flows (default 100000), 4000 per policy set, so it
//!   also sets the number of policy sets (default 25). Raise it for a longer soak, e.g.
//!   `ZT_DIFF_CASES=2000000` for 500 policy sets (`cargo xtask sweep`).
//! - `ZT_DIFF_SEED`: the seed of the `fastrand` generators (decimal or `0x…` hex; default fixed).
//!   A failure names the seed and the policy set; the same seed (with the `fastrand` version
//!   Cargo.lock pins) replays the same policy sets and flows.
//!
//! Needs root (loading BPF programs); fails, never skips, without it.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    fmt::{self, Write as _},
    net::IpAddr,
    time::Instant,
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions, Xdp},
};
use fastrand::Rng;
use zt_agent::{
    datapath::{Datapath, Mode},
    events,
    policy::{
        self,
        compile::{self, Compiled},
        eval::{Decision, Evaluator},
    },
};
use zt_common::{event_flags, identity, mode, proto, Direction, FlowEvent, Hook, Reason, Verdict};

use common::{
    env_number,
    scenario::{Case, Draw as _, Scenario, FIRST_SOURCE_PORT},
};

const DEFAULT_CASES: usize = 100_000;
/// Loading a datapath runs the verifier over five programs, seconds per load in a debug build
/// here, while a flow costs a fraction of a millisecond: the time goes into policy sets, so
/// each one is checked with many flows (at most 15535 per datapath: see FIRST_SOURCE_PORT).
const FLOWS_PER_SET: usize = 4_000;
/// After the reload: admitted flows sent again, then new flows under the second policy set.
const REPLAYS_PER_SET: usize = 200;
const FLOWS_AFTER_RELOAD: usize = 200;
const DEFAULT_SEED: u64 = 0x7a74_d1ff_0000_2024;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Conntrack isolation. The kernel admits every allowed flow into conntrack in both directions,
/// and a later packet matching an entry passes as `established` without a policy lookup, which
/// is not what this test compares. Ports and ICMP echo identifiers keep cases apart:
/// - TCP, UDP, SCTP: the forward key is (src, dst, sport, dport), the reverse key
///   (dst, src, dport, sport). Every case of a datapath has its own source port ≥ 50000 and
///   every destination port is < 50000, so a case's forward key never equals an earlier forward
///   key (different sport) nor an earlier reverse key (whose sport is an earlier dport < 50000).
/// - ICMP and ICMPv6 echo request/reply: the key is (src, dst, identifier, type) and the reverse
///   key keeps the identifier; every case has its own identifier, so no earlier entry matches.
/// - Other ICMP types and protocols without ports have nothing per-case in their key (the
///   kernel keys them with port 0). For those the test models the conntrack entries the kernel
///   made (`Conntrack`) and redraws a flow whose key is already there.

#[test]
fn kernel_and_reference_evaluator_agree_on_random_policies_and_flows() {
    zt_tests::ensure_root().expect("the differential test loads BPF programs");
    let cases = env_number("ZT_DIFF_CASES").map_or(DEFAULT_CASES, |n| n as usize).max(1);
    let seed = env_number("ZT_DIFF_SEED").unwrap_or(DEFAULT_SEED);
    let sets = cases.div_ceil(FLOWS_PER_SET);
    let started = Instant::now();

    let mut stats = Stats::default();
    for set in 0..sets {
        let flows = FLOWS_PER_SET.min(cases - set * FLOWS_PER_SET);
        if let Err(report) = run_policy_set(seed, set, flows, &mut stats) {
            panic!("{report}");
        }
    }
    eprintln!(
        "differential: {} cases over {sets} policy sets agreed in {:.1?} (seed {seed:#x})\n{stats}",
        stats.cases,
        started.elapsed()
    );
    assert_eq!(stats.cases, cases);
    stats.check_coverage();
}

/// Generates policy set `set`, installs it in a fresh datapath and checks `flows` flows; then
/// reloads the datapath with a second set and checks the admitted flows again, and new ones.
fn run_policy_set(seed: u64, set: usize, flows: usize, stats: &mut Stats) -> Result<(), String> {
    let mut rng = Rng::with_seed(seed ^ (set as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f));
    let first = Generation::new(Scenario::generate(&mut rng), set, 1);
    let mut dp = Datapath::load().expect("loading the datapath needs root and a BPF-capable kernel");
    dp.set_mode(Mode::Enforce).unwrap();
    assert_eq!(dp.install(&first.compiled).unwrap(), 1);
    let mut ring = dp.take_events().unwrap();
    let mut conntrack = Conntrack::default();
    let mut run = Run { seed, set, dp: &mut dp, ring: &mut ring, conntrack: &mut conntrack, next_unique: 0 };

    let admitted = run.new_flows(&mut rng, &first, flows, stats)?;

    // Half the time the same identities under a tighter policy, else another policy set with
    // other identities and prefixes.
    let second = if rng.percent(50) { first.scenario.tightened(&mut rng) } else { Scenario::generate(&mut rng) };
    let second = Generation::new(second, set, 2);
    assert_eq!(run.dp.install(&second.compiled).unwrap(), 2);
    let in_force = run.dp.config().unwrap().slot as usize;
    let entries = run.dp.slot_entries().unwrap();
    assert_eq!(entries[1 - in_force], (0, 0, 0), "the first generation's slot is emptied by the switch");
    assert_ne!(entries[in_force], (0, 0, 0));
    for case in admitted.iter().take(REPLAYS_PER_SET) {
        run.replay(&mut rng, case, &second, stats)?;
    }
    run.new_flows(&mut rng, &second, FLOWS_AFTER_RELOAD, stats)?;
    Ok(())
}

/// One installed policy set.
struct Generation {
    scenario: Scenario,
    compiled: Compiled,
    evaluator: Evaluator,
    generation: u32,
}

impl Generation {
    fn new(scenario: Scenario, set: usize, generation: u32) -> Self {
        let parsed = policy::parse_str(&scenario.yaml, "random.yaml").unwrap_or_else(|errors| {
            panic!("generated policy set {set} (generation {generation}) does not parse:\n{}\n{errors}", scenario.yaml)
        });
        let compiled = compile::compile(&parsed).unwrap_or_else(|err| {
            panic!("generated policy set {set} (generation {generation}) does not compile:\n{}\n{err}", scenario.yaml)
        });
        let evaluator = Evaluator::new(&compiled);
        Generation { scenario, compiled, evaluator, generation }
    }
}

/// One datapath and what the test knows of its conntrack.
struct Run<'a> {
    seed: u64,
    set: usize,
    dp: &'a mut Datapath,
    ring: &'a mut RingBuf<MapData>,
    conntrack: &'a mut Conntrack,
    /// Cases so far on this datapath: the next case's source port is FIRST_SOURCE_PORT + this.
    next_unique: u16,
}

impl Run<'_> {
    /// Checks `flows` new flows; returns those the kernel admitted whose conntrack keys are
    /// their own.
    fn new_flows(&mut self, rng: &mut Rng, g: &Generation, flows: usize, stats: &mut Stats) -> Result<Vec<Case>, String> {
        let mut admitted = Vec::new();
        for _ in 0..flows {
            // Unique per case within this datapath: see `FIRST_SOURCE_PORT`.
            let unique = self.next_unique;
            self.next_unique = unique.checked_add(1).filter(|u| *u < u16::MAX - FIRST_SOURCE_PORT).expect("fewer than 15535 flows per datapath");
            let case = loop {
                let case = Case::generate(rng, &g.scenario, FIRST_SOURCE_PORT + unique, 1 + unique);
                if !self.conntrack.holds(&case) {
                    break case;
                }
                assert!(!case.has_unique_key(), "case {unique} would be established despite its unique key: {case}");
            };
            let decision = g.evaluator.evaluate(&case.flow());
            let expected = Answer::expected(&case, &decision, &g.evaluator, g.generation);
            let kernel = Answer::kernel(self.dp, self.ring, &case.frame());
            if kernel != expected {
                let label = format!("flow {unique} (generation {})", g.generation);
                return Err(mismatch_report(self.seed, self.set, &label, g, &case, &kernel, &expected));
            }
            if kernel.return_code == XDP_PASS {
                self.conntrack.admit(&case);
                if case.has_unique_key() {
                    admitted.push(case);
                }
            }
            if g.generation == 1 {
                stats.count(&case, &decision, &g.evaluator);
            } else {
                stats.after_reload += 1;
            }
        }
        Ok(admitted)
    }

    /// Sends a flow the first generation admitted again under `g`, forward or (half the time,
    /// when it has one) as its reply.
    fn replay(&mut self, rng: &mut Rng, case: &Case, g: &Generation, stats: &mut Stats) -> Result<(), String> {
        let reply = case.reply().filter(|_| rng.percent(50));
        let original = g.evaluator.evaluate(&case.flow());
        let kept = original.verdict != Verdict::Deny;
        let packet = reply.unwrap_or(*case);
        let expected = match kept {
            // Still allowed: the entry is refreshed and the packet passes as established.
            true => Answer { return_code: XDP_PASS, events: Vec::new() },
            // Revoked: the packet — forward or reply — gets the flow's new verdict.
            false => Answer::expected(&packet, &original, &g.evaluator, g.generation),
        };
        let kernel = Answer::kernel(self.dp, self.ring, &packet.frame());
        if kernel != expected {
            let what = if reply.is_some() { "the reply to" } else { "again" };
            let label = format!("{what} admitted flow {case}, after the reload (original flow {original:?})");
            return Err(mismatch_report(self.seed, self.set, &label, g, &packet, &kernel, &expected));
        }
        if kernel.return_code == XDP_PASS {
            self.conntrack.admit(&packet);
        }
        let key = match (reply.is_some(), kept) {
            (false, true) => "forward, still allowed",
            (false, false) => "forward, revoked",
            (true, true) => "reply, still allowed",
            (true, false) => "reply, revoked",
        };
        *stats.replays.entry(key).or_default() += 1;
        Ok(())
    }
}

/// What one side says about a frame: the XDP return code and the flow events it caused.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    return_code: u32,
    events: Vec<Event>,
}

/// The fields of a flow event this test predicts (all but the timestamp and the ifindex).
#[derive(Debug, PartialEq, Eq)]
struct Event {
    verdict: u8,
    reason: u8,
    direction: u8,
    rule_id: u32,
    src_identity: u32,
    dst_identity: u32,
    src_addr: [u8; 16],
    dst_addr: [u8; 16],
    src_port: u16,
    dst_port: u16,
    protocol: u8,
    family: u8,
    hook: u8,
    mode: u8,
    generation: u32,
    staged: bool,
}

impl From<&FlowEvent> for Event {
    fn from(ev: &FlowEvent) -> Self {
        Event {
            verdict: ev.verdict,
            reason: ev.reason,
            direction: ev.direction,
            rule_id: ev.rule_id,
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            src_addr: ev.src_addr,
            dst_addr: ev.dst_addr,
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            protocol: ev.protocol,
            family: ev.family,
            hook: ev.hook,
            mode: ev.mode,
            generation: ev.generation,
            staged: ev.flags & event_flags::STAGED != 0,
        }
    }
}

impl Answer {
    fn kernel(dp: &mut Datapath, ring: &mut RingBuf<MapData>, frame: &[u8]) -> Self {
        let xdp: &mut Xdp = dp.program(zt_common::programs::XDP).unwrap();
        let ret = xdp.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() }).unwrap();
        // The event is submitted before the program returns, so it is in the ring by now. Read
        // every record there is: exactly one (or none) must belong to this frame.
        let mut events = Vec::new();
        while let Some(record) = ring.next() {
            let event = events::decode(&record).expect("a ring-buffer record holds a whole FlowEvent");
            events.push(Event::from(&event));
        }
        Answer { return_code: ret.return_value, events }
    }

    fn expected(case: &Case, decision: &Decision, evaluator: &Evaluator, generation: u32) -> Self {
        // An audit here is a staged policy's (the node enforces): the packet passes.
        let pass = decision.verdict != Verdict::Deny;
        // The kernel reports every deny and every allow a rule took; `not-isolated` is silent.
        let events = if decision.reason == Reason::NotIsolated {
            Vec::new()
        } else {
            let (src_port, dst_port) = case.kernel_ports();
            vec![Event {
                verdict: decision.verdict as u8,
                reason: decision.reason as u8,
                direction: decision.direction as u8,
                rule_id: decision.rule_id,
                src_identity: evaluator.identity(case.src),
                dst_identity: evaluator.identity(case.dst),
                src_addr: compile::ip_key(case.src),
                dst_addr: compile::ip_key(case.dst),
                src_port,
                dst_port,
                protocol: case.protocol,
                family: if case.src.is_ipv4() { 4 } else { 6 },
                hook: Hook::Xdp as u8,
                mode: mode::ENFORCE as u8,
                generation,
                staged: decision.verdict == Verdict::Audit,
            }]
        };
        Answer { return_code: if pass { XDP_PASS } else { XDP_DROP }, events }
    }
}

#[allow(clippy::too_many_arguments)]
fn mismatch_report(
    seed: u64,
    set: usize,
    label: &str,
    g: &Generation,
    case: &Case,
    kernel: &Answer,
    expected: &Answer,
) -> String {
    let (scenario, compiled, evaluator) = (&g.scenario, &g.compiled, &g.evaluator);
    let name = |id: u32| compiled.identities.name(id).unwrap_or("?").to_owned();
    let rule = |id: u32| match compiled.rule(id) {
        Some(rule) => {
            let direction = events::direction_name(rule.direction as u8);
            format!("{id} = {}/{direction}/{} ({:?})", rule.policy, rule.index, rule.action)
        }
        None => format!("{id} (no rule)"),
    };
    let describe = |answer: &Answer| {
        let outcome = match answer.return_code {
            XDP_PASS => "PASS",
            XDP_DROP => "DROP",
            _ => "unexpected",
        };
        let mut text = format!("    {outcome} (return code {})\n", answer.return_code);
        if answer.events.is_empty() {
            text.push_str("    no event\n");
        }
        for ev in &answer.events {
            let reason = Reason::from_u8(ev.reason).map_or("?", Reason::name);
            writeln!(
                text,
                "    event: verdict {} reason {reason} direction {} rule {}\n           src {} ({}) dst {} ({}) proto {} ports {} -> {} family {} hook {} mode {} generation {}\n           {ev:?}",
                events::verdict_name(ev.verdict),
                events::direction_name(ev.direction),
                rule(ev.rule_id),
                ev.src_identity,
                name(ev.src_identity),
                ev.dst_identity,
                name(ev.dst_identity),
                ev.protocol,
                ev.src_port,
                ev.dst_port,
                ev.family,
                ev.hook,
                ev.mode,
                ev.generation,
            )
            .unwrap();
        }
        text
    };
    let decision = evaluator.evaluate(&case.flow());
    let rules: String = compiled
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let direction = events::direction_name(r.direction as u8);
            format!("    {} = {}/{direction}/{} {:?}\n", i + 1, r.policy, r.index, r.action)
        })
        .collect();
    let identities: String = compiled.identities.iter().map(|(name, id)| format!("    {name} = {id}\n")).collect();
    format!(
        "kernel and evaluator disagree (seed {seed:#x}, policy set {set}, {label}; replay with ZT_DIFF_SEED={seed:#x})\n\
         --- policy YAML (generation {}) ---\n{}\n--- identities ---\n{identities}--- rules ---\n{rules}\
         --- flow ---\n    {case}\n    src identity {} ({}), dst identity {} ({})\n\
         --- kernel ---\n{}--- evaluator ---\n    {decision:?}\n{}",
        g.generation,
        scenario.yaml,
        evaluator.identity(case.src),
        name(evaluator.identity(case.src)),
        evaluator.identity(case.dst),
        name(evaluator.identity(case.dst)),
        describe(kernel),
        describe(expected),
    )
}

// ---------------------------------------------------------------------------------------------
// Coverage

/// What the cases exercised: agreement proves little if the generator never reaches an outcome.
#[derive(Default)]
struct Stats {
    cases: usize,
    outcomes: BTreeMap<String, usize>,
    features: BTreeMap<&'static str, usize>,
    /// Admitted flows sent again after the reload, by direction and outcome.
    replays: BTreeMap<&'static str, usize>,
    /// New flows after the reload.
    after_reload: usize,
}

impl Stats {
    fn count(&mut self, case: &Case, decision: &Decision, evaluator: &Evaluator) {
        self.cases += 1;
        let direction = events::direction_name(decision.direction as u8);
        *self.outcomes.entry(format!("{}/{direction}", decision.reason.name())).or_default() += 1;
        let mut feature = |name| *self.features.entry(name).or_default() += 1;
        feature(if case.src.is_ipv4() { "ipv4" } else { "ipv6" });
        feature(match case.protocol {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::SCTP => "sctp",
            proto::ICMP | proto::ICMPV6 if matches!(case.dst_port, 8 | 128) => "icmp echo request",
            proto::ICMP | proto::ICMPV6 => "icmp other type",
            _ => "other protocol",
        });
        let (src, dst) = (evaluator.identity(case.src), evaluator.identity(case.dst));
        if src == identity::WORLD || dst == identity::WORLD {
            feature("a world end");
        }
        if identity::is_declared(src) && identity::is_declared(dst) {
            feature("two declared ends");
        }
        if src >= identity::FIRST_CIDR || dst >= identity::FIRST_CIDR {
            feature("an end in a CIDR peer's range");
        }
        if decision.verdict == Verdict::Audit {
            feature("a staged policy's audit");
        }
        if case.vlan {
            feature("vlan");
        }
    }

    fn check_coverage(&self) {
        // At least 0.5% of the cases each (100 of the default 20000).
        let minimum = self.cases / 200;
        let mut wanted: Vec<String> = Vec::new();
        for reason in [Reason::PolicyAllow, Reason::PolicyDeny, Reason::DefaultDeny] {
            for direction in [Direction::Ingress, Direction::Egress] {
                wanted.push(format!("{}/{}", reason.name(), events::direction_name(direction as u8)));
            }
        }
        wanted.push(format!("{}/none", Reason::NotIsolated.name()));
        for outcome in wanted {
            let n = self.outcomes.get(&outcome).copied().unwrap_or(0);
            assert!(n >= minimum, "only {n} cases of {outcome} (want {minimum}): the generator is too narrow\n{self}");
        }
        for feature in [
            "ipv4",
            "ipv6",
            "tcp",
            "udp",
            "sctp",
            "icmp echo request",
            "icmp other type",
            "a world end",
            "an end in a CIDR peer's range",
            "a staged policy's audit",
        ] {
            let n = self.features.get(feature).copied().unwrap_or(0);
            assert!(n >= minimum, "only {n} cases with {feature} (want {minimum})\n{self}");
        }
        // Each way an established flow can meet a new generation, in at least 2% of the replays.
        let replays: usize = self.replays.values().sum();
        for key in ["forward, still allowed", "forward, revoked", "reply, still allowed", "reply, revoked"] {
            let n = self.replays.get(key).copied().unwrap_or(0);
            assert!(n >= replays / 50, "only {n} of {replays} replays were {key}\n{self}");
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, n) in
            self.outcomes.iter().map(|(k, n)| (k.as_str(), n)).chain(self.features.iter().map(|(k, n)| (*k, n)))
        {
            writeln!(f, "  {key:<24} {n}")?;
        }
        for (key, n) in &self.replays {
            writeln!(f, "  replayed {key:<24} {n}")?;
        }
        writeln!(f, "  new flows after the reload {}", self.after_reload)
    }
}

/// A conntrack key: (src, dst, src_port, dst_port, protocol), as in `zt_common::CtKey`.
type CtKey = ([u8; 16], [u8; 16], u16, u16, u8);

/// The conntrack keys the kernel holds for the flows it passed, computed as the kernel does.
#[derive(Default)]
struct Conntrack {
    keys: HashSet<CtKey>,
}

impl Conntrack {
    fn key(src: IpAddr, dst: IpAddr, ports: (u16, u16), protocol: u8) -> CtKey {
        (compile::ip_key(src), compile::ip_key(dst), ports.0, ports.1, protocol)
    }

    /// Whether the case's packet would hit an entry and pass as established.
    fn holds(&self, case: &Case) -> bool {
        self.keys.contains(&Self::key(case.src, case.dst, case.kernel_ports(), case.protocol))
    }

    fn admit(&mut self, case: &Case) {
        let (src_port, dst_port) = case.kernel_ports();
        // Replies are admitted for echo requests only (ICMP 8 → 0, ICMPv6 128 → 129), and for
        // every other protocol with the ports swapped.
        let reverse_ports = match (case.protocol, dst_port) {
            (1, 8) => Some((src_port, 0)),
            (58, 128) => Some((src_port, 129)),
            (1 | 58, _) => None,
            _ => Some((dst_port, src_port)),
        };
        self.keys.insert(Self::key(case.src, case.dst, (src_port, dst_port), case.protocol));
        if let Some(ports) = reverse_ports {
            self.keys.insert(Self::key(case.dst, case.src, ports, case.protocol));
        }
    }
}
