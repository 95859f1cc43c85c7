//! cgroup v2 directories owned by this process, for tests that identify processes by cgroup.
//! Each is killed (every process in it) and removed on drop.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::netns::Netns;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
/// Cgroups created and not yet removed, in creation order, for [`crate::cleanup_all`] (an
/// interrupt handler exits without running destructors).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` on hybrid layouts).
pub fn v2_root() -> Result<PathBuf> {
    let out = Command::new("findmnt").args(["-n", "-t", "cgroup2", "-o", "TARGET"]).output().context("findmnt")?;
    let root = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_owned();
    ensure!(!root.is_empty(), "no cgroup2 file system is mounted");
    Ok(PathBuf::from(root))
}

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    relative: String,
}

impl Cgroup {
    /// A new top-level cgroup `zt-{pid}-{counter}` directly under the v2 root.
    pub fn new_scope() -> Result<Cgroup> {
        crate::ensure_root()?;
        let root = v2_root()?;
        let name = format!("zt-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        Cgroup::create(root.join(&name), name)
    }

    /// A child cgroup.
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        Cgroup::create(self.path.join(name), format!("{}/{name}", self.relative))
    }

    fn create(path: PathBuf, relative: String) -> Result<Cgroup> {
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(path.clone());
        Ok(Cgroup { path, relative })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the v2 root, as policies and `--cgroup` name it.
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// Runs `program` as a process in this cgroup and in `ns`, waits for it, returns whether it
    /// exited successfully.
    pub fn run(&self, ns: &Netns, program: &Path, args: &[&str]) -> Result<bool> {
        // Opened before fork: the child must not allocate between fork and exec.
        let mut procs = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .with_context(|| format!("open {}/cgroup.procs", self.path.display()))?;
        let netns = fs::File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null());
        // SAFETY: between fork and exec the child only writes a file and makes a syscall.
        unsafe {
            command.pre_exec(move || {
                procs.write_all(b"0")?; // "0" moves the writing process itself
                setns(&netns, CloneFlags::CLONE_NEWNET)?;
                Ok(())
            });
        }
        let status = command.status().with_context(|| format!("run {} in {}", program.display(), self.relative))?;
        Ok(status.success())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove(&self.path);
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &self.path);
    }
}

/// Kills every process in the cgroup, then removes it (waiting up to 5 s for the processes to go).
fn remove(path: &Path) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) if Instant::now() > deadline => {
                eprintln!("testbed: could not remove cgroup {}: {err}", path.display());
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes every cgroup still alive, children before parents.
pub(crate) fn delete_all() {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for path in live.drain(..).rev() {
        remove(&path);
    }
}
