//! Compiles a validated policy set into the entries of the kernel's maps.
//!
//! The kernel checks a flow against one (subject, peer, direction) *group* at a time, finding
//! the run of (protocol, port) points that holds the packet's (`zt_common::policy_tree`), so
//! within a group the runs already encode rule precedence: "deny beats allow, then the lowest
//! rule id", at every point. Across the four groups a check consults, the kernel itself applies
//! the order (subject, peer), (subject, ANY), (ANY, peer), (ANY, ANY) — see `eval` — and probes
//! only the groups the isolation entries' wildcard flags say exist.
//!
//! Every entry answers for two views (`zt_common::isolation`): the enforced view holds the rules
//! of policies in force, the staged view those plus the rules of `mode: monitor` policies.
//!
//! CIDR peers name world address ranges. Each range (and each `except`) that no declared prefix
//! contains gets its own number from [`FIRST_CIDR`] on and its own ipcache entry, carved out of
//! `world`: an address then resolves to the longest such range containing it, and a CIDR peer is
//! the set of ranges inside its prefix and outside its exceptions — exact, because every prefix
//! the peer mentions is in the ipcache itself.
//!
//! Named ports (`port: http`) are a destination pod's container ports: for each (subject, peer)
//! they become the numbers the destination's label set names (the subject's for ingress, the
//! peer's for egress), so the kernel only ever sees numbers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::IpNet;
use thiserror::Error;
use zt_common::{
    action,
    identity::{ANY, FIRST_CIDR, HOST, WORLD},
    isolation, maps, policy_point, policy_tree, Direction, IpKey, PolicyKey, PolicyValue, PortRun,
};

use crate::datapath::capacity::{IPCACHE_CEILING, POLICY_CEILING};

use super::{Action, Peer, PolicyMode, PolicySet, Protocol, Subject};
use crate::identity::{
    pods::{Cluster, NamedPorts},
    IdentityError, IdentityTable,
};
pub use super::selectors::{CgroupMatcher, SpiffeMatcher};

/// Everything the agent writes into the kernel's maps for one policy set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub identities: IdentityTable,
    /// Every declared `cidr` selector, the world ranges of CIDR peers, and `0.0.0.0/0` and
    /// `::/0` (as world unless a CIDR peer names them).
    pub ipcache: Vec<(IpNet, u32)>,
    /// The world ranges of CIDR peers and their numbers (from `FIRST_CIDR` on), sorted.
    pub ranges: Vec<(IpNet, u32)>,
    /// The `cgroup` selectors: which identity a cgroup (by path relative to the cgroup v2
    /// root) belongs to, inheriting from its nearest matching ancestor. Resolved by the agent.
    pub cgroups: CgroupMatcher,
    /// The `spiffe` selectors: which identity a verified SPIFFE ID belongs to. Resolved by the
    /// agent.
    pub spiffe: SpiffeMatcher,
    /// The `interface` selectors: (host-side interface name, identity), sorted by name; each
    /// name once. Resolved by the agent.
    pub interfaces: Vec<(String, u32)>,
    /// (identity or ANY, `isolation::*` flags), one entry per identity, sorted.
    pub isolation: Vec<(u32, u32)>,
    /// The policy map's blocks, keyed in slot 0 (the datapath puts them in the slot it
    /// stages); every key once, sorted.
    pub policy: Vec<PolicyBlock>,
    /// Rule `id` is `rules[id - 1]`.
    pub rules: Vec<RuleInfo>,
    /// The label sets and namespaces `pods` selectors were expanded over; each label set is an
    /// identity of `identities`.
    pub cluster: Cluster,
}

impl Compiled {
    pub fn rule(&self, rule_id: u32) -> Option<&RuleInfo> {
        let index = rule_id.checked_sub(1)?;
        self.rules.get(usize::try_from(index).ok()?)
    }

    /// The identity an `interface` selector gives the interface `name`.
    pub fn interface_identity(&self, name: &str) -> Option<u32> {
        let index = self.interfaces.binary_search_by(|(interface, _)| interface.as_str().cmp(name)).ok()?;
        Some(self.interfaces[index].1)
    }

    /// The world range a CIDR-range identity stands for.
    pub fn range(&self, id: u32) -> Option<IpNet> {
        // Numbered by position (`world_ranges`): looked up per flow event, so no search.
        let index = usize::try_from(id.checked_sub(FIRST_CIDR)?).ok()?;
        self.ranges.get(index).filter(|(_, range_id)| *range_id == id).map(|(net, _)| *net)
    }
}

/// One block of the policy map (`zt_common::policy_tree`), held as compactly as the agent can:
/// most blocks have one run, the kernel's value has room for eight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyBlock {
    pub key: PolicyKey,
    /// Sorted; empty when the block is split (a block that is not has at least one run).
    pub runs: Box<[PortRun]>,
}

impl PolicyBlock {
    pub fn is_split(&self) -> bool {
        self.runs.is_empty()
    }

    /// The block as the kernel's map holds it.
    pub fn value(&self) -> PolicyValue {
        let mut value = PolicyValue { count: self.runs.len() as u8, split: self.is_split().into(), ..PolicyValue::default() };
        value.runs[..self.runs.len()].copy_from_slice(&self.runs);
        value
    }
}

/// Where a rule id comes from, to explain verdicts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// Shared by the policy's rules.
    pub policy: Arc<str>,
    pub direction: Direction,
    /// Position in the policy's ingress or egress list.
    pub index: usize,
    pub action: Action,
    /// The rule's policy is staged (`mode: monitor`).
    pub staged: bool,
}

