//! Policy files: the model, loading, and validation whose errors point at `file:line:col`.
//!
//! A file holds YAML documents separated by `---` lines, each `apiVersion: zt/v1` and either
//! `kind: Identity` (a name for the workloads its selectors pick: address prefixes, cgroups,
//! SPIFFE IDs, host-side interfaces) or `kind: Policy` (what a set of identities may send and
//! receive). Names are shared across all files of a load. Loading reports every problem it
//! finds, not just the first, sorted by file and position.

pub mod cases;
pub mod compile;
pub mod eval;
pub mod import_k8s;
pub mod labels;
mod locate;
pub mod pods;
mod schema;
pub mod selectors;
pub mod suggest;

use std::{
    cell::OnceCell,
    collections::{BTreeSet, HashMap},
    fmt, fs,
    net::IpAddr,
    path::{Path, PathBuf},
    rc::Rc,
};

use ipnet::IpNet;
use serde::Deserialize;
use zt_common::Direction;

use crate::identity;
use locate::{Position, Positions, YamlPath};
use schema::{
    Document, ExpressionSpec, Header, IdentitySpec, PeerItem, PeerMap, PodsSpec, PolicySpec, PortItem, PortSpec, Selector,
    SubjectItem,
};
pub use pods::PodSelector;
pub use selectors::{CgroupSelector, SpiffeSelector};

pub const API_VERSION: &str = "zt/v1";
const MAX_NAME_LEN: usize = 253;

/// A validated set of identities and policies: every name it mentions is declared, every
/// selector is well-formed and no selector is declared twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySet {
    identities: Vec<Identity>,
    policies: Vec<Policy>,
}

impl PolicySet {
    /// In load order.
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// In load order, which is also rule-id order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }
}

/// A workload identity: any one of its selectors matching makes a workload this identity. Each
/// list keeps the order of `spec.selectors`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// `cidr:` selectors. Canonical (no host bits), never IPv4-mapped IPv6, never a whole
    /// address family. Resolved by the kernel.
    pub cidrs: Vec<IpNet>,
    /// `cgroup:` selectors. Resolved by the agent (`Compiled::cgroups`).
    pub cgroups: Vec<CgroupSelector>,
    /// `spiffe:` selectors. Resolved by the agent (`Compiled::spiffe`).
    pub spiffe: Vec<SpiffeSelector>,
    /// `interface:` selectors: host-side interface names, valid Linux names. Resolved by the
    /// agent (`Compiled::interfaces`).
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// `Monitor` stages the policy: its isolation and rules are judged, and what they would deny
    /// is reported as an audit, but they never change what passes.
    pub mode: PolicyMode,
    pub subjects: Vec<Subject>,
    /// `Some` (even empty) makes the subjects default-deny for ingress.
    pub ingress: Option<Vec<Rule>>,
    /// `Some` (even empty) makes the subjects default-deny for egress.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
            Direction::None => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Monitor,
}

/// Whom a policy protects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Every declared identity, and every pod identity.
    Any,
    Identity(String),
    /// The pod identities the selector matches when the policy is compiled.
    Pods(Box<PodSelector>),
}

/// The other end of a rule: `from` for ingress, `to` for egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Every address, declared or not.
    Any,
    /// Every address no declared identity owns.
    World,
    /// The node's own addresses, and its processes no cgroup selector names.
    Host,
    Identity(String),
    /// The addresses of `net`, outside every `except` prefix, that no declared identity owns.
    /// `except` prefixes lie strictly inside `net`.
    Cidr { net: IpNet, except: Vec<IpNet> },
    /// The pod identities the selector matches when the policy is compiled.
    Pods(Box<PodSelector>),
}

