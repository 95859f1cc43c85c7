/// jemalloc: a reload parses and compiles the whole policy, and what that frees is reused instead
/// of fragmenting the heap (at 100k rules the agent peaks at 70 MiB against glibc's 100, and
/// applies in 0.76 s against 0.92; `cargo xtask bench`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One arena: the agent's threads allocate little on their hot paths, and every arena more
/// holds its own free memory.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static u8> = Some(&b"narenas:1\0"[0]);

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use zt_agent::{
    agent::{self, RunOptions},
    control::{self, flows, Request, Status, DEFAULT_SOCKET},
    datapath::{
        capacity::{Capacities, CapacitySetting},
        pins,
        watch::InterfacePatterns,
        Mode,
    },
    events::{
        limits::{self, EventLimitSettings},
        record::{Filter, FlowVerdict},
        sinks::{spec, SinkSpec},
    },
    metrics, policy,
};

/// zt: kernel-level microsegmentation. Every flow between workloads is checked against the
/// identity of both ends; what policy does not allow is denied.
#[derive(Parser)]
#[command(name = "zt-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once, at start: the size of `Run` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load policy, attach the datapath and stream flow events to the sinks (by default JSON
    /// lines on stdout). The policy is reloaded on SIGHUP and whenever its files change; an
    /// invalid set is rejected and the policy in force stays.
    Run {
        /// Policy file or directory (its *.yaml/*.yml files); repeatable. Watched for changes.
        #[arg(long, required = true)]
        policy: Vec<PathBuf>,
        /// monitor reports would-be denials as audit events; enforce drops them. Default: monitor
        /// on a fresh start; the mode in force when adopting an earlier agent's pinned state.
        #[arg(long, value_enum, env = "ZT_MODE")]
        mode: Option<Mode>,
        /// Host-side interface of a workload (TC ingress + egress), or a glob pattern such as
        /// 'lxc*' that also attaches to matching interfaces as they appear; repeatable (in
        /// ZT_ATTACH, separated by spaces).
        #[arg(long, env = "ZT_ATTACH", value_delimiter = ' ')]
        attach: Vec<String>,
        /// zt's bpffs directory: every map, program and link is pinned there, so enforcement
        /// outlives the agent. One agent per directory.
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
        /// Uplink to other nodes (native XDP); repeatable (in ZT_UPLINK, separated by spaces).
        #[arg(long, env = "ZT_UPLINK", value_delimiter = ' ')]
        uplink: Vec<String>,
        /// cgroup v2 directory (relative to the v2 root, or absolute) whose processes, and those
        /// of every cgroup below it, are judged by cgroup hooks; repeatable.
        #[arg(long)]
        cgroup: Vec<PathBuf>,
        /// Directory where workloads present X.509 SVIDs (`<workload>/svid.pem` + `bind.yaml`).
        #[arg(long, requires = "trust_bundle")]
        svid_dir: Option<PathBuf>,
        /// PEM file of the CA certificates SVIDs must chain to.
        #[arg(long, requires = "svid_dir")]
        trust_bundle: Option<PathBuf>,
        /// Learn pods from the Kubernetes API server (in a pod: its service account; elsewhere:
        /// KUBECONFIG or ~/.kube/config): their label-set identities, which `pods` selectors
        /// select, and their addresses. The policy is first installed once pods and namespaces
        /// are listed.
        #[arg(long, env = "ZT_KUBERNETES")]
        kubernetes: bool,
        /// The kubeconfig file --kubernetes reads, instead of the in-cluster configuration or
        /// KUBECONFIG.
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// Admin socket for `mode` and `status`.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Node name in events (default: the host name).
        #[arg(long, env = "ZT_NODE_NAME")]
        node_name: Option<String>,
        /// After a flow's event, suppress its further events (same 5-tuple, verdict and reason)
        /// for this long and count them; its next event says how many. 0: no window.
        #[arg(long, default_value = "1s", value_parser = limits::parse_window)]
        event_window: Duration,
        /// Sustained flow events per second, node-wide (`N/s`, `N/m`, or 0 for no limit); events
        /// over it are suppressed and counted.
        #[arg(long, default_value = "5000/s", value_parser = limits::parse_rate)]
        event_rate: u64,
        /// Flow events allowed back to back before --event-rate applies, node-wide.
        #[arg(long, default_value_t = 10_000)]
        event_burst: u64,
        /// Where to serve /metrics (Prometheus), /healthz and /readyz.
        #[arg(long, default_value = metrics::server::DEFAULT_ADDR, env = "ZT_METRICS_ADDR")]
        metrics_addr: SocketAddr,
        /// Where events go; repeatable, every sink gets every event it takes (default:
        /// json:stdout). FORMAT:TARGET[,OPTION=VALUE...]: json|ocsf|cef with stdout or
        /// file=PATH[,max-bytes=10M,keep=5]; syslog+udp|syslog+tcp|syslog+tls://HOST:PORT
        /// [,msg=json|ocsf|cef][,facility=local0][,ca=PEM][,server-name=NAME]; any sink
        /// [,verdicts=deny,audit][,identity=NAME][,queue=4096][,name=NAME]. See docs/events.md.
        /// In ZT_SINKS, separated by spaces.
        #[arg(long = "sink", value_name = "SPEC", env = "ZT_SINKS", value_delimiter = ' ')]
        sinks: Vec<SinkSpec>,
        /// Size of a map, as MAP=ENTRIES; repeatable. MAP: conntrack, fragments, ipcache and
        /// policy (per policy generation), cgroups, interfaces, event-flows. A policy that does
        /// not fit is rejected whole; a changed capacity migrates the pinned map.
        #[arg(long = "capacity", value_name = "MAP=ENTRIES")]
        capacities: Vec<CapacitySetting>,
        /// Check the configuration — arguments, environment, sinks, the policy — say what would
        /// run, and exit, touching neither the kernel nor the network.
        #[arg(long)]
        check: bool,
    },
    /// Remove everything zt pinned (links, so programs detach; programs; maps) and say what was
    /// removed. Refuses while an agent runs on the directory.
    Detach {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Switch the running agent between monitor and enforce, without reloading anything.
    Mode {
        #[arg(value_enum)]
        mode: Mode,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show the running agent's mode, attachments and counters.
    Status {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the running agent's flow events: the recent ones, or with --follow live until Ctrl-C.
    Flows {
        /// Keep printing new events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Only flows with this verdict; repeatable.
        #[arg(long, value_enum)]
        verdict: Vec<FlowVerdict>,
        /// Only flows with this identity at either end.
        #[arg(long)]
        identity: Option<String>,
        /// Print the events as JSON lines.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Policy as code.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files offline (no root needed); errors read file:line:col.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Check flows against expected verdicts (a cases file); exits non-zero if any case fails.
    Test {
        /// YAML file of cases: src, dst, protocol, port or type, expect, optional reason and rule.
        cases: PathBuf,
        /// Policy file or directory; repeatable.
        #[arg(long, required = true)]
        policy: Vec<PathBuf>,
        /// Use the reference evaluator (no root) instead of the kernel datapath.
        #[arg(long)]
        offline: bool,
    },
    /// Write least-privilege allow rules (policy YAML, on stdout) for the flows monitor-mode
    /// audits show default-deny denying.
    Suggest {
        /// The agent's events (JSON lines, as `zt-agent run` prints them); `-` for stdin.
        #[arg(long)]
        from: PathBuf,
        /// The policy the events were recorded under (file or directory; repeatable): names are
        /// checked against it and the output loads together with it.
        #[arg(long)]
        policy: Vec<PathBuf>,
    },
    /// Convert networking.k8s.io/v1 NetworkPolicies to zt policy over pod identities, with the
    /// upstream semantics; what zt cannot express is an error naming the field.
    ImportK8s {
        /// NetworkPolicy YAML files (several documents, or `kubectl get -o yaml` lists); `-` for
        /// stdin.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write the policy here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn print_status(status: &Status) {
    println!("mode:        {}", status.mode.name());
    let start = &status.start;
    println!(
        "started:     {} (links adopted {}, programs replaced {}, maps migrated {}, events lost while down {})",
        start.kind.name(),
        start.links_adopted,
        start.programs_replaced,
        if start.migrated_maps.is_empty() { "none".to_owned() } else { start.migrated_maps.join(", ") },
        start.events_lost_while_down
    );
    println!("generation:  {}", status.generation);
    println!("reloads:     {} applied, {} rejected", status.reloads, status.reloads_rejected);
    if let Some(rejection) = &status.last_rejection {
        println!("last rejection:");
        for line in rejection.lines() {
            println!("  {line}");
        }
    }
    println!("identities:  {}", status.identities.len());
    for (name, id) in &status.identities {
        println!("  {id:>10}  {name}");
    }
    println!("rules:       {}", status.rules);
    println!("attached:");
    for a in &status.attachments {
        println!("  {:<16} {}", a.interface, a.hook);
    }
    println!("packets:");
    for (key, n) in &status.packets {
        println!("  {key:<36} {n}");
    }
    println!("packets by direction and hook:");
    for p in &status.packets_by_hook {
        let key = format!("{}/{}", p.verdict, p.reason);
        println!("  {key:<36} {:<8} {:<15} {}", p.direction, p.hook, p.packets);
    }
    let events = &status.events;
    println!("events:      {} emitted, {} suppressed, {} lost", events.emitted, events.suppressed, events.lost);
    println!("sinks:");
    for sink in &status.sinks {
        let connection = match sink.connected {
            Some(true) => ", connected",
            Some(false) => ", disconnected",
            None => "",
        };
        println!(
            "  {:<32} {:<12} delivered {}, dropped {}, queued {}, errors {}, reconnects {}{connection}",
            sink.name, sink.kind, sink.delivered, sink.dropped, sink.queued, sink.errors, sink.reconnects
        );
    }
}

/// `run --check`: the policy loads and compiles, and what the agent would do is printed.
fn check_run(
    policy: &[PathBuf],
    mode: Option<Mode>,
    attach: &InterfacePatterns,
    uplinks: &[String],
    sinks: &[SinkSpec],
    kubernetes: bool,
) -> anyhow::Result<()> {
    let compiled = policy::compile::compile(&policy::load_paths(policy)?)?;
    let mode = mode.map_or("monitor on a new node, else the mode in force", Mode::name);
    println!("ok: the configuration is valid");
    println!("  policy:  {} identities, {} rules", compiled.identities.len(), compiled.rules.len());
    println!("  mode:    {mode}");
    println!("  attach:  {}", if attach.patterns().is_empty() { "nothing".into() } else { attach.patterns().join(" ") });
    println!("  uplinks: {}", if uplinks.is_empty() { "none".into() } else { uplinks.join(" ") });
    println!("  pods:    {}", if kubernetes { "from the Kubernetes API server" } else { "not followed" });
    for sink in sinks {
        println!("  sink:    {} ({})", sink.name, sink.kind());
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let command = Cli::parse().command;
    if !matches!(command, Command::Run { .. }) {
        // A command's output piped into `head` ends quietly when the reader goes, as other
        // command-line tools do, not with a panic. (The agent itself keeps Rust's default, which
        // ignores the signal: a closed stdout is a write error to its sink, never its death.)
        // SAFETY: setting a signal's disposition to its default, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match command {
        Command::Run {
            policy,
            mode,
            attach,
            bpffs_dir,
            uplink,
            cgroup,
            svid_dir,
            trust_bundle,
            kubernetes,
            kubeconfig,
            socket,
            node_name,
            event_window,
            event_rate,
            event_burst,
            metrics_addr,
            mut sinks,
            capacities,
            check,
        } => {
            let node_name = node_name.unwrap_or_else(|| {
                nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned())
            });
            let certificates = svid_dir.zip(trust_bundle);
            if sinks.is_empty() {
                sinks.push(SinkSpec::stdout_json());
            }
            if let Err(problem) = spec::validate(&sinks) {
                eprintln!("zt-agent: --sink: {problem}");
                return ExitCode::FAILURE;
            }
            let attach = match InterfacePatterns::new(&attach) {
                Ok(patterns) => patterns,
                Err(err) => {
                    eprintln!("zt-agent: --attach: {err:#}");
                    return ExitCode::FAILURE;
                }
            };
            let capacities = match Capacities::new(&capacities) {
                Ok(capacities) => capacities,
                Err(err) => {
                    eprintln!("zt-agent: --capacity: {err:#}");
                    return ExitCode::FAILURE;
                }
            };
            if check {
                return match check_run(&policy, mode, &attach, &uplink, &sinks, kubernetes) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("zt-agent: {err:#}");
                        ExitCode::FAILURE
                    }
                };
            }
            let event_limits = EventLimitSettings { window: event_window, rate: event_rate, burst: event_burst };
            let options = RunOptions {
                policy,
                mode,
                attach,
                bpffs_dir,
                uplink,
                cgroup,
                certificates,
                kubernetes: kubernetes.then_some(agent::KubernetesOptions { kubeconfig }),
                socket,
                node_name,
                event_limits,
                metrics_addr,
                sinks,
                capacities,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(options)))
        }
        Command::Detach { bpffs_dir, json } => pins::detach(&bpffs_dir).map(|removed| {
            if json {
                println!("{}", serde_json::to_string(&removed).expect("the report serializes"));
                return;
            }
            for link in &removed.links {
                println!("removed link     {} (link {}, program {})", link.pin.display(), link.id, link.program_id);
            }
            for program in &removed.programs {
                println!("removed program  {} (program {})", program.pin.display(), program.id);
            }
            for map in &removed.maps {
                println!("removed map      {} (map {})", map.pin.display(), map.id);
            }
            if removed.links.is_empty() && removed.programs.is_empty() && removed.maps.is_empty() {
                println!("nothing pinned at {}: nothing to remove", bpffs_dir.display());
            } else {
                println!("zt is detached: nothing it attached judges traffic any more");
            }
        }),
        Command::Mode { mode, socket } => control::request(&socket, &Request::Mode { mode }).map(|status| {
            println!("mode: {}", status.mode.name());
        }),
        Command::Status { socket, json } => control::request(&socket, &Request::Status).map(|status| {
            if json {
                println!("{}", serde_json::to_string_pretty(&status).expect("status serializes"));
            } else {
                print_status(&status);
            }
        }),
        Command::Flows { follow, verdict, identity, json, socket } => {
            let filter = Filter { verdicts: verdict, identity };
            flows::run(&socket, follow, filter, json, &mut std::io::stdout())
        }
        Command::Policy { command: PolicyCommand::Check { paths } } => policy::load_paths(&paths)
            .map_err(anyhow::Error::from)
            .and_then(|set| Ok(policy::compile::compile(&set)?))
            .map(|compiled| {
                println!(
                    "ok: {} identities, {} rules, {} policy map entries",
                    compiled.identities.len(),
                    compiled.rules.len(),
                    compiled.policy.len()
                );
            }),
        Command::Policy { command: PolicyCommand::Test { cases, policy, offline } } => {
            policy::cases::run(&cases, &policy, offline, &mut std::io::stdout())
        }
        Command::Policy { command: PolicyCommand::Suggest { from, policy } } => {
            policy::suggest::run(&from, &policy).map(|suggestion| print!("{suggestion}"))
        }
        Command::Policy { command: PolicyCommand::ImportK8s { files, output } } => {
            policy::import_k8s::run(&files).and_then(|imported| match output {
                Some(path) => std::fs::write(&path, imported)
                    .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", path.display())),
                None => {
                    print!("{imported}");
                    Ok(())
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("zt-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}
