//! Random policy sets and the flows drawn from them, shared by the tests that check the loaded
//! programs against the reference evaluator (`differential.rs`, `packet_fuzz.rs`). Everything
//! follows from a seeded `fastrand::Rng`, so a failure replays from its seed.

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{IpNumber, PacketBuilder};
use fastrand::Rng;
use zt_agent::policy::eval::Flow;
use zt_common::proto;

/// Destination ports stay below this, source ports at or above it: see `differential.rs`.
pub const FIRST_SOURCE_PORT: u16 = 50_000;
pub const PORT_LIMIT: u16 = FIRST_SOURCE_PORT;

/// A generated policy set: its YAML and what flows are drawn from.
pub struct Scenario {
    pub yaml: String,
    pub prefixes: Vec<Prefix>,
    /// Ranges no identity owns, which CIDR peers name (world addresses are drawn from them too).
    pub world_ranges: Vec<Prefix>,
    /// Ports the rules mention (range bounds and single ports), for boundary flows.
    pub ports: Vec<u16>,
    /// The declared identities.
    pub names: Vec<&'static str>,
}

pub const IDENTITY_NAMES: [&str; 10] =
    ["web", "api", "db", "cache.prod", "team-a/web", "svc:metrics", "job_1", "0day", "a", "payments-v2"];
pub const WELL_KNOWN_PORTS: [u16; 9] = [1, 22, 53, 80, 443, 5432, 8080, 8443, 49999];
pub const ICMP_TYPES: [u16; 6] = [0, 3, 5, 8, 11, 13];
pub const ICMPV6_TYPES: [u16; 6] = [1, 2, 3, 4, 128, 129];

