//! zt's kernel datapath: one pipeline — parse, conntrack, identify, policy, verdict — shared by
//! the TC hooks on workload veths, the XDP hook on uplinks and the cgroup hooks of local
//! processes.
#![no_std]
#![no_main]
// The atomic add of `verdict` (the BPF target has no `fetch_add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod fragment;
mod maps;
mod parse;
mod policy;
mod spoof;
mod verdict;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_cgroup_id, bpf_xdp_get_buff_len},
    macros::{cgroup_skb, classifier, xdp},
    programs::{SkBuffContext, TcContext, XdpContext},
};
use zt_common::{ct, event_flags, identity, mode, Config, Direction, Hook, Reason, Verdict, NO_RULE};

use crate::{
    maps::{ZT_CONFIG, ZT_SCRATCH},
    parse::{Fragment, Packet, Parsed},
    policy::At,
    verdict::Report,
};

/// Bytes made linear before a TC program parses: the deepest headers the parser reads fit. (The
/// upgrade tests' variant build pulls a few more, which changes the programs' tag and nothing
/// they decide.)
const TC_PULL_BYTES: u32 = if option_env!("ZT_DATAPATH_VARIANT").is_some() { 264 } else { 256 };

/// Judges one parsed packet and records the verdict; true = let it through.
#[inline(always)]
fn judge(pkt: &mut Packet, parsed: Result<Parsed, Reason>, frag: &Fragment, at: At) -> bool {
    // Read once, in one load: mode, generation and slot belong together. Never written, the
    // word reads as enforce.
    let word = ZT_CONFIG.get_ptr(0).map_or(0, |word| unsafe { core::ptr::read_volatile(word) });
    let config = Config::from_word(word);
    // The clock of idle timeouts: a tick's resolution is plenty for them, and the coarse clock
    // is read from memory, where the precise one reads the clock source (dear in a VM).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let parsed = fragment::track(pkt, frag, parsed, now);
    let pkt = &*pkt;
    let mut report = Report {
        pkt,
        at,
        src_identity: identity::UNKNOWN,
        dst_identity: identity::UNKNOWN,
        flags: 0,
        verdict: Verdict::Allow,
        reason: Reason::ControlPlane,
        direction: Direction::None,
        rule_id: NO_RULE,
        mode: config.mode,
        generation: config.generation,
    };
    let pass = verdict_of(pkt, parsed, at, &config, now, &mut report);
    // One place records, so the event is built on the stack once.
    verdict::record(&report);
    pass
}

/// The pipeline after parsing: fills in `report` and says whether the packet passes.
#[inline(always)]
fn verdict_of(
    pkt: &Packet,
    parsed: Result<Parsed, Reason>,
    at: At,
    config: &Config,
    now: u64,
    report: &mut Report,
) -> bool {
    let refused = match parsed {
        Ok(Parsed::ControlPlane) => return true,
        Ok(Parsed::Ip) => None,
        // `fragment::track` gave every later fragment its ports or a reason.
        Ok(Parsed::LaterFragment) => Some(Reason::FragmentOrphan),
        Err(reason) => Some(reason),
    };
    if let Some(reason) = refused {
        return refuse(pkt, at, config, reason, report);
    }
    let (key, order) = conntrack::key_of(pkt);
    let mut flow = conntrack::lookup(&key, order, pkt, config.mode, now);
    // Where sources are checked (else 0). A flow's packets that passed the check on this
    // interface under the generation in force pass it again: an established packet skips it.
    let checked_on = if spoof::checks_source(at.hook) { at.ifindex } else { 0 };
    if let Some(flow) = flow.as_mut() {
        let dir = flow.direction();
        if flow.entry.generation == config.generation && (checked_on == 0 || flow.entry.ifindex[dir] == checked_on) {
            flow.entry.last_seen_ns[dir] = now;
            report.reason = Reason::Established;
            return true;
        }
    }
    if checked_on != 0 && !spoof::source_owned(config.slot, pkt, &at) {
        return refuse(pkt, at, config, Reason::Spoof, report);
    }
    if let Some(flow) = flow.as_mut() {
        if flow.entry.generation == config.generation {
            // The source checked out here: remembered for this direction's next packets.
            let dir = flow.direction();
            flow.entry.ifindex[dir] = checked_on;
            flow.entry.last_seen_ns[dir] = now;
            report.reason = Reason::Established;
            return true;
        }
    }
    let ends = policy::identify(config.slot, pkt, at);
    report.src_identity = ends.src;
    report.dst_identity = ends.dst;
    report.flags = ends.flags;
    // A flow admitted under another generation is judged again with the policy in force, as
    // the flow it was made for: the reverse of this packet when it is a reply. One decision
    // serves both cases, so the verifier walks the policy code once.
    let (src, dst, port) = match flow.as_ref() {
        Some(flow) if flow.reply => (ends.dst, ends.src, flow.entry.port),
        _ => (ends.src, ends.dst, pkt.dst_port),
    };
    let decision = policy::decide(config.slot, src, dst, pkt.protocol, port);
    if let Some(flow) = flow {
        if decision.allow {
            // Still allowed: the flow carries on, admitted by this generation (and no longer
            // only by monitor mode), in both directions.
            let dir = flow.direction();
            let entry = flow.entry;
            entry.generation = config.generation;
            entry.rule_id = decision.rule_id;
            entry.flags &= ct::SWAPPED;
            // Checked under this generation here, or not yet (the other direction).
            entry.ifindex = [0, 0];
            entry.ifindex[dir] = checked_on;
            entry.last_seen_ns[dir] = now;
            report.reason = Reason::Established;
            return true;
        }
        // Revoked: forget the flow. The packet gets the flow's new verdict — a reply included,
        // so a cut connection cannot carry on in the other direction.
        conntrack::forget(&key);
    }
    report.reason = decision.reason;
    report.direction = decision.direction;
    report.rule_id = decision.rule_id;
    let (pass, admitted) = if decision.allow {
        if decision.staged {
            // Reported once, when the flow starts; its later packets are established.
            report.verdict = Verdict::Audit;
            report.flags |= event_flags::STAGED;
        }
        (true, 0)
    } else {
        // Monitor mode passes a denial: remember the flow so it is reported once, not once
        // per packet (and judged again once the node enforces).
        (deny(report), ct::AUDIT)
    };
    if pass && !conntrack::admit(&key, order, pkt, decision.rule_id, config.generation, admitted, now, checked_on) && admitted == 0 {
        // An allowed flow conntrack cannot hold would lose its replies: refuse it whole.
        report.reason = Reason::TableFull;
        return deny(report);
    }
    pass
}

