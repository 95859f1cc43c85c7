//! Connection tracking: an LRU hash with one entry per direction of an admitted flow, so replies
//! and established packets pass without a policy lookup — as long as the entry's generation is
//! the one in force. An entry of another generation makes the caller judge the flow again.

use zt_common::{ct, mode, proto, CtKey, CtValue};

use crate::{
    maps::ZT_CONNTRACK,
    parse::{Packet, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST},
};

/// The key of `pkt`'s own direction. The pipeline keeps one key on its stack (which has room
/// for few) and every function here rewrites it in place.
#[inline(always)]
pub fn key_of(pkt: &Packet) -> CtKey {
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
fn forward(key: &mut CtKey, pkt: &Packet) {
    key.src = pkt.src;
    key.dst = pkt.dst;
    key.src_port = pkt.src_port;
    key.dst_port = pkt.dst_port;
}

/// The ports of the entry that admits the replies of `pkt`'s flow (its addresses are swapped).
/// ICMP has replies only for echo requests; the reply keeps the identifier and carries the
/// echo-reply type.
#[inline(always)]
fn reply_ports(pkt: &Packet) -> Option<(u16, u16)> {
    match (pkt.protocol, pkt.dst_port as u8) {
        (proto::ICMP, ICMP_ECHO_REQUEST) => Some((pkt.src_port, ICMP_ECHO_REPLY as u16)),
        (proto::ICMPV6, ICMPV6_ECHO_REQUEST) => Some((pkt.src_port, ICMPV6_ECHO_REPLY as u16)),
        (proto::ICMP | proto::ICMPV6, _) => None,
        _ => Some((pkt.dst_port, pkt.src_port)),
    }
}

/// The ports of the forward entry of the flow whose reply `pkt` is, `port` being the flow's
/// destination port (ICMP: the echo request type). The inverse of [`reply_ports`].
#[inline(always)]
fn original_ports(pkt: &Packet, port: u16) -> (u16, u16) {
    // ICMP keys keep the echo identifier in both directions.
    let src_port = if matches!(pkt.protocol, proto::ICMP | proto::ICMPV6) { pkt.src_port } else { pkt.dst_port };
    (src_port, port)
}

/// Turns `key` into the other direction's key of `pkt`'s flow.
#[inline(always)]
fn reverse(key: &mut CtKey, pkt: &Packet, (src_port, dst_port): (u16, u16)) {
    key.src = pkt.dst;
    key.dst = pkt.src;
    key.src_port = src_port;
    key.dst_port = dst_port;
}

/// The live entry `pkt` belongs to (either direction of an admitted flow), whatever its
/// generation: not idle past its timeout, and not a monitor-mode admission while the node
/// enforces (such a flow is judged again once the node enforces).
#[inline(always)]
pub fn lookup(key: &CtKey, pkt: &Packet, node_mode: u32, now: u64) -> Option<&'static mut CtValue> {
    let entry = unsafe { &mut *ZT_CONNTRACK.get_ptr_mut(key)? };
    let timeout = if pkt.protocol == proto::TCP { ct::TCP_TIMEOUT_NS } else { ct::OTHER_TIMEOUT_NS };
    if now.saturating_sub(entry.last_seen_ns) > timeout {
        return None;
    }
    if entry.flags & ct::AUDIT != 0 && node_mode == mode::ENFORCE {
        return None;
    }
    Some(entry)
}

/// Records an admitted flow, and the direction its replies take; false if the table refused
/// either entry. (A full LRU evicts its least recently used entries instead: an evicted flow's
/// next packet is judged again as new.) `checked_on`: the interface whose source check `pkt`
/// passed, or 0.
#[inline(always)]
pub fn admit(key: &mut CtKey, pkt: &Packet, rule_id: u32, generation: u32, flags: u32, now: u64, checked_on: u32) -> bool {
    let mut value =
        CtValue { last_seen_ns: now, rule_id, generation, flags, ifindex: checked_on, port: pkt.dst_port, _pad: [0; 6] };
    forward(key, pkt);
    if ZT_CONNTRACK.insert(&*key, &value, 0).is_err() {
        return false;
    }
    if let Some(ports) = reply_ports(pkt) {
        reverse(key, pkt, ports);
        value.flags |= ct::REPLY;
        // The replies' source is checked where they first arrive.
        value.ifindex = 0;
        if ZT_CONNTRACK.insert(&*key, &value, 0).is_err() {
            return false;
        }
    }
    true
}

/// Removes the entry `pkt` belongs to and the other direction's: the reply entry of a forward
/// entry, the forward entry of a reply entry. `flags` and `port` are the entry's.
#[inline(always)]
pub fn forget(key: &mut CtKey, pkt: &Packet, flags: u32, port: u16) {
    forward(key, pkt);
    let _ = ZT_CONNTRACK.remove(&*key);
    let other = if flags & ct::REPLY != 0 { Some(original_ports(pkt, port)) } else { reply_ports(pkt) };
    if let Some(ports) = other {
        reverse(key, pkt, ports);
        let _ = ZT_CONNTRACK.remove(&*key);
    }
}
