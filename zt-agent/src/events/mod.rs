//! Flow events: read from the kernel's ring buffer, decoded, and named (identities, policy, rule,
//! interface, node) into a [`FlowRecord`] — zt's JSON contract, which every sink derives from —
//! then handed to the fan-out ([`fanout`]) a batch at a time; the fan-out never makes the reader
//! wait.
//!
//! Imports run one way: [`record`] (the records and their JSON) ← [`sinks`] (formats and
//! transports) ← [`fanout`] (the queues between the reader and the sinks) ← this reader.
//! [`limits`] parses the kernel's event rate limits.

pub mod fanout;
pub mod limits;
pub mod record;
pub mod sinks;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use nix::time::{clock_gettime, ClockId};
use tokio::io::{unix::AsyncFd, Interest};
use zt_common::{event_flags, identity, FlowEvent};

use fanout::Sinks;
/// The kernel's codes by name, defined with the records that write them.
pub use record::{direction_name, verdict_name};
use record::{ip_of, FlowRecord, Record, ShortText, Source, Timestamp};

use crate::{identity::sources::IdentitySources, state::Policies};

/// Reads a `FlowEvent` out of a ring-buffer record.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    (bytes.len() >= size_of::<FlowEvent>())
        // SAFETY: FlowEvent is plain data and the length was checked.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Names kernel events: identity, policy, interface and node names, and the time of day.
pub struct Enricher {
    node: Arc<str>,
    /// Rules and identity names by generation: an event is named by the policy that decided it.
    policies: Arc<Mutex<Policies>>,
    sources: Arc<Mutex<IdentitySources>>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, to date kernel timestamps.
    realtime_offset_ns: i128,
    interfaces: HashMap<u32, ShortText>,
    /// The last second an event was dated in, and its RFC 3339 text up to the fraction.
    second: Option<(u64, ShortText)>,
}

fn clock_ns(clock: ClockId) -> i128 {
    let t = clock_gettime(clock).expect("clock_gettime cannot fail for standard clocks");
    t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
}

impl Enricher {
    pub fn new(node: String, policies: Arc<Mutex<Policies>>, sources: Arc<Mutex<IdentitySources>>) -> Self {
        let realtime_offset_ns = clock_ns(ClockId::CLOCK_REALTIME) - clock_ns(ClockId::CLOCK_MONOTONIC);
        Self { node: node.into(), policies, sources, realtime_offset_ns, interfaces: HashMap::new(), second: None }
    }

    fn interface(&mut self, ifindex: u32) -> ShortText {
        *self.interfaces.entry(ifindex).or_insert_with(|| {
            let name = nix::net::if_::if_indextoname(ifindex)
                .map_or_else(|_| format!("if{ifindex}"), |name| name.to_string_lossy().into_owned());
            ShortText::from_str(&name).expect("interface names are at most 15 bytes (IFNAMSIZ)")
        })
    }

    fn time(&mut self, monotonic_ns: u64) -> Timestamp {
        let ns = (monotonic_ns as i128 + self.realtime_offset_ns).max(0) as u128;
        let (second, nanos) = ((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32);
        // Events come in bursts within a second: its text is made once.
        let prefix = match self.second {
            Some((cached, prefix)) if cached == second => prefix,
            _ => {
                let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second)).to_string();
                let prefix = ShortText::from_str(text.trim_end_matches('Z')).expect("an RFC 3339 time is short");
                self.second = Some((second, prefix));
                prefix
            }
        };
        Timestamp { second: prefix, nanos }
    }

    /// How the kernel identified one end. `by` is `event_flags::*_CGROUP`, `*_INTERFACE`, or 0
    /// for its address.
    fn source(ev: &FlowEvent, ip: Option<IpAddr>, identity: u32, by: u8, sources: &IdentitySources) -> Source {
        match by {
            event_flags::SRC_CGROUP | event_flags::DST_CGROUP => Source::Cgroup(
                sources.cgroup_path(ev.cgroup_id).map_or_else(|| ev.cgroup_id.to_string(), str::to_owned),
            ),
            event_flags::SRC_INTERFACE | event_flags::DST_INTERFACE => Source::Interface,
            _ if !identity::is_declared(identity) => Source::None,
            _ if ip.is_some_and(|ip| sources.bound_by_certificate(ip)) => Source::Certificate,
            _ => Source::Cidr,
        }
    }

    pub fn enrich(&mut self, ev: &FlowEvent) -> FlowRecord {
        let compiled = self.policies.lock().expect("policies lock poisoned").of_generation(ev.generation).clone();
        let (src_source, dst_source) = {
            let sources = self.sources.lock().expect("sources lock poisoned");
            let src_by = ev.flags & (event_flags::SRC_CGROUP | event_flags::SRC_INTERFACE);
            let dst_by = ev.flags & (event_flags::DST_CGROUP | event_flags::DST_INTERFACE);
            (
                Self::source(ev, ip_of(ev, &ev.src_addr), ev.src_identity, src_by, &sources),
                Self::source(ev, ip_of(ev, &ev.dst_addr), ev.dst_identity, dst_by, &sources),
            )
        };
        FlowRecord {
            time: self.time(ev.timestamp_ns),
            node: self.node.clone(),
            interface: (ev.ifindex != 0).then(|| self.interface(ev.ifindex)),
            src_source,
            dst_source,
            compiled,
            ev: *ev,
        }
    }
}