#[derive(Debug, Error)]
pub enum CompileError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the policy set needs {count} entries in {map}, which holds at most {capacity}; use fewer prefixes, identities or port ranges")]
    MapFull { map: &'static str, count: usize, capacity: u32 },
    #[error("the {kind} patterns cannot be compiled together: {message}; use fewer or simpler patterns")]
    Patterns { kind: &'static str, message: String },
}

/// The ipcache key of an address: IPv6 as is, IPv4 as `::ffff:a.b.c.d`.
pub fn ip_key(addr: IpAddr) -> IpKey {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The ipcache (prefix length, key) of a prefix: an IPv4 /n is a /(96 + n) of its mapped form.
pub fn ipcache_prefix(net: &IpNet) -> (u32, IpKey) {
    let mapped_bits = match net {
        IpNet::V4(_) => 96,
        IpNet::V6(_) => 0,
    };
    (mapped_bits + u32::from(net.prefix_len()), ip_key(net.network()))
}

/// Compiles without pods: `pods` selectors select nothing.
pub fn compile(set: &PolicySet) -> Result<Compiled, CompileError> {
    compile_for(set, &Cluster::default())
}

/// Compiles for the cluster's label sets: each is an identity, and `pods` selectors stand for
/// those they match.
pub fn compile_for(set: &PolicySet, cluster: &Cluster) -> Result<Compiled, CompileError> {
    let pod_names: Vec<String> = cluster.identities.keys().map(|pod| pod.name()).collect();
    let identities = IdentityTable::allocate(set.identities().iter().map(|identity| identity.name.as_str()))?
        .add_pods(pod_names.iter().map(String::as_str))?;
    let id_of = |name: &str| identities.id(name).expect("a validated policy set names only declared identities");
    let pod_ids = |selector: &super::PodSelector| -> Vec<u32> {
        selector.select(cluster).map(|pod| id_of(&pod.name())).collect()
    };

    let mut ipcache = Vec::new();
    for identity in set.identities() {
        let id = id_of(&identity.name);
        ipcache.extend(identity.cidrs.iter().map(|net| (*net, id)));
    }
    let patterns = |kind| move |err: globset::Error| CompileError::Patterns { kind, message: err.kind().to_string() };
    let cgroups = CgroupMatcher::new(set.identities().iter().flat_map(|identity| {
        let id = id_of(&identity.name);
        identity.cgroups.iter().map(move |selector| (selector, identity.name.as_str(), id))
    }))
    .map_err(patterns("cgroup"))?;
    let spiffe = SpiffeMatcher::new(set.identities().iter().flat_map(|identity| {
        let id = id_of(&identity.name);
        identity.spiffe.iter().map(move |selector| (selector, identity.name.as_str(), id))
    }))
    .map_err(patterns("SPIFFE"))?;
    let mut interfaces: Vec<(String, u32)> = set
        .identities()
        .iter()
        .flat_map(|identity| identity.interfaces.iter().map(|name| (name.clone(), id_of(&identity.name))))
        .collect();
    interfaces.sort();
    let ranges = world_ranges(set);
    for everything in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
        let net = IpNet::new(everything, 0).expect("/0 is valid");
        if !ranges.iter().any(|(range, _)| *range == net) {
            ipcache.push((net, WORLD));
        }
    }
    ipcache.extend(ranges.iter().copied());
    let peer_ids = |peer: &Peer| -> Vec<u32> {
        match peer {
            Peer::Any => vec![ANY],
            Peer::World => std::iter::once(WORLD).chain(ranges.iter().map(|(_, id)| *id)).collect(),
            Peer::Host => vec![HOST],
            Peer::Identity(name) => vec![id_of(name)],
            Peer::Pods(selector) => pod_ids(selector),
            Peer::Cidr { net, except } => ranges
                .iter()
                .filter(|(range, _)| net.contains(range) && !except.iter().any(|e| e.contains(range)))
                .map(|(_, id)| *id)
                .collect(),
        }
    };

    // Named ports resolve against the destination's container ports, which only pods have.
    let named_ports_of: BTreeMap<u32, &NamedPorts> =
        cluster.identities.iter().map(|(pod, ports)| (id_of(&pod.name()), ports)).collect();
    // The groups a rule's named ports go to, each with its destination's ports: the subject is
    // the destination of ingress, the peer of egress, and `any` there is every pod, each on its
    // own.
    let named_port_groups = |subject: u32, peer: u32, direction: Direction| -> Vec<(u32, u32, &NamedPorts)> {
        let destination = if direction == Direction::Ingress { subject } else { peer };
        if destination != ANY {
            return named_ports_of.get(&destination).map(|ports| vec![(subject, peer, *ports)]).unwrap_or_default();
        }
        let pods = named_ports_of.iter();
        pods.map(|(&pod, ports)| if direction == Direction::Ingress { (pod, peer, *ports) } else { (subject, pod, *ports) })
            .collect()
    };

    let mut rules = Vec::new();
    let mut isolation_flags: BTreeMap<u32, u32> = BTreeMap::new();
    // Every (group, points, outcome) the rules make, in one flat list: a map of lists would
    // cost several times as much at 100k rules.
    let mut items: Vec<(GroupKey, u32, u32, Outcome)> = Vec::new();
    for policy in set.policies() {
        let subjects: BTreeSet<u32> = policy
            .subjects
            .iter()
            .flat_map(|subject| match subject {
                Subject::Any => vec![ANY],
                Subject::Identity(name) => vec![id_of(name)],
                Subject::Pods(selector) => pod_ids(selector),
            })
            .collect();
        let staged = policy.mode == PolicyMode::Monitor;
        let policy_name: Arc<str> = policy.name.as_str().into();
        for (direction, flag) in [(Direction::Ingress, isolation::INGRESS), (Direction::Egress, isolation::EGRESS)] {
            let Some(policy_rules) = policy.rules(direction) else { continue };
            // The staged view holds every policy; the enforced view only those in force.
            let flags = if staged { isolation::STAGED_RULES } else { flag } | flag << isolation::STAGED_SHIFT;
            for &subject in &subjects {
                *isolation_flags.entry(subject).or_default() |= flags;
            }
            for (index, rule) in policy_rules.iter().enumerate() {
                rules.push(RuleInfo { policy: policy_name.clone(), direction, index, action: rule.action, staged });
                let outcome = Outcome { action: rule.action, rule_id: rules.len() as u32, staged };
                let peers: BTreeSet<u32> = rule.peers.iter().flat_map(peer_ids).collect();
                for &subject in &subjects {
                    for &peer in &peers {
                        let group = (subject, peer, direction as u8);
                        match &rule.ports {
                            None => items.push((group, 0, ALL_POINTS, outcome)),
                            Some(ports) => {
                                for port in ports {
                                    let point = |number| policy_point(port.protocol.number(), number);
                                    items.push((group, point(port.range.first), point(port.range.last), outcome));
                                }
                            }
                        }
                        if rule.named_ports.is_empty() {
                            continue;
                        }
                        for (subject, peer, container_ports) in named_port_groups(subject, peer, direction) {
                            let resolved: Vec<(Protocol, u16)> = rule
                                .named_ports
                                .iter()
                                .flat_map(|named| {
                                    let numbers = container_ports.get(&named.name).into_iter().flatten();
                                    let numbers = numbers.filter(|(protocol, _)| *protocol == named.protocol.number());
                                    numbers.map(|(_, port)| (named.protocol, *port))
                                })
                                .collect();
                            if resolved.is_empty() {
                                continue;
                            }
                            for (protocol, port) in resolved {
                                let point = policy_point(protocol.number(), port);
                                items.push(((subject, peer, direction as u8), point, point, outcome));
                            }
                        }
                    }
                }
            }
        }
    }

    items.sort_unstable_by_key(|(group, ..)| *group);
    let mut policy = Vec::new();
    let mut points = Vec::new();
    for group in items.chunk_by(|a, b| a.0 == b.0) {
        let (subject, peer, direction) = group[0].0;
        let wildcard = match (subject, peer) {
            (ANY, ANY) => Some((ANY, isolation::ANY_ANY)),
            (ANY, peer) => Some((peer, isolation::PEER_OF_ANY)),
            (subject, ANY) => Some((subject, isolation::ANY_PEER)),
            _ => None,
        };
        if let Some((id, flag)) = wildcard {
            let direction = Direction::from_u8(direction).expect("a rule's direction");
            *isolation_flags.entry(id).or_default() |= isolation::of(flag, direction);
        }
        points.clear();
        points.extend(group.iter().map(|&(_, first, last, outcome)| (first, last, outcome)));
        let base = PolicyKey { subject, peer, direction, ..PolicyKey::default() };
        blocks(base, 0, 0, &runs(&points), &mut policy);
    }
    drop(items);
    policy.sort_unstable_by_key(|block| block.key);
    policy.shrink_to_fit();
    let isolation: Vec<_> = isolation_flags.into_iter().collect();
    // The node's own capacities (`--capacity`) are checked when the policy is staged; these are
    // the ceilings no node can hold more than.
    check_capacity(maps::IPCACHE, ipcache.len(), IPCACHE_CEILING)?;
    check_capacity(maps::ISOLATION, isolation.len(), maps::ISOLATION_CAPACITY)?;
    check_capacity(maps::POLICY, policy.len(), POLICY_CEILING)?;
    Ok(Compiled { identities, ipcache, ranges, cgroups, spiffe, interfaces, isolation, policy, rules, cluster: cluster.clone() })
}

/// The prefixes CIDR peers name (ranges and exceptions) that no declared prefix contains, with
/// their numbers: `FIRST_CIDR` + position in sorted order.
fn world_ranges(set: &PolicySet) -> Vec<(IpNet, u32)> {
    let owned: Vec<IpNet> = set.identities().iter().flat_map(|identity| identity.cidrs.iter().copied()).collect();
    let named: BTreeSet<IpNet> = set
        .policies()
        .iter()
        .flat_map(|policy| [Direction::Ingress, Direction::Egress].map(|direction| policy.rules(direction)))
        .flatten()
        .flatten()
        .flat_map(|rule| &rule.peers)
        .flat_map(|peer| match peer {
            Peer::Cidr { net, except } => std::iter::once(*net).chain(except.iter().copied()).collect(),
            _ => Vec::new(),
        })
        .filter(|net| !owned.iter().any(|prefix| prefix.contains(net)))
        .collect();
    named.into_iter().zip(FIRST_CIDR..).collect()
}

fn check_capacity(map: &'static str, count: usize, capacity: u32) -> Result<(), CompileError> {
    if count > capacity as usize {
        return Err(CompileError::MapFull { map, count, capacity });
    }
    Ok(())
}

/// What one rule says about the points it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    action: Action,
    rule_id: u32,
    /// Only in the staged view.
    staged: bool,
}

