//! Connection tracking: an LRU hash with one entry per admitted flow, so replies and established
//! packets pass without a policy lookup — as long as the entry's generation is the one in
//! force. An entry of another generation makes the caller judge the flow again.
//!
//! A packet and its reply build the same key: it holds the flow's two ends in an order of their
//! own (`zt_common::ct::ends`), and the entry remembers how the first packet's ends sat in it,
//! which tells each later packet's direction. (Two pings between the same hosts, one each way
//! with one identifier, share a key: each replaces the other's entry, so their packets are
//! judged again as new flows, never passed on the other's admission.)

use zt_common::{
    ct::{self, Ends},
    mode, proto, CtKey, CtValue,
};

use crate::{maps::ZT_CONNTRACK, parse::Packet};

/// An address of the packet record as two u64 words. The record is an aligned per-CPU array
/// value and its addresses sit at offsets 0 and 16, so these are two aligned loads (the
/// portable `ct::words` would read byte by byte).
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u64; 2] {
    let at = addr.as_ptr() as *const u64;
    // SAFETY: 16 readable bytes, 8-aligned as said above.
    unsafe { [core::ptr::read(at), core::ptr::read(at.add(1))] }
}

/// The key of `pkt`'s flow, and how `pkt`'s ends sit in it. The pipeline keeps one key on its
/// stack (which has room for few) and passes it on.
#[inline(always)]
pub fn key_of(pkt: &Packet) -> (CtKey, Ends) {
    let ends = ct::ends(words(&pkt.src), words(&pkt.dst), pkt.src_port, pkt.dst_port, pkt.protocol);
    (CtKey::of(&pkt.src, &pkt.dst, pkt.src_port, pkt.dst_port, pkt.protocol, ends), ends)
}

/// A live entry and the direction of the packet that found it.
pub struct Flow {
    pub entry: &'static mut CtValue,
    /// The packet goes the other way than the flow's first packet did.
    pub reply: bool,
}

impl Flow {
    /// Index of the packet's direction in the entry's per-direction fields.
    #[inline(always)]
    pub fn direction(&self) -> usize {
        self.reply as usize
    }
}

/// Whether `pkt` is a reply of the flow `entry` admitted, or None if the entry does not admit
/// it: an ICMP message is the one that started the flow again, or the echo reply that one
/// asks for, and nothing else.
#[inline(always)]
fn direction(entry: &CtValue, pkt: &Packet, ends: Ends) -> Option<bool> {
    let other_way = (ends == Ends::Swapped) != (entry.flags & ct::SWAPPED != 0);
    if !matches!(pkt.protocol, proto::ICMP | proto::ICMPV6) {
        return Some(other_way);
    }
    // Between an address and itself, the type alone tells.
    let any_way = ends == Ends::Same;
    if pkt.dst_port == entry.port && (any_way || !other_way) {
        Some(false)
    } else if ct::answer_type(pkt.protocol, entry.port) == Some(pkt.dst_port) && (any_way || other_way) {
        Some(true)
    } else {
        None
    }
}

/// The live entry `pkt` belongs to, whatever its generation: admitting `pkt`'s direction, not
/// idle in that direction past its timeout, and not a monitor-mode admission while the node
/// enforces (such a flow is judged again once the node enforces).
#[inline(always)]
pub fn lookup(key: &CtKey, ends: Ends, pkt: &Packet, node_mode: u32, now: u64) -> Option<Flow> {
    let entry = unsafe { &mut *ZT_CONNTRACK.get_ptr_mut(key)? };
    let reply = direction(entry, pkt, ends)?;
    let timeout = if pkt.protocol == proto::TCP { ct::TCP_TIMEOUT_NS } else { ct::OTHER_TIMEOUT_NS };
    if now.saturating_sub(entry.last_seen_ns[reply as usize]) > timeout {
        return None;
    }
    if entry.flags & ct::AUDIT != 0 && node_mode == mode::ENFORCE {
        return None;
    }
    Some(Flow { entry, reply })
}

/// Records an admitted flow, `pkt` its first packet; false if the table refused it. (A full
/// LRU evicts its least recently used entries instead: an evicted flow's next packet is judged
/// again as new.) `checked_on`: the interface whose source check `pkt` passed, or 0; the
/// replies' source is checked where they first arrive.
#[inline(always)]
pub fn admit(key: &CtKey, ends: Ends, pkt: &Packet, rule_id: u32, generation: u32, flags: u32, now: u64, checked_on: u32) -> bool {
    let swapped = if ends == Ends::Swapped { ct::SWAPPED } else { 0 };
    let value = CtValue {
        last_seen_ns: [now, now],
        rule_id,
        generation,
        flags: flags | swapped,
        ifindex: [checked_on, 0],
        port: pkt.dst_port,
        _pad: [0; 2],
    };
    ZT_CONNTRACK.insert(key, &value, 0).is_ok()
}

/// Removes the flow's entry: both its directions.
#[inline(always)]
pub fn forget(key: &CtKey) {
    let _ = ZT_CONNTRACK.remove(key);
}
