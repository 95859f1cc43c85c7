//! The Kubernetes manifests in `deploy/`: rendered with kustomize (the base and each overlay),
//! validated in strict mode against the Kubernetes API schemas (kubernetes-validate), and read
//! for what the DaemonSet must be; the agent accepts the arguments and settings the pods start
//! it with, and the policies the ConfigMap carries. Needs no root and no cluster.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use zt_tests::run_agent_command;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kustomize build` of `dir`, as one document per resource.
fn render(dir: &Path) -> (String, Vec<Value>) {
    let kustomize = std::env::var_os("ZT_KUSTOMIZE").expect("ZT_KUSTOMIZE names kustomize: run the tests with cargo xtask test");
    let out = Command::new(&kustomize).arg("build").arg(dir).output().expect("running kustomize");
    assert!(out.status.success(), "kustomize build {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("kustomize writes YAML"))
        .collect();
    (text, docs)
}

/// kubernetes-validate in strict mode (unknown fields are errors): the failures it prints, if any.
fn validate(text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate is installed by cargo xtask setup");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(()) } else { Err(said) }
}

fn find<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(name_prefix)))
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* rendered"))
}

#[test]
fn the_manifests_render_and_pass_the_kubernetes_schemas_in_strict_mode() {
    for dir in ["base", "overlays/enforce", "overlays/capabilities"] {
        let (text, docs) = render(&deploy_dir().join(dir));
        validate(&text).unwrap_or_else(|said| panic!("deploy/{dir}: {said}"));
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Service"] {
            assert!(kinds.contains(&kind), "deploy/{dir} renders no {kind}: {kinds:?}");
        }
    }
    // The validator is not a formality: a misspelt field fails it.
    let (text, _) = render(&deploy_dir().join("base"));
    let misspelt = text.replacen("hostNetwork: true", "hostNetwrk: true", 1);
    assert_ne!(misspelt, text);
    assert!(validate(&misspelt).is_err_and(|said| said.contains("hostNetwrk")), "strict validation caught nothing");
}

