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

/// The configuration `install` writes: it sorts before the cluster's own, so the runtime,
/// which takes the first in the directory, takes it.
pub const CHAINED_CONFIG: &str = "00-zt-chained.conflist";

/// Puts this plugin on a node: copies this binary into `bin_dir` as `zt-cni`, and writes
/// [`CHAINED_CONFIG`] into `conf_dir`: the cluster's network configuration (the first other
/// `*.conflist` or `*.conf` there, in the runtime's order) with zt-cni chained last. Both are
/// written aside and renamed into place, so a runtime never reads half a file. Run again, it
/// rewrites them from the cluster's configuration as it is then. Returns what it did.
pub fn install(bin_dir: &std::path::Path, conf_dir: &std::path::Path, socket: &std::path::Path) -> Result<String> {
    use std::fs;
    let own = std::env::current_exe().context("finding zt-cni's own binary")?;
    let plugin = bin_dir.join("zt-cni");
    let staged = bin_dir.join(".zt-cni.new");
    fs::copy(&own, &staged).with_context(|| format!("copying {} to {}", own.display(), staged.display()))?;
    fs::rename(&staged, &plugin).with_context(|| format!("installing {}", plugin.display()))?;

    let mut configs: Vec<std::path::PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("listing {}", conf_dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| matches!(path.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .filter(|path| path.file_name().is_some_and(|name| name != CHAINED_CONFIG))
        .collect();
    configs.sort();
    let Some(cluster) = configs.first() else {
        bail!("no CNI configuration in {}: install the cluster's network plugin first (zt-cni chains after it)", conf_dir.display());
    };
    let text = fs::read_to_string(cluster).with_context(|| format!("reading {}", cluster.display()))?;
    let chained = chain(&text, socket).with_context(|| format!("chaining zt-cni after {}", cluster.display()))?;
    let target = conf_dir.join(CHAINED_CONFIG);
    let staged = conf_dir.join(format!(".{CHAINED_CONFIG}.new"));
    fs::write(&staged, serde_json::to_string_pretty(&chained)? + "\n").with_context(|| format!("writing {}", staged.display()))?;
    fs::rename(&staged, &target).with_context(|| format!("installing {}", target.display()))?;
    Ok(format!("zt-cni: installed {} and {}, chained after {}", plugin.display(), target.display(), cluster.display()))
}

/// A network configuration list (or a single plugin's configuration, as a list of one) with
/// zt-cni last, once.
fn chain(text: &str, socket: &std::path::Path) -> Result<Value> {
    let mut config: Value = serde_json::from_str(text).context("not JSON")?;
    if config.get("plugins").is_none() {
        // A single plugin's `.conf`: its name and version go to the list.
        let list = json!({"cniVersion": config["cniVersion"], "name": config["name"], "plugins": [config.clone()]});
        config = list;
    }
    let plugins = config["plugins"].as_array_mut().context("\"plugins\" is not a list")?;
    plugins.retain(|plugin| plugin["type"] != "zt-cni");
    if plugins.is_empty() {
        bail!("the configuration lists no plugin to chain after");
    }
    plugins.push(json!({"type": "zt-cni", "socket": socket}));
    Ok(config)
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
    fn install_chains_after_the_first_configuration_once() {
        let (bin, conf) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let socket = std::path::Path::new("/run/zt/agent.sock");
        assert!(install(bin.path(), conf.path(), socket).unwrap_err().to_string().contains("no CNI configuration"));
        std::fs::write(conf.path().join("10-flannel.conflist"), r#"{"cniVersion": "1.0.0", "name": "cbr0",
            "plugins": [{"type": "flannel", "delegate": {"isDefaultGateway": true}}, {"type": "portmap"}]}"#).unwrap();
        std::fs::write(conf.path().join("99-loopback.conf"), r#"{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}"#).unwrap();
        for _ in 0..2 {
            install(bin.path(), conf.path(), socket).unwrap();
            let written: Value = serde_json::from_str(&std::fs::read_to_string(conf.path().join(CHAINED_CONFIG)).unwrap()).unwrap();
            let types: Vec<&str> = written["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
            assert_eq!(types, ["flannel", "portmap", "zt-cni"], "after the first configuration, once");
            assert_eq!((written["name"].as_str(), written["plugins"][2]["socket"].as_str()), (Some("cbr0"), Some("/run/zt/agent.sock")));
        }
        assert!(bin.path().join("zt-cni").is_file());
        let single = chain(r#"{"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}"#, socket).unwrap();
        assert_eq!(single["plugins"][0]["bridge"], "cni0");
        assert_eq!((single["name"].as_str(), single["plugins"][1]["type"].as_str()), (Some("net"), Some("zt-cni")));
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
