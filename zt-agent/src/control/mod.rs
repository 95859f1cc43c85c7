//! The local admin socket: `zt-agent mode`, `status` and `flows` talk to the running agent over
//! a Unix socket only root can open. One JSON request line, one JSON response line — except for
//! `flows`, answered with one line per flow event (and a `{"kind":"dropped","count":N}` line
//! before the next event whenever the client read too slowly and N events were dropped for it).

pub mod flows;
pub mod reload;

use std::{
    collections::BTreeMap,
    future::Future,
    io::{BufRead as _, Write as _},
    net::IpAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixListener,
    },
};
use zt_common::{Reason, Verdict};

use crate::{
    datapath::{counters::EventCounts, Attachment, Mode, StartReport},
    events::{fanout::Sinks, record::Filter, sinks::SinkStats},
    identity::sources::IdentitySources,
    state::Shared,
};

/// Flow events a `zt-agent flows --follow` client may lag behind before they are dropped for it.
const FLOWS_CLIENT_QUEUE: usize = 1024;

pub const DEFAULT_SOCKET: &str = "/run/zt/agent.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Mode { mode: Mode },
    Status,
    /// From `zt-cni` ADD: attach to a pod's host-side interface now and, for a Kubernetes pod
    /// (with `--kubernetes`), bind the interface and the addresses its CNI gave it to the pod's
    /// identity; answering once that is done.
    #[serde(rename = "attach-pod")]
    AttachPod {
        interface: String,
        /// For messages: `namespace/name`, or the container.
        pod: String,
        #[serde(default)]
        kubernetes: Option<PodName>,
        #[serde(default)]
        addresses: Vec<IpAddr>,
    },
    /// From `zt-cni` DEL: forget the pod's interface (its veth is about to go).
    #[serde(rename = "forget-pod")]
    ForgetPod {
        interface: String,
        pod: String,
        #[serde(default)]
        kubernetes: Option<PodName>,
    },
    /// The recent flow events the filter selects, then, with `follow`, those to come.
    Flows {
        follow: bool,
        #[serde(default)]
        filter: Filter,
    },
}

/// A Kubernetes pod, as the runtime names it to its CNI plugins (`K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl PodName {
    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// How long an `attach-pod` waits for the pod's identity: the API server tells the agent about
/// a pod before its runtime asks for its network, so this covers a slow watch, and a reload
/// for a label set never seen before.
pub const POD_IDENTITY_WAIT: Duration = Duration::from_secs(20);

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
    /// What each sink delivered and dropped; the last entry counts the `flows` clients.
    #[serde(default)]
    pub sinks: Vec<SinkStats>,
    /// How this agent found the datapath: started fresh, or adopted (and perhaps upgraded or
    /// migrated) an earlier agent's pinned state.
    #[serde(default)]
    pub start: StartReport,
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
    // Boxed: a status is large, an error small.
    Ok { status: Box<Status> },
    Error { message: String },
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
            .map(|Attachment { interface, hook, .. }| AttachmentStatus { interface: interface.clone(), hook: hook.to_string() })
            .collect(),
        packets,
        packets_by_hook,
        events: counters.events(),
        sinks: shared.sinks.stats(),
        start: datapath.start_report().clone(),
    })
}

