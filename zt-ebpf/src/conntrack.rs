//! Connection tracking: an LRU hash with one entry per direction of an admitted flow, so replies
//! and established packets pass without a policy lookup.

use zt_common::{ct, mode, proto, CtKey, CtValue};

use crate::{maps::ZT_CONNTRACK, parse::{icmp_reply_type, Packet}};

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

#[inline(always)]
fn reverse_key(pkt: &Packet) -> CtKey {
    let (src_port, dst_port) = match pkt.protocol {
        // The echo identifier stays in place; only the matching reply type is admitted.
        proto::ICMP | proto::ICMPV6 => (pkt.src_port, icmp_reply_type(pkt.dst_port)),
        _ => (pkt.dst_port, pkt.src_port),
    };
    CtKey {
        src: pkt.dst,
        dst: pkt.src,
        src_port,
        dst_port,
        protocol: pkt.protocol,
        _pad: [0; 3],
    }
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

/// Records an admitted flow in both directions.
#[inline(always)]
pub fn admit(pkt: &Packet, rule_id: u32, generation: u32, flags: u32, now: u64) {
    let value = CtValue { last_seen_ns: now, rule_id, generation, flags, _pad: 0 };
    // A full LRU evicts; an insert failure only costs a policy lookup on the next packet.
    let _ = ZT_CONNTRACK.insert(forward_key(pkt), value, 0);
    let _ = ZT_CONNTRACK.insert(reverse_key(pkt), value, 0);
}
