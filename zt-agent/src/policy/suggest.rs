//! `zt-agent policy suggest`: least-privilege allow rules from monitor-mode audit events.
//!
//! The input is the agent's event stream (JSON lines, as `zt-agent run` prints them). Every
//! `audit` of `default-deny` between two identities (declared ones, or pods' label sets, which
//! the suggestion writes as `pods` selectors) is a flow the policy would deny;
//! the suggestion allows exactly those flows — by identity pair, protocol and destination port
//! (ICMP by message type) — and nothing else. Both ends must consent, so each flow gets a rule
//! in the sender's egress and one in the receiver's ingress: one policy per identity,
//! `suggested-<identity>`, holding its egress rules (one per receiver) and its ingress rules (one
//! per sender). Output is sorted, so the same events give the same text.
//!
//! With the policy the events were recorded under, the suggestion names only identities it
//! declares, uses no policy name it already has, and gives an end rules only in the directions
//! where that policy isolates it (a rule list in a direction where an end is not isolated would
//! make it default-deny there, denying what passes today).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{Map, Value};
use zt_common::Direction;

use super::{compile, load_paths_with, name_problem, PolicySet, Protocol, Subject};
use crate::identity::{
    self,
    pods::{Cluster, PodIdentity},
};

const SUGGESTED_PREFIX: &str = "suggested-";
/// Malformed lines reported before the rest are only counted.
const MAX_REPORTED_ERRORS: usize = 20;

/// One flow seen in the events, by the identities of its ends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedFlow {
    pub src: String,
    pub dst: String,
    pub protocol: Protocol,
    /// The destination port; for ICMP and ICMPv6 the message type.
    pub port: u16,
}

/// Why an event yields no rule. Ordered as the trailing comment lists them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// Not a flow event (`kind` is e.g. `identity`).
    NotFlow(String),
    /// A flow event whose verdict is not `audit`.
    NotAudit(String),
    /// An audit decided by something else than a missing allow (`policy-deny`, `malformed`, …).
    NotDefaultDeny(String),
    /// An end is `world`.
    WorldEnd,
    /// An end is `unknown`, `host`, or has no identity name.
    UnknownEnd,
    /// A protocol the policy language has no name for (only a rule without ports matches it).
    UnnamedProtocol(String),
    /// TCP/UDP/SCTP to port 0, which only a rule matching every port covers.
    PortZero,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotFlow(kind) => write!(f, "kind \"{kind}\" (not a flow)"),
            Skip::NotAudit(verdict) => write!(f, "verdict \"{verdict}\" (not an audit)"),
            Skip::NotDefaultDeny(reason) if reason == "policy-deny" => {
                write!(f, "audit of policy-deny (an explicit deny decided; no allow overrides it, change the deny rule instead)")
            }
            Skip::NotDefaultDeny(reason) => write!(f, "audit of {reason} (not decided by policy rules)"),
            Skip::WorldEnd => write!(f, "world at one end (declare the range as an identity to write rules for it)"),
            Skip::UnknownEnd => write!(f, "an end without a declared identity (unknown or host)"),
            Skip::UnnamedProtocol(protocol) => {
                write!(f, "protocol {protocol} (no name in the policy language; only a rule without ports, which allows every protocol, matches it)")
            }
            Skip::PortZero => write!(f, "destination port 0 (only a rule matching every port covers it)"),
        }
    }
}

/// What an event stream says.
#[derive(Debug, Default)]
pub struct Observations {
    /// Events per flow.
    pub flows: BTreeMap<ObservedFlow, usize>,
    /// Events per reason they were skipped.
    pub skipped: BTreeMap<Skip, usize>,
    /// Events read (non-blank lines).
    pub events: usize,
    /// The first line that names each identity of `flows`.
    pub first_seen: BTreeMap<String, usize>,
}

impl Observations {
    /// Audit events of `default-deny` that became flows.
    pub fn audits(&self) -> usize {
        self.flows.values().sum()
    }
}

