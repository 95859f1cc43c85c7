//! The `--sink` syntax of `zt-agent run`:
//!
//! ```text
//! SPEC   = FORMAT ":" TARGET *("," OPTION)
//! FORMAT ":" TARGET =  json:stdout | json:file=PATH      (also ocsf:… and cef:…)
//!                   |  syslog+udp://HOST:PORT | syslog+tcp://HOST:PORT | syslog+tls://HOST:PORT
//! OPTION = NAME "=" VALUE *("," VALUE)   -- an item without "=" adds a value to the option before
//! ```
//!
//! e.g. `syslog+tls://siem.example:6514,ca=/etc/zt/siem-ca.pem,verdicts=deny,audit`.

use std::{fmt, path::PathBuf, str::FromStr};

use super::{file::FileOptions, syslog::Header, tls::TlsOptions, Format, Renderer};
use crate::events::record::{Filter, FlowVerdict};

/// Queue length of a sink unless `queue=` says otherwise.
pub const DEFAULT_QUEUE: usize = 4096;
/// Rotated files kept unless `keep=` says otherwise.
pub const DEFAULT_KEEP: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkSpec {
    pub name: String,
    pub format: Format,
    /// The RFC 5424 header of a syslog transport.
    pub syslog: Option<Header>,
    pub transport: Transport,
    pub filter: Filter,
    pub queue: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Stdout,
    File(FileOptions),
    Udp(Target),
    /// Octet-counted framing (RFC 6587).
    Tcp(Target),
    /// RFC 5425.
    Tls(Target, TlsOptions),
}

/// A receiver's address, resolved at each connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl SinkSpec {
    /// The default sink: zt's JSON lines on stdout.
    pub fn stdout_json() -> SinkSpec {
        "json:stdout".parse().expect("the default sink spec parses")
    }

    /// Format and transport, e.g. `json:file` or `syslog+tcp`.
    pub fn kind(&self) -> String {
        match &self.transport {
            Transport::Stdout => format!("{}:stdout", self.format.name()),
            Transport::File(_) => format!("{}:file", self.format.name()),
            Transport::Udp(_) => "syslog+udp".into(),
            Transport::Tcp(_) => "syslog+tcp".into(),
            Transport::Tls(..) => "syslog+tls".into(),
        }
    }

    pub fn renderer(&self) -> Renderer {
        Renderer { format: self.format, syslog: self.syslog.clone() }
    }
}

/// Checks a set of sinks together: names must differ, and only one can own stdout.
pub fn validate(specs: &[SinkSpec]) -> Result<(), String> {
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|other| other.name == spec.name) {
            return Err(format!("two sinks are named `{}`: give one of them another name=", spec.name));
        }
        if spec.transport == Transport::Stdout && specs[..i].iter().any(|other| other.transport == Transport::Stdout) {
            return Err(format!("`{}`: only one sink can write to stdout", spec.name));
        }
    }
    Ok(())
}

impl FromStr for SinkSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<SinkSpec, String> {
        parse(spec).map_err(|problem| format!("sink `{spec}`: {problem}"))
    }
}

const USAGE: &str = "write FORMAT:TARGET, e.g. json:stdout, json:file=/var/log/zt/flows.jsonl, \
                     ocsf:file=PATH, cef:stdout, syslog+udp://HOST:PORT, syslog+tcp://HOST:PORT or \
                     syslog+tls://HOST:PORT,ca=PATH";

