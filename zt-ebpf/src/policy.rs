//! Identification and policy: a bounded number of O(1) lookups whatever the number of rules.
//!
//! The flow src → dst needs the consent of both ends: the source's egress rules if the source is
//! egress-isolated, the destination's ingress rules if it is ingress-isolated. Each check
//! consults up to four groups — (subject, peer), (subject, any), (any, peer), (any, any) — only
//! those the ends' wildcard flags say exist, each with exact-match lookups of its blocks
//! (`zt_common::policy_tree`, one lookup unless the group has many ports), and an explicit deny
//! anywhere beats every allow. The same lookups answer for the enforced and the staged view
//! (`zt_common::isolation`). The agent's reference evaluator mirrors this file.
//!
//! Every address, policy and isolation lookup is made in the slot of the generation in force
//! (`Config::slot`), which the caller read once for the packet.

use aya_ebpf::maps::lpm_trie::Key;
use zt_common::{
    action, event_flags, identity, isolation, policy_point, policy_tree, Direction, Hook, IsolationKey, PolicyKey,
    Reason, Slotted, NO_RULE, SLOT_BITS,
};

use crate::{
    maps::{ZT_CGROUPS, ZT_HOSTS, ZT_INTERFACES, ZT_IPCACHE, ZT_ISOLATION, ZT_POLICY},
    parse::Packet,
};

const IP_BITS: u32 = 128;

/// The ipcache's longest match: an address entry if there is one, else the longest prefix.
#[inline(always)]
pub fn by_address(slot: u32, addr: &zt_common::IpKey) -> u32 {
    let key = Slotted::new(slot, *addr);
    if let Some(id) = unsafe { ZT_HOSTS.get(&key) } {
        return *id;
    }
    match ZT_IPCACHE.get(Key::new(SLOT_BITS + IP_BITS, key)) {
        Some(id) => *id,
        None => identity::UNKNOWN,
    }
}

/// Where a packet is judged, and what that hook knows about its local end.
#[derive(Clone, Copy)]
pub struct At {
    /// The program's context, for helpers that take it.
    pub ctx: *mut core::ffi::c_void,
    pub hook: Hook,
    pub ifindex: u32,
    /// The local socket's cgroup on cgroup hooks, else 0.
    pub cgroup_id: u64,
}

pub struct Ends {
    pub src: u32,
    pub dst: u32,
    /// `event_flags`: which end was identified by cgroup or interface instead of address.
    pub flags: u8,
}

/// The identity an interface is bound to, if any.
#[inline(always)]
fn bound_interface(ifindex: u32) -> Option<u32> {
    let info = unsafe { ZT_INTERFACES.get(ifindex) }?;
    if info.identity == identity::ANY { None } else { Some(info.identity) }
}

/// The local end is identified by its cgroup (a process) or its interface (a workload) where
/// the hook knows them and the agent mapped them; every other end by its address.
#[inline(always)]
pub fn identify(slot: u32, pkt: &Packet, at: At) -> Ends {
    let local = match at.hook {
        Hook::TcIngress => bound_interface(at.ifindex).map(|id| (id, event_flags::SRC_INTERFACE)),
        Hook::TcEgress => bound_interface(at.ifindex).map(|id| (id, event_flags::DST_INTERFACE)),
        Hook::CgroupEgress => unsafe { ZT_CGROUPS.get(at.cgroup_id) }.map(|id| (*id, event_flags::SRC_CGROUP)),
        Hook::CgroupIngress => unsafe { ZT_CGROUPS.get(at.cgroup_id) }.map(|id| (*id, event_flags::DST_CGROUP)),
        Hook::Xdp => None,
    };
    // The end the hook does not know is found by its address: one lookup site, not one per case.
    let (local_id, flags, local_is_src) = match local {
        Some((id, flag)) => (id, flag, flag & (event_flags::SRC_INTERFACE | event_flags::SRC_CGROUP) != 0),
        None => (identity::UNKNOWN, 0, false),
    };
    let src = if local.is_some() && local_is_src { local_id } else { by_address(slot, &pkt.src) };
    let dst = if local.is_some() && !local_is_src { local_id } else { by_address(slot, &pkt.dst) };
    Ends { src, dst, flags }
}

#[inline(always)]
fn isolation_of(slot: u32, id: u32) -> u32 {
    let own = unsafe { ZT_ISOLATION.get(IsolationKey { slot, identity: id }) }.copied().unwrap_or(0);
    if identity::is_declared(id) {
        own | unsafe { ZT_ISOLATION.get(IsolationKey { slot, identity: identity::ANY }) }.copied().unwrap_or(0)
    } else {
        own
    }
}

/// One end's outcome in one view. A plain struct, every field always written: the verifier
/// rejects the undefined payload bytes an enum would carry between its variants.
#[derive(Clone, Copy)]
struct Check {
    outcome: u8,
    /// The deciding rule, or `NO_RULE`.
    rule: u32,
}