/// Reads an event stream, one JSON object per line; blank lines are ignored. `label` names the
/// input in errors (`label:line: …`). Every malformed line is an error.
pub fn parse_events(text: &str, label: &str) -> Result<Observations> {
    let mut observations = Observations::default();
    let mut errors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        observations.events += 1;
        match parse_event(line) {
            Ok(Ok(flow)) => {
                for name in [&flow.src, &flow.dst] {
                    observations.first_seen.entry(name.clone()).or_insert(number);
                }
                *observations.flows.entry(flow).or_default() += 1;
            }
            Ok(Err(skip)) => *observations.skipped.entry(skip).or_default() += 1,
            Err(message) => errors.push(format!("{label}:{number}: {message}")),
        }
    }
    if !errors.is_empty() {
        let more = errors.len().saturating_sub(MAX_REPORTED_ERRORS);
        errors.truncate(MAX_REPORTED_ERRORS);
        if more > 0 {
            errors.push(format!("… and {more} more malformed lines"));
        }
        bail!("{}", errors.join("\n"));
    }
    Ok(observations)
}

/// A flow, a reason to skip the event, or what is malformed about the line.
fn parse_event(line: &str) -> Result<Result<ObservedFlow, Skip>, String> {
    let event: Value = serde_json::from_str(line).map_err(|err| {
        format!("not a JSON event: {} (column {})", super::strip_positions(&err.to_string()), err.column())
    })?;
    let Value::Object(event) = event else {
        return Err("not a JSON event: expected an object, one per line".to_owned());
    };
    match event.get("kind") {
        // Events written before flow events carried a kind are flows.
        None => {}
        Some(Value::String(kind)) if kind == "flow" => {}
        Some(Value::String(kind)) => return Ok(Err(Skip::NotFlow(kind.clone()))),
        Some(other) => return Err(format!("\"kind\" is {other}; expected a string such as \"flow\"")),
    }
    let verdict = string_field(&event, "verdict")?;
    if verdict != "audit" {
        return Ok(Err(Skip::NotAudit(verdict.to_owned())));
    }
    let reason = string_field(&event, "reason")?;
    if reason != "default-deny" {
        return Ok(Err(Skip::NotDefaultDeny(reason.to_owned())));
    }
    let (src, dst) = (end_identity(&event, "src")?, end_identity(&event, "dst")?);
    let (src, dst) = match (src, dst) {
        (End::World, _) | (_, End::World) => return Ok(Err(Skip::WorldEnd)),
        (End::Unknown, _) | (_, End::Unknown) => return Ok(Err(Skip::UnknownEnd)),
        (End::Declared(src), End::Declared(dst)) => (src, dst),
    };
    let protocol = match string_field(&event, "protocol")? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "icmp" => Protocol::Icmp,
        "icmpv6" => Protocol::Icmpv6,
        number if number.parse::<u8>().is_ok() => return Ok(Err(Skip::UnnamedProtocol(number.to_owned()))),
        other => {
            return Err(format!(
                "unknown protocol \"{other}\"; expected tcp, udp, sctp, icmp, icmpv6 or a protocol number"
            ))
        }
    };
    let port = if protocol.has_ports() {
        let port = number_field(&event, &["dst", "port"], u16::MAX)?;
        if port == 0 {
            return Ok(Err(Skip::PortZero));
        }
        port
    } else {
        number_field(&event, &["icmp", "type"], u8::MAX.into())?
    };
    Ok(Ok(ObservedFlow { src, dst, protocol, port }))
}

enum End {
    Declared(String),
    World,
    Unknown,
}

fn string_field<'a>(event: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match event.get(key) {
        Some(Value::String(value)) => Ok(value),
        None => Err(format!("a flow event needs \"{key}\"")),
        Some(other) => Err(format!("\"{key}\" is {other}; expected a string")),
    }
}

fn number_field(event: &Map<String, Value>, path: &[&str], max: u16) -> Result<u16, String> {
    let dotted = path.join(".");
    let mut value = event.get(path[0]);
    for key in &path[1..] {
        value = value.and_then(|v| v.get(key));
    }
    match value {
        Some(Value::Number(number)) => number
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("\"{dotted}\" is {number}; expected 0-{max}")),
        None | Some(Value::Null) => Err(format!("this audit needs \"{dotted}\" (a number)")),
        Some(other) => Err(format!("\"{dotted}\" is {other}; expected a number")),
    }
}