fn parse(spec: &str) -> Result<SinkSpec, String> {
    let (kind, rest) = spec.split_once(':').ok_or_else(|| format!("no target: {USAGE}"))?;
    let mut items = rest.split(',');
    let target = items.next().unwrap_or_default();
    let mut options = Options::parse(items)?;
    let name = options.single("name")?.unwrap_or_else(|| format!("{kind}:{target}"));
    let queue = match options.single("queue")? {
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("queue=`{n}`: write the number of events the sink may hold, at least 1")),
        },
        None => DEFAULT_QUEUE,
    };
    let filter = Filter {
        verdicts: options.list("verdicts").iter().map(|v| verdict(v)).collect::<Result<_, _>>()?,
        identity: options.single("identity")?,
    };
    let (format, syslog, transport) = match kind {
        "json" | "ocsf" | "cef" => {
            let format = line_format(kind);
            let transport = match target.split_once('=') {
                None if target == "stdout" => Transport::Stdout,
                Some(("file", path)) if !path.is_empty() => Transport::File(file_options(path, &mut options)?),
                _ => return Err(format!("`{target}` is no target of a {kind} sink: write {kind}:stdout or {kind}:file=PATH")),
            };
            (format, None, transport)
        }
        "syslog+udp" | "syslog+tcp" | "syslog+tls" => {
            let target = syslog_target(kind, target)?;
            let format = match options.single("msg")?.as_deref() {
                None | Some("json") => Format::Json,
                Some("ocsf") => Format::Ocsf,
                Some("cef") => Format::Cef,
                Some(other) => return Err(format!("msg=`{other}`: the syslog message is json, ocsf or cef")),
            };
            let facility = match options.single("facility")? {
                Some(name) => facility(&name)?,
                None => FACILITIES.iter().position(|f| *f == "local0").expect("local0 is a facility") as u8,
            };
            let transport = match kind {
                "syslog+udp" => Transport::Udp(target),
                "syslog+tcp" => Transport::Tcp(target),
                _ => {
                    let ca = options.single("ca")?.ok_or(
                        "TLS needs ca=PATH: the PEM file of the CA certificates that sign the receiver's certificate",
                    )?;
                    let server_name = options.single("server-name")?.unwrap_or_else(|| target.host.clone());
                    Transport::Tls(target, TlsOptions { ca: PathBuf::from(ca), server_name })
                }
            };
            (format, Some(Header::new(facility)), transport)
        }
        other => return Err(format!("unknown format `{other}`: {USAGE}")),
    };
    options.finish(kind)?;
    Ok(SinkSpec { name, format, syslog, transport, filter, queue })
}

fn line_format(kind: &str) -> Format {
    match kind {
        "ocsf" => Format::Ocsf,
        "cef" => Format::Cef,
        _ => Format::Json,
    }
}

fn verdict(name: &str) -> Result<FlowVerdict, String> {
    match name {
        "allow" => Ok(FlowVerdict::Allow),
        "deny" => Ok(FlowVerdict::Deny),
        "audit" => Ok(FlowVerdict::Audit),
        other => Err(format!("unknown verdict `{other}` in verdicts=: use allow, deny and audit (e.g. verdicts=deny,audit)")),
    }
}

fn file_options(path: &str, options: &mut Options) -> Result<FileOptions, String> {
    let max_bytes = options.single("max-bytes")?.map(|size| parse_size(&size)).transpose()?;
    let keep = match options.single("keep")? {
        Some(keep) if max_bytes.is_none() => {
            return Err(format!("keep={keep} needs max-bytes=SIZE: files are only rotated by size"))
        }
        Some(keep) => keep
            .parse::<usize>()
            .ok()
            .filter(|k| *k > 0)
            .ok_or_else(|| format!("keep=`{keep}`: write how many rotated files to keep, at least 1"))?,
        None => DEFAULT_KEEP,
    };
    Ok(FileOptions { path: PathBuf::from(path), max_bytes, keep })
}

/// `1048576`, `512k`, `10M`, `1G` (powers of 1024).
fn parse_size(size: &str) -> Result<u64, String> {
    let (digits, unit) = match size.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => size.split_at(at),
        None => (size, ""),
    };
    let scale: u64 = match unit {
        "" => 1,
        "k" | "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => 0,
    };
    // A product past u64 is refused, not wrapped into some other size.
    match digits.parse::<u64>().ok().filter(|n| *n > 0 && scale > 0).and_then(|n| n.checked_mul(scale)) {
        Some(bytes) => Ok(bytes),
        None => Err(format!("max-bytes=`{size}`: write a size such as 1048576, 512k, 10M or 1G")),
    }
}

