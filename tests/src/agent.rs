//! The agent under test, run inside a node namespace, with its flow events collected.

use std::{
    collections::BTreeSet,
    ffi::{OsStr, OsString},
    fmt, fs,
    io::{BufRead, BufReader, Read},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Condvar, Mutex, Once,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
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
/// The agent built with the upgrade variant of the datapath (set by `cargo xtask test`).
pub const UPGRADE_BIN_ENV: &str = "ZT_AGENT_UPGRADE_BIN";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long [`Agent::terminate`] waits for the agent to exit after SIGTERM.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a one-shot command in a namespace (e.g. `detach`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Where the per-test pin directories are made (the agent's default is `/sys/fs/bpf/zt`, which
/// the tests never use).
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPFFS_DIR_PREFIX: &str = "zt-test-";

/// Agents this process started and has not stopped yet.
static RUNNING: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Their socket directories, which an interrupted process (no destructors) removes itself.
static SOCKET_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
/// The pin directories this process made and has not cleaned up yet (for interrupts, too).
static BPFFS_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
static NEXT_BPFFS_DIR: AtomicU32 = AtomicU32::new(0);
static SWEEP_STALE_BPFFS_DIRS: Once = Once::new();

/// The agent binary, from `$ZT_AGENT_BIN` (set by `cargo xtask test`).
pub fn agent_bin() -> Result<PathBuf> {
    std::env::var_os(AGENT_BIN_ENV)
        .map(PathBuf::from)
        .context("ZT_AGENT_BIN is not set: run the tests with `cargo xtask test`")
}

/// The upgraded agent binary, from `$ZT_AGENT_UPGRADE_BIN` (set by `cargo xtask test`).
pub fn upgrade_agent_bin() -> Result<PathBuf> {
    let bin = std::env::var_os(UPGRADE_BIN_ENV).map(PathBuf::from).context(
        "ZT_AGENT_UPGRADE_BIN is not set: run the tests with `cargo xtask test`, which builds the upgraded agent",
    )?;
    ensure!(bin.is_file(), "{UPGRADE_BIN_ENV}={} is not a file: run the tests with `cargo xtask test`", bin.display());
    Ok(bin)
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
    /// "monitor" or "enforce"; `None` passes no `--mode` (a fresh start runs monitor, an agent
    /// adopting pinned state keeps the pinned mode).
    pub mode: Option<String>,
    /// Workload-facing interfaces (TC).
    pub attach: Vec<String>,
    /// Interfaces to other nodes (XDP).
    pub uplinks: Vec<String>,
    pub node_name: String,
    /// Further `run` arguments, appended as given.
    pub extra_args: Vec<String>,
    /// Where the agent pins its maps, programs and links (`--bpffs-dir`). `None`: a new
    /// directory of its own, cleaned up when the agent is dropped. To start agents one after
    /// the other on the same pins, give each the same [`BpffsDir`] (e.g. the first agent's,
    /// [`Agent::bpffs_dir`]); it is cleaned up once the last of them and the test let go of it.
    pub bpffs_dir: Option<Arc<BpffsDir>>,
    /// Run the agent with only these capabilities (e.g. "bpf", "net_admin"), as a container
    /// without `privileged` would: the bounding set of its root user. `None`: all of root's.
    pub capabilities: Option<Vec<String>>,
}

impl AgentOptions {
    /// Every workload interface of `node` and its uplink, if any.
    pub fn for_node(node: &Node, policy: impl Into<PathBuf>, mode: &str) -> Self {
        AgentOptions {
            policies: vec![policy.into()],
            mode: Some(mode.to_owned()),
            attach: node.workload_interfaces().to_vec(),
            uplinks: node.uplink().map(str::to_owned).into_iter().collect(),
            node_name: node.name().to_owned(),
            extra_args: Vec::new(),
            bpffs_dir: None,
            capabilities: None,
        }
    }

    /// The arguments of `zt-agent run` for these options, with the admin socket and the pin
    /// directory given (for starting an agent by hand, e.g. one that must refuse to start).
    pub fn run_args(&self, socket: &Path, bpffs_dir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into()];
        let mut flag = |name: &str, value: &OsStr| args.extend([name.into(), value.to_owned()]);
        for policy in &self.policies {
            flag("--policy", policy.as_os_str());
        }
        if let Some(mode) = &self.mode {
            flag("--mode", mode.as_ref());
        }
        for interface in &self.attach {
            flag("--attach", interface.as_ref());
        }
        for interface in &self.uplinks {
            flag("--uplink", interface.as_ref());
        }
        flag("--socket", socket.as_os_str());
        flag("--node-name", self.node_name.as_ref());
        flag("--bpffs-dir", bpffs_dir.as_os_str());
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }
}

/// A directory on bpffs for one agent's pins, `/sys/fs/bpf/zt-test-<pid>-<counter>`, unique to
/// this process and never the agent's default. Pins outlive the agent that made them, so
/// dropping this runs `zt-agent detach --bpffs-dir <dir>` inside the namespace the agents ran
/// in (entered with setns, like the agent itself), then removes whatever is still there
/// (unpinning a link detaches its program). Leftovers of a run that died without destructors
/// are removed on first use, and [`crate::cleanup_all`] removes those of an interrupted one.
pub struct BpffsDir {
    path: PathBuf,
    /// The namespace the agents run in, held open so that it can still be entered after its
    /// topology deleted it.
    netns: fs::File,
    netns_name: String,
}

impl BpffsDir {
    /// A new, not yet existing, directory for agents running in `ns` (the agent creates it).
    pub fn new(ns: &Netns) -> Result<Arc<BpffsDir>> {
        crate::ensure_root()?;
        SWEEP_STALE_BPFFS_DIRS.call_once(remove_stale_bpffs_dirs);
        let name =
            format!("{BPFFS_DIR_PREFIX}{}-{}", std::process::id(), NEXT_BPFFS_DIR.fetch_add(1, Ordering::Relaxed));
        let path = Path::new(BPFFS_ROOT).join(name);
        if path.exists() {
            // A previous process with our pid (pids are reused) left it behind.
            fs::remove_dir_all(&path).with_context(|| format!("remove the leftover {}", path.display()))?;
        }
        let netns = fs::File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
        BPFFS_DIRS.lock().unwrap_or_else(|e| e.into_inner()).insert(path.clone());
        Ok(Arc::new(BpffsDir { path, netns, netns_name: ns.name().to_owned() }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/v1`, where the agent keeps `maps/`, `programs/` and `links/`.
    pub fn pins(&self) -> PathBuf {
        self.path.join("v1")
    }

    /// Runs `zt-agent detach --bpffs-dir <dir>` (with `--json` if asked) in the agents'
    /// namespace, with `$ZT_AGENT_BIN`; its output, whatever its exit status.
    pub fn detach(&self, json: bool) -> Result<Output> {
        let mut args: Vec<OsString> = vec!["detach".into(), "--bpffs-dir".into(), self.path.clone().into()];
        if json {
            args.push("--json".into());
        }
        run_in_netns_file(&agent_bin()?, &self.netns, &self.netns_name, &args, COMMAND_TIMEOUT)
    }
}

impl fmt::Debug for BpffsDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BpffsDir").field("path", &self.path).field("netns", &self.netns_name).finish()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let registered = BPFFS_DIRS.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.path);
        if !registered || !self.path.exists() {
            return;
        }
        match self.detach(false) {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "zt-tests: `zt-agent detach --bpffs-dir {}` failed ({}): {}",
                self.path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(e) => eprintln!("zt-tests: `zt-agent detach --bpffs-dir {}`: {e:#}", self.path.display()),
        }
        if self.path.exists() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("zt-tests: removing {} failed: {e}", self.path.display());
            }
        }
    }
}

/// Removes every pin directory this process still holds (for interrupt handlers, after the
/// agents were stopped): unpinning the links detaches the programs.
pub(crate) fn remove_all_bpffs_dirs() {
    for dir in std::mem::take(&mut *BPFFS_DIRS.lock().unwrap_or_else(|e| e.into_inner())) {
        if dir.exists() {
            if let Err(e) = fs::remove_dir_all(&dir) {
                eprintln!("zt-tests: removing {} failed: {e}", dir.display());
            }
        }
    }
}

/// Directories `zt-test-<pid>-…` whose process is gone are leftovers of an aborted run.
fn remove_stale_bpffs_dirs() {
    let Ok(entries) = fs::read_dir(BPFFS_ROOT) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = bpffs_dir_owner(&name) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("zt-tests: removing leftover pins {BPFFS_ROOT}/{name} (its process {pid} is gone)");
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                eprintln!("zt-tests: removing {BPFFS_ROOT}/{name} failed: {e}");
            }
        }
    }
}

/// The pid in a name of the form `zt-test-<pid>-<counter>`.
fn bpffs_dir_owner(name: &str) -> Option<u32> {
    let (pid, counter) = name.strip_prefix(BPFFS_DIR_PREFIX)?.split_once('-')?;
    counter.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Runs `zt-agent args…` inside `ns` (entered with setns, so it sees the host's bpffs, unlike
/// `ip netns exec`) and returns its output. It is killed, and this fails, if it runs longer
/// than `timeout`.
pub fn run_agent_command_in<I, S>(ns: &Netns, args: I, timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let netns = fs::File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    run_in_netns_file(&agent_bin()?, &netns, ns.name(), &args, timeout)
}

fn run_in_netns_file(
    bin: &Path,
    netns: &fs::File,
    ns_name: &str,
    args: &[OsString],
    timeout: Duration,
) -> Result<Output> {
    let command_line =
        format!("{} {}", bin.display(), args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let netns = netns.try_clone().context("dup the namespace file")?;
    let mut command = Command::new(bin);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and only makes two syscalls.
    unsafe {
        command.pre_exec(move || {
            setns(&netns, CloneFlags::CLONE_NEWNET)?;
            prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
    let mut child = command.spawn().with_context(|| format!("spawn `{command_line}` in {ns_name}"))?;
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait for the command")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            bail!(
                "`{command_line}` in {ns_name} still ran after {timeout:?} (killed); stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(POLL_INTERVAL);
    };
    Ok(Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
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
    /// The agent's pins; shared with the agents started on the same directory.
    bpffs_dir: Arc<BpffsDir>,
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

    /// [`Agent::start`] with another agent binary (e.g. the upgrade under test).
    pub fn start_bin(bin: &Path, ns: &Netns, options: &AgentOptions) -> Result<Agent> {
        Agent::spawn(bin, ns, options)
    }

    fn spawn(bin: &Path, ns: &Netns, options: &AgentOptions) -> Result<Agent> {
        let bpffs_dir = match &options.bpffs_dir {
            Some(dir) => dir.clone(),
            None => BpffsDir::new(ns)?,
        };
        let socket_dir = tempfile::Builder::new().prefix("zt-agent-").tempdir()?;
        SOCKET_DIRS.lock().unwrap_or_else(|e| e.into_inner()).insert(socket_dir.path().to_owned());
        let socket = socket_dir.path().join("agent.sock");
        let args = options.run_args(&socket, bpffs_dir.path());
        let command_line =
            format!("{} {}", bin.display(), args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));

        // Entered with setns rather than `ip netns exec`, which remounts /sys and would hide
        // bpffs (/sys/fs/bpf) and the cgroup hierarchy from the agent.
        let netns_file = fs::File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
        let mut command = match &options.capabilities {
            None => Command::new(bin),
            // setpriv execs the agent in its place (same pid) with the bounding set cut down:
            // root's processes then hold exactly those capabilities, and no others.
            Some(caps) => {
                let set: String = caps.iter().map(|cap| format!(",+{cap}")).collect();
                let mut command = Command::new("setpriv");
                command.arg(format!("--bounding-set=-all{set}")).arg(format!("--inh-caps=-all{set}")).arg("--").arg(bin);
                command
            }
        };
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
            bpffs_dir,
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

    /// The binary it runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Where it pins its state; pass it in [`AgentOptions::bpffs_dir`] to start another agent on
    /// the same pins.
    pub fn bpffs_dir(&self) -> &Arc<BpffsDir> {
        &self.bpffs_dir
    }

    /// Whether the process is still running (not yet reaped by the harness).
    pub fn is_running(&self) -> bool {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).contains(&self.pid.as_raw())
            && self.reap_if_exited().is_none()
    }

    /// SIGKILL, then reaps it: no chance to clean anything up. Its events and log stay readable.
    pub fn kill9(&mut self) {
        if RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid.as_raw()) {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
        self.drain_readers();
    }

    /// SIGTERM, then waits (up to 10 s) for it to exit and reaps it; how it exited. Still running
    /// after that, it is killed and this fails.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        ensure!(
            RUNNING.lock().unwrap_or_else(|e| e.into_inner()).contains(&self.pid.as_raw()),
            "the agent ({}) is not running any more",
            self.pid
        );
        kill(self.pid, Signal::SIGTERM).context("sending SIGTERM to the agent")?;
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        let status = loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => break ExitStatus::from_raw((code & 0xff) << 8),
                Ok(WaitStatus::Signaled(_, signal, core)) => {
                    break ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 })
                }
                Ok(_) => {}
                Err(e) => {
                    RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid.as_raw());
                    bail!("waiting for the agent ({}): {e}", self.pid);
                }
            }
            if Instant::now() >= deadline {
                self.kill9();
                bail!("the agent did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM; stderr:\n{}", self.stderr());
            }
            thread::sleep(POLL_INTERVAL);
        };
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid.as_raw());
        self.drain_readers();
        Ok(status)
    }

    /// Once the process is gone: lets the readers take in the rest of its output.
    fn drain_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.readers.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
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

    /// `zt-agent status --json --socket …`, parsed; panics (with the agent's log) if that fails.
    pub fn status_json(&self) -> Value {
        self.status().unwrap_or_else(|e| panic!("{e:#}\nagent stderr:\n{}", self.stderr()))
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

/// Stops every agent this process still runs and removes their sockets and pins (for interrupt
/// handlers, after which no destructor runs).
pub(crate) fn stop_all() {
    let pids = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        stop_process(Pid::from_raw(pid));
    }
    for dir in std::mem::take(&mut *SOCKET_DIRS.lock().unwrap_or_else(|e| e.into_inner())) {
        let _ = fs::remove_dir_all(dir);
    }
    remove_all_bpffs_dirs();
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
            mode: Some("monitor".into()),
            attach: vec!["lxc-web".into()],
            uplinks: Vec::new(),
            node_name: "node-a".into(),
            extra_args: Vec::new(),
            bpffs_dir: None,
            capabilities: None,
        }
    }

    #[test]
    fn bpffs_dir_owner_only_matches_our_naming_scheme() {
        assert_eq!(bpffs_dir_owner("zt-test-1234-7"), Some(1234));
        assert_eq!(bpffs_dir_owner("zt-test-1234-x"), None);
        assert_eq!(bpffs_dir_owner("zt-test-1234"), None);
        assert_eq!(bpffs_dir_owner("zt"), None);
        assert_eq!(bpffs_dir_owner("zt-1234-7"), None);
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
