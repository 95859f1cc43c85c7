//! Reading files an operator or a workload supplies, bounded: a regular file only (a FIFO or a
//! device such as /dev/zero under the name is refused, without blocking on it), and at most one
//! byte past a size limit is ever read, so a huge or growing file costs nothing.

use std::{
    fmt,
    fs::File,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Policy files and `policy test` cases: far above any real policy, far below memory.
pub const POLICY_FILE_LIMIT: u64 = 4 << 20;
/// A `policy suggest --from` events file (JSON lines from a monitor run).
pub const EVENTS_FILE_LIMIT: u64 = 1 << 30;

#[derive(Debug)]
pub enum ReadError {
    NotFound,
    TooLarge { limit: u64 },
    NotRegular,
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotFound => f.write_str("no such file"),
            ReadError::TooLarge { limit } => write!(f, "larger than {limit} bytes"),
            ReadError::NotRegular => f.write_str("not a regular file (a FIFO, device, socket or directory)"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// The bytes of the regular file at `path` (symlinks followed), at most `limit` of them.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let io_error = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => ReadError::NotFound,
        _ => ReadError::Io(e),
    };
    let file =
        File::options().read(true).custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits()).open(path).map_err(io_error)?;
    // Checked on the opened file, so a name swapped after a check cannot slip another in.
    if !file.metadata().map_err(io_error)?.is_file() {
        return Err(ReadError::NotRegular);
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io_error)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read(path, limit)?)
        .map_err(|_| ReadError::Io(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")))
}

/// At most `limit` bytes of standard input, as UTF-8 text.
pub fn read_stdin(limit: u64) -> Result<String, ReadError> {
    let mut bytes = Vec::new();
    io::stdin().take(limit + 1).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|_| ReadError::Io(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_fifos_are_refused_without_blocking() {
        assert!(matches!(read(Path::new("/dev/zero"), 16), Err(ReadError::NotRegular)));
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(read(&fifo, 16), Err(ReadError::NotRegular)));
        assert!(matches!(read(dir.path(), 16), Err(ReadError::NotRegular)));
    }

    #[test]
    fn a_file_at_the_limit_is_read_and_one_byte_more_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [b'x'; 16]).unwrap();
        assert_eq!(read(&path, 16).unwrap().len(), 16);
        let err = read(&path, 15).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { limit: 15 }));
        assert_eq!(err.to_string(), "larger than 15 bytes");
        assert!(matches!(read(&dir.path().join("missing"), 16), Err(ReadError::NotFound)));
    }
}
