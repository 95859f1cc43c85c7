//! What `cargo xtask bench` measures zt's programs against, in the same run: the floor (an XDP
//! program that does nothing) and the least a filter must do (zt's parser, then one hash lookup
//! of the flow) — and, to say what a new flow's cost is made of, the two things zt does for a
//! new flow besides deciding it, alone: admitting it (its conntrack entry) and reporting
//! it (the event window's entry and a record on a ring buffer). A separate object: nothing of
//! it ships in the datapath's.
#![no_std]
#![no_main]

#[allow(dead_code)]
#[path = "parse.rs"]
mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_get_buff_len,
    macros::{map, xdp},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use zt_common::{
    maps::{CONNTRACK_CAPACITY, EVENTS_BYTES, EVENT_FLOWS_CAPACITY},
    CtKey, CtValue, EventFlowKey, EventFlowState, FlowEvent,
};

use parse::{Fragment, Packet};

/// Flows by 5-tuple: the same kind of table, of the same size, as zt's conntrack, so the lookup
/// costs what the datapath's would. The bench's flows are not in it (a hash lookup costs about
/// the same found or not).
#[map]
static REFERENCE_FLOWS: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);
#[map]
static REFERENCE_SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);
/// Admitted flows, a table like conntrack (not the lookup's, so that one stays empty).
#[map]
static REFERENCE_ADMITTED: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);
/// Like zt's event window and ring buffer.
#[map]
static REFERENCE_WINDOW: LruHashMap<EventFlowKey, EventFlowState> = LruHashMap::with_max_entries(EVENT_FLOWS_CAPACITY, 0);
#[map]
static REFERENCE_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[xdp]
pub fn zt_reference_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The frame parsed zt's way, and its flow's key; `None` if zt could not parse it.
#[inline(always)]
fn parsed(ctx: &XdpContext) -> Option<(&'static Packet, CtKey)> {
    let pkt = unsafe { &mut *REFERENCE_SCRATCH.get_ptr_mut(0)? };
    parse::clear(pkt);
    let mut frag = Fragment::none();
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    parse::parse_frame(ctx.data(), ctx.data_end(), len, pkt, &mut frag).ok()?;
    let key = CtKey { src: pkt.src, dst: pkt.dst, src_port: pkt.src_port, dst_port: pkt.dst_port, protocol: pkt.protocol, _pad: [0; 3] };
    Some((pkt, key))
}

#[xdp]
pub fn zt_reference_lookup(ctx: XdpContext) -> u32 {
    let Some((_, key)) = parsed(&ctx) else { return xdp_action::XDP_DROP };
    match unsafe { REFERENCE_FLOWS.get(&key) } {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_DROP,
    }
}

/// Parses, then inserts the flow's entry, as zt admits a new flow.
#[xdp]
pub fn zt_reference_admit(ctx: XdpContext) -> u32 {
    let Some((_, key)) = parsed(&ctx) else { return xdp_action::XDP_DROP };
    match REFERENCE_ADMITTED.insert(&key, &CtValue::default(), 0) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_DROP,
    }
}

/// Parses, then remembers the flow in an event window and queues a flow event, as zt reports
/// a new flow whose event the limits let through.
#[xdp]
pub fn zt_reference_report(ctx: XdpContext) -> u32 {
    let Some((pkt, _)) = parsed(&ctx) else { return xdp_action::XDP_PASS };
    let flow = EventFlowKey {
        src: pkt.src,
        dst: pkt.dst,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        protocol: pkt.protocol,
        family: pkt.family,
    };
    if REFERENCE_WINDOW.insert(&flow, &EventFlowState::default(), 0).is_err() {
        return xdp_action::XDP_PASS;
    }
    let Some(mut entry) = REFERENCE_EVENTS.reserve::<FlowEvent>(0) else { return xdp_action::XDP_PASS };
    unsafe {
        let ev = entry.as_mut_ptr();
        (*ev) = FlowEvent::default();
        (*ev).src_addr = pkt.src;
        (*ev).dst_addr = pkt.dst;
    }
    entry.submit(0);
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