fn handle(served: &Served, request: Request) -> Result<Status> {
    let shared = &served.shared;
    match request {
        Request::Mode { mode } => {
            shared.datapath.lock().expect("datapath lock poisoned").set_mode(mode)?;
            tracing::info!(mode = mode.name(), "mode switched");
        }
        Request::AttachPod { interface, pod, kubernetes, addresses } => {
            let mut datapath = shared.datapath.lock().expect("datapath lock poisoned");
            datapath.attach_workload(&interface).with_context(|| format!("attaching to {interface} for pod {pod}"))?;
            let mut sources = served.sources.lock().expect("sources lock poisoned");
            if let (Some(source), Some(name)) = (sources.kubernetes_mut(), &kubernetes) {
                source.attach(name.key(), &interface, &addresses);
            }
            // The pod's CNI has just given the node addresses of its own (a ptp gateway, say):
            // they are `host` before the pod sends its first packet, not a refresh later.
            let events = sources.refresh(&mut datapath)?;
            drop(sources);
            drop(datapath);
            for event in events {
                shared.sinks.publish(crate::events::record::agent_event(&served.node, event));
            }
            tracing::info!(%interface, %pod, "attached for the CNI");
        }
        Request::ForgetPod { interface, pod, kubernetes } => {
            if let (Some(source), Some(name)) = (served.sources.lock().expect("sources lock poisoned").kubernetes_mut(), &kubernetes) {
                source.forget(&name.key(), &interface);
            }
            // Gone already (a DEL after the veth went, or a repeated one): nothing to forget.
            if let Ok(ifindex) = nix::net::if_::if_nametoindex(interface.as_str()) {
                shared.datapath.lock().expect("datapath lock poisoned").forget_interface(&interface, ifindex)?;
                tracing::info!(%interface, %pod, "forgotten for the CNI");
            }
        }
        Request::Status | Request::Flows { .. } => {}
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

/// The longest request the admin socket reads (requests are one short JSON line).
const MAX_REQUEST_BYTES: u64 = 64 << 10;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request may act on: the shared state, the identity sources, and the node's name
/// for the events it causes.
#[derive(Clone)]
pub struct Served {
    pub shared: Arc<Shared>,
    pub sources: Arc<Mutex<IdentitySources>>,
    pub node: String,
}

pub async fn serve(listener: UnixListener, served: Served) {
    accept_each(listener, move |stream| connection(stream, served.clone())).await
}

/// Serves every connection on a task of its own: what one client does only costs its own task.
async fn accept_each<F, Fut>(listener: UnixListener, mut on_connection: F)
where
    F: FnMut(tokio::net::UnixStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => drop(tokio::spawn(on_connection(stream))),
            Err(err) => tracing::warn!(%err, "admin socket accept failed"),
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, served: Served) {
    let shared = &served.shared;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let Some(line) = read_request(&mut read, &mut write, REQUEST_TIMEOUT).await else { return };
    let request = serde_json::from_str::<Request>(&line).context("malformed request");
    if let Ok(Request::Flows { follow, filter }) = request {
        stream_flows(&shared.sinks, follow, filter, read, write).await;
        return;
    }
    // Which pod's identity to wait for, once attached.
    let identity_of = match &request {
        Ok(Request::AttachPod { interface, kubernetes: Some(name), .. }) => Some((interface.clone(), name.clone())),
        _ => None,
    };
    let mut response = request.and_then(|request| handle(&served, request));
    if let (Ok(_), Some((interface, name))) = (&response, identity_of) {
        response = pod_identity_bound(&served, &interface, &name).await.and_then(|()| status(shared));
    }
    let response = match response {
        Ok(status) => Response::Ok { status: Box::new(status) },
        Err(err) => Response::Error { message: format!("{err:#}") },
    };
    let _ = write_event(&mut write, &response).await;
}

/// Waits until the pod's interface is bound to its identity, for at most `POD_IDENTITY_WAIT`.
/// Without the Kubernetes source there is no identity to wait for.
async fn pod_identity_bound(served: &Served, interface: &str, name: &PodName) -> Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        let bound = {
            let sources = served.sources.lock().expect("sources lock poisoned");
            if sources.kubernetes().is_none() {
                return Ok(());
            }
            sources.pod_bound(interface, &name.key())
        };
        if let Some(identity) = bound {
            let name_of = served.shared.policies.lock().expect("policies lock poisoned").current().identities.name(identity).map(str::to_owned);
            tracing::info!(%interface, pod = %format!("{}/{}", name.namespace, name.name), identity = name_of.as_deref().unwrap_or("?"), "pod identity bound");
            return Ok(());
        }
        if started.elapsed() >= POD_IDENTITY_WAIT {
            let why = served.sources.lock().expect("sources lock poisoned").kubernetes().and_then(|source| source.last_error());
            bail!(
                "pod {}/{}: no identity bound to {interface} within {}: the API server has not told this agent about the pod{}; \
                 its interface is attached and judged as its address's identity meanwhile",
                name.namespace,
                name.name,
                humantime::format_duration(POD_IDENTITY_WAIT),
                why.map(|why| format!(" (the watch fails: {why})")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The client's request line, bounded in size and time: a client cannot make the agent buffer
/// without end, nor hold a task by never finishing its request. None when the connection is
/// done, after an error reply if the client is still there to read it.
async fn read_request(read: &mut BufReader<OwnedReadHalf>, write: &mut OwnedWriteHalf, timeout: Duration) -> Option<String> {
    let mut line = String::new();
    let mut limited = (&mut *read).take(MAX_REQUEST_BYTES + 1);
    let message = match tokio::time::timeout(timeout, limited.read_line(&mut line)).await {
        Ok(Ok(_)) if line.len() as u64 <= MAX_REQUEST_BYTES => return Some(line),
        Ok(Ok(_)) => format!("request longer than {MAX_REQUEST_BYTES} bytes"),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::InvalidData => "the request is not UTF-8 text".into(),
        Ok(Err(_)) => return None,
        Err(_) => format!("no request within {}", humantime::format_duration(timeout)),
    };
    let _ = write_event(write, &Response::Error { message }).await;
    None
}

/// Writes the recent flows the client asked for and, with `follow`, every new one until the
/// client hangs up. The client is one more consumer of the fan-out: when it reads too slowly,
/// events are dropped for it (and it is told how many), never held for it.
async fn stream_flows(
    sinks: &Sinks,
    follow: bool,
    filter: Filter,
    mut read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
) {
    let (recent, mut subscription) = sinks.subscribe(filter, FLOWS_CLIENT_QUEUE);
    for event in &recent {
        if write_event(&mut write, &**event).await.is_err() {
            return;
        }
    }
    if !follow {
        return;
    }
    let mut reported = 0;
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            // The client sends nothing more; a read that ends means it hung up.
            _ = read.read(&mut ignored) => return,
            event = subscription.events.recv() => {
                let Some(event) = event else { return };
                let dropped = subscription.dropped();
                if dropped > reported {
                    let notice = serde_json::json!({"kind": "dropped", "count": dropped - reported});
                    if write_event(&mut write, &notice).await.is_err() {
                        return;
                    }
                    reported = dropped;
                }
                if write_event(&mut write, &*event).await.is_err() {
                    return;
                }
                subscription.delivered();
            }
        }
    }
}

async fn write_event(write: &mut OwnedWriteHalf, event: &impl serde::Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).expect("events serialize");
    line.push(b'\n');
    write.write_all(&line).await
}

/// Connects to the agent's admin socket.
pub fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| {
        format!("cannot reach zt-agent at {} (is it running? is --socket right? are you root?)", socket.display())
    })
}

