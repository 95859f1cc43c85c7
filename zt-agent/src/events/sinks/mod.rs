//! Where events go. A sink is a format — zt's JSON, OCSF Network Activity or CEF, optionally
//! inside an RFC 5424 syslog header — written to a transport: stdout, a rotating file, or syslog
//! over UDP, TCP or TLS. Each sink runs on its own, fed by its queue in the fan-out
//! ([`crate::events::fanout`]); `spec` parses the `--sink` syntax. A sink's [`Counters`] (read as
//! [`SinkStats`]) are kept here, where both the fan-out and the sink's task reach them.

pub mod cef;
pub mod file;
pub mod net;
pub mod ocsf;
pub mod spec;
pub mod syslog;
pub mod tls;

use std::{
    io::{self, Write as _},
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use spec::{SinkSpec, Transport};

use crate::events::record::{Event, Record};

/// How an event is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// zt's own JSON object, as `zt-agent run` always printed it: flows and agent events.
    Json,
    /// OCSF 1.1 Network Activity (class 4001): flows only.
    Ocsf,
    /// ArcSight CEF: flows only.
    Cef,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ocsf => "ocsf",
            Format::Cef => "cef",
        }
    }

    /// Which events the format has a form for. OCSF Network Activity and CEF describe network
    /// flows; agent events (identity bound, policy reloaded) go to JSON and syslog sinks.
    pub fn carries_fn(self) -> fn(&Record) -> bool {
        match self {
            Format::Json => |_| true,
            Format::Ocsf | Format::Cef => Record::is_flow,
        }
    }

    pub fn render(self, event: &Record) -> String {
        match self {
            Format::Json => {
                let mut line = Vec::new();
                event.write_json(&mut line);
                String::from_utf8(line).expect("JSON is UTF-8")
            }
            Format::Ocsf => ocsf::render(event).to_string(),
            Format::Cef => cef::render(event),
        }
    }
}

/// Turns one event into the bytes of one message (without the transport's framing).
#[derive(Clone, Debug)]
pub struct Renderer {
    pub format: Format,
    /// Present for syslog transports: the RFC 5424 header wrapped around the formatted event.
    pub syslog: Option<syslog::Header>,
}

impl Renderer {
    pub fn render(&self, event: &Record) -> String {
        let body = self.format.render(event);
        match &self.syslog {
            Some(header) => header.message(event, &body),
            None => body,
        }
    }

    /// Appends the message to `out`. zt's JSON without a syslog header is serialized straight
    /// into it.
    pub fn render_into(&self, event: &Record, out: &mut Vec<u8>) {
        match (self.format, &self.syslog) {
            (Format::Json, None) => event.write_json(out),
            _ => out.extend_from_slice(self.render(event).as_bytes()),
        }
    }
}

/// The event's time (the `time` field every event carries), or now if it has none.
pub fn event_time(event: &Value) -> SystemTime {
    event["time"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok()).unwrap_or_else(SystemTime::now)
}

/// Milliseconds since the epoch, as OCSF and CEF want time.
pub fn epoch_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What one consumer did with the events offered to it. Every event offered is eventually either
/// delivered or dropped (or still queued).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStats {
    /// The sink's `name=` (by default its spec up to the first option).
    pub name: String,
    /// Format and transport, e.g. `json:stdout`, `ocsf:file`, `syslog+tcp`; `flows` for the
    /// `zt-agent flows` clients (counted together).
    pub kind: String,
    /// Events written to the transport (for TCP/TLS: written to the connection).
    pub delivered: u64,
    /// Events lost: the queue was full, or the transport refused them (UDP, file errors).
    pub dropped: u64,
    /// Failed connects, writes and sends.
    pub errors: u64,
    /// Connections re-established after one was lost (TCP, TLS).
    pub reconnects: u64,
    /// Whether the connection is up (TCP, TLS); absent for the others.
    pub connected: Option<bool>,
    /// Events waiting: in the queue, or taken from it and being written.
    pub queued: u64,
}

/// The live counters behind [`SinkStats`], shared by the fan-out and the sink's task.
#[derive(Debug, Default)]
pub struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    /// 0: not a connection, 1: down, 2: up.
    connected: AtomicU8,
    /// Events the sink took from its queue and has not delivered or dropped yet.
    in_flight: AtomicU64,
}

