//! Connection tracking: an LRU hash with one entry per direction of an admitted flow, so replies
//! and established packets pass without a policy lookup.

use zt_common::{ct, mode, proto, CtKey, CtValue};

use crate::{
    maps::ZT_CONNTRACK,
    parse::{Packet, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST},
};

#[inline(always)]
fn forward_key(pkt: &Packet) -> CtKey {
    CtKey {
        src: pkt.src,
        dst: pkt.dst,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        protocol: pkt.protocol,
        _pad: [0; 3],
    }
}

/// The entry that admits the replies of `pkt`'s flow. ICMP has replies only for echo requests;
/// the reply keeps the identifier and carries the echo-reply type.
#[inline(always)]
fn reverse_key(pkt: &Packet) -> Option<CtKey> {
    let (src_port, dst_port) = match (pkt.protocol, pkt.dst_port as u8) {
        (proto::ICMP, ICMP_ECHO_REQUEST) => (pkt.src_port, ICMP_ECHO_REPLY as u16),
        (proto::ICMPV6, ICMPV6_ECHO_REQUEST) => (pkt.src_port, ICMPV6_ECHO_REPLY as u16),
        (proto::ICMP | proto::ICMPV6, _) => return None,
        _ => (pkt.dst_port, pkt.src_port),
    };
    Some(CtKey { src: pkt.dst, dst: pkt.src, src_port, dst_port, protocol: pkt.protocol, _pad: [0; 3] })
}

/// True when the packet belongs to a live flow that may pass in the current mode.
#[inline(always)]
pub fn established(pkt: &Packet, node_mode: u32, now: u64) -> bool {
    let Some(entry) = ZT_CONNTRACK.get_ptr_mut(forward_key(pkt)) else {
        return false;
    };
    let entry = unsafe { &mut *entry };
    let timeout = if pkt.protocol == proto::TCP { ct::TCP_TIMEOUT_NS } else { ct::OTHER_TIMEOUT_NS };
    if now.saturating_sub(entry.last_seen_ns) > timeout {
        return false;
    }
    // A flow let through only because of monitor mode is judged again once the node enforces.
    if entry.flags & ct::AUDIT != 0 && node_mode == mode::ENFORCE {
        return false;
    }
    entry.last_seen_ns = now;
    true
}

/// Records an admitted flow, and the direction its replies take.
#[inline(always)]
pub fn admit(pkt: &Packet, rule_id: u32, generation: u32, flags: u32, now: u64) {
    let value = CtValue { last_seen_ns: now, rule_id, generation, flags, _pad: 0 };
    // A full LRU evicts; an insert failure only costs a policy lookup on the next packet.
    let _ = ZT_CONNTRACK.insert(forward_key(pkt), value, 0);
    if let Some(reverse) = reverse_key(pkt) {
        let _ = ZT_CONNTRACK.insert(reverse, value, 0);
    }
}
