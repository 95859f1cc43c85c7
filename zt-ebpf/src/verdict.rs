//! Counting and reporting a verdict: exact per-CPU counters always, a flow event on the ring
//! buffer when the verdict matters (a rule allowed a new flow, or something was denied/audited).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::{counter_index, Direction, FlowEvent, Reason, Verdict, EVENTS_LOST_INDEX};

use crate::{
    maps::{ZT_COUNTERS, ZT_EVENTS},
    parse::Packet,
    policy::At,
};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = ZT_COUNTERS.get_ptr_mut(index) {
        unsafe { *counter += 1 };
    }
}

pub struct Report<'a> {
    pub pkt: &'a Packet,
    pub at: At,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub flags: u8,
    pub verdict: Verdict,
    pub reason: Reason,
    pub direction: Direction,
    pub rule_id: u32,
    pub mode: u32,
    pub generation: u32,
}

#[inline(always)]
pub fn record(r: &Report) {
    count(counter_index(r.verdict, r.reason));
    let matters = r.verdict != Verdict::Allow || r.reason == Reason::PolicyAllow;
    if !matters {
        return;
    }
    let Some(mut entry) = ZT_EVENTS.reserve::<FlowEvent>(0) else {
        count(EVENTS_LOST_INDEX);
        return;
    };
    // Written field by field into the ring buffer: a whole FlowEvent built first would take
    // 80 bytes of a stack that has none to spare.
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).timestamp_ns = bpf_ktime_get_ns();
        (*ev).src_addr = r.pkt.src;
        (*ev).dst_addr = r.pkt.dst;
        (*ev).src_identity = r.src_identity;
        (*ev).dst_identity = r.dst_identity;
        (*ev).rule_id = r.rule_id;
        (*ev).ifindex = r.at.ifindex;
        (*ev).generation = r.generation;
        (*ev).src_port = r.pkt.src_port;
        (*ev).dst_port = r.pkt.dst_port;
        (*ev).protocol = r.pkt.protocol;
        (*ev).family = r.pkt.family;
        (*ev).hook = r.at.hook as u8;
        (*ev).direction = r.direction as u8;
        (*ev).verdict = r.verdict as u8;
        (*ev).reason = r.reason as u8;
        (*ev).mode = r.mode as u8;
        (*ev).flags = r.flags;
        (*ev).cgroup_id = r.at.cgroup_id;
    }
    entry.submit(0);
}
