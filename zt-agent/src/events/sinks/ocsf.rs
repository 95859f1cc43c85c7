//! Flow events as OCSF 1.1.0 Network Activity (class 4001, category 4).
//!
//! A flow zt let through (allow, or audit in monitor mode) is activity 1 Open; one it dropped is
//! 5 Refuse, so `type_uid` is 400101 or 400105. `action_id`/`disposition_id` are 1 Allowed/1
//! Allowed or 2 Denied/2 Blocked. An audit is what it was — allowed — with `message` saying that
//! enforce mode would have denied it, severity Low (deny: Medium, allow: Informational).
//! `connection_info.direction_id` is zt's deciding direction: ingress rules → 1 Inbound, egress
//! rules → 2 Outbound. zt's own names (identities, policy, rule, reason, hook, node) are under
//! `unmapped.zt`.

use serde_json::{json, Map, Value};

use super::{epoch_millis, event_time};

pub const SCHEMA_VERSION: &str = "1.1.0";
pub const CLASS_UID: u64 = 4001;
pub const CATEGORY_UID: u64 = 4;

pub fn render(event: &Value) -> Value {
    let verdict = event["verdict"].as_str().unwrap_or("unknown");
    let (activity_id, activity) = if verdict == "deny" { (5, "Refuse") } else { (1, "Open") };
    let (action_id, action, disposition_id, disposition) =
        if verdict == "deny" { (2, "Denied", 2, "Blocked") } else { (1, "Allowed", 1, "Allowed") };
    let (severity_id, severity) = match verdict {
        "deny" => (3, "Medium"),
        "audit" => (2, "Low"),
        _ => (1, "Informational"),
    };
    let (direction_id, direction) = match event["direction"].as_str() {
        Some("ingress") => (1, "Inbound"),
        Some("egress") => (2, "Outbound"),
        _ => (0, "Unknown"),
    };
    let src = &event["src"];
    let dst = &event["dst"];
    let name = |end: &Value| end["identity"].as_str().unwrap_or("?").to_owned();
    let message = match verdict {
        // Passed by the policies in force; a `mode: monitor` policy would deny it.
        "audit" if event["staged"] == true => format!(
            "{} → {} allowed; staged policy {} would deny it ({})",
            name(src),
            name(dst),
            event["policy"].as_str().unwrap_or("?"),
            event["reason"].as_str().unwrap_or("unknown")
        ),
        "audit" => format!(
            "{} → {} allowed in monitor mode; enforce mode would deny it ({})",
            name(src),
            name(dst),
            event["reason"].as_str().unwrap_or("unknown")
        ),
        _ => format!("{} → {} {verdict} ({})", name(src), name(dst), event["reason"].as_str().unwrap_or("unknown")),
    };
    let mut connection = Map::new();
    if let Some(number) = protocol_number(&event["protocol"]) {
        connection.insert("protocol_num".into(), number.into());
    }
    if let Some(protocol) = event["protocol"].as_str() {
        connection.insert("protocol_name".into(), protocol.into());
    }
    if let Some(ip) = src["ip"].as_str() {
        connection.insert("protocol_ver_id".into(), if ip.contains(':') { 6 } else { 4 }.into());
    }
    connection.insert("direction_id".into(), direction_id.into());
    connection.insert("direction".into(), direction.into());

    json!({
        "class_uid": CLASS_UID,
        "class_name": "Network Activity",
        "category_uid": CATEGORY_UID,
        "category_name": "Network Activity",
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": format!("Network Activity: {activity}"),
        "time": epoch_millis(event_time(event)),
        "severity_id": severity_id,
        "severity": severity,
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
        "message": message,
        "metadata": {
            "version": SCHEMA_VERSION,
            "product": {"name": "zt", "vendor_name": "zt", "version": env!("CARGO_PKG_VERSION")},
        },
        "src_endpoint": endpoint(src),
        "dst_endpoint": endpoint(dst),
        "connection_info": connection,
        "unmapped": {"zt": present(json!({
            "node": event["node"],
            "verdict": verdict,
            "mode": event["mode"],
            "reason": event["reason"],
            "direction": event["direction"],
            "hook": event["hook"],
            "interface": event["interface"],
            "src_identity": src["identity"],
            "dst_identity": dst["identity"],
            "policy": event["policy"],
            "rule": event["rule"],
            "generation": event["generation"],
            "icmp": event["icmp"],
        }))},
    })
}

