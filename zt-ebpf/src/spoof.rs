//! Source checks: a packet may only carry a source address its sender owns.
//!
//! - On a workload's interface, the node must route the source back through that interface
//!   (strict reverse path, as `rp_filter=1` for IPv4, here for IPv6 too), and when the interface
//!   is bound to an identity, the address must not belong to another identity (or the node).
//! - On an uplink, the source must not be the node's own address or a local workload's.
//!
//! Link-local IPv6 sources are exempt: they mean something on their own link only, and every
//! workload has its own link.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH},
    helpers::bpf_fib_lookup,
};
use zt_common::{identity, interface_flags, Hook, IpKey};

use crate::{
    maps::{ZT_FIB, ZT_INTERFACES},
    parse::Packet,
    policy::{by_address, At},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where the node routes `addr` (arriving on `ifindex`): `Some(ifindex)` of the interface, or
/// `None` when it is not routed out of an interface (a local address, unreachable, blackhole).
#[inline(always)]
fn route_of(at: &At, pkt: &Packet, addr: &IpKey) -> Option<u32> {
    let params = unsafe { &mut *ZT_FIB.get_ptr_mut(0)? };
    unsafe { core::ptr::write_bytes(params as *mut _, 0, 1) };
    params.ifindex = at.ifindex;
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    if pkt.family == 4 {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = word(12);
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = [word(0), word(4), word(8), word(12)];
    }
    let ret = unsafe { bpf_fib_lookup(at.ctx, params, size_of_params(), BPF_FIB_LOOKUP_SKIP_NEIGH) };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => Some(params.ifindex),
        // BPF_FIB_LKUP_RET_NOT_FWDED (a local address) and every failure.
        _ => None,
    }
}

#[inline(always)]
const fn size_of_params() -> i32 {
    core::mem::size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32
}

#[inline(always)]
fn is_link_local(pkt: &Packet) -> bool {
    pkt.family == 6 && pkt.src[0] == 0xfe && pkt.src[1] & 0xc0 == 0x80
}

/// Whether `hook` checks sources at all: where packets enter from a workload or another node.
#[inline(always)]
pub fn checks_source(hook: Hook) -> bool {
    matches!(hook, Hook::TcIngress | Hook::Xdp)
}

/// Whether `pkt`'s source may be sent from where it was seen. Hooks and interfaces the agent
/// did not mark are not checked here (local processes are identified by cgroup).
#[inline(always)]
pub fn source_owned(slot: u32, pkt: &Packet, at: &At) -> bool {
    let Some(info) = (unsafe { ZT_INTERFACES.get(at.ifindex) }) else { return true };
    match at.hook {
        Hook::TcIngress if info.flags & interface_flags::WORKLOAD != 0 => {
            if is_link_local(pkt) {
                return true;
            }
            if route_of(at, pkt, &pkt.src) != Some(at.ifindex) {
                return false;
            }
            let claimed = by_address(slot, &pkt.src);
            info.identity == identity::ANY
                || claimed == info.identity
                || !(identity::is_declared(claimed) || claimed == identity::HOST)
        }
        Hook::Xdp if info.flags & interface_flags::UPLINK != 0 => {
            if by_address(slot, &pkt.src) == identity::HOST {
                return false;
            }
            match route_of(at, pkt, &pkt.src) {
                Some(ifindex) => unsafe { ZT_INTERFACES.get(ifindex) }
                    .map_or(true, |out| out.flags & interface_flags::WORKLOAD == 0),
                None => is_link_local(pkt),
            }
        }
        _ => true,
    }
}