impl Scenario {
    pub fn generate(rng: &mut Rng) -> Self {
        let prefixes = Prefix::generate_pool(rng);
        let mut ports: Vec<u16> = (0..3 + rng.usize(..4))
            .map(|_| if rng.percent(50) { rng.pick(&WELL_KNOWN_PORTS) } else { rng.u16(1..50_000) })
            .collect();
        ports.sort_unstable();
        ports.dedup();

        let mut yaml = String::new();
        let mut names = IDENTITY_NAMES;
        rng.shuffle(&mut names);
        let names = &names[..(1 + rng.usize(..6)).min(prefixes.len())];
        // Every prefix to one identity (a prefix may not appear twice), at least one each.
        let mut owned: Vec<Vec<Prefix>> = vec![Vec::new(); names.len()];
        for (i, prefix) in prefixes.iter().enumerate() {
            let owner = if i < names.len() { i } else { rng.usize(..names.len()) };
            owned[owner].push(*prefix);
        }
        for (name, selectors) in names.iter().zip(&owned) {
            let selectors: Vec<String> = selectors.iter().map(|p| format!("{{cidr: \"{p}\"}}")).collect();
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: \"{name}\"}}\nspec: {{selectors: [{}]}}",
                selectors.join(", ")
            )
            .unwrap();
        }
        if rng.percent(40) {
            // The zero-trust baseline.
            writeln!(yaml, "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: baseline}}\nspec: {{subject: [any], ingress: [], egress: []}}").unwrap();
        }
        let names = names.to_vec();
        let world_ranges = Prefix::generate_world_ranges(rng, &prefixes);
        let mut scenario = Scenario { yaml, prefixes, world_ranges, ports, names };
        let count = 1 + rng.usize(..6);
        scenario.write_policies(rng, "p", count);
        scenario
    }

    /// The same identities under a policy that allows less: the same policies plus (half the
    /// time) a baseline isolating every identity both ways, and one to three more policies.
    pub fn tightened(&self, rng: &mut Rng) -> Scenario {
        let mut tightened = Scenario { yaml: self.yaml.clone(), world_ranges: self.world_ranges.clone(), prefixes: self.prefixes.clone(), ports: self.ports.clone(), names: self.names.clone() };
        if rng.percent(50) {
            writeln!(tightened.yaml, "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: tightened}}\nspec: {{subject: [any], ingress: [], egress: []}}").unwrap();
        }
        let count = 1 + rng.usize(..3);
        tightened.write_policies(rng, "t", count);
        tightened
    }

    /// `count` random policies named `<prefix>0`, `<prefix>1`, … over the identities; a quarter
    /// of them staged (`mode: monitor`).
    pub fn write_policies(&mut self, rng: &mut Rng, prefix: &str, count: usize) {
        let quoted = |name: &str| format!("\"{name}\"");
        let subjects: Vec<String> = self.names.iter().map(|n| quoted(n)).collect();
        let mut peers = subjects.clone();
        peers.extend((0..1 + rng.usize(..3)).map(|_| self.cidr_peer(rng)));
        peers.extend(["any".to_owned(), "world".to_owned()]);
        let (yaml, ports) = (&mut self.yaml, &self.ports);
        for policy in 0..count {
            let subject: Vec<String> = (0..1 + rng.usize(..2))
                .map(|_| if rng.percent(20) { "any".to_owned() } else { rng.pick_ref(&subjects).clone() })
                .collect();
            let mode = if rng.percent(25) { "\n  mode: monitor" } else { "" };
            writeln!(
                yaml,
                "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: {prefix}{policy}}}\nspec:{mode}\n  subject: [{}]",
                subject.join(", ")
            )
            .unwrap();
            let ingress = rng.percent(65);
            let egress = !ingress || rng.percent(50);
            for (present, list, peer_key) in [(ingress, "ingress", "from"), (egress, "egress", "to")] {
                if !present {
                    continue;
                }
                let rules = if rng.percent(15) { 0 } else { 1 + rng.usize(..4) };
                if rules == 0 {
                    writeln!(yaml, "  {list}: []").unwrap();
                    continue;
                }
                writeln!(yaml, "  {list}:").unwrap();
                for _ in 0..rules {
                    writeln!(yaml, "    - {}", Self::rule(rng, peer_key, &peers, ports)).unwrap();
                }
            }
        }
    }

    /// `{cidr: R, except: [...]}`: R a world range or a family's /0, the exceptions world ranges
    /// or declared prefixes strictly inside it.
    pub fn cidr_peer(&self, rng: &mut Rng) -> String {
        let v4 = rng.percent(60);
        let mut candidates: Vec<Prefix> = self.world_ranges.iter().copied().filter(|p| p.v4 == v4).collect();
        candidates.push(Prefix::new(v4, 0, 0));
        let range = rng.pick(&candidates);
        let inside: Vec<Prefix> = self
            .world_ranges
            .iter()
            .chain(&self.prefixes)
            .copied()
            .filter(|p| p.v4 == v4 && p.len > range.len && range.contains(v4, p.network))
            .collect();
        let except: Vec<String> = match inside.is_empty() {
            true => Vec::new(),
            false => (0..rng.usize(..3)).map(|_| format!("\"{}\"", rng.pick(&inside))).collect(),
        };
        format!("{{cidr: \"{range}\", except: [{}]}}", except.join(", "))
    }

    pub fn rule(rng: &mut Rng, peer_key: &str, peers: &[String], ports: &[u16]) -> String {
        let peer_list: Vec<&str> = (0..1 + rng.usize(..2))
            .map(|_| match rng.usize(..100) {
                0..15 => "any",
                15..35 => "world",
                _ => rng.pick_ref(&peers[..peers.len() - 2]).as_str(),
            })
            .collect();
        let mut rule = format!("{{{peer_key}: [{}]", peer_list.join(", "));
        if rng.percent(75) {
            let items: Vec<String> = (0..1 + rng.usize(..3)).map(|_| Self::port_item(rng, ports)).collect();
            write!(rule, ", ports: [{}]", items.join(", ")).unwrap();
        }
        match rng.usize(..100) {
            0..25 => rule.push_str(", action: deny"),
            25..35 => rule.push_str(", action: allow"),
            _ => {}
        }
        rule.push('}');
        rule
    }

    pub fn port_item(rng: &mut Rng, ports: &[u16]) -> String {
        let protocol =
            rng.pick(&["tcp", "tcp", "tcp", "tcp", "udp", "udp", "sctp", "icmp", "icmp", "icmpv6", "icmpv6"]);
        if protocol.starts_with("icmp") {
            if rng.percent(30) {
                return format!("{{protocol: {protocol}}}");
            }
            let types = if protocol == "icmp" { &ICMP_TYPES } else { &ICMPV6_TYPES };
            // Now and then the other family's types, or any number: a type is just a number.
            let icmp_type = match rng.usize(..10) {
                0 => rng.u16(..256),
                1 => rng.pick(if protocol == "icmp" { &ICMPV6_TYPES } else { &ICMP_TYPES }),
                _ => rng.pick(types),
            };
            return format!("{{protocol: {protocol}, type: {icmp_type}}}");
        }
        match rng.usize(..10) {
            0..2 => format!("{{protocol: {protocol}}}"),
            2..4 => format!("{{protocol: {protocol}, port: {}}}", rng.pick(ports)),
            4 => format!("{{protocol: {protocol}, port: \"{}\"}}", rng.pick(ports)),
            5 => format!("{{protocol: {protocol}, port: \"{}-65535\"}}", rng.pick(ports)),
            _ => {
                let (a, b) = (rng.pick(ports), rng.pick(ports));
                format!("{{protocol: {protocol}, port: \"{}-{}\"}}", a.min(b), a.max(b))
            }
        }
    }
}

