//! Header parsing: Ethernet (one 802.1Q tag), IPv4, IPv6 with a bounded extension-header walk,
//! and the L4 fields policy needs. Every read is bounds-checked against the packet end; anything
//! that does not parse is an `Err(reason)` that the caller denies, never a silent pass.

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
use zt_common::{proto, IpKey, Reason};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_IPV6: u16 = 0x86DD;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up. Longer chains are denied (`ExtHeaderLimit`).
pub const MAX_EXT_HEADERS: usize = 6;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Router solicitation .. redirect: IPv6 neighbour discovery.
const NDP_FIRST: u8 = 133;
const NDP_LAST: u8 = 137;

/// What the pipeline needs to know about a packet. Addresses are IPv6 or IPv4-mapped. The
/// layout is shared with the agent: it is also the key of the event window's flow map.
///
/// It lives in a per-CPU scratch map (`ZT_SCRATCH`), not on the stack: there the compiler would
/// keep each byte of the addresses in a register of its own and spill them all.
pub type Packet = zt_common::EventFlowKey;

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
    /// An IP packet whose fields are in the `Packet`.
    Ip,
}

#[inline(always)]
fn ptr_at<T>(data: usize, end: usize, offset: usize) -> Result<*const T, Reason> {
    if data + offset + size_of::<T>() > end {
        return Err(Reason::Malformed);
    }
    Ok((data + offset) as *const T)
}


/// Parses the Ethernet frame in `[data, end)` into `pkt`. On `Err`, `pkt` holds what was parsed
/// so far (addresses of a fragment, for example) so the verdict can still name them.
#[inline(always)]
pub fn parse_frame(data: usize, end: usize, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let eth: *const EthHdr = ptr_at(data, end, 0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(data, end, offset)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += VlanHdr::LEN;
    }
    if ether_type == ETH_P_ARP {
        return Ok(Parsed::ControlPlane);
    }
    parse_l3(data, end, offset, ether_type, pkt)
}

/// Parses a packet that starts at its IP header (cgroup hooks), given its ethertype.
#[inline(always)]
pub fn parse_packet(data: usize, end: usize, ether_type: u16, pkt: &mut Packet) -> Result<Parsed, Reason> {
    parse_l3(data, end, 0, ether_type, pkt)
}

#[inline(always)]
fn parse_l3(data: usize, end: usize, offset: usize, ether_type: u16, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let l4 = match ether_type {
        ETH_P_IP => parse_ipv4(data, end, offset, pkt)?,
        ETH_P_IPV6 => parse_ipv6(data, end, offset, pkt)?,
        // Double tags (QinQ) and every other protocol: nothing is implicitly allowed.
        _ => return Err(Reason::UnsupportedProtocol),
    };
    parse_l4(data, end, l4, pkt)
}

/// Returns the L4 offset.
#[inline(always)]
fn parse_ipv4(data: usize, end: usize, offset: usize, pkt: &mut Packet) -> Result<usize, Reason> {
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
    if (u16::from_be_bytes(ip.tot_len) as usize) < header_len {
        return Err(Reason::Malformed);
    }
    // A non-first fragment carries no ports: it cannot be judged on its own.
    if u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
        return Err(Reason::Fragment);
    }
    Ok(offset + header_len)
}

#[inline(always)]
fn parse_ipv6(data: usize, end: usize, offset: usize, pkt: &mut Packet) -> Result<usize, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(data, end, offset)?;
    let ip = unsafe { &*ip };
    pkt.family = 6;
    pkt.src = ip.src_addr;
    pkt.dst = ip.dst_addr;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let mut next = ip.next_hdr;
    let mut l4 = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        let ext_len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => 8,
            IPV6_AUTH => 4,
            IPV6_FRAGMENT => {
                pkt.protocol = next;
                return Err(Reason::Fragment);
            }
            _ => {
                pkt.protocol = next;
                return Ok(l4);
            }
        };
        // Every walked header starts with (next header, length); AH counts 4-byte units
        // beyond the first 8 bytes, the others 8-byte units beyond the first 8.
        let hdr: *const [u8; 2] = ptr_at(data, end, l4)?;
        let hdr = unsafe { *hdr };
        next = hdr[0];
        l4 += (hdr[1] as usize + 1) * ext_len + if ext_len == 4 { 4 } else { 0 };
    }
    pkt.protocol = next;
    match next {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
            Err(Reason::ExtHeaderLimit)
        }
        _ => Ok(l4),
    }
}

#[inline(always)]
fn parse_l4(data: usize, end: usize, l4: usize, pkt: &mut Packet) -> Result<Parsed, Reason> {
    match pkt.protocol {
        proto::TCP => {
            let tcp: *const TcpHdr = ptr_at(data, end, l4)?;
            let tcp = unsafe { &*tcp };
            pkt.src_port = u16::from_be_bytes(tcp.source);
            pkt.dst_port = u16::from_be_bytes(tcp.dest);
        }
        proto::UDP => {
            let udp: *const UdpHdr = ptr_at(data, end, l4)?;
            let udp = unsafe { &*udp };
            pkt.src_port = u16::from_be_bytes(udp.src);
            pkt.dst_port = u16::from_be_bytes(udp.dst);
        }
        proto::SCTP => {
            let sctp: *const SctpHdr = ptr_at(data, end, l4)?;
            let sctp = unsafe { &*sctp };
            pkt.src_port = u16::from_be_bytes(sctp.src);
            pkt.dst_port = u16::from_be_bytes(sctp.dst);
        }
        proto::ICMP => {
            let icmp: *const Icmpv4Hdr = ptr_at(data, end, l4)?;
            let icmp = unsafe { &*icmp };
            pkt.dst_port = icmp.type_ as u16;
            if icmp.type_ == ICMP_ECHO_REQUEST || icmp.type_ == ICMP_ECHO_REPLY {
                pkt.src_port = u16::from_be_bytes([icmp.data[0], icmp.data[1]]);
            }
        }
        proto::ICMPV6 => {
            let icmp: *const Icmpv6Hdr = ptr_at(data, end, l4)?;
            let icmp = unsafe { &*icmp };
            if icmp.type_ >= NDP_FIRST && icmp.type_ <= NDP_LAST {
                return Ok(Parsed::ControlPlane);
            }
            pkt.dst_port = icmp.type_ as u16;
            if icmp.type_ == ICMPV6_ECHO_REQUEST || icmp.type_ == ICMPV6_ECHO_REPLY {
                pkt.src_port = u16::from_be_bytes([icmp.data[0], icmp.data[1]]);
            }
        }
        // Other protocols are judged on the protocol alone (port 0).
        _ => {}
    }
    Ok(Parsed::Ip)
}
