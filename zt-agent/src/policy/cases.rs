//! `zt-agent policy test`: flows with the verdicts a policy set must give them, checked like a
//! test suite — offline with the reference evaluator, or through the loaded kernel datapath.
//!
//! ```yaml
//! cases:
//!   - name: web reaches api
//!     src: 10.20.1.2          # an address (IPv4/IPv6)
//!     dst: 10.20.2.2
//!     protocol: tcp           # tcp|udp|sctp|icmp|icmpv6
//!     port: 8080              # dst port, or `type:` for icmp
//!     expect: allow           # allow|deny|audit (passes, but a staged policy would deny)
//!     reason: policy-allow    # optional
//!     rule: api/ingress/0     # optional: the deciding rule, default-deny, or none
//! ```
//!
//! A case is judged as the first packet of a new flow. Ends are identified by address (`cidr`
//! selectors); cgroup, interface and certificate bindings are not part of a case.

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;
use zt_common::{event_flags, proto, Direction, Reason, Verdict, NO_RULE};

use super::{
    compile::{self, Compiled},
    describe_serde_error,
    eval::{Evaluator, Flow},
    locate::{Position, Positions, YamlPath},
    PolicyError, PolicyErrors, Protocol,
};
use crate::events::record::direction_name;

/// One flow and what the policy must say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    /// `file:line` of the case, for failures.
    pub location: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    /// The destination port; for ICMP and ICMPv6 the message type.
    pub port: u16,
    pub expect: Expect,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// `Allow` or `Deny`.
    pub verdict: Verdict,
    pub reason: Option<Reason>,
    /// `<policy>/<ingress|egress>/<index>`, `default-deny` or `none`.
    pub rule: Option<String>,
    /// Where `rule` is written, to report a rule the policy does not have.
    rule_at: Position,
}

impl Case {
    fn flow(&self) -> Flow {
        Flow { src: self.src, dst: self.dst, protocol: self.protocol.number(), dst_port: self.port }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with the list \"cases:\"")]
