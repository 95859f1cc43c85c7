//! Which interfaces `--attach` names, and a netlink watch of the links that come and go, so
//! that interfaces created after start (container veths) are attached as soon as they exist.

use std::collections::{BTreeMap, VecDeque};

use anyhow::{Context, Result, bail};
use futures_channel::mpsc::UnboundedReceiver;
use futures_util::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_proto::ConnectionHandle;
use netlink_proto::sys::{AsyncSocket, SocketAddr, protocols::NETLINK_ROUTE};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Interface names given to `--attach`: exact names or glob patterns (`lxc*`, `veth?-*`).
#[derive(Clone, Debug)]
pub struct InterfacePatterns {
    set: GlobSet,
    patterns: Vec<String>,
}

impl InterfacePatterns {
    /// Errors name the offending pattern. Empty list is allowed (matches nothing).
    pub fn new(patterns: &[String]) -> Result<Self> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            if pattern.is_empty() {
                bail!("interface pattern \"\" is empty");
            }
            if !is_glob(pattern) && pattern.len() > IFNAME_MAX {
                bail!("interface name {pattern:?} is longer than {IFNAME_MAX} bytes");
            }
            let glob = Glob::new(pattern)
                .with_context(|| format!("invalid interface pattern {pattern:?}"))?;
            builder.add(glob);
        }
        let set = builder.build().context("building the interface patterns")?;
        Ok(InterfacePatterns { set, patterns: patterns.to_vec() })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Patterns that are plain names (no glob metacharacters): these must exist at start.
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(String::as_str).filter(|p| !is_glob(p))
    }
}

/// Whether globset would read `pattern` as more than a literal name.
fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    Appeared { name: String, ifindex: u32 },
    Gone { name: String, ifindex: u32 },
}

/// The link multicast group; the socket joins it by binding with its bit (RTMGRP_LINK).
const RTNLGRP_LINK: u32 = 1;

pub struct LinkWatch {
    handle: ConnectionHandle<RouteNetlinkMessage>,
    events: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    /// The task that reads the socket; aborted on drop, which closes the socket.
    connection: tokio::task::JoinHandle<()>,
    /// The links as last reported to the caller, by ifindex.
    known: BTreeMap<u32, String>,
    /// Changes decided but not yet returned (a rename or a resync yields several).
    pending: VecDeque<LinkChange>,
    /// Set on an overrun until the re-dump is done, so a `next()` cancelled mid-dump
    /// still resyncs on the following call.
    resync_needed: bool,
    /// Overruns seen (for the tests).
    resyncs: u64,
}

impl LinkWatch {
    /// Subscribes to link notifications FIRST, then dumps the links that exist, so that no link
    /// created in between is missed (a link may then be reported twice; callers dedupe by ifindex).
    /// Returns the links present now, in the agent's current network namespace.
    pub async fn start() -> Result<(LinkWatch, Vec<(String, u32)>)> {
        Self::start_with_rcvbuf(None).await
    }

    /// `rcvbuf` shrinks the socket's receive buffer, for the test that provokes overruns.
    async fn start_with_rcvbuf(rcvbuf: Option<i32>) -> Result<(LinkWatch, Vec<(String, u32)>)> {
        let (mut conn, handle, events) =
            netlink_proto::new_connection::<RouteNetlinkMessage>(NETLINK_ROUTE)
                .context("opening a NETLINK_ROUTE socket")?;
        let socket = conn.socket_mut().socket_mut();
        socket
            .bind(&SocketAddr::new(0, 1 << (RTNLGRP_LINK - 1)))
            .context("subscribing to netlink link notifications")?;
        if let Some(size) = rcvbuf {
            socket.set_rx_buf_sz(size).context("setting SO_RCVBUF")?;
        }
        // Without NLMSG_DONE a dump cut short by a closing socket would look complete.
        conn.set_forward_done(true);
        let connection = tokio::spawn(conn);
        let mut watch = LinkWatch {
            handle,
            events,
            connection,
            known: BTreeMap::new(),
            pending: VecDeque::new(),
            resync_needed: false,
            resyncs: 0,
        };
        watch.known = dump_links(&watch.handle).await?;
        let links = watch.known.iter().map(|(&i, n)| (n.clone(), i)).collect();
        Ok((watch, links))
    }

