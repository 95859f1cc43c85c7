//! A real rsyslog receiving the agent's syslog sinks. It runs in the foreground inside a test
//! namespace (usually the agent's node, so its 127.0.0.1 is the agent's), with its own
//! configuration, work directory and output files in a temp dir; it never touches a system
//! rsyslog. Each input writes what it receives to `<input>.log`, one message per line as rsyslog
//! parsed it ([`Received`]). Stopped on drop (and, like the agent, when the thread that started
//! it exits).

use std::{
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sched::{setns, CloneFlags},
    sys::{
        prctl,
        signal::{kill, Signal},
    },
    unistd::Pid,
};
use tempfile::TempDir;

use crate::netns::Netns;

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The certificate and key the TLS input presents, and the CA it is anonymous towards clients
/// with (rsyslog wants one configured).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which inputs to listen on (127.0.0.1 of the namespace).
#[derive(Clone, Debug, Default)]
pub struct RsyslogInputs {
    pub udp: Option<u16>,
    pub tcp: Option<u16>,
    pub tls: Option<(u16, TlsFiles)>,
}

/// One message as rsyslog parsed it (RFC 5424 fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub pri: u32,
    pub version: String,
    pub timestamp: String,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub msgid: String,
    pub structured_data: String,
    pub msg: String,
    /// The message as it came off the wire (without TCP framing).
    pub raw: String,
}

pub struct Rsyslog {
    ns: PathBuf,
    inputs: RsyslogInputs,
    dir: TempDir,
    child: Option<Child>,
}

impl Rsyslog {
    /// Starts rsyslogd in `ns` and waits until every input listens.
    pub fn start(ns: &Netns, inputs: RsyslogInputs) -> Result<Rsyslog> {
        crate::ensure_root()?;
        if !Path::new(RSYSLOGD).exists() {
            bail!("{RSYSLOGD} is missing: `cargo xtask setup` installs rsyslog and rsyslog-openssl");
        }
        let dir = tempfile::Builder::new().prefix("zt-rsyslog-").tempdir()?;
        fs::write(dir.path().join("rsyslog.conf"), config(dir.path(), &inputs))?;
        let mut rsyslog = Rsyslog { ns: ns.path(), inputs, dir, child: None };
        rsyslog.run()?;
        Ok(rsyslog)
    }

    fn run(&mut self) -> Result<()> {
        let dir = self.dir.path();
        let netns = fs::File::open(&self.ns).with_context(|| format!("open {}", self.ns.display()))?;
        let log = fs::OpenOptions::new().create(true).append(true).open(dir.join("rsyslogd.stderr"))?;
        let mut command = Command::new(RSYSLOGD);
        command
            .arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: the closure runs between fork and exec and only makes two syscalls.
        unsafe {
            command.pre_exec(move || {
                setns(&netns, CloneFlags::CLONE_NEWNET)?;
                prctl::set_pdeathsig(Signal::SIGTERM)?;
                Ok(())
            });
        }
        self.child = Some(command.spawn().context("starting rsyslogd")?);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("rsyslogd exited ({status}) at start:\n{}", self.diagnostics());
            }
            if self.listening()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("rsyslogd does not listen after {READY_TIMEOUT:?}:\n{}", self.diagnostics());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether every input's port is bound in the namespace (read from its /proc/net tables).
    fn listening(&self) -> Result<bool> {
        let netns = fs::File::open(&self.ns)?;
        let tables = thread::scope(|scope| {
            scope
                .spawn(move || -> std::io::Result<(String, String)> {
                    setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                    Ok((fs::read_to_string("/proc/thread-self/net/udp")?, fs::read_to_string("/proc/thread-self/net/tcp")?))
                })
                .join()
                .expect("the /proc reader does not panic")
        })?;
        // Local address column `0100007F:PORT`; TCP listeners are in state 0A.
        let bound = |table: &str, port: u16, state: Option<&str>| {
            table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(1).is_some_and(|local| local.ends_with(&format!(":{port:04X}")))
                    && state.is_none_or(|s| fields.get(3) == Some(&s))
            })
        };
        let (udp, tcp) = tables;
        Ok(self.inputs.udp.is_none_or(|port| bound(&udp, port, None))
            && self.inputs.tcp.is_none_or(|port| bound(&tcp, port, Some("0A")))
            && self.inputs.tls.as_ref().is_none_or(|(port, _)| bound(&tcp, *port, Some("0A"))))
    }

    /// Stops rsyslogd (SIGTERM, then SIGKILL after 5 s); it closes its connections on the way.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again with the same configuration, ports and files.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.run()
    }

    /// What the `input` ("udp", "tcp" or "tls") received so far, in order.
    pub fn received(&self, input: &str) -> Vec<Received> {
        let text = fs::read_to_string(self.dir.path().join(format!("{input}.log"))).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.splitn(10, '\t').collect();
                (f.len() == 10).then(|| Received {
                    pri: f[0].parse().unwrap_or(u32::MAX),
                    version: f[1].into(),
                    timestamp: f[2].into(),
                    hostname: f[3].into(),
                    app_name: f[4].into(),
                    procid: f[5].into(),
                    msgid: f[6].into(),
                    structured_data: f[7].into(),
                    msg: f[8].into(),
                    raw: f[9].into(),
                })
            })
            .collect()
    }

    /// rsyslogd's own output, for failure messages.
    pub fn diagnostics(&self) -> String {
        fs::read_to_string(self.dir.path().join("rsyslogd.stderr")).unwrap_or_default()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("--- rsyslogd output ---\n{}--- end of rsyslogd output ---", self.diagnostics());
        }
    }
}

/// One ruleset per input, each writing its messages' RFC 5424 fields and then the raw message,
/// tab-separated, to `<input>.log` (the JSON in MSG holds no tab).
fn config(dir: &Path, inputs: &RsyslogInputs) -> String {
    let d = dir.display();
    let mut conf = format!(
        "global(workDirectory=\"{d}\" maxMessageSize=\"64k\")\n\
         template(name=\"fields\" type=\"string\" string=\"%pri%\\t%protocol-version%\\t%timereported:::date-rfc3339%\\t%hostname%\\t%app-name%\\t%procid%\\t%msgid%\\t%structured-data%\\t%msg%\\t%rawmsg%\\n\")\n"
    );
    if let Some((_, tls)) = &inputs.tls {
        let _ = writeln!(
            conf,
            "global(DefaultNetstreamDriver=\"ossl\" DefaultNetstreamDriverCAFile=\"{}\" \
             DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\")",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        );
    }
    if inputs.udp.is_some() {
        conf.push_str("module(load=\"imudp\")\n");
    }
    if inputs.tcp.is_some() || inputs.tls.is_some() {
        conf.push_str("module(load=\"imtcp\")\n");
    }
    let mut ruleset = |name: &str, input: String| {
        let _ = writeln!(
            conf,
            "ruleset(name=\"{name}\") {{ action(type=\"omfile\" file=\"{d}/{name}.log\" template=\"fields\") }}\n{input}"
        );
    };
    if let Some(port) = inputs.udp {
        ruleset("udp", format!("input(type=\"imudp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"udp\")"));
    }
    if let Some(port) = inputs.tcp {
        ruleset(
            "tcp",
            format!("input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"tcp\" streamDriver.name=\"ptcp\")"),
        );
    }
    if let Some((port, _)) = &inputs.tls {
        ruleset(
            "tls",
            format!(
                "input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"tls\" \
                 streamDriver.name=\"ossl\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")"
            ),
        );
    }
    conf
}
