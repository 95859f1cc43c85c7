//! zt's kernel datapath: one pipeline — parse, conntrack, identify, policy, verdict — shared by
//! the TC hooks on workload veths and the XDP hook on uplinks.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod parse;
mod policy;
mod verdict;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use zt_common::{ct, identity, mode, Config, Direction, Hook, Reason, Verdict, NO_RULE};

use crate::{
    maps::ZT_CONFIG,
    parse::{Packet, Parsed},
    verdict::Report,
};

/// Bytes made linear before a TC program parses: the deepest headers the parser reads fit.
const TC_PULL_BYTES: u32 = 256;

/// Judges one frame; true = let it through.
#[inline(always)]
fn judge(data: usize, end: usize, hook: Hook, ifindex: u32) -> bool {
    // The array slot always exists; zeroed (never written) it reads as enforce.
    let config = ZT_CONFIG.get(0).copied().unwrap_or(Config { mode: mode::ENFORCE, generation: 0 });
    let mut pkt = Packet::default();
    let parsed = parse::parse(data, end, &mut pkt);
    let mut report = Report {
        pkt: &pkt,
        src_identity: identity::UNKNOWN,
        dst_identity: identity::UNKNOWN,
        hook,
        ifindex,
        verdict: Verdict::Allow,
        reason: Reason::ControlPlane,
        direction: Direction::None,
        rule_id: NO_RULE,
        mode: config.mode,
        generation: config.generation,
    };
    match parsed {
        Ok(Parsed::ControlPlane) => {
            verdict::record(&report);
            return true;
        }
        Ok(Parsed::Ip) => {}
        Err(reason) => {
            report.reason = reason;
            return deny(&mut report);
        }
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if conntrack::established(&pkt, config.mode, now) {
        report.reason = Reason::Established;
        verdict::record(&report);
        return true;
    }
    report.src_identity = policy::identify(&pkt.src);
    report.dst_identity = policy::identify(&pkt.dst);
    let decision = policy::decide(report.src_identity, report.dst_identity, pkt.protocol, pkt.dst_port);
    report.reason = decision.reason;
    report.direction = decision.direction;
    report.rule_id = decision.rule_id;
    if decision.allow {
        conntrack::admit(&pkt, decision.rule_id, config.generation, 0, now);
        verdict::record(&report);
        return true;
    }
    let pass = deny(&mut report);
    if pass {
        // Monitor mode: remember the flow so it is reported once, not once per packet.
        conntrack::admit(&pkt, decision.rule_id, config.generation, ct::AUDIT, now);
    }
    pass
}

/// Records a denial; in monitor mode it becomes an audit and the packet passes.
#[inline(always)]
fn deny(report: &mut Report) -> bool {
    let enforce = report.mode == mode::ENFORCE;
    report.verdict = if enforce { Verdict::Deny } else { Verdict::Audit };
    verdict::record(report);
    !enforce
}

#[inline(always)]
fn tc(ctx: &TcContext, hook: Hook) -> i32 {
    let len = ctx.len();
    // Headers may sit in paged data; a failed pull leaves them unreadable and the parser denies.
    let _ = ctx.pull_data(if len < TC_PULL_BYTES { len } else { TC_PULL_BYTES });
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // UNSPEC hands the packet on to the next program in the chain instead of ending it.
    if judge(ctx.data(), ctx.data_end(), hook, ifindex) { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
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
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if judge(ctx.data(), ctx.data_end(), Hook::Xdp, ifindex) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
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
