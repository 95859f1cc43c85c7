//! Fragment trains: a fragment is judged as its flow. The first fragment carries the ports and is
//! judged like any packet; it leaves its ports in `ZT_FRAGMENTS` under the train's key, and every
//! later fragment takes them from there before it is judged. A later fragment the table knows
//! nothing of, or one that would overwrite the L4 header its first fragment was judged on, is
//! dropped: the receiver could only reassemble it into something no verdict was taken on.

use zt_common::{FragmentKey, FragmentValue, Reason, FRAGMENT_TIMEOUT_NS};

use crate::{
    maps::ZT_FRAGMENTS,
    parse::{Fragment, Packet, Parsed, FIRST_FRAGMENT},
};

#[inline(always)]
fn key_of(pkt: &Packet, frag: &Fragment) -> FragmentKey {
    FragmentKey { src: pkt.src, dst: pkt.dst, id: frag.id, protocol: frag.key_protocol, _pad: [0; 3] }
}

/// What the pipeline judges: a later fragment gets its train's protocol and ports, a first
/// fragment is remembered for the fragments after it.
#[inline(always)]
pub fn track(pkt: &mut Packet, frag: &Fragment, parsed: Result<Parsed, Reason>, now: u64) -> Result<Parsed, Reason> {
    match parsed {
        Ok(Parsed::LaterFragment) => {
            let key = key_of(pkt, frag);
            let Some(first) = (unsafe { ZT_FRAGMENTS.get(&key) }) else { return Err(Reason::FragmentOrphan) };
            if now.saturating_sub(first.first_seen_ns) > FRAGMENT_TIMEOUT_NS {
                return Err(Reason::FragmentOrphan);
            }
            pkt.protocol = first.protocol;
            pkt.src_port = first.src_port;
            pkt.dst_port = first.dst_port;
            if frag.offset < first.l4_end {
                return Err(Reason::FragmentOverlap);
            }
            Ok(Parsed::Ip)
        }
        Ok(Parsed::Ip) if frag.kind == FIRST_FRAGMENT => {
            let value = FragmentValue {
                first_seen_ns: now,
                src_port: pkt.src_port,
                dst_port: pkt.dst_port,
                l4_end: frag.offset,
                protocol: pkt.protocol,
                _pad: 0,
            };
            // Without its entry the rest of the train would be dropped as orphans: refuse the
            // first fragment too, and say why.
            if ZT_FRAGMENTS.insert(&key_of(pkt, frag), &value, 0).is_err() {
                return Err(Reason::TableFull);
            }
            Ok(Parsed::Ip)
        }
        other => other,
    }
}
