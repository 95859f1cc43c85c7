//! The kernel's policy decision, computed in userspace over the compiled map entries: the same
//! lookups in the same order, so it predicts what the datapath does with a flow.

use std::{collections::HashMap, net::IpAddr};

use zt_common::{
    action,
    identity::{self, ANY, UNKNOWN},
    isolation, policy_point, policy_tree, Direction, PolicyKey, PolicyValue, PortRun, Reason, Verdict, NO_RULE,
};

use super::compile::{ip_key, ipcache_prefix, Compiled};

/// What the kernel knows of a packet when it consults policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Destination port; for ICMP and ICMPv6 the message type.
    pub dst_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `Allow` or `Deny` as the policies in force decide; `Audit` when they allow but a staged
    /// (`mode: monitor`) policy would deny — the flow passes, and reason, direction and rule
    /// are the staged view's.
    pub verdict: Verdict,
    pub reason: Reason,
    /// Whose rules decided; `None` when neither end is isolated.
    pub direction: Direction,
    /// The deciding rule, or `zt_common::NO_RULE`.
    pub rule_id: u32,
}

/// One-off evaluation; build an [`Evaluator`] to evaluate many flows.
pub fn evaluate(compiled: &Compiled, flow: &Flow) -> Decision {
    Evaluator::new(compiled).evaluate(flow)
}

/// The compiled maps, indexed for lookups.
pub struct Evaluator {
    ipcache: Lpm<u32>,
    isolation: HashMap<u32, u32>,
    policy: HashMap<PolicyKey, PolicyValue>,
}

/// The outcome of one end's rules.
#[derive(Clone, Copy)]
enum Check {
    Allow(u32),
    Deny(u32),
    DefaultDeny,
}

impl Evaluator {
    pub fn new(compiled: &Compiled) -> Self {
        let ipcache = compiled.ipcache.iter().map(|(net, id)| {
            let (bits, key) = ipcache_prefix(net);
            (bits, u128::from_be_bytes(key), *id)
        });
        Self {
            ipcache: Lpm::new(ipcache),
            isolation: compiled.isolation.iter().copied().collect(),
            policy: compiled.policy.iter().map(|block| (block.key, block.value())).collect(),
        }
    }

    /// The identity the ipcache gives an address (the kernel looks for the address itself in a
    /// hash first: the same longest match).
    pub fn identity(&self, addr: IpAddr) -> u32 {
        self.ipcache.lookup(u128::from_be_bytes(ip_key(addr))).copied().unwrap_or(UNKNOWN)
    }

    pub fn evaluate(&self, flow: &Flow) -> Decision {
        let (src, dst) = (self.identity(flow.src), self.identity(flow.dst));
        let (src_flags, dst_flags) = (self.isolation(src), self.isolation(dst));
        let egress = self.check((src, src_flags), (dst, dst_flags), Direction::Egress, flow);
        let ingress = self.check((dst, dst_flags), (src, src_flags), Direction::Ingress, flow);
        let view = |shift: u32, pick: fn((Check, Check)) -> Check| {
            let egress = (src_flags & isolation::EGRESS << shift != 0).then(|| pick(egress));
            let ingress = (dst_flags & isolation::INGRESS << shift != 0).then(|| pick(ingress));
            verdict(egress, ingress)
        };
        let enforced = view(0, |(enforced, _)| enforced);
        let staged = view(isolation::STAGED_SHIFT, |(_, staged)| staged);
        match (enforced.verdict, staged.verdict) {
            (Verdict::Allow, Verdict::Deny) => Decision { verdict: Verdict::Audit, ..staged },
            _ => enforced,
        }
    }

    /// An identity's own flags, plus the ANY flags, which apply to declared identities only.
    fn isolation(&self, id: u32) -> u32 {
        let flags = |id| self.isolation.get(&id).copied().unwrap_or(0);
        flags(id) | if identity::is_declared(id) { flags(ANY) } else { 0 }
    }

