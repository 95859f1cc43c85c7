//! Header parsing: Ethernet with up to two VLAN tags, IPv4, IPv6 with a bounded extension-header
//! walk, and the L4 fields policy needs. Every read is bounds-checked against the packet end and
//! against the length the IP header claims; anything that does not parse is an `Err(reason)`
//! that the caller denies, never a silent pass. Fragments are described in a [`Fragment`] for
//! `fragment::track`, which gives the fragments after the first their train's ports.

use core::mem::size_of;

use network_types::{
    eth::EthHdr,
    icmp::{Icmpv4Hdr, Icmpv6Hdr},
    ip::{Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use zt_common::{icmp, proto, IpKey, Reason};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// VLAN tags parsed (802.1Q, or 802.1ad outer + 802.1Q inner); a frame with more is denied.
const MAX_VLAN_TAGS: usize = 2;
const ETH_P_IPV6: u16 = 0x86DD;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up. Longer chains are denied (`ExtHeaderLimit`).
pub const MAX_EXT_HEADERS: usize = 6;

/// Router solicitation .. redirect: IPv6 neighbour discovery.
const NDP_FIRST: u8 = 133;
const NDP_LAST: u8 = 137;

/// What the pipeline needs to know about a packet. Addresses are IPv6 or IPv4-mapped. The
/// layout is shared with the agent: it is also the key of the event window's flow map.
///
/// It lives in a per-CPU scratch map (`ZT_SCRATCH`), not on the stack: there the compiler would
/// keep each byte of the addresses in a register of its own and spill them all.
pub type Packet = zt_common::EventFlowKey;

/// Clears `pkt` in five stores. `*pkt = Packet::default()` compiles to a call of the builtin
/// memset, a loop of 38 byte stores, on every packet. `pkt` is a map value: 8-byte aligned.
#[inline(always)]
pub fn clear(pkt: &mut Packet) {
    const _: () = assert!(size_of::<Packet>() == 38);
    let at = pkt as *mut Packet as *mut u8;
    // Volatile, so the compiler does not merge them back into a memset.
    unsafe {
        for word in 0..4 {
            at.add(word * 8).cast::<u64>().write_volatile(0);
        }
        at.add(32).cast::<u32>().write_volatile(0);
        at.add(36).cast::<u16>().write_volatile(0);
    }
}

#[inline(always)]
fn mapped_v4(addr: [u8; 4]) -> IpKey {
    let mut key = [0u8; 16];
    key[10] = 0xff;
    key[11] = 0xff;
    key[12] = addr[0];
    key[13] = addr[1];
    key[14] = addr[2];
    key[15] = addr[3];
    key
}

pub enum Parsed {
    /// ARP or neighbour discovery: always passes.
    ControlPlane,
    /// An IP packet whose fields are in the `Packet` (a first fragment included).
    Ip,
    /// A fragment after the first: its addresses are in the `Packet`, its ports are not.
    LaterFragment,
}

/// [`Fragment::kind`]
pub const NOT_FRAGMENT: u8 = 0;
pub const FIRST_FRAGMENT: u8 = 1;
pub const LATER_FRAGMENT: u8 = 2;

/// Where a packet stands in a fragment train.
pub struct Fragment {
    pub kind: u8,
    /// The train's key protocol (see `zt_common::FragmentKey`).
    pub key_protocol: u8,
    /// Later fragment: its offset in bytes. First fragment: where its L4 header ends, in bytes
    /// from the start of the fragmented data.
    pub offset: u16,
    pub id: u32,
}

impl Fragment {
    pub const fn none() -> Self {
        Self { kind: NOT_FRAGMENT, key_protocol: 0, offset: 0, id: 0 }
    }
}

/// The parse position: the next header's offset, and where the IP packet ends by its own
/// length field (padding after it is not packet data).
struct Cursor {
    offset: usize,
    limit: usize,
}

/// What the IP layer leaves for L4.
struct L3 {
    l4: Cursor,
    /// Where the fragmented data starts (IPv4: after the IP header; IPv6: after the fragment
    /// header), so a first fragment can say where its L4 header ends within it.
    fragmented_from: usize,
    /// IPv6 with hop limit 255: a neighbour discovery message may be genuine (RFC 4861 has
    /// receivers discard any other), so it may pass as control plane.
    link_local: bool,
}

#[inline(always)]
fn ptr_at<T>(data: usize, end: usize, offset: usize) -> Result<*const T, Reason> {
    if data + offset + size_of::<T>() > end {
        return Err(Reason::Malformed);
    }
    Ok((data + offset) as *const T)
}

/// A header of type `T` at `at`, also within the IP packet's own length.
#[inline(always)]
fn header_at<T>(data: usize, end: usize, at: &Cursor) -> Result<*const T, Reason> {
    if at.offset + size_of::<T>() > at.limit {
        return Err(Reason::Malformed);
    }
    ptr_at(data, end, at.offset)
}

/// Parses the Ethernet frame in `[data, end)` into `pkt`. `packet_len` is the whole packet's
/// length, of which `[data, end)` may be only the linear part: an IP length field past it is
/// malformed. On `Err`, `pkt` holds what was parsed so far (addresses of a fragment, for
/// example) so the verdict can still name them.
#[inline(always)]
pub fn parse_frame(
    data: usize,
    end: usize,
    packet_len: usize,
    pkt: &mut Packet,
    frag: &mut Fragment,
) -> Result<Parsed, Reason> {
    let eth: *const EthHdr = ptr_at(data, end, 0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(data, end, offset)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += VlanHdr::LEN;
    }
    if ether_type == ETH_P_ARP {
        return Ok(Parsed::ControlPlane);
    }
    parse_l3(data, end, offset, packet_len, ether_type, pkt, frag)
}

/// Parses a packet that starts at its IP header (cgroup hooks), given its ethertype.
#[inline(always)]
pub fn parse_packet(
    data: usize,
    end: usize,
    packet_len: usize,
    ether_type: u16,
    pkt: &mut Packet,
    frag: &mut Fragment,
) -> Result<Parsed, Reason> {
    parse_l3(data, end, 0, packet_len, ether_type, pkt, frag)
}

#[inline(always)]
fn parse_l3(
    data: usize,
    end: usize,
    offset: usize,
    packet_len: usize,
    ether_type: u16,
    pkt: &mut Packet,
    frag: &mut Fragment,
) -> Result<Parsed, Reason> {
    let L3 { l4, fragmented_from, link_local } = match ether_type {
        ETH_P_IP => parse_ipv4(data, end, offset, packet_len, pkt, frag)?,
        ETH_P_IPV6 => parse_ipv6(data, end, offset, packet_len, pkt, frag)?,
        // More than two VLAN tags and every other protocol: nothing is implicitly allowed.
        _ => return Err(Reason::UnsupportedProtocol),
    };
    if frag.kind == LATER_FRAGMENT {
        return Ok(Parsed::LaterFragment);
    }
    // Neighbour discovery is never fragmented (RFC 6980).
    let neighbour_discovery = link_local && frag.kind == NOT_FRAGMENT;
    match parse_l4(data, end, &l4, neighbour_discovery, pkt) {
        Ok((parsed, l4_end)) => {
            frag.offset = (l4_end - fragmented_from) as u16;
            Ok(parsed)
        }
        // The ports of a first fragment must be in it: otherwise a later fragment supplies them
        // unseen (the "tiny fragment" evasion). An IPv6 chain that ends where the first fragment
        // does puts all of the L4 header in a later one.
        Err(Reason::Malformed) if frag.kind == FIRST_FRAGMENT => {
            Err(if pkt.family == 6 && l4.offset >= l4.limit { Reason::FragmentSplitHeaders } else { Reason::FragmentTiny })
        }
        Err(reason) => Err(reason),
    }
}

#[inline(always)]
fn parse_ipv4(
    data: usize,
    end: usize,
    offset: usize,
    packet_len: usize,
    pkt: &mut Packet,
    frag: &mut Fragment,
) -> Result<L3, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(data, end, offset)?;
    let ip = unsafe { &*ip };
    pkt.family = 4;
    pkt.src = mapped_v4(ip.src_addr);
    pkt.dst = mapped_v4(ip.dst_addr);
    pkt.protocol = ip.proto;
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Reason::Malformed);
    }
    let total_len = u16::from_be_bytes(ip.tot_len) as usize;
    if total_len < header_len || offset + total_len > packet_len {
        return Err(Reason::Malformed);
    }
    let mut l4 = Cursor { offset: offset + header_len, limit: offset + total_len };
    let frags = u16::from_be_bytes(ip.frags);
    let fragment_offset = (frags & 0x1fff) * 8;
    let more_fragments = frags & 0x2000 != 0;
    if fragment_offset != 0 || more_fragments {
        frag.kind = if fragment_offset != 0 { LATER_FRAGMENT } else { FIRST_FRAGMENT };
        frag.key_protocol = ip.proto;
        frag.offset = fragment_offset;
        frag.id = u16::from_be_bytes(ip.id) as u32;
    }
    let fragmented_from = l4.offset;
    // AH authenticates and hides nothing: what it carries is judged, as in IPv6 (RFC 4302).
    if ip.proto == IPV6_AUTH && frag.kind != LATER_FRAGMENT {
        let hdr: *const [u8; 8] = match header_at(data, end, &l4) {
            Ok(hdr) => hdr,
            Err(_) if frag.kind == FIRST_FRAGMENT => return Err(Reason::FragmentTiny),
            Err(reason) => return Err(reason),
        };
        let hdr = unsafe { *hdr };
        // Its shortest is 12 bytes; AH in AH is no configuration anyone deploys.
        if hdr[1] == 0 || hdr[0] == IPV6_AUTH {
            return Err(Reason::Malformed);
        }
        pkt.protocol = hdr[0];
        l4.offset += (hdr[1] as usize + 2) * 4;
    }
    Ok(L3 { l4, fragmented_from, link_local: false })
}

