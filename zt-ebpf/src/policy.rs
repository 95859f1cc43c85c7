//! Identification and policy: a bounded number of O(1) lookups whatever the number of rules.
//!
//! The flow src → dst needs the consent of both ends: the source's egress rules if the source is
//! egress-isolated, the destination's ingress rules if it is ingress-isolated. Each check is four
//! longest-prefix lookups — (subject, peer), (subject, any), (any, peer), (any, any) — and an
//! explicit deny anywhere beats every allow. The agent's reference evaluator mirrors this file.

use aya_ebpf::maps::lpm_trie::Key;
use zt_common::{action, identity, isolation, Direction, PolicyKey, Reason, NO_RULE};

use crate::maps::{ZT_IPCACHE, ZT_ISOLATION, ZT_POLICY};

const IP_BITS: u32 = 128;

#[inline(always)]
pub fn identify(addr: &zt_common::IpKey) -> u32 {
    match ZT_IPCACHE.get(Key::new(IP_BITS, *addr)) {
        Some(id) => *id,
        None => identity::UNKNOWN,
    }
}

#[inline(always)]
fn isolation_of(id: u32) -> u32 {
    let own = unsafe { ZT_ISOLATION.get(id) }.copied().unwrap_or(0);
    if id >= identity::FIRST_USER {
        own | unsafe { ZT_ISOLATION.get(identity::ANY) }.copied().unwrap_or(0)
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
fn lookup(subject: u32, peer: u32, direction: Direction, protocol: u8, port: u16) -> Option<(u8, u32)> {
    let key = Key::new(PolicyKey::FULL_BITS, PolicyKey::new(subject, peer, direction, protocol, port));
    ZT_POLICY.get(key).map(|v| (v.action, v.rule_id))
}

#[inline(always)]
fn check(subject: u32, peer: u32, direction: Direction, protocol: u8, port: u16) -> Check {
    let mut allow = NO_RULE;
    for (s, p) in [
        (subject, peer),
        (subject, identity::ANY),
        (identity::ANY, peer),
        (identity::ANY, identity::ANY),
    ] {
        match lookup(s, p, direction, protocol, port) {
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
pub fn decide(src_id: u32, dst_id: u32, protocol: u8, port: u16) -> Decision {
    let egress = if isolation_of(src_id) & isolation::EGRESS != 0 {
        check(src_id, dst_id, Direction::Egress, protocol, port)
    } else {
        Check::NotIsolated
    };
    let ingress = if isolation_of(dst_id) & isolation::INGRESS != 0 {
        check(dst_id, src_id, Direction::Ingress, protocol, port)
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
