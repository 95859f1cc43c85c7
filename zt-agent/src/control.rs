//! The local admin socket: `zt-agent mode` and `zt-agent status` talk to the running agent over
//! a Unix socket only root can open. One JSON request line, one JSON response line.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};
use zt_common::{Reason, Verdict};

use crate::{
    counters::EventCounts,
    datapath::{Attachment, Datapath, Mode},
    reload::Policies,
};

pub const DEFAULT_SOCKET: &str = "/run/zt/agent.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Mode { mode: Mode },
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub mode: Mode,
    /// The policy generation in force: 1 at start, one more for every reload applied.
    pub generation: u32,
    /// Policy reloads applied since the agent started.
    pub reloads: u64,
    /// Policy reloads rejected (the policy in force stayed) since the agent started.
    pub reloads_rejected: u64,
    /// The errors of the last rejected reload, one per line.
    pub last_rejection: Option<String>,
    /// Declared identities and their numeric ids (stable across restarts and nodes).
    pub identities: BTreeMap<String, u32>,
    pub rules: usize,
    pub attachments: Vec<AttachmentStatus>,
    /// Packets by "verdict/reason", summed over CPUs, directions and hooks; zero counters are
    /// left out.
    pub packets: BTreeMap<String, u64>,
    /// The same packets by direction and hook: the non-zero counters, as the kernel keeps them.
    pub packets_by_hook: Vec<PacketStatus>,
    /// What became of the flow events the kernel had to report: emitted, suppressed, lost.
    pub events: EventCounts,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PacketStatus {
    pub verdict: String,
    pub reason: String,
    pub direction: String,
    pub hook: String,
    pub packets: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AttachmentStatus {
    pub interface: String,
    pub hook: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Ok { status: Status },
    Error { message: String },
}

/// What the server, the reloads and the identity sources share. Lock order: `datapath`, then
/// the identity sources, then `policies`.
pub struct Shared {
    pub datapath: Mutex<Datapath>,
    pub policies: Arc<Mutex<Policies>>,
}

fn status(shared: &Shared) -> Result<Status> {
    let datapath = shared.datapath.lock().expect("datapath lock poisoned");
    let config = datapath.config()?;
    let counters = datapath.counters()?;
    let mut packets = BTreeMap::new();
    for verdict in Verdict::ALL {
        for reason in Reason::ALL {
            let n = counters.by_verdict_reason(verdict, reason);
            if n > 0 {
                packets.insert(format!("{}/{}", verdict.name(), reason.name()), n);
            }
        }
    }
    let packets_by_hook = counters
        .nonzero()
        .map(|c| PacketStatus {
            verdict: c.verdict.name().to_owned(),
            reason: c.reason.name().to_owned(),
            direction: c.direction.name().to_owned(),
            hook: c.hook.name().to_owned(),
            packets: c.packets,
        })
        .collect();
    let policies = shared.policies.lock().expect("policies lock poisoned");
    let compiled = policies.current();
    Ok(Status {
        mode: Mode::from_raw(config.mode),
        generation: config.generation,
        reloads: policies.reloads,
        reloads_rejected: policies.rejected,
        last_rejection: policies.last_rejection.clone(),
        identities: compiled.identities.iter().map(|(name, id)| (name.to_owned(), id)).collect(),
        rules: compiled.rules.len(),
        attachments: datapath
            .attachments()
            .iter()
            .map(|Attachment { interface, hook }| AttachmentStatus { interface: interface.clone(), hook: hook.to_string() })
            .collect(),
        packets,
        packets_by_hook,
        events: counters.events(),
    })
}

fn handle(shared: &Shared, request: Request) -> Result<Status> {
    if let Request::Mode { mode } = request {
        shared.datapath.lock().expect("datapath lock poisoned").set_mode(mode)?;
        tracing::info!(mode = mode.name(), "mode switched");
    }
    status(shared)
}

/// Binds the socket (parent directory 0700, socket 0600). Refuses to steal the socket of a
/// live agent; removes one left behind by a dead agent.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("another zt-agent is serving {}; stop it or pass a different --socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(%err, "admin socket accept failed");
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if tokio::io::BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let response = match serde_json::from_str::<Request>(&line)
                .context("malformed request")
                .and_then(|request| handle(&shared, request))
            {
                Ok(status) => Response::Ok { status },
                Err(err) => Response::Error { message: format!("{err:#}") },
            };
            let mut out = serde_json::to_vec(&response).expect("response serializes");
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

/// Client side: sends one request to the agent at `socket`.
pub fn request(socket: &PathBuf, request: &Request) -> Result<Status> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!("cannot reach zt-agent at {} (is it running? is --socket right? are you root?)", socket.display())
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut response = String::new();
    BufReader::new(stream).read_line(&mut response)?;
    match serde_json::from_str::<Response>(&response).context("malformed response from zt-agent")? {
        Response::Ok { status } => Ok(status),
        Response::Error { message } => bail!("zt-agent refused: {message}"),
    }
}
