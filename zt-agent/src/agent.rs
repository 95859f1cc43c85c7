//! `zt-agent run`: policy → maps → attach → stream events, until SIGINT/SIGTERM.

use std::{path::PathBuf, sync::{Arc, Mutex}};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    control,
    datapath::{Datapath, Mode},
    events::{self, Enricher},
    policy,
};

pub struct RunOptions {
    pub policy: Vec<PathBuf>,
    pub mode: Mode,
    pub attach: Vec<String>,
    pub uplink: Vec<String>,
    pub socket: PathBuf,
    pub node_name: String,
}

pub async fn run(options: RunOptions) -> Result<()> {
    // Everything that can be wrong with the policy is reported before the kernel is touched.
    let set = policy::load_paths(&options.policy)?;
    let compiled = Arc::new(policy::compile::compile(&set)?);
    tracing::info!(
        identities = compiled.identities.len(),
        rules = compiled.rules.len(),
        entries = compiled.policy.len(),
        "policy compiled"
    );

    let mut datapath = Datapath::load()?;
    datapath.install(&compiled)?;
    datapath.set_generation(1)?;
    datapath.set_mode(options.mode)?;
    for interface in &options.attach {
        datapath.attach_workload(interface)?;
    }
    for interface in &options.uplink {
        datapath.attach_uplink(interface)?;
    }
    let ring = datapath.take_events()?;

    let enricher = Enricher::new(options.node_name.clone(), compiled.clone());
    let mut events = tokio::spawn(events::stream_to_stdout(ring, enricher));

    let shared = Arc::new(control::Shared {
        datapath: Mutex::new(datapath),
        identities: compiled.identities.len(),
        rules: compiled.rules.len(),
    });
    // The socket appears only once everything is attached: its existence means "ready".
    let listener = control::bind(&options.socket)?;
    let server = tokio::spawn(control::serve(listener, shared.clone()));
    tracing::info!(
        mode = options.mode.name(),
        attached = ?options.attach,
        uplinks = ?options.uplink,
        socket = %options.socket.display(),
        "zt-agent running"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outcome = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        result = &mut events => result.context("event reader panicked")?.context("event stream failed"),
    };
    server.abort();
    events.abort();
    let _ = std::fs::remove_file(&options.socket);
    // Dropping the last reference to the datapath detaches every program.
    drop(shared);
    tracing::info!("zt-agent stopped; all programs detached");
    outcome
}
