//! podman for the tests, with all of its state in directories of the test's: images made of
//! host files (`podman import`), builds from local layers only, containers run and cleaned up.
//! Needs root.

use std::{
    env, fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{self, Command, Output},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    thread,
};

use nix::sys::resource::{getrlimit, Resource};
use serde_json::Value;

use crate::ensure_root;

/// Prefix of the per-podman state directories (in the temporary directory) and cgroup parents:
/// `zt-podman-<pid>-<counter>`.
const STATE_PREFIX: &str = "zt-podman-";
static NEXT_STATE: AtomicU32 = AtomicU32::new(0);
static SWEEP_STALE_STATES: Once = Once::new();

pub struct Podman {
    /// `zt-podman-<pid>-<counter>`: the state directory's name and the cgroup parent's.
    name: String,
    dir: PathBuf,
}

impl Podman {
    pub fn with_own_state() -> Podman {
        ensure_root().unwrap();
        let version = Command::new("podman").arg("--version").output();
        assert!(
            version.is_ok_and(|out| out.status.success()),
            "podman is not installed: `cargo xtask test` installs it (xtask/src/setup.rs), or `apt-get install podman runc`"
        );
        SWEEP_STALE_STATES.call_once(sweep_stale_states);
        let name = format!("{STATE_PREFIX}{}-{}", process::id(), NEXT_STATE.fetch_add(1, Ordering::Relaxed));
        let dir = env::temp_dir().join(&name);
        if dir.exists() {
            // A previous process with our pid (pids are reused) left it behind.
            remove_state(&dir, &name);
        }
        fs::create_dir_all(dir.join("tmp")).unwrap();
        // vfs: plain directories, so nothing is mounted that a killed run could leave behind (the
        // images are small). runc: Debian's crun refuses a hybrid cgroup layout (cgroup v1 with
        // controllers on the v2 hierarchy too), which runc handles. k8s-file and file: the logs
        // and events stay in the state directory, out of the journal.
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.join("storage").display(),
                dir.join("run").display()
            ),
        )
        .unwrap();
        fs::write(
            dir.join("containers.conf"),
            "[containers]\nlog_driver = \"k8s-file\"\n\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        // No registry to resolve short names in: only fully named local images exist here.
        fs::write(dir.join("registries.conf"), "unqualified-search-registries = []\n").unwrap();
        Podman { name, dir }
    }

    pub fn command(&self) -> Command {
        podman_command(&self.dir)
    }

    /// `podman args…`; its stdout, or a panic with the command and its stderr.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            output.status.success(),
            "`podman {}` failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("spawn podman")
    }

    /// Where its containers' cgroups go (created in every hierarchy, removed on drop).
    pub fn cgroup_parent(&self) -> String {
        format!("/{}", self.name)
    }

    /// `podman run` and what every container here runs with: local images only, its cgroup
    /// under [`Podman::cgroup_parent`] (conmon, the container's monitor, stays in the test's
    /// cgroup, so no other is made), and limits it can be given.
    pub fn run_args(&self) -> Vec<String> {
        let mut args = vec![
            "run".to_owned(),
            "--pull=never".into(),
            "--cgroups=no-conmon".into(),
            format!("--cgroup-parent={}", self.cgroup_parent()),
        ];
        args.extend(Podman::ulimit_args());
        args
    }

    /// `podman run --rm` of `image` without network, with `options` and `command`; its stdout.
    pub fn run_once(&self, image: &Image, options: &[&str], command: &[&str]) -> String {
        let mut args = self.run_args();
        args.extend(["--rm".to_owned(), "--network=none".to_owned()]);
        args.extend(options.iter().map(|o| o.to_string()));
        args.push(image.tag.clone());
        args.extend(command.iter().map(|c| c.to_string()));
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Limits a container may be given here. As root, podman asks the runtime for 1048576 open
    /// files and processes, which a root without CAP_SYS_RESOURCE (as on the test machines)
    /// cannot raise to, and it lowers its own process limit (to 32768 there), which the
    /// container's may not exceed. Our own open-file limit and at most 1024 processes are
    /// always within reach; root is exempt from the process limit anyway.
    pub fn ulimit_args() -> Vec<String> {
        let (_, open_files) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let (processes, _) = getrlimit(Resource::RLIMIT_NPROC).unwrap();
        let processes = processes.min(1024);
        vec![format!("--ulimit=nofile={open_files}:{open_files}"), format!("--ulimit=nproc={processes}:{processes}")]
    }

    /// Imports `rootfs` as image `tag`, with `changes` (Containerfile instructions).
    pub fn import(&self, rootfs: &Rootfs, tag: &str, changes: &[&str]) -> Image<'_> {
        let tarball = self.dir.join("tmp").join(format!("{}.tar", tag.replace(['/', ':'], "-")));
        let tar = Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(rootfs.dir.path())
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .output()
            .unwrap();
        assert!(tar.status.success(), "tar: {}", String::from_utf8_lossy(&tar.stderr));
        let mut args = vec!["import".to_owned()];
        args.extend(changes.iter().map(|change| format!("--change={change}")));
        args.extend([tarball.to_str().unwrap().to_owned(), tag.to_owned()]);
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        fs::remove_file(tarball).unwrap();
        Image { podman: self, tag: tag.to_owned() }
    }

    /// `podman build` of deploy/image/Containerfile in `context` with `options` and `build_args`,
    /// from local images only, without network; `target` builds only up to that stage.
    pub fn build(
        &self,
        containerfile: &Path,
        context: &Path,
        options: &[&str],
        build_args: &[(&str, &str)],
        target: Option<&str>,
        tag: &str,
    ) -> Image<'_> {
        let mut args = vec![
            "build".to_owned(),
            "--pull=never".into(),
            "--network=none".into(),
            format!("--cgroup-parent={}", self.cgroup_parent()),
            format!("--file={}", containerfile.display()),
            format!("--tag={tag}"),
        ];
        args.extend(Podman::ulimit_args());
        args.extend(options.iter().map(|o| o.to_string()));
        args.extend(build_args.iter().map(|(name, value)| format!("--build-arg={name}={value}")));
        args.extend(target.map(|target| format!("--target={target}")));
        args.push(context.to_str().unwrap().to_owned());
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Image { podman: self, tag: tag.to_owned() }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        remove_state(&self.dir, &self.name);
    }
}

