//! Flow events: read from the kernel's ring buffer, decoded, and named (identities, policy, rule,
//! interface, node) into a [`FlowRecord`] — zt's JSON contract, which every sink derives from —
//! then handed to the fan-out ([`crate::fanout`]) a batch at a time; the fan-out never makes the
//! reader wait.
//!
//! A record keeps the kernel's event and the policy generation that decided it, and writes its
//! names as it is serialized: enriching an event allocates nothing on the usual path, and a JSON
//! sink serializes the record straight into its line.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use nix::time::{clock_gettime, ClockId};
use serde::{ser::SerializeStruct as _, Serialize, Serializer};
use serde_json::Value;
use tokio::io::{unix::AsyncFd, Interest};
use zt_common::{event_flags, identity, proto, Direction, FlowEvent, Hook, Reason, Verdict, NO_RULE};

use crate::{
    datapath::Mode,
    fanout::{Record, Sinks},
    policy::compile::Compiled,
    reload::Policies,
    sources::IdentitySources,
};

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

fn ip_of(ev: &FlowEvent, addr: &[u8; 16]) -> Option<IpAddr> {
    match ev.family {
        4 => Some(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]).into()),
        6 => Some(Ipv6Addr::from(*addr).into()),
        _ => None,
    }
}

/// An event's time: RFC 3339 with nanoseconds, UTC.
#[derive(Clone, Copy, Debug)]
struct Timestamp {
    /// `2026-11-26T23:59:03`
    second: ShortText,
    nanos: u32,
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}Z", self.second.as_str(), self.nanos)
    }
}

/// How one end of a flow was identified.
#[derive(Clone, Debug)]
enum Source {
    /// An undeclared identity (world, host, unknown): no source.
    None,
    Cidr,
    Certificate,
    Interface,
    /// The local process's cgroup, with its path (or id when it is gone).
    Cgroup(String),
}

impl Source {
    fn name(&self) -> Option<&'static str> {
        match self {
            Source::None => None,
            Source::Cidr => Some("cidr"),
            Source::Certificate => Some("certificate"),
            Source::Interface => Some("interface"),
            Source::Cgroup(_) => Some("cgroup"),
        }
    }
}

/// One flow event, named. Serializes to zt's JSON flow object.
#[derive(Clone, Debug)]
pub struct FlowRecord {
    ev: FlowEvent,
    /// The policy generation that decided the flow: its rule and identity names.
    compiled: Arc<Compiled>,
    node: Arc<str>,
    time: Timestamp,
    /// Kept inline, like the time: no count shared with the reader to update per event.
    interface: Option<ShortText>,
    src_source: Source,
    dst_source: Source,
}

impl FlowRecord {
    pub fn verdict(&self) -> &'static str {
        verdict_name(self.ev.verdict)
    }

    /// The identity names of the source and the destination.
    pub fn identities(&self) -> [Option<&str>; 2] {
        [self.compiled.identities.name(self.ev.src_identity), self.compiled.identities.name(self.ev.dst_identity)]
    }

    fn is_icmp(&self) -> bool {
        matches!(self.ev.protocol, proto::ICMP | proto::ICMPV6)
    }

    fn ports(&self) -> (Option<u16>, Option<u16>) {
        if self.ev.family == 0 || self.is_icmp() {
            (None, None)
        } else {
            (Some(self.ev.src_port), Some(self.ev.dst_port))
        }
    }
}