    /// The next change: RTM_NEWLINK for an ifindex not seen before (or seen under another
    /// name: a rename = Gone old + Appeared new) → Appeared; RTM_DELLINK → Gone. Repeated
    /// RTM_NEWLINKs for a known ifindex (flag changes, up/down) produce nothing. Returns Err
    /// only if the socket fails; a netlink overrun (ENOBUFS) is handled by re-dumping the
    /// links and synthesizing the differences, never by silently missing links.
    ///
    /// Cancel-safe: a change decided but not returned is kept for the next call.
    pub async fn next(&mut self) -> Result<LinkChange> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            if self.resync_needed {
                self.resync().await?;
                continue;
            }
            let (message, _) = self.events.next().await.context("netlink socket closed")?;
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    if let Some(name) = link_name(&link) {
                        self.seen(link.header.index, name);
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    // Under the name the caller knows it by; a link never reported is not
                    // reported gone either.
                    if let Some(name) = self.known.remove(&link.header.index) {
                        let ifindex = link.header.index;
                        self.pending.push_back(LinkChange::Gone { name, ifindex });
                    }
                }
                // netlink-proto's form of ENOBUFS: notifications were dropped.
                NetlinkPayload::Overrun(_) => {
                    tracing::warn!("netlink link notifications overran; re-reading the links");
                    self.resyncs += 1;
                    self.resync_needed = true;
                }
                _ => {}
            }
        }
    }

    fn seen(&mut self, ifindex: u32, name: String) {
        match self.known.insert(ifindex, name.clone()) {
            Some(old) if old == name => {}
            Some(old) => {
                self.pending.push_back(LinkChange::Gone { name: old, ifindex });
                self.pending.push_back(LinkChange::Appeared { name, ifindex });
            }
            None => self.pending.push_back(LinkChange::Appeared { name, ifindex }),
        }
    }

    /// Replaces `known` with a fresh dump, queueing the differences. Notifications still
    /// queued after the overrun are newer than the loss, so applying them on top converges.
    async fn resync(&mut self) -> Result<()> {
        let now = dump_links(&self.handle).await?;
        let old = std::mem::replace(&mut self.known, now);
        for (&ifindex, name) in &old {
            if self.known.get(&ifindex) != Some(name) {
                self.pending.push_back(LinkChange::Gone { name: name.clone(), ifindex });
            }
        }
        for (&ifindex, name) in &self.known {
            if old.get(&ifindex) != Some(name) {
                self.pending.push_back(LinkChange::Appeared { name: name.clone(), ifindex });
            }
        }
        self.resync_needed = false;
        Ok(())
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// All links by ifindex (RTM_GETLINK dump). Repeated while the kernel flags the dump as
/// interrupted: a link that merely moved in its hash table during the dump gets no
/// notification, so an inconsistent dump could miss it for good.
async fn dump_links(
    handle: &ConnectionHandle<RouteNetlinkMessage>,
) -> Result<BTreeMap<u32, String>> {
    'dump: loop {
        let mut request =
            NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut replies =
            handle.request(request, SocketAddr::new(0, 0)).context("requesting the link dump")?;
        let mut links = BTreeMap::new();
        while let Some(reply) = replies.next().await {
            if reply.header.flags & NLM_F_DUMP_INTR != 0 {
                tracing::debug!("link dump interrupted by a change; dumping again");
                continue 'dump;
            }
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    if let Some(name) = link_name(&link) {
                        links.insert(link.header.index, name);
                    }
                }
                NetlinkPayload::Done(_) => return Ok(links),
                NetlinkPayload::Error(err) => bail!("link dump failed: {err}"),
                _ => {}
            }
        }
        bail!("netlink socket closed during the link dump");
    }
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn patterns(list: &[&str]) -> InterfacePatterns {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        InterfacePatterns::new(&list).unwrap()
    }

    #[test]
    fn exact_names_match_only_themselves() {
        let p = patterns(&["eth0", "ens3"]);
        assert!(p.matches("eth0"));
        assert!(p.matches("ens3"));
        assert!(!p.matches("eth01"));
        assert!(!p.matches("eth"));
        assert!(!p.is_empty());
        assert_eq!(p.exact_names().collect::<Vec<_>>(), ["eth0", "ens3"]);
    }

    #[test]
    fn globs_match_families_of_names() {
        let p = patterns(&["lxc*", "veth?-*", "tap[0-3]", "{cni,flannel}0", "eth0"]);
        for name in ["lxc", "lxc12ab", "veth1-x", "vethZ-", "tap2", "cni0", "flannel0", "eth0"] {
            assert!(p.matches(name), "{name} should match");
        }
        for name in ["lx", "xlxc", "veth-x", "veth12-x", "tap4", "docker0", "eth1"] {
            assert!(!p.matches(name), "{name} should not match");
        }
        assert_eq!(p.exact_names().collect::<Vec<_>>(), ["eth0"]);
    }

    #[test]
    fn empty_list_matches_nothing() {
        let p = patterns(&[]);
        assert!(p.is_empty());
        assert!(!p.matches("lo"));
        assert!(!p.matches(""));
        assert_eq!(p.exact_names().count(), 0);
    }

    #[test]
    fn invalid_patterns_are_named_in_the_error() {
        for (bad, says) in [
            ("veth[0-", "invalid interface pattern \"veth[0-\""),
            ("{a,b", "invalid interface pattern \"{a,b\""),
            ("", "interface pattern \"\" is empty"),
            ("averyverylongname0", "\"averyverylongname0\" is longer than 15 bytes"),
        ] {
            let list = vec!["eth0".to_string(), bad.to_string()];
            let err = format!("{:#}", InterfacePatterns::new(&list).unwrap_err());
            assert!(err.contains(says), "error for {bad:?} was {err:?}");
        }
    }

    /// A scratch network namespace, deleted on drop (also when the test panics).
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Netns {
            assert!(
                nix::unistd::geteuid().is_root(),
                "the link-watch tests create network namespaces and must run as root"
            );
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let name = format!("zt-watch-{}-{n}", std::process::id());
            run(Command::new("ip").args(["netns", "add", &name]));
            Netns { name }
        }

        /// `ip -n <ns> ARGS`: only ever inside the scratch namespace.
        fn ip(&self, args: &[&str]) {
            run(Command::new("ip").arg("-n").arg(&self.name).args(args));
        }

        fn ifindex(&self, name: &str) -> u32 {
            let out = Command::new("ip")
                .args(["-n", &self.name, "-j", "link", "show", "dev", name])
                .output()
                .expect("running ip");
            assert!(out.status.success(), "ip link show {name}: {out:?}");
            let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            links[0]["ifindex"].as_u64().expect("an ifindex") as u32
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    /// `ip -n NETNS -batch -` with these lines, in one process.
    fn ip_batch(netns: &str, lines: &[String]) {
        let mut child = Command::new("ip")
            .args(["-n", netns, "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running ip");
        child.stdin.take().unwrap().write_all(lines.join("\n").as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "ip -batch failed: {lines:?}");
    }

    fn run(command: &mut Command) {
        let status = command.status().unwrap_or_else(|e| panic!("{command:?}: {e}"));
        assert!(status.success(), "{command:?} failed: {status}");
    }

    /// What the watcher thread sends: when it got the change, the change, overruns so far.
    type Report = (Instant, Result<LinkChange>, u64);

    /// A LinkWatch running on its own thread, inside the namespace, on a current-thread
    /// runtime (setns affects only the calling thread).
    struct Watcher {
        initial: Vec<(String, u32)>,
        reports: mpsc::Receiver<Report>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Watcher {
        /// `before_loop` runs on the watcher's runtime thread after start, blocking it: the
        /// socket is then not read, as when the agent is busy. Returns once it is done.
        fn spawn(
            ns: &Netns,
            rcvbuf: Option<i32>,
            before_loop: impl FnOnce() + Send + 'static,
        ) -> Watcher {
            let path = format!("/run/netns/{}", ns.name);
            let (init_tx, init_rx) = mpsc::channel();
            let (tx, reports) = mpsc::channel();
            let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let file = File::open(&path).expect("opening the namespace");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let (mut watch, initial) = match LinkWatch::start_with_rcvbuf(rcvbuf).await {
                        Ok(started) => started,
                        Err(e) => {
                            let _ = init_tx.send(Err(e));
                            return;
                        }
                    };
                    before_loop();
                    // Only now, so that the test sees whatever `before_loop` made.
                    let _ = init_tx.send(Ok(initial));
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            change = watch.next() => {
                                let failed = change.is_err();
                                if tx.send((Instant::now(), change, watch.resyncs)).is_err() || failed {
                                    break;
                                }
                            }
                        }
                    }
                });
            });
            let initial = init_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the watcher started")
                .expect("LinkWatch::start");
            Watcher { initial, reports, stop: Some(stop), thread: Some(thread) }
        }

        fn next(&self) -> (Instant, LinkChange, u64) {
            let (at, change, resyncs) = self
                .reports
                .recv_timeout(Duration::from_secs(5))
                .expect("a link change within 5 s");
            (at, change.expect("LinkWatch::next"), resyncs)
        }

        fn expect(&self, want: LinkChange) -> Instant {
            let (at, got, _) = self.next();
            assert_eq!(got, want);
            at
        }

        fn expect_quiet(&self, for_: Duration) {
            if let Ok((_, change, _)) = self.reports.recv_timeout(for_) {
                panic!("unexpected change {change:?}");
            }
        }
    }

    impl Drop for Watcher {
        fn drop(&mut self) {
            let _ = self.stop.take().unwrap().send(());
            let _ = self.thread.take().unwrap().join();
        }
    }

    fn appeared(name: &str, ifindex: u32) -> LinkChange {
        LinkChange::Appeared { name: name.into(), ifindex }
    }

    fn gone(name: &str, ifindex: u32) -> LinkChange {
        LinkChange::Gone { name: name.into(), ifindex }
    }

    /// Signed milliseconds from `from` to `to`.
    fn ms(from: Instant, to: Instant) -> f64 {
        match to.checked_duration_since(from) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(from - to).as_secs_f64() * 1e3,
        }
    }

    #[test]
    fn watch_reports_veth_add_rename_delete_in_a_netns() {
        let ns = Netns::new();
        let watcher = Watcher::spawn(&ns, None, || {});
        assert!(
            watcher.initial.contains(&("lo".to_string(), 1)),
            "initial dump {:?} lacks lo",
            watcher.initial
        );

        let before = Instant::now();
        ns.ip(&["link", "add", "zt-a", "type", "veth", "peer", "name", "zt-b"]);
        let returned = Instant::now();
        let (a, b) = (ns.ifindex("zt-a"), ns.ifindex("zt-b"));
        // veth registers the peer first, and each link is announced as it registers.
        assert!(b < a, "peer zt-b ({b}) was expected to be registered before zt-a ({a})");
        let first = watcher.expect(appeared("zt-b", b));
        let second = watcher.expect(appeared("zt-a", a));
        eprintln!(
            "link watch latency: `ip link add` started → first Appeared {:.3} ms, second {:.3} ms; \
             `ip link add` returned → first Appeared {:+.3} ms (the whole command took {:.3} ms)",
            ms(before, first),
            ms(before, second),
            ms(returned, first),
            ms(before, returned),
        );

        // Flag changes of known links are not changes.
        ns.ip(&["link", "set", "zt-b", "up"]);
        ns.ip(&["link", "set", "zt-b", "down"]);

        ns.ip(&["link", "set", "zt-a", "name", "zt-c"]);
        watcher.expect(gone("zt-a", a));
        watcher.expect(appeared("zt-c", a));

        ns.ip(&["link", "del", "zt-c"]);
        watcher.expect(gone("zt-c", a));
        watcher.expect(gone("zt-b", b));
        watcher.expect_quiet(Duration::from_millis(300));
    }

    #[test]
    fn watch_resyncs_after_an_overrun() {
        const PAIRS: usize = 16;
        let ns = Netns::new();
        let name = ns.name.clone();
        // The smallest receive buffer, and links created while the socket is not read: the
        // kernel must drop notifications (ENOBUFS).
        let watcher = Watcher::spawn(&ns, Some(1), move || {
            let add: Vec<String> = (0..PAIRS)
                .map(|i| format!("link add zt-o{i} type veth peer name zt-p{i}"))
                .collect();
            ip_batch(&name, &add);
        });
        let mut want = BTreeMap::new();
        for i in 0..PAIRS {
            for name in [format!("zt-o{i}"), format!("zt-p{i}")] {
                want.insert(ns.ifindex(&name), name);
            }
        }

        let mut got = BTreeMap::new();
        let mut resyncs = 0;
        while got != want {
            let (_, change, overruns) = watcher.next();
            resyncs = overruns;
            match change {
                LinkChange::Appeared { name, ifindex } => {
                    got.insert(ifindex, name);
                }
                LinkChange::Gone { name, ifindex } => panic!("{name} ({ifindex}) reported gone"),
            }
        }
        assert!(resyncs >= 1, "no overrun was provoked, so the resync went untested");
        eprintln!("overrun test: {resyncs} resync(s), all {} links reported", want.len());

        let del: Vec<String> = (0..PAIRS).map(|i| format!("link del zt-o{i}")).collect();
        ip_batch(&ns.name, &del);
        while !got.is_empty() {
            match watcher.next().1 {
                LinkChange::Gone { name, ifindex } => {
                    assert_eq!(got.remove(&ifindex), Some(name));
                }
                other => panic!("unexpected {other:?} while deleting"),
            }
        }
        watcher.expect_quiet(Duration::from_millis(300));
    }
}