/// Client side: sends one request to the agent at `socket`.
pub fn request(socket: &Path, request: &Request) -> Result<Status> {
    let mut stream = connect(socket)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut response = String::new();
    std::io::BufReader::new(stream).read_line(&mut response)?;
    match serde_json::from_str::<Response>(&response).context("malformed response from zt-agent")? {
        Response::Ok { status } => Ok(*status),
        Response::Error { message } => bail!("zt-agent refused: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket served as the agent serves it, each request answered with its length.
    fn server(dir: &Path, timeout: Duration) -> std::path::PathBuf {
        let path = dir.join("agent.sock");
        let listener = bind(&path).unwrap();
        tokio::spawn(accept_each(listener, move |stream| async move {
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            if let Some(line) = read_request(&mut read, &mut write, timeout).await {
                let _ = write.write_all(format!("{} bytes\n", line.len()).as_bytes()).await;
            }
        }));
        path
    }

    /// Sends `request` on a new connection; the reply line, and whether the agent then closed.
    async fn exchange(socket: &Path, request: &[u8]) -> (String, bool) {
        let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut read = BufReader::new(stream);
        let mut reply = String::new();
        read.read_line(&mut reply).await.unwrap();
        // The end of the stream, or a reset (the agent left part of the request unread).
        let closed = !matches!(read.read(&mut [0; 1]).await, Ok(1..));
        (reply, closed)
    }

    #[tokio::test]
    async fn an_over_long_request_is_refused_and_the_next_connection_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let socket = server(dir.path(), Duration::from_secs(5));
        let mut long = vec![b' '; MAX_REQUEST_BYTES as usize + 100];
        long.push(b'\n');
        let (reply, closed) = exchange(&socket, &long).await;
        assert_eq!(reply, "{\"result\":\"error\",\"message\":\"request longer than 65536 bytes\"}\n");
        assert!(closed);
        // At the limit, newline included, is still a request.
        let mut longest = vec![b' '; MAX_REQUEST_BYTES as usize - 1];
        longest.push(b'\n');
        assert_eq!(exchange(&socket, &longest).await.0, "65536 bytes\n");
        assert_eq!(exchange(&socket, b"{}\n").await.0, "3 bytes\n");
        let (reply, _) = exchange(&socket, b"\xff\n").await;
        assert!(reply.contains("the request is not UTF-8 text"), "{reply}");
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_answered_and_dropped_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = server(dir.path(), Duration::from_millis(100));
        let (reply, closed) = exchange(&socket, b"").await;
        assert!(reply.contains("no request within 100ms"), "{reply}");
        assert!(closed);
        assert_eq!(exchange(&socket, b"{}\n").await.0, "3 bytes\n");
    }
}