/// An address prefix: the address as a number (IPv4 in the low 32 bits) and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub v4: bool,
    pub network: u128,
    pub len: u32,
}

impl Prefix {
    pub fn width(v4: bool) -> u32 {
        if v4 {
            32
        } else {
            128
        }
    }

    pub fn host_mask(&self) -> u128 {
        let host_bits = Self::width(self.v4) - self.len;
        if host_bits == 0 {
            0
        } else {
            u128::MAX >> (128 - host_bits)
        }
    }

    pub fn last(&self) -> u128 {
        self.network | self.host_mask()
    }

    pub fn new(v4: bool, addr: u128, len: u32) -> Self {
        let width_mask = if v4 { u128::from(u32::MAX) } else { u128::MAX };
        let mut prefix = Prefix { v4, network: addr & width_mask, len };
        prefix.network &= !prefix.host_mask();
        prefix
    }

    /// Nested prefixes in both families (sometimes only one), so that longest-prefix match
    /// decides between identities, with host routes (/32, /128) now and then.
    pub fn generate_pool(rng: &mut Rng) -> Vec<Prefix> {
        let families: &[bool] = match rng.usize(..10) {
            0 => &[true],
            1 => &[false],
            _ => &[true, false],
        };
        let mut pool: Vec<Prefix> = Vec::new();
        let root = |rng: &mut Rng, v4: bool| {
            if v4 {
                // Inside 10.0.0.0/8 (and IPv6 roots inside fd00::/16), so that roots nest too.
                let len = rng.u32(8..21);
                Prefix::new(true, 0x0a00_0000 | u128::from(rng.u32(..) & 0x00ff_ffff), len)
            } else {
                let len = rng.u32(16..65);
                Prefix::new(false, (0xfd00u128 << 112) | (u128::from(rng.u64(..)) << 56 >> 8), len)
            }
        };
        for &v4 in families {
            pool.push(root(rng, v4));
        }
        for _ in 0..1 + rng.usize(..10) {
            let v4 = rng.pick(families);
            let candidate = if rng.percent(20) {
                root(rng, v4)
            } else {
                let parents: Vec<Prefix> = pool.iter().copied().filter(|p| p.v4 == v4).collect();
                let parent = rng.pick(&parents);
                let width = Self::width(v4);
                if parent.len == width {
                    continue;
                }
                let len = if rng.percent(15) { width } else { (parent.len + rng.u32(1..13)).min(width) };
                let host = (u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..))) & parent.host_mask();
                Prefix::new(v4, parent.network | host, len)
            };
            if !pool.contains(&candidate) {
                pool.push(candidate);
            }
        }
        rng.shuffle(&mut pool);
        pool
    }

    /// One to four ranges outside every declared prefix (v4 in 11.0.0.0/8, v6 in 2001:db8::/32,
    /// which no declared prefix touches), nested now and then.
    pub fn generate_world_ranges(rng: &mut Rng, declared: &[Prefix]) -> Vec<Prefix> {
        let mut ranges: Vec<Prefix> = Vec::new();
        for _ in 0..1 + rng.usize(..4) {
            let v4 = rng.percent(60);
            let candidate = match ranges.iter().copied().rfind(|p| p.v4 == v4 && p.len < Self::width(v4)) {
                Some(parent) if rng.percent(40) => {
                    let len = (parent.len + rng.u32(1..9)).min(Self::width(v4));
                    let host = (u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..))) & parent.host_mask();
                    Prefix::new(v4, parent.network | host, len)
                }
                _ if v4 => Prefix::new(true, 0x0b00_0000 | u128::from(rng.u32(..) & 0x00ff_ffff), rng.u32(8..29)),
                _ => Prefix::new(false, (0x2001_0db8u128 << 96) | (u128::from(rng.u64(..)) << 32), rng.u32(32..97)),
            };
            debug_assert!(!declared.iter().any(|d| d.v4 == candidate.v4 && d.contains(candidate.v4, candidate.network)));
            if !ranges.contains(&candidate) {
                ranges.push(candidate);
            }
        }
        ranges
    }

    pub fn contains(&self, v4: bool, addr: u128) -> bool {
        self.v4 == v4 && addr & !self.host_mask() == self.network
    }
}

