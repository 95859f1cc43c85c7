//! The agent under test, run inside a node namespace, with its flow events collected.

use std::{
    collections::BTreeSet,
    ffi::{OsStr, OsString},
    fs,
    io::{BufRead, BufReader, Read},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sched::{setns, CloneFlags},
    sys::{
        prctl,
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use serde_json::Value;
use tempfile::TempDir;

use crate::{netns::Netns, topology::Node};

pub const AGENT_BIN_ENV: &str = "ZT_AGENT_BIN";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Agents this process started and has not stopped yet.
static RUNNING: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Their socket directories, which an interrupted process (no destructors) removes itself.
static SOCKET_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// The agent binary, from `$ZT_AGENT_BIN` (set by `cargo xtask test`).
pub fn agent_bin() -> Result<PathBuf> {
    std::env::var_os(AGENT_BIN_ENV)
        .map(PathBuf::from)
        .context("ZT_AGENT_BIN is not set: run the tests with `cargo xtask test`")
}

/// Runs a one-shot agent command (e.g. `policy check …`) in the root namespace.
pub fn run_agent_command<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = agent_bin()?;
    Command::new(&bin).args(args).output().with_context(|| format!("spawn {}", bin.display()))
}

/// What `zt-agent run` is started with.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub policies: Vec<PathBuf>,
    /// "monitor" or "enforce".
    pub mode: String,
    /// Workload-facing interfaces (TC).
    pub attach: Vec<String>,
    /// Interfaces to other nodes (XDP).
    pub uplinks: Vec<String>,
    pub node_name: String,
    /// Further `run` arguments, appended as given.
    pub extra_args: Vec<String>,
}

impl AgentOptions {
    /// Every workload interface of `node` and its uplink, if any.
    pub fn for_node(node: &Node, policy: impl Into<PathBuf>, mode: &str) -> Self {
        AgentOptions {
            policies: vec![policy.into()],
            mode: mode.to_owned(),
            attach: node.workload_interfaces().to_vec(),
            uplinks: node.uplink().map(str::to_owned).into_iter().collect(),
            node_name: node.name().to_owned(),
            extra_args: Vec::new(),
        }
    }
}

/// What the agent wrote: events (stdout, one JSON object per line) and its log (stderr).
#[derive(Default)]
struct Collected {
    events: Mutex<Vec<Value>>,
    event_arrived: Condvar,
    log: Mutex<String>,
}

impl Collected {
    fn log_line(&self, line: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.push_str(line);
        log.push('\n');
    }
}

/// A running `zt-agent run`. Dropping it sends SIGTERM, then SIGKILL after 5 s. The agent also
/// gets SIGTERM if the thread that started it exits first (parent-death signal), so a killed
/// test run leaves no agent behind.
pub struct Agent {
    pid: Pid,
    bin: PathBuf,
    node_name: String,
    socket: PathBuf,
    collected: Arc<Collected>,
    readers: Vec<JoinHandle<()>>,
    /// Holds the admin socket; removed on drop.
    socket_dir: TempDir,
}

impl Agent {
    /// Starts the agent in `node`'s namespace on all its interfaces.
    pub fn start_on(node: &Node, policy: impl Into<PathBuf>, mode: &str) -> Result<Agent> {
        Agent::start(node.ns(), &AgentOptions::for_node(node, policy, mode))
    }

    /// Starts the agent inside `ns` and waits (up to 30 s) until its admin socket exists.
    pub fn start(ns: &Netns, options: &AgentOptions) -> Result<Agent> {
        Agent::spawn(&agent_bin()?, ns, options)
    }

    fn spawn(bin: &Path, ns: &Netns, options: &AgentOptions) -> Result<Agent> {
        let socket_dir = tempfile::Builder::new().prefix("zt-agent-").tempdir()?;
        SOCKET_DIRS.lock().unwrap_or_else(|e| e.into_inner()).insert(socket_dir.path().to_owned());
        let socket = socket_dir.path().join("agent.sock");
        let mut args: Vec<OsString> = vec!["run".into()];
        let mut flag = |name: &str, value: &OsStr| args.extend([name.into(), value.to_owned()]);
        for policy in &options.policies {
            flag("--policy", policy.as_os_str());
        }
        flag("--mode", options.mode.as_ref());
        for interface in &options.attach {
            flag("--attach", interface.as_ref());
        }
        for interface in &options.uplinks {
            flag("--uplink", interface.as_ref());
        }
        flag("--socket", socket.as_os_str());
        flag("--node-name", options.node_name.as_ref());
        args.extend(options.extra_args.iter().map(OsString::from));
        let command_line =
            format!("{} {}", bin.display(), args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));