fn end_identity(event: &Map<String, Value>, end: &str) -> Result<End, String> {
    let Some(Value::Object(fields)) = event.get(end) else {
        return Err(format!("a flow event needs \"{end}\", an object with \"identity\""));
    };
    match fields.get("identity") {
        None | Some(Value::Null) => Ok(End::Unknown),
        Some(Value::String(name)) if name == "world" => Ok(End::World),
        Some(Value::String(name)) if identity::is_reserved(name) => Ok(End::Unknown),
        Some(Value::String(name)) if PodIdentity::from_name(name).is_some() => Ok(End::Declared(name.clone())),
        Some(Value::String(name)) => match name_problem(name) {
            None => Ok(End::Declared(name.clone())),
            Some(problem) => Err(format!("\"{end}.identity\" is not an identity name (\"{name}\": {problem})")),
        },
        Some(other) => Err(format!("\"{end}.identity\" is {other}; expected a name")),
    }
}

/// What to write for one identity.
#[derive(Default)]
struct Suggested<'a> {
    /// Receiver → (protocol, port) → events.
    egress: BTreeMap<&'a str, BTreeMap<(Protocol, u16), usize>>,
    /// Sender → (protocol, port) → events.
    ingress: BTreeMap<&'a str, BTreeMap<(Protocol, u16), usize>>,
}

/// How the suggestion was made, for its header.
pub struct Context<'a> {
    /// The events' source, as given (`-` for stdin).
    pub from: &'a str,
    /// The policy paths, as given; empty without `--policy`.
    pub policy: &'a [PathBuf],
}

