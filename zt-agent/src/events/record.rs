//! The records the event pipeline carries, and their JSON: a flow event named by the reader (a
//! [`FlowRecord`] — zt's JSON contract, which every sink derives from), an agent event, the
//! [`Record`] and [`Event`] the fan-out queues and the sinks write, and the [`Filter`] a consumer
//! picks them with. Below the reader, the fan-out and the sinks, which all use it; it uses none
//! of them.
//!
//! A record keeps the kernel's event and the policy generation that decided it, and writes its
//! names as it is serialized: enriching an event allocates nothing on the usual path, and a JSON
//! sink serializes the record straight into its line.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    sync::{Arc, OnceLock},
};

use serde::{ser::SerializeStruct as _, Deserialize, Serialize, Serializer};
use serde_json::Value;
use zt_common::{event_flags, proto, Direction, FlowEvent, Hook, Reason, Verdict, NO_RULE};

use crate::{datapath::Mode, policy::compile::Compiled};

/// An enriched event, shared by every queue it is put in.
pub type Event = Arc<Record>;

/// An enriched event: a flow from the kernel, kept typed so that a JSON sink serializes it
/// straight into its line, or an agent event (identity, policy) as JSON. As a [`Value`] (by
/// `Deref`, for formats derived from the JSON), a flow is built once, when a sink first asks.
#[derive(Debug)]
pub struct Record {
    flow: Option<FlowRecord>,
    json: OnceLock<Value>,
}

impl Record {
    pub fn is_flow(&self) -> bool {
        match &self.flow {
            Some(_) => true,
            None => self["kind"] == "flow",
        }
    }

    /// Appends the event's JSON object to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match &self.flow {
            Some(flow) => flow.write_json(out),
            None => serde_json::to_writer(out, &**self).expect("events serialize"),
        }
    }
}

impl From<FlowRecord> for Record {
    fn from(flow: FlowRecord) -> Self {
        Record { flow: Some(flow), json: OnceLock::new() }
    }
}

impl From<Value> for Record {
    fn from(value: Value) -> Self {
        Record { flow: None, json: OnceLock::from(value) }
    }
}

impl Deref for Record {
    type Target = Value;
    fn deref(&self) -> &Value {
        self.json.get_or_init(|| {
            let flow = self.flow.as_ref().expect("a record without JSON is a flow");
            serde_json::to_value(flow).expect("flow records serialize")
        })
    }
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.flow {
            Some(flow) => flow.serialize(serializer),
            None => (**self).serialize(serializer),
        }
    }
}

/// A flow verdict, as events and filters name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    Allow,
    Deny,
    Audit,
}

impl FlowVerdict {
    pub fn name(self) -> &'static str {
        match self {
            FlowVerdict::Allow => "allow",
            FlowVerdict::Deny => "deny",
            FlowVerdict::Audit => "audit",
        }
    }
}

/// Which flow events a consumer wants. Agent events (identity, policy) are not flows and pass
/// every filter; whether a consumer takes them at all is up to its format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Empty: every verdict.
    #[serde(default)]
    pub verdicts: Vec<FlowVerdict>,
    /// Only flows with this identity at either end.
    #[serde(default)]
    pub identity: Option<String>,
}

impl Filter {
    pub fn accepts(&self, event: &Record) -> bool {
        if self.verdicts.is_empty() && self.identity.is_none() {
            return true;
        }
        let (verdict, identities) = match &event.flow {
            Some(flow) => (flow.verdict(), flow.identities()),
            None if event.is_flow() => (
                event["verdict"].as_str().unwrap_or(""),
                [event["src"]["identity"].as_str(), event["dst"]["identity"].as_str()],
            ),
            None => return true,
        };
        let verdict_ok = self.verdicts.is_empty() || self.verdicts.iter().any(|v| verdict == v.name());
        let identity_ok = self.identity.as_deref().is_none_or(|id| identities.contains(&Some(id)));
        verdict_ok && identity_ok
    }
}

pub(super) fn ip_of(ev: &FlowEvent, addr: &[u8; 16]) -> Option<IpAddr> {
    match ev.family {
        4 => Some(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]).into()),
        6 => Some(Ipv6Addr::from(*addr).into()),
        _ => None,
    }
}

/// An event's time: RFC 3339 with nanoseconds, UTC.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timestamp {
    /// `2026-11-26T23:59:03`
    pub(super) second: ShortText,
    pub(super) nanos: u32,
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}Z", self.second.as_str(), self.nanos)
    }
}

/// How one end of a flow was identified.
#[derive(Clone, Debug)]
pub(super) enum Source {
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
    pub(super) ev: FlowEvent,
    /// The policy generation that decided the flow: its rule and identity names.
    pub(super) compiled: Arc<Compiled>,
    pub(super) node: Arc<str>,
    pub(super) time: Timestamp,
    /// Kept inline, like the time: no count shared with the reader to update per event.
    pub(super) interface: Option<ShortText>,
    pub(super) src_source: Source,
    pub(super) dst_source: Source,
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
            (Some(rule), _) => Some(&*rule.policy),
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
pub(super) struct ShortText {
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
    pub(super) fn from_str(s: &str) -> Option<Self> {
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
            (Some(rule), _) => Some(&*rule.policy),
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
