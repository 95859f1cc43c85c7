//! The cgroup source: processes are identified by the cgroup v2 directory they run in.
//!
//! The agent walks the cgroups below each attach point and maps the id (the directory's inode)
//! of every cgroup a selector matches — or whose nearest ancestor one matches — to that
//! identity. Rescans pick up cgroups created or removed later.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::policy::compile::CgroupMatcher;

/// Where the cgroup v2 hierarchy is mounted (on hybrid layouts it is not /sys/fs/cgroup).
pub fn v2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    v2_mount_in(&mountinfo).context("no cgroup2 file system is mounted; cgroup identities need cgroup v2")
}

/// Finds the first cgroup2 mount point in a mountinfo table.
fn v2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split_whitespace().nth(4)?;
        (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Resolves a `--cgroup` argument: a path relative to the v2 root, or an absolute path inside it.
pub fn resolve(root: &Path, arg: &Path) -> Result<PathBuf> {
    let dir = if arg.is_absolute() { arg.to_owned() } else { root.join(arg) };
    let dir = dir.canonicalize().with_context(|| format!("cgroup {} does not exist", dir.display()))?;
    if !dir.starts_with(root) {
        bail!("{} is not inside the cgroup v2 hierarchy at {}", dir.display(), root.display());
    }
    Ok(dir)
}

/// The cgroups below the attach points.
pub struct CgroupSource {
    root: PathBuf,
    scopes: Vec<PathBuf>,
    /// Every cgroup seen by scans so far: id → path relative to the root (kept after removal, so
    /// late events still name it).
    paths: BTreeMap<u64, String>,
}

impl CgroupSource {
    pub fn new(root: PathBuf, scopes: Vec<PathBuf>) -> Self {
        Self { root, scopes, paths: BTreeMap::new() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of a cgroup seen by a scan, for events.
    pub fn path_of(&self, cgroup_id: u64) -> Option<&str> {
        self.paths.get(&cgroup_id).map(String::as_str)
    }

    /// Walks the attach points: cgroup id → identity for every cgroup a selector claims.
    pub fn scan(&mut self, matcher: &CgroupMatcher) -> BTreeMap<u64, u32> {
        let mut paths = BTreeMap::new();
        for scope in &self.scopes {
            walk(&self.root, scope, &mut paths);
        }
        let wanted = paths.iter().filter_map(|(id, path)| Some((*id, matcher.identity_of(path)?))).collect();
        self.paths.extend(paths);
        wanted
    }

    /// The id of the cgroup at `relative` (to the root), if it exists.
    pub fn id_of(&mut self, relative: &str) -> Option<u64> {
        let id = fs::metadata(self.root.join(relative)).ok()?.ino();
        self.paths.insert(id, relative.to_owned());
        Some(id)
    }
}

/// Adds `dir` and every cgroup below it to `out` as id → path relative to `root`. A cgroup
/// removed while the walk runs is simply not there.
fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<u64, String>) {
    let Ok(meta) = fs::metadata(dir) else { return };
    let relative = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy().into_owned();
    out.insert(meta.ino(), relative);
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_in_a_hybrid_layout() {
        let mountinfo = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,name=systemd";
        assert_eq!(v2_mount_in(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(v2_mount_in("30 23 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro"), None);
    }
}
