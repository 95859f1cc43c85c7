//! Network namespaces owned by this process, deleted on drop (and by [`crate::cleanup_all`]).

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, MutexGuard, Once,
    },
    thread,
};

use anyhow::{bail, ensure, Context, Result};
use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

const NETNS_DIR: &str = "/run/netns";
const MAX_NAME_LEN: usize = 40;

/// The namespaces this process created and has not deleted yet. Its lock also serialises
/// `ip netns add/delete`: on first use `ip netns add` makes /run/netns a shared mount, and
/// concurrent first uses can stack two bind mounts that hide each other's namespaces.
static REGISTRY: Mutex<Registry> = Mutex::new(Registry { names: BTreeSet::new(), closed: false });
static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static SWEEP_STALE: Once = Once::new();

struct Registry {
    names: BTreeSet<String>,
    /// Set by [`delete_all`]: an interrupted process creates nothing more.
    closed: bool,
}

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A network namespace named `zt-{pid}-{counter}-{role}`, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with `lo` up. `role` only makes the name readable (e.g. "node-a").
    pub fn new(role: &str) -> Result<Netns> {
        crate::ensure_root()?;
        SWEEP_STALE.call_once(delete_stale_namespaces);
        let prefix = format!("zt-{}-{}-", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let role: String = role.chars().take(MAX_NAME_LEN.saturating_sub(prefix.len())).collect();
        let name = prefix + &role;
        {
            let mut registry = registry();
            ensure!(!registry.closed, "the testbed was cleaned up (interrupted); not creating {name}");
            run_ip(["netns", "add", &name])?;
            registry.names.insert(name.clone());
        }
        let ns = Netns { name };
        run_ip(["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `f` on a new thread that has entered this namespace. Sockets created by `f` stay in
    /// the namespace and can be used from any thread afterwards. A panic in `f` propagates.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns_file = fs::File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()));
        thread::scope(|scope| {
            let worker = scope.spawn(move || {
                setns(&ns_file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
                f()
            });
            worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `program args…` inside the namespace (`ip netns exec`) and returns its output.
    /// Panics when `program` cannot be started, so a missing tool never reads as a failed probe.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawn `ip netns exec {} {program}`: {e}", self.name));
        let stderr = String::from_utf8_lossy(&output.stderr);
        // iproute2 reports a failed exec with the same exit status as many tools' "no".
        if stderr.starts_with(&format!("exec of \"{program}\" failed")) {
            panic!("{} (`cargo xtask setup` installs the tools the tests use)", stderr.trim());
        }
        output
    }

    /// Like [`Netns::exec`], but a non-zero exit is an error carrying the command's stderr.
    pub(crate) fn exec_checked(&self, program: &str, args: &[&str]) -> Result<Output> {
        let output = self.exec(program, args);
        if !output.status.success() {
            bail!(
                "`ip netns exec {} {program} {}` failed ({}): {}",
                self.name,
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let mut registry = registry();
        // Not registered: `cleanup_all` already deleted it.
        if registry.names.remove(&self.name) {
            delete_namespace(&self.name, &registry);
        }
    }
}

/// Deletes every namespace this process created and still holds, and refuses new ones.
pub(crate) fn delete_all() {
    let mut registry = registry();
    registry.closed = true;
    for name in std::mem::take(&mut registry.names) {
        delete_namespace(&name, &registry);
    }
}

/// Kills what still runs inside (a namespace lives on while a process uses it), then deletes it.
/// Takes the registry guard to show the caller holds the lock.
fn delete_namespace(name: &str, _locked: &MutexGuard<'static, Registry>) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        let own_pid = std::process::id() as i32;
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                if pid != own_pid {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
    match Command::new("ip").args(["netns", "delete", name]).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !stderr.contains("No such file") {
                eprintln!("zt-tests: deleting netns {name} failed: {}", stderr.trim());
            }
        }
        Err(e) => eprintln!("zt-tests: spawning `ip netns delete {name}` failed: {e}"),
    }
}

/// Namespaces `zt-<pid>-…` whose creating process is gone are leftovers of an aborted run.
fn delete_stale_namespaces() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = owner_pid(&name) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("zt-tests: deleting leftover netns {name} (its process {pid} is gone)");
                delete_namespace(&name, &registry());
            }
        }
    }
}

/// The pid in a name of the form `zt-<pid>-<counter>-<role>`.
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix("zt-")?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next()?;
    Some(pid)
}

/// Runs `ip args…`; a non-zero exit is an error carrying the command and its stderr.
pub(crate) fn run_ip<I, S>(args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let output = Command::new("ip").args(&args).output().context("spawn `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!("`ip {}` failed ({}): {}", args.join(" "), output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_only_matches_our_naming_scheme() {
        assert_eq!(owner_pid("zt-1234-7-node-a"), Some(1234));
        assert_eq!(owner_pid("zt-1234-7-web"), Some(1234));
        assert_eq!(owner_pid("zt-probe-1"), None);
        assert_eq!(owner_pid("zt-1234-x-web"), None);
        assert_eq!(owner_pid("zt-1234-7"), None);
        assert_eq!(owner_pid("other-1234-7-web"), None);
    }
}
