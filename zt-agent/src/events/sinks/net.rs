//! Syslog transports. UDP sends one message per datagram and cannot know what arrives: a send
//! that fails is counted dropped. TCP and TLS frame messages by octet counting and reconnect
//! with backoff when the receiver goes away; meanwhile events wait in the sink's queue (what
//! does not fit is dropped by the fan-out and counted), and are written once it is back. A
//! batch whose write failed is written again after the reconnect, so delivery is at least once.

use std::{io, time::Duration};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{lookup_host, TcpStream, UdpSocket},
    sync::mpsc,
};
use tokio_rustls::TlsConnector;

use super::{spec::Target, syslog::octet_counted, Counters, Renderer};
use crate::events::record::Event;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Events written per write call at most.
const BATCH: usize = 64;

pub enum Connector {
    Tcp(Target),
    Tls { target: Target, tls: TlsConnector, server_name: ServerName<'static> },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Connector {
    fn target(&self) -> &Target {
        match self {
            Connector::Tcp(target) | Connector::Tls { target, .. } => target,
        }
    }

    async fn connect(&self) -> io::Result<Box<dyn Stream>> {
        let target = self.target();
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        match self {
            Connector::Tcp(_) => Ok(Box::new(tcp)),
            Connector::Tls { tls, server_name, .. } => Ok(Box::new(tls.connect(server_name.clone(), tcp).await?)),
        }
    }
}

/// Writes queued events over TCP or TLS until the queue closes.
pub async fn run_stream(name: &str, connector: &Connector, mut rx: mpsc::Receiver<Event>, renderer: &Renderer, counters: &Counters) {
    let target = connector.target();
    // A batch taken from the queue and not yet written, with its number of events.
    let mut pending: (Vec<u8>, u64) = (Vec::new(), 0);
    let mut backoff = BACKOFF_FIRST;
    let mut connected_before = false;
    loop {
        counters.set_connected(false);
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect()).await {
            Ok(Ok(stream)) => stream,
            failed => {
                counters.error();
                if backoff == BACKOFF_FIRST {
                    let err = failed.map_or_else(|_| "timed out".to_owned(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                    tracing::warn!(sink = name, %target, %err, "cannot connect to the syslog receiver; retrying");
                }
                if rx.is_closed() && rx.is_empty() && pending.1 == 0 {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if connected_before {
            counters.reconnected();
        }
        connected_before = true;
        backoff = BACKOFF_FIRST;
        counters.set_connected(true);
        tracing::info!(sink = name, %target, "connected to the syslog receiver");
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut scratch = [0u8; 512];
        loop {
            if pending.1 == 0 {
                // Receivers send nothing: the read ends only when the connection does, which
                // is noticed here before events are written into a dead connection.
                tokio::select! {
                    biased;
                    read = reader.read(&mut scratch) => match read {
                        Ok(n) if n > 0 => continue,
                        _ => {
                            tracing::warn!(sink = name, %target, "the syslog receiver closed the connection; reconnecting");
                            break;
                        }
                    },
                    event = rx.recv() => match event {
                        Some(event) => {
                            pending = take_batch(event, &mut rx, renderer);
                            counters.set_in_flight(pending.1);
                        }
                        None => {
                            let _ = writer.shutdown().await;
                            return;
                        }
                    },
                }
            }
            match write_all(&mut writer, &pending.0).await {
                Ok(()) => {
                    counters.set_in_flight(0);
                    counters.delivered(pending.1);
                    pending = (Vec::new(), 0);
                }
                Err(err) => {
                    counters.error();
                    tracing::warn!(sink = name, %target, %err, "writing to the syslog receiver failed; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn write_all(writer: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// `first` and whatever else is queued, up to [`BATCH`], framed by octet counting.
fn take_batch(first: Event, rx: &mut mpsc::Receiver<Event>, renderer: &Renderer) -> (Vec<u8>, u64) {
    let mut bytes = octet_counted(&renderer.render(&first));
    let mut count = 1;
    while count < BATCH as u64 {
        let Ok(event) = rx.try_recv() else { break };
        bytes.extend(octet_counted(&renderer.render(&event)));
        count += 1;
    }
    (bytes, count)
}

/// Sends each queued event as one datagram until the queue closes.
pub async fn run_udp(name: &str, target: &Target, mut rx: mpsc::Receiver<Event>, renderer: &Renderer, counters: &Counters) {
    let mut socket: Option<UdpSocket> = None;
    let mut failing = false;
    while let Some(event) = rx.recv().await {
        if socket.is_none() {
            socket = match udp_socket(target).await {
                Ok(socket) => Some(socket),
                Err(err) => {
                    counters.error();
                    counters.dropped(1);
                    if !failing {
                        tracing::warn!(sink = name, %target, %err, "cannot reach the syslog receiver; its events are dropped");
                    }
                    failing = true;
                    continue;
                }
            };
        }
        let message = renderer.render(&event);
        counters.set_in_flight(1);
        let sent = socket.as_ref().expect("set above").send(message.as_bytes()).await;
        counters.set_in_flight(0);
        match sent {
            Ok(_) => {
                counters.delivered(1);
                failing = false;
            }
            Err(err) => {
                // e.g. the port-unreachable of an earlier datagram; resolve again next time.
                counters.error();
                counters.dropped(1);
                if !failing {
                    tracing::warn!(sink = name, %target, %err, "sending to the syslog receiver failed; the event is dropped");
                }
                failing = true;
                socket = None;
            }
        }
    }
}

async fn udp_socket(target: &Target) -> io::Result<UdpSocket> {
    let address = lookup_host((target.host.as_str(), target.port))
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host name resolves to no address"))?;
    let local = if address.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(address).await?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};
    use tokio::{
        io::AsyncBufReadExt as _,
        net::TcpListener,
    };

    use super::*;
    use crate::events::sinks::{syslog::Header, Format};

    fn renderer() -> Renderer {
        Renderer { format: Format::Json, syslog: Some(Header::new(16)) }
    }

    fn event(n: u64) -> Event {
        Arc::new(json!({"kind": "flow", "time": "2026-11-26T23:50:01Z", "node": "n", "verdict": "deny", "n": n}).into())
    }

    /// Reads octet-counted frames until `count` have arrived.
    async fn read_frames(stream: impl AsyncRead + Unpin, count: usize) -> Vec<Value> {
        let mut reader = tokio::io::BufReader::new(stream);
        let mut frames = Vec::new();
        while frames.len() < count {
            let mut len = Vec::new();
            reader.read_until(b' ', &mut len).await.unwrap();
            let len: usize = std::str::from_utf8(&len[..len.len() - 1]).unwrap().parse().unwrap();
            let mut message = vec![0; len];
            reader.read_exact(&mut message).await.unwrap();
            let message = String::from_utf8(message).unwrap();
            let json = &message[message.find("] ").unwrap() + 2..];
            frames.push(serde_json::from_str(json).unwrap());
        }
        frames
    }

    async fn wait_until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn tcp_frames_by_octet_counting_and_reconnects_after_the_receiver_restarts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        let counters = Arc::new(Counters::default());
        let connector = Connector::Tcp(Target { host: "127.0.0.1".into(), port });
        let task = tokio::spawn({
            let counters = counters.clone();
            async move { run_stream("t", &connector, rx, &renderer(), &counters).await }
        });
        let (first, _) = listener.accept().await.unwrap();
        tx.send(event(1)).await.unwrap();
        tx.send(event(2)).await.unwrap();
        let (read, _write) = first.into_split();
        let frames = read_frames(read, 2).await;
        assert_eq!(frames.iter().map(|f| f["n"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);

        // The receiver goes away: the sink notices before writing anything more.
        drop(listener);
        drop(_write);
        wait_until("the sink sees the connection down", || counters.snapshot("t", "t", 0).connected == Some(false)).await;
        for n in 3..6 {
            tx.send(event(n)).await.unwrap();
        }
        // It comes back on the same port: what waited is delivered.
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (second, _) = listener.accept().await.unwrap();
        let frames = read_frames(second, 3).await;
        assert_eq!(frames.iter().map(|f| f["n"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 4, 5]);
        drop(tx);
        task.await.unwrap();
        let stats = counters.snapshot("t", "t", 0);
        assert_eq!((stats.delivered, stats.reconnects, stats.dropped), (5, 1, 0), "{stats:?}");
        assert!(stats.errors >= 1, "the refused connects count as errors: {stats:?}");
    }

    #[tokio::test]
    async fn udp_sends_one_message_per_datagram() {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = receiver.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        let counters = Counters::default();
        tx.send(event(7)).await.unwrap();
        drop(tx);
        run_udp("u", &Target { host: "127.0.0.1".into(), port }, rx, &renderer(), &counters).await;
        let mut datagram = vec![0; 4096];
        let len = receiver.recv(&mut datagram).await.unwrap();
        let message = std::str::from_utf8(&datagram[..len]).unwrap();
        assert!(message.starts_with("<132>1 2026-11-26T23:50:01.000000Z n zt-agent "), "{message}");
        assert!(message.ends_with(r#"] {"kind":"flow","time":"2026-11-26T23:50:01Z","node":"n","verdict":"deny","n":7}"#), "{message}");
        assert_eq!(counters.snapshot("u", "u", 0).delivered, 1);
    }
}