/// The suggestion as policy YAML, with comments. With `base`, every identity the flows name
/// must be declared in it, and the result loads together with it.
pub fn suggest(observations: &Observations, base: Option<&PolicySet>, context: &Context<'_>) -> Result<String> {
    if let Some(base) = base {
        let declared: BTreeSet<&str> = base.identities().iter().map(|identity| identity.name.as_str()).collect();
        let unknown: Vec<String> = observations
            .first_seen
            .iter()
            .filter(|(name, _)| !declared.contains(name.as_str()) && PodIdentity::from_name(name).is_none())
            .map(|(name, line)| {
                format!(
                    "{}:{line}: identity \"{name}\" is not declared in the policy ({}); pass the policy the events were recorded under",
                    context.from,
                    paths_text(context.policy)
                )
            })
            .collect();
        if !unknown.is_empty() {
            bail!("{}", unknown.join("\n"));
        }
    }
    let isolated = |name: &str, direction| base.is_none_or(|base| is_isolated(base, name, direction));

    let mut by_identity: BTreeMap<&str, Suggested<'_>> = BTreeMap::new();
    // Flows that need no rule at one end, or at either, because that end is not isolated.
    let mut not_isolated: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut needs_nothing = 0;
    for (flow, events) in &observations.flows {
        let key = (flow.protocol, flow.port);
        let (egress, ingress) = (isolated(&flow.src, Direction::Egress), isolated(&flow.dst, Direction::Ingress));
        if egress {
            let ports = by_identity.entry(&flow.src).or_default().egress.entry(&flow.dst).or_default();
            *ports.entry(key).or_default() += events;
        } else {
            *not_isolated.entry((&flow.src, "egress")).or_default() += 1;
        }
        if ingress {
            let ports = by_identity.entry(&flow.dst).or_default().ingress.entry(&flow.src).or_default();
            *ports.entry(key).or_default() += events;
        } else {
            *not_isolated.entry((&flow.dst, "ingress")).or_default() += 1;
        }
        if !egress && !ingress {
            needs_nothing += 1;
        }
    }

    let mut taken: BTreeSet<String> =
        base.map(|base| base.policies().iter().map(|policy| policy.name.clone()).collect()).unwrap_or_default();
    let mut out = String::new();
    let from = if context.from == "-" { "stdin" } else { context.from };
    writeln!(out, "# Suggested by `zt-agent policy suggest` from {from}.").unwrap();
    if observations.flows.is_empty() {
        writeln!(out, "# Nothing to suggest: no audit of default-deny between two declared identities.").unwrap();
    } else {
        writeln!(
            out,
            "# Allows the {} seen in {} of default-deny, and nothing else: each",
            plural(observations.flows.len(), "flow", "flows"),
            plural(observations.audits(), "audit event", "audit events"),
        )
        .unwrap();
        writeln!(out, "# flow in its sender's egress and its receiver's ingress, as both ends must consent.").unwrap();
    }
    if base.is_some() {
        writeln!(out, "# Load it together with {}.", paths_text(context.policy)).unwrap();
    } else {
        writeln!(out, "# Without --policy every end gets rules in each direction it takes part in, which makes it")
            .unwrap();
        writeln!(out, "# default-deny there if it was not; pass --policy to write only the rules that policy needs.")
            .unwrap();
    }
    for (name, suggested) in &by_identity {
        let policy_name = unique_policy_name(name, &mut taken);
        writeln!(out, "---").unwrap();
        writeln!(out, "apiVersion: zt/v1").unwrap();
        writeln!(out, "kind: Policy").unwrap();
        writeln!(out, "metadata: {{name: {}}}", yaml_name(&policy_name)).unwrap();
        writeln!(out, "spec:").unwrap();
        writeln!(out, "  subject: [{}]", yaml_end(name)).unwrap();
        for (list, peer_key, rules) in [("egress", "to", &suggested.egress), ("ingress", "from", &suggested.ingress)] {
            if rules.is_empty() {
                continue;
            }
            writeln!(out, "  {list}:").unwrap();
            for (peer, ports) in rules {
                let events: usize = ports.values().sum();
                writeln!(out, "    - {peer_key}: [{}]  # {}", yaml_end(peer), plural(events, "event", "events"))
                    .unwrap();
                writeln!(out, "      ports:").unwrap();
                for (item, events) in port_items(ports) {
                    writeln!(out, "        - {item}  # {}", plural(events, "event", "events")).unwrap();
                }
            }
        }
    }
    if !not_isolated.is_empty() {
        writeln!(out, "# Not written, as the policy does not isolate that end in that direction:").unwrap();
        for ((name, list), flows) in &not_isolated {
            writeln!(out, "#   {list} of {name}, for {}", plural(*flows, "flow", "flows")).unwrap();
        }
        if needs_nothing > 0 {
            writeln!(
                out,
                "#   ({} with neither end isolated: the policy already allows it)",
                plural(needs_nothing, "flow", "flows")
            )
            .unwrap();
        }
    }
    let skipped: usize = observations.skipped.values().sum();
    if skipped == 0 {
        writeln!(out, "# Skipped no events.").unwrap();
    } else {
        writeln!(out, "# Skipped {skipped} of {} events:", observations.events).unwrap();
        for (skip, events) in &observations.skipped {
            writeln!(out, "#   {events:>6}  {skip}").unwrap();
        }
    }
    Ok(out)
}

/// Whether a policy of `set` isolates the identity `name` (declared, or a pod identity's name)
/// in `direction`. Events do not carry namespaces' labels: a `namespaceSelector` is judged as
/// if the namespace had none, so an end is taken as isolated only when that is certain (a rule
/// for an end that is not would make it default-deny, denying what passes today).
pub fn is_isolated(set: &PolicySet, name: &str, direction: Direction) -> bool {
    let pod = PodIdentity::from_name(name);
    set.policies().iter().any(|policy| {
        policy.rules(direction).is_some()
            && policy.subjects.iter().any(|subject| match (subject, &pod) {
                (Subject::Any, _) => true,
                (Subject::Identity(subject), _) => subject == name,
                (Subject::Pods(selector), Some(pod)) => selector.matches(pod, &Cluster::default()),
                (Subject::Pods(_), None) => false,
            })
    })
}

/// A subject or peer: a declared identity's name, or a pod identity as the `pods` selector of
/// its namespace, service account and labels (which also selects label sets that only add
/// labels to it: a canary of the same workload, say).
fn yaml_end(name: &str) -> String {
    let Some(pod) = PodIdentity::from_name(name) else { return yaml_name(name) };
    // JSON strings are YAML flow scalars: label keys and values come out quoted, never misread.
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    let labels: Vec<String> = pod.labels.iter().map(|(key, value)| format!("{}: {}", quoted(key), quoted(value))).collect();
    format!(
        "{{pods: {{namespace: {}, serviceAccount: {}, matchLabels: {{{}}}}}}}",
        quoted(&pod.namespace),
        quoted(&pod.service_account),
        labels.join(", ")
    )
}