fn syslog_target(kind: &str, target: &str) -> Result<Target, String> {
    let usage = || format!("write {kind}://HOST:PORT, e.g. {kind}://127.0.0.1:{}", if kind == "syslog+tls" { 6514 } else { 514 });
    let address = target.strip_prefix("//").ok_or_else(usage)?;
    let (host, port) = address.rsplit_once(':').ok_or_else(usage)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = port.parse::<u16>().ok().filter(|p| *p > 0);
    match port {
        Some(port) if !host.is_empty() => Ok(Target { host: host.to_owned(), port }),
        _ => Err(usage()),
    }
}

/// RFC 5424 facility names, by number.
const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp", "ntp",
    "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
];

fn facility(name: &str) -> Result<u8, String> {
    FACILITIES
        .iter()
        .position(|f| *f == name)
        .or_else(|| name.parse::<usize>().ok().filter(|n| *n < FACILITIES.len()))
        .map(|n| n as u8)
        .ok_or_else(|| format!("facility=`{name}`: use a number 0..23 or one of {}", FACILITIES.join(", ")))
}

/// The options after the target, consumed by name; what is left at the end is unknown.
struct Options(Vec<(String, Vec<String>)>);

impl Options {
    fn parse<'a>(items: impl Iterator<Item = &'a str>) -> Result<Options, String> {
        let mut options: Vec<(String, Vec<String>)> = Vec::new();
        for item in items {
            match (item.split_once('='), options.last_mut()) {
                (Some((name, value)), _) => {
                    if options.iter().any(|(seen, _)| seen == name) {
                        return Err(format!("{name}= is given twice"));
                    }
                    options.push((name.to_owned(), vec![value.to_owned()]));
                }
                (None, Some((_, values))) => values.push(item.to_owned()),
                (None, None) => return Err(format!("`{item}` is no option: write NAME=VALUE after the target")),
            }
        }
        Ok(Options(options))
    }

    fn list(&mut self, name: &str) -> Vec<String> {
        match self.0.iter().position(|(n, _)| n == name) {
            Some(at) => self.0.remove(at).1,
            None => Vec::new(),
        }
    }

    fn single(&mut self, name: &str) -> Result<Option<String>, String> {
        let values = self.list(name);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.into_iter().next()),
            _ => Err(format!("{name}= takes one value, not `{}`", values.join(","))),
        }
    }

    fn finish(self, kind: &str) -> Result<(), String> {
        let Some((name, _)) = self.0.first() else { return Ok(()) };
        let known = match kind {
            "syslog+tls" => "name, queue, verdicts, identity, msg, facility, ca, server-name",
            "syslog+udp" | "syslog+tcp" => "name, queue, verdicts, identity, msg, facility",
            _ => "name, queue, verdicts, identity, and for files max-bytes and keep",
        };
        Err(format!("unknown option `{name}` for a {kind} sink; it takes {known}"))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_size_past_u64_is_refused_not_wrapped() {
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        // Found by the sink_spec fuzz target: 9223372036854775803 MiB overflowed.
        assert!(parse_size("9223372036854775803M").unwrap_err().contains("max-bytes"));
        assert!(parse_size("18446744073709551615").is_ok());
    }

    use super::*;

    fn parse_ok(spec: &str) -> SinkSpec {
        spec.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(spec: &str) -> String {
        spec.parse::<SinkSpec>().err().unwrap_or_else(|| panic!("`{spec}` must be refused"))
    }

    #[test]
    fn line_sinks() {
        let stdout = parse_ok("json:stdout");
        assert_eq!((stdout.name.as_str(), stdout.kind(), stdout.queue), ("json:stdout", "json:stdout".to_owned(), DEFAULT_QUEUE));
        assert_eq!(stdout.filter, Filter::default());

        let file = parse_ok("ocsf:file=/var/log/zt/ocsf.jsonl,max-bytes=10M,keep=3,verdicts=deny,audit,name=lake");
        assert_eq!(file.name, "lake");
        assert_eq!(file.format, Format::Ocsf);
        assert_eq!(
            file.transport,
            Transport::File(FileOptions { path: "/var/log/zt/ocsf.jsonl".into(), max_bytes: Some(10 << 20), keep: 3 })
        );
        assert_eq!(file.filter.verdicts, [FlowVerdict::Deny, FlowVerdict::Audit]);
        assert_eq!(parse_ok("cef:file=/tmp/x,max-bytes=512k").transport, Transport::File(FileOptions { path: "/tmp/x".into(), max_bytes: Some(512 << 10), keep: DEFAULT_KEEP }));
    }

    #[test]
    fn syslog_sinks() {
        let udp = parse_ok("syslog+udp://127.0.0.1:5514");
        assert_eq!(udp.transport, Transport::Udp(Target { host: "127.0.0.1".into(), port: 5514 }));
        assert_eq!(udp.format, Format::Json);
        assert_eq!(udp.syslog, Some(Header::new(16)), "local0 by default");

        let tcp = parse_ok("syslog+tcp://[::1]:601,msg=cef,facility=auth,queue=16,identity=db");
        assert_eq!(tcp.transport, Transport::Tcp(Target { host: "::1".into(), port: 601 }));
        assert_eq!((tcp.format, tcp.queue), (Format::Cef, 16));
        assert_eq!(tcp.syslog, Some(Header::new(4)));
        assert_eq!(tcp.filter.identity.as_deref(), Some("db"));

        let tls = parse_ok("syslog+tls://siem.example:6514,ca=/etc/zt/ca.pem");
        assert_eq!(
            tls.transport,
            Transport::Tls(
                Target { host: "siem.example".into(), port: 6514 },
                TlsOptions { ca: "/etc/zt/ca.pem".into(), server_name: "siem.example".into() }
            )
        );
        assert_eq!(tls.kind(), "syslog+tls");
    }

    #[test]
    fn mistakes_are_explained() {
        for (spec, says) in [
            ("stdout", "no target"),
            ("xml:stdout", "unknown format `xml`"),
            ("json:stderr", "write json:stdout or json:file=PATH"),
            ("json:file=", "write json:stdout or json:file=PATH"),
            ("json:stdout,verdicts=denied", "unknown verdict `denied`"),
            ("json:stdout,queue=0", "at least 1"),
            ("json:stdout,colour=red", "unknown option `colour` for a json sink"),
            ("json:stdout,name=a,name=b", "name= is given twice"),
            ("json:file=/x,keep=2", "keep=2 needs max-bytes"),
            ("json:file=/x,max-bytes=ten", "write a size such as"),
            ("syslog+udp://127.0.0.1", "write syslog+udp://HOST:PORT"),
            ("syslog+tcp:127.0.0.1:514", "write syslog+tcp://HOST:PORT"),
            ("syslog+tcp://h:514,ca=/x", "unknown option `ca` for a syslog+tcp sink"),
            ("syslog+tls://h:6514", "TLS needs ca=PATH"),
            ("syslog+udp://h:514,msg=xml", "json, ocsf or cef"),
            ("syslog+udp://h:514,facility=local9", "facility=`local9`"),
            ("syslog+udp://h:514,name=a,b", "name= takes one value"),
        ] {
            let err = parse_err(spec);
            assert!(err.starts_with(&format!("sink `{spec}`: ")), "{err}");
            assert!(err.contains(says), "`{spec}`: {err}");
        }
    }

    #[test]
    fn a_set_of_sinks_has_distinct_names_and_one_stdout() {
        let a = parse_ok("json:stdout");
        let b = parse_ok("cef:stdout");
        assert!(validate(&[a.clone(), b]).unwrap_err().contains("only one sink can write to stdout"));
        assert!(validate(&[a.clone(), a.clone()]).unwrap_err().contains("two sinks are named `json:stdout`"));
        assert!(validate(&[a, parse_ok("json:file=/x")]).is_ok());
    }
}
