//! Invoking CNI plugins as a container runtime does: the command and the pod in the
//! environment, the network configuration on stdin, the result on stdout.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;
use zt_tests::Netns;

/// Debian's containernetworking-plugins.
pub const PLUGINS: &str = "/usr/lib/cni";

/// Who the runtime says the plugins work for.
pub struct PodRef<'a> {
    pub container_id: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    /// The pod's network namespace.
    pub netns: &'a Netns,
}

/// Runs `plugin` with `command` from inside `node` (where the host side of the pod's interface
/// goes); its success, what it printed on stdout (JSON, or nothing) and its stderr.
pub fn invoke(node: &Netns, plugin: &Path, command: &str, pod: &PodRef, config: &Value) -> (bool, Value, String) {
    node.run(|| {
        let mut child = Command::new(plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod.container_id)
            .env("CNI_NETNS", pod.netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", PLUGINS)
            // As Kubernetes runtimes pass them (IgnoreUnknown: plugins that take no K8S_ args).
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", pod.namespace, pod.name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (cargo xtask setup installs containernetworking-plugins)", plugin.display()));
        child.stdin.take().unwrap().write_all(config.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let parsed = if stdout.is_empty() { Value::Null } else { serde_json::from_str(&stdout).unwrap_or(Value::String(stdout)) };
        (out.status.success(), parsed, String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

pub fn plugin(name: &str) -> PathBuf {
    Path::new(PLUGINS).join(name)
}

pub fn zt_cni() -> PathBuf {
    zt_tests::agent::agent_bin().unwrap().with_file_name("zt-cni")
}

/// The host-side interface and the first address of a ptp or bridge result.
pub fn host_side(result: &Value) -> (String, std::net::IpAddr) {
    let interfaces = result["interfaces"].as_array().expect("a result with interfaces");
    let veth = interfaces.iter().find(|i| i["sandbox"].is_null()).expect("a host-side interface")["name"].as_str().unwrap();
    let address = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();
    (veth.to_owned(), address)
}