impl Counters {
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    /// How many events the sink holds outside its queue (a batch being written).
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Ordering::Relaxed);
    }
    pub fn set_connected(&self, up: bool) {
        self.connected.store(if up { 2 } else { 1 }, Ordering::Relaxed);
    }
    pub fn dropped_so_far(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn snapshot(&self, name: &str, kind: &str, queued: u64) -> SinkStats {
        SinkStats {
            name: name.to_owned(),
            kind: kind.to_owned(),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            connected: match self.connected.load(Ordering::Relaxed) {
                0 => None,
                state => Some(state == 2),
            },
            queued: queued + self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// Starts the sink's writer; it ends when the fan-out drops the queue's sender, and then drops
/// `done`.
pub fn spawn(spec: SinkSpec, rx: mpsc::Receiver<Event>, counters: Arc<Counters>, done: oneshot::Sender<()>) -> Result<()> {
    let renderer = spec.renderer();
    let name = spec.name.clone();
    match spec.transport {
        Transport::Stdout => {
            spawn_thread(&name, move || write_lines(rx, &renderer, &counters, &mut Stdout::default(), done))?;
        }
        Transport::File(options) => {
            let mut out = file::RotatingFile::open(options)?;
            spawn_thread(&name, move || write_lines(rx, &renderer, &counters, &mut out, done))?;
        }
        Transport::Udp(target) => {
            tokio::spawn(async move {
                net::run_udp(&name, &target, rx, &renderer, &counters).await;
                drop(done);
            });
        }
        Transport::Tcp(target) => {
            tokio::spawn(async move {
                net::run_stream(&name, &net::Connector::Tcp(target), rx, &renderer, &counters).await;
                drop(done);
            });
        }
        Transport::Tls(target, options) => {
            let (tls, server_name) = tls::connector(&options)?;
            let connector = net::Connector::Tls { target, tls, server_name };
            tokio::spawn(async move {
                net::run_stream(&name, &connector, rx, &renderer, &counters).await;
                drop(done);
            });
        }
    }
    Ok(())
}

fn spawn_thread(name: &str, work: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("sink {name}"))
        .spawn(work)
        .with_context(|| format!("starting the writer of sink {name}"))?;
    Ok(())
}

/// A destination of whole lines that may block (stdout, a file). A line comes without its
/// newline; `flush` ends a batch.
pub trait LineOutput {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// Stdout, written once per batch (stdout itself would write at every newline).
#[derive(Default)]
struct Stdout {
    pending: Vec<u8>,
}

impl LineOutput for Stdout {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(line);
        self.pending.push(b'\n');
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut out = io::stdout().lock();
        let written = out.write_all(&self.pending).and_then(|()| out.flush());
        self.pending.clear();
        written
    }
}

/// Events written per flush at most.
const BATCH: usize = 256;

/// Writes each queued event as one line, flushing whenever the queue runs empty.
pub fn write_lines(
    mut rx: mpsc::Receiver<Event>,
    renderer: &Renderer,
    counters: &Counters,
    out: &mut dyn LineOutput,
    done: oneshot::Sender<()>,
) {
    let mut failing = false;
    let mut line = Vec::new();
    let mut batch = Vec::with_capacity(BATCH);
    // Taken together: one wait and one release of queue space per batch, not per event.
    while rx.blocking_recv_many(&mut batch, BATCH) > 0 {
        counters.set_in_flight(batch.len() as u64);
        let written = batch
            .iter()
            .try_for_each(|event| {
                line.clear();
                renderer.render_into(event, &mut line);
                out.write_line(&line)
            })
            .and_then(|()| out.flush());
        counters.set_in_flight(0);
        match written {
            Ok(()) => {
                counters.delivered(batch.len() as u64);
                failing = false;
            }
            Err(err) => {
                counters.error();
                counters.dropped(batch.len() as u64);
                if !failing {
                    tracing::warn!(%err, events = batch.len(), "a sink could not write its events; they are dropped");
                }
                failing = true;
            }
        }
        batch.clear();
    }
    drop(done);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Fails every write while `fail` is set.
    #[derive(Default)]
    struct Lines {
        lines: Vec<String>,
        fail: bool,
    }

    impl LineOutput for Lines {
        fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("disk full"));
            }
            self.lines.push(String::from_utf8(line.to_vec()).unwrap());
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn line_sinks_write_one_line_per_event_and_count_what_failed() {
        let renderer = Renderer { format: Format::Json, syslog: None };
        let counters = Counters::default();
        let (tx, rx) = mpsc::channel(8);
        for n in 0..3 {
            tx.try_send(Arc::new(json!({"kind": "flow", "n": n}).into())).unwrap();
        }
        drop(tx);
        let mut out = Lines::default();
        write_lines(rx, &renderer, &counters, &mut out, oneshot::channel().0);
        assert_eq!(out.lines, [r#"{"kind":"flow","n":0}"#, r#"{"kind":"flow","n":1}"#, r#"{"kind":"flow","n":2}"#]);

        let (tx, rx) = mpsc::channel(8);
        tx.try_send(Arc::new(json!({"kind": "flow"}).into())).unwrap();
        drop(tx);
        let mut failing = Lines { fail: true, ..Lines::default() };
        write_lines(rx, &renderer, &counters, &mut failing, oneshot::channel().0);
        let stats = counters.snapshot("t", "t", 0);
        assert_eq!((stats.delivered, stats.dropped, stats.errors), (3, 1, 1));
    }
}