struct FileSpec {
    cases: Vec<CaseSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a case: a mapping with name, src, dst, protocol, port or type, and expect")]
struct CaseSpec {
    name: String,
    src: String,
    dst: String,
    protocol: Protocol,
    port: Option<i64>,
    #[serde(rename = "type")]
    icmp_type: Option<i64>,
    expect: ExpectSpec,
    reason: Option<String>,
    rule: Option<String>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExpectSpec {
    Allow,
    Deny,
    Audit,
}

/// The reasons a new flow's first packet can be given.
const CASE_REASONS: [Reason; 5] =
    [Reason::PolicyAllow, Reason::PolicyDeny, Reason::DefaultDeny, Reason::NotIsolated, Reason::ControlPlane];

/// Parses a cases file; `file` labels the errors, which are all reported, sorted by position.
pub fn parse_cases(text: &str, file: &str) -> Result<Vec<Case>, PolicyErrors> {
    let error =
        |at: Position, message: String| PolicyError { file: file.to_owned(), line: at.line, col: at.col, message };
    let spec: FileSpec = match serde_yaml::from_str(text) {
        Ok(spec) => spec,
        Err(err) => {
            let at = err.location().map_or(Position::START, |at| Position { line: at.line(), col: at.column() });
            return Err(PolicyErrors(vec![error(at, describe_serde_error(&err.to_string()))]));
        }
    };
    let positions = Positions::parse(text);
    if spec.cases.is_empty() {
        let at = positions.value(&YamlPath::default().key("cases"));
        return Err(PolicyErrors(vec![error(at, "there are no cases; list them under \"cases:\"".to_owned())]));
    }
    let mut errors = Vec::new();
    let mut cases = Vec::new();
    let mut names: BTreeMap<String, Position> = BTreeMap::new();
    for (index, spec) in spec.cases.into_iter().enumerate() {
        let path = YamlPath::default().key("cases").index(index);
        let at = |key: &'static str| positions.value(&path.key(key));
        let mut fail = |key: &'static str, message: String| errors.push(error(at(key), message));
        if spec.name.trim().is_empty() {
            fail("name", "the case name is empty; say what the case checks".to_owned());
        } else if let Some(first) = names.get(&spec.name) {
            fail(
                "name",
                format!(
                    "duplicate case name \"{}\" (first at {file}:{}); give each case its own name",
                    spec.name, first.line
                ),
            );
        } else {
            names.insert(spec.name.clone(), at("name"));
        }
        let address = |text: &str| {
            text.trim().parse::<IpAddr>().map_err(|_| {
                format!("invalid address \"{text}\"; write one IPv4 or IPv6 address, e.g. 10.20.1.2 or fd00:20:1::2")
            })
        };
        let src = address(&spec.src).map_err(|message| fail("src", message)).ok();
        let dst = address(&spec.dst).map_err(|message| fail("dst", message)).ok();
        if let (Some(src), Some(dst)) = (src, dst) {
            if src.is_ipv4() != dst.is_ipv4() {
                fail("dst", format!("{dst} and the source {src} are of different address families; a flow has one"));
            }
        }
        let protocol = spec.protocol;
        let name = protocol.name();
        let port = match (protocol.has_ports(), spec.port, spec.icmp_type) {
            (true, Some(port), None) => {
                u16::try_from(port).map_err(|_| fail("port", format!("port {port} is out of range; use 0-65535"))).ok()
            }
            (true, None, None) => {
                fail("protocol", format!("a {name} case needs the destination port; add \"port:\""));
                None
            }
            (true, _, Some(_)) => {
                fail(
                    "type",
                    format!("type is only valid for icmp and icmpv6; use \"port:\" for the {name} destination port"),
                );
                None
            }
            (false, None, Some(icmp_type)) => u8::try_from(icmp_type)
                .map(u16::from)
                .map_err(|_| fail("type", format!("ICMP type {icmp_type} is out of range; use 0-255")))
                .ok(),
            (false, None, None) => {
                fail(
                    "protocol",
                    format!("an {name} case needs the message type; add \"type:\" (8 is an echo request)"),
                );
                None
            }
            (false, Some(_), _) => {
                fail("port", format!("port is not valid for {name}; use \"type:\" for the ICMP message type"));
                None
            }
        };
        let reason = spec.reason.as_deref().and_then(|text| {
            let found = CASE_REASONS.into_iter().find(|reason| reason.name() == text);
            if found.is_none() {
                let names: Vec<&str> = CASE_REASONS.iter().map(|reason| reason.name()).collect();
                fail("reason", format!("unknown reason \"{text}\"; expected one of {}", names.join(", ")));
            }
            found
        });
        let rule = spec.rule.as_deref().and_then(|text| match rule_syntax_problem(text) {
            None => Some(text.to_owned()),
            Some(problem) => {
                fail("rule", problem);
                None
            }
        });
        let verdict = match spec.expect {
            ExpectSpec::Allow => Verdict::Allow,
            ExpectSpec::Deny => Verdict::Deny,
            ExpectSpec::Audit => Verdict::Audit,
        };
        if let (Some(src), Some(dst), Some(port)) = (src, dst, port) {
            let location = format!("{file}:{}", positions.value(&path).line);
            let expect = Expect { verdict, reason, rule, rule_at: at("rule") };
            cases.push(Case { name: spec.name, location, src, dst, protocol, port, expect });
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.line, e.col));
        return Err(PolicyErrors(errors));
    }
    Ok(cases)
}

fn rule_syntax_problem(text: &str) -> Option<String> {
    if matches!(text, "default-deny" | "none") {
        return None;
    }
    let mut parts = text.rsplitn(3, '/');
    let (index, direction, policy) = (parts.next(), parts.next(), parts.next());
    let well_formed = matches!(direction, Some("ingress" | "egress"))
        && index.is_some_and(|index| index.parse::<usize>().is_ok())
        && policy.is_some_and(|policy| !policy.is_empty());
    (!well_formed).then(|| {
        format!(
            "invalid rule \"{text}\"; write POLICY/ingress/INDEX or POLICY/egress/INDEX as events name rules \
             (e.g. api/ingress/0), default-deny, or none"
        )
    })
}

/// Every `rule:` a case expects that the compiled set does not have, as errors.
fn check_rules(cases: &[Case], compiled: &Compiled, file: &str) -> Result<(), PolicyErrors> {
    let known: HashSet<String> = (1..=compiled.rules.len() as u32).filter_map(|id| rule_name(compiled, id)).collect();
    let errors: Vec<PolicyError> = cases
        .iter()
        .filter_map(|case| {
            let rule = case.expect.rule.as_deref()?;
            if matches!(rule, "default-deny" | "none") || known.contains(rule) {
                return None;
            }
            let at = case.expect.rule_at;
            let message =
                format!("the policy has no rule \"{rule}\"; rules are named POLICY/DIRECTION/INDEX, counting from 0");
            Some(PolicyError { file: file.to_owned(), line: at.line, col: at.col, message })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(errors))
    }
}

/// `<policy>/<direction>/<index>`, as events name a rule.
fn rule_name(compiled: &Compiled, rule_id: u32) -> Option<String> {
    let rule = compiled.rule(rule_id)?;
    Some(format!("{}/{}/{}", rule.policy, direction_name(rule.direction as u8), rule.index))
}

/// What a policy set, or the kernel, says about a case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `Allow` or `Deny`.
    pub verdict: Verdict,
    pub reason: Reason,
    /// Whose rules decided; `None` when no rule did.
    pub direction: Direction,
    /// The deciding rule, `default-deny`, or `none`.
    pub rule: String,
}

