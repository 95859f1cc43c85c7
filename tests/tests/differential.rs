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

use std::{
    collections::{BTreeMap, HashSet},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::{IpNumber, PacketBuilder};
use fastrand::Rng;
use zt_agent::{
    datapath::{Datapath, Mode},
    events,
    policy::{
        self,
        compile::{self, Compiled},
        eval::{Decision, Evaluator, Flow},
    },
};
use zt_common::{event_flags, identity, mode, proto, Direction, FlowEvent, Hook, Reason, Verdict};

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
const FIRST_SOURCE_PORT: u16 = 50_000;
const PORT_LIMIT: u16 = FIRST_SOURCE_PORT;

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

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => text.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
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
// Policy sets

/// A generated policy set: its YAML and what flows are drawn from.
struct Scenario {
    yaml: String,
    prefixes: Vec<Prefix>,
    /// Ranges no identity owns, which CIDR peers name (world addresses are drawn from them too).
    world_ranges: Vec<Prefix>,
    /// Ports the rules mention (range bounds and single ports), for boundary flows.
    ports: Vec<u16>,
    /// The declared identities.
    names: Vec<&'static str>,
}

const IDENTITY_NAMES: [&str; 10] =
    ["web", "api", "db", "cache.prod", "team-a/web", "svc:metrics", "job_1", "0day", "a", "payments-v2"];
const WELL_KNOWN_PORTS: [u16; 9] = [1, 22, 53, 80, 443, 5432, 8080, 8443, 49999];
const ICMP_TYPES: [u16; 6] = [0, 3, 5, 8, 11, 13];
const ICMPV6_TYPES: [u16; 6] = [1, 2, 3, 4, 128, 129];

impl Scenario {
    fn generate(rng: &mut Rng) -> Self {
        let prefixes = Prefix::generate_pool(rng);
        let mut ports: Vec<u16> = (0..3 + rng.usize(..4))
            .map(|_| if rng.percent(50) { rng.pick(&WELL_KNOWN_PORTS) } else { rng.u16(1..50_000) })
            .collect();
        ports.sort_unstable();
        ports.dedup();

        let mut yaml = String::new();
        let mut names = IDENTITY_NAMES;
        rng.shuffle(&mut names);
        let names = &names[..(1 + rng.usize(..6)).min(prefixes.len())];
        // Every prefix to one identity (a prefix may not appear twice), at least one each.
        let mut owned: Vec<Vec<Prefix>> = vec![Vec::new(); names.len()];
        for (i, prefix) in prefixes.iter().enumerate() {
            let owner = if i < names.len() { i } else { rng.usize(..names.len()) };
            owned[owner].push(*prefix);
        }
        for (name, selectors) in names.iter().zip(&owned) {
            let selectors: Vec<String> = selectors.iter().map(|p| format!("{{cidr: \"{p}\"}}")).collect();
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: \"{name}\"}}\nspec: {{selectors: [{}]}}",
                selectors.join(", ")
            )
            .unwrap();
        }
        if rng.percent(40) {
            // The zero-trust baseline.
            writeln!(yaml, "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: baseline}}\nspec: {{subject: [any], ingress: [], egress: []}}").unwrap();
        }
        let names = names.to_vec();
        let world_ranges = Prefix::generate_world_ranges(rng, &prefixes);
        let mut scenario = Scenario { yaml, prefixes, world_ranges, ports, names };
        let count = 1 + rng.usize(..6);
        scenario.write_policies(rng, "p", count);
        scenario
    }

    /// The same identities under a policy that allows less: the same policies plus (half the
    /// time) a baseline isolating every identity both ways, and one to three more policies.
    fn tightened(&self, rng: &mut Rng) -> Scenario {
        let mut tightened = Scenario { yaml: self.yaml.clone(), world_ranges: self.world_ranges.clone(), prefixes: self.prefixes.clone(), ports: self.ports.clone(), names: self.names.clone() };
        if rng.percent(50) {
            writeln!(tightened.yaml, "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: tightened}}\nspec: {{subject: [any], ingress: [], egress: []}}").unwrap();
        }
        let count = 1 + rng.usize(..3);
        tightened.write_policies(rng, "t", count);
        tightened
    }

    /// `count` random policies named `<prefix>0`, `<prefix>1`, … over the identities; a quarter
    /// of them staged (`mode: monitor`).
    fn write_policies(&mut self, rng: &mut Rng, prefix: &str, count: usize) {
        let quoted = |name: &str| format!("\"{name}\"");
        let subjects: Vec<String> = self.names.iter().map(|n| quoted(n)).collect();
        let mut peers = subjects.clone();
        peers.extend((0..1 + rng.usize(..3)).map(|_| self.cidr_peer(rng)));
        peers.extend(["any".to_owned(), "world".to_owned()]);
        let (yaml, ports) = (&mut self.yaml, &self.ports);
        for policy in 0..count {
            let subject: Vec<String> = (0..1 + rng.usize(..2))
                .map(|_| if rng.percent(20) { "any".to_owned() } else { rng.pick_ref(&subjects).clone() })
                .collect();
            let mode = if rng.percent(25) { "\n  mode: monitor" } else { "" };
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: {prefix}{policy}}}\nspec:{mode}\n  subject: [{}]",
                subject.join(", ")
            )
            .unwrap();
            let ingress = rng.percent(65);
            let egress = !ingress || rng.percent(50);
            for (present, list, peer_key) in [(ingress, "ingress", "from"), (egress, "egress", "to")] {
                if !present {
                    continue;
                }
                let rules = if rng.percent(15) { 0 } else { 1 + rng.usize(..4) };
                if rules == 0 {
                    writeln!(yaml, "  {list}: []").unwrap();
                    continue;
                }
                writeln!(yaml, "  {list}:").unwrap();
                for _ in 0..rules {
                    writeln!(yaml, "    - {}", Self::rule(rng, peer_key, &peers, ports)).unwrap();
                }
            }
        }
    }

    /// `{cidr: R, except: [...]}`: R a world range or a family's /0, the exceptions world ranges
    /// or declared prefixes strictly inside it.
    fn cidr_peer(&self, rng: &mut Rng) -> String {
        let v4 = rng.percent(60);
        let mut candidates: Vec<Prefix> = self.world_ranges.iter().copied().filter(|p| p.v4 == v4).collect();
        candidates.push(Prefix::new(v4, 0, 0));
        let range = rng.pick(&candidates);
        let inside: Vec<Prefix> = self
            .world_ranges
            .iter()
            .chain(&self.prefixes)
            .copied()
            .filter(|p| p.v4 == v4 && p.len > range.len && range.contains(v4, p.network))
            .collect();
        let except: Vec<String> = match inside.is_empty() {
            true => Vec::new(),
            false => (0..rng.usize(..3)).map(|_| format!("\"{}\"", rng.pick(&inside))).collect(),
        };
        format!("{{cidr: \"{range}\", except: [{}]}}", except.join(", "))
    }

    fn rule(rng: &mut Rng, peer_key: &str, peers: &[String], ports: &[u16]) -> String {
        let peer_list: Vec<&str> = (0..1 + rng.usize(..2))
            .map(|_| match rng.usize(..100) {
                0..15 => "any",
                15..35 => "world",
                _ => rng.pick_ref(&peers[..peers.len() - 2]).as_str(),
            })
            .collect();
        let mut rule = format!("{{{peer_key}: [{}]", peer_list.join(", "));
        if rng.percent(75) {
            let items: Vec<String> = (0..1 + rng.usize(..3)).map(|_| Self::port_item(rng, ports)).collect();
            write!(rule, ", ports: [{}]", items.join(", ")).unwrap();
        }
        match rng.usize(..100) {
            0..25 => rule.push_str(", action: deny"),
            25..35 => rule.push_str(", action: allow"),
            _ => {}
        }
        rule.push('}');
        rule
    }

    fn port_item(rng: &mut Rng, ports: &[u16]) -> String {
        let protocol =
            rng.pick(&["tcp", "tcp", "tcp", "tcp", "udp", "udp", "sctp", "icmp", "icmp", "icmpv6", "icmpv6"]);
        if protocol.starts_with("icmp") {
            if rng.percent(30) {
                return format!("{{protocol: {protocol}}}");
            }
            let types = if protocol == "icmp" { &ICMP_TYPES } else { &ICMPV6_TYPES };
            // Now and then the other family's types, or any number: a type is just a number.
            let icmp_type = match rng.usize(..10) {
                0 => rng.u16(..256),
                1 => rng.pick(if protocol == "icmp" { &ICMPV6_TYPES } else { &ICMP_TYPES }),
                _ => rng.pick(types),
            };
            return format!("{{protocol: {protocol}, type: {icmp_type}}}");
        }
        match rng.usize(..10) {
            0..2 => format!("{{protocol: {protocol}}}"),
            2..4 => format!("{{protocol: {protocol}, port: {}}}", rng.pick(ports)),
            4 => format!("{{protocol: {protocol}, port: \"{}\"}}", rng.pick(ports)),
            5 => format!("{{protocol: {protocol}, port: \"{}-65535\"}}", rng.pick(ports)),
            _ => {
                let (a, b) = (rng.pick(ports), rng.pick(ports));
                format!("{{protocol: {protocol}, port: \"{}-{}\"}}", a.min(b), a.max(b))
            }
        }
    }
}

