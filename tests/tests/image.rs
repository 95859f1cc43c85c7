//! The container image, deploy/image/Containerfile, built with Debian's podman from local layers
//! only (no registry is ever asked: `--pull=never`, no search registries) and run the way
//! deploy/base runs it — privileged, on the node's network, with the node's bpffs, the policy
//! and the admin socket directory mounted, the DaemonSet's own command and arguments — against
//! a test-made node namespace, never the machine's network. It attaches, enforces with real
//! packets and answers `/readyz`.
//!
//! No Rust is compiled in a container (minutes, and the network): the runtime stage is built
//! from the agent the suite already built (`--build-context compiled=<dir>` replaces the build
//! stage, and the base is an image of the host libraries the binaries link), and the build
//! stage runs with stand-ins for rustup and cargo that record how they are called, which checks
//! its commands, its context and its hand-over to the runtime stage.
//!
//! podman keeps all of its state — images, containers, run state, events, temporary files —
//! in a directory of the test's, and its containers in a cgroup parent of the test's; all are
//! removed on drop, and those of a run that died are removed by the next. Needs root (except
//! the static check); fails, never skips.

use std::{
    collections::BTreeMap,
    env, fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use zt_tests::{
    ensure_root, http_get,
    podman::{unique, Container, Image, Podman, Rootfs},
    tcp_connect, tcp_server, BpffsDir, Topology, TopologySpec,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_owned()
}

fn containerfile() -> PathBuf {
    repo_root().join("deploy/image/Containerfile")
}

// ---------------------------------------------------------------------------------------------
// The Containerfile read as text: stages, their bases, what they copy from where.

/// One instruction: its keyword in upper case and the rest, continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut parsed = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        // Comments and blank lines may also sit between continuation lines.
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (keyword, rest) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                parsed.push((keyword.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    parsed
}

#[derive(Debug)]
struct Stage {
    /// The `FROM` argument, build arguments not expanded.
    base: String,
    name: Option<String>,
    instructions: Vec<(String, String)>,
}

/// The global `ARG`s (before the first `FROM`) with their defaults, and the stages in order.
fn stages(text: &str) -> (BTreeMap<String, String>, Vec<Stage>) {
    let mut global_args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for (keyword, rest) in instructions(text) {
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                [_] => None,
                _ => panic!("FROM {rest}: not `FROM <image> [AS <name>]`"),
            };
            stages.push(Stage { base: words[0].to_owned(), name, instructions: Vec::new() });
            continue;
        }
        match stages.last_mut() {
            Some(stage) => stage.instructions.push((keyword, rest)),
            None if keyword == "ARG" => {
                let (name, default) = rest.split_once('=').unwrap_or((&rest, ""));
                global_args.insert(name.to_owned(), default.to_owned());
            }
            None => panic!("{keyword} before the first FROM"),
        }
    }
    (global_args, stages)
}

/// `${NAME}` or `$NAME` with `args`' value; anything else as it is.
fn expand<'a>(word: &'a str, args: &'a BTreeMap<String, String>) -> &'a str {
    let name = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')).or_else(|| word.strip_prefix('$'));
    match name {
        Some(name) => args.get(name).unwrap_or_else(|| panic!("{word}: no global ARG {name}")),
        None => word,
    }
}