impl Outcome {
    fn new(compiled: &Compiled, verdict: Verdict, reason: Reason, direction: Direction, rule_id: u32) -> Self {
        let rule = match reason {
            Reason::DefaultDeny => "default-deny".to_owned(),
            _ if rule_id == NO_RULE => "none".to_owned(),
            _ => rule_name(compiled, rule_id).unwrap_or_else(|| format!("#{rule_id}")),
        };
        Outcome { verdict, reason, direction, rule }
    }

    fn passes(&self, expect: &Expect) -> bool {
        self.verdict == expect.verdict
            && expect.reason.is_none_or(|reason| reason == self.reason)
            && expect.rule.as_ref().is_none_or(|rule| *rule == self.rule)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {}", verdict_name(self.verdict), self.reason.name())?;
        if self.direction != Direction::None {
            write!(f, " ({})", direction_name(self.direction as u8))?;
        }
        write!(f, ", rule {}", self.rule)
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Audit => "audit",
    }
}

fn describe_expectation(expect: &Expect) -> String {
    let mut text = verdict_name(expect.verdict).to_owned();
    if let Some(reason) = expect.reason {
        text.push_str(&format!(", {}", reason.name()));
    }
    if let Some(rule) = &expect.rule {
        text.push_str(&format!(", rule {rule}"));
    }
    text
}

/// Decides cases: the reference evaluator, or the kernel.
pub trait Judge {
    fn judge(&mut self, case: &Case) -> Result<Outcome>;
}

/// The reference evaluator, plus what the kernel decides before policy: IPv6 neighbour
/// discovery always passes.
pub struct Offline<'a> {
    compiled: &'a Compiled,
    evaluator: Evaluator,
}

impl<'a> Offline<'a> {
    pub fn new(compiled: &'a Compiled) -> Self {
        Self { compiled, evaluator: Evaluator::new(compiled) }
    }
}

impl Judge for Offline<'_> {
    fn judge(&mut self, case: &Case) -> Result<Outcome> {
        if is_neighbour_discovery(case) {
            return Ok(Outcome::new(self.compiled, Verdict::Allow, Reason::ControlPlane, Direction::None, NO_RULE));
        }
        let decision = self.evaluator.evaluate(&case.flow());
        Ok(Outcome::new(self.compiled, decision.verdict, decision.reason, decision.direction, decision.rule_id))
    }
}