#[inline(always)]
fn parse_ipv6(
    data: usize,
    end: usize,
    offset: usize,
    packet_len: usize,
    pkt: &mut Packet,
    frag: &mut Fragment,
) -> Result<L3, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(data, end, offset)?;
    let ip = unsafe { &*ip };
    pkt.family = 6;
    pkt.src = ip.src_addr;
    pkt.dst = ip.dst_addr;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    let mut at = Cursor { offset: offset + Ipv6Hdr::LEN, limit: offset + Ipv6Hdr::LEN + payload_len };
    // A jumbogram says 0 and carries its length in a hop-by-hop option: bound by the buffer.
    if payload_len == 0 {
        at.limit = end - data;
    } else if at.limit > packet_len {
        return Err(Reason::Malformed);
    }
    let link_local = ip.hop_limit == 255;
    let mut fragmented_from = at.offset;
    let mut next = ip.next_hdr;
    for walked in 0..MAX_EXT_HEADERS {
        // Hop-by-hop options come first or not at all (RFC 8200): receivers discard the rest.
        if next == IPV6_HOP_BY_HOP && walked > 0 {
            return Err(Reason::Malformed);
        }
        // Every walked header starts with (next header, length). AH counts 4-byte units beyond
        // its first 8 bytes; hop-by-hop, routing and destination options 8-byte units beyond
        // their first 8; the fragment header is always 8 bytes.
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
                let hdr: *const [u8; 8] = match header_at(data, end, &at) {
                    Ok(hdr) => hdr,
                    // The rest of the chain is in a later fragment.
                    Err(_) if frag.kind == FIRST_FRAGMENT => return Err(Reason::FragmentSplitHeaders),
                    Err(reason) => return Err(reason),
                };
                let hdr = unsafe { *hdr };
                let this = next;
                next = hdr[0];
                match this {
                    // Its shortest is 12 bytes (RFC 4302).
                    IPV6_AUTH if hdr[1] == 0 => return Err(Reason::Malformed),
                    IPV6_AUTH => (hdr[1] as usize + 2) * 4,
                    IPV6_FRAGMENT => {
                        // One fragment header per packet (RFC 8200).
                        if frag.kind != NOT_FRAGMENT {
                            return Err(Reason::Malformed);
                        }
                        let offset_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                        let fragment_offset = offset_flags & !7;
                        // Offset 0 without "more fragments" is an atomic fragment: a whole packet.
                        if fragment_offset != 0 || offset_flags & 1 != 0 {
                            frag.kind = if fragment_offset != 0 { LATER_FRAGMENT } else { FIRST_FRAGMENT };
                            frag.key_protocol = next;
                            frag.offset = fragment_offset;
                            frag.id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                        }
                        fragmented_from = at.offset + 8;
                        8
                    }
                    _ => (hdr[1] as usize + 1) * 8,
                }
            }
            _ => {
                pkt.protocol = next;
                return Ok(L3 { l4: at, fragmented_from, link_local });
            }
        };
        at.offset += len;
        if frag.kind == LATER_FRAGMENT {
            pkt.protocol = next;
            return Ok(L3 { l4: at, fragmented_from, link_local });
        }
    }
    pkt.protocol = next;
    match next {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
            Err(Reason::ExtHeaderLimit)
        }
        _ => Ok(L3 { l4: at, fragmented_from, link_local }),
    }
}

