//! `zt-agent flows`: the running agent's flow events, recent or live, over the admin socket.

use std::{
    io::{BufRead as _, BufReader, Write},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{
    control::{self, Request},
    events::record::Filter,
};

/// Prints the recent flows the filter selects and, with `follow`, every new one until the
/// agent stops or the process is interrupted. Drops (this client too slow) go to stderr.
pub fn run(socket: &Path, follow: bool, filter: Filter, json: bool, out: &mut impl Write) -> Result<()> {
    let mut stream = control::connect(socket)?;
    let mut request = serde_json::to_vec(&Request::Flows { follow, filter })?;
    request.push(b'\n');
    stream.write_all(&request)?;
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading flow events from zt-agent")?;
        let event: Value = serde_json::from_str(&line).context("malformed event from zt-agent")?;
        if event["result"] == "error" {
            bail!("zt-agent refused: {}", event["message"].as_str().unwrap_or("no reason given"));
        }
        if event["kind"] == "dropped" {
            eprintln!("zt-agent flows: {} events dropped here: this client read too slowly", event["count"]);
            continue;
        }
        let printed = if json { writeln!(out, "{line}") } else { writeln!(out, "{}", human(&event)) };
        // A closed pipe (`| head`) ends the stream quietly.
        if printed.and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

/// One line per flow: time, verdict, protocol, both ends, and what decided.
pub fn human(event: &Value) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let end = |end: &Value| {
        let ip = text(&end["ip"]);
        let address = match &end["port"] {
            Value::Null => ip,
            port if ip.contains(':') => format!("[{ip}]:{port}"),
            port => format!("{ip}:{port}"),
        };
        format!("{} {address}", text(&end["identity"]))
    };
    let mut line = format!(
        "{} {:<5} {:<6} {} -> {}  {}",
        text(&event["time"]),
        text(&event["verdict"]),
        text(&event["protocol"]),
        end(&event["src"]),
        end(&event["dst"]),
        text(&event["reason"]),
    );
    if !event["rule"].is_null() {
        line.push_str(&format!(" rule {}", text(&event["rule"])));
    }
    line.push_str(&format!(
        " ({} {} {})",
        text(&event["direction"]),
        text(&event["hook"]),
        text(&event["interface"])
    ));
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_flow_reads_on_one_line() {
        let event = json!({
            "kind": "flow", "time": "2026-11-26T23:50:01.123456789Z", "verdict": "deny", "protocol": "tcp",
            "reason": "default-deny", "direction": "egress", "hook": "tc-ingress", "interface": "lxc-intruder",
            "src": {"ip": "fd00::9", "port": 40000, "identity": "intruder"},
            "dst": {"ip": "10.0.0.3", "port": 5432, "identity": "db"},
            "rule": null,
        });
        assert_eq!(
            human(&event),
            "2026-11-26T23:50:01.123456789Z deny  tcp    intruder [fd00::9]:40000 -> db 10.0.0.3:5432  default-deny \
             (egress tc-ingress lxc-intruder)"
        );
        let allowed = json!({"verdict": "allow", "protocol": "icmp", "rule": "api/ingress/0",
                             "src": {"ip": "10.0.0.1", "port": null, "identity": "web"}});
        assert!(human(&allowed).contains("web 10.0.0.1 -> "), "{}", human(&allowed));
        assert!(human(&allowed).contains(" rule api/ingress/0 "), "{}", human(&allowed));
    }
}