        // Entered with setns rather than `ip netns exec`, which remounts /sys and would hide
        // bpffs (/sys/fs/bpf) and the cgroup hierarchy from the agent.
        let netns_file = fs::File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
        let mut command = Command::new(bin);
        command.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only makes two syscalls.
        unsafe {
            command.pre_exec(move || {
                setns(&netns_file, CloneFlags::CLONE_NEWNET)?;
                prctl::set_pdeathsig(Signal::SIGTERM)?;
                Ok(())
            });
        }
        let mut child = command.spawn().with_context(|| format!("spawn {command_line}"))?;
        let pid = Pid::from_raw(child.id() as i32);
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).insert(pid.as_raw());

        let collected = Arc::new(Collected::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![collect_events(stdout, collected.clone()), collect_log(stderr, collected.clone())];
        let agent = Agent {
            pid,
            bin: bin.to_owned(),
            node_name: options.node_name.clone(),
            socket,
            collected,
            readers,
            socket_dir,
        };
        agent.wait_ready().with_context(|| format!("start `{command_line}` in {ns}"))?;
        Ok(agent)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.socket.exists() {
            if let Some(status) = self.reap_if_exited() {
                // Let the readers drain what the agent wrote before it died.
                let drained = Instant::now() + Duration::from_secs(1);
                while !self.readers.iter().all(JoinHandle::is_finished) && Instant::now() < drained {
                    thread::sleep(POLL_INTERVAL);
                }
                bail!("the agent exited ({status}) before creating its socket; stderr:\n{}", self.stderr());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no admin socket at {} after {READY_TIMEOUT:?}; stderr:\n{}",
                    self.socket.display(),
                    self.stderr()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// How the agent exited, if it has; it is then reaped and forgotten, so drop signals nothing.
    fn reap_if_exited(&self) -> Option<String> {
        let status = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return None,
            Ok(status) => format!("{status:?}"),
            Err(e) => format!("status unknown: {e}"),
        };
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid.as_raw());
        Some(status)
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The admin socket (for `zt-agent … --socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every event received so far, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.collected.events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first event, among those already received and those arriving within `timeout`,
    /// that satisfies `predicate`.
    pub fn wait_for_event(&self, predicate: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let mut events = self.collected.events.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(event) = events.iter().find(|event| predicate(event)) {
                return Some(event.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            events = self.collected.event_arrived.wait_timeout(events, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// What the agent logged on stderr so far (plus stdout lines that were not JSON).
    pub fn stderr(&self) -> String {
        self.collected.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks the running agent to reload its policy (SIGHUP).
    pub fn request_reload(&self) -> Result<()> {
        kill(self.pid, Signal::SIGHUP).context("sending SIGHUP to the agent")
    }

    /// `zt-agent status --json --socket …`, parsed.
    pub fn status(&self) -> Result<Value> {
        let output = Command::new(&self.bin)
            .args(["status".as_ref(), "--json".as_ref(), "--socket".as_ref(), self.socket.as_os_str()])
            .output()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        if !output.status.success() {
            bail!("`zt-agent status` failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
        }
        serde_json::from_slice(&output.stdout).context("`zt-agent status --json` printed no JSON")
    }

    /// Switches the running agent's mode with `zt-agent mode <mode> --socket …`.
    pub fn set_mode(&self, mode: &str) -> Result<()> {
        let output = Command::new(&self.bin)
            .args(["mode".as_ref(), mode.as_ref(), "--socket".as_ref(), self.socket.as_os_str()])
            .output()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        if !output.status.success() {
            bail!(
                "`zt-agent mode {mode}` failed ({}): {}{}\nagent stderr:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.stderr()
            );
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid.as_raw());
        if running {
            stop_process(self.pid);
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        SOCKET_DIRS.lock().unwrap_or_else(|e| e.into_inner()).remove(self.socket_dir.path());
        if thread::panicking() {
            eprintln!("--- zt-agent ({}) stderr ---\n{}--- end of zt-agent stderr ---", self.node_name, self.stderr());
        }
    }
}

/// Stops every agent this process still runs and removes their sockets (for interrupt
/// handlers, after which no destructor runs).
pub(crate) fn stop_all() {
    let pids = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        stop_process(Pid::from_raw(pid));
    }
    for dir in std::mem::take(&mut *SOCKET_DIRS.lock().unwrap_or_else(|e| e.into_inner())) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL; reaps the process.
fn stop_process(pid: Pid) {
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while let Ok(WaitStatus::StillAlive) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

fn collect_events(stdout: impl Read + Send + 'static, collected: Arc<Collected>) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Value>(&line) {
                Ok(event) => {
                    collected.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
                    collected.event_arrived.notify_all();
                }
                Err(_) => collected.log_line(&format!("[stdout, not JSON] {line}")),
            }
        }
    })
}

fn collect_log(stderr: impl Read + Send + 'static, collected: Arc<Collected>) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            collected.log_line(&line);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    /// Stands in for zt-agent: `run` reports its namespace and bpffs view as events, writes a
    /// non-JSON line, creates the socket path and reports mode changes made by `mode`;
    /// `run --policy broken` fails; `run --policy stubborn` ignores SIGTERM.
    const FAKE_AGENT: &str = r#"#!/bin/sh
set -u
cmd=$1; shift
new_mode=${1:-}; sock=""; policy=""
while [ $# -gt 0 ]; do
  case "$1" in
    --socket) sock=$2; shift ;;
    --policy) policy=$2; shift ;;
  esac
  shift
done
case "$cmd" in
  mode) echo "$new_mode" > "$sock.mode"; exit 0 ;;
esac
if [ "$policy" = broken ]; then echo "error: policy broken: line 3" >&2; exit 1; fi
if [ "$policy" = stubborn ]; then trap '' TERM; else trap 'exit 0' TERM; fi
echo "agent starting" >&2
echo "not json"
echo "{\"netns\":\"$(stat -L -c %i /proc/self/ns/net)\",\"bpffs\":\"$(stat -f -c %T /sys/fs/bpf)\"}"
touch "$sock"
while :; do
  if [ -f "$sock.mode" ]; then echo "{\"mode\":\"$(cat "$sock.mode")\"}"; rm "$sock.mode"; fi
  sleep 0.05
done
"#;

    fn fake_agent() -> (TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-zt-agent");
        fs::write(&bin, FAKE_AGENT).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        (dir, bin)
    }

    fn options(policy: &str) -> AgentOptions {
        AgentOptions {
            policies: vec![policy.into()],
            mode: "monitor".into(),
            attach: vec!["lxc-web".into()],
            uplinks: Vec::new(),
            node_name: "node-a".into(),
            extra_args: Vec::new(),
        }
    }

    fn is_alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn agent_runs_in_the_namespace_and_its_output_is_collected() {
        let (_dir, bin) = fake_agent();
        let ns = Netns::new("agent").unwrap();
        let agent = Agent::spawn(&bin, &ns, &options("demo.yaml")).unwrap();

        let placement = agent.wait_for_event(|e| e.get("netns").is_some(), Duration::from_secs(5)).unwrap();
        let ns_inode = fs::metadata(ns.path()).unwrap().ino().to_string();
        assert_eq!(placement["netns"], ns_inode.as_str(), "the agent runs in the node namespace");
        let host_bpffs = Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]).output().unwrap();
        assert_eq!(placement["bpffs"], String::from_utf8_lossy(&host_bpffs.stdout).trim(), "same /sys/fs/bpf as ours");

        agent.set_mode("enforce").unwrap();
        assert!(agent.wait_for_event(|e| e["mode"] == "enforce", Duration::from_secs(5)).is_some());
        assert_eq!(agent.events().len(), 2);
        assert!(agent.stderr().contains("agent starting"));
        assert!(agent.stderr().contains("[stdout, not JSON] not json"));

        let pid = agent.pid();
        drop(agent);
        assert!(!is_alive(pid), "drop stops the agent");
    }

    #[test]
    fn an_agent_that_exits_early_fails_with_its_stderr() {
        let (_dir, bin) = fake_agent();
        let ns = Netns::new("agent").unwrap();
        let err = Agent::spawn(&bin, &ns, &options("broken")).err().expect("start must fail");
        assert!(format!("{err:#}").contains("policy broken: line 3"), "{err:#}");
    }

    #[test]
    fn an_agent_ignoring_sigterm_is_killed() {
        let (_dir, bin) = fake_agent();
        let ns = Netns::new("agent").unwrap();
        let agent = Agent::spawn(&bin, &ns, &options("stubborn")).unwrap();
        let pid = agent.pid();
        let started = Instant::now();
        drop(agent);
        assert!(!is_alive(pid));
        assert!(started.elapsed() >= STOP_GRACE);
    }
}
