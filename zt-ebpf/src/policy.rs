//! Identification and policy: a bounded number of O(1) lookups whatever the number of rules.
//!
//! The flow src → dst needs the consent of both ends: the source's egress rules if the source is
//! egress-isolated, the destination's ingress rules if it is ingress-isolated. Each check is four
//! longest-prefix lookups — (subject, peer), (subject, any), (any, peer), (any, any) — and an
//! explicit deny anywhere beats every allow. The agent's reference evaluator mirrors this file.
//!
//! Every address, policy and isolation lookup is made in the slot of the generation in force
//! (`Config::slot`), which the caller read once for the packet.

use aya_ebpf::maps::lpm_trie::Key;
use zt_common::{
    action, event_flags, identity, isolation, Direction, Hook, IsolationKey, PolicyKey, Reason, Slotted, NO_RULE, SLOT_BITS,
};

use crate::{
    maps::{ZT_CGROUPS, ZT_INTERFACES, ZT_IPCACHE, ZT_ISOLATION, ZT_POLICY},
    parse::Packet,
};

const IP_BITS: u32 = 128;

#[inline(always)]
fn by_address(slot: u32, addr: &zt_common::IpKey) -> u32 {
    match ZT_IPCACHE.get(Key::new(SLOT_BITS + IP_BITS, Slotted::new(slot, *addr))) {
        Some(id) => *id,
        None => identity::UNKNOWN,
    }
}

/// Where a packet is judged, and what that hook knows about its local end.
#[derive(Clone, Copy)]
pub struct At {
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

/// The local end is identified by its cgroup (a process) or its interface (a workload) where
/// the hook knows them and the agent mapped them; every other end by its address.
#[inline(always)]
pub fn identify(slot: u32, pkt: &Packet, at: At) -> Ends {
    let local = match at.hook {
        Hook::TcIngress => unsafe { ZT_INTERFACES.get(at.ifindex) }.map(|id| (*id, event_flags::SRC_INTERFACE)),
        Hook::TcEgress => unsafe { ZT_INTERFACES.get(at.ifindex) }.map(|id| (*id, event_flags::DST_INTERFACE)),
        Hook::CgroupEgress => unsafe { ZT_CGROUPS.get(at.cgroup_id) }.map(|id| (*id, event_flags::SRC_CGROUP)),
        Hook::CgroupIngress => unsafe { ZT_CGROUPS.get(at.cgroup_id) }.map(|id| (*id, event_flags::DST_CGROUP)),
        Hook::Xdp => None,
    };
    match local {
        Some((id, flag @ (event_flags::SRC_INTERFACE | event_flags::SRC_CGROUP))) => {
            Ends { src: id, dst: by_address(slot, &pkt.dst), flags: flag }
        }
        Some((id, flag)) => Ends { src: by_address(slot, &pkt.src), dst: id, flags: flag },
        None => Ends { src: by_address(slot, &pkt.src), dst: by_address(slot, &pkt.dst), flags: 0 },
    }
}

#[inline(always)]
fn isolation_of(slot: u32, id: u32) -> u32 {
    let own = unsafe { ZT_ISOLATION.get(IsolationKey { slot, identity: id }) }.copied().unwrap_or(0);
    if id >= identity::FIRST_USER {
        own | unsafe { ZT_ISOLATION.get(IsolationKey { slot, identity: identity::ANY }) }.copied().unwrap_or(0)
    } else {
        own
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    NotIsolated,
    Allow(u32),
    Deny(u32),
    DefaultDeny,
}

#[inline(always)]
fn lookup(slot: u32, subject: u32, peer: u32, direction: Direction, protocol: u8, port: u16) -> Option<(u8, u32)> {
    let key = Key::new(
        SLOT_BITS + PolicyKey::FULL_BITS,
        Slotted::new(slot, PolicyKey::new(subject, peer, direction, protocol, port)),
    );
    ZT_POLICY.get(key).map(|v| (v.action, v.rule_id))
}

#[inline(always)]
fn check(slot: u32, subject: u32, peer: u32, direction: Direction, protocol: u8, port: u16) -> Check {
    let mut allow = NO_RULE;
    for (s, p) in [
        (subject, peer),
        (subject, identity::ANY),
        (identity::ANY, peer),
        (identity::ANY, identity::ANY),
    ] {
        match lookup(slot, s, p, direction, protocol, port) {
            Some((action::DENY, rule)) => return Check::Deny(rule),
            Some((_, rule)) if allow == NO_RULE => allow = rule,
            _ => {}
        }
    }
    if allow == NO_RULE {
        Check::DefaultDeny
    } else {
        Check::Allow(allow)
    }
}

pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    pub direction: Direction,
    pub rule_id: u32,
}

#[inline(always)]
pub fn decide(slot: u32, src_id: u32, dst_id: u32, protocol: u8, port: u16) -> Decision {
    let egress = if isolation_of(slot, src_id) & isolation::EGRESS != 0 {
        check(slot, src_id, dst_id, Direction::Egress, protocol, port)
    } else {
        Check::NotIsolated
    };
    let ingress = if isolation_of(slot, dst_id) & isolation::INGRESS != 0 {
        check(slot, dst_id, src_id, Direction::Ingress, protocol, port)
    } else {
        Check::NotIsolated
    };
    let deny = |reason, direction, rule_id| Decision { allow: false, reason, direction, rule_id };
    let allow = |reason, direction, rule_id| Decision { allow: true, reason, direction, rule_id };
    match (egress, ingress) {
        (Check::Deny(rule), _) => deny(Reason::PolicyDeny, Direction::Egress, rule),
        (_, Check::Deny(rule)) => deny(Reason::PolicyDeny, Direction::Ingress, rule),
        (Check::DefaultDeny, _) => deny(Reason::DefaultDeny, Direction::Egress, NO_RULE),
        (_, Check::DefaultDeny) => deny(Reason::DefaultDeny, Direction::Ingress, NO_RULE),
        (_, Check::Allow(rule)) => allow(Reason::PolicyAllow, Direction::Ingress, rule),
        (Check::Allow(rule), _) => allow(Reason::PolicyAllow, Direction::Egress, rule),
        _ => allow(Reason::NotIsolated, Direction::None, NO_RULE),
    }
}
