//! What `cargo xtask bench` measures zt's programs against, in the same run: the floor (an XDP
//! program that does nothing) and the least a filter must do (zt's parser, then one hash lookup
//! of the flow). A separate object: nothing of it ships in the datapath's.
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "parse.rs"]
mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_get_buff_len,
    macros::{map, xdp},
    maps::{LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use zt_common::{maps::CONNTRACK_CAPACITY, CtKey, CtValue};

use parse::{Fragment, Packet};

/// Flows by 5-tuple: the same kind of table, of the same size, as zt's conntrack, so the lookup
/// costs what the datapath's would. The bench's flows are not in it (a hash lookup costs about
/// the same found or not).
#[map]
static REFERENCE_FLOWS: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);
#[map]
static REFERENCE_SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn zt_reference_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn zt_reference_lookup(ctx: XdpContext) -> u32 {
    let Some(pkt) = REFERENCE_SCRATCH.get_ptr_mut(0) else { return xdp_action::XDP_DROP };
    let pkt = unsafe { &mut *pkt };
    *pkt = Packet::default();
    let mut frag = Fragment::none();
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    if parse::parse_frame(ctx.data(), ctx.data_end(), len, pkt, &mut frag).is_err() {
        return xdp_action::XDP_DROP;
    }
    let key = CtKey { src: pkt.src, dst: pkt.dst, src_port: pkt.src_port, dst_port: pkt.dst_port, protocol: pkt.protocol, _pad: [0; 3] };
    match unsafe { REFERENCE_FLOWS.get(&key) } {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