pub fn to_ip(v4: bool, addr: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(addr as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", to_ip(self.v4, self.network), self.len)
    }
}

// ---------------------------------------------------------------------------------------------
// Flows

/// One flow: what the frame carries.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// TCP/UDP/SCTP source port, or the ICMP echo identifier.
    pub src_port: u16,
    /// Destination port, or the ICMP type.
    pub dst_port: u16,
    /// Behind an 802.1Q tag.
    pub vlan: bool,
}

/// Protocols without ports that rules can only match with a rule without `ports`.
pub const OTHER_PROTOCOLS: [u8; 2] = [47, 50]; // GRE, ESP

impl Case {
    pub fn generate(rng: &mut Rng, scenario: &Scenario, src_port: u16, echo_id: u16) -> Case {
        let has = |v4: bool| scenario.prefixes.iter().any(|p| p.v4 == v4);
        let v4 = match (has(true), has(false)) {
            (true, true) => rng.percent(60),
            (true, false) => rng.percent(85),
            (false, true) => rng.percent(15),
            (false, false) => rng.percent(50),
        };
        let src = Self::address(rng, scenario, v4);
        let dst = Self::address(rng, scenario, v4);
        let (icmp, other_icmp, echo_request) =
            if v4 { (proto::ICMP, proto::ICMPV6, 8) } else { (proto::ICMPV6, proto::ICMP, 128) };
        let (protocol, src_port, dst_port) = match rng.usize(..100) {
            0..30 => (proto::TCP, src_port, Self::port(rng, scenario)),
            30..48 => (proto::UDP, src_port, Self::port(rng, scenario)),
            48..58 => (proto::SCTP, src_port, Self::port(rng, scenario)),
            58..73 => (icmp, echo_id, echo_request),
            73..88 => (icmp, echo_id, Self::icmp_type(rng, icmp)),
            // ICMP carried in the other family: policy goes by the protocol number alone.
            88..91 => (other_icmp, echo_id, Self::icmp_type(rng, other_icmp)),
            _ => (rng.pick(&OTHER_PROTOCOLS), 0, 0),
        };
        Case { src, dst, protocol, src_port, dst_port, vlan: rng.percent(10) }
    }

    /// An ICMP type for `protocol`, mostly from the usual ones. (Neighbour discovery's types
    /// are drawn too: the frames' hop limit is 64, so policy judges them like any other.)
    pub fn icmp_type(rng: &mut Rng, protocol: u8) -> u16 {
        let types = if protocol == proto::ICMP { &ICMP_TYPES } else { &ICMPV6_TYPES };
        if rng.percent(80) {
            rng.pick(types)
        } else {
            rng.u16(..256)
        }
    }

