//! Flow events: read from the kernel's ring buffer, decoded, and enriched with names into one JSON
//! object — the contract every sink derives from — then handed to the fan-out
//! ([`crate::fanout`]), which never makes the reader wait.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use nix::time::{clock_gettime, ClockId};
use serde_json::{json, Value};
use tokio::io::{unix::AsyncFd, Interest};
use zt_common::{event_flags, identity, proto, Direction, FlowEvent, Hook, Reason, Verdict, NO_RULE};

use crate::{datapath::Mode, fanout::Sinks, policy::compile::Compiled, reload::Policies, sources::IdentitySources};

/// Reads a `FlowEvent` out of a ring-buffer record.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    (bytes.len() >= size_of::<FlowEvent>())
        // SAFETY: FlowEvent is plain data and the length was checked.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Turns kernel events into JSON with identity, policy, interface and node names.
pub struct Enricher {
    node: String,
    /// Rules and identity names by generation: an event is named by the policy that decided it.
    policies: Arc<Mutex<Policies>>,
    sources: Arc<Mutex<IdentitySources>>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, to date kernel timestamps.
    realtime_offset_ns: i128,
    interfaces: HashMap<u32, String>,
}

fn clock_ns(clock: ClockId) -> i128 {
    let t = clock_gettime(clock).expect("clock_gettime cannot fail for standard clocks");
    t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
}

impl Enricher {
    pub fn new(node: String, policies: Arc<Mutex<Policies>>, sources: Arc<Mutex<IdentitySources>>) -> Self {
        let realtime_offset_ns = clock_ns(ClockId::CLOCK_REALTIME) - clock_ns(ClockId::CLOCK_MONOTONIC);
        Self { node, policies, sources, realtime_offset_ns, interfaces: HashMap::new() }
    }

    fn interface(&mut self, ifindex: u32) -> String {
        self.interfaces
            .entry(ifindex)
            .or_insert_with(|| {
                nix::net::if_::if_indextoname(ifindex)
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| format!("if{ifindex}"))
            })
            .clone()
    }

    fn time(&self, monotonic_ns: u64) -> String {
        let ns = (monotonic_ns as i128 + self.realtime_offset_ns).max(0) as u128;
        let at = UNIX_EPOCH + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32);
        humantime::format_rfc3339_nanos(at).to_string()
    }

    /// One end of the flow. `by` is how the kernel identified it: `event_flags::*_CGROUP`,
    /// `*_INTERFACE`, or 0 for its address.
    fn endpoint(
        &self,
        compiled: &Compiled,
        ev: &FlowEvent,
        addr: &[u8; 16],
        port: Option<u16>,
        identity: u32,
        by: u8,
    ) -> Value {
        let ip: Option<IpAddr> = match ev.family {
            4 => Some(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]).into()),
            6 => Some(Ipv6Addr::from(*addr).into()),
            _ => None,
        };
        let sources = self.sources.lock().expect("sources lock poisoned");
        let source = match by {
            event_flags::SRC_CGROUP | event_flags::DST_CGROUP => Some("cgroup"),
            event_flags::SRC_INTERFACE | event_flags::DST_INTERFACE => Some("interface"),
            _ if !identity::is_declared(identity) => None,
            _ if ip.is_some_and(|ip| sources.bound_by_certificate(ip)) => Some("certificate"),
            _ => Some("cidr"),
        };
        let mut end = json!({
            "ip": ip.map(|ip| ip.to_string()),
            "port": port,
            "identity": compiled.identities.name(identity),
            "identity_id": identity,
            "source": source,
        });
        if source == Some("cgroup") {
            end["cgroup"] = sources.cgroup_path(ev.cgroup_id).map_or_else(|| ev.cgroup_id.to_string(), str::to_owned).into();
        }
        // A world address inside a range a CIDR peer names: which range classified it.
        if let Some(range) = compiled.range(identity) {
            end["range"] = range.to_string().into();
        }
        end
    }

    pub fn enrich(&mut self, ev: &FlowEvent) -> Value {
        let reason = Reason::from_u8(ev.reason);
        let is_icmp = matches!(ev.protocol, proto::ICMP | proto::ICMPV6);
        let (src_port, dst_port) =
            if ev.family == 0 || is_icmp { (None, None) } else { (Some(ev.src_port), Some(ev.dst_port)) };
        let compiled = self.policies.lock().expect("policies lock poisoned").of_generation(ev.generation).clone();
        let rule = (ev.rule_id != NO_RULE).then(|| compiled.rule(ev.rule_id)).flatten();
        let policy = match (rule, reason) {
            (Some(rule), _) => Some(rule.policy.clone()),
            (None, Some(Reason::DefaultDeny)) => Some("default-deny".to_owned()),
            _ => None,
        };
        let mut line = json!({
            "kind": "flow",
            "time": self.time(ev.timestamp_ns),
            "node": self.node,
            "verdict": verdict_name(ev.verdict),
            "mode": Mode::from_raw(ev.mode as u32).name(),
            "reason": reason.map_or("unknown", Reason::name),
            "direction": direction_name(ev.direction),
            "hook": hook_name(ev.hook),
            "interface": if ev.ifindex == 0 { Value::Null } else { self.interface(ev.ifindex).into() },
            "protocol": protocol_name(ev.protocol, ev.family),
            "src": self.endpoint(&compiled, ev, &ev.src_addr, src_port, ev.src_identity, ev.flags & (event_flags::SRC_CGROUP | event_flags::SRC_INTERFACE)),
            "dst": self.endpoint(&compiled, ev, &ev.dst_addr, dst_port, ev.dst_identity, ev.flags & (event_flags::DST_CGROUP | event_flags::DST_INTERFACE)),
            "policy": policy,
            "rule": rule.map(|r| format!("{}/{}/{}", r.policy, direction_name(r.direction as u8), r.index)),
            "generation": ev.generation,
            "suppressed": ev.suppressed,
        });
        if ev.flags & event_flags::STAGED != 0 {
            // The policies in force passed the flow; a `mode: monitor` policy would not.
            line["staged"] = true.into();
        }
        if is_icmp {
            line["icmp"] = json!({ "type": ev.dst_port, "id": ev.src_port });
        }
        line
    }
}

