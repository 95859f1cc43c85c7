//! `zt-agent run`: policy → maps → attach → stream events and reload the policy on SIGHUP or
//! when its files change, until SIGINT/SIGTERM — which stop the agent, not the enforcement:
//! everything it attached is pinned and keeps judging until the next agent adopts it, or until
//! `zt-agent detach`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    control::{
        self,
        reload::{self, Reloader},
    },
    datapath::{
        watch::{InterfacePatterns, LinkChange, LinkWatch},
        Datapath, Mode, PinDir, StartKind,
    },
    events::{self, fanout::Sinks, limits::EventLimitSettings, record, sinks::SinkSpec, Enricher},
    identity::{
        sources::{
            self,
            certificate::CertificateSource,
            cgroup,
            cgroup::CgroupSource,
            kubernetes::{self, ClusterView, KubernetesSource},
            IdentitySources,
        },
        svid::TrustBundle,
    },
    metrics::{self, server::Endpoint},
    policy,
    state::{self, Policies},
};

/// How long the sinks get, at exit, to write what they still hold.
const SINK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct RunOptions {
    pub policy: Vec<PathBuf>,
    /// `None`: monitor on a fresh start, the pinned mode on adoption.
    pub mode: Option<Mode>,
    /// Workload interfaces: names and patterns, followed as interfaces come and go.
    pub attach: InterfacePatterns,
    /// zt's bpffs directory (see `datapath::pins`).
    pub bpffs_dir: PathBuf,
    pub uplink: Vec<String>,
    /// cgroup v2 directories whose processes are judged by cgroup hooks.
    pub cgroup: Vec<PathBuf>,
    /// Directory of presented SVIDs and the trust bundle that verifies them.
    pub certificates: Option<(PathBuf, PathBuf)>,
    /// Learn pods from the Kubernetes API server.
    pub kubernetes: Option<KubernetesOptions>,
    pub socket: PathBuf,
    pub node_name: String,
    /// How many flow events the kernel may raise.
    pub event_limits: EventLimitSettings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Where events go; checked together by `events::sinks::spec::validate`.
    pub sinks: Vec<SinkSpec>,
    /// Map capacities (`--capacity`).
    pub capacities: crate::datapath::capacity::Capacities,
}

pub struct KubernetesOptions {
    /// Instead of the in-cluster configuration or KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
}