impl Peer {
    /// Whether an address that no declared identity owns matches (the `world` part of a peer).
    pub fn matches_world_address(&self, addr: IpAddr) -> bool {
        match self {
            Peer::Any | Peer::World => true,
            Peer::Host | Peer::Identity(_) | Peer::Pods(_) => false,
            Peer::Cidr { net, except } => net.contains(&addr) && !except.iter().any(|e| e.contains(&addr)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    /// `None`: any protocol, any port (and `named_ports` is empty).
    pub ports: Option<Vec<PortMatch>>,
    /// The `ports` items given by name, which add to `ports`: resolved when the policy is
    /// compiled, against the destination pod's container ports.
    pub named_ports: Vec<NamedPort>,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl Action {
    /// The value's `action` byte in the kernel's policy map.
    pub fn code(self) -> u8 {
        match self {
            Action::Allow => zt_common::action::ALLOW,
            Action::Deny => zt_common::action::DENY,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    pub fn number(self) -> u8 {
        use zt_common::proto;
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
            Protocol::Icmp => proto::ICMP,
            Protocol::Icmpv6 => proto::ICMPV6,
        }
    }

    /// Whether rules match ports (else ICMP message types).
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }

    /// Every port, or every ICMP message type.
    pub fn full_range(self) -> PortRange {
        let last = if self.has_ports() { u16::MAX } else { u8::MAX.into() };
        PortRange { first: 0, last }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    /// Destination ports, or ICMP message types.
    pub range: PortRange,
}

/// An inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// `{protocol: tcp, port: http}`: the destination's container port of that name and protocol.
/// Only pods name their ports, so on any other destination it matches nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub protocol: Protocol,
    pub name: String,
}

/// A `ports` item, checked.
enum PortItemMatch {
    Numbers(PortMatch),
    Named(NamedPort),
}

/// Whether `name` can name a container port: an IANA service name (1-15 lowercase letters,
/// digits and '-', with a letter, no '-' at either end or twice in a row), as Kubernetes
/// requires of `containerPort` names.
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// One problem, at the position of the offending text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// What is wrong; how to fix it.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
    }
}

/// Every problem of a load, sorted by file and position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Loads files and directories (a directory's `*.yaml` and `*.yml` files, sorted by name, not
/// recursively) as one policy set.
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
    loader_for(paths).finish()
}

/// Loads `paths` and one more file, given as its text and labelled `label`, as one policy set,
/// exactly as if that file had been passed last.
pub fn load_paths_with(paths: &[PathBuf], label: &str, text: &str) -> Result<PolicySet, PolicyErrors> {
    let mut loader = loader_for(paths);
    loader.add_file(label, text);
    loader.finish()
}

/// A loader holding every policy file of `paths` (and the errors reading them).
fn loader_for(paths: &[PathBuf]) -> Loader {
    use crate::bounded::{self, ReadError, POLICY_FILE_LIMIT, POLICY_SET_LIMIT};
    let mut loader = Loader::default();
    // Bytes read so far: many files, each under the file limit, are still held to the set's.
    let mut total = 0;
    for path in paths {
        let files = match policy_files(path) {
            Ok(files) => files,
            Err(error) => {
                loader.errors.push(error);
                continue;
            }
        };
        for file in files {
            match bounded::read_text(&file, POLICY_FILE_LIMIT) {
                Ok(text) => {
                    total += text.len() as u64;
                    if total > POLICY_SET_LIMIT {
                        let message = format!(
                            "cannot read the file: with it, the policy files are over {} MiB together, the \
                             limit of a policy set; trim the policy",
                            POLICY_SET_LIMIT >> 20
                        );
                        loader.errors.push(file_error(&file, message));
                        return loader;
                    }
                    loader.add_file(&file.display().to_string(), &text);
                }
                Err(err @ ReadError::TooLarge { .. }) => loader.errors.push(file_error(
                    &file,
                    format!("cannot read the file: {err}; split it into several files, or trim it"),
                )),
                Err(err) => loader.errors.push(file_error(
                    &file,
                    format!("cannot read the file: {err}; check the path and its permissions"),
                )),
            }
        }
    }
    loader
}

/// Parses one file's text; `file` labels the errors.
pub fn parse_str(text: &str, file: &str) -> Result<PolicySet, PolicyErrors> {
    let mut loader = Loader::default();
    loader.add_file(file, text);
    loader.finish()
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = fs::read_dir(path).map_err(|err| {
        file_error(path, format!("cannot list the directory: {err}; check the path and its permissions"))
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let file = entry.map_err(|err| file_error(path, format!("cannot list the directory: {err}")))?.path();
        let is_yaml = matches!(file.extension().and_then(|ext| ext.to_str()), Some("yaml" | "yml"));
        if is_yaml && file.is_file() {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(file_error(
            path,
            "no *.yaml or *.yml files in this directory; add policy files or pass their paths".into(),
        ));
    }
    files.sort();
    Ok(files)
}

fn file_error(path: &Path, message: String) -> PolicyError {
    PolicyError { file: path.display().to_string(), line: 1, col: 1, message }
}

/// One YAML document of a file, with what is needed to point into it.
struct Doc {
    file: Rc<str>,
    /// File line of the document's first line.
    first_line: usize,
    text: String,
    positions: OnceCell<Positions>,
}

impl Doc {
    fn positions(&self) -> &Positions {
        self.positions.get_or_init(|| Positions::parse(&self.text))
    }

    fn file_line(&self, at: Position) -> usize {
        self.first_line + at.line - 1
    }

    fn error(&self, at: Position, message: String) -> PolicyError {
        PolicyError { file: self.file.to_string(), line: self.file_line(at), col: at.col, message }
    }

    fn error_at_value(&self, path: &YamlPath, message: String) -> PolicyError {
        self.error(self.positions().value(path), message)
    }

    fn error_at_key(&self, path: &YamlPath, message: String) -> PolicyError {
        self.error(self.positions().key(path), message)
    }

    /// `file:line:col` of a value, to point from one error at another declaration.
    fn location(&self, path: &YamlPath) -> String {
        let at = self.positions().value(path);
        format!("{}:{}:{}", self.file, self.file_line(at), at.col)
    }

    /// The document as `T`, from its value parsed once. Where the value does not read as `T`,
    /// the text is read again: serde_yaml's verdict from the text is the one that counts, and
    /// only its errors carry a position.
    fn read<T: serde::de::DeserializeOwned>(&self, value: &serde_yaml::Value) -> Result<T, PolicyError> {
        T::deserialize(value).or_else(|_| serde_yaml::from_str(&self.text).map_err(|err| self.serde_error(&err)))
    }

    fn serde_error(&self, err: &serde_yaml::Error) -> PolicyError {
        let at = err.location().map_or(Position::START, |at| Position { line: at.line(), col: at.column() });
        self.error(at, describe_serde_error(&err.to_string()))
    }
}

/// Splits a file at lines that are exactly `---` (optionally followed by a comment), keeping
/// each document's first line number. Documents of only blank lines and comments are dropped.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    fn has_content(doc: &str) -> bool {
        doc.lines().map(str::trim).any(|line| !line.is_empty() && !line.starts_with('#'))
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut documents = Vec::new();
    let mut first_line = 1;
    let mut current = String::new();
    for (index, line) in text.lines().enumerate() {
        if is_document_separator(line) {
            if has_content(&current) {
                documents.push((first_line, std::mem::take(&mut current)));
            }
            current.clear();
            first_line = index + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if has_content(&current) {
        documents.push((first_line, current));
    }
    documents
}

fn is_document_separator(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("---") else {
        return false;
    };
    let comment = rest.trim_start();
    rest.is_empty() || (rest.starts_with([' ', '\t']) && (comment.is_empty() || comment.starts_with('#')))
}

/// serde_yaml's message without its positions (relative to the document, so wrong in the
/// file) and with a hint.
fn describe_serde_error(raw: &str) -> String {
    let message = strip_positions(raw);
    if let Some((what, expected)) = message.split_once(", expected ") {
        format!("{what}; expected {expected}")
    } else if message.contains("missing field") {
        format!("{message}; add it")
    } else {
        format!("{message}; fix the YAML syntax")
    }
}

fn strip_positions(message: &str) -> String {
    const MARKER: &str = " at line ";
    let digits = |c: char| c.is_ascii_digit();
    let mut stripped = String::new();
    let mut rest = message;
    while let Some(start) = rest.find(MARKER) {
        stripped.push_str(&rest[..start]);
        let after_line = rest[start + MARKER.len()..].trim_start_matches(digits);
        rest = after_line.strip_prefix(" column ").map_or(after_line, |col| col.trim_start_matches(digits));
    }
    stripped.push_str(rest);
    stripped
}

/// Each valid selector with its index in `spec.selectors`.
struct DeclaredIdentity {
    name: String,
    cidrs: Vec<(IpNet, usize)>,
    cgroups: Vec<(CgroupSelector, usize)>,
    spiffe: Vec<(SpiffeSelector, usize)>,
    interfaces: Vec<(String, usize)>,
    doc: Rc<Doc>,
}

impl DeclaredIdentity {
    fn into_identity(self) -> Identity {
        fn values<T>(items: Vec<(T, usize)>) -> Vec<T> {
            items.into_iter().map(|(value, _)| value).collect()
        }
        Identity {
            name: self.name,
            cidrs: values(self.cidrs),
            cgroups: values(self.cgroups),
            spiffe: values(self.spiffe),
            interfaces: values(self.interfaces),
        }
    }
}

/// The keys of a selector, one of which each selector has.
const SELECTOR_KEYS: [&str; 4] = ["cidr", "cgroup", "spiffe", "interface"];

struct DeclaredPolicy {
    policy: Policy,
    doc: Rc<Doc>,
}

fn name_path() -> YamlPath {
    YamlPath::default().key("metadata").key("name")
}

fn spec_path() -> YamlPath {
    YamlPath::default().key("spec")
}

/// Collects documents, then checks what spans documents and files (duplicates, references).
#[derive(Default)]
struct Loader {
    errors: Vec<PolicyError>,
    identities: Vec<DeclaredIdentity>,
    policies: Vec<DeclaredPolicy>,
}

impl Loader {
    fn add_file(&mut self, file: &str, text: &str) {
        let file: Rc<str> = file.into();
        for (first_line, text) in split_documents(text) {
            let doc = Doc { file: file.clone(), first_line, text, positions: OnceCell::new() };
            self.add_document(Rc::new(doc));
        }
    }

    fn add_document(&mut self, doc: Rc<Doc>) {
        // Parsed once, then read twice (the header, then the document of its kind): YAML's
        // scanner is most of what loading a large policy costs.
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc.text) {
            Ok(value) => value,
            Err(err) => return self.errors.push(doc.serde_error(&err)),
        };
        let header: Header = match doc.read(&value) {
            Ok(header) => header,
            Err(error) => return self.errors.push(error),
        };
        let version_ok = match header.api_version.as_deref() {
            Some(API_VERSION) => true,
            Some(other) => {
                let path = YamlPath::default().key("apiVersion");
                let message = format!("unsupported apiVersion \"{other}\"; use \"apiVersion: {API_VERSION}\"");
                self.errors.push(doc.error_at_value(&path, message));
                false
            }
            None => {
                let message = format!("missing apiVersion; add \"apiVersion: {API_VERSION}\"");
                self.errors.push(doc.error(Position::START, message));
                false
            }
        };
        match header.kind.as_deref() {
            Some("Identity") if version_ok => self.add_identity(doc, &value),
            Some("Policy") if version_ok => self.add_policy(doc, &value),
            Some("Identity" | "Policy") => {}
            Some(other) => {
                let path = YamlPath::default().key("kind");
                let message = format!("unknown kind \"{other}\"; use \"kind: Identity\" or \"kind: Policy\"");
                self.errors.push(doc.error_at_value(&path, message));
            }
            None => {
                let message = "missing kind; add \"kind: Identity\" or \"kind: Policy\"".to_owned();
                self.errors.push(doc.error(Position::START, message));
            }
        }
    }

    fn add_identity(&mut self, doc: Rc<Doc>, value: &serde_yaml::Value) {
        let parsed: Document<IdentitySpec> = match doc.read(value) {
            Ok(parsed) => parsed,
            Err(error) => return self.errors.push(error),
        };
        let name = self.check_name(&doc, parsed.metadata.name, "identity");
        let selectors_path = spec_path().key("selectors");
        if parsed.spec.selectors.is_empty() {
            let message = format!(
                "identity {} has no selectors; add at least one (\"- cidr: PREFIX\", \"- cgroup: PATH\", \
                 \"- spiffe: ID\" or \"- interface: NAME\") under spec.selectors",
                quoted_or_unnamed(&name)
            );
            self.errors.push(doc.error_at_key(&selectors_path, message));
        }
        let mut declared = DeclaredIdentity {
            name: String::new(),
            cidrs: Vec::new(),
            cgroups: Vec::new(),
            spiffe: Vec::new(),
            interfaces: Vec::new(),
            doc: doc.clone(),
        };
        for (index, selector) in parsed.spec.selectors.into_iter().enumerate() {
            let path = selectors_path.index(index);
            let Selector { cidr, cgroup, spiffe, interface } = selector;
            let present: Vec<&'static str> = [cidr.is_some(), cgroup.is_some(), spiffe.is_some(), interface.is_some()]
                .into_iter()
                .zip(SELECTOR_KEYS)
                .filter_map(|(present, key)| present.then_some(key))
                .collect();
            if present.len() != 1 {
                self.errors.push(selector_shape_error(&doc, &path, &present));
                continue;
            }
            let key = present[0];
            let checked = if let Some(text) = cidr {
                parse_selector(&text).map(|net| declared.cidrs.push((net, index)))
            } else if let Some(text) = cgroup {
                CgroupSelector::parse(&text).map(|selector| declared.cgroups.push((selector, index)))
            } else if let Some(text) = spiffe {
                SpiffeSelector::parse(&text).map(|selector| declared.spiffe.push((selector, index)))
            } else if let Some(text) = interface {
                selectors::check_interface_name(&text).map(|()| declared.interfaces.push((text, index)))
            } else {
                unreachable!("exactly one key is present")
            };
            if let Err(message) = checked {
                self.errors.push(doc.error_at_value(&path.key(key), message));
            }
        }
        if let Some(name) = name {
            self.identities.push(DeclaredIdentity { name, ..declared });
        }
    }

    fn add_policy(&mut self, doc: Rc<Doc>, value: &serde_yaml::Value) {
        let parsed: Document<PolicySpec> = match doc.read(value) {
            Ok(parsed) => parsed,
            Err(error) => return self.errors.push(error),
        };
        let name = self.check_name(&doc, parsed.metadata.name, "policy");
        let spec = parsed.spec;
        if spec.subject.is_empty() {
            let message = "spec.subject is empty; list the identities this policy protects, or [any]".to_owned();
            self.errors.push(doc.error_at_value(&spec_path().key("subject"), message));
        }
        if spec.ingress.is_none() && spec.egress.is_none() {
            let message = format!(
                "policy {} has neither ingress nor egress; add \"ingress:\" and/or \"egress:\" rules \
                 (an empty list denies everything in that direction)",
                quoted_or_unnamed(&name)
            );
            self.errors.push(doc.error_at_key(&spec_path(), message));
        }
        let subject_path = spec_path().key("subject");
        let subjects = spec
            .subject
            .into_iter()
            .enumerate()
            .filter_map(|(index, item)| match item {
                SubjectItem::Name(name) if name == "any" => Some(Subject::Any),
                SubjectItem::Name(name) => Some(Subject::Identity(name)),
                SubjectItem::Pods(spec) => {
                    self.pod_selector(&doc, &subject_path.index(index).key("pods"), spec).map(|pods| Subject::Pods(Box::new(pods)))
                }
            })
            .collect();
        let ingress = spec.ingress.map(|rules| {
            let path = spec_path().key("ingress");
            let rules = rules.into_iter().enumerate();
            rules.map(|(i, rule)| self.rule(&doc, &path.index(i), "from", rule.from, rule.ports, rule.action)).collect()
        });
        let egress = spec.egress.map(|rules| {
            let path = spec_path().key("egress");
            let rules = rules.into_iter().enumerate();
            rules.map(|(i, rule)| self.rule(&doc, &path.index(i), "to", rule.to, rule.ports, rule.action)).collect()
        });
        if let Some(name) = name {
            let policy = Policy { name, mode: spec.mode, subjects, ingress, egress };
            self.policies.push(DeclaredPolicy { policy, doc });
        }
    }

    /// Converts a rule, reporting its local problems; peer names are checked in `finish`.
    fn rule(
        &mut self,
        doc: &Doc,
        path: &YamlPath,
        peer_key: &'static str,
        peers: Vec<PeerItem>,
        ports: Option<Vec<PortItem>>,
        action: Action,
    ) -> Rule {
        let peers_path = path.key(peer_key);
        if peers.is_empty() {
            let message = format!("{peers_path} is empty, so the rule matches nothing; list peers, or [any]");
            self.errors.push(doc.error_at_value(&peers_path, message));
        }
        let mut peers: Vec<Peer> = peers
            .into_iter()
            .enumerate()
            .filter_map(|(index, peer)| match peer {
                PeerItem::Name(name) => Some(match name.as_str() {
                    "any" => Peer::Any,
                    "world" => Peer::World,
                    "host" => Peer::Host,
                    _ => Peer::Identity(name),
                }),
                PeerItem::Map(map) => self.peer_map(doc, &peers_path.index(index), map),
            })
            .collect();
        // The collect reuses the parsed items' buffer (room for four, each larger than a peer):
        // at 100k rules that is most of the agent's memory.
        peers.shrink_to_fit();
        let ports_path = path.key("ports");
        if ports.as_ref().is_some_and(Vec::is_empty) {
            let message = format!("{ports_path} is empty; omit \"ports\" to match any protocol and port");
            self.errors.push(doc.error_at_value(&ports_path, message));
        }
        let mut named_ports = Vec::new();
        let ports = ports.map(|items| {
            let mut numbers = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                match self.port_match(doc, &ports_path.index(i), item) {
                    Some(PortItemMatch::Numbers(item)) => numbers.push(item),
                    Some(PortItemMatch::Named(item)) => named_ports.push(item),
                    None => {}
                }
            }
            numbers
        });
        Rule { peers, ports, named_ports, action }
    }

    /// `{cidr: ...}` or `{pods: ...}`, exactly one of them.
    fn peer_map(&mut self, doc: &Doc, path: &YamlPath, peer: PeerMap) -> Option<Peer> {
        match (peer.cidr, peer.pods) {
            (Some(cidr), None) => self.cidr_peer(doc, path, &cidr, &peer.except.unwrap_or_default()),
            (None, Some(pods)) if peer.except.is_none() => self.pod_selector(doc, &path.key("pods"), pods).map(|pods| Peer::Pods(Box::new(pods))),
            (None, Some(_)) => {
                let message = "except goes with cidr, not with pods; to leave pods out, narrow the selector".to_owned();
                self.errors.push(doc.error_at_key(&path.key("except"), message));
                None
            }
            (Some(_), Some(_)) => {
                let message = "a peer has one of cidr and pods; make each its own list item".to_owned();
                self.errors.push(doc.error_at_key(&path.key("pods"), message));
                None
            }
            (None, None) => {
                let message = "a peer map needs cidr (an address range) or pods (a pod selector)".to_owned();
                self.errors.push(doc.error_at_value(path, message));
                None
            }
        }
    }

    /// `pods: {namespace, namespaceSelector, matchLabels, matchExpressions, serviceAccount}`,
    /// checked as Kubernetes checks names and selectors.
    fn pod_selector(&mut self, doc: &Doc, path: &YamlPath, spec: PodsSpec) -> Option<PodSelector> {
        let errors_before = self.errors.len();
        let expressions = |items: &[ExpressionSpec]| -> Vec<(String, String, Vec<String>)> {
            items.iter().map(|e| (e.key.clone(), e.operator.clone(), e.values.clone())).collect()
        };
        let mut selector = |at: YamlPath, labels: &std::collections::BTreeMap<String, String>, items: &[ExpressionSpec]| {
            let items = expressions(items);
            let items = items.iter().map(|(key, operator, values)| (key.as_str(), operator.as_str(), values.as_slice()));
            labels::Selector::new(labels, items, "").map_err(|message| {
                let message = message.trim_start_matches('.').to_owned();
                self.errors.push(doc.error_at_value(&at, format!("{message}; fix the selector")));
            })
        };
        let pod_labels = selector(path.clone(), &spec.match_labels, &spec.match_expressions);
        let namespaces = spec.namespace_selector.map(|ns| {
            selector(path.key("namespaceSelector"), &ns.match_labels, &ns.match_expressions)
        });
        if let Some(problem) = spec.namespace.as_deref().and_then(pods::namespace_problem) {
            self.errors.push(doc.error_at_value(&path.key("namespace"), problem));
        }
        if let Some(problem) = spec.service_account.as_deref().and_then(pods::service_account_problem) {
            self.errors.push(doc.error_at_value(&path.key("serviceAccount"), problem));
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(PodSelector {
            namespace: spec.namespace,
            namespaces: namespaces.map(|ns| ns.expect("checked above")),
            labels: pod_labels.expect("checked above"),
            service_account: spec.service_account,
        })
    }

    /// `{cidr: PREFIX, except: [PREFIX, ...]}`: canonical prefixes, `/0` allowed, each `except`
    /// strictly inside `cidr`.
    fn cidr_peer(&mut self, doc: &Doc, path: &YamlPath, cidr: &str, except_texts: &[String]) -> Option<Peer> {
        let net = match parse_prefix(cidr) {
            Ok(net) => net,
            Err(message) => {
                self.errors.push(doc.error_at_value(&path.key("cidr"), message));
                return None;
            }
        };
        let mut except = Vec::new();
        for (index, text) in except_texts.iter().enumerate() {
            let inside = parse_prefix(text).and_then(|inner| {
                if net.contains(&inner) && inner.prefix_len() > net.prefix_len() {
                    Ok(inner)
                } else {
                    Err(format!(
                        "except {inner} is not inside {net}; list only narrower ranges within cidr that the rule should leave out"
                    ))
                }
            });
            match inside {
                Ok(inner) => except.push(inner),
                Err(message) => self.errors.push(doc.error_at_value(&path.key("except").index(index), message)),
            }
        }
        (except.len() == except_texts.len()).then_some(Peer::Cidr { net, except })
    }

    fn port_match(&mut self, doc: &Doc, path: &YamlPath, item: PortItem) -> Option<PortItemMatch> {
        let protocol = item.protocol;
        let checked = match (protocol.has_ports(), item.port, item.icmp_type) {
            (true, Some(PortSpec::Text(name)), None) if name.contains(|c: char| c.is_ascii_alphabetic()) => {
                if is_port_name(&name) {
                    return Some(PortItemMatch::Named(NamedPort { protocol, name }));
                }
                Err((
                    "port",
                    format!(
                        "invalid port \"{name}\"; a port name is 1-15 lowercase letters, digits and '-', with a \
                         letter, no '-' at either end or twice in a row (as a pod's containerPort names it)"
                    ),
                ))
            }
            (false, Some(_), _) => Err((
                "port",
                format!("port is not valid for {}; use \"type:\" to match an ICMP message type", protocol.name()),
            )),
            (true, _, Some(_)) => Err((
                "type",
                format!("type is only valid for icmp and icmpv6; use \"port:\" to match {} ports", protocol.name()),
            )),
            (_, Some(port), _) => parse_port(&port).map_err(|message| ("port", message)),
            (_, None, Some(icmp_type)) => match u8::try_from(icmp_type) {
                Ok(icmp_type) => Ok(PortRange { first: icmp_type.into(), last: icmp_type.into() }),
                Err(_) => Err(("type", format!("ICMP type {icmp_type} is out of range; use 0-255"))),
            },
            (_, None, None) => Ok(protocol.full_range()),
        };
        match checked {
            Ok(range) => Some(PortItemMatch::Numbers(PortMatch { protocol, range })),
            Err((key, message)) => {
                self.errors.push(doc.error_at_value(&path.key(key), message));
                None
            }
        }
    }

    /// The name, if present and well-formed (and, for identities, not reserved).
    fn check_name(&mut self, doc: &Doc, name: Option<String>, kind: &str) -> Option<String> {
        let Some(name) = name else {
            let message = format!("missing metadata.name; give the {kind} a name under \"metadata:\"");
            self.errors.push(doc.error_at_key(&YamlPath::default().key("metadata"), message));
            return None;
        };
        let problem = if let Some(problem) = name_problem(&name) {
            format!("invalid {kind} name \"{name}\": {problem}")
        } else if kind == "identity" && identity::is_reserved(&name) {
            format!("identity name \"{name}\" is reserved; choose another name (any, unknown, world and host have fixed meanings)")
        } else if kind == "identity" && name.starts_with(identity::pods::PREFIX) {
            format!(
                "identity name \"{name}\" starts with \"{}\", which names pod identities; choose another name \
                 (select pods in policies with {{pods: ...}})",
                identity::pods::PREFIX
            )
        } else {
            return Some(name);
        };
        self.errors.push(doc.error_at_value(&name_path(), problem));
        None
    }

    fn finish(mut self) -> Result<PolicySet, PolicyErrors> {
        self.check_duplicate_names();
        self.check_selector_owners();
        self.check_references();
        if !self.errors.is_empty() {
            let mut errors = self.errors;
            errors.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
            return Err(PolicyErrors(errors));
        }
        let identities = self.identities.into_iter().map(DeclaredIdentity::into_identity);
        let policies = self.policies.into_iter().map(|declared| declared.policy);
        Ok(PolicySet { identities: identities.collect(), policies: policies.collect() })
    }

    fn check_duplicate_names(&mut self) {
        let identities = self.identities.iter().map(|declared| (declared.name.as_str(), &declared.doc));
        let policies = self.policies.iter().map(|declared| (declared.policy.name.as_str(), &declared.doc));
        for (kind, declarations) in [("identity", identities.collect::<Vec<_>>()), ("policy", policies.collect())] {
            let mut first_seen: HashMap<&str, &Doc> = HashMap::new();
            for (name, doc) in declarations {
                if let Some(first) = first_seen.get(name) {
                    let message = format!(
                        "duplicate {kind} \"{name}\" (first declared at {}); rename or remove one of them",
                        first.location(&name_path())
                    );
                    self.errors.push(doc.error_at_value(&name_path(), message));
                } else {
                    first_seen.insert(name, doc);
                }
            }
        }
    }

    /// Longest-prefix match makes overlapping prefixes meaningful, and precedence overlapping
    /// patterns, but an identical selector in two places (in one identity or two) has no single
    /// owner.
    fn check_selector_owners(&mut self) {
        let identities = &self.identities;
        let mut errors = owner_errors(identities, "cidr", |d| &d.cidrs, |net, owner, location| {
            format!(
                "prefix {net} is already declared by identity \"{owner}\" (at {location}); \
                 an address prefix belongs to one identity, remove one of them"
            )
        });
        errors.extend(owner_errors(identities, "cgroup", |d| &d.cgroups, |selector, owner, location| {
            let what = if selector.is_glob() { "glob" } else { "path" };
            format!(
                "cgroup {what} \"{selector}\" is already declared by identity \"{owner}\" (at {location}); \
                 a cgroup selector belongs to one identity, remove one of them"
            )
        }));
        errors.extend(owner_errors(identities, "spiffe", |d| &d.spiffe, |selector, owner, location| {
            let what = if selector.is_pattern() { "pattern" } else { "ID" };
            format!(
                "SPIFFE {what} \"{selector}\" is already declared by identity \"{owner}\" (at {location}); \
                 a SPIFFE selector belongs to one identity, remove one of them"
            )
        }));
        errors.extend(owner_errors(identities, "interface", |d| &d.interfaces, |name, owner, location| {
            format!(
                "interface \"{name}\" is already declared by identity \"{owner}\" (at {location}); \
                 an interface belongs to one identity, remove one of them"
            )
        }));
        self.errors.extend(errors);
    }

    fn check_references(&mut self) {
        let known: BTreeSet<&str> = self.identities.iter().map(|declared| declared.name.as_str()).collect();
        let owned: Vec<(IpNet, &str)> = self
            .identities
            .iter()
            .flat_map(|declared| declared.cidrs.iter().map(|(net, _)| (*net, declared.name.as_str())))
            .collect();
        for DeclaredPolicy { policy, doc } in &self.policies {
            let subject_path = spec_path().key("subject");
            for (index, subject) in policy.subjects.iter().enumerate() {
                if let Subject::Identity(name) = subject {
                    let problem = match name.as_str() {
                        "world" => Some(
                            "world cannot be a subject: a policy protects declared identities; \
                             list them, or use [any]"
                                .to_owned(),
                        ),
                        _ => reference_problem(name, &subject_path, &known, "a declared identity or any"),
                    };
                    if let Some(message) = problem {
                        self.errors.push(doc.error_at_value(&subject_path.index(index), message));
                    }
                }
            }
            for (direction, list_key, peer_key) in
                [(Direction::Ingress, "ingress", "from"), (Direction::Egress, "egress", "to")]
            {
                let rules_path = spec_path().key(list_key);
                for (rule_index, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
                    let peers_path = rules_path.index(rule_index).key(peer_key);
                    for (index, peer) in rule.peers.iter().enumerate() {
                        let problem = match peer {
                            Peer::Identity(name) => {
                                reference_problem(name, &peers_path, &known, "a declared identity, world, host, or any")
                            }
                            Peer::Cidr { net, .. } => owned_range_problem(net, &owned),
                            Peer::Any | Peer::World | Peer::Host | Peer::Pods(_) => None,
                        };
                        if let Some(message) = problem {
                            let at = match peer {
                                Peer::Cidr { .. } => peers_path.index(index).key("cidr"),
                                _ => peers_path.index(index),
                            };
                            self.errors.push(doc.error_at_value(&at, message));
                        }
                    }
                }
            }
        }
    }
}

/// An error at every repeat of a selector of one kind, naming where it was first declared.
fn owner_errors<T: Eq + std::hash::Hash>(
    identities: &[DeclaredIdentity],
    key: &'static str,
    selectors: impl Fn(&DeclaredIdentity) -> &Vec<(T, usize)>,
    message: impl Fn(&T, &str, &str) -> String,
) -> Vec<PolicyError> {
    let mut owners: HashMap<&T, (&str, String)> = HashMap::new();
    let mut errors = Vec::new();
    for declared in identities {
        for (selector, index) in selectors(declared) {
            let path = spec_path().key("selectors").index(*index).key(key);
            if let Some((owner, location)) = owners.get(selector) {
                errors.push(declared.doc.error_at_value(&path, message(selector, owner, location)));
            } else {
                owners.insert(selector, (&declared.name, declared.doc.location(&path)));
            }
        }
    }
    errors
}

/// A selector without a value, or with several keys: pointed at the selector, or at its
/// second key.
fn selector_shape_error(doc: &Doc, path: &YamlPath, present: &[&'static str]) -> PolicyError {
    if present.is_empty() {
        let message = "selector has no value; write one of \"cidr: PREFIX\", \"cgroup: PATH\", \"spiffe: ID\", \
                       \"interface: NAME\""
            .to_owned();
        return doc.error_at_value(path, message);
    }
    let mut keys: Vec<(Position, &str)> =
        present.iter().map(|key| (doc.positions().key(&path.key(key)), *key)).collect();
    keys.sort_by_key(|(at, _)| (at.line, at.col));
    let listed = keys.iter().map(|(_, key)| *key).collect::<Vec<_>>().join(", ");
    let message = format!(
        "a selector has exactly one key, this one has {listed}; make each its own list item (\"- {}: ...\")",
        keys[1].1
    );
    doc.error(keys[1].0, message)
}

fn reference_problem(name: &str, list: &YamlPath, known: &BTreeSet<&str>, usable: &str) -> Option<String> {
    if identity::is_reserved(name) {
        return Some(format!("reserved identity \"{name}\" cannot be used in {list}; use {usable}"));
    }
    if known.contains(name) {
        return None;
    }
    const SHOWN: usize = 10;
    let mut listed = known.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if known.is_empty() {
        listed = "none declared yet".to_owned();
    } else if known.len() > SHOWN {
        listed.push_str(&format!(", and {} more", known.len() - SHOWN));
    }
    Some(format!("unknown identity \"{name}\" in {list}; declare it with kind: Identity (known: {listed})"))
}

/// A CIDR peer matches only addresses no identity owns: one inside a declared prefix matches
/// nothing, which is a mistake worth an error.
fn owned_range_problem(net: &IpNet, owned: &[(IpNet, &str)]) -> Option<String> {
    let (prefix, owner) = owned.iter().find(|(prefix, _)| prefix.contains(net))?;
    Some(format!(
        "cidr {net} lies inside {prefix}, which identity \"{owner}\" owns, so it matches no address (a cidr peer \
         matches only addresses no identity owns); name \"{owner}\" instead"
    ))
}

fn quoted_or_unnamed(name: &Option<String>) -> String {
    name.as_ref().map_or_else(|| "(unnamed)".to_owned(), |name| format!("\"{name}\""))
}

/// Why `name` is not a valid identity or policy name, if it is not.
fn name_problem(name: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/:-".contains(c);
    let Some(first) = name.chars().next() else {
        return Some("it is empty".to_owned());
    };
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        Some("start it with a lowercase letter or a digit".to_owned())
    } else if let Some(bad) = name.chars().find(|&c| !allowed(c)) {
        Some(format!("'{bad}' is not allowed; use lowercase letters, digits and . _ / : -"))
    } else if name.len() > MAX_NAME_LEN {
        // Only ASCII is left, so bytes are characters.
        Some(format!("it is {} characters long; use at most {MAX_NAME_LEN}", name.len()))
    } else {
        None
    }
}

/// A `cidr` selector: a canonical prefix of part of an address family.
fn parse_selector(text: &str) -> Result<IpNet, String> {
    let net = parse_prefix(text)?;
    if net.prefix_len() == 0 {
        return Err(format!("{net} is every address, which zt calls world; use world in from/to instead"));
    }
    Ok(net)
}

/// A canonical prefix, not IPv4-mapped (the kernel keys IPv4 as IPv4-mapped IPv6, so such a
/// prefix would alias an IPv4 one).
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let net: IpNet = match text.trim().parse() {
        Ok(net) => net,
        Err(_) => {
            let hint = match text.trim().parse::<IpAddr>() {
                Ok(addr) => format!("for a single address write {}", IpNet::from(addr)),
                Err(_) => "write ADDRESS/PREFIX-LENGTH, e.g. 10.20.3.0/24 or fd00:20:3::/64".to_owned(),
            };
            return Err(format!("invalid CIDR \"{text}\"; {hint}"));
        }
    };
    if net != net.trunc() {
        return Err(format!("CIDR {net} has host bits set; did you mean {}?", net.trunc()));
    }
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            let as_v4 = IpNet::new(v4.into(), v6.prefix_len() - 96).expect("96..=128 minus 96 is a valid IPv4 length");
            return Err(format!("IPv4-mapped prefix {net}; write it as the IPv4 prefix {as_v4}"));
        }
    }
    Ok(net)
}

/// `5432`, `"5432"` or `"6000-6010"`.
fn parse_port(spec: &PortSpec) -> Result<PortRange, String> {
    let port = |value: i64| u16::try_from(value).ok().filter(|&port| port != 0);
    match spec {
        PortSpec::Number(number) => match port(*number) {
            Some(port) => Ok(PortRange { first: port, last: port }),
            None => Err(format!("port {number} is out of range; use 1-65535")),
        },
        PortSpec::Text(text) => {
            let bounds = match text.split_once('-') {
                Some((first, last)) => {
                    (first.trim().parse().ok().and_then(port), last.trim().parse().ok().and_then(port))
                }
                None => {
                    let single = text.trim().parse().ok().and_then(port);
                    (single, single)
                }
            };
            match bounds {
                (Some(first), Some(last)) if first <= last => Ok(PortRange { first, last }),
                _ => Err(format!(
                    "invalid port range \"{text}\"; write \"LO-HI\" with 1 <= LO <= HI <= 65535, e.g. \"6000-6010\""
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests;