/// A packet refused before any policy: named by the ends its addresses belong to, as far as
/// they parsed.
#[inline(always)]
fn refuse(pkt: &Packet, at: At, config: &Config, reason: Reason, report: &mut Report) -> bool {
    report.reason = reason;
    if pkt.family != 0 {
        let ends = policy::identify(config.slot, pkt, at);
        report.src_identity = ends.src;
        report.dst_identity = ends.dst;
        report.flags = ends.flags;
    }
    deny(report)
}

/// A denial; in monitor mode it becomes an audit and the packet passes.
#[inline(always)]
fn deny(report: &mut Report) -> bool {
    let enforce = report.mode == mode::ENFORCE;
    report.verdict = if enforce { Verdict::Deny } else { Verdict::Audit };
    !enforce
}

/// This CPU's packet record, cleared. Programs run to completion on one CPU without
/// preemption by another zt program on it, so nothing else uses it meanwhile. (The lookup
/// cannot fail: the array has its one element on every CPU; the callers deny if it did.)
#[inline(always)]
fn scratch_packet() -> Option<&'static mut Packet> {
    let pkt = unsafe { &mut *ZT_SCRATCH.get_ptr_mut(0)? };
    parse::clear(pkt);
    Some(pkt)
}

#[inline(always)]
fn tc(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len();
    // Headers may sit in paged data; a failed pull leaves them unreadable and the parser denies.
    // Pulled only when they do: the pull also makes a cloned skb's head private (a copy, for
    // every TCP segment, which is a clone of the socket's own).
    let wanted = if len < TC_PULL_BYTES { len } else { TC_PULL_BYTES };
    if ((ctx.data_end() - ctx.data()) as u32) < wanted {
        let _ = ctx.pull_data(wanted);
    }
    let at = At { ctx: ctx.skb.skb as *mut _, hook, ifindex: unsafe { (*ctx.skb.skb).ifindex }, cgroup_id: 0 };
    let Some(pkt) = scratch_packet() else { return TC_ACT_SHOT };
    let mut frag = Fragment::none();
    let parsed = parse::parse_frame(ctx.data(), ctx.data_end(), len as usize, pkt, &mut frag);
    // UNSPEC hands the packet on to the next program in the chain instead of ending it.
    if judge(pkt, parsed, &frag, at) { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
}

/// Host-side veth ingress: traffic leaving a workload.
#[classifier]
pub fn zt_tc_ingress(ctx: TcContext) -> i32 {
    tc(&ctx, Hook::TcIngress)
}

/// Host-side veth egress: traffic entering a workload.
#[classifier]
pub fn zt_tc_egress(ctx: TcContext) -> i32 {
    tc(&ctx, Hook::TcEgress)
}

/// Uplink: traffic from other nodes, judged before an skb exists.
#[xdp]
pub fn zt_xdp(ctx: XdpContext) -> u32 {
    let at = At { ctx: ctx.ctx as *mut _, hook: Hook::Xdp, ifindex: unsafe { (*ctx.ctx).ingress_ifindex }, cgroup_id: 0 };
    let Some(pkt) = scratch_packet() else { return xdp_action::XDP_DROP };
    let mut frag = Fragment::none();
    // The whole frame's length: the headers are in the linear part, the rest may be in fragments.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    let parsed = parse::parse_frame(ctx.data(), ctx.data_end(), len, pkt, &mut frag);
    if judge(pkt, parsed, &frag, at) { xdp_action::XDP_PASS } else { xdp_action::XDP_DROP }
}

/// cgroup hooks see packets from their IP header on, and know the local socket's cgroup.
#[inline(always)]
fn cgroup(ctx: &SkBuffContext, hook: Hook) -> i32 {
    let skb = ctx.skb.skb;
    let (data, end, len, protocol, ifindex) =
        unsafe { ((*skb).data as usize, (*skb).data_end as usize, (*skb).len, (*skb).protocol, (*skb).ifindex) };
    let at = At { ctx: skb as *mut _, hook, ifindex, cgroup_id: unsafe { bpf_skb_cgroup_id(skb) } };
    let Some(pkt) = scratch_packet() else { return 0 };
    let mut frag = Fragment::none();
    let parsed = parse::parse_packet(data, end, len as usize, u16::from_be(protocol as u16), pkt, &mut frag);
    if judge(pkt, parsed, &frag, at) { 1 } else { 0 }
}

/// Traffic delivered to a process in an attached cgroup.
#[cgroup_skb(ingress)]
pub fn zt_cgroup_ingress(ctx: SkBuffContext) -> i32 {
    cgroup(&ctx, Hook::CgroupIngress)
}

/// Traffic sent by a process in an attached cgroup.
#[cgroup_skb(egress)]
pub fn zt_cgroup_egress(ctx: SkBuffContext) -> i32 {
    cgroup(&ctx, Hook::CgroupEgress)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