pub async fn run(options: RunOptions) -> Result<()> {
    // Everything that can be wrong with the policy is reported before the kernel is touched.
    let started = Instant::now();
    // Watched before they are read: a change from here on reloads once the agent runs. (Their
    // own errors come first: they say better what is wrong with a path.)
    let triggers = reload::triggers(&options.policy);
    let set = policy::load_paths(&options.policy)?;
    let triggers = triggers?;
    // Without the Kubernetes source the policy compiles now; with it, once the pods are known
    // (compiling it twice would double a large policy's start).
    let early = match options.kubernetes {
        None => Some(compile_logged(&set, &Default::default())?),
        Some(_) => None,
    };
    let read_in = started.elapsed();

    // Certificates may bind cgroups too, so they need the hierarchy as well.
    let cgroup_root = if options.cgroup.is_empty() && options.certificates.is_none() {
        None
    } else {
        Some(cgroup::v2_mount()?)
    };
    let cgroup_scopes = match &cgroup_root {
        Some(root) => options.cgroup.iter().map(|dir| cgroup::resolve(root, dir)).collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    // Taken before anything else is touched: a second agent stops here.
    let pins = PinDir::open(&options.bpffs_dir)?;
    let certificates = match &options.certificates {
        Some((dir, bundle)) => Some(CertificateSource::new(dir.clone(), TrustBundle::load(bundle)?)),
        None => None,
    };

    // Sinks start before the kernel is touched: a file that cannot be opened or a CA file that
    // cannot be read stops the agent here.
    let sinks = Sinks::start(options.sinks.clone())?;
    // Bound early, so that probes hear "not ready" while the programs load.
    let endpoint = Endpoint::default();
    let metrics_listener = metrics::server::bind(options.metrics_addr).await?;
    let mut metrics_server = tokio::spawn(metrics::server::serve(metrics_listener, endpoint.clone()));

    // The kernel is not touched until the cluster is known: an earlier agent's pinned
    // enforcement keeps judging meanwhile, rather than a policy that knows no pods.
    let (kubernetes, following) = match &options.kubernetes {
        Some(kubernetes) => {
            let (source, following) = start_kubernetes(kubernetes).await?;
            (Some(source), Some(following))
        }
        None => (None, None),
    };
    // Reading and compiling, not the wait for the API server.
    let compiling = Instant::now();
    let compiled = match early {
        Some(compiled) => compiled,
        None => compile_logged(&set, &kubernetes.as_ref().map(KubernetesSource::cluster).unwrap_or_default())?,
    };
    let compiled_in = read_in + compiling.elapsed();

    // Subscribed before the interfaces are listed, so none that appears in between is missed.
    let links = if options.attach.is_empty() { None } else { Some(LinkWatch::start().await?) };
    let mut datapath = Datapath::load_pinned(pins, options.mode, options.capacities.clone())?;
    let start = datapath.start_report().clone();
    datapath.set_event_limits(&options.event_limits)?;
    let installing = Instant::now();
    // On adoption this is a reload like any other: the next generation, built aside, switched
    // to with one write, while the adopted programs keep judging with the one in force.
    let generation = datapath.install(&compiled)?;
    // Reading and compiling, then installing; not the verifier's time in between.
    let applied_in = compiled_in + installing.elapsed();
    // Identities from cgroups and interfaces are in the maps before any program sees a packet.
    let cgroups = cgroup_root.map(|root| CgroupSource::new(root, cgroup_scopes.clone()));
    let mut identity_sources = IdentitySources::new(compiled.clone(), cgroups, certificates);
    let kubernetes_view = kubernetes.as_ref().map(KubernetesSource::view_handle);
    if let Some(kubernetes) = kubernetes {
        identity_sources = identity_sources.with_kubernetes(kubernetes);
    }
    let first_events = identity_sources.refresh(&mut datapath)?;
    if start.kind == StartKind::Adopted {
        let stale = identity_sources.sweep_adopted(&mut datapath)?;
        tracing::info!(stale, "identity bindings left by the earlier agent checked");
    }
    for dir in &cgroup_scopes {
        datapath.attach_cgroup(dir)?;
    }
    let (link_watch, present) = match links {
        Some((watch, present)) => (Some(watch), present),
        None => (None, Vec::new()),
    };
    for name in options.attach.exact_names() {
        if !present.iter().any(|(present, _)| present == name) {
            anyhow::bail!("--attach {name}: no such interface (a pattern such as '{name}*' follows interfaces that appear later)");
        }
    }
    if !options.attach.is_empty() {
        warn_if_not_forwarding();
    }
    for (name, _) in present.iter().filter(|(name, _)| options.attach.matches(name)) {
        datapath.attach_workload(name)?;
    }
    for interface in &options.uplink {
        datapath.attach_uplink(interface)?;
    }
    let kept = datapath.adopt_remaining_links()?;
    if !kept.is_empty() {
        tracing::warn!(?kept, "links pinned by an earlier agent for targets not asked for now stay enforced");
    }
    // Every attachment now runs this agent's programs: migrated maps replace the old ones.
    datapath.finish_migration()?;
    datapath.note_events_seen()?;
    log_start(&start, datapath.start_report(), generation, &options.bpffs_dir);
    let ring = datapath.take_events()?;

    let identity_sources = Arc::new(Mutex::new(identity_sources));
    let mut policies = Policies::new(generation, compiled.clone());
    policies.last_apply = Some(applied_in);
    let policies = Arc::new(Mutex::new(policies));
    let enricher = Enricher::new(options.node_name.clone(), policies.clone(), identity_sources.clone());
    let mut events = tokio::spawn(events::stream(ring, enricher, sinks.clone()));

    let probe = datapath.probe()?;
    let attachments = datapath.attachments().len();
    let metrics_sources = metrics::Sources { probe, policies: policies.clone(), sinks: Some(sinks.clone()), kubernetes: kubernetes_view };
    endpoint.ready(metrics_sources, attachments, start.kind);
    let shared = Arc::new(state::Shared { datapath: Mutex::new(datapath), policies, sinks: sinks.clone() });
    sinks.publish(record::agent_event(&options.node_name, start_event(shared.datapath.lock().expect("datapath lock poisoned").start_report(), generation)));
    for event in first_events {
        sinks.publish(record::agent_event(&options.node_name, event));
    }
    let cluster_changed = Arc::new(tokio::sync::Notify::new());
    let mut refresher = tokio::spawn(refresh_sources(
        identity_sources.clone(),
        shared.clone(),
        options.node_name.clone(),
        cluster_changed.clone(),
    ));
    let mut watcher = tokio::spawn(follow_interfaces(link_watch, options.attach.clone(), identity_sources.clone(), shared.clone()));
    let served = control::Served { shared: shared.clone(), sources: identity_sources.clone(), node: options.node_name.clone() };
    let reloader = Reloader::new(options.policy.clone(), options.node_name.clone(), shared.clone(), identity_sources);
    let mut reloads = tokio::spawn(reload::run(Arc::new(reloader), triggers, cluster_changed));
    // The socket appears only once everything is attached: its existence means "ready".
    let listener = control::bind(&options.socket)?;
    let server = tokio::spawn(control::serve(listener, served));
    tracing::info!(
        mode = Mode::from_raw(shared.datapath.lock().expect("datapath lock poisoned").config()?.mode).name(),
        attached = ?options.attach,
        uplinks = ?options.uplink,
        socket = %options.socket.display(),
        metrics = %options.metrics_addr,
        "zt-agent running"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outcome = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        result = &mut events => result.context("event reader panicked")?.context("event stream failed"),
        result = &mut refresher => result.context("identity refresh panicked")?.context("identity sources failed"),
        result = &mut reloads => result.context("policy reloads panicked")?.context("policy reloads failed"),
        result = &mut watcher => result.context("the interface watcher panicked")?.context("following interfaces failed"),
        result = &mut metrics_server => result.context("the metrics endpoint panicked")?.context("the metrics endpoint failed"),
    };
    // Awaiting an aborted task drops its future, and with it its share of the datapath. (One the
    // select above already awaited to completion must not be awaited again.)
    server.abort();
    let _ = server.await;
    if let Some(following) = following {
        following.abort();
    }
    for task in [events, refresher, reloads, metrics_server, watcher] {
        task.abort();
        if !task.is_finished() {
            let _ = task.await;
        }
    }
    let _ = std::fs::remove_file(&options.socket);
    // Dropping the datapath closes this process's handles; the pinned links keep enforcing.
    drop(shared);
    tracing::info!(
        bpffs_dir = %options.bpffs_dir.display(),
        "zt-agent stopped; enforcement stays in place with the last policy and mode \
         (the next agent adopts it; `zt-agent detach` removes it)"
    );
    sinks.close(SINK_GRACE).await;
    outcome
}

fn compile_logged(set: &policy::PolicySet, cluster: &crate::identity::pods::Cluster) -> Result<Arc<policy::compile::Compiled>> {
    let compiled = policy::compile::compile_for(set, cluster)?;
    tracing::info!(
        identities = compiled.identities.len(),
        rules = compiled.rules.len(),
        entries = compiled.policy.len(),
        "policy compiled"
    );
    Ok(Arc::new(compiled))
}

/// Starts following the API server and waits for the first complete list of pods and
/// namespaces, saying why while it waits.
async fn start_kubernetes(options: &KubernetesOptions) -> Result<(KubernetesSource, tokio::task::JoinHandle<()>)> {
    let client = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Client::try_from(config)?
        }
        None => kube::Client::try_default().await.context(
            "--kubernetes: no Kubernetes client configuration (in a pod, its service account; elsewhere KUBECONFIG \
             or ~/.kube/config, or --kubeconfig)",
        )?,
    };
    let view = Arc::new(Mutex::new(ClusterView::default()));
    let following = tokio::spawn(kubernetes::follow(client, view.clone()));
    let source = KubernetesSource::new(view);
    let waiting = Instant::now();
    let mut said = Instant::now();
    while !source.synced() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if said.elapsed() >= std::time::Duration::from_secs(10) {
            let why = source.last_error().unwrap_or_else(|| "no answer yet".into());
            tracing::warn!(waited = ?waiting.elapsed(), "waiting for the Kubernetes API server to list pods and namespaces: {why}");
            said = Instant::now();
        }
    }
    tracing::info!(waited = ?waiting.elapsed(), "pods and namespaces listed");
    Ok((source, following))
}