    /// A destination port below `PORT_LIMIT`: often at or next to a port the rules name.
    pub fn port(rng: &mut Rng, scenario: &Scenario) -> u16 {
        match rng.usize(..100) {
            0..45 => {
                let port = rng.pick(&scenario.ports);
                let port = match rng.usize(..3) {
                    0 => port.saturating_sub(1),
                    1 => port,
                    _ => port.saturating_add(1),
                };
                port.min(PORT_LIMIT - 1)
            }
            45..50 => 0,
            50..55 => PORT_LIMIT - 1,
            _ => rng.u16(..PORT_LIMIT),
        }
    }

    /// Inside a declared prefix (often at its edges), just outside one, or anywhere (world).
    pub fn address(rng: &mut Rng, scenario: &Scenario, v4: bool) -> IpAddr {
        let random = |rng: &mut Rng| {
            if v4 {
                u128::from(rng.u32(..))
            } else {
                u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..))
            }
        };
        let prefixes: Vec<Prefix> = scenario.prefixes.iter().copied().filter(|p| p.v4 == v4).collect();
        let width_mask = if v4 { u128::from(u32::MAX) } else { u128::MAX };
        let roll = rng.usize(..100);
        let addr = if roll < 65 && !prefixes.is_empty() {
            let prefix = rng.pick(&prefixes);
            match rng.usize(..10) {
                0 => prefix.network,
                1 => prefix.last(),
                _ => prefix.network | (random(rng) & prefix.host_mask()),
            }
        } else if roll < 80 && !prefixes.is_empty() {
            // Just below or just past a prefix: world, or a shorter enclosing prefix.
            let prefix = rng.pick(&prefixes);
            if rng.percent(50) {
                prefix.network.wrapping_sub(1) & width_mask
            } else {
                prefix.last().wrapping_add(1) & width_mask
            }
        } else if (80..83).contains(&roll) && !v4 {
            // An IPv4-mapped IPv6 address: the kernel keys IPv4 that way, so it takes the
            // identity of the IPv4 prefix that contains it, on both sides.
            let v4_prefixes: Vec<Prefix> = scenario.prefixes.iter().copied().filter(|p| p.v4).collect();
            let inner = if v4_prefixes.is_empty() {
                u128::from(rng.u32(..))
            } else {
                let prefix = rng.pick(&v4_prefixes);
                prefix.network | (u128::from(rng.u32(..)) & prefix.host_mask())
            };
            (0xffffu128 << 32) | inner
        } else if roll < 92 && scenario.world_ranges.iter().any(|p| p.v4 == v4) {
            // Inside a range a CIDR peer may name (none is inside a declared prefix).
            let ranges: Vec<Prefix> = scenario.world_ranges.iter().copied().filter(|p| p.v4 == v4).collect();
            let range = rng.pick(&ranges);
            match rng.usize(..10) {
                0 => range.network,
                1 => range.last(),
                _ => range.network | (random(rng) & range.host_mask()),
            }
        } else {
            // World: outside every declared prefix.
            loop {
                let addr = random(rng);
                if !scenario.prefixes.iter().any(|p| p.contains(v4, addr)) {
                    break addr;
                }
            }
        };
        to_ip(v4, addr)
    }

    /// The reply to this case's packet, for the flows whose replies conntrack admits.
    pub fn reply(&self) -> Option<Case> {
        let (src_port, dst_port) = match (self.protocol, self.dst_port) {
            (proto::ICMP, 8) => (self.src_port, 0),
            (proto::ICMPV6, 128) => (self.src_port, 129),
            (proto::TCP | proto::UDP | proto::SCTP, _) => (self.dst_port, self.src_port),
            _ => return None,
        };
        Some(Case { src: self.dst, dst: self.src, src_port, dst_port, ..*self })
    }

    pub fn flow(&self) -> Flow {
        Flow { src: self.src, dst: self.dst, protocol: self.protocol, dst_port: self.kernel_ports().1 }
    }

    /// Whether the kernel's conntrack key holds this case's own source port or echo identifier.
    pub fn has_unique_key(&self) -> bool {
        self.kernel_ports().0 != 0
    }

    pub fn is_icmp(&self) -> bool {
        matches!(self.protocol, proto::ICMP | proto::ICMPV6)
    }

    /// (src_port, dst_port) as the kernel parses them: ports for TCP/UDP/SCTP; the identifier of
    /// an echo request/reply and the type for ICMP; zero for other protocols.
    pub fn kernel_ports(&self) -> (u16, u16) {
        match self.protocol {
            proto::TCP | proto::UDP | proto::SCTP => (self.src_port, self.dst_port),
            proto::ICMP if matches!(self.dst_port, 0 | 8) => (self.src_port, self.dst_port),
            proto::ICMPV6 if matches!(self.dst_port, 128 | 129) => (self.src_port, self.dst_port),
            _ if self.is_icmp() => (0, self.dst_port),
            _ => (0, 0),
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => ethernet.ipv4(src.octets(), dst.octets(), 64),
            (IpAddr::V6(src), IpAddr::V6(dst)) => ethernet.ipv6(src.octets(), dst.octets(), 64),
            _ => unreachable!("both ends of a flow are of one family"),
        };
        let [id_hi, id_lo] = self.src_port.to_be_bytes();
        let (sport, dport) = (self.src_port.to_be_bytes(), self.dst_port.to_be_bytes());
        let mut frame = Vec::new();
        let native_icmp = match self.src {
            IpAddr::V4(_) => self.protocol == proto::ICMP,
            IpAddr::V6(_) => self.protocol == proto::ICMPV6,
        };
        match self.protocol {
            proto::TCP => ip.tcp(self.src_port, self.dst_port, 1, 1024).syn().write(&mut frame, &[]),
            proto::UDP => ip.udp(self.src_port, self.dst_port).write(&mut frame, &[0; 8]),
            proto::ICMP if native_icmp => {
                ip.icmpv4_raw(self.dst_port as u8, 0, [id_hi, id_lo, 0, 1]).write(&mut frame, &[0; 16])
            }
            proto::ICMPV6 if native_icmp => {
                ip.icmpv6_raw(self.dst_port as u8, 0, [id_hi, id_lo, 0, 1]).write(&mut frame, &[0; 16])
            }
            // SCTP's common header, ICMP of the other family, or 8 bytes of anything.
            proto::SCTP => {
                let header = [sport[0], sport[1], dport[0], dport[1], 0, 0, 0, 1, 0, 0, 0, 0];
                ip.write(&mut frame, IpNumber(self.protocol), &header)
            }
            _ if self.is_icmp() => {
                ip.write(&mut frame, IpNumber(self.protocol), &[self.dst_port as u8, 0, 0, 0, id_hi, id_lo, 0, 1])
            }
            _ => ip.write(&mut frame, IpNumber(self.protocol), &[0; 8]),
        }
        .expect("the frame serializes");
        if self.vlan {
            frame.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        }
        frame
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vlan = if self.vlan { " (VLAN-tagged)" } else { "" };
        match self.protocol {
            proto::TCP | proto::UDP | proto::SCTP => {
                let name = match self.protocol {
                    proto::TCP => "tcp",
                    proto::UDP => "udp",
                    _ => "sctp",
                };
                write!(f, "{name} {} port {} -> {} port {}{vlan}", self.src, self.src_port, self.dst, self.dst_port)
            }
            proto::ICMP | proto::ICMPV6 => {
                let name = if self.protocol == proto::ICMP { "icmp" } else { "icmpv6" };
                write!(f, "{name} type {} id {} {} -> {}{vlan}", self.dst_port, self.src_port, self.src, self.dst)
            }
            other => write!(f, "protocol {other} {} -> {}{vlan}", self.src, self.dst),
        }
    }
}

/// Draws for the generators, over a seeded `fastrand::Rng`: the whole run follows from the seed
/// (and the `fastrand` version Cargo.lock pins), so a failure replays exactly.
pub trait Draw {
    fn percent(&mut self, chance: usize) -> bool;
    fn pick<T: Copy>(&mut self, items: &[T]) -> T;
    fn pick_ref<'a, T>(&mut self, items: &'a [T]) -> &'a T;
}

impl Draw for Rng {
    fn percent(&mut self, chance: usize) -> bool {
        self.usize(..100) < chance
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *self.pick_ref(items)
    }

    fn pick_ref<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.usize(..items.len())]
    }
}