/// An address prefix: the address as a number (IPv4 in the low 32 bits) and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Prefix {
    v4: bool,
    network: u128,
    len: u32,
}

impl Prefix {
    fn width(v4: bool) -> u32 {
        if v4 {
            32
        } else {
            128
        }
    }

    fn host_mask(&self) -> u128 {
        let host_bits = Self::width(self.v4) - self.len;
        if host_bits == 0 {
            0
        } else {
            u128::MAX >> (128 - host_bits)
        }
    }

    fn last(&self) -> u128 {
        self.network | self.host_mask()
    }

    fn new(v4: bool, addr: u128, len: u32) -> Self {
        let width_mask = if v4 { u128::from(u32::MAX) } else { u128::MAX };
        let mut prefix = Prefix { v4, network: addr & width_mask, len };
        prefix.network &= !prefix.host_mask();
        prefix
    }

    /// Nested prefixes in both families (sometimes only one), so that longest-prefix match
    /// decides between identities, with host routes (/32, /128) now and then.
    fn generate_pool(rng: &mut Rng) -> Vec<Prefix> {
        let families: &[bool] = match rng.usize(..10) {
            0 => &[true],
            1 => &[false],
            _ => &[true, false],
        };
        let mut pool: Vec<Prefix> = Vec::new();
        let root = |rng: &mut Rng, v4: bool| {
            if v4 {
                // Inside 10.0.0.0/8 (and IPv6 roots inside fd00::/16), so that roots nest too.
                let len = rng.u32(8..21);
                Prefix::new(true, 0x0a00_0000 | u128::from(rng.u32(..) & 0x00ff_ffff), len)
            } else {
                let len = rng.u32(16..65);
                Prefix::new(false, (0xfd00u128 << 112) | (u128::from(rng.u64(..)) << 56 >> 8), len)
            }
        };
        for &v4 in families {
            pool.push(root(rng, v4));
        }
        for _ in 0..1 + rng.usize(..10) {
            let v4 = rng.pick(families);
            let candidate = if rng.percent(20) {
                root(rng, v4)
            } else {
                let parents: Vec<Prefix> = pool.iter().copied().filter(|p| p.v4 == v4).collect();
                let parent = rng.pick(&parents);
                let width = Self::width(v4);
                if parent.len == width {
                    continue;
                }
                let len = if rng.percent(15) { width } else { (parent.len + rng.u32(1..13)).min(width) };
                let host = (u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..))) & parent.host_mask();
                Prefix::new(v4, parent.network | host, len)
            };
            if !pool.contains(&candidate) {
                pool.push(candidate);
            }
        }
        rng.shuffle(&mut pool);
        pool
    }

    /// One to four ranges outside every declared prefix (v4 in 11.0.0.0/8, v6 in 2001:db8::/32,
    /// which no declared prefix touches), nested now and then.
    fn generate_world_ranges(rng: &mut Rng, declared: &[Prefix]) -> Vec<Prefix> {
        let mut ranges: Vec<Prefix> = Vec::new();
        for _ in 0..1 + rng.usize(..4) {
            let v4 = rng.percent(60);
            let candidate = match ranges.iter().copied().filter(|p| p.v4 == v4 && p.len < Self::width(v4)).last() {
                Some(parent) if rng.percent(40) => {
                    let len = (parent.len + rng.u32(1..9)).min(Self::width(v4));
                    let host = (u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..))) & parent.host_mask();
                    Prefix::new(v4, parent.network | host, len)
                }
                _ if v4 => Prefix::new(true, 0x0b00_0000 | u128::from(rng.u32(..) & 0x00ff_ffff), rng.u32(8..29)),
                _ => Prefix::new(false, (0x2001_0db8u128 << 96) | (u128::from(rng.u64(..)) << 32), rng.u32(32..97)),
            };
            debug_assert!(!declared.iter().any(|d| d.v4 == candidate.v4 && d.contains(candidate.v4, candidate.network)));
            if !ranges.contains(&candidate) {
                ranges.push(candidate);
            }
        }
        ranges
    }

    fn contains(&self, v4: bool, addr: u128) -> bool {
        self.v4 == v4 && addr & !self.host_mask() == self.network
    }
}