/// The object without its null fields.
fn present(object: Value) -> Value {
    match object {
        Value::Object(fields) => fields.into_iter().filter(|(_, v)| !v.is_null()).collect::<Map<_, _>>().into(),
        other => other,
    }
}

fn endpoint(end: &Value) -> Value {
    let mut out = Map::new();
    for field in ["ip", "port"] {
        if !end[field].is_null() {
            out.insert(field.into(), end[field].clone());
        }
    }
    out.into()
}

/// IANA protocol number of zt's protocol name (other protocols are named by their number).
fn protocol_number(protocol: &Value) -> Option<u64> {
    match protocol.as_str()? {
        "icmp" => Some(1),
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmpv6" => Some(58),
        "sctp" => Some(132),
        other => other.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(verdict: &str, protocol: &str, direction: &str) -> Value {
        json!({
            "kind": "flow", "time": "2026-11-26T23:50:01.123456789Z", "node": "node-a",
            "verdict": verdict, "mode": "enforce", "reason": "default-deny", "direction": direction,
            "hook": "tc-ingress", "interface": "lxc-web", "protocol": protocol,
            "src": {"ip": "fd00::1", "port": null, "identity": "web"},
            "dst": {"ip": "fd00::3", "port": null, "identity": "db"},
            "policy": "default-deny", "rule": null, "generation": 1,
        })
    }

    #[test]
    fn a_denied_flow_is_a_refused_blocked_connection() {
        let ocsf = render(&flow("deny", "icmpv6", "ingress"));
        assert_eq!((ocsf["class_uid"].as_u64(), ocsf["category_uid"].as_u64()), (Some(4001), Some(4)));
        assert_eq!((ocsf["activity_id"].as_u64(), ocsf["type_uid"].as_u64()), (Some(5), Some(400105)));
        assert_eq!((ocsf["action_id"].as_u64(), ocsf["disposition_id"].as_u64()), (Some(2), Some(2)));
        assert_eq!(ocsf["disposition"], "Blocked");
        assert_eq!(ocsf["severity_id"], 3);
        assert_eq!(ocsf["time"], 1_795_737_001_123u64);
        assert_eq!(ocsf["connection_info"], json!({"protocol_num": 58, "protocol_name": "icmpv6", "protocol_ver_id": 6, "direction_id": 1, "direction": "Inbound"}));
        assert_eq!(ocsf["src_endpoint"], json!({"ip": "fd00::1"}), "no port for ICMP");
        assert_eq!(ocsf["unmapped"]["zt"]["dst_identity"], "db");
        assert!(ocsf["unmapped"]["zt"].get("rule").is_none(), "no null fields: {ocsf:#}");
        assert_eq!(ocsf["metadata"]["product"]["name"], "zt");
    }

    #[test]
    fn an_audit_is_allowed_with_a_note_and_an_allow_is_informational() {
        let audit = render(&flow("audit", "tcp", "egress"));
        assert_eq!((audit["activity_id"].as_u64(), audit["type_uid"].as_u64()), (Some(1), Some(400101)));
        assert_eq!((audit["action"].as_str(), audit["disposition"].as_str()), (Some("Allowed"), Some("Allowed")));
        assert_eq!(audit["severity_id"], 2);
        assert!(audit["message"].as_str().unwrap().contains("enforce mode would deny it"), "{audit:#}");
        // A staged policy's audit on an enforcing node says whose denial it is.
        let mut staged = flow("audit", "tcp", "egress");
        staged["staged"] = true.into();
        staged["policy"] = "db-lockdown".into();
        let staged = render(&staged);
        assert_eq!(staged["action"], "Allowed");
        assert_eq!(staged["message"], "web → db allowed; staged policy db-lockdown would deny it (default-deny)");
        assert_eq!(audit["connection_info"]["direction_id"], 2);
        assert_eq!(audit["connection_info"]["protocol_num"], 6);
        let allow = render(&flow("allow", "200", "none"));
        assert_eq!(allow["severity_id"], 1);
        assert_eq!(allow["connection_info"]["protocol_num"], 200);
        assert_eq!(allow["connection_info"]["direction_id"], 0);
    }
}