/// Returns the L4 header's end offset with the verdict input. Neighbour discovery passes as
/// control plane only where `neighbour_discovery` says it can be genuine; elsewhere an ICMPv6
/// message of its types is judged like any other.
#[inline(always)]
fn parse_l4(
    data: usize,
    end: usize,
    l4: &Cursor,
    neighbour_discovery: bool,
    pkt: &mut Packet,
) -> Result<(Parsed, usize), Reason> {
    // The headers walked so far must end inside the packet, even where no L4 header is read.
    if l4.offset > l4.limit {
        return Err(Reason::Malformed);
    }
    let header_len = match pkt.protocol {
        proto::TCP => {
            let tcp: *const TcpHdr = header_at(data, end, l4)?;
            let tcp = unsafe { &*tcp };
            pkt.src_port = u16::from_be_bytes(tcp.source);
            pkt.dst_port = u16::from_be_bytes(tcp.dest);
            TcpHdr::LEN
        }
        proto::UDP => {
            let udp: *const UdpHdr = header_at(data, end, l4)?;
            let udp = unsafe { &*udp };
            pkt.src_port = u16::from_be_bytes(udp.src);
            pkt.dst_port = u16::from_be_bytes(udp.dst);
            UdpHdr::LEN
        }
        proto::SCTP => {
            let sctp: *const SctpHdr = header_at(data, end, l4)?;
            let sctp = unsafe { &*sctp };
            pkt.src_port = u16::from_be_bytes(sctp.src);
            pkt.dst_port = u16::from_be_bytes(sctp.dst);
            SctpHdr::LEN
        }
        proto::ICMP => {
            let icmp: *const Icmpv4Hdr = header_at(data, end, l4)?;
            let icmp = unsafe { &*icmp };
            pkt.dst_port = icmp.type_ as u16;
            if icmp.type_ == icmp::ECHO_REQUEST || icmp.type_ == icmp::ECHO_REPLY {
                pkt.src_port = u16::from_be_bytes([icmp.data[0], icmp.data[1]]);
            }
            Icmpv4Hdr::LEN
        }
        proto::ICMPV6 => {
            let icmp: *const Icmpv6Hdr = header_at(data, end, l4)?;
            let icmp = unsafe { &*icmp };
            if neighbour_discovery && icmp.type_ >= NDP_FIRST && icmp.type_ <= NDP_LAST {
                return Ok((Parsed::ControlPlane, l4.offset + Icmpv6Hdr::LEN));
            }
            pkt.dst_port = icmp.type_ as u16;
            if icmp.type_ == icmp::V6_ECHO_REQUEST || icmp.type_ == icmp::V6_ECHO_REPLY {
                pkt.src_port = u16::from_be_bytes([icmp.data[0], icmp.data[1]]);
            }
            Icmpv6Hdr::LEN
        }
        // Other protocols are judged on the protocol alone (port 0).
        _ => 0,
    };
    Ok((Parsed::Ip, l4.offset + header_len))
}
