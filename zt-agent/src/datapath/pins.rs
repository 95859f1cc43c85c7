//! zt's bpffs directory: where every map, program and link the agent creates is pinned, so
//! that enforcement outlives the agent (a stop, a crash, kill -9, an upgrade) and the next agent
//! adopts it. One agent at a time holds it, by an exclusive `flock` on the directory, which the
//! kernel releases when the holder dies, however it dies.
//!
//! ```text
//! <--bpffs-dir>/              (default /sys/fs/bpf/zt), flock-ed by the running agent
//!   v1/                       layout version: what this agent writes and reads
//!     maps/ZT_…               every map, by name
//!     maps-next/ZT_…          maps being migrated: a definition changed, filled beside the old
//!     programs/zt_…           the programs the links run
//!     programs-next/zt_…      programs being pinned in place of those
//!     links/<hook>@<target>   one link per attachment: tc-ingress@veth1, xdp@eth0,
//!                             cgroup-egress@<cgroup inode>
//! ```
//!
//! bpffs refuses names with a dot, so a dot in an interface name is written as `:`, which no
//! interface name can contain.

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::sys;

pub const DEFAULT_DIR: &str = "/sys/fs/bpf/zt";
/// The layout this agent writes. A layout it does not know (a newer zt's) is never touched.
pub const LAYOUT: &str = "v1";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    layout: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl PinDir {
    /// Creates (if needed) and locks `root`. Fails if it is not on bpffs, if another agent holds
    /// it, or if it holds a layout this agent does not know.
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| {
            format!("creating {} (is bpffs mounted? `mount -t bpf bpf /sys/fs/bpf`)", root.display())
        })?;
        let fs = nix::sys::statfs::statfs(root).with_context(|| format!("statfs {}", root.display()))?;
        if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            bail!(
                "--bpffs-dir {} is not on a BPF filesystem: pins there would not outlive the agent; \
                 mount one with `mount -t bpf bpf /sys/fs/bpf` or point --bpffs-dir into one",
                root.display()
            );
        }
        let dir = File::open(root).with_context(|| format!("opening {}", root.display()))?;
        let lock = match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                bail!(
                    "another zt-agent holds {} (the directory is locked): stop it first, or give this one \
                     another --bpffs-dir",
                    root.display()
                )
            }
            Err((_, errno)) => return Err(errno).with_context(|| format!("locking {}", root.display())),
        };
        for entry in std::fs::read_dir(root)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if name != LAYOUT {
                bail!(
                    "{} holds `{name}`, which this zt-agent (layout {LAYOUT}) does not know: it may be a \
                     newer zt's state. Run that version's `zt-agent detach`, or use another --bpffs-dir",
                    root.display()
                );
            }
        }
        let dir = Self { layout: root.join(LAYOUT), root: root.to_owned(), _lock: lock };
        for sub in [dir.maps(), dir.maps_next(), dir.programs(), dir.programs_next(), dir.links()] {
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn maps(&self) -> PathBuf {
        self.layout.join("maps")
    }
    pub fn maps_next(&self) -> PathBuf {
        self.layout.join("maps-next")
    }
    pub fn programs(&self) -> PathBuf {
        self.layout.join("programs")
    }
    pub fn programs_next(&self) -> PathBuf {
        self.layout.join("programs-next")
    }
    pub fn links(&self) -> PathBuf {
        self.layout.join("links")
    }
    pub fn link(&self, hook: &str, target: &str) -> PathBuf {
        self.links().join(format!("{hook}@{}", target.replace('.', ":")))
    }

    /// Whether an earlier agent left state here to adopt.
    pub fn holds_state(&self) -> bool {
        self.maps().join(zt_common::maps::CONFIG).exists()
    }

    /// The links pinned here, with what they are attached to and run.
    /// The pinned program (current or next) whose kernel id is `id`. Found by its pin, not by
    /// id: opening a program by id needs CAP_SYS_ADMIN, which the agent does without.
    pub fn pinned_program(&self, id: u32) -> Result<Option<aya::programs::ProgramInfo>> {
        for pin in entries(&self.programs())?.into_iter().chain(entries(&self.programs_next())?) {
            let info = aya::programs::ProgramInfo::from_pin(&pin)
                .with_context(|| format!("reading pinned program {}", pin.display()))?;
            if info.id() == id {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    pub fn pinned_links(&self) -> Result<Vec<(PathBuf, sys::LinkInfo)>> {
        let mut links = Vec::new();
        for path in entries(&self.links())? {
            let link = sys::obj_get(&path).with_context(|| format!("opening pinned link {}", path.display()))?;
            links.push((path, sys::link_info(link.as_fd())?));
        }
        Ok(links)
    }
}

/// The files in `dir`, sorted; none if it does not exist.
pub fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.map(|e| e.path())).collect::<io::Result<Vec<_>>>()?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    paths.sort();
    Ok(paths)
}

/// What `zt-agent detach` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    pub links: Vec<RemovedLink>,
    pub programs: Vec<RemovedObject>,
    pub maps: Vec<RemovedObject>,
}

#[derive(Debug, Serialize)]
pub struct RemovedLink {
    pub pin: PathBuf,
    pub id: u32,
    pub program_id: u32,
}

#[derive(Debug, Serialize)]
pub struct RemovedObject {
    pub pin: PathBuf,
    pub id: u32,
}

/// Removes everything zt pinned under `root`: links first (which detaches their programs from
/// interfaces and cgroups), then programs and maps, then the directories. Refuses while an agent
/// holds the directory.
pub fn detach(root: &Path) -> Result<Removed> {
    if !root.exists() {
        return Ok(Removed::default());
    }
    let dir = PinDir::open(root)?;
    let mut removed = Removed::default();
    for (pin, info) in dir.pinned_links()? {
        remove(&pin)?;
        removed.links.push(RemovedLink { pin, id: info.id, program_id: info.program_id });
    }
    for pin in entries(&dir.programs())?.into_iter().chain(entries(&dir.programs_next())?) {
        let id = aya::programs::ProgramInfo::from_pin(&pin)
            .with_context(|| format!("reading pinned program {}", pin.display()))?
            .id();
        remove(&pin)?;
        removed.programs.push(RemovedObject { pin, id });
    }
    for pin in entries(&dir.maps())?.into_iter().chain(entries(&dir.maps_next())?) {
        let id = aya::maps::MapInfo::from_pin(&pin)
            .with_context(|| format!("reading pinned map {}", pin.display()))?
            .id();
        remove(&pin)?;
        removed.maps.push(RemovedObject { pin, id });
    }
    for sub in [
        dir.maps(),
        dir.maps_next(),
        dir.programs(),
        dir.programs_next(),
        dir.links(),
        dir.layout.clone(),
        dir.root.clone(),
    ] {
        std::fs::remove_dir(&sub).with_context(|| format!("removing {}", sub.display()))?;
    }
    Ok(removed)
}

fn remove(pin: &Path) -> Result<()> {
    std::fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))
}
