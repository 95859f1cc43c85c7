//! Reading files an operator or a workload supplies, bounded: a regular file only (a FIFO or a
//! device such as /dev/zero under the name is refused, without blocking on it), and at most one
//! byte past a size limit is ever read, so a huge or growing file costs nothing.

use std::{
    fmt,
    fs::{self, File},
    io::{self, Read},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// One policy file: real ones are a few KiB, the largest generated ones well under 1 MiB.
pub const POLICY_FILE_LIMIT: u64 = 4 << 20;
/// All the files of one policy set together (a directory of many large files).
pub const POLICY_SET_LIMIT: u64 = 64 << 20;
/// A `policy test` cases file: a few lines per case, so thousands of cases fit.
pub const CASES_FILE_LIMIT: u64 = 4 << 20;
/// `policy suggest --from` events (a file or stdin): JSON lines of a long monitor run.
pub const EVENTS_FILE_LIMIT: u64 = 1 << 30;
/// An SVID chain, a trust bundle or a syslog `ca=` file: a few KiB each; the system's whole CA
/// bundle is about 200 KiB.
pub const CERTIFICATE_FILE_LIMIT: u64 = 1 << 20;
/// A `bind.yaml`: a few addresses and a cgroup path (64 KiB is a thousand addresses).
pub const BIND_FILE_LIMIT: u64 = 64 << 10;

#[derive(Debug)]
pub enum ReadError {
    NotFound,
    /// `size` is what the file's metadata said; none when it grew past the limit while read,
    /// or for standard input.
    TooLarge { size: Option<u64>, limit: u64 },
    /// What it is instead: "a FIFO", "a directory", …
    NotRegular(&'static str),
    NotText,
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotFound => f.write_str("no such file"),
            ReadError::TooLarge { size: Some(size), limit } => {
                let (size_text, limit_text) = (human(*size), human(*limit));
                // Rounded alike (just past the limit), exact bytes say which is larger.
                if size_text == limit_text {
                    write!(f, "it is {size} bytes; the limit is {limit} bytes")
                } else {
                    write!(f, "it is {size_text}; the limit is {limit_text}")
                }
            }
            ReadError::TooLarge { size: None, limit } => write!(f, "it is over the limit of {}", human(*limit)),
            ReadError::NotRegular(kind) => write!(f, "not a regular file ({kind})"),
            ReadError::NotText => f.write_str("not UTF-8 text"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// `5.2 MiB`, `64 KiB`, `17 bytes`.
fn human(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift {
            let value = format!("{:.1}", bytes as f64 / (1u64 << shift) as f64);
            return format!("{} {unit}", value.trim_end_matches(".0"));
        }
    }
    format!("{bytes} bytes")
}

fn kind_of(file_type: fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "of an unknown kind"
    }
}

/// The bytes of the regular file at `path` (symlinks followed), at most `limit` of them.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    // O_NONBLOCK: opening a FIFO never waits for a writer; O_NOCTTY: a terminal device under the
    // name does not become the agent's controlling terminal.
    let file = match File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::NotFound),
        // A Unix socket cannot be opened at all (ENXIO); say what it is.
        Err(e) => match fs::metadata(path) {
            Ok(meta) if !meta.is_file() => return Err(ReadError::NotRegular(kind_of(meta.file_type()))),
            _ => return Err(ReadError::Io(e)),
        },
    };
    // Checked on the opened file, so a name swapped after a check cannot slip another in.
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind_of(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge { size: Some(meta.len()), limit });
    }
    read_limited(file, limit)
}

/// [`read`], as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read(path, limit)?).map_err(|_| ReadError::NotText)
}

/// At most `limit` bytes of standard input, as UTF-8 text.
pub fn read_stdin(limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read_limited(io::stdin(), limit)?).map_err(|_| ReadError::NotText)
}

/// Reads to the end, but never more than one byte past `limit` (a file may grow while read).
fn read_limited(from: impl Read, limit: u64) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::new();
    from.take(limit + 1).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { size: None, limit });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_zero_is_refused_as_not_a_regular_file() {
        // The reported bug: `zt-agent policy check /dev/zero` read until memory ran out.
        let err = read(Path::new("/dev/zero"), POLICY_FILE_LIMIT).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file (a character device)");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), 16).unwrap_err().to_string(), "not a regular file (a directory)");
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(read(&socket, 16).unwrap_err().to_string(), "not a regular file (a socket)");
        assert!(matches!(read(&dir.path().join("missing"), 16), Err(ReadError::NotFound)));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("policy.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // No writer ever opens it: a blocking open would hang here, so do it on a thread.
        let (done, result) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || done.send(read(&path, 16).map_err(|e| e.to_string())).unwrap());
        let result = result.recv_timeout(std::time::Duration::from_secs(5)).expect("reading a FIFO blocked");
        assert_eq!(result.unwrap_err(), "not a regular file (a FIFO)");
        // Through a symlink too: the link is followed, and what it points at is judged.
        std::os::unix::fs::symlink(&fifo, dir.path().join("link.yaml")).unwrap();
        assert!(matches!(read(&dir.path().join("link.yaml"), 16), Err(ReadError::NotRegular("a FIFO"))));
    }

    #[test]
    fn a_file_at_the_limit_is_read_and_a_larger_one_is_refused_with_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [b'x'; 16]).unwrap();
        assert_eq!(read(&path, 16).unwrap().len(), 16);
        assert_eq!(read_text(&path, 16).unwrap(), "x".repeat(16));
        assert_eq!(read(&path, 15).unwrap_err().to_string(), "it is 16 bytes; the limit is 15 bytes");
        // Sparse, so the test writes nothing: 5.2 MiB against the policy file limit.
        let big = File::create(&path).unwrap();
        big.set_len(5_452_595).unwrap();
        assert_eq!(read(&path, POLICY_FILE_LIMIT).unwrap_err().to_string(), "it is 5.2 MiB; the limit is 4 MiB");
        big.set_len(POLICY_FILE_LIMIT + 1).unwrap();
        assert_eq!(
            read(&path, POLICY_FILE_LIMIT).unwrap_err().to_string(),
            "it is 4194305 bytes; the limit is 4194304 bytes"
        );
        big.set_len(POLICY_FILE_LIMIT).unwrap();
        assert_eq!(read(&path, POLICY_FILE_LIMIT).unwrap().len() as u64, POLICY_FILE_LIMIT);
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&path, 16), Err(ReadError::NotText)));
    }

    #[test]
    fn no_more_than_one_byte_past_the_limit_is_read() {
        // What a file that grows between fstat and read (or stdin) is held to.
        let endless = io::repeat(b'x');
        assert!(matches!(read_limited(endless, 1 << 20), Err(ReadError::TooLarge { size: None, limit: 1048576 })));
        assert_eq!(read_limited(&b"abc"[..], 3).unwrap(), b"abc");
        let err = read_limited(&b"abcd"[..], 3).unwrap_err();
        assert_eq!(err.to_string(), "it is over the limit of 3 bytes");
    }

    #[test]
    fn sizes_are_written_for_people() {
        assert_eq!(human(17), "17 bytes");
        assert_eq!(human(64 << 10), "64 KiB");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human((64 << 10) + 1), "64 KiB", "rounded: the caller adds exact bytes");
    }
}