/// podman on the state in `dir` (see [`Podman`]).
fn podman_command(dir: &Path) -> Command {
    let mut command = Command::new("podman");
    command
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", dir.join("storage.conf"))
        .env("CONTAINERS_REGISTRIES_CONF", dir.join("registries.conf"))
        // Where builds unpack contexts and keep their cache mounts.
        .env("TMPDIR", dir.join("tmp"))
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        // As flags too: podman 4.3 takes these two from containers.conf only in part (it made
        // /run/libpod, the default, with tmp_dir set there).
        .arg("--tmpdir")
        .arg(dir.join("libpod"))
        .arg("--network-config-dir")
        .arg(dir.join("networks"));
    command
}

/// Removes the containers (stopping them) and images of the state in `dir`, anything still
/// mounted under it, the directory, and the cgroup parent `name` in every hierarchy.
fn remove_state(dir: &Path, name: &str) {
    if dir.join("containers.conf").exists() {
        for args in [&["rm", "--all", "--force", "--time", "0"][..], &["rmi", "--all", "--force"]] {
            match podman_command(dir).args(args).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "zt-tests: `podman {}` in {}: {}",
                    args.join(" "),
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("zt-tests: spawning podman: {e}"),
            }
        }
    }
    // The containers' shm mounts, if podman could not remove a container; deepest first.
    let mut leftovers: Vec<String> = mount_points()
        .into_iter()
        .filter(|(_, point)| Path::new(point).starts_with(dir))
        .map(|(_, point)| point)
        .collect();
    leftovers.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in leftovers {
        let _ = Command::new("umount").args(["--lazy", &point]).status();
    }
    if dir.exists() {
        if let Err(e) = fs::remove_dir_all(dir) {
            eprintln!("zt-tests: removing {} failed: {e}", dir.display());
        }
    }
    for (kind, point) in mount_points() {
        if kind == "cgroup" || kind == "cgroup2" {
            remove_cgroup(&Path::new(&point).join(name));
        }
    }
}

/// (filesystem type, mount point) of every mount this process sees.
fn mount_points() -> Vec<(String, String)> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(2)?.to_string(), fields.get(1)?.to_string()))
        })
        .collect()
}

/// Removes a cgroup directory and those below it (which must hold no processes any more).
fn remove_cgroup(path: &Path) {
    let Ok(entries) = fs::read_dir(path) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path());
        }
    }
    if let Err(e) = fs::remove_dir(path) {
        eprintln!("zt-tests: removing cgroup {} failed: {e}", path.display());
    }
}

