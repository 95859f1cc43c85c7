//! `zt-cni`: a CNI plugin (spec 1.0) chained after the cluster's own. On ADD it hands the pod's
//! host-side interface and addresses to the node's agent and returns only once the agent has
//! attached to it and (for a Kubernetes pod, with the agent's `--kubernetes`) bound it to the
//! pod's identity, so no packet of the pod goes unjudged or judged as someone else; on DEL it
//! has the agent forget the interface. The previous plugin's result passes through unchanged.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::control::{self, PodName, Request, DEFAULT_SOCKET};

/// The versions of the CNI spec this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// This plugin's part of the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    cni_version: String,
    /// The agent's admin socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// What the runtime passes in the environment.
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    /// CNI_ARGS: `K8S_POD_NAMESPACE=…;K8S_POD_NAME=…` under Kubernetes.
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        let args = var("CNI_ARGS")
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Invocation { command: var("CNI_COMMAND"), container_id: var("CNI_CONTAINERID"), args }
    }

    fn pod(&self) -> String {
        match self.kubernetes() {
            Some(PodName { namespace, name }) => format!("{namespace}/{name}"),
            None => format!("container {}", self.container_id),
        }
    }

    fn kubernetes(&self) -> Option<PodName> {
        match (self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")) {
            (Some(namespace), Some(name)) => Some(PodName { namespace: namespace.clone(), name: name.clone() }),
            _ => None,
        }
    }
}

/// Runs one invocation on `config` (stdin); what to print on success.
pub fn run(invocation: &Invocation, config: &str) -> Result<String> {
    if invocation.command == "VERSION" {
        return Ok(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string());
    }
    let config: Config = serde_json::from_str(config).context("the network configuration is not what zt-cni takes")?;
    if !SUPPORTED_VERSIONS.contains(&config.cni_version.as_str()) {
        bail!("cniVersion {} is not one of {}", config.cni_version, SUPPORTED_VERSIONS.join(", "));
    }
    let socket = config.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let pod = invocation.pod();
    match invocation.command.as_str() {
        "ADD" => {
            let result = config.prev_result.context("no prevResult: zt-cni is chained after the plugin that makes the pod's interface")?;
            let interfaces = host_interfaces(&result);
            if interfaces.is_empty() {
                bail!("the previous plugin's result names no host-side interface for {pod}");
            }
            let addresses = pod_addresses(&result);
            for interface in interfaces {
                let request =
                    Request::AttachPod { interface: interface.clone(), pod: pod.clone(), kubernetes: invocation.kubernetes(), addresses: addresses.clone() };
                control::request(&socket, &request)
                    .with_context(|| format!("the zt agent did not attach to {interface} (socket {})", socket.display()))?;
            }
            Ok(result.to_string())
        }
        "DEL" => {
            // DEL must succeed when there is nothing left to undo (CNI spec): no result, no
            // agent to ask.
            for interface in config.prev_result.as_ref().map(host_interfaces).unwrap_or_default() {
                let request = Request::ForgetPod { interface: interface.clone(), pod: pod.clone(), kubernetes: invocation.kubernetes() };
                if let Err(err) = control::request(&socket, &request) {
                    eprintln!("zt-cni: DEL {pod}: {interface}: {err:#}");
                }
            }
            Ok(String::new())
        }
        "CHECK" => {
            let result = config.prev_result.context("no prevResult to check")?;
            let status = control::request(&socket, &Request::Status)?;
            for interface in host_interfaces(&result) {
                let attached = status.attachments.iter().filter(|a| a.interface == interface).count();
                if attached < 2 {
                    bail!("{interface} of {pod} is not attached (TC ingress and egress)");
                }
            }
            Ok(String::new())
        }
        other => bail!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
    }
}

/// The result's interfaces on the host side (no `sandbox`): the pod's end of a veth pair is in
/// the pod's namespace, the other end here. A bridge the previous plugin reports (the bridge
/// plugin lists it too) is left out: it is the node's, shared by every pod.
fn host_interfaces(result: &Value) -> Vec<String> {
    let Some(interfaces) = result["interfaces"].as_array() else { return Vec::new() };
    interfaces
        .iter()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty) && !is_bridge(i))
        .filter_map(|i| i["name"].as_str().map(str::to_owned))
        .collect()
}

/// The pod's addresses in the result (`ips[].address`, without their prefix length).
fn pod_addresses(result: &Value) -> Vec<IpAddr> {
    let Some(ips) = result["ips"].as_array() else { return Vec::new() };
    ips.iter()
        .filter_map(|ip| ip["address"].as_str()?.parse::<ipnet::IpNet>().ok())
        .map(|net| net.addr())
        .collect()
}

fn is_bridge(interface: &Value) -> bool {
    let name = interface["name"].as_str().unwrap_or_default();
    nix::net::if_::if_nametoindex(name).is_ok() && std::path::Path::new("/sys/class/net").join(name).join("bridge").exists()
}

/// The error result the spec asks for (on stdout, exit code 1).
pub fn error_result(err: &anyhow::Error) -> String {
    json!({"cniVersion": "1.0.0", "code": 999, "msg": format!("{err:#}")}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_side_interfaces_are_those_without_a_sandbox() {
        let ptp = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1a2b3c", "mac": "aa:bb:cc:00:00:01"},
                           {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/run/netns/pod"}],
            "ips": [{"address": "10.30.0.2/24", "interface": 1, "gateway": "10.30.0.1"}]
        });
        assert_eq!(host_interfaces(&ptp), ["veth1a2b3c"]);
        assert_eq!(pod_addresses(&ptp), ["10.30.0.2".parse::<IpAddr>().unwrap()]);
        assert!(host_interfaces(&json!({"cniVersion": "1.0.0"})).is_empty());
    }

    #[test]
    fn version_needs_no_agent_and_bad_configs_say_why() {
        let version = Invocation { command: "VERSION".into(), container_id: String::new(), args: BTreeMap::new() };
        let said: Value = serde_json::from_str(&run(&version, "").unwrap()).unwrap();
        assert_eq!(said["supportedVersions"], json!(SUPPORTED_VERSIONS));
        let add = Invocation { command: "ADD".into(), container_id: "c1".into(), args: BTreeMap::new() };
        let err = run(&add, r#"{"cniVersion": "0.3.1", "name": "n", "type": "zt-cni"}"#).unwrap_err();
        assert!(err.to_string().contains("cniVersion 0.3.1 is not one of"), "{err:#}");
        let err = run(&add, r#"{"cniVersion": "1.0.0", "name": "n", "type": "zt-cni"}"#).unwrap_err();
        assert!(err.to_string().contains("no prevResult"), "{err:#}");
        let del = Invocation { command: "DEL".into(), container_id: "c1".into(), args: BTreeMap::new() };
        assert_eq!(run(&del, r#"{"cniVersion": "1.0.0", "name": "n", "type": "zt-cni"}"#).unwrap(), "", "DEL with nothing to undo");
    }
}