/// The `ports` items for one peer, contiguous ports merged into ranges (the same set of ports),
/// with their event counts.
fn port_items(ports: &BTreeMap<(Protocol, u16), usize>) -> Vec<(String, usize)> {
    // (protocol, first, last, events)
    let mut runs: Vec<(Protocol, u16, u16, usize)> = Vec::new();
    for (&(protocol, port), &events) in ports {
        match runs.last_mut() {
            Some((p, _, last, n)) if *p == protocol && protocol.has_ports() && last.checked_add(1) == Some(port) => {
                *last = port;
                *n += events;
            }
            _ => runs.push((protocol, port, port, events)),
        }
    }
    runs.into_iter()
        .map(|(protocol, first, last, events)| {
            let name = protocol.name();
            let item = match (protocol.has_ports(), first == last) {
                (false, _) => format!("{{protocol: {name}, type: {first}}}"),
                (true, true) => format!("{{protocol: {name}, port: {first}}}"),
                (true, false) => format!("{{protocol: {name}, port: \"{first}-{last}\"}}"),
            };
            (item, events)
        })
        .collect()
}

/// `suggested-<identity>`, or with `-2`, `-3`, … if that is taken; at most the longest valid
/// name.
fn unique_policy_name(identity: &str, taken: &mut BTreeSet<String>) -> String {
    // A pod identity's name holds '=', ',' and maybe capitals, which policy names do not.
    let identity: String = identity
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || "._/:-".contains(c) { c } else { '-' })
        .collect();
    let fit = |suffix: &str| {
        let room = super::MAX_NAME_LEN - SUGGESTED_PREFIX.len() - suffix.len();
        // Names are ASCII, so any byte index is a character boundary.
        format!("{SUGGESTED_PREFIX}{}{suffix}", &identity[..identity.len().min(room)])
    };
    let mut name = fit("");
    let mut n = 1;
    while taken.contains(&name) {
        n += 1;
        name = fit(&format!("-{n}"));
    }
    taken.insert(name.clone());
    name
}

/// A name as a YAML scalar: plain when it cannot be read as anything but that string.
fn yaml_name(name: &str) -> String {
    let plain = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && !matches!(name, "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n");
    if plain {
        name.to_owned()
    } else {
        // Valid names hold no '"' or '\'.
        format!("\"{name}\"")
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn paths_text(paths: &[PathBuf]) -> String {
    paths.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// `zt-agent policy suggest --from <events> [--policy <paths>...]`: the suggestion, checked to
/// load (with the policy, when given).
pub fn run(from: &Path, policy: &[PathBuf]) -> Result<String> {
    let label = from.display().to_string();
    let limit = crate::bounded::EVENTS_FILE_LIMIT;
    let text = if label == "-" {
        crate::bounded::read_stdin(limit).context("reading events from stdin")?
    } else {
        crate::bounded::read_text(from, limit).with_context(|| format!("cannot read the events file {label}"))?
    };
    let observations = parse_events(&text, &label)?;
    let base = if policy.is_empty() {
        None
    } else {
        let set = super::load_paths(policy)?;
        compile::compile(&set)?;
        Some(set)
    };
    let context = Context { from: &label, policy };
    let suggestion = suggest(&observations, base.as_ref(), &context)?;
    // The suggestion is made to load with the policy: a failure here is a bug, or a map filled
    // past capacity. Alone, it names identities it does not declare, so there is nothing to check.
    if base.is_some() {
        let combined = load_paths_with(policy, "<suggestion>", &suggestion).map_err(|errors| {
            anyhow::anyhow!("the suggestion does not load with the policy:\n{errors}\n--- suggestion ---\n{suggestion}")
        })?;
        compile::compile(&combined).context("the suggestion loads but does not compile together with the policy")?;
    }
    Ok(suggestion)
}

#[cfg(test)]
mod tests;