#[test]
fn the_daemonset_runs_one_privileged_agent_per_node_on_the_host_network() {
    let (_, docs) = render(&deploy_dir().join("base"));
    let ds = find(&docs, "DaemonSet", "zt-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]), "every node, tainted or not");
    // One agent per node at a time: a second on the same pins is refused, and enforcement stays
    // in place while the pod is replaced.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"], serde_json::json!({"maxUnavailable": 1, "maxSurge": 0}));
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);

    // The probes reach the agent's metrics endpoint: the port it is told to listen on.
    let port = &container["ports"][0];
    assert_eq!((port["name"].as_str(), port["containerPort"].as_u64()), (Some("metrics"), Some(9090)));
    let env: BTreeMap<&str, &Value> =
        container["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e)).collect();
    assert_eq!(env["ZT_METRICS_ADDR"]["value"], "$(NODE_IP):9090");
    assert_eq!(env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(env["ZT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    for (probe, path) in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"], serde_json::json!({"path": path, "port": "metrics"}), "{probe}");
    }
    assert!(container["resources"]["requests"]["memory"].is_string() && container["resources"]["limits"]["memory"].is_string());

    // bpffs and cgroup v2 from the node; the pins are files in the node's bpffs.
    let mounts: BTreeMap<&str, &Value> =
        container["volumeMounts"].as_array().unwrap().iter().map(|m| (m["name"].as_str().unwrap(), m)).collect();
    let volumes: BTreeMap<&str, &Value> =
        pod["volumes"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    assert_eq!(mounts["bpffs"]["mountPath"], "/sys/fs/bpf");
    assert_eq!(mounts["bpffs"]["mountPropagation"], "HostToContainer");
    assert_eq!(volumes["bpffs"]["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(volumes["cgroup"]["hostPath"]["path"], "/sys/fs/cgroup");
    assert_eq!(mounts["cgroup"]["readOnly"], true);
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(args.contains(&"--bpffs-dir=/sys/fs/bpf/zt"), "{args:?}");
    assert!(args.contains(&format!("--policy={}", mounts["policies"]["mountPath"].as_str().unwrap()).as_str()), "{args:?}");

    // Names that must meet: the service account, the ConfigMaps (hashed names included) and
    // the Service's selector.
    let sa = find(&docs, "ServiceAccount", "zt-agent");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    let settings = find(&docs, "ConfigMap", "zt-agent-settings");
    assert_eq!(container["envFrom"][0]["configMapRef"]["name"], settings["metadata"]["name"]);
    let policies = find(&docs, "ConfigMap", "zt-policies");
    assert_eq!(volumes["policies"]["configMap"]["name"], policies["metadata"]["name"]);
    let service = find(&docs, "Service", "zt-agent-metrics");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the metrics Service selects the agents' pods");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");

    // zt-cni goes onto the node before the agent starts, chained to the agent's socket, with
    // no privilege: root writing the node's CNI directories.
    let init = &pod["initContainers"][0];
    let command: Vec<&str> = init["command"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(command[..2], ["zt-cni", "install"]);
    assert_eq!(init["image"], container["image"], "the plugin comes from the agent's image");
    let init_mounts: BTreeMap<&str, &str> = init["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap(), m["name"].as_str().unwrap()))
        .collect();
    assert_eq!(volumes[init_mounts[command[2]]]["hostPath"]["path"], "/opt/cni/bin");
    assert_eq!(volumes[init_mounts[command[3]]]["hostPath"]["path"], "/etc/cni/net.d");
    assert!(args.contains(&format!("--socket={}", command[4]).as_str()), "zt-cni asks the agent's socket: {args:?}");
    assert_eq!(init["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(settings["data"]["ZT_KUBERNETES"], "true", "pods are identified from the API server");
}

#[test]
fn the_capability_overlay_grants_what_the_capability_test_proves_and_nothing_else() {
    let (_, docs) = render(&deploy_dir().join("overlays/capabilities"));
    let context = &find(&docs, "DaemonSet", "zt-agent")["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(context["privileged"], false);
    assert_eq!(context["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // capabilities.rs starts the agent with these (lowercase there, as setpriv takes them).
    let source = include_str!("capabilities.rs");
    let tested = source.lines().find(|l| l.starts_with("const CAPABILITIES")).expect("capabilities.rs lists its set");
    let added: Vec<String> = context["capabilities"]["add"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_lowercase()).collect();
    for cap in &added {
        assert!(tested.contains(&format!("\"{cap}\"")), "{cap} is granted but not what capabilities.rs tests: {tested}");
    }
    assert_eq!(added.len(), tested.matches('"').count() / 2, "the overlay grants {added:?}, capabilities.rs tests {tested}");
}

#[test]
fn the_agent_reads_only_pods_and_namespaces() {
    let (_, docs) = render(&deploy_dir().join("base"));
    let role = find(&docs, "ClusterRole", "zt-agent");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]}]),
        "least privilege: read-only, two kinds"
    );
    let binding = find(&docs, "ClusterRoleBinding", "zt-agent");
    let sa = find(&docs, "ServiceAccount", "zt-agent");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], sa["metadata"]["namespace"]);
}

/// `zt-agent run --check` with the container's arguments and environment, the policy
/// directory being the rendered ConfigMap's files: what the pod would start, minus the kernel.
fn check_as_the_pod_would(docs: &[Value]) -> std::process::Output {
    let ds = find(docs, "DaemonSet", "zt-agent");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let policy_dir = tempfile::tempdir().unwrap();
    for (file, text) in find(docs, "ConfigMap", "zt-policies")["data"].as_object().unwrap() {
        std::fs::write(policy_dir.path().join(file), text.as_str().unwrap()).unwrap();
    }
    let mut args: Vec<String> = container["command"].as_array().unwrap()[1..].iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    for arg in container["args"].as_array().unwrap() {
        let arg = arg.as_str().unwrap();
        args.push(match arg.strip_prefix("--policy=") {
            Some(_) => format!("--policy={}", policy_dir.path().display()),
            None => arg.to_owned(),
        });
    }
    args.push("--check".into());
    let bin = zt_tests::agent::agent_bin().unwrap();
    let mut command = Command::new(bin);
    command.args(&args).env_clear().env("ZT_NODE_NAME", "node-a").env("ZT_METRICS_ADDR", "10.0.0.1:9090");
    for (key, value) in find(docs, "ConfigMap", "zt-agent-settings")["data"].as_object().unwrap() {
        command.env(key, value.as_str().unwrap());
    }
    command.output().unwrap()
}

#[test]
fn the_agent_accepts_what_each_rendering_starts_it_with() {
    let (_, base) = render(&deploy_dir().join("base"));
    let out = check_as_the_pod_would(&base);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    // No mode in the base: a new node monitors, a node already enforcing keeps enforcing.
    assert!(said.contains("mode:    monitor on a new node, else the mode in force"), "{said}");
    assert!(said.contains("attach:  veth*") && said.contains("policy:  0 identities, 0 rules"), "{said}");
    assert!(said.contains("pods:    from the Kubernetes API server"), "{said}");

    let (_, enforce) = render(&deploy_dir().join("overlays/enforce"));
    let out = check_as_the_pod_would(&enforce);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("mode:    enforce") && said.contains("attach:  veth* cni*"), "{said}");
    assert_eq!(said.matches("  sink:    ").count(), 2, "{said}");
    assert!(said.contains("(syslog+tcp)"), "{said}");

    // And --check is a real check: a bad sink in the settings is refused.
    let mut broken = enforce.clone();
    for doc in &mut broken {
        if doc["kind"] == "ConfigMap" && doc["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("zt-agent-settings")) {
            doc["data"]["ZT_SINKS"] = "syslog+carrier-pigeon://coop:1".into();
        }
    }
    let out = check_as_the_pod_would(&broken);
    assert!(!out.status.success(), "a bad sink passed --check");
    assert!(run_agent_command(["run", "--help"]).unwrap().status.success());
}