/// (subject, peer, direction): one group.
type GroupKey = (u32, u32, u8);

/// The last point: protocol 255, port 65535.
const ALL_POINTS: u32 = (1 << 24) - 1;

/// The winning rule at a point in the enforced view and in the staged view.
type Views = (Option<Outcome>, Option<Outcome>);

/// The winner among the outcomes of the rules matching one point, in each view: deny beats
/// allow, then the lowest rule id.
fn decide(outcomes: &[Outcome]) -> Views {
    let winner = |staged_too: bool| {
        let matching = outcomes.iter().filter(|o| staged_too || !o.staged);
        matching.min_by_key(|outcome| (outcome.action != Action::Deny, outcome.rule_id)).copied()
    };
    (winner(false), winner(true))
}

fn run((first, last): (u32, u32), (enforced, staged): Views) -> PortRun {
    let code = |outcome: Option<Outcome>| outcome.map_or(action::NONE, |o| o.action.code());
    let rule = |outcome: Option<Outcome>| outcome.map_or(zt_common::NO_RULE, |o| o.rule_id);
    PortRun {
        first,
        last,
        rule_id: rule(enforced),
        staged_rule_id: rule(staged),
        action: code(enforced),
        staged_action: code(staged),
        _pad: [0; 2],
    }
}