    /// In each view, the first deny, else the first allow, of the four groups in order of
    /// specificity — of those the ends' wildcard flags say exist.
    fn check(&self, (subject, subject_flags): (u32, u32), (peer, peer_flags): (u32, u32), direction: Direction, flow: &Flow) -> (Check, Check) {
        let has = |flags: u32, flag| flags & isolation::of(flag, direction) != 0;
        let groups = [
            (subject, peer, true),
            (subject, ANY, has(subject_flags, isolation::ANY_PEER)),
            (ANY, peer, has(peer_flags, isolation::PEER_OF_ANY)),
            (ANY, ANY, has(subject_flags, isolation::ANY_ANY)),
        ];
        let point = policy_point(flow.protocol, flow.dst_port);
        let found: Vec<&PortRun> = groups
            .iter()
            .filter(|(_, _, exists)| *exists)
            .filter_map(|&(subject, peer, _)| self.run_of(subject, peer, direction, point))
            .collect();
        let enforced = found.iter().map(|run| (run.action, run.rule_id));
        let staged = found.iter().map(|run| (run.staged_action, run.staged_rule_id));
        (first_deny_else_allow(enforced), first_deny_else_allow(staged))
    }

    /// The group's blocks from the whole space down, until one that is not split.
    fn run_of(&self, subject: u32, peer: u32, direction: Direction, point: u32) -> Option<&PortRun> {
        for level in 0..policy_tree::LEVELS {
            let value = self.policy.get(&PolicyKey::new(0, subject, peer, direction, level, point))?;
            if value.split == 0 {
                return value.run_at(point);
            }
        }
        None
    }
}

fn first_deny_else_allow(found: impl Iterator<Item = (u8, u32)> + Clone) -> Check {
    let first = |wanted| found.clone().find(|(action, _)| *action == wanted).map(|(_, rule)| rule);
    match (first(action::DENY), first(action::ALLOW)) {
        (Some(rule), _) => Check::Deny(rule),
        (None, Some(rule)) => Check::Allow(rule),
        (None, None) => Check::DefaultDeny,
    }
}

/// Both ends must consent (`None`: the end is not isolated in that direction).
fn verdict(egress: Option<Check>, ingress: Option<Check>) -> Decision {
    let (verdict, reason, direction, rule_id) = match (egress, ingress) {
        (Some(Check::Deny(rule)), _) => (Verdict::Deny, Reason::PolicyDeny, Direction::Egress, rule),
        (_, Some(Check::Deny(rule))) => (Verdict::Deny, Reason::PolicyDeny, Direction::Ingress, rule),
        (Some(Check::DefaultDeny), _) => (Verdict::Deny, Reason::DefaultDeny, Direction::Egress, NO_RULE),
        (_, Some(Check::DefaultDeny)) => (Verdict::Deny, Reason::DefaultDeny, Direction::Ingress, NO_RULE),
        (_, Some(Check::Allow(rule))) => (Verdict::Allow, Reason::PolicyAllow, Direction::Ingress, rule),
        (Some(Check::Allow(rule)), _) => (Verdict::Allow, Reason::PolicyAllow, Direction::Egress, rule),
        (None, None) => (Verdict::Allow, Reason::NotIsolated, Direction::None, NO_RULE),
    };
    Decision { verdict, reason, direction, rule_id }
}

/// Longest-prefix match over left-aligned keys of up to 128 bits, as a BPF LPM trie does it.
struct Lpm<V> {
    /// The prefix lengths present, longest first.
    lengths: Vec<u32>,
    entries: HashMap<(u32, u128), V>,
}

impl<V> Lpm<V> {
    /// A later entry with the same prefix replaces an earlier one, like a map update.
    fn new(entries: impl IntoIterator<Item = (u32, u128, V)>) -> Self {
        let entries: HashMap<_, _> =
            entries.into_iter().map(|(bits, key, value)| ((bits, mask(key, bits)), value)).collect();
        let mut lengths: Vec<u32> = entries.keys().map(|(bits, _)| *bits).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        Self { lengths, entries }
    }

    fn lookup(&self, key: u128) -> Option<&V> {
        self.lengths.iter().find_map(|&bits| self.entries.get(&(bits, mask(key, bits))))
    }
}