/// The default of `ARG name=…` in `stage`.
fn stage_arg(stage: &Stage, name: &str) -> String {
    stage
        .instructions
        .iter()
        .filter(|(keyword, _)| keyword == "ARG")
        .find_map(|(_, rest)| rest.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
        .unwrap_or_else(|| panic!("stage {:?} has no ARG {name}=<default>", stage.name))
}

/// The string value of `const NAME: &str = "…";` in a Rust source file of the workspace.
fn rust_str_const(file: &str, name: &str) -> String {
    let text = fs::read_to_string(repo_root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let prefix = format!("const {name}: &str = \"");
    text.lines()
        .find_map(|line| line.trim().strip_prefix(&prefix)?.split_once('"').map(|(value, _)| value.to_owned()))
        .unwrap_or_else(|| panic!("{file} has no `{prefix}…\"`"))
}

#[test]
fn the_containerfile_stages_fit_together_and_pin_the_toolchain_setup_installs() {
    let text = fs::read_to_string(containerfile()).unwrap();
    let (args, stages) = stages(&text);
    let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    for arg in ["RUST_IMAGE", "RUNTIME_IMAGE"] {
        assert!(args.contains_key(arg), "no global ARG {arg} (the image test sets it): {args:?}");
    }

    // Every stage is based on an image or an earlier stage, and copies only from earlier stages.
    for (index, stage) in stages.iter().enumerate() {
        let earlier: Vec<&str> = stages[..index].iter().filter_map(|s| s.name.as_deref()).collect();
        let base = expand(&stage.base, &args);
        assert!(
            !names.contains(&base) || earlier.contains(&base),
            "{:?} is based on {base}, a later stage",
            stage.name
        );
        for (_, rest) in stage.instructions.iter().filter(|(keyword, _)| keyword == "COPY") {
            if let Some(from) = rest.split_whitespace().find_map(|w| w.strip_prefix("--from=")) {
                assert!(
                    earlier.contains(&from),
                    "COPY --from={from} in {:?}: not an earlier stage ({earlier:?})",
                    stage.name
                );
            }
        }
    }
    // The build stage, which the image test replaces with `--build-context compiled=<dir>`,
    // leaves the binaries in /out, where the runtime stage takes them.
    let compiled = stages.iter().find(|s| s.name.as_deref() == Some("compiled")).expect("a stage named compiled");
    assert_eq!(expand(&compiled.base, &args), args["RUST_IMAGE"]);
    let leaves = |binary: &str| {
        compiled
            .instructions
            .iter()
            .any(|(k, rest)| k == "RUN" && rest.contains(&format!("target/release/{binary}")) && rest.contains("/out"))
    };
    assert!(leaves("zt-agent") && leaves("zt-cni"), "the build stage does not copy both binaries to /out");

    // Its toolchain is the one `cargo xtask setup` and zt-agent's build script use.
    let nightly = rust_str_const("xtask/src/setup.rs", "PINNED_NIGHTLY");
    assert_eq!(stage_arg(compiled, "NIGHTLY"), nightly, "the nightly of xtask/src/setup.rs");
    assert_eq!(rust_str_const("zt-agent/build.rs", "PINNED_NIGHTLY"), nightly, "zt-agent/build.rs");
    let bpf_linker = rust_str_const("xtask/src/setup.rs", "BPF_LINKER_VERSION");
    assert_eq!(stage_arg(compiled, "BPF_LINKER_VERSION"), bpf_linker, "the bpf-linker of xtask/src/setup.rs");

    // What runs: zt-agent, as ENTRYPOINT and as the DaemonSet's `command: [zt-agent, …]` on PATH.
    let last = stages.last().unwrap();
    let find = |keyword: &str| last.instructions.iter().rev().find(|(k, _)| k == keyword).map(|(_, r)| r.clone());
    let entrypoint: Vec<String> = serde_json::from_str(&find("ENTRYPOINT").expect("an ENTRYPOINT")).expect("exec form");
    let path = find("ENV").and_then(|env| env.strip_prefix("PATH=").map(str::to_owned)).expect("ENV PATH=…");
    assert_eq!(expand(&last.base, &args), args["RUNTIME_IMAGE"]);
    let installed = find("COPY").expect("the runtime stage copies the binaries");
    assert!(installed.starts_with("--from=compiled /out/zt-agent /out/zt-cni "), "COPY {installed}");
    let bin_dir = installed.split_whitespace().last().unwrap().trim_end_matches('/').to_owned();
    assert_eq!(entrypoint, [format!("{bin_dir}/zt-agent")]);
    assert!(path.split(':').any(|dir| dir == bin_dir), "PATH={path} lacks {bin_dir}");
    assert_eq!(daemonset_container().0[0], "zt-agent", "deploy/base runs zt-agent from PATH");

    // The context is the repository root: its build output and history stay out.
    let ignored =
        fs::read_to_string(repo_root().join(".dockerignore")).expect("a .dockerignore at the repository root");
    for needed in ["target", ".git"] {
        assert!(ignored.lines().any(|line| line.trim() == needed), ".dockerignore does not exclude {needed}");
    }
}

/// `command` and `args` of the agent's container in deploy/base/daemonset.yaml.
fn daemonset_container() -> (Vec<String>, Vec<String>) {
    let text = fs::read_to_string(repo_root().join("deploy/base/daemonset.yaml")).unwrap();
    let daemonset: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let strings = |key: &str| -> Vec<String> {
        let list = container[key].as_sequence().unwrap_or_else(|| panic!("the container has no {key} list"));
        list.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    };
    (strings("command"), strings("args"))
}

// ---------------------------------------------------------------------------------------------
// The build stage, with stand-ins for the toolchain.

/// rustup and cargo as the build stage calls them, recording each call (and, for the release
/// build, what the context put in /src) in /stub-calls; the build leaves two scripts where
/// cargo leaves the binaries.
const TOOLCHAIN_STUB: &str = r#"#!/bin/sh
echo "${0##*/} $*" >> /stub-calls
if [ "${0##*/} $1" = "cargo build" ]; then
  echo "context:" $(ls -A /src) >> /stub-calls
  mkdir -p target/release
  cp /usr/local/stub/binary target/release/zt-agent
  cp /usr/local/stub/binary target/release/zt-cni
fi
"#;
const BINARY_STUB: &str = "#!/bin/sh\necho \"stub ${0##*/} $*\"\n";

#[test]
fn the_build_stage_runs_the_setup_toolchain_and_hands_its_binaries_to_the_runtime_stage() {
    let podman = Podman::with_own_state();
    // The stand-in Rust image: a shell and the tools the stage's RUN lines use, from the host.
    let rootfs = Rootfs::minimal();
    for tool in ["/bin/sh", "/bin/ls", "/bin/mkdir", "/bin/cp", "/bin/cat"] {
        rootfs.add_executable(tool);
    }
    rootfs.write("/usr/local/cargo/bin/rustup", TOOLCHAIN_STUB, 0o755);
    rootfs.write("/usr/local/cargo/bin/cargo", TOOLCHAIN_STUB, 0o755);
    rootfs.write("/usr/local/stub/binary", BINARY_STUB, 0o755);
    let toolchain_tag = format!("localhost/{}:latest", unique("toolchain"));
    let toolchain = podman.import(&rootfs, &toolchain_tag, &["ENV PATH=/usr/local/cargo/bin:/usr/bin:/bin"]);

    // The stub binaries are scripts: the runtime is the stand-in too, for its shell.
    let build_args = [("RUST_IMAGE", toolchain.tag.as_str()), ("RUNTIME_IMAGE", toolchain.tag.as_str())];
    let image = podman.build(&containerfile(), &repo_root(), &[], &build_args, None, &format!("localhost/{}:latest", unique("agent")));
    let compiled_tag = format!("localhost/{}:latest", unique("compiled"));
    let compiled = podman.build(&containerfile(), &repo_root(), &[], &build_args, Some("compiled"), &compiled_tag);

    let calls = podman.run_once(&compiled, &["--entrypoint=/bin/cat"], &["/stub-calls"]);
    let calls: Vec<&str> = calls.lines().collect();
    let nightly = rust_str_const("xtask/src/setup.rs", "PINNED_NIGHTLY");
    let bpf_linker = rust_str_const("xtask/src/setup.rs", "BPF_LINKER_VERSION");
    assert_eq!(
        calls[0],
        format!("rustup toolchain install {nightly} --profile minimal --component rust-src"),
        "{calls:#?}"
    );
    assert_eq!(calls[1], format!("cargo install bpf-linker --version {bpf_linker} --locked"), "{calls:#?}");
    assert_eq!(calls[2], "cargo build --release --locked --package zt-agent --bins", "{calls:#?}");
    // The workspace, without what .dockerignore leaves out (`target` is the build's cache mount).
    let context: Vec<&str> = calls[3].strip_prefix("context: ").expect("the listing").split_whitespace().collect();
    for needed in ["Cargo.toml", "Cargo.lock", "zt-agent", "zt-ebpf", "zt-common", "xtask", "tests"] {
        assert!(context.contains(&needed), "{needed} missing from the build's context: {context:?}");
    }
    for left_out in [".git", "docs", "fuzz"] {
        assert!(!context.contains(&left_out), "{left_out} in the build's context: {context:?}");
    }

    // The runtime stage got the build stage's binaries: zt-agent as ENTRYPOINT, zt-cni on PATH.
    let said = podman.run_once(&image, &[], &["run", "--check"]);
    assert_eq!(said.trim(), "stub zt-agent run --check");
    let said = podman.run_once(&image, &["--entrypoint=zt-cni"], &[]);
    assert_eq!(said.trim(), "stub zt-cni");
}

// ---------------------------------------------------------------------------------------------
// The image of the suite's binaries, run as deploy/base runs it.

/// The image of the suite's agent, and the base it was built on (removed after it).
struct AgentImage<'p> {
    image: Image<'p>,
    _base: Image<'p>,
}

/// The runtime stage on a base of the host libraries the binaries link, with the suite's
/// zt-agent and zt-cni (debug info stripped: a tenth of the size, nothing the test needs).
fn agent_image(podman: &Podman) -> AgentImage<'_> {
    let agent = zt_tests::agent_bin().unwrap();
    let cni = agent.with_file_name("zt-cni");
    let rootfs = Rootfs::minimal();
    rootfs.add_libraries_of(&agent);
    rootfs.add_libraries_of(&cni);
    let base = podman.import(&rootfs, &format!("localhost/{}:latest", unique("runtime")), &[]);

    // What the build stage would leave: out/zt-agent and out/zt-cni.
    let compiled = tempfile::tempdir().unwrap();
    fs::create_dir(compiled.path().join("out")).unwrap();
    for binary in [&agent, &cni] {
        let out = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(compiled.path().join("out").join(binary.file_name().unwrap()))
            .arg(binary)
            .output()
            .expect("spawn strip (binutils)");
        assert!(out.status.success(), "strip {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let tag = format!("localhost/zt-agent:{}", unique("image"));
    let context = format!("--build-context=compiled={}", compiled.path().display());
    let empty = tempfile::tempdir().unwrap();
    let image = podman.build(&containerfile(), empty.path(), &[&context], &[("RUNTIME_IMAGE", &base.tag)], None, &tag);
    AgentImage { image, _base: base }
}

fn attachments(status: &Value) -> Vec<(String, String)> {
    let mut attached: Vec<(String, String)> = status["attachments"]
        .as_array()
        .unwrap_or_else(|| panic!("no attachments in {status:#}"))
        .iter()
        .map(|a| (a["interface"].as_str().unwrap().to_owned(), a["hook"].as_str().unwrap().to_owned()))
        .collect();
    attached.sort();
    attached
}

#[test]
fn the_image_runs_privileged_on_the_nodes_network_attaches_enforces_and_is_ready() {
    ensure_root().unwrap();
    let started = Instant::now();
    let t = Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2).workload("intruder", 9)).unwrap();
    let pins = BpffsDir::new(t.node().ns()).unwrap();
    let podman = Podman::with_own_state();
    let image = agent_image(&podman);
    let built = started.elapsed();

    // The DaemonSet's command and arguments, with the test's pin directory instead of the
    // node's default; its policy and socket paths are where the test mounts its directories.
    let (command, mut args) = daemonset_container();
    let value = |flag: &str| args.iter().find_map(|a| a.strip_prefix(flag)).map(PathBuf::from);
    let policy_dir = value("--policy=").expect("the DaemonSet passes --policy=");
    let socket_dir = value("--socket=").expect("the DaemonSet passes --socket=").parent().unwrap().to_owned();
    let bpffs = args.iter_mut().find(|a| a.starts_with("--bpffs-dir=")).expect("the DaemonSet passes --bpffs-dir=");
    *bpffs = format!("--bpffs-dir={}", pins.path().display());
    let host = tempfile::tempdir().unwrap();
    fs::create_dir_all(host.path().join("policies")).unwrap();
    fs::create_dir_all(host.path().join("run")).unwrap();
    let fixture = repo_root().join("tests/fixtures/topology.yaml");
    fs::copy(fixture, host.path().join("policies/cluster.yaml")).unwrap();
    // The node's address on web's veth (10.20.1.1, see zt_tests::topology): probes and
    // Prometheus reach the agent on the node's address, as the DaemonSet's ZT_METRICS_ADDR says.
    let metrics = SocketAddr::new(Ipv4Addr::new(10, 20, 1, 1).into(), 9090);

    let name = unique("agent");
    let mut run = podman.run_args();
    run.extend([
        "--detach".into(),
        format!("--name={name}"),
        "--privileged".into(),
        // The node's network: a namespace the test made, never the machine's own.
        format!("--network=ns:{}", t.node().ns().path().display()),
        // The node's bpffs, as the DaemonSet's hostPath with HostToContainer propagation.
        "--volume=/sys/fs/bpf:/sys/fs/bpf:rslave".into(),
        format!("--volume={}:{}:ro", host.path().join("policies").display(), policy_dir.display()),
        format!("--volume={}:{}", host.path().join("run").display(), socket_dir.display()),
        // What the pod's environment and the settings ConfigMap give it.
        format!("--env=ZT_NODE_NAME={}", t.node().name()),
        format!("--env=ZT_METRICS_ADDR={metrics}"),
        "--env=ZT_MODE=enforce".into(),
        "--env=ZT_ATTACH=lxc-*".into(),
        "--env=ZT_SINKS=json:stdout".into(),
        "--env=ZT_LOG=info".into(),
        // Kubernetes' `command` replaces the image's ENTRYPOINT, so zt-agent is found on PATH.
        format!("--entrypoint={}", serde_json::to_string(&command).unwrap()),
    ]);
    run.push(image.image.tag.clone());
    run.extend(args);
    podman.run(&run.iter().map(String::as_str).collect::<Vec<_>>());
    let container = Container { podman: &podman, name };

    // Ready: a policy generation in force and the programs attached.
    let deadline = Instant::now() + READY_TIMEOUT;
    let ready = loop {
        match http_get(t.node().ns(), metrics, "/readyz") {
            Ok((200, body)) => break body,
            other => {
                let state = container.state();
                assert!(state == "running", "the container is {state}: {other:?}\n{}", container.logs().1);
                assert!(
                    Instant::now() < deadline,
                    "/readyz not 200 after {READY_TIMEOUT:?}: {other:?}\n{}",
                    container.logs().1
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let ready_after = started.elapsed();

    // Attached to every workload interface of the node, both directions, pinned in the test's
    // directory on the node's bpffs.
    let socket = format!("--socket={}/agent.sock", socket_dir.display());
    let status: Value = serde_json::from_str(&container.exec(&[], &["zt-agent", "status", "--json", &socket])).unwrap();
    let mut expected: Vec<(String, String)> = t
        .node()
        .workload_interfaces()
        .iter()
        .flat_map(|i| [(i.clone(), "tc-egress".to_owned()), (i.clone(), "tc-ingress".to_owned())])
        .collect();
    expected.sort();
    assert_eq!(attachments(&status), expected, "{status:#}");
    assert_eq!(status["mode"], "enforce", "{status:#}");
    let links = fs::read_dir(pins.pins().join("links")).expect("the agent pinned its links in the test's directory");
    let mut links: Vec<String> = links.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    links.sort();
    assert!(links.contains(&"tc-ingress@lxc-api".to_owned()), "{links:?}");
    // The CNI plugin is in the image too.
    let version: Value = serde_json::from_str(&container.exec(&["--env=CNI_COMMAND=VERSION"], &["zt-cni"])).unwrap();
    assert!(version["supportedVersions"].as_array().is_some_and(|v| !v.is_empty()), "{version}");

    // Enforced, with real packets: web may reach api, intruder may not, and says so.
    let api = SocketAddr::new(t.ipv4("api"), 8080);
    let _server = tcp_server(t.ns("api"), api).unwrap();
    assert!(tcp_connect(t.ns("web"), api, Duration::from_secs(2)).is_ok(), "web → api\n{}", container.logs().1);
    assert!(tcp_connect(t.ns("intruder"), api, Duration::from_millis(700)).is_err(), "intruder → api passed");
    let deadline = Instant::now() + Duration::from_secs(5);
    let denied = loop {
        let events = container.events();
        let deny = events.iter().find(|e| e["verdict"] == "deny" && e["src"]["identity"] == "intruder").cloned();
        match deny {
            Some(event) => break event,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            None => panic!("no deny event for intruder → api: {events:#?}"),
        }
    };
    assert_eq!(denied["dst"]["identity"], "api", "{denied:#}");
    assert_eq!(denied["node"], t.node().name(), "{denied:#}");

    let (status, body) = http_get(t.node().ns(), metrics, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    let checked = started.elapsed();
    eprintln!("image built after {built:?}, the agent in it ready after {ready_after:?} ({ready:?}), checked after {checked:?}");
}