/// Records handed to the fan-out at once at most: one lock and one queue pass per batch.
const BATCH: usize = 1024;

/// Reads, decodes and names every event the ring buffer holds, handing them to the sinks in
/// batches. Returns how many were read.
pub fn drain(ring: &mut RingBuf<MapData>, enricher: &mut Enricher, sinks: &Sinks) -> usize {
    let mut batch = Vec::with_capacity(BATCH);
    let mut read = 0;
    while let Some(record) = ring.next() {
        read += 1;
        match decode(&record) {
            Some(ev) => batch.push(Record::from(enricher.enrich(&ev))),
            None => tracing::warn!(len = record.len(), "short flow event record ignored"),
        }
        drop(record);
        if batch.len() == BATCH {
            sinks.publish_all(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
        }
    }
    sinks.publish_all(batch);
    read
}

/// Reads, decodes and enriches events and publishes them to the sinks, until the task is dropped.
pub async fn stream(ring: RingBuf<MapData>, mut enricher: Enricher, sinks: Arc<Sinks>) -> Result<()> {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    loop {
        let mut guard = ring.readable_mut().await?;
        drain(guard.get_inner_mut(), &mut enricher, &sinks);
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use zt_common::{mode, proto, Direction, Hook, Reason, Verdict, NO_RULE};

    use super::*;
    use crate::policy::{self, compile::Compiled};

    const POLICY: &str = r#"
apiVersion: zt/v1
kind: Identity
metadata: {name: api}
spec:
  selectors: [{cidr: 10.20.2.0/24}]
---
apiVersion: zt/v1
kind: Identity
metadata: {name: db}
spec:
  selectors: [{cidr: 10.20.3.0/24}]
---
apiVersion: zt/v1
kind: Policy
metadata: {name: db-access}
spec:
  subject: [db]
  ingress:
    - from: [api]
      ports: [{protocol: tcp, port: 5432}]
  egress:
    - to: [{cidr: 192.0.2.0/24}]
"#;

    /// An enricher on the policy above whose clock reads kernel timestamps as UTC.
    fn enricher() -> (Enricher, Arc<Compiled>) {
        let set = policy::parse_str(POLICY, "t.yaml").unwrap();
        let compiled = Arc::new(policy::compile::compile(&set).unwrap());
        let policies = Arc::new(Mutex::new(Policies::new(3, compiled.clone())));
        let sources = Arc::new(Mutex::new(IdentitySources::new(compiled.clone(), None, None)));
        let mut enricher = Enricher::new("node-a".into(), policies, sources);
        enricher.realtime_offset_ns = 0;
        (enricher, compiled)
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut addr = [0; 16];
        addr[12..].copy_from_slice(&a);
        addr
    }

    fn time(ns: u64) -> String {
        humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
    }

    /// The record as serialized, checked against the line JSON sinks write and its `Value` view
    /// (what OCSF, CEF and syslog derive from): same fields, same order.
    fn json(record: FlowRecord) -> String {
        let line = serde_json::to_string(&record).unwrap();
        let mut written = Vec::new();
        record.write_json(&mut written);
        assert_eq!(String::from_utf8(written).unwrap(), line, "the JSON sinks' line");
        assert_eq!(Record::from(record).to_string(), line, "the JSON value other formats derive from");
        line
    }

    #[test]
    fn a_flow_is_named_by_the_policy_that_decided_it() {
        let (mut enricher, compiled) = enricher();
        let (api, db) = (compiled.identities.id("api").unwrap(), compiled.identities.id("db").unwrap());
        let rule = compiled.rules.iter().position(|r| &*r.policy == "db-access").unwrap() as u32 + 1;
        let at = 1_764_201_543_000_000_007;
        let ev = FlowEvent {
            timestamp_ns: at,
            src_addr: v4([10, 20, 2, 7]),
            dst_addr: v4([10, 20, 3, 2]),
            src_identity: api,
            dst_identity: db,
            rule_id: rule,
            generation: 3,
            src_port: 40000,
            dst_port: 5432,
            protocol: proto::TCP,
            family: 4,
            hook: Hook::TcEgress as u8,
            direction: Direction::Ingress as u8,
            verdict: Verdict::Allow as u8,
            reason: Reason::PolicyAllow as u8,
            mode: mode::ENFORCE as u8,
            suppressed: 2,
            ..FlowEvent::default()
        };
        assert_eq!(
            json(enricher.enrich(&ev)),
            format!(
                r#"{{"kind":"flow","time":"{}","node":"node-a","verdict":"allow","mode":"enforce","reason":"policy-allow","direction":"ingress","hook":"tc-egress","interface":null,"protocol":"tcp","src":{{"ip":"10.20.2.7","port":40000,"identity":"api","identity_id":{api},"source":"cidr"}},"dst":{{"ip":"10.20.3.2","port":5432,"identity":"db","identity_id":{db},"source":"cidr"}},"policy":"db-access","rule":"db-access/ingress/0","generation":3,"suppressed":2}}"#,
                time(at)
            )
        );
        // The next event in the same second reuses the second's text.
        let later = FlowEvent { timestamp_ns: at + 999_999_000, ..ev };
        assert!(json(enricher.enrich(&later)).contains(&format!(r#""time":"{}""#, time(at + 999_999_000))));
        let next_second = FlowEvent { timestamp_ns: at + 1_000_000_000, ..ev };
        assert!(json(enricher.enrich(&next_second)).contains(&format!(r#""time":"{}""#, time(at + 1_000_000_000))));
    }

    #[test]
    fn icmp_staged_cgroup_interface_and_non_ip_events_keep_their_fields() {
        let (mut enricher, compiled) = enricher();
        let db = compiled.identities.id("db").unwrap();
        let at = 1_000_000_000_123_456_789;
        let icmp = FlowEvent {
            timestamp_ns: at,
            src_addr: v4([10, 20, 3, 2]),
            dst_addr: v4([192, 0, 2, 1]),
            src_identity: db,
            dst_identity: identity::WORLD,
            rule_id: NO_RULE,
            ifindex: 1,
            generation: 9,
            src_port: 77,
            dst_port: 8,
            protocol: proto::ICMP,
            family: 4,
            hook: Hook::CgroupEgress as u8,
            direction: Direction::Egress as u8,
            verdict: Verdict::Audit as u8,
            reason: Reason::DefaultDeny as u8,
            mode: mode::MONITOR as u8,
            flags: event_flags::SRC_CGROUP | event_flags::STAGED,
            cgroup_id: 4242,
            ..FlowEvent::default()
        };
        let lo = nix::net::if_::if_indextoname(1).unwrap().into_string().unwrap();
        assert_eq!(
            json(enricher.enrich(&icmp)),
            format!(
                r#"{{"kind":"flow","time":"{}","node":"node-a","verdict":"audit","mode":"monitor","reason":"default-deny","direction":"egress","hook":"cgroup-egress","interface":"{lo}","protocol":"icmp","src":{{"ip":"10.20.3.2","port":null,"identity":"db","identity_id":{db},"source":"cgroup","cgroup":"4242"}},"dst":{{"ip":"192.0.2.1","port":null,"identity":"world","identity_id":{},"source":null}},"policy":"default-deny","rule":null,"generation":9,"suppressed":0,"staged":true,"icmp":{{"type":8,"id":77}}}}"#,
                time(at),
                identity::WORLD
            )
        );
        let not_ip = FlowEvent {
            family: 0,
            protocol: 0,
            src_identity: 0,
            dst_identity: 0,
            flags: event_flags::DST_INTERFACE,
            reason: Reason::UnsupportedProtocol as u8,
            verdict: Verdict::Deny as u8,
            ..icmp
        };
        let line = json(enricher.enrich(&not_ip));
        assert!(line.contains(r#""protocol":null,"src":{"ip":null,"port":null,"#), "{line}");
        assert!(line.contains(r#""source":"interface"}"#), "{line}");
        assert!(line.ends_with(r#""policy":null,"rule":null,"generation":9,"suppressed":0}"#), "{line}");
        let gre = FlowEvent { protocol: 47, family: 6, ..not_ip };
        assert!(json(enricher.enrich(&gre)).contains(r#""protocol":"47""#));
        // A world address in a range a CIDR peer names carries the range.
        let range = compiled.ranges[0].1;
        let to_range = FlowEvent { dst_identity: range, protocol: proto::UDP, ..icmp };
        let line = json(enricher.enrich(&to_range));
        assert!(
            line.contains(&format!(r#""identity":"world","identity_id":{range},"source":null,"range":"192.0.2.0/24"}}"#)),
            "{line}"
        );
    }
}