pub fn verdict_name(v: u8) -> &'static str {
    match Verdict::from_u8(v) {
        Some(Verdict::Allow) => "allow",
        Some(Verdict::Deny) => "deny",
        Some(Verdict::Audit) => "audit",
        None => "unknown",
    }
}

pub fn direction_name(d: u8) -> &'static str {
    match d {
        x if x == Direction::Ingress as u8 => "ingress",
        x if x == Direction::Egress as u8 => "egress",
        _ => "none",
    }
}

fn hook_name(h: u8) -> &'static str {
    match h {
        x if x == Hook::TcIngress as u8 => "tc-ingress",
        x if x == Hook::TcEgress as u8 => "tc-egress",
        x if x == Hook::Xdp as u8 => "xdp",
        x if x == Hook::CgroupIngress as u8 => "cgroup-ingress",
        x if x == Hook::CgroupEgress as u8 => "cgroup-egress",
        _ => "unknown",
    }
}

fn protocol_name(p: u8, family: u8) -> Value {
    match (family, p) {
        (0, _) => Value::Null,
        (_, proto::TCP) => "tcp".into(),
        (_, proto::UDP) => "udp".into(),
        (_, proto::SCTP) => "sctp".into(),
        (_, proto::ICMP) => "icmp".into(),
        (_, proto::ICMPV6) => "icmpv6".into(),
        (_, other) => other.to_string().into(),
    }
}

/// Reads, decodes and enriches events and publishes them to the sinks, until the task is dropped.
pub async fn stream(ring: RingBuf<MapData>, mut enricher: Enricher, sinks: Arc<Sinks>) -> Result<()> {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    loop {
        let mut guard = ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            match decode(&record) {
                Some(ev) => sinks.publish(enricher.enrich(&ev)),
                None => tracing::warn!(len = record.len(), "short flow event record ignored"),
            }
        }
        guard.clear_ready();
    }
}

/// An agent event — an identity-source event (a certificate bound, rotated, rejected or revoked)
/// or a policy reload's outcome — stamped like flow events with time and node.
pub fn agent_event(node: &str, event: Value) -> Value {
    let mut line = serde_json::Map::new();
    line.insert("time".into(), humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string().into());
    line.insert("node".into(), node.into());
    if let Value::Object(fields) = event {
        line.extend(fields);
    }
    Value::Object(line)
}