/// Keeps cgroup, interface, certificate and pod identities current until a map update fails,
/// and asks for a reload when the cluster's label sets have changed.
async fn refresh_sources(
    sources: Arc<Mutex<IdentitySources>>,
    shared: Arc<state::Shared>,
    node: String,
    cluster_changed: Arc<tokio::sync::Notify>,
) -> Result<()> {
    let mut tick = tokio::time::interval(sources::REFRESH_EVERY);
    loop {
        tick.tick().await;
        let events = {
            let mut datapath = shared.datapath.lock().expect("datapath lock poisoned");
            let mut sources = sources.lock().expect("sources lock poisoned");
            let events = sources.refresh(&mut datapath)?;
            if sources.reload_due() {
                cluster_changed.notify_one();
            }
            datapath.note_events_seen()?;
            events
        };
        for event in events {
            shared.sinks.publish(record::agent_event(&node, event));
        }
    }
}

/// The source check on workload interfaces asks the kernel how it would route a workload's
/// address, as a router: without IP forwarding it cannot answer, and every packet a workload
/// sends is reported as spoofed. Say so up front.
fn warn_if_not_forwarding() {
    for (family, path) in [("IPv4", "/proc/sys/net/ipv4/conf/all/forwarding"), ("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding")] {
        if std::fs::read_to_string(path).is_ok_and(|value| value.trim() == "0") {
            tracing::warn!(
                path,
                "{family} forwarding is off on this node: the source check on workload interfaces needs it, \
                 and will report {family} packets from workloads as spoofed (set {path} to 1)"
            );
        }
    }
}