/// Maximal runs of points (inclusive) with the same decisions, over the points some rule
/// covers, sorted.
fn runs(items: &[(u32, u32, Outcome)]) -> Vec<PortRun> {
    // Elementary intervals start at each item's first point and just past each item's last.
    let mut cuts: Vec<u32> = items.iter().flat_map(|&(first, last, _)| [first, last + 1]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut runs: Vec<PortRun> = Vec::new();
    let mut covering = Vec::new();
    for window in cuts.windows(2) {
        let (first, last) = (window[0], window[1] - 1);
        covering.clear();
        covering.extend(items.iter().filter(|(f, l, _)| *f <= first && last <= *l).map(|(_, _, outcome)| *outcome));
        if covering.is_empty() {
            continue;
        }
        let next = run((first, last), decide(&covering));
        match runs.last_mut() {
            Some(prev) if prev.last + 1 == first && PortRun { first: prev.first, last: prev.last, ..next } == *prev => {
                prev.last = last;
            }
            _ => runs.push(next),
        }
    }
    runs
}

/// The block at `level` starting at point `start` holding `runs` (sorted, within the block):
/// one entry if they fit, else a split entry and the sub-blocks that hold any run, each with
/// its part of the runs.
fn blocks(base: PolicyKey, level: usize, start: u32, runs: &[PortRun], out: &mut Vec<PolicyBlock>) {
    let key = PolicyKey { level: level as u8, block: start >> policy_tree::SHIFTS[level], ..base };
    if runs.len() <= policy_tree::RUNS {
        out.push(PolicyBlock { key, runs: runs.into() });
        return;
    }
    out.push(PolicyBlock { key, runs: Box::new([]) });
    let width = 1u32 << policy_tree::SHIFTS[level + 1];
    let mut parts: Vec<PortRun> = Vec::new();
    let mut sub = runs[0].first & !(width - 1);
    for run in runs {
        let mut run = *run;
        loop {
            let sub_last = sub + (width - 1);
            if run.first > sub_last {
                blocks(base, level + 1, sub, &parts, out);
                parts.clear();
                sub = run.first & !(width - 1);
                continue;
            }
            parts.push(PortRun { last: run.last.min(sub_last), ..run });
            if run.last <= sub_last {
                break;
            }
            run.first = sub_last + 1;
        }
    }
    blocks(base, level + 1, sub, &parts, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_str;
    use zt_common::{action, proto};

    const IDENTITIES: &str = "\
apiVersion: zt/v1
kind: Identity
metadata: {name: web}
spec: {selectors: [{cidr: 10.20.1.0/24}, {cidr: 'fd00:20:1::/64'}]}
---
apiVersion: zt/v1
kind: Identity
metadata: {name: api}
spec: {selectors: [{cidr: 10.20.2.0/24}]}
";

    /// Compiles `IDENTITIES` plus one policy with subject web and these egress rules to api.
    fn compile_egress(rules: &[&str]) -> Compiled {
        let rules: String = rules.iter().map(|rule| format!("    - {{to: [api], {rule}}}\n")).collect();
        let text = format!(
            "{IDENTITIES}---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: p}}\nspec:\n  subject: [web]\n  egress:\n{rules}"
        );
        compile(&parse_str(&text, "test.yaml").unwrap()).unwrap()
    }

    /// Every block's runs as (first point, last point, action, rule id), in key order.
    fn runs(compiled: &Compiled) -> Vec<(u32, u32, u8, u32)> {
        let runs = compiled.policy.iter().flat_map(|block| block.runs.iter());
        runs.map(|run| (run.first, run.last, run.action, run.rule_id)).collect()
    }

    fn point(protocol: u8, port: u16) -> u32 {
        policy_point(protocol, port)
    }

    const ALLOW: u8 = action::ALLOW;
    const DENY: u8 = action::DENY;
    const TCP: u8 = proto::TCP;

    #[test]
    fn port_range_is_one_run() {
        let compiled = compile_egress(&["ports: [{protocol: tcp, port: '8000-8080'}]"]);
        assert_eq!(runs(&compiled), vec![(point(TCP, 8000), point(TCP, 8080), ALLOW, 1)]);
        assert_eq!(compiled.policy.len(), 1, "one block holds the group");
    }

    #[test]
    fn keys_name_subject_peer_and_direction() {
        let compiled = compile_egress(&["ports: [{protocol: tcp, port: 443}]"]);
        let (web, api) = (compiled.identities.id("web").unwrap(), compiled.identities.id("api").unwrap());
        let run = PortRun {
            first: point(TCP, 443),
            last: point(TCP, 443),
            rule_id: 1,
            staged_rule_id: 1,
            action: ALLOW,
            staged_action: ALLOW,
            _pad: [0; 2],
        };
        let block = PolicyBlock { key: PolicyKey::new(0, web, api, Direction::Egress, 0, 0), runs: Box::new([run]) };
        assert_eq!(compiled.policy, vec![block.clone()]);
        let value = block.value();
        assert_eq!((value.count, value.split, value.runs[0], value.runs[1]), (1, 0, run, PortRun::default()));
    }

    #[test]
    fn deny_inside_allow_splits_the_allow() {
        let compiled = compile_egress(&[
            "ports: [{protocol: tcp, port: '8000-8099'}]",
            "ports: [{protocol: tcp, port: 8080}], action: deny",
        ]);
        assert_eq!(
            runs(&compiled),
            vec![
                (point(TCP, 8000), point(TCP, 8079), ALLOW, 1),
                (point(TCP, 8080), point(TCP, 8080), DENY, 2),
                (point(TCP, 8081), point(TCP, 8099), ALLOW, 1),
            ]
        );
    }

    #[test]
    fn allow_inside_deny_is_swallowed() {
        let compiled = compile_egress(&[
            "ports: [{protocol: tcp, port: '8000-8099'}], action: deny",
            "ports: [{protocol: tcp, port: 8080}]",
        ]);
        assert_eq!(runs(&compiled), vec![(point(TCP, 8000), point(TCP, 8099), DENY, 1)]);
    }

    #[test]
    fn overlapping_allows_report_the_lowest_rule() {
        let compiled =
            compile_egress(&["ports: [{protocol: udp, port: '10-11'}]", "ports: [{protocol: udp, port: '8-15'}]"]);
        let udp = |port| point(proto::UDP, port);
        assert_eq!(runs(&compiled), vec![(udp(8), udp(9), ALLOW, 2), (udp(10), udp(11), ALLOW, 1), (udp(12), udp(15), ALLOW, 2)]);
    }

    #[test]
    fn any_protocol_rules_cover_every_point() {
        let compiled = compile_egress(&["ports: [{protocol: tcp, port: 80}]", "action: deny"]);
        assert_eq!(runs(&compiled), vec![(0, ALL_POINTS, DENY, 2)]);
        // ... except where a deny of a lower rule id decides.
        let compiled = compile_egress(&["ports: [{protocol: tcp, port: 80}], action: deny", "action: deny"]);
        let http = point(TCP, 80);
        assert_eq!(runs(&compiled), vec![(0, http - 1, DENY, 2), (http, http, DENY, 1), (http + 1, ALL_POINTS, DENY, 2)]);
        let compiled = compile_egress(&["action: allow", "ports: [{protocol: tcp, port: 80}]"]);
        assert_eq!(runs(&compiled), vec![(0, ALL_POINTS, ALLOW, 1)]);
        let compiled = compile_egress(&["ports: [{protocol: tcp, port: 80}]", "action: allow"]);
        assert_eq!(runs(&compiled), vec![(0, http - 1, ALLOW, 2), (http, http, ALLOW, 1), (http + 1, ALL_POINTS, ALLOW, 2)]);
        let compiled = compile_egress(&["action: allow", "ports: [{protocol: tcp, port: 80}], action: deny"]);
        assert_eq!(runs(&compiled), vec![(0, http - 1, ALLOW, 1), (http, http, DENY, 2), (http + 1, ALL_POINTS, ALLOW, 1)]);
    }

    #[test]
    fn whole_protocols_and_icmp_types() {
        let compiled = compile_egress(&[
            "ports: [{protocol: sctp}, {protocol: icmp}]",
            "ports: [{protocol: icmpv6, type: 128}]",
            "ports: [{protocol: tcp, port: '1-65535'}]",
        ]);
        let runs = runs(&compiled);
        assert!(runs.contains(&(point(proto::SCTP, 0), point(proto::SCTP, 65535), ALLOW, 1)), "{runs:?}");
        assert!(runs.contains(&(point(proto::ICMP, 0), point(proto::ICMP, 255), ALLOW, 1)), "{runs:?}");
        assert!(runs.contains(&(point(proto::ICMPV6, 128), point(proto::ICMPV6, 128), ALLOW, 2)), "{runs:?}");
        assert!(runs.contains(&(point(TCP, 1), point(TCP, 65535), ALLOW, 3)), "{runs:?}");
    }

    #[test]
    fn groups_of_many_ports_split_into_blocks_that_each_fit() {
        use super::super::eval::{Evaluator, Flow};
        use zt_common::{policy_tree::RUNS, Verdict};

        // 40 single ports: 30 below 256 (one level-2 block, too many for it), 10 far above.
        let ports: Vec<u16> = (0..30).map(|i| 3 + 7 * i).chain((0..10).map(|i| 40_000 + 1_000 * i)).collect();
        let list: Vec<String> = ports.iter().map(|port| format!("{{protocol: tcp, port: {port}}}")).collect();
        let compiled = compile_egress(&[&format!("ports: [{}]", list.join(", "))]);
        assert_eq!(runs(&compiled).len(), ports.len());
        assert!(compiled.policy.iter().all(|block| block.runs.len() <= RUNS));
        let levels: BTreeSet<u8> = compiled.policy.iter().map(|block| block.key.level).collect();
        assert_eq!(levels, BTreeSet::from([0, 1, 2, 3]), "the crowded block goes down to the last level");
        let splits = compiled.policy.iter().filter(|block| block.is_split());
        assert!(splits.clone().all(|block| block.value().split == 1 && block.value().count == 0));
        assert_eq!(splits.filter(|block| block.key.level == 1).count(), 1, "TCP, and no other protocol, is split");
        let evaluator = Evaluator::new(&compiled);
        let allowed = |port| {
            let flow = Flow { src: "10.20.1.1".parse().unwrap(), dst: "10.20.2.1".parse().unwrap(), protocol: TCP, dst_port: port };
            evaluator.evaluate(&flow).verdict == Verdict::Allow
        };
        for port in 0..=u16::MAX {
            assert_eq!(allowed(port), ports.contains(&port), "port {port}");
        }
    }

    #[test]
    fn wildcard_flags_name_the_groups_that_exist() {
        let text = format!(
            "{IDENTITIES}---
apiVersion: zt/v1
kind: Policy
metadata: {{name: p}}
spec: {{subject: [web], egress: [{{to: [any], ports: [{{protocol: udp, port: 53}}]}}]}}
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: q}}
spec: {{subject: [any], ingress: [{{from: [api]}}], egress: [{{to: [any], action: deny, ports: [{{protocol: tcp, port: 23}}]}}]}}
"
        );
        let compiled = compile(&parse_str(&text, "test.yaml").unwrap()).unwrap();
        let (web, api) = (compiled.identities.id("web").unwrap(), compiled.identities.id("api").unwrap());
        let flags = |id| compiled.isolation.iter().find(|(i, _)| *i == id).map_or(0, |(_, flags)| *flags);
        let both = isolation::INGRESS | isolation::EGRESS;
        let both = both | both << isolation::STAGED_SHIFT;
        assert_eq!(flags(web), isolation::EGRESS | isolation::STAGED_EGRESS | isolation::of(isolation::ANY_PEER, Direction::Egress));
        assert_eq!(flags(api), isolation::of(isolation::PEER_OF_ANY, Direction::Ingress), "a peer only");
        assert_eq!(flags(ANY), both | isolation::of(isolation::ANY_ANY, Direction::Egress));
    }

    #[test]
    fn rules_from_several_policies_merge_into_one_entry_per_key() {
        let text = format!(
            "{IDENTITIES}---
apiVersion: zt/v1
kind: Policy
metadata: {{name: first}}
spec: {{subject: [web], egress: [{{to: [api], ports: [{{protocol: tcp, port: 80}}]}}]}}
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: second}}
spec: {{subject: [web, web], egress: [{{to: [api, api], ports: [{{protocol: tcp, port: 80}}], action: deny}}]}}
"
        );
        let compiled = compile(&parse_str(&text, "test.yaml").unwrap()).unwrap();
        assert_eq!(runs(&compiled), vec![(point(TCP, 80), point(TCP, 80), DENY, 2)]);
        assert_eq!(
            compiled.rule(2),
            Some(&RuleInfo {
                policy: "second".into(),
                direction: Direction::Egress,
                index: 0,
                action: Action::Deny,
                staged: false
            })
        );
        assert_eq!(compiled.rule(0), None);
        assert_eq!(compiled.rule(3), None);
    }

    #[test]
    fn demo_policy_compiles_to_expected_maps() {
        let set = parse_str(include_str!("../../../policies/demo.yaml"), "policies/demo.yaml").unwrap();
        let compiled = compile(&set).unwrap();
        let id = |name| compiled.identities.id(name).unwrap();
        let both = isolation::INGRESS | isolation::EGRESS;
        let mut expected = vec![
            (ANY, both),
            (id("web"), isolation::EGRESS),
            (id("api"), both),
            (id("db"), isolation::INGRESS),
            (id("reports"), isolation::EGRESS),
            (id("billing"), isolation::EGRESS),
            (id("backup"), isolation::EGRESS),
        ];
        // Every policy is in force, so the staged view's flags are the same.
        for (_, flags) in &mut expected {
            *flags |= *flags << isolation::STAGED_SHIFT;
        }
        expected.sort();
        assert_eq!(compiled.isolation, expected);
        assert_eq!(compiled.ipcache.len(), 5 * 2 + 2);
        let db_v6: IpNet = "fd00:20:3::/64".parse().unwrap();
        assert!(compiled.ipcache.contains(&(db_v6, id("db"))));
        assert!(compiled.ipcache.contains(&("0.0.0.0/0".parse().unwrap(), WORLD)));
        assert!(compiled.ipcache.contains(&("::/0".parse().unwrap(), WORLD)));
        // web→api, api←web, api←reports, api←billing, api→db, db←api, db←backup, reports→api,
        // billing→api, backup→db: one TCP port each. backup and billing have no address prefix.
        assert_eq!(compiled.policy.len(), 10);
        let runs = runs(&compiled);
        assert!(runs.len() == 10 && runs.iter().all(|&(first, last, action, _)| first == last && action == ALLOW));
        assert_eq!(compiled.rules.len(), 7);
    }

    #[test]
    fn agent_resolved_selectors_compile_to_matchers() {
        let text = "\
apiVersion: zt/v1
kind: Identity
metadata: {name: pg}
spec:
  selectors:
    - cgroup: system.slice/postgresql.service
    - interface: lxc-pg
---
apiVersion: zt/v1
kind: Identity
metadata: {name: services}
spec:
  selectors:
    - cgroup: 'system.slice/*.service'
    - spiffe: 'spiffe://td/ns/*/sa/*'
    - interface: eth9
---
apiVersion: zt/v1
kind: Identity
metadata: {name: api}
spec:
  selectors:
    - spiffe: spiffe://td/ns/shop/sa/api
    - cidr: 10.20.2.0/24
---
apiVersion: zt/v1
kind: Policy
metadata: {name: p}
spec: {subject: [pg], ingress: [{from: [api]}]}
";
        let compiled = compile(&parse_str(text, "test.yaml").unwrap()).unwrap();
        let id = |name| compiled.identities.id(name).unwrap();
        assert_eq!(compiled.cgroups.identity_of("system.slice/postgresql.service/child"), Some(id("pg")));
        assert_eq!(compiled.cgroups.identity_of("system.slice/nginx.service"), Some(id("services")));
        assert_eq!(compiled.cgroups.identity_of("user.slice"), None);
        assert_eq!(compiled.spiffe.identity_of("spiffe://td/ns/shop/sa/api"), Some(id("api")));
        assert_eq!(compiled.spiffe.identity_of("spiffe://td/ns/shop/sa/web"), Some(id("services")));
        assert_eq!(compiled.spiffe.identity_of("spiffe://other/ns/shop/sa/web"), None);
        // Sorted by interface name.
        assert_eq!(compiled.interfaces, vec![("eth9".to_owned(), id("services")), ("lxc-pg".to_owned(), id("pg"))]);
        assert_eq!(compiled.interface_identity("lxc-pg"), Some(id("pg")));
        assert_eq!(compiled.interface_identity("lxc-web"), None);
        // Only CIDRs reach the ipcache; an identity without any is still isolated by its policy.
        assert_eq!(compiled.ipcache.len(), 1 + 2);
        assert!(compiled.ipcache.contains(&("10.20.2.0/24".parse().unwrap(), id("api"))));
        assert_eq!(compiled.isolation, vec![(id("pg"), isolation::INGRESS | isolation::STAGED_INGRESS)]);
        assert_eq!(compiled.policy.len(), 1);
        // A set without such selectors has empty matchers.
        let plain = compile_egress(&[]);
        assert!(plain.cgroups.is_empty() && plain.spiffe.is_empty() && plain.interfaces.is_empty());
    }

    #[test]
    fn cidr_peers_carve_world_ranges_out_of_world() {
        let text = format!(
            "{IDENTITIES}---
apiVersion: zt/v1
kind: Policy
metadata: {{name: p}}
spec:
  subject: [web]
  egress:
    - to: [{{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 10.20.2.128/25]}}]
    - to: [world]
      ports: [{{protocol: udp, port: 53}}]
      action: deny
"
        );
        let compiled = compile(&parse_str(&text, "test.yaml").unwrap()).unwrap();
        let (v4_world, private): (IpNet, IpNet) = ("0.0.0.0/0".parse().unwrap(), "10.0.0.0/8".parse().unwrap());
        // 10.20.2.128/25 is inside api's prefix: api's addresses stay api's, so it is no range.
        assert_eq!(compiled.ranges, vec![(v4_world, FIRST_CIDR), (private, FIRST_CIDR + 1)]);
        assert_eq!((compiled.range(FIRST_CIDR + 1), compiled.range(FIRST_CIDR + 2)), (Some(private), None));
        assert_eq!(compiled.range(WORLD), None);
        assert!(compiled.ipcache.contains(&(v4_world, FIRST_CIDR)), "the IPv4 /0 is a range now, not world");
        assert!(!compiled.ipcache.contains(&(v4_world, WORLD)));
        assert!(compiled.ipcache.contains(&("::/0".parse().unwrap(), WORLD)));
        assert!(compiled.ipcache.contains(&(private, FIRST_CIDR + 1)));
        assert_eq!(compiled.range(FIRST_CIDR + 1), Some(private));
        assert_eq!(compiled.identities.name(FIRST_CIDR + 1), Some("world"));
        let peers = |rule_id: u32| -> BTreeSet<u32> {
            let deciding = compiled.policy.iter().filter(|block| block.runs.iter().any(|run| run.rule_id == rule_id));
            deciding.map(|block| block.key.peer).collect()
        };
        // The CIDR peer: the IPv4 range minus the private one.
        assert_eq!(peers(1), BTreeSet::from([FIRST_CIDR]));
        // `world`: every world address, whatever range it falls in (a deny, so that no allow of a
        // lower rule id hides its entries).
        assert_eq!(peers(2), BTreeSet::from([WORLD, FIRST_CIDR, FIRST_CIDR + 1]));
        let evaluator = super::super::eval::Evaluator::new(&compiled);
        assert_eq!(evaluator.identity("1.1.1.1".parse().unwrap()), FIRST_CIDR);
        assert_eq!(evaluator.identity("10.9.9.9".parse().unwrap()), FIRST_CIDR + 1);
        assert_eq!(evaluator.identity("10.20.2.200".parse().unwrap()), compiled.identities.id("api").unwrap());
        assert_eq!(evaluator.identity("2001:db8::1".parse().unwrap()), WORLD);
    }

    #[test]
    fn staged_policies_fill_only_the_staged_view() {
        let text = format!(
            "{IDENTITIES}---
apiVersion: zt/v1
kind: Policy
metadata: {{name: live}}
spec: {{subject: [web], egress: [{{to: [api], ports: [{{protocol: tcp, port: 443}}]}}]}}
---
apiVersion: zt/v1
kind: Policy
metadata: {{name: staged}}
spec: {{subject: [web], mode: monitor, egress: [{{to: [api], ports: [{{protocol: tcp, port: '440-447'}}], action: deny}}]}}
"
        );
        let compiled = compile(&parse_str(&text, "test.yaml").unwrap()).unwrap();
        let web = compiled.identities.id("web").unwrap();
        let flags = isolation::EGRESS | isolation::STAGED_EGRESS | isolation::STAGED_RULES;
        assert_eq!(compiled.isolation, vec![(web, flags)]);
        assert!(compiled.rule(2).unwrap().staged && !compiled.rule(1).unwrap().staged);
        // 443: allowed in force, denied staged; the rest of 440-447: nothing in force, denied staged.
        let blocks = compiled.policy.iter().flat_map(|block| block.runs.iter());
        let views: Vec<(u32, u32, u8, u32, u8, u32)> =
            blocks.map(|r| (r.first, r.last, r.action, r.rule_id, r.staged_action, r.staged_rule_id)).collect();
        assert_eq!(
            views,
            vec![
                (point(TCP, 440), point(TCP, 442), action::NONE, 0, DENY, 2),
                (point(TCP, 443), point(TCP, 443), ALLOW, 1, DENY, 2),
                (point(TCP, 444), point(TCP, 447), action::NONE, 0, DENY, 2)
            ]
        );
    }

    #[test]
    fn ipcache_keys_map_ipv4_into_ipv6() {
        let v4: IpNet = "10.20.3.0/24".parse().unwrap();
        let mut expected = [0u8; 16];
        expected[10..].copy_from_slice(&[0xff, 0xff, 10, 20, 3, 0]);
        assert_eq!(ipcache_prefix(&v4), (120, expected));
        let v6: IpNet = "fd00:20:3::/64".parse().unwrap();
        assert_eq!(ipcache_prefix(&v6), (64, "fd00:20:3::".parse::<Ipv6Addr>().unwrap().octets()));
        assert_eq!(ip_key("10.20.3.7".parse().unwrap())[12..], [10, 20, 3, 7]);
        assert_eq!(ipcache_prefix(&"0.0.0.0/0".parse().unwrap()).0, 96);
    }

    #[test]
    fn pods_selectors_expand_into_the_cluster_label_sets() {
        use crate::{
            identity::pods::PodIdentity,
            policy::eval::{Evaluator, Flow},
        };
        use zt_common::{Reason, Verdict};

        let text = format!(
            "{IDENTITIES}---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: api}}\nspec:\n\
             \x20 subject: [{{pods: {{namespace: shop, matchLabels: {{app: api}}}}}}]\n\
             \x20 ingress: [{{from: [{{pods: {{namespace: shop, matchLabels: {{app: web}}}}}}, web], ports: [{{protocol: tcp, port: 8080}}]}}]\n"
        );
        let set = parse_str(&text, "test.yaml").unwrap();
        let pod = |ns: &str, app: &str| PodIdentity::of(ns, "default", &[("app".to_owned(), app.to_owned())].into()).unwrap();
        let cluster = Cluster {
            identities: [pod("shop", "web"), pod("shop", "api"), pod("dev", "web")].map(|pod| (pod, Default::default())).into(),
            namespaces: Default::default(),
        };
        let without = compile(&set).unwrap();
        let compiled = compile_for(&set, &cluster).unwrap();
        assert_eq!(without.identities.id("web"), compiled.identities.id("web"), "declared numbers do not move");
        assert_eq!(compiled.identities.len(), 5);
        assert!(without.policy.is_empty(), "without pods the selectors select nothing");
        let id = |name: &str| compiled.identities.id(name).unwrap();
        let api = id("k8s:shop:default:app=api");
        assert_eq!(compiled.isolation, [(api, isolation::INGRESS | isolation::INGRESS << isolation::STAGED_SHIFT)]);

        // The source binds pods' addresses; here, by hand.
        let bound = [("10.30.0.1", "k8s:shop:default:app=web"), ("10.30.0.2", "k8s:shop:default:app=api"), ("10.30.0.3", "k8s:dev:default:app=web")];
        let mut with_pods = compiled.clone();
        with_pods.ipcache.extend(bound.iter().map(|(addr, name)| (IpNet::from(addr.parse::<IpAddr>().unwrap()), id(name))));
        let evaluator = Evaluator::new(&with_pods);
        let judge = |src: &str, dst: &str, port| {
            let flow = Flow { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol: TCP, dst_port: port };
            let decision = evaluator.evaluate(&flow);
            (decision.verdict, decision.reason)
        };
        assert_eq!(judge("10.30.0.1", "10.30.0.2", 8080), (Verdict::Allow, Reason::PolicyAllow), "shop's web to shop's api");
        assert_eq!(judge("10.20.1.9", "10.30.0.2", 8080), (Verdict::Allow, Reason::PolicyAllow), "a declared identity beside pods");
        assert_eq!(judge("10.30.0.3", "10.30.0.2", 8080), (Verdict::Deny, Reason::DefaultDeny), "dev's web is another label set");
        assert_eq!(judge("10.30.0.1", "10.30.0.2", 9090), (Verdict::Deny, Reason::DefaultDeny), "another port");
        assert_eq!(judge("10.30.0.2", "10.30.0.1", 8080), (Verdict::Allow, Reason::NotIsolated), "web is not isolated");
    }

    #[test]
    fn named_ports_resolve_against_each_destination_pod() {
        use crate::{
            identity::pods::{NamedPorts, PodIdentity},
            policy::eval::{Evaluator, Flow},
        };
        use zt_common::Verdict;

        let text = format!(
            "{IDENTITIES}---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: shop}}\nspec:\n\
             \x20 subject: [{{pods: {{namespace: shop}}}}, web]\n\
             \x20 ingress: [{{from: [any], ports: [{{protocol: tcp, port: http}}, {{protocol: udp, port: dns}}]}}]\n\
             \x20 egress: [{{to: [any], ports: [{{protocol: tcp, port: http}}]}}]\n"
        );
        let set = parse_str(&text, "test.yaml").unwrap();
        let pod = |app: &str| PodIdentity::of("shop", "default", &[("app".to_owned(), app.to_owned())].into()).unwrap();
        let ports = |named: &[(&str, u8, u16)]| -> NamedPorts {
            let mut ports = NamedPorts::new();
            for (name, protocol, port) in named {
                ports.entry(name.to_string()).or_default().insert((*protocol, *port));
            }
            ports
        };
        let cluster = |api_http: u16| Cluster {
            identities: [
                (pod("web"), ports(&[("http", TCP, 8080), ("dns", TCP, 53)])),
                (pod("api"), ports(&[("http", TCP, api_http)])),
                (pod("batch"), ports(&[])),
            ]
            .into(),
            namespaces: Default::default(),
        };
        let compiled = compile_for(&set, &cluster(9090)).unwrap();
        let id = |name: &str| compiled.identities.id(name).unwrap();
        let bound = [("10.30.0.1", "k8s:shop:default:app=web"), ("10.30.0.2", "k8s:shop:default:app=api"), ("10.30.0.3", "k8s:shop:default:app=batch")];
        let mut with_pods = compiled.clone();
        with_pods.ipcache.extend(bound.iter().map(|(addr, name)| (IpNet::from(addr.parse::<IpAddr>().unwrap()), id(name))));
        let evaluator = Evaluator::new(&with_pods);
        let allowed = |src: &str, dst: &str, protocol, port| {
            let flow = Flow { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol, dst_port: port };
            evaluator.evaluate(&flow).verdict == Verdict::Allow
        };
        // From world, which is never isolated, so only the destination's ingress decides: each
        // pod's own number for the name, and only that (web's http is 8080, api's 9090).
        assert!(allowed("1.1.1.1", "10.30.0.1", TCP, 8080) && !allowed("1.1.1.1", "10.30.0.1", TCP, 9090));
        assert!(allowed("1.1.1.1", "10.30.0.2", TCP, 9090) && !allowed("1.1.1.1", "10.30.0.2", TCP, 8080));
        // The protocol is part of the name: web's dns is TCP, the rule's UDP.
        assert!(!allowed("1.1.1.1", "10.30.0.1", proto::UDP, 53) && !allowed("1.1.1.1", "10.30.0.1", TCP, 53));
        // A pod without the name, a declared identity, world: nothing to resolve, nothing matches.
        assert!(!allowed("1.1.1.1", "10.30.0.3", TCP, 8080), "batch names no port");
        assert!(!allowed("1.1.1.1", "10.20.1.5", TCP, 8080), "web the declared identity has no container ports");
        assert!(!allowed("10.30.0.3", "1.1.1.1", TCP, 8080), "egress to world: no pod, no name");
        // Egress to any: the destination pod's number.
        assert!(allowed("10.30.0.3", "10.30.0.1", TCP, 8080) && !allowed("10.30.0.3", "10.30.0.1", TCP, 9090));
        assert!(allowed("10.20.1.5", "10.30.0.2", TCP, 9090) && !allowed("10.20.1.5", "10.30.0.2", TCP, 8080));

        // Only numbers reach the kernel, one entry per resolved (subject, peer, port).
        let ingress_ports = |compiled: &Compiled, subject: u32| -> Vec<u16> {
            let blocks = compiled.policy.iter().filter(|b| b.key.subject == subject && b.key.direction == Direction::Ingress as u8);
            let runs = blocks.flat_map(|block| block.runs.iter());
            runs.map(|run| run.first as u16).collect()
        };
        assert_eq!(ingress_ports(&compiled, id("k8s:shop:default:app=api")), [9090]);
        // Another number under the name is another compile: a reload changes the entries.
        let moved = compile_for(&set, &cluster(9091)).unwrap();
        assert_ne!(moved, compiled);
        assert_eq!(ingress_ports(&moved, id("k8s:shop:default:app=api")), [9091]);
        assert_eq!(compile_for(&set, &cluster(9090)).unwrap(), compiled);
    }
}
