//! Real traffic between namespaces. Every client call has a deadline and returns an error (or
//! `false`) instead of hanging; servers stop when dropped.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::Netns;

/// How often server threads look at their stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const PROBE: &[u8] = b"zt-testbed-probe";

/// An echo server running on a background thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server in `ns` that echoes what each connection sends.
pub fn tcp_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    let listener = ns.run(|| TcpListener::bind(addr)).with_context(|| format!("bind tcp {addr} in {ns}"))?;
    // Non-blocking accept so the thread notices the stop flag.
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = thread::spawn({
        let stop = stop.clone();
        move || {
            let mut connections = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let stop = stop.clone();
                        connections.retain(|connection: &JoinHandle<()>| !connection.is_finished());
                        connections.push(thread::spawn(move || echo_tcp(stream, &stop)));
                    }
                    Err(_) => thread::sleep(POLL_INTERVAL),
                }
            }
            for connection in connections {
                let _ = connection.join();
            }
        }
    });
    Ok(Server { addr, stop, thread: Some(thread) })
}

fn echo_tcp(mut stream: TcpStream, stop: &AtomicBool) {
    if stream.set_nonblocking(false).and_then(|()| stream.set_read_timeout(Some(POLL_INTERVAL))).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Connects from `ns` to `addr`, sends a probe and reads the echo back, all within `timeout`:
/// success proves both directions of the flow, not just the handshake.
pub fn tcp_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<()> {
    ns.run(|| tcp_echo_roundtrip(addr, timeout)).with_context(|| format!("tcp {addr} from {ns} (timeout {timeout:?})"))
}

/// [`tcp_connect`] from the calling thread's namespace (also used by the `zt-probe` binary).
pub fn tcp_echo_roundtrip(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(PROBE).context("send the probe")?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let mut echo = [0u8; PROBE.len()];
    stream.read_exact(&mut echo).context("wait for the echo")?;
    ensure!(echo == PROBE, "echo differs from what was sent");
    Ok(())
}

/// A UDP server in `ns` that sends every datagram back to its sender.
pub fn udp_echo_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    let socket = ns.run(|| UdpSocket::bind(addr)).with_context(|| format!("bind udp {addr} in {ns}"))?;
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    let addr = socket.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = thread::spawn({
        let stop = stop.clone();
        move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        }
    });
    Ok(Server { addr, stop, thread: Some(thread) })
}

/// Sends one datagram from `ns` to `dst` and waits up to `timeout` for its echo.
pub fn udp_roundtrip(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<()> {
    udp_echo_of(ns, dst, PROBE, timeout)
}

/// Sends `payload` as one datagram (fragmented by the sender when it exceeds the MTU) from `ns`
/// to `dst` and waits up to `timeout` for the same bytes to come back.
pub fn udp_echo_of(ns: &Netns, dst: SocketAddr, payload: &[u8], timeout: Duration) -> Result<()> {
    ns.run(|| -> Result<()> {
        let deadline = Instant::now() + timeout;
        let any: IpAddr = if dst.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let socket = UdpSocket::bind((any, 0))?;
        socket.connect(dst)?;
        socket.send(payload).context("send the datagram")?;
        let mut buf = vec![0u8; 65536];
        loop {
            socket.set_read_timeout(Some(remaining(deadline)?))?;
            let n = socket.recv(&mut buf).context("wait for the echo")?;
            if &buf[..n] == payload {
                return Ok(());
            }
        }
    })
    .with_context(|| format!("udp {dst} from {ns}, {} bytes (timeout {timeout:?})", payload.len()))
}

/// Sends one datagram from `src` (an address of `ns`'s) to `dst`, expecting nothing back.
pub fn udp_send_from(ns: &Netns, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Result<()> {
    ns.run(|| -> Result<()> {
        let socket = UdpSocket::bind(src).with_context(|| format!("bind {src}"))?;
        socket.send_to(payload, dst).with_context(|| format!("send to {dst}"))?;
        Ok(())
    })
    .with_context(|| format!("udp {src} → {dst} in {ns}"))
}

/// One ICMP/ICMPv6 echo from `ns` to `addr`; true when the reply came within `timeout`
/// (rounded up to whole seconds, at least one).
pub fn ping(ns: &Netns, addr: IpAddr, timeout: Duration) -> bool {
    let seconds = timeout.as_secs_f64().ceil().max(1.0).to_string();
    ns.exec("ping", ["-c", "1", "-W", &seconds, &addr.to_string()]).status.success()
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out");
    }
    Ok(left)
}

/// `GET http://{addr}{path}` with curl from inside `ns` (within 10 s): the status and the body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let output = ns.exec("curl", ["-sS", "--max-time", "10", "-w", "\n%{http_code}", &url]);
    if !output.status.success() {
        bail!("curl {url} in {ns} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    let text = String::from_utf8(output.stdout).context("the response is not UTF-8")?;
    let (body, status) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok((status.parse().with_context(|| format!("curl printed the status {status:?}"))?, body.to_owned()))
}
