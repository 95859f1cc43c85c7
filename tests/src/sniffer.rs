//! What actually arrives at a workload: an AF_PACKET socket bound to an interface inside the
//! workload's namespace records every packet the interface receives (after the node side's TC
//! programs judged it), one record per packet, for as long as the sniffer lives.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use nix::libc;

use crate::netns::Netns;

/// Not every libc version exports these (linux/if_packet.h, asm/socket.h).
const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_OUTGOING: u8 = 4;
const SO_RCVBUFFORCE: libc::c_int = 33;
const RECEIVE_BUFFER: libc::c_int = 16 << 20;
/// How often the reader looks at its stop flag when nothing arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Records kept; past that, packets are still counted in [`Sniffer::seen`] but not recorded.
const MAX_RECORDS: usize = 2_000_000;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
/// TCP flag bits, as in [`Packet::tcp_flags`].
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// One received IPv4 or IPv6 packet. Ports and flags are 0 when the packet has none (or they
/// are not in the first 40 bytes after the fixed header, e.g. behind IPv6 extension headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub at: Instant,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol (IPv6: the first next-header), e.g. [`TCP`], [`UDP`].
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
}

impl Packet {
    /// A TCP or UDP packet for `dst_port`.
    pub fn is_to(&self, protocol: u8, dst_port: u16) -> bool {
        self.protocol == protocol && self.dst_port == dst_port
    }
}

#[derive(Default)]
struct Shared {
    packets: Mutex<Vec<Packet>>,
    /// Every IP packet received, recorded or not.
    seen: AtomicU64,
    /// Packets the socket's receive queue had no room for (PACKET_STATISTICS), summed.
    dropped: AtomicU64,
}

/// Records the packets `interface` in a namespace receives (not those it sends). Dropping it
/// stops the reader thread.
pub struct Sniffer {
    ns_name: String,
    interface: String,
    socket: Arc<OwnedFd>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    /// Starts recording on `interface` (e.g. a workload's `eth0`) inside `ns`. Only packets that
    /// arrive after this returns are seen.
    pub fn start(ns: &Netns, interface: &str) -> Result<Sniffer> {
        let (socket, ifindex) = ns
            .run(|| open_packet_socket(interface))
            .with_context(|| format!("AF_PACKET socket on {interface} in {ns}"))?;
        let socket = Arc::new(socket);
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (socket, shared, stop) = (socket.clone(), shared.clone(), stop.clone());
            move || read_packets(&socket, ifindex, &shared, &stop)
        });
        Ok(Sniffer {
            ns_name: ns.name().to_owned(),
            interface: interface.to_owned(),
            socket,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The recorded packets `filter` selects, oldest first.
    pub fn packets(&self, filter: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        self.shared.packets.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|p| filter(p)).copied().collect()
    }

    /// How many recorded packets `filter` selects.
    pub fn count(&self, filter: impl Fn(&Packet) -> bool) -> usize {
        self.shared.packets.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|p| filter(p)).count()
    }

    /// Every IP packet received so far.
    pub fn seen(&self) -> u64 {
        self.shared.seen.load(Ordering::Relaxed)
    }

    /// Packets the kernel could not queue to the sniffer (so it did not see them) so far. A
    /// count of "nothing arrived" only means something while this is 0.
    pub fn dropped(&self) -> u64 {
        add_socket_drops(&self.socket, &self.shared);
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until the reader has taken in what the socket already queued (up to `timeout`), so
    /// that packets that arrived before this call are counted.
    pub fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while queued_bytes(&self.socket) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        // The reader may hold one packet it has dequeued but not yet recorded.
        thread::sleep(Duration::from_millis(20));
    }

    /// Where it listens, for messages.
    pub fn describe(&self) -> String {
        format!("{} in {}", self.interface, self.ns_name)
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn last_os_error(call: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{call}: {err}"))
}

fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T, call: &str) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(last_os_error(call));
    }
    Ok(())
}

/// SOCK_DGRAM packet socket (the kernel strips the link header and reports the ethertype),
/// every protocol, bound to `interface`; runs inside the namespace.
fn open_packet_socket(interface: &str) -> io::Result<(OwnedFd, i32)> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscalls on values we own; the fd is wrapped at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol.into()) };
    if fd < 0 {
        return Err(last_os_error("socket(AF_PACKET)"));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(interface).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is NUL-terminated.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(last_os_error(&format!("if_nametoindex({interface})")));
    }
    // Big enough for a test's worth of bursts; SO_RCVBUFFORCE (root) ignores rmem_max.
    set_option(&fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, &RECEIVE_BUFFER, "setsockopt(SO_RCVBUFFORCE)")?;
    let timeout = libc::timeval { tv_sec: 0, tv_usec: POLL_INTERVAL.as_micros() as libc::suseconds_t };
    set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout, "setsockopt(SO_RCVTIMEO)")?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_os_error("bind(AF_PACKET)"));
    }
    // Packets of other interfaces may have been queued between socket() and bind(); the reader
    // also filters by ifindex.
    Ok((fd, ifindex as i32))
}

