//! Identification and policy: a bounded number of O(1) lookups whatever the number of rules.
//!
//! The flow src → dst needs the consent of both ends: the source's egress rules if the source is
//! egress-isolated, the destination's ingress rules if it is ingress-isolated. Each check
//! consults four groups — (subject, peer), (subject, any), (any, peer), (any, any) — each with
//! exact-match lookups of its blocks (`zt_common::policy_tree`, one lookup unless the group has
//! many ports), and an explicit deny
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
/// the run: a pointer would carry its offset in the block into the verifier's states, which
/// then could not be pruned across groups.
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

/// One end's check in one view (`STAGED`: the staged view's fields of each run). `isolated`:
/// the end is isolated for `direction` in that view. Every group is probed: skipping those no
/// rule names would save lookups but multiply the verifier's paths (a load took 4 s instead of
/// 2.6). `key` holds the slot; every check rewrites the rest of it in place, because the stack
/// has room for one key.
#[inline(always)]
fn check<const STAGED: bool>(
    key: &mut PolicyKey,
    point: u32,
    (subject, peer): (u32, u32),
    direction: Direction,
    isolated: bool,
) -> Check {
    let mut found = Found::NOTHING;
    if isolated {
        key.direction = direction as u8;
        for (s, p) in [
            (subject, peer),
            (subject, identity::ANY),
            (identity::ANY, peer),
            (identity::ANY, identity::ANY),
        ] {
            key.subject = s;
            key.peer = p;
            let (action, rule) = rule_of::<STAGED>(key, point);
            found.note(action, rule);
        }
    }
    found.check(isolated)
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

/// Both ends must consent; an explicit deny is reported before a default deny, and when both
/// ends allow, the destination's rule is named.
#[inline(always)]
fn verdict(egress: Check, ingress: Check) -> Decision {
    let (allow, reason, direction, rule_id) = if egress.outcome == DENIES {
        (false, Reason::PolicyDeny, Direction::Egress, egress.rule)
    } else if ingress.outcome == DENIES {
        (false, Reason::PolicyDeny, Direction::Ingress, ingress.rule)
    } else if egress.outcome == DEFAULT_DENY {
        (false, Reason::DefaultDeny, Direction::Egress, NO_RULE)
    } else if ingress.outcome == DEFAULT_DENY {
        (false, Reason::DefaultDeny, Direction::Ingress, NO_RULE)
    } else if ingress.outcome == ALLOWS {
        (true, Reason::PolicyAllow, Direction::Ingress, ingress.rule)
    } else if egress.outcome == ALLOWS {
        (true, Reason::PolicyAllow, Direction::Egress, egress.rule)
    } else {
        (true, Reason::NotIsolated, Direction::None, NO_RULE)
    };
    Decision { allow, staged: false, reason, direction, rule_id }
}

/// The enforced view decides; where it allows and a staged policy concerns either end, the
/// staged view is judged too (a second, separate pass: the verifier then adds the two passes'
/// paths instead of multiplying them).
#[inline(always)]
pub fn decide(slot: u32, src_id: u32, dst_id: u32, protocol: u8, port: u16) -> Decision {
    let src_flags = isolation_of(slot, src_id);
    let dst_flags = isolation_of(slot, dst_id);
    let point = policy_point(protocol, port);
    let mut key = PolicyKey::new(slot, identity::ANY, identity::ANY, Direction::None, 0, 0);
    let (egress, ingress) = ((src_id, dst_id), (dst_id, src_id));
    let enforced = verdict(
        check::<false>(&mut key, point, egress, Direction::Egress, src_flags & isolation::EGRESS != 0),
        check::<false>(&mut key, point, ingress, Direction::Ingress, dst_flags & isolation::INGRESS != 0),
    );
    if !enforced.allow || (src_flags | dst_flags) & isolation::STAGED_RULES == 0 {
        return enforced;
    }
    let staged = verdict(
        check::<true>(&mut key, point, egress, Direction::Egress, src_flags & isolation::STAGED_EGRESS != 0),
        check::<true>(&mut key, point, ingress, Direction::Ingress, dst_flags & isolation::STAGED_INGRESS != 0),
    );
    if staged.allow {
        enforced
    } else {
        Decision { allow: true, staged: true, ..staged }
    }
}
