//! ArcSight Common Event Format for flow events:
//! `CEF:0|zt|zt-agent|VERSION|SIGNATURE|NAME|SEVERITY|EXTENSION`.
//!
//! The signature id is `VERDICT:REASON` (e.g. `deny:default-deny`), the severity 7 for a
//! denial, 5 for an audit and 3 for an allowed flow. The extension maps the flow onto CEF's
//! keys (rt, dvchost, act, src, spt, dst, dpt, proto, deviceDirection, and the hook's interface as
//! deviceInboundInterface or deviceOutboundInterface)
//! and zt's names onto labelled custom strings (a label only with its value): cs1 source identity, cs2 destination identity,
//! cs3 policy, cs4 rule, cs5 reason, cs6 hook; cn1 is the policy generation.

use serde_json::Value;

use super::{epoch_millis, event_time};

pub fn render(event: &Value) -> String {
    let verdict = event["verdict"].as_str().unwrap_or("unknown");
    let reason = event["reason"].as_str().unwrap_or("unknown");
    let staged = event["staged"] == true;
    let (name, severity) = match verdict {
        "deny" => ("Flow denied", 7),
        "audit" if staged => ("Flow audited: a staged policy would deny it", 5),
        "audit" => ("Flow audited: would be denied in enforce mode", 5),
        "allow" => ("Flow allowed", 3),
        _ => ("Flow", 5),
    };
    let mut out = format!(
        "CEF:0|zt|zt-agent|{}|{}|{}|{severity}|",
        escape_header(env!("CARGO_PKG_VERSION")),
        escape_header(&format!("{verdict}:{reason}")),
        escape_header(name),
    );
    let text = |value: &Value| match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let direction = match event["direction"].as_str() {
        Some("ingress") => Some("0".to_owned()),
        Some("egress") => Some("1".to_owned()),
        _ => None,
    };
    // The hook's interface: packets arrive through it at TC ingress and XDP, leave through it at
    // TC egress.
    let interface_key = match event["hook"].as_str() {
        Some("tc-egress" | "cgroup-egress") => "deviceOutboundInterface",
        _ => "deviceInboundInterface",
    };
    let fields = [
        ("rt", Some(epoch_millis(event_time(event)).to_string())),
        ("dvchost", text(&event["node"])),
        ("act", Some(verdict.to_owned())),
        ("src", text(&event["src"]["ip"])),
        ("spt", text(&event["src"]["port"])),
        ("dst", text(&event["dst"]["ip"])),
        ("dpt", text(&event["dst"]["port"])),
        ("proto", text(&event["protocol"]).map(|p| p.to_uppercase())),
        ("deviceDirection", direction),
        (interface_key, text(&event["interface"])),
    ];
    // Custom fields come with their labels, and neither is written without a value.
    let custom = [
        ("cs1", "srcIdentity", text(&event["src"]["identity"])),
        ("cs2", "dstIdentity", text(&event["dst"]["identity"])),
        ("cs3", "policy", text(&event["policy"])),
        ("cs4", "rule", text(&event["rule"])),
        ("cs5", "reason", Some(reason.to_owned())),
        ("cs6", "hook", text(&event["hook"])),
        ("cn1", "generation", text(&event["generation"])),
    ];
    let labelled = custom.into_iter().filter_map(|(key, label, value)| Some((key, label, value?)));
    let mut pairs: Vec<(String, String)> =
        fields.into_iter().filter_map(|(key, value)| Some((key.to_owned(), value?))).collect();
    for (key, label, value) in labelled {
        pairs.push((format!("{key}Label"), label.to_owned()));
        pairs.push((key.to_owned(), value));
    }
    let extension: Vec<String> = pairs.iter().map(|(key, value)| format!("{key}={}", escape_extension(value))).collect();
    out.push_str(&extension.join(" "));
    out
}

/// Header fields: `\` and `|` are escaped with a backslash; a line break would end the record,
/// so it becomes a space.
pub fn escape_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' | '|' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Extension values: `\` and `=` are escaped with a backslash, line breaks written as `\n` and
/// `\r`.
pub fn escape_extension(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_denied_flow() {
        let event = json!({
            "kind": "flow",
            "time": "2026-11-26T23:50:01.123456789Z",
            "node": "node-a",
            "verdict": "deny",
            "reason": "default-deny",
            "direction": "egress",
            "hook": "tc-ingress",
            "interface": "lxc-intruder",
            "protocol": "tcp",
            "src": {"ip": "10.0.0.9", "port": 40000, "identity": "intruder"},
            "dst": {"ip": "fd00::3", "port": 5432, "identity": "db"},
            "policy": "default-deny",
            "rule": null,
            "generation": 2,
        });
        assert_eq!(
            render(&event),
            format!(
                "CEF:0|zt|zt-agent|{}|deny:default-deny|Flow denied|7|rt=1795737001123 dvchost=node-a act=deny \
                 src=10.0.0.9 spt=40000 dst=fd00::3 dpt=5432 proto=TCP deviceDirection=1 \
                 deviceInboundInterface=lxc-intruder cs1Label=srcIdentity cs1=intruder cs2Label=dstIdentity cs2=db \
                 cs3Label=policy cs3=default-deny cs5Label=reason cs5=default-deny cs6Label=hook \
                 cs6=tc-ingress cn1Label=generation cn1=2",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn escaping_keeps_fields_apart() {
        assert_eq!(escape_header(r"a|b\c"), r"a\|b\\c");
        assert_eq!(escape_header("a\nb"), "a b");
        assert_eq!(escape_extension("k=v\\x\ny\r"), r"k\=v\\x\ny\r");
        assert_eq!(escape_extension("a|b"), "a|b", "pipes need no escape in the extension");
        let event = json!({"kind": "flow", "verdict": "allow", "reason": "policy|allow",
                           "src": {"identity": "we=b"}, "rule": "api/ingress/0"});
        let line = render(&event);
        assert!(line.contains("|allow:policy\\|allow|Flow allowed|3|"), "{line}");
        assert!(line.contains(" cs1=we\\=b "), "{line}");
        assert!(line.contains(" cs4=api/ingress/0 "), "{line}");
        assert!(!line.contains("spt="), "absent fields are left out: {line}");
    }

    #[test]
    fn a_staged_audit_is_named_as_one() {
        let event = json!({"kind": "flow", "verdict": "audit", "reason": "policy-deny", "staged": true});
        assert!(render(&event).contains("|audit:policy-deny|Flow audited: a staged policy would deny it|5|"));
        let event = json!({"kind": "flow", "verdict": "audit", "reason": "default-deny"});
        assert!(render(&event).contains("|Flow audited: would be denied in enforce mode|5|"));
    }
}