fn to_ip(v4: bool, addr: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(addr as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", to_ip(self.v4, self.network), self.len)
    }
}

// ---------------------------------------------------------------------------------------------
// Flows

/// One flow: what the frame carries.
#[derive(Clone, Copy, Debug)]
struct Case {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    /// TCP/UDP/SCTP source port, or the ICMP echo identifier.
    src_port: u16,
    /// Destination port, or the ICMP type.
    dst_port: u16,
    /// Behind an 802.1Q tag.
    vlan: bool,
}

/// Protocols without ports that rules can only match with a rule without `ports`.
const OTHER_PROTOCOLS: [u8; 2] = [47, 50]; // GRE, ESP

impl Case {
    fn generate(rng: &mut Rng, scenario: &Scenario, src_port: u16, echo_id: u16) -> Case {
        let has = |v4: bool| scenario.prefixes.iter().any(|p| p.v4 == v4);
        let v4 = match (has(true), has(false)) {
            (true, true) => rng.percent(60),
            (true, false) => rng.percent(85),
            (false, true) => rng.percent(15),
            (false, false) => rng.percent(50),
        };
        let src = Self::address(rng, scenario, v4);
        let dst = Self::address(rng, scenario, v4);
        let (icmp, other_icmp, echo_request) =
            if v4 { (proto::ICMP, proto::ICMPV6, 8) } else { (proto::ICMPV6, proto::ICMP, 128) };
        let (protocol, src_port, dst_port) = match rng.usize(..100) {
            0..30 => (proto::TCP, src_port, Self::port(rng, scenario)),
            30..48 => (proto::UDP, src_port, Self::port(rng, scenario)),
            48..58 => (proto::SCTP, src_port, Self::port(rng, scenario)),
            58..73 => (icmp, echo_id, echo_request),
            73..88 => (icmp, echo_id, Self::icmp_type(rng, icmp)),
            // ICMP carried in the other family: policy goes by the protocol number alone.
            88..91 => (other_icmp, echo_id, Self::icmp_type(rng, other_icmp)),
            _ => (rng.pick(&OTHER_PROTOCOLS), 0, 0),
        };
        Case { src, dst, protocol, src_port, dst_port, vlan: rng.percent(10) }
    }