fn read_packets(socket: &OwnedFd, ifindex: i32, shared: &Shared, stop: &AtomicBool) {
    let mut buf = [0u8; 128];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are live and of the sizes passed; a longer packet is cut.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        let at = Instant::now();
        // n < 0: the receive timeout (or EINTR), a chance to look at the stop flag.
        if n < 0 || from.sll_pkttype == PACKET_OUTGOING || from.sll_ifindex != ifindex {
            continue;
        }
        let Some(packet) = parse(u16::from_be(from.sll_protocol), &buf[..(n as usize).min(buf.len())], at) else {
            continue;
        };
        shared.seen.fetch_add(1, Ordering::Relaxed);
        let mut packets = shared.packets.lock().unwrap_or_else(|e| e.into_inner());
        if packets.len() < MAX_RECORDS {
            packets.push(packet);
        }
    }
}

/// Bytes waiting in the receive queue (SIOCINQ).
fn queued_bytes(socket: &OwnedFd) -> libc::c_int {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc == 0 {
        queued
    } else {
        0
    }
}

/// PACKET_STATISTICS resets the kernel's counters on each read, so they are summed here.
fn add_socket_drops(socket: &OwnedFd, shared: &Shared) {
    #[repr(C)]
    #[derive(Default)]
    struct TpacketStats {
        /// Packets queued (counted by the reader itself).
        _packets: u32,
        drops: u32,
    }
    let mut stats = TpacketStats::default();
    let mut len = size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `stats` is live and of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            SOL_PACKET,
            PACKET_STATISTICS,
            (&mut stats as *mut TpacketStats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        shared.dropped.fetch_add(stats.drops.into(), Ordering::Relaxed);
    }
}

/// The addresses, protocol, ports and TCP flags of an IPv4 or IPv6 packet (network header
/// first, as SOCK_DGRAM delivers it).
fn parse(ethertype: u16, data: &[u8], at: Instant) -> Option<Packet> {
    let (src, dst, protocol, l4): (IpAddr, IpAddr, u8, &[u8]) = match ethertype as libc::c_int {
        libc::ETH_P_IP => {
            let ihl = usize::from(*data.first()? & 0x0f) * 4;
            if data.len() < 20 || ihl < 20 {
                return None;
            }
            let src = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
            let dst = Ipv4Addr::new(data[16], data[17], data[18], data[19]);
            let fragment_offset = u16::from_be_bytes([data[6], data[7]]) & 0x1fff;
            // Only the first fragment carries ports.
            let l4 = if fragment_offset == 0 { data.get(ihl..).unwrap_or(&[]) } else { &[] };
            (src.into(), dst.into(), data[9], l4)
        }
        libc::ETH_P_IPV6 => {
            if data.len() < 40 {
                return None;
            }
            let src: [u8; 16] = data[8..24].try_into().ok()?;
            let dst: [u8; 16] = data[24..40].try_into().ok()?;
            (Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into(), data[6], &data[40..])
        }
        _ => return None,
    };
    let ports = |l4: &[u8]| -> Option<(u16, u16)> {
        Some((u16::from_be_bytes([*l4.first()?, *l4.get(1)?]), u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?])))
    };
    let (src_port, dst_port) = match protocol {
        TCP | UDP | 132 => ports(l4).unwrap_or((0, 0)),
        _ => (0, 0),
    };
    let tcp_flags = if protocol == TCP { l4.get(13).copied().unwrap_or(0) } else { 0 };
    Some(Packet { at, src, dst, protocol, src_port, dst_port, tcp_flags })
}

/// Fails unless the sniffer saw everything that arrived (see [`Sniffer::dropped`]).
pub fn ensure_complete(sniffer: &Sniffer) -> Result<()> {
    let dropped = sniffer.dropped();
    ensure!(dropped == 0, "the sniffer on {} missed {dropped} packets (receive queue full)", sniffer.describe());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_tcp_and_ipv6_udp() {
        let mut v4 = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, TCP, 0, 0, 10, 20, 1, 2, 10, 20, 2, 2];
        v4.extend([0x9c, 0x40, 0x23, 0x82, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
        let p = parse(0x0800, &v4, Instant::now()).unwrap();
        assert_eq!((p.src, p.dst), ("10.20.1.2".parse().unwrap(), "10.20.2.2".parse().unwrap()));
        assert_eq!((p.protocol, p.src_port, p.dst_port, p.tcp_flags), (TCP, 40000, 9090, SYN));
        assert!(p.is_to(TCP, 9090));

        // A non-first fragment has no ports.
        let mut fragment = v4.clone();
        fragment[7] = 1;
        assert_eq!(parse(0x0800, &fragment, Instant::now()).unwrap().dst_port, 0);

        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, UDP, 64];
        v6.extend([0; 32]);
        v6[8 + 15] = 2;
        v6[24 + 15] = 3;
        v6.extend([0x13, 0x88, 0x23, 0x82, 0, 8, 0, 0]);
        let p = parse(0x86dd, &v6, Instant::now()).unwrap();
        assert_eq!((p.src, p.dst), ("::2".parse().unwrap(), "::3".parse().unwrap()));
        assert_eq!((p.protocol, p.src_port, p.dst_port, p.tcp_flags), (UDP, 5000, 9090, 0));
        assert!(parse(0x0806, &[0; 28], Instant::now()).is_none(), "ARP is not IP");
        assert!(parse(0x0800, &v4[..10], Instant::now()).is_none(), "truncated");
    }
}