const NOT_ISOLATED: u8 = 0;
const ALLOWS: u8 = 1;
const DENIES: u8 = 2;
const DEFAULT_DENY: u8 = 3;

/// The first deny and the first allow one view's lookups found.
#[derive(Clone, Copy)]
struct Found {
    deny: u32,
    allow: u32,
}

impl Found {
    const NOTHING: Found = Found { deny: NO_RULE, allow: NO_RULE };

    #[inline(always)]
    fn note(&mut self, action: u8, rule: u32) {
        if action == action::DENY && self.deny == NO_RULE {
            self.deny = rule;
        } else if action == action::ALLOW && self.allow == NO_RULE {
            self.allow = rule;
        }
    }

    /// An explicit deny anywhere beats every allow; no rule at all is a default deny.
    #[inline(always)]
    fn check(self, isolated: bool) -> Check {
        if !isolated {
            Check { outcome: NOT_ISOLATED, rule: NO_RULE }
        } else if self.deny != NO_RULE {
            Check { outcome: DENIES, rule: self.deny }
        } else if self.allow != NO_RULE {
            Check { outcome: ALLOWS, rule: self.allow }
        } else {
            Check { outcome: DEFAULT_DENY, rule: NO_RULE }
        }
    }
}

/// The rule of one group at `point`, in one view (`STAGED`), or `(action::NONE, NO_RULE)`: its
/// blocks from the whole space down, until one that is not split. Scalars, not a pointer to
/// the run: a pointer would carry its offset in the block into the verifier's states.
#[inline(always)]
fn rule_of<const STAGED: bool>(key: &mut PolicyKey, point: u32) -> (u8, u32) {
    for level in 0..policy_tree::LEVELS {
        key.level = level as u8;
        key.block = point >> policy_tree::SHIFTS[level];
        let Some(value) = (unsafe { ZT_POLICY.get(&*key) }) else { break };
        if value.split == 0 {
            return match value.run_at(point) {
                Some(run) if STAGED => (run.staged_action, run.staged_rule_id),
                Some(run) => (run.action, run.rule_id),
                None => (action::NONE, NO_RULE),
            };
        }
    }
    (action::NONE, NO_RULE)
}

/// What [`zt_group_rule`] is asked: the slot, the direction and the view, in one argument.
#[inline(always)]
const fn group_query(slot: u32, direction: Direction, staged: bool) -> u32 {
    slot & 0xff | (direction as u32) << 8 | (staged as u32) << 16
}

/// [`rule_of`] for one group, as `action << 32 | rule`. A global function (BTF linkage global,
/// scalar arguments and result): the verifier checks its body once, on its own, instead of
/// once for every path that reaches each of its sixteen call sites.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn zt_group_rule(query: u32, subject: u32, peer: u32, point: u32) -> u64 {
    let mut key = PolicyKey {
        subject,
        peer,
        block: 0,
        slot: query as u8,
        direction: (query >> 8) as u8,
        level: 0,
        _pad: 0,
    };
    let (action, rule) =
        if query >> 16 & 1 != 0 { rule_of::<true>(&mut key, point) } else { rule_of::<false>(&mut key, point) };
    (action as u64) << 32 | rule as u64
}

/// Which of a check's groups exist, from the two ends' flags (`zt_common::isolation`): bit `i`
/// for the `i`th group of [`check`].
#[inline(always)]
fn groups(subject_flags: u32, peer_flags: u32, direction: Direction) -> u32 {
    let has = |flags: u32, flag: u32| (flags & isolation::of(flag, direction) != 0) as u32;
    1 | has(subject_flags, isolation::ANY_PEER) << 1
        | has(peer_flags, isolation::PEER_OF_ANY) << 2
        | has(subject_flags, isolation::ANY_ANY) << 3
}

/// One end's check in one view (`STAGED`: the staged view's fields of each run). `isolated`:
/// the end is isolated for `direction` in that view; `groups`: which groups to probe.
#[inline(always)]
fn check<const STAGED: bool>(
    slot: u32,
    point: u32,
    (subject, peer): (u32, u32),
    direction: Direction,
    isolated: bool,
    groups: u32,
) -> Check {
    let mut found = Found::NOTHING;
    if isolated {
        let query = group_query(slot, direction, STAGED);
        for (i, (s, p)) in [
            (subject, peer),
            (subject, identity::ANY),
            (identity::ANY, peer),
            (identity::ANY, identity::ANY),
        ]
        .into_iter()
        .enumerate()
        {
            if groups & 1 << i != 0 {
                let rule = zt_group_rule(query, s, p, point);
                found.note((rule >> 32) as u8, rule as u32);
            }
        }
    }
    found.check(isolated)
}

/// How a flow was decided: which end, and how. The seven cases of [`verdict`].
#[derive(Clone, Copy)]
#[repr(u8)]
enum Outcome {
    EgressDenies = 0,
    IngressDenies = 1,
    EgressDefaultDeny = 2,
    IngressDefaultDeny = 3,
    IngressAllows = 4,
    EgressAllows = 5,
    NotIsolated = 6,
}