/// The JSON line of a flow, written by hand: what the `Serialize` impl writes, byte for byte
/// (the tests hold them together), at a fraction of the cost — field names are written as they
/// are, and only names from the policy, the node and the system are escaped.
impl FlowRecord {
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let ev = &self.ev;
        let reason = Reason::from_u8(ev.reason);
        let rule = (ev.rule_id != NO_RULE).then(|| self.compiled.rule(ev.rule_id)).flatten();
        let policy = match (rule, reason) {
            (Some(rule), _) => Some(rule.policy.as_str()),
            (None, Some(Reason::DefaultDeny)) => Some("default-deny"),
            _ => None,
        };
        let (src_port, dst_port) = self.ports();
        out.extend_from_slice(b"{\"kind\":\"flow\",\"time\":\"");
        out.extend_from_slice(self.time.second.as_str().as_bytes());
        let mut digits = itoa::Buffer::new();
        let nanos = digits.format(self.time.nanos);
        out.push(b'.');
        out.extend(std::iter::repeat_n(b'0', 9 - nanos.len()));
        out.extend_from_slice(nanos.as_bytes());
        out.extend_from_slice(b"Z\",\"node\":");
        json_str(out, Some(&self.node));
        for (key, name) in [
            (&b",\"verdict\":\""[..], self.verdict()),
            (b"\",\"mode\":\"", Mode::from_raw(ev.mode as u32).name()),
            (b"\",\"reason\":\"", reason.map_or("unknown", Reason::name)),
            (b"\",\"direction\":\"", direction_name(ev.direction)),
            (b"\",\"hook\":\"", hook_name(ev.hook)),
        ] {
            out.extend_from_slice(key);
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(b"\",\"interface\":");
        json_str(out, self.interface.as_ref().map(ShortText::as_str));
        out.extend_from_slice(b",\"protocol\":");
        match protocol_name(ev.protocol, ev.family) {
            Some(ProtocolName(proto::TCP)) => out.extend_from_slice(b"\"tcp\""),
            Some(ProtocolName(proto::UDP)) => out.extend_from_slice(b"\"udp\""),
            protocol => json_text(out, protocol),
        }
        out.extend_from_slice(b",\"src\":");
        self.write_endpoint(out, &ev.src_addr, src_port, ev.src_identity, &self.src_source);
        out.extend_from_slice(b",\"dst\":");
        self.write_endpoint(out, &ev.dst_addr, dst_port, ev.dst_identity, &self.dst_source);
        out.extend_from_slice(b",\"policy\":");
        json_str(out, policy);
        out.extend_from_slice(b",\"rule\":");
        json_text(out, rule.map(RuleName));
        out.extend_from_slice(b",\"generation\":");
        json_number(out, ev.generation);
        out.extend_from_slice(b",\"suppressed\":");
        json_number(out, ev.suppressed);
        if ev.flags & event_flags::STAGED != 0 {
            out.extend_from_slice(b",\"staged\":true");
        }
        if self.is_icmp() {
            out.extend_from_slice(b",\"icmp\":{\"type\":");
            json_number(out, ev.dst_port);
            out.extend_from_slice(b",\"id\":");
            json_number(out, ev.src_port);
            out.push(b'}');
        }
        out.push(b'}');
    }

    fn write_endpoint(&self, out: &mut Vec<u8>, addr: &[u8; 16], port: Option<u16>, identity: u32, source: &Source) {
        out.extend_from_slice(b"{\"ip\":");
        match ip_of(&self.ev, addr) {
            Some(IpAddr::V4(ip)) => {
                out.push(b'"');
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    json_number(out, octet);
                }
                out.push(b'"');
            }
            ip => json_text(out, ip),
        }
        out.extend_from_slice(b",\"port\":");
        match port {
            Some(port) => json_number(out, port),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"identity\":");
        json_str(out, self.compiled.identities.name(identity));
        out.extend_from_slice(b",\"identity_id\":");
        json_number(out, identity);
        out.extend_from_slice(b",\"source\":");
        match source.name() {
            // The names need no escaping.
            Some(name) => {
                out.push(b'"');
                out.extend_from_slice(name.as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        if let Source::Cgroup(path) = source {
            out.extend_from_slice(b",\"cgroup\":");
            json_str(out, Some(path));
        }
        if let Some(range) = self.compiled.range(identity) {
            out.extend_from_slice(b",\"range\":");
            json_text(out, Some(range));
        }
        out.push(b'}');
    }
}

/// A JSON string (escaped), or null.
fn json_str(out: &mut Vec<u8>, s: Option<&str>) {
    serde_json::to_writer(out, &s).expect("strings serialize");
}

/// A value's text as a JSON string, or null.
fn json_text(out: &mut Vec<u8>, value: Option<impl fmt::Display>) {
    serde_json::to_writer(out, &Text(value)).expect("text serializes");
}

fn json_number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// The rule that decided a flow, as `policy/direction/index`.
struct RuleName<'a>(&'a crate::policy::compile::RuleInfo);

impl fmt::Display for RuleName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.0.policy, direction_name(self.0.direction as u8), self.0.index)
    }
}

/// Serializes `Some(value)` as the value's text, `None` as null.
struct Text<T>(Option<T>);

impl<T: fmt::Display> Serialize for Text<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(value) = &self.0 else { return serializer.serialize_none() };
        // Formatted on the stack and handed over whole: JSON writers escape every piece they
        // are given, and an address or a time comes in many small pieces.
        let mut text = ShortText::default();
        match fmt::write(&mut text, format_args!("{value}")) {
            Ok(()) => serializer.serialize_str(text.as_str()),
            Err(_) => serializer.collect_str(value),
        }
    }
}

/// Text of up to 64 bytes, kept inline; longer text is refused.
#[derive(Clone, Copy)]
struct ShortText {
    bytes: [u8; 64],
    len: usize,
}

impl Default for ShortText {
    fn default() -> Self {
        ShortText { bytes: [0; 64], len: 0 }
    }
}

impl fmt::Debug for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl ShortText {
    fn from_str(s: &str) -> Option<Self> {
        let mut text = ShortText::default();
        fmt::Write::write_str(&mut text, s).ok()?;
        Some(text)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("only whole strs are written")
    }
}