    /// An ICMP type for `protocol`, mostly from the usual ones.
    fn icmp_type(rng: &mut Rng, protocol: u8) -> u16 {
        let types = if protocol == proto::ICMP { &ICMP_TYPES } else { &ICMPV6_TYPES };
        loop {
            let icmp_type = if rng.percent(80) { rng.pick(types) } else { rng.u16(..256) };
            // ICMPv6 133-137 (neighbour discovery) passes as control plane before any policy,
            // whatever the family of the frame: the datapath tests cover it.
            if !(protocol == proto::ICMPV6 && (133..=137).contains(&icmp_type)) {
                return icmp_type;
            }
        }
    }

    /// A destination port below `PORT_LIMIT`: often at or next to a port the rules name.
    fn port(rng: &mut Rng, scenario: &Scenario) -> u16 {
        match rng.usize(..100) {
            0..45 => {
                let port = rng.pick(&scenario.ports);
                let port = match rng.usize(..3) {
                    0 => port.saturating_sub(1),
                    1 => port,
                    _ => port.saturating_add(1),
                };
                port.min(PORT_LIMIT - 1)
            }
            45..50 => 0,
            50..55 => PORT_LIMIT - 1,
            _ => rng.u16(..PORT_LIMIT),
        }
    }

    /// Inside a declared prefix (often at its edges), just outside one, or anywhere (world).
    fn address(rng: &mut Rng, scenario: &Scenario, v4: bool) -> IpAddr {
        let random = |rng: &mut Rng| {
            if v4 {
                u128::from(rng.u32(..))
            } else {
                u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..))
            }
        };
        let prefixes: Vec<Prefix> = scenario.prefixes.iter().copied().filter(|p| p.v4 == v4).collect();
        let width_mask = if v4 { u128::from(u32::MAX) } else { u128::MAX };
        let roll = rng.usize(..100);
        let addr = if roll < 65 && !prefixes.is_empty() {
            let prefix = rng.pick(&prefixes);
            match rng.usize(..10) {
                0 => prefix.network,
                1 => prefix.last(),
                _ => prefix.network | (random(rng) & prefix.host_mask()),
            }
        } else if roll < 80 && !prefixes.is_empty() {
            // Just below or just past a prefix: world, or a shorter enclosing prefix.
            let prefix = rng.pick(&prefixes);
            if rng.percent(50) {
                prefix.network.wrapping_sub(1) & width_mask
            } else {
                prefix.last().wrapping_add(1) & width_mask
            }
        } else if (80..83).contains(&roll) && !v4 {
            // An IPv4-mapped IPv6 address: the kernel keys IPv4 that way, so it takes the
            // identity of the IPv4 prefix that contains it, on both sides.
            let v4_prefixes: Vec<Prefix> = scenario.prefixes.iter().copied().filter(|p| p.v4).collect();
            let inner = if v4_prefixes.is_empty() {
                u128::from(rng.u32(..))
            } else {
                let prefix = rng.pick(&v4_prefixes);
                prefix.network | (u128::from(rng.u32(..)) & prefix.host_mask())
            };
            (0xffffu128 << 32) | inner
        } else if roll < 92 && scenario.world_ranges.iter().any(|p| p.v4 == v4) {
            // Inside a range a CIDR peer may name (none is inside a declared prefix).
            let ranges: Vec<Prefix> = scenario.world_ranges.iter().copied().filter(|p| p.v4 == v4).collect();
            let range = rng.pick(&ranges);
            match rng.usize(..10) {
                0 => range.network,
                1 => range.last(),
                _ => range.network | (random(rng) & range.host_mask()),
            }
        } else {
            // World: outside every declared prefix.
            loop {
                let addr = random(rng);
                if !scenario.prefixes.iter().any(|p| p.contains(v4, addr)) {
                    break addr;
                }
            }
        };
        to_ip(v4, addr)
    }

    /// The reply to this case's packet, for the flows whose replies conntrack admits.
    fn reply(&self) -> Option<Case> {
        let (src_port, dst_port) = match (self.protocol, self.dst_port) {
            (proto::ICMP, 8) => (self.src_port, 0),
            (proto::ICMPV6, 128) => (self.src_port, 129),
            (proto::TCP | proto::UDP | proto::SCTP, _) => (self.dst_port, self.src_port),
            _ => return None,
        };
        Some(Case { src: self.dst, dst: self.src, src_port, dst_port, ..*self })
    }

    fn flow(&self) -> Flow {
        Flow { src: self.src, dst: self.dst, protocol: self.protocol, dst_port: self.kernel_ports().1 }
    }

    /// Whether the kernel's conntrack key holds this case's own source port or echo identifier.
    fn has_unique_key(&self) -> bool {
        self.kernel_ports().0 != 0
    }

    fn is_icmp(&self) -> bool {
        matches!(self.protocol, proto::ICMP | proto::ICMPV6)
    }

    /// (src_port, dst_port) as the kernel parses them: ports for TCP/UDP/SCTP; the identifier of
    /// an echo request/reply and the type for ICMP; zero for other protocols.
    fn kernel_ports(&self) -> (u16, u16) {
        match self.protocol {
            proto::TCP | proto::UDP | proto::SCTP => (self.src_port, self.dst_port),
            proto::ICMP if matches!(self.dst_port, 0 | 8) => (self.src_port, self.dst_port),
            proto::ICMPV6 if matches!(self.dst_port, 128 | 129) => (self.src_port, self.dst_port),
            _ if self.is_icmp() => (0, self.dst_port),
            _ => (0, 0),
        }
    }

    fn frame(&self) -> Vec<u8> {
        let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => ethernet.ipv4(src.octets(), dst.octets(), 64),
            (IpAddr::V6(src), IpAddr::V6(dst)) => ethernet.ipv6(src.octets(), dst.octets(), 64),
            _ => unreachable!("both ends of a flow are of one family"),
        };
        let [id_hi, id_lo] = self.src_port.to_be_bytes();
        let (sport, dport) = (self.src_port.to_be_bytes(), self.dst_port.to_be_bytes());
        let mut frame = Vec::new();
        let native_icmp = match self.src {
            IpAddr::V4(_) => self.protocol == proto::ICMP,
            IpAddr::V6(_) => self.protocol == proto::ICMPV6,
        };
        match self.protocol {
            proto::TCP => ip.tcp(self.src_port, self.dst_port, 1, 1024).syn().write(&mut frame, &[]),
            proto::UDP => ip.udp(self.src_port, self.dst_port).write(&mut frame, &[0; 8]),
            proto::ICMP if native_icmp => {
                ip.icmpv4_raw(self.dst_port as u8, 0, [id_hi, id_lo, 0, 1]).write(&mut frame, &[0; 16])
            }
            proto::ICMPV6 if native_icmp => {
                ip.icmpv6_raw(self.dst_port as u8, 0, [id_hi, id_lo, 0, 1]).write(&mut frame, &[0; 16])
            }
            // SCTP's common header, ICMP of the other family, or 8 bytes of anything.
            proto::SCTP => {
                let header = [sport[0], sport[1], dport[0], dport[1], 0, 0, 0, 1, 0, 0, 0, 0];
                ip.write(&mut frame, IpNumber(self.protocol), &header)
            }
            _ if self.is_icmp() => {
                ip.write(&mut frame, IpNumber(self.protocol), &[self.dst_port as u8, 0, 0, 0, id_hi, id_lo, 0, 1])
            }
            _ => ip.write(&mut frame, IpNumber(self.protocol), &[0; 8]),
        }
        .expect("the frame serializes");
        if self.vlan {
            frame.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        }
        frame
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vlan = if self.vlan { " (VLAN-tagged)" } else { "" };
        match self.protocol {
            proto::TCP | proto::UDP | proto::SCTP => {
                let name = match self.protocol {
                    proto::TCP => "tcp",
                    proto::UDP => "udp",
                    _ => "sctp",
                };
                write!(f, "{name} {} port {} -> {} port {}{vlan}", self.src, self.src_port, self.dst, self.dst_port)
            }
            proto::ICMP | proto::ICMPV6 => {
                let name = if self.protocol == proto::ICMP { "icmp" } else { "icmpv6" };
                write!(f, "{name} type {} id {} {} -> {}{vlan}", self.dst_port, self.src_port, self.src, self.dst)
            }
            other => write!(f, "protocol {other} {} -> {}{vlan}", self.src, self.dst),
        }
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

// ---------------------------------------------------------------------------------------------

/// Draws for the generators, over a seeded `fastrand::Rng`: the whole run follows from the seed
/// (and the `fastrand` version Cargo.lock pins), so a failure replays exactly.
trait Draw {
    fn percent(&mut self, chance: usize) -> bool;
    fn pick<T: Copy>(&mut self, items: &[T]) -> T;
    fn pick_ref<'a, T>(&mut self, items: &'a [T]) -> &'a T;
}

impl Draw for Rng {
    fn percent(&mut self, chance: usize) -> bool {
        self.usize(..100) < chance
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *self.pick_ref(items)
    }

    fn pick_ref<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.usize(..items.len())]
    }
}
