//! A file sink's file: appended to, and with `max-bytes` rotated by size — `PATH` becomes
//! `PATH.1`, `PATH.1` becomes `PATH.2`, and so on up to `keep` files; the oldest is removed.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::LineOutput;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    pub path: PathBuf,
    /// Rotate before a line would take the file past this size.
    pub max_bytes: Option<u64>,
    /// Rotated files kept besides the current one.
    pub keep: usize,
}

pub struct RotatingFile {
    options: FileOptions,
    file: Option<BufWriter<File>>,
    size: u64,
}

impl RotatingFile {
    /// Opens (creates) the file now, so a path that cannot be written fails at start-up.
    pub fn open(options: FileOptions) -> Result<RotatingFile> {
        if let Some(dir) = options.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {} for a file sink", dir.display()))?;
        }
        let mut file = RotatingFile { options, file: None, size: 0 };
        file.reopen().with_context(|| format!("opening {} for a file sink", file.options.path.display()))?;
        Ok(file)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new().create(true).append(true).open(&self.options.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(BufWriter::new(file));
        Ok(())
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.options.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        remove_if_present(&self.rotated(self.options.keep))?;
        for n in (1..self.options.keep).rev() {
            rename_if_present(&self.rotated(n), &self.rotated(n + 1))?;
        }
        rename_if_present(&self.options.path, &self.rotated(1))?;
        self.reopen()
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl LineOutput for RotatingFile {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.options.max_bytes.is_some_and(|max| self.size > 0 && self.size + len > max) {
            self.rotate()?;
        }
        if self.file.is_none() {
            // A failed rotation or write left no file open; try again.
            self.reopen()?;
        }
        let file = self.file.as_mut().expect("opened above");
        let written = file.write_all(line).and_then(|()| file.write_all(b"\n"));
        if written.is_err() {
            self.file = None;
        }
        written?;
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/flows.jsonl");
        let mut file = RotatingFile::open(FileOptions { path: path.clone(), max_bytes: Some(20), keep: 2 }).unwrap();
        // Each line is 10 bytes with its newline: two fit in a file.
        for n in 0..7 {
            file.write_line(&format!("event {n:03}").as_bytes()[..9]).unwrap();
        }
        file.flush().unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        let rotated = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        assert_eq!(read(&path), "event 006\n");
        assert_eq!(read(&rotated(1)), "event 004\nevent 005\n");
        assert_eq!(read(&rotated(2)), "event 002\nevent 003\n");
        assert!(!rotated(3).exists(), "only keep=2 rotated files");
    }

    #[test]
    fn appends_to_what_is_there_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, "old line\n").unwrap();
        let mut file = RotatingFile::open(FileOptions { path: path.clone(), max_bytes: Some(12), keep: 1 }).unwrap();
        file.write_line(b"new").unwrap();
        file.flush().unwrap();
        assert_eq!(fs::read_to_string(format!("{}.1", path.display())).unwrap(), "old line\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
    }

    #[test]
    fn an_unwritable_path_fails_at_start() {
        let err = RotatingFile::open(FileOptions { path: "/proc/zt-no/such".into(), max_bytes: None, keep: 1 }).err().unwrap();
        assert!(format!("{err:#}").contains("/proc/zt-no"), "{err:#}");
    }
}
