//! Counting and reporting a verdict: exact per-CPU counters always, and a flow event on the ring
//! buffer when the verdict matters (a rule allowed a new flow, or something was denied/audited)
//! unless the event limits hold it back (`zt_common::EventLimits`: a per-flow window, then a
//! per-CPU token bucket). Every event that matters is counted once more: emitted, suppressed or
//! lost (no room in the ring buffer).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::{
    counters, is_reported, Direction, EventFlowState, EventLimits, FlowEvent, Reason, Verdict,
};

use crate::{
    maps::{ZT_COUNTERS, ZT_EVENTS, ZT_EVENT_BUCKET, ZT_EVENT_FLOWS, ZT_EVENT_LIMITS},
    parse::Packet,
    policy::At,
};

/// Adds atomically (BPF_ATOMIC_ADD): a program in process context (cgroup egress) can be
/// interrupted on its CPU by one in softirq, and a flow's state is shared by all CPUs; no
/// increment may be lost. (The BPF target offers no `AtomicU64::fetch_add`, having no
/// compare-and-swap, but LLVM lowers this intrinsic to the kernel's atomic add.)
#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = ZT_COUNTERS.get_ptr_mut(index) {
        add(counter, 1);
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

/// What a never-written `ZT_EVENT_LIMITS` means: no limit.
static NO_LIMITS: EventLimits = EventLimits { window_ns: 0, interval_ns: 0, burst: 0 };
/// A flow the window sees for the first time: no event yet, nothing suppressed.
static NEW_FLOW: EventFlowState = EventFlowState { last_event_ns: 0, suppressed: 0, verdict: 0, reason: 0, _pad: [0; 6] };

#[inline(always)]
pub fn record(r: &Report) {
    count(counters::packet_index(r.verdict, r.reason, r.direction, r.at.hook));
    if is_reported(r.verdict, r.reason) {
        report(r);
    }
}

/// Emits, suppresses or loses the event. Nothing of it is built on the BPF stack, which the
/// pipeline nearly fills: the packet is the flow map's key, a new flow starts as a static
/// template, and the event is written in place in the ring buffer.
#[inline(always)]
fn report(r: &Report) {
    let now = unsafe { bpf_ktime_get_ns() };
    let limits = ZT_EVENT_LIMITS.get(0).unwrap_or(&NO_LIMITS);
    let mut flow = ZT_EVENT_FLOWS.get_ptr_mut(r.pkt);
    if flow.is_none() {
        // A full LRU evicts its oldest flow; should the insert fail, this event goes untracked.
        let _ = ZT_EVENT_FLOWS.insert(r.pkt, &NEW_FLOW, 0);
        flow = ZT_EVENT_FLOWS.get_ptr_mut(r.pkt);
    }
    let (verdict, reason) = (r.verdict as u8, r.reason as u8);
    let (in_window, suppressed) = match flow {
        Some(flow) => unsafe {
            let f = &*flow;
            let repeat = f.last_event_ns != 0 && f.verdict == verdict && f.reason == reason;
            (repeat && now.wrapping_sub(f.last_event_ns) < limits.window_ns, f.suppressed)
        },
        None => (false, 0),
    };
    if in_window || !take_token(limits, now) {
        if let Some(flow) = flow {
            add(unsafe { &raw mut (*flow).suppressed }, 1);
        }
        count(counters::EVENTS_SUPPRESSED);
        return;
    }
    let Some(mut entry) = ZT_EVENTS.reserve::<FlowEvent>(0) else {
        // The flow's suppressed count stays for its next event.
        count(counters::EVENTS_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).timestamp_ns = now;
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
        (*ev).verdict = verdict;
        (*ev).reason = reason;
        (*ev).mode = r.mode as u8;
        (*ev).flags = r.flags;
        (*ev).cgroup_id = r.at.cgroup_id;
        (*ev).suppressed = suppressed;
    }
    entry.submit(0);
    count(counters::EVENTS_EMITTED);
    if let Some(flow) = flow {
        unsafe {
            (*flow).last_event_ns = now;
            (*flow).verdict = verdict;
            (*flow).reason = reason;
        }
        // Subtracted rather than zeroed: what another CPU suppressed meanwhile stays counted.
        add(unsafe { &raw mut (*flow).suppressed }, suppressed.wrapping_neg());
    }
}

/// This CPU's token bucket, as GCRA: `spent_until` is when the CPU's budget would be whole again;
/// an event moves it one interval later, and is allowed while it stays within `burst` intervals
/// of now. An update interrupted on the same CPU may let one extra event through.
#[inline(always)]
fn take_token(limits: &EventLimits, now: u64) -> bool {
    if limits.interval_ns == 0 {
        return true;
    }
    // Index 0 of a one-entry array always exists.
    let Some(spent_until) = ZT_EVENT_BUCKET.get_ptr_mut(0) else { return true };
    let spent_until = unsafe { &mut *spent_until };
    let next = if *spent_until > now { *spent_until } else { now } + limits.interval_ns;
    if next - now > limits.burst * limits.interval_ns {
        return false;
    }
    *spent_until = next;
    true
}