/// ICMPv6 types 133–137 over IPv6: neighbour discovery, which the kernel passes before policy
/// when it can be genuine (hop limit 255, as `frame` sends it). Over IPv4 they are just numbers.
fn is_neighbour_discovery(case: &Case) -> bool {
    case.protocol == Protocol::Icmpv6 && (133..=137).contains(&case.port) && case.src.is_ipv6()
}

/// Passed and failed cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

/// Judges every case, writing one line each (`ok` or `FAILED`, with the expectation and the
/// outcome) and the summary.
pub fn run_cases(cases: &[Case], judge: &mut dyn Judge, out: &mut dyn Write) -> Result<Summary> {
    let mut summary = Summary::default();
    for case in cases {
        let outcome =
            judge.judge(case).with_context(|| format!("judging case \"{}\" ({})", case.name, case.location))?;
        if outcome.passes(&case.expect) {
            summary.passed += 1;
            writeln!(out, "ok      {}: {outcome}", case.name)?;
        } else {
            summary.failed += 1;
            writeln!(
                out,
                "FAILED  {} ({}): expected {}; got {outcome}",
                case.name,
                case.location,
                describe_expectation(&case.expect)
            )?;
        }
    }
    writeln!(out, "{} passed, {} failed", summary.passed, summary.failed)?;
    Ok(summary)
}

/// `zt-agent policy test <cases> --policy <paths>... [--offline]`: an error unless every case
/// passes.
pub fn run(cases_file: &Path, policy: &[PathBuf], offline: bool, out: &mut dyn Write) -> Result<()> {
    let label = cases_file.display().to_string();
    let text = crate::bounded::read_text(cases_file, crate::bounded::CASES_FILE_LIMIT)
        .with_context(|| format!("cannot read the cases file {label}"))?;
    let cases = parse_cases(&text, &label)?;
    let set = super::load_paths(policy)?;
    let compiled = compile::compile(&set)?;
    check_rules(&cases, &compiled, &label)?;
    let policies = policy.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(", ");
    let count = match cases.len() {
        1 => "1 case".to_owned(),
        n => format!("{n} cases"),
    };
    let summary = if offline {
        writeln!(out, "running {count} from {label} against {policies} with the reference evaluator")?;
        run_cases(&cases, &mut Offline::new(&compiled), out)?
    } else {
        let mut kernel = kernel::Kernel::new(&compiled, &cases).context(
            "loading the kernel datapath (this needs root and a zt-agent built with its eBPF object; \
             --offline uses the reference evaluator instead)",
        )?;
        writeln!(
            out,
            "running {count} from {label} against {policies} in the kernel datapath (XDP, BPF_PROG_TEST_RUN)"
        )?;
        run_cases(&cases, &mut kernel, out)?
    };
    out.flush()?;
    if summary.failed > 0 {
        bail!("{} of {count} failed", summary.failed);
    }
    Ok(())
}

/// Cases run through the loaded XDP program with BPF_PROG_TEST_RUN, in enforce mode: the verdict
/// from the return code, the reason and rule from the flow event (or, for packets that pass
/// without one, from the verdict counters).
pub mod kernel {
    use aya::{
        maps::{MapData, RingBuf},
        programs::{TestRun as _, TestRunOptions, Xdp},
    };
    use etherparse::{IpNumber, PacketBuilder};
    use zt_common::{programs, IpKey};

    use super::*;
    use crate::{
        datapath::{counters::Counters, Datapath, Mode},
        events,
        policy::compile::ip_key,
    };

    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;