fn mask(key: u128, bits: u32) -> u128 {
    match bits {
        0 => 0,
        _ => key & (u128::MAX << (128 - bits)),
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write, net::IpAddr};

    use fastrand::Rng;
    use zt_common::{identity::WORLD, proto};

    use super::*;
    use ipnet::IpNet;

    use crate::policy::{compile::compile, parse_str, Action, Peer, Policy, PolicyMode, PolicySet, Subject};

    fn flow(src: &str, dst: &str, protocol: u8, dst_port: u16) -> Flow {
        Flow { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol, dst_port }
    }

    fn decision(verdict: Verdict, reason: Reason, direction: Direction, rule_id: u32) -> Decision {
        Decision { verdict, reason, direction, rule_id }
    }

    #[test]
    fn demo_policy_admits_only_consented_flows() {
        let set = parse_str(include_str!("../../../policies/demo.yaml"), "policies/demo.yaml").unwrap();
        let compiled = compile(&set).unwrap();
        let evaluator = Evaluator::new(&compiled);
        let rule = |policy: &str, direction| {
            let found = compiled.rules.iter().position(|rule| &*rule.policy == policy && rule.direction == direction);
            found.unwrap() as u32 + 1
        };
        let allowed_by = |policy| {
            decision(Verdict::Allow, Reason::PolicyAllow, Direction::Ingress, rule(policy, Direction::Ingress))
        };
        let default_deny = |direction| decision(Verdict::Deny, Reason::DefaultDeny, direction, 0);
        let cases = [
            (flow("10.20.1.5", "10.20.2.5", proto::TCP, 8080), allowed_by("api")),
            (flow("fd00:20:1::5", "fd00:20:2::5", proto::TCP, 8080), allowed_by("api")),
            (flow("10.30.1.5", "10.20.2.5", proto::TCP, 8080), allowed_by("api")),
            (flow("fd00:30:1::5", "fd00:20:2::5", proto::TCP, 8080), allowed_by("api")),
            (flow("10.20.2.5", "10.20.3.5", proto::TCP, 5432), allowed_by("db")),
            (flow("10.20.1.5", "10.20.2.5", proto::TCP, 8081), default_deny(Direction::Egress)),
            (flow("10.20.1.5", "10.20.2.5", proto::UDP, 8080), default_deny(Direction::Egress)),
            (flow("10.20.1.5", "10.20.2.5", proto::ICMP, 8), default_deny(Direction::Egress)),
            (flow("10.20.1.5", "10.20.3.5", proto::TCP, 5432), default_deny(Direction::Egress)),
            (flow("10.20.9.5", "10.20.2.5", proto::TCP, 8080), default_deny(Direction::Egress)),
            (flow("10.20.3.5", "10.20.2.5", proto::TCP, 8080), default_deny(Direction::Egress)),
            (flow("10.20.1.5", "1.1.1.1", proto::TCP, 443), default_deny(Direction::Egress)),
            (flow("8.8.8.8", "10.20.1.5", proto::TCP, 80), default_deny(Direction::Ingress)),
            (flow("2001:db8::1", "fd00:20:3::5", proto::TCP, 5432), default_deny(Direction::Ingress)),
        ];
        for (flow, expected) in cases {
            assert_eq!(evaluator.evaluate(&flow), expected, "{flow:?}");
        }
        // Addresses outside every identity are world, and world is never isolated.
        assert_eq!(evaluator.identity("8.8.8.8".parse().unwrap()), WORLD);
        let outside = flow("8.8.8.8", "9.9.9.9", proto::TCP, 80);
        assert_eq!(evaluate(&compiled, &outside), decision(Verdict::Allow, Reason::NotIsolated, Direction::None, 0));
    }

    #[test]
    fn an_empty_ipcache_classifies_as_unknown() {
        let compiled = compile(&parse_str("", "empty.yaml").unwrap()).unwrap();
        let compiled = Compiled { ipcache: Vec::new(), ..compiled };
        let evaluator = Evaluator::new(&compiled);
        assert_eq!(evaluator.identity("10.0.0.1".parse().unwrap()), UNKNOWN);
        let flow = flow("10.0.0.1", "10.0.0.2", proto::TCP, 80);
        assert_eq!(evaluator.evaluate(&flow), decision(Verdict::Allow, Reason::NotIsolated, Direction::None, 0));
    }

    /// The meaning of a policy set, straight from its rules: no identity numbers, no prefixes,
    /// no precedence folded into entries.
    ///
    /// An address belongs to the identity with its longest containing `cidr` selector, else to
    /// world.
    /// An identity is isolated in a direction if a policy whose subjects include it (or `any`)
    /// lists that direction. The rules that match a flow for an isolated end are those of such
    /// policies, in that direction, whose peers include the other end (by name, `world` for
    /// world, or `any`) and whose ports include the flow's protocol and port. Among them a deny
    /// beats an allow; among rules of one action the most specific wins — subject named before
    /// `any`, then peer named before `any` — then the lowest rule id.
    struct Naive<'a> {
        set: &'a PolicySet,
        /// Judge `mode: monitor` policies too (the staged view), else only those in force.
        staged: bool,
    }

    enum NaiveCheck {
        Allow(u32),
        Deny(u32),
        DefaultDeny,
    }

    impl<'a> Naive<'a> {
        fn identity(&self, addr: IpAddr) -> Option<&'a str> {
            let selectors = self
                .set
                .identities()
                .iter()
                .flat_map(|identity| identity.cidrs.iter().map(move |net| (net, &identity.name)));
            let containing = selectors.filter(|(net, _)| net.contains(&addr));
            containing.max_by_key(|(net, _)| net.prefix_len()).map(|(_, name)| name.as_str())
        }

        fn subject_is_any(subject: &Subject, name: &str) -> Option<bool> {
            match subject {
                Subject::Any => Some(true),
                Subject::Identity(subject) if subject == name => Some(false),
                // The generated sets this oracle judges have no pods (their meaning is tested
                // through the compile, in `compile` and `import_k8s`).
                Subject::Identity(_) | Subject::Pods(_) => None,
            }
        }

        fn judged(&self, policy: &Policy) -> bool {
            self.staged || policy.mode == PolicyMode::Enforce
        }

        fn isolated(&self, name: Option<&str>, direction: Direction) -> bool {
            let Some(name) = name else { return false };
            self.set.policies().iter().any(|policy| {
                self.judged(policy)
                    && policy.rules(direction).is_some()
                    && policy.subjects.iter().any(|s| Self::subject_is_any(s, name).is_some())
            })
        }

        /// `peer` is the other end's identity (None: world) and `peer_addr` its address.
        fn check(
            &self,
            subject: &str,
            (peer, peer_addr): (Option<&str>, IpAddr),
            direction: Direction,
            flow: &Flow,
        ) -> NaiveCheck {
            let mut rule_id = 0;
            // (subject is `any`, peer is `any`, rule id): smallest is best.
            type Candidate = (bool, bool, u32);
            let (mut deny, mut allow): (Option<Candidate>, Option<Candidate>) = (None, None);
            for policy in self.set.policies() {
                for rules_direction in [Direction::Ingress, Direction::Egress] {
                    for rule in policy.rules(rules_direction).unwrap_or_default() {
                        rule_id += 1;
                        let ports_match = rule.ports.as_ref().is_none_or(|ports| {
                            ports.iter().any(|port| {
                                port.protocol.number() == flow.protocol
                                    && (port.range.first..=port.range.last).contains(&flow.dst_port)
                            })
                        });
                        if rules_direction != direction || !ports_match || !self.judged(policy) {
                            continue;
                        }
                        for subject_ref in &policy.subjects {
                            let Some(subject_any) = Self::subject_is_any(subject_ref, subject) else { continue };
                            for peer_ref in &rule.peers {
                                let peer_any = match (peer_ref, peer) {
                                    (Peer::Any, _) => true,
                                    (Peer::Identity(name), Some(peer)) if name == peer => false,
                                    (Peer::Host, Some("host")) => false,
                                    (_, None) if peer_ref.matches_world_address(peer_addr) => false,
                                    _ => continue,
                                };
                                let candidate = Some((subject_any, peer_any, rule_id));
                                let best = if rule.action == Action::Deny { &mut deny } else { &mut allow };
                                if best.is_none() || candidate < *best {
                                    *best = candidate;
                                }
                            }
                        }
                    }
                }
            }
            match (deny, allow) {
                (Some((_, _, rule)), _) => NaiveCheck::Deny(rule),
                (None, Some((_, _, rule))) => NaiveCheck::Allow(rule),
                (None, None) => NaiveCheck::DefaultDeny,
            }
        }

        /// Both ends must consent: any explicit deny first (the sender's before the
        /// receiver's), then a missing allow on an isolated end (sender first), and an allow is
        /// credited to the receiver when both allow.
        fn evaluate_view(&self, flow: &Flow) -> Decision {
            let (src, dst) = (self.identity(flow.src), self.identity(flow.dst));
            let mut sides = Vec::new();
            if self.isolated(src, Direction::Egress) {
                sides.push((Direction::Egress, self.check(src.unwrap(), (dst, flow.dst), Direction::Egress, flow)));
            }
            if self.isolated(dst, Direction::Ingress) {
                sides.push((Direction::Ingress, self.check(dst.unwrap(), (src, flow.src), Direction::Ingress, flow)));
            }
            for (direction, check) in &sides {
                if let NaiveCheck::Deny(rule) = check {
                    return decision(Verdict::Deny, Reason::PolicyDeny, *direction, *rule);
                }
            }
            for (direction, check) in &sides {
                if let NaiveCheck::DefaultDeny = check {
                    return decision(Verdict::Deny, Reason::DefaultDeny, *direction, 0);
                }
            }
            match sides.iter().rev().find_map(|(direction, check)| match check {
                NaiveCheck::Allow(rule) => Some((*direction, *rule)),
                _ => None,
            }) {
                Some((direction, rule)) => decision(Verdict::Allow, Reason::PolicyAllow, direction, rule),
                None => decision(Verdict::Allow, Reason::NotIsolated, Direction::None, 0),
            }
        }

        /// The policies in force decide; where they allow and the staged view denies, the
        /// staged denial is the audit.
        fn evaluate(set: &PolicySet, flow: &Flow) -> Decision {
            let enforced = Naive { set, staged: false }.evaluate_view(flow);
            let staged = Naive { set, staged: true }.evaluate_view(flow);
            match (enforced.verdict, staged.verdict) {
                (Verdict::Allow, Verdict::Deny) => Decision { verdict: Verdict::Audit, ..staged },
                _ => enforced,
            }
        }
    }

    /// Draws for the generators, over a seeded `fastrand::Rng` so that a failure replays exactly.
    trait Draw {
        fn percent(&mut self, chance: usize) -> bool;
        fn pick<T: Copy>(&mut self, items: &[T]) -> T;
    }

    impl Draw for Rng {
        fn percent(&mut self, chance: usize) -> bool {
            self.usize(..100) < chance
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.usize(..items.len())]
        }
    }

    // Nested prefixes so longest-prefix match matters; a few ports and types around the edges
    // of the generated ranges so rules overlap often.
    const PREFIXES: [&str; 11] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.128/25",
        "10.1.2.200/32",
        "10.2.0.0/16",
        "192.168.0.0/24",
        "fd00::/16",
        "fd00:1::/32",
        "fd00:1:2::/48",
        "fd00:2::/32",
    ];
    const V4_ADDRESSES: [&str; 9] = [
        "10.1.2.3",
        "10.1.2.130",
        "10.1.2.200",
        "10.1.9.9",
        "10.2.3.4",
        "10.9.9.9",
        "192.168.0.7",
        "8.8.8.8",
        "172.16.0.1",
    ];
    const V6_ADDRESSES: [&str; 5] = ["fd00:1:2::5", "fd00:1:9::5", "fd00:2::1", "fd00:9::1", "2001:db8::1"];
    /// Ranges CIDR peers name besides `PREFIXES` (which are world when no identity declares
    /// them): whole families, and ranges around the world addresses above.
    const WORLD_PREFIXES: [&str; 8] =
        ["0.0.0.0/0", "8.0.0.0/8", "8.8.8.0/24", "172.16.0.0/12", "::/0", "2001:db8::/32", "2001:db8::/64", "fd00:9::/32"];
    const PORTS: [u16; 8] = [1, 79, 80, 81, 443, 8080, 8081, 65535];
    const ICMP_TYPES: [u16; 4] = [0, 3, 8, 11];
    const NAMES: [&str; 4] = ["a", "b", "c", "d"];

    fn random_policy_yaml(rng: &mut Rng) -> String {
        let mut yaml = String::new();
        let names = &NAMES[..1 + rng.usize(..NAMES.len())];
        let mut prefixes = PREFIXES;
        rng.shuffle(&mut prefixes);
        let mut prefixes = prefixes.into_iter();
        let mut declared: Vec<IpNet> = Vec::new();
        for name in names {
            let mine: Vec<&str> = prefixes.by_ref().take(1 + rng.usize(..2)).collect();
            declared.extend(mine.iter().map(|cidr| cidr.parse::<IpNet>().unwrap()));
            let selectors: Vec<String> = mine.iter().map(|cidr| format!("{{cidr: '{cidr}'}}")).collect();
            let selectors = selectors.join(", ");
            writeln!(yaml, "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: {name}}}\nspec: {{selectors: [{selectors}]}}").unwrap();
        }
        let subjects: Vec<&str> = names.iter().copied().chain(["any"]).collect();
        let mut peers: Vec<String> = names.iter().copied().chain(["any", "world"]).map(str::to_owned).collect();
        peers.extend((0..1 + rng.usize(..3)).filter_map(|_| random_cidr_peer(rng, &declared)));
        let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
        for policy in 0..1 + rng.usize(..4) {
            let subject: Vec<&str> = (0..1 + rng.usize(..2)).map(|_| rng.pick(&subjects)).collect();
            let mode = if rng.percent(30) { "\n  mode: monitor" } else { "" };
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: p{policy}}}\nspec:{mode}\n  subject: [{}]",
                subject.join(", ")
            )
            .unwrap();
            let with_ingress = rng.percent(60);
            let with_egress = !with_ingress || rng.percent(50);
            for (present, list, peer_key) in [(with_ingress, "ingress", "from"), (with_egress, "egress", "to")] {
                if present {
                    let rules: Vec<String> = (0..rng.usize(..4)).map(|_| random_rule(rng, peer_key, &peers)).collect();
                    writeln!(yaml, "  {list}: [{}]", rules.join(", ")).unwrap();
                }
            }
        }
        yaml
    }

    /// `{cidr: …, except: […]}` over a range no declared prefix contains (else it is an error),
    /// with up to two exceptions strictly inside it.
    fn random_cidr_peer(rng: &mut Rng, declared: &[IpNet]) -> Option<String> {
        let all: Vec<IpNet> = PREFIXES.iter().chain(&WORLD_PREFIXES).map(|p| p.parse().unwrap()).collect();
        let net = rng.pick(&all);
        if declared.iter().any(|owned| owned.contains(&net)) {
            return None;
        }
        let inside: Vec<IpNet> =
            all.iter().copied().filter(|p| net.contains(p) && p.prefix_len() > net.prefix_len()).collect();
        let except: Vec<String> = match inside.is_empty() {
            true => Vec::new(),
            false => (0..rng.usize(..3)).map(|_| format!("'{}'", rng.pick(&inside))).collect(),
        };
        Some(format!("{{cidr: '{net}', except: [{}]}}", except.join(", ")))
    }

    fn random_rule(rng: &mut Rng, peer_key: &str, peers: &[&str]) -> String {
        let peer_list: Vec<&str> = (0..1 + rng.usize(..2)).map(|_| rng.pick(peers)).collect();
        let mut rule = format!("{{{peer_key}: [{}]", peer_list.join(", "));
        if rng.percent(70) {
            let items: Vec<String> = (0..1 + rng.usize(..2)).map(|_| random_port_item(rng)).collect();
            write!(rule, ", ports: [{}]", items.join(", ")).unwrap();
        }
        if rng.percent(35) {
            rule.push_str(", action: deny");
        }
        rule.push('}');
        rule
    }

    fn random_port_item(rng: &mut Rng) -> String {
        let protocol = rng.pick(&["tcp", "tcp", "tcp", "udp", "sctp", "icmp", "icmpv6"]);
        if protocol.starts_with("icmp") {
            return match rng.percent(40) {
                true => format!("{{protocol: {protocol}}}"),
                false => format!("{{protocol: {protocol}, type: {}}}", rng.pick(&ICMP_TYPES)),
            };
        }
        match rng.usize(..3) {
            0 => format!("{{protocol: {protocol}}}"),
            1 => format!("{{protocol: {protocol}, port: {}}}", rng.pick(&PORTS)),
            _ => {
                let (a, b) = (rng.pick(&PORTS), rng.pick(&PORTS));
                format!("{{protocol: {protocol}, port: '{}-{}'}}", a.min(b), a.max(b))
            }
        }
    }

    fn random_flow(rng: &mut Rng) -> Flow {
        let addresses: &[&str] = if rng.percent(70) { &V4_ADDRESSES } else { &V6_ADDRESSES };
        let protocol = rng.pick(&[proto::TCP, proto::TCP, proto::UDP, proto::SCTP, proto::ICMP, proto::ICMPV6, 47]);
        let dst_port = match protocol {
            proto::ICMP | proto::ICMPV6 => rng.pick(&ICMP_TYPES),
            47 => 0,
            _ if rng.percent(15) => rng.u16(..),
            _ => rng.pick(&PORTS),
        };
        flow(rng.pick(addresses), rng.pick(addresses), protocol, dst_port)
    }

    #[test]
    fn compiled_entries_agree_with_the_naive_semantics() {
        const POLICY_SETS: usize = 600;
        const FLOWS_PER_SET: usize = 40;
        let seed = seed_from_env("ZT_POLICY_SEED", 0x5eed_2024);
        let mut rng = Rng::with_seed(seed);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for case in 0..POLICY_SETS {
            let yaml = random_policy_yaml(&mut rng);
            let set = parse_str(&yaml, "random.yaml")
                .unwrap_or_else(|errors| panic!("case {case} (ZT_POLICY_SEED={seed:#x}):\n{yaml}\n{errors}"));
            let compiled = compile(&set).unwrap();
            let mut keys: Vec<_> = compiled.policy.iter().map(|block| block.key).collect();
            keys.dedup();
            assert_eq!(
                keys.len(),
                compiled.policy.len(),
                "case {case} (ZT_POLICY_SEED={seed:#x}): duplicate entries\n{yaml}"
            );
            let evaluator = Evaluator::new(&compiled);
            for _ in 0..FLOWS_PER_SET {
                let flow = random_flow(&mut rng);
                let expected = Naive::evaluate(&set, &flow);
                assert_eq!(
                    evaluator.evaluate(&flow),
                    expected,
                    "case {case} (replay with ZT_POLICY_SEED={seed:#x}): {flow:?}\n{yaml}\nentries: {:#?}",
                    compiled.policy
                );
                *seen.entry(outcome_name(expected.reason, expected.direction)).or_default() += 1;
                if expected.verdict == Verdict::Audit {
                    *seen.entry("staged-audit".to_owned()).or_default() += 1;
                }
            }
        }
        // The generator must reach every outcome, or agreement would prove little.
        for reason in [Reason::PolicyAllow, Reason::PolicyDeny, Reason::DefaultDeny] {
            for direction in [Direction::Ingress, Direction::Egress] {
                let count = seen.get(&outcome_name(reason, direction)).copied().unwrap_or(0);
                assert!(count >= 100, "only {count} cases of {reason:?} on {direction:?} (seed {seed:#x}): {seen:?}");
            }
        }
        for outcome in [outcome_name(Reason::NotIsolated, Direction::None), "staged-audit".to_owned()] {
            assert!(seen.get(&outcome).copied().unwrap_or(0) >= 100, "{outcome}: {seen:?}");
        }
    }

    /// The seed in `name` (decimal or `0x…` hex, `_` allowed), else `default`: the generator's
    /// whole output follows from it (and the `fastrand` version Cargo.lock pins), so a failure
    /// replays with the seed it names.
    fn seed_from_env(name: &str, default: u64) -> u64 {
        let Ok(text) = std::env::var(name) else { return default };
        let digits = text.trim().replace('_', "");
        let parsed = match digits.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => digits.parse(),
        };
        parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number"))
    }

    fn outcome_name(reason: Reason, direction: Direction) -> String {
        format!("{}/{direction:?}", reason.name())
    }
}