/// Attaches to every interface matching `--attach` that appears, as soon as netlink reports it,
/// and forgets those that go away.
async fn follow_interfaces(
    watch: Option<LinkWatch>,
    patterns: InterfacePatterns,
    sources: Arc<Mutex<IdentitySources>>,
    shared: Arc<state::Shared>,
) -> Result<()> {
    let Some(mut watch) = watch else { return std::future::pending().await };
    loop {
        match watch.next().await? {
            LinkChange::Appeared { name, ifindex } if patterns.matches(&name) => {
                let seen = Instant::now();
                let mut datapath = shared.datapath.lock().expect("datapath lock poisoned");
                // The interface's own identity (an `interface` selector) is bound before the
                // programs that read it are attached.
                sources.lock().expect("sources lock poisoned").refresh(&mut datapath)?;
                match datapath.attach_workload(&name) {
                    Ok(()) => tracing::info!(interface = %name, ifindex, after_us = seen.elapsed().as_micros() as u64, "new interface attached"),
                    // Gone again before it could be attached, or not attachable: say so, carry on.
                    Err(err) => tracing::warn!(interface = %name, error = %format!("{err:#}"), "new interface not attached"),
                }
            }
            LinkChange::Gone { name, ifindex } if patterns.matches(&name) => {
                let mut datapath = shared.datapath.lock().expect("datapath lock poisoned");
                datapath.forget_interface(&name, ifindex)?;
                // The sources learn it is gone now, not at their next scan.
                sources.lock().expect("sources lock poisoned").refresh(&mut datapath)?;
                tracing::info!(interface = %name, "interface gone");
            }
            _ => {}
        }
    }
}

/// The `{"kind":"agent","result":"started"}` event: how the datapath was found.
fn start_event(start: &crate::datapath::StartReport, generation: u32) -> serde_json::Value {
    serde_json::json!({
        "kind": "agent",
        "result": "started",
        "start": start.kind.name(),
        "generation": generation,
        "previous_generation": start.previous_generation,
        "links_adopted": start.links_adopted,
        "programs_replaced": start.programs_replaced,
        "migrated_maps": start.migrated_maps,
        "events_lost_while_down": start.events_lost_while_down,
    })
}

fn log_start(before: &crate::datapath::StartReport, after: &crate::datapath::StartReport, generation: u32, dir: &std::path::Path) {
    match before.kind {
        StartKind::Fresh => tracing::info!(bpffs_dir = %dir.display(), generation, "started fresh: datapath pinned"),
        StartKind::Adopted => tracing::info!(
            bpffs_dir = %dir.display(),
            previous_generation = before.previous_generation,
            generation,
            links_adopted = after.links_adopted,
            programs_replaced = after.programs_replaced,
            migrated_maps = ?after.migrated_maps,
            events_lost_while_down = after.events_lost_while_down,
            "adopted the pinned datapath"
        ),
    }
}