impl fmt::Write for ShortText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// One end of a flow, as the JSON object `src` or `dst`.
struct Endpoint<'a> {
    record: &'a FlowRecord,
    addr: &'a [u8; 16],
    port: Option<u16>,
    identity: u32,
    source: &'a Source,
}

impl Serialize for Endpoint<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let compiled = &self.record.compiled;
        // A world address inside a range a CIDR peer names: which range classified it.
        let range = compiled.range(self.identity);
        let cgroup = match self.source {
            Source::Cgroup(path) => Some(path),
            _ => None,
        };
        let mut end = serializer.serialize_struct("Endpoint", 5 + cgroup.is_some() as usize + range.is_some() as usize)?;
        end.serialize_field("ip", &Text(ip_of(&self.record.ev, self.addr)))?;
        end.serialize_field("port", &self.port)?;
        end.serialize_field("identity", &compiled.identities.name(self.identity))?;
        end.serialize_field("identity_id", &self.identity)?;
        end.serialize_field("source", &self.source.name())?;
        if let Some(path) = cgroup {
            end.serialize_field("cgroup", path)?;
        }
        if let Some(range) = range {
            end.serialize_field("range", &Text(Some(range)))?;
        }
        end.end()
    }
}

/// ICMP's type and id, in place of ports.
#[derive(Serialize)]
struct Icmp {
    r#type: u16,
    id: u16,
}

impl Serialize for FlowRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ev = &self.ev;
        let reason = Reason::from_u8(ev.reason);
        let rule = (ev.rule_id != NO_RULE).then(|| self.compiled.rule(ev.rule_id)).flatten();
        let policy = match (rule, reason) {
            (Some(rule), _) => Some(rule.policy.as_str()),
            (None, Some(Reason::DefaultDeny)) => Some("default-deny"),
            _ => None,
        };
        let staged = ev.flags & event_flags::STAGED != 0;
        let icmp = self.is_icmp();
        let (src_port, dst_port) = self.ports();
        let mut line = serializer.serialize_struct("FlowRecord", 16 + staged as usize + icmp as usize)?;
        line.serialize_field("kind", "flow")?;
        line.serialize_field("time", &Text(Some(&self.time)))?;
        line.serialize_field("node", &*self.node)?;
        line.serialize_field("verdict", self.verdict())?;
        line.serialize_field("mode", Mode::from_raw(ev.mode as u32).name())?;
        line.serialize_field("reason", reason.map_or("unknown", Reason::name))?;
        line.serialize_field("direction", direction_name(ev.direction))?;
        line.serialize_field("hook", hook_name(ev.hook))?;
        line.serialize_field("interface", &self.interface.as_ref().map(ShortText::as_str))?;
        line.serialize_field("protocol", &Text(protocol_name(ev.protocol, ev.family)))?;
        let src = Endpoint { record: self, addr: &ev.src_addr, port: src_port, identity: ev.src_identity, source: &self.src_source };
        line.serialize_field("src", &src)?;
        let dst = Endpoint { record: self, addr: &ev.dst_addr, port: dst_port, identity: ev.dst_identity, source: &self.dst_source };
        line.serialize_field("dst", &dst)?;
        line.serialize_field("policy", &policy)?;
        line.serialize_field("rule", &Text(rule.map(RuleName)))?;
        line.serialize_field("generation", &ev.generation)?;
        line.serialize_field("suppressed", &ev.suppressed)?;
        if staged {
            // The policies in force passed the flow; a `mode: monitor` policy would not.
            line.serialize_field("staged", &true)?;
        }
        if icmp {
            line.serialize_field("icmp", &Icmp { r#type: ev.dst_port, id: ev.src_port })?;
        }
        line.end()
    }
}

/// The names of the kernel's codes are zt_common's; an unknown code gets a placeholder.
pub fn verdict_name(v: u8) -> &'static str {
    Verdict::from_u8(v).map_or("unknown", Verdict::name)
}

pub fn direction_name(d: u8) -> &'static str {
    Direction::from_u8(d).map_or("none", Direction::name)
}

fn hook_name(h: u8) -> &'static str {
    Hook::from_u8(h).map_or("unknown", Hook::name)
}

/// The protocol's name, or its number for others; none for a frame that is not IP.
fn protocol_name(p: u8, family: u8) -> Option<ProtocolName> {
    (family != 0).then_some(ProtocolName(p))
}

struct ProtocolName(u8);

impl fmt::Display for ProtocolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            proto::TCP => f.write_str("tcp"),
            proto::UDP => f.write_str("udp"),
            proto::SCTP => f.write_str("sctp"),
            proto::ICMP => f.write_str("icmp"),
            proto::ICMPV6 => f.write_str("icmpv6"),
            other => write!(f, "{other}"),
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

#[cfg(test)]
mod tests {
    use zt_common::{mode, Hook};

    use super::*;
    use crate::{fanout::Record, policy};

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
        let rule = compiled.rules.iter().position(|r| r.policy == "db-access").unwrap() as u32 + 1;
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
