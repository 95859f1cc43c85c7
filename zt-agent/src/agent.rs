//! `zt-agent run`: policy → maps → attach → stream events and reload the policy on SIGHUP or
//! when its files change, until SIGINT/SIGTERM.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    control,
    datapath::{Datapath, Mode},
    event_limits::EventLimitSettings,
    events::{self, Enricher},
    metrics::{self, server::Endpoint},
    fanout::Sinks,
    policy,
    reload::{self, Policies, Reloader},
    sinks::SinkSpec,
    sources::{self, certificate::CertificateSource, cgroup, cgroup::CgroupSource, IdentitySources},
    svid::TrustBundle,
};

/// How long the sinks get, at exit, to write what they still hold.
const SINK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct RunOptions {
    pub policy: Vec<PathBuf>,
    pub mode: Mode,
    pub attach: Vec<String>,
    pub uplink: Vec<String>,
    /// cgroup v2 directories whose processes are judged by cgroup hooks.
    pub cgroup: Vec<PathBuf>,
    /// Directory of presented SVIDs and the trust bundle that verifies them.
    pub certificates: Option<(PathBuf, PathBuf)>,
    pub socket: PathBuf,
    pub node_name: String,
    /// How many flow events the kernel may raise.
    pub event_limits: EventLimitSettings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Where events go; checked together by `sinks::spec::validate`.
    pub sinks: Vec<SinkSpec>,
}

pub async fn run(options: RunOptions) -> Result<()> {
    // Everything that can be wrong with the policy is reported before the kernel is touched.
    let started = Instant::now();
    let set = policy::load_paths(&options.policy)?;
    let compiled = Arc::new(policy::compile::compile(&set)?);
    let compiled_in = started.elapsed();
    tracing::info!(
        identities = compiled.identities.len(),
        rules = compiled.rules.len(),
        entries = compiled.policy.len(),
        "policy compiled"
    );

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

    let mut datapath = Datapath::load()?;
    datapath.set_mode(options.mode)?;
    datapath.set_event_limits(&options.event_limits)?;
    let installing = Instant::now();
    let generation = datapath.install(&compiled)?;
    // Reading and compiling, then installing; not the verifier's time in between.
    let applied_in = compiled_in + installing.elapsed();
    // Identities from cgroups and interfaces are in the maps before any program sees a packet.
    let cgroups = cgroup_root.map(|root| CgroupSource::new(root, cgroup_scopes.clone()));
    let mut identity_sources = IdentitySources::new(compiled.clone(), cgroups, certificates);
    let first_events = identity_sources.refresh(&mut datapath)?;
    for dir in &cgroup_scopes {
        datapath.attach_cgroup(dir)?;
    }
    for interface in &options.attach {
        datapath.attach_workload(interface)?;
    }
    for interface in &options.uplink {
        datapath.attach_uplink(interface)?;
    }
    let ring = datapath.take_events()?;

    let identity_sources = Arc::new(Mutex::new(identity_sources));
    let mut policies = Policies::new(generation, compiled.clone());
    policies.last_apply = Some(applied_in);
    let policies = Arc::new(Mutex::new(policies));
    let enricher = Enricher::new(options.node_name.clone(), policies.clone(), identity_sources.clone());
    let mut events = tokio::spawn(events::stream(ring, enricher, sinks.clone()));

    let probe = datapath.probe()?;
    let attachments = datapath.attachments().len();
    endpoint.ready(metrics::Sources { probe, policies: policies.clone(), sinks: Some(sinks.clone()) }, attachments);
    let shared = Arc::new(control::Shared { datapath: Mutex::new(datapath), policies, sinks: sinks.clone() });
    for event in first_events {
        sinks.publish(events::agent_event(&options.node_name, event));
    }
    let mut refresher =
        tokio::spawn(refresh_sources(identity_sources.clone(), shared.clone(), options.node_name.clone()));
    let reloader = Reloader::new(options.policy.clone(), options.node_name.clone(), shared.clone(), identity_sources);
    let mut reloads = tokio::spawn(reload::run(Arc::new(reloader)));
    // The socket appears only once everything is attached: its existence means "ready".
    let listener = control::bind(&options.socket)?;
    let server = tokio::spawn(control::serve(listener, shared.clone()));
    tracing::info!(
        mode = options.mode.name(),
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
        result = &mut metrics_server => result.context("the metrics endpoint panicked")?.context("the metrics endpoint failed"),
    };
    // Awaiting an aborted task drops its future, and with it its share of the datapath. (One the
    // select above already awaited to completion must not be awaited again.)
    server.abort();
    let _ = server.await;
    for task in [events, refresher, reloads, metrics_server] {
        task.abort();
        if !task.is_finished() {
            let _ = task.await;
        }
    }
    let _ = std::fs::remove_file(&options.socket);
    // Dropping the last reference to the datapath detaches every program.
    drop(shared);
    tracing::info!("zt-agent stopped; all programs detached");
    sinks.close(SINK_GRACE).await;
    outcome
}

/// Keeps cgroup, interface and certificate identities current until a map update fails.
async fn refresh_sources(sources: Arc<Mutex<IdentitySources>>, shared: Arc<control::Shared>, node: String) -> Result<()> {
    let mut tick = tokio::time::interval(sources::REFRESH_EVERY);
    loop {
        tick.tick().await;
        let events = {
            let mut datapath = shared.datapath.lock().expect("datapath lock poisoned");
            sources.lock().expect("sources lock poisoned").refresh(&mut datapath)?
        };
        for event in events {
            shared.sinks.publish(events::agent_event(&node, event));
        }
    }
}
