//! RFC 5424 syslog messages, and the octet-counted framing of RFC 6587 for TCP and TLS.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME zt-agent PROCID MSGID [zt@32473 …] MSG`: the timestamp is the
//! event's own (microseconds, UTC), HOSTNAME the node, MSGID the event's kind (`flow`,
//! `identity`, `policy`), the structured data the event's fields flattened one level
//! (`src.ip="10.0.0.1"`), and MSG the event in the sink's format (JSON by default). 32473 is the
//! private enterprise number RFC 5612 reserves for documentation, as zt has none of its own.
//!
//! Formatted here rather than with a syslog crate: those bring their own transports and take the
//! timestamp and hostname from the local clock and machine, where zt's come from the event.

use std::fmt::Write as _;

use serde_json::Value;

pub const APP_NAME: &str = "zt-agent";
pub const SD_ID: &str = "zt@32473";

/// RFC 5424 severities.
const WARNING: u8 = 4;
const NOTICE: u8 = 5;
const INFORMATIONAL: u8 = 6;
const ERROR: u8 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0..=23.
    pub facility: u8,
    pid: u32,
}

impl Header {
    pub fn new(facility: u8) -> Header {
        Header { facility, pid: std::process::id() }
    }

    /// The whole message (without framing) for `event`, carrying `body` as MSG.
    pub fn message(&self, event: &Value, body: &str) -> String {
        let time = humantime::format_rfc3339_micros(super::event_time(event));
        let mut out = format!(
            "<{}>1 {time} {} {APP_NAME} {} {} ",
            self.facility as u32 * 8 + severity(event) as u32,
            header_field(event["node"].as_str().unwrap_or(""), 255),
            self.pid,
            header_field(event["kind"].as_str().unwrap_or(""), 32),
        );
        structured_data(event, &mut out);
        out.push(' ');
        out.push_str(body);
        out
    }
}

/// How much a SIEM should care: denials warn, audits (would-be denials) and agent events are
/// notices, allowed flows informational; a rejected policy or certificate is an error or warning.
pub fn severity(event: &Value) -> u8 {
    match (event["kind"].as_str(), event["verdict"].as_str(), event["result"].as_str()) {
        (Some("flow"), Some("deny"), _) => WARNING,
        (Some("flow"), Some("audit"), _) => NOTICE,
        (Some("flow"), _, _) => INFORMATIONAL,
        (Some("policy"), _, Some("rejected")) => ERROR,
        (_, _, Some("rejected" | "revoked")) => WARNING,
        _ => NOTICE,
    }
}

/// PRINTUSASCII (33..=126) of at most `max` characters, or the NILVALUE `-`.
fn header_field(value: &str, max: usize) -> String {
    let cleaned: String = value.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if cleaned.is_empty() {
        "-".to_owned()
    } else {
        cleaned
    }
}

/// `[zt@32473 name="value" …]` with the event's scalar fields; nested objects (the endpoints)
/// are flattened one level. `time`, `node` and `kind` are in the header already; arrays stay in
/// MSG.
fn structured_data(event: &Value, out: &mut String) {
    let Some(fields) = event.as_object() else {
        out.push('-');
        return;
    };
    out.push('[');
    out.push_str(SD_ID);
    for (name, value) in fields {
        if matches!(name.as_str(), "time" | "node" | "kind") {
            continue;
        }
        match value {
            Value::Object(inner) => {
                for (field, value) in inner {
                    param(out, &format!("{name}.{field}"), value);
                }
            }
            value => param(out, name, value),
        }
    }
    out.push(']');
}

fn param(out: &mut String, name: &str, value: &Value) {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => return,
    };
    // PARAM-NAME: 1..32 printable characters other than '=', ' ', ']' and '"'.
    if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"')) {
        return;
    }
    let _ = write!(out, " {name}=\"{}\"", escape_param_value(&text));
}

/// Inside PARAM-VALUE, `"`, `\` and `]` must be escaped with a backslash (RFC 5424 §6.3.3).
pub fn escape_param_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// RFC 6587 octet counting: `MSG-LEN SP SYSLOG-MSG`, the length in bytes.
pub fn octet_counted(message: &str) -> Vec<u8> {
    let mut framed = format!("{} ", message.len()).into_bytes();
    framed.extend_from_slice(message.as_bytes());
    framed
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn flow() -> Value {
        json!({
            "kind": "flow",
            "time": "2026-11-26T23:50:01.123456789Z",
            "node": "node a",
            "verdict": "deny",
            "reason": "default-deny",
            "src": {"ip": "10.0.0.9", "port": 40000, "identity": "in\"tr]u\\der"},
            "dst": {"ip": "10.0.0.3", "port": 5432, "identity": "db", "cgroup": null},
            "policy": "default-deny",
            "rule": null,
            "generation": 1,
        })
    }

    #[test]
    fn a_flow_becomes_an_rfc5424_message() {
        let header = Header { facility: 16, pid: 42 };
        let message = header.message(&flow(), "{}");
        assert_eq!(
            message,
            "<132>1 2026-11-26T23:50:01.123456Z nodea zt-agent 42 flow [zt@32473 verdict=\"deny\" \
             reason=\"default-deny\" src.ip=\"10.0.0.9\" src.port=\"40000\" src.identity=\"in\\\"tr\\]u\\\\der\" \
             dst.ip=\"10.0.0.3\" dst.port=\"5432\" dst.identity=\"db\" policy=\"default-deny\" generation=\"1\"] {}"
        );
    }

    #[test]
    fn severity_follows_the_verdict_and_the_outcome() {
        let pri = |event: Value| Header { facility: 1, pid: 1 }.message(&event, "").split('>').next().unwrap().to_owned();
        assert_eq!(pri(json!({"kind": "flow", "verdict": "allow"})), "<14");
        assert_eq!(pri(json!({"kind": "flow", "verdict": "audit"})), "<13");
        assert_eq!(pri(json!({"kind": "policy", "result": "rejected"})), "<11");
        assert_eq!(pri(json!({"kind": "policy", "result": "applied"})), "<13");
        assert_eq!(pri(json!({"kind": "identity", "result": "revoked"})), "<12");
    }

    #[test]
    fn header_fields_are_printable_ascii_or_nil() {
        assert_eq!(header_field("", 255), "-");
        assert_eq!(header_field("höst näme", 255), "hstnme");
        assert_eq!(header_field(&"x".repeat(40), 32).len(), 32);
        let message = Header { facility: 0, pid: 1 }.message(&json!({"errors": ["a"], "result": "rejected", "kind": "policy"}), "m");
        assert!(message.contains(" - zt-agent 1 policy [zt@32473 result=\"rejected\"] m"), "{message}");
    }

    #[test]
    fn octet_counting_counts_bytes_not_characters() {
        assert_eq!(octet_counted("<13>1 - - - - - - é"), "20 <13>1 - - - - - - é".as_bytes());
    }
}