/// State directories and cgroup parents `zt-podman-<pid>-…` whose process is gone are
/// leftovers of a run that died without its destructors.
fn sweep_stale_states() {
    let stale = |name: &str| {
        let (pid, counter) = name.strip_prefix(STATE_PREFIX).and_then(|rest| rest.split_once('-'))?;
        counter.parse::<u32>().ok()?;
        let pid: u32 = pid.parse().ok()?;
        (pid != process::id() && !Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    };
    let mut names = std::collections::BTreeSet::new();
    let mut dirs = vec![env::temp_dir()];
    dirs.extend(
        mount_points().into_iter().filter(|(kind, _)| kind.starts_with("cgroup")).map(|(_, p)| PathBuf::from(p)),
    );
    for dir in dirs {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale(&name).is_some() {
                names.insert(name);
            }
        }
    }
    for name in names {
        eprintln!("zt-tests: removing leftover podman state {name} (its process is gone)");
        remove_state(&env::temp_dir().join(&name), &name);
    }
}

/// An image in a [`Podman`]'s storage; removed on drop (the containers using it must be gone).
pub struct Image<'p> {
    pub podman: &'p Podman,
    pub tag: String,
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // Not forced: an image another is built on goes after it (see AgentImage).
        let out = self.podman.output(&["rmi", &self.tag]);
        if !out.status.success() {
            eprintln!("zt-tests: `podman rmi {}`: {}", self.tag, String::from_utf8_lossy(&out.stderr).trim());
        }
    }
}

/// A container started with `podman run --detach`; stopped (SIGTERM, then SIGKILL after 10 s)
/// and removed on drop, its log printed if the test is failing.
pub struct Container<'p> {
    pub podman: &'p Podman,
    pub name: String,
}

impl Container<'_> {
    /// Its stdout (here: the agent's flow events) and stderr (the agent's log) so far.
    pub fn logs(&self) -> (String, String) {
        let out = self.podman.output(&["logs", &self.name]);
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn state(&self) -> String {
        self.podman.run(&["container", "inspect", "--format", "{{.State.Status}}", &self.name]).trim().to_owned()
    }

    /// `podman exec [options] <container> command…`; the output, or a panic with the agent's log.
    pub fn exec(&self, options: &[&str], command: &[&str]) -> String {
        let out = self.podman.output(&[&["exec"][..], options, &[&self.name], command].concat());
        assert!(
            out.status.success(),
            "`podman exec {} {}` failed ({}): {}{}\nagent log:\n{}",
            self.name,
            command.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs().1
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The flow events the agent wrote (JSON lines on stdout).
    pub fn events(&self) -> Vec<Value> {
        self.logs().0.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let (stdout, stderr) = self.logs();
            eprintln!("--- container {} stdout ---\n{stdout}--- stderr ---\n{stderr}--- end ---", self.name);
        }
        let out = self.podman.output(&["rm", "--force", "--time", "10", &self.name]);
        if !out.status.success() {
            eprintln!("zt-tests: `podman rm {}`: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
    }
}


/// A root filesystem for `podman import`, made of host files, each at its host path with its
/// content (symlinks followed), plus a root user and /tmp.
pub struct Rootfs {
    pub dir: tempfile::TempDir,
}

impl Rootfs {
    pub fn minimal() -> Rootfs {
        let rootfs = Rootfs { dir: tempfile::tempdir().unwrap() };
        rootfs.write("/etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\n", 0o644);
        rootfs.write("/etc/group", "root:x:0:\n", 0o644);
        fs::create_dir_all(rootfs.dir.path().join("tmp")).unwrap();
        fs::set_permissions(rootfs.dir.path().join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        rootfs
    }

    pub fn inside(&self, path: &Path) -> PathBuf {
        self.dir.path().join(path.strip_prefix("/").expect("an absolute path"))
    }

    pub fn write(&self, path: &str, text: &str, mode: u32) {
        let at = self.inside(Path::new(path));
        fs::create_dir_all(at.parent().unwrap()).unwrap();
        fs::write(&at, text).unwrap();
        fs::set_permissions(&at, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn add_host_file(&self, path: &Path) {
        let at = self.inside(path);
        fs::create_dir_all(at.parent().unwrap()).unwrap();
        fs::copy(path, &at).unwrap_or_else(|e| panic!("copy {} into the image: {e}", path.display()));
    }

    /// The shared libraries `executable` links (ldd), and the dynamic loader.
    pub fn add_libraries_of(&self, executable: &Path) {
        for library in linked_libraries(executable) {
            self.add_host_file(&library);
        }
    }

    pub fn add_executable(&self, path: &str) {
        self.add_host_file(Path::new(path));
        self.add_libraries_of(Path::new(path));
    }
}

/// What `ldd` resolves for `executable`: `name => /path (…)` and the loader's `/path (…)`.
pub fn linked_libraries(executable: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(executable).output().expect("spawn ldd");
    assert!(out.status.success(), "ldd {}: {}", executable.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = line.split_once("=>").map_or(line, |(_, resolved)| resolved).split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A name unique to this process and call, for images and containers.
pub fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("zt-test-{what}-{}-{}", process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