    pub struct Kernel<'a> {
        compiled: &'a Compiled,
        dp: Datapath,
        ring: RingBuf<MapData>,
        /// Per case (in order), the TCP/UDP/SCTP source port, or the ICMP echo identifier.
        unique: Vec<u16>,
        next: usize,
        /// Conntrack keys of admitted ICMP messages other than echo, which carry nothing per case:
        /// (src, dst, protocol, type).
        held: HashSet<(IpKey, IpKey, u8, u16)>,
    }

    impl<'a> Kernel<'a> {
        /// Loads a datapath with `compiled` in force, in enforce mode, for `cases`.
        pub fn new(compiled: &'a Compiled, cases: &[Case]) -> Result<Self> {
            // Conntrack admits each allowed flow both ways and passes a later packet matching
            // either entry as established, without a policy lookup. Each case gets a source
            // port that no case uses as a destination port, so neither its forward key nor an
            // earlier case's reverse key can match; an echo gets its own identifier.
            let used: HashSet<u16> =
                cases.iter().filter(|case| case.protocol.has_ports()).map(|case| case.port).collect();
            let mut free = (1..=u16::MAX).rev().filter(|port| !used.contains(port));
            let unique = (0..cases.len())
                .map(|_| free.next())
                .collect::<Option<Vec<u16>>>()
                .ok_or_else(|| anyhow!("too many cases for one datapath: each needs its own source port"))?;
            let (dp, ring) = fresh(compiled)?;
            Ok(Self { compiled, dp, ring, unique, next: 0, held: HashSet::new() })
        }

        fn counters(&self) -> Result<Counters> {
            self.dp.counters()
        }
    }

    fn fresh(compiled: &Compiled) -> Result<(Datapath, RingBuf<MapData>)> {
        let mut dp = Datapath::load()?;
        dp.set_mode(Mode::Enforce)?;
        dp.install(compiled)?;
        let ring = dp.take_events()?;
        Ok((dp, ring))
    }

    /// ICMP messages whose conntrack key is the same for every case of a (src, dst, type).
    fn shared_key(case: &Case) -> Option<(IpKey, IpKey, u8, u16)> {
        let echo = match case.protocol {
            Protocol::Icmp => matches!(case.port, 0 | 8),
            Protocol::Icmpv6 => matches!(case.port, 128 | 129),
            _ => return None,
        };
        (!echo).then(|| (ip_key(case.src), ip_key(case.dst), case.protocol.number(), case.port))
    }

    impl Judge for Kernel<'_> {
        fn judge(&mut self, case: &Case) -> Result<Outcome> {
            let unique = *self.unique.get(self.next).context("more cases than the datapath was prepared for")?;
            self.next += 1;
            let shared = shared_key(case);
            if shared.is_some_and(|key| self.held.contains(&key)) {
                // An earlier case of the same message was admitted: this one would pass as
                // established. Start over with a fresh datapath.
                tracing::debug!(case = %case.name, "reloading the datapath: an earlier case admitted the same ICMP message");
                (self.dp, self.ring) = fresh(self.compiled)?;
                self.held.clear();
            }
            let frame = frame(case, unique);
            let before = self.counters()?;
            let xdp: &mut Xdp = self.dp.program(programs::XDP)?;
            let ret = xdp.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() })?;
            let after = self.counters()?;
            let mut flow_events = Vec::new();
            while let Some(record) = self.ring.next() {
                flow_events.push(events::decode(&record).context("a ring-buffer record too short for a flow event")?);
            }
            let verdict = match ret.return_value {
                XDP_PASS => Verdict::Allow,
                XDP_DROP => Verdict::Deny,
                other => bail!("the XDP program returned {other}, neither XDP_PASS nor XDP_DROP"),
            };
            if verdict == Verdict::Allow {
                if let Some(key) = shared {
                    self.held.insert(key);
                }
            }
            match flow_events.as_slice() {
                [event] => {
                    let reported = Verdict::from_u8(event.verdict);
                    // In enforce mode an audit is a staged policy's: the packet passed.
                    let staged = event.flags & event_flags::STAGED != 0;
                    let verdict = if verdict == Verdict::Allow && staged { Verdict::Audit } else { verdict };
                    if reported != Some(verdict) {
                        bail!("the XDP program returned {verdict:?} but its event says {reported:?}");
                    }
                    let reason = Reason::from_u8(event.reason)
                        .ok_or_else(|| anyhow!("the event has an unknown reason {}", event.reason))?;
                    let direction = match event.direction {
                        d if d == Direction::Ingress as u8 => Direction::Ingress,
                        d if d == Direction::Egress as u8 => Direction::Egress,
                        _ => Direction::None,
                    };
                    Ok(Outcome::new(self.compiled, verdict, reason, direction, event.rule_id))
                }
                // Passed without an event (no policy concerned it): the counters say why.
                [] => {
                    let counted = counted(&before, &after)?;
                    if counted.0 != verdict {
                        bail!("the XDP program returned {verdict:?} but counted {counted:?}");
                    }
                    Ok(Outcome::new(self.compiled, verdict, counted.1, Direction::None, NO_RULE))
                }
                many => bail!("one frame produced {} flow events", many.len()),
            }
        }
    }

    /// The one (verdict, reason) counter that went up by one.
    fn counted(before: &Counters, after: &Counters) -> Result<(Verdict, Reason)> {
        let delta = after.since(before);
        let found: Vec<_> = delta.nonzero().map(|c| (c.verdict, c.reason, c.packets)).collect();
        match found.as_slice() {
            [(verdict, reason, 1)] => Ok((*verdict, *reason)),
            other => bail!("expected one verdict counter to count the frame, got {other:?}"),
        }
    }

    /// An Ethernet frame carrying the first packet of the case's flow: a TCP SYN, a UDP
    /// datagram, an SCTP common header, or an ICMP message (an echo with `unique` as its
    /// identifier).
    fn frame(case: &Case, unique: u16) -> Vec<u8> {
        let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (case.src, case.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => ethernet.ipv4(src.octets(), dst.octets(), 64),
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let hop_limit = if is_neighbour_discovery(case) { 255 } else { 64 };
                ethernet.ipv6(src.octets(), dst.octets(), hop_limit)
            }
            _ => unreachable!("the parser accepts one address family per case"),
        };
        let [id_hi, id_lo] = unique.to_be_bytes();
        let icmp_type = case.port as u8;
        let native_icmp = match case.src {
            IpAddr::V4(_) => case.protocol == Protocol::Icmp,
            IpAddr::V6(_) => case.protocol == Protocol::Icmpv6,
        };
        let mut frame = Vec::new();
        match case.protocol {
            Protocol::Tcp => ip.tcp(unique, case.port, 1, 1024).syn().write(&mut frame, &[]),
            Protocol::Udp => ip.udp(unique, case.port).write(&mut frame, &[0; 8]),
            Protocol::Sctp => {
                let (sport, dport) = (unique.to_be_bytes(), case.port.to_be_bytes());
                let header = [sport[0], sport[1], dport[0], dport[1], 0, 0, 0, 1, 0, 0, 0, 0];
                ip.write(&mut frame, IpNumber(proto::SCTP), &header)
            }
            Protocol::Icmp if native_icmp => {
                ip.icmpv4_raw(icmp_type, 0, [id_hi, id_lo, 0, 1]).write(&mut frame, &[0; 16])
            }
            Protocol::Icmpv6 if native_icmp => {
                ip.icmpv6_raw(icmp_type, 0, [id_hi, id_lo, 0, 1]).write(&mut frame, &[0; 16])
            }
            // ICMP carried in the other family: policy goes by the protocol number alone.
            Protocol::Icmp | Protocol::Icmpv6 => {
                ip.write(&mut frame, IpNumber(case.protocol.number()), &[icmp_type, 0, 0, 0, id_hi, id_lo, 0, 1])
            }
        }
        .expect("the frame serializes");
        frame
    }
}

#[cfg(test)]
mod tests;