impl Outcome {
    /// The inverse of `as u8`; anything else reads as a default deny.
    #[inline(always)]
    fn from_u8(code: u8) -> Self {
        match code {
            0 => Self::EgressDenies,
            1 => Self::IngressDenies,
            2 => Self::EgressDefaultDeny,
            4 => Self::IngressAllows,
            5 => Self::EgressAllows,
            6 => Self::NotIsolated,
            _ => Self::IngressDefaultDeny,
        }
    }

    #[inline(always)]
    fn allows(self) -> bool {
        matches!(self, Self::IngressAllows | Self::EgressAllows | Self::NotIsolated)
    }
}

/// Both ends must consent; an explicit deny is reported before a default deny, and when both
/// ends allow, the destination's rule is named.
#[inline(always)]
fn verdict(egress: Check, ingress: Check) -> (Outcome, u32) {
    if egress.outcome == DENIES {
        (Outcome::EgressDenies, egress.rule)
    } else if ingress.outcome == DENIES {
        (Outcome::IngressDenies, ingress.rule)
    } else if egress.outcome == DEFAULT_DENY {
        (Outcome::EgressDefaultDeny, NO_RULE)
    } else if ingress.outcome == DEFAULT_DENY {
        (Outcome::IngressDefaultDeny, NO_RULE)
    } else if ingress.outcome == ALLOWS {
        (Outcome::IngressAllows, ingress.rule)
    } else if egress.outcome == ALLOWS {
        (Outcome::EgressAllows, egress.rule)
    } else {
        (Outcome::NotIsolated, NO_RULE)
    }
}

/// [`decide`]'s result as a scalar: the rule in the low 32 bits, the outcome above it, and
/// whether the staged view's (an audit) above that.
#[inline(always)]
fn packed((outcome, rule): (Outcome, u32), staged: bool) -> u64 {
    rule as u64 | (outcome as u64) << 32 | (staged as u64) << 40
}

/// The enforced view decides; where it allows and a staged policy concerns either end, the
/// staged view is judged too, and where that denies, the staged view's outcome is returned
/// with the staged bit. A global function, as [`zt_group_rule`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn zt_decide(slot: u32, src_id: u32, dst_id: u32, point: u32) -> u64 {
    let src_flags = isolation_of(slot, src_id);
    let dst_flags = isolation_of(slot, dst_id);
    let (egress, ingress) = ((src_id, dst_id), (dst_id, src_id));
    let egress_groups = groups(src_flags, dst_flags, Direction::Egress);
    let ingress_groups = groups(dst_flags, src_flags, Direction::Ingress);
    let enforced = verdict(
        check::<false>(slot, point, egress, Direction::Egress, src_flags & isolation::EGRESS != 0, egress_groups),
        check::<false>(slot, point, ingress, Direction::Ingress, dst_flags & isolation::INGRESS != 0, ingress_groups),
    );
    if !enforced.0.allows() || (src_flags | dst_flags) & isolation::STAGED_RULES == 0 {
        return packed(enforced, false);
    }
    let staged = verdict(
        check::<true>(slot, point, egress, Direction::Egress, src_flags & isolation::STAGED_EGRESS != 0, egress_groups),
        check::<true>(slot, point, ingress, Direction::Ingress, dst_flags & isolation::STAGED_INGRESS != 0, ingress_groups),
    );
    if staged.0.allows() {
        packed(enforced, false)
    } else {
        packed(staged, true)
    }
}

pub struct Decision {
    pub allow: bool,
    /// The enforced view allows but the staged view denies: the packet passes, and reason,
    /// direction and rule are the staged view's (an audit).
    pub staged: bool,
    pub reason: Reason,
    pub direction: Direction,
    pub rule_id: u32,
}

/// The policy's decision on a new flow from `src_id` to `dst_id`.
#[inline(always)]
pub fn decide(slot: u32, src_id: u32, dst_id: u32, protocol: u8, port: u16) -> Decision {
    let packed = zt_decide(slot, src_id, dst_id, policy_point(protocol, port));
    let outcome = Outcome::from_u8((packed >> 32) as u8);
    let staged = (packed >> 40) & 1 != 0;
    let (reason, direction) = match outcome {
        Outcome::EgressDenies => (Reason::PolicyDeny, Direction::Egress),
        Outcome::IngressDenies => (Reason::PolicyDeny, Direction::Ingress),
        Outcome::EgressDefaultDeny => (Reason::DefaultDeny, Direction::Egress),
        Outcome::IngressDefaultDeny => (Reason::DefaultDeny, Direction::Ingress),
        Outcome::IngressAllows => (Reason::PolicyAllow, Direction::Ingress),
        Outcome::EgressAllows => (Reason::PolicyAllow, Direction::Egress),
        Outcome::NotIsolated => (Reason::NotIsolated, Direction::None),
    };
    Decision { allow: staged || outcome.allows(), staged, reason, direction, rule_id: packed as u32 }
}
