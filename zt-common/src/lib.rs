//! The ABI shared by the kernel programs (`zt-ebpf`) and the agent (`zt-agent`).
//!
//! Everything here is `#[repr(C)]` plain data with its size checked at compile time, so the two
//! sides can never disagree on a layout. Multi-byte fields that are LPM-trie key material are
//! byte arrays in network order, because the trie matches prefixes bit by bit from the first byte.
//! Hash keys have explicit padding fields: every byte of a key is hashed.
#![no_std]

use core::mem::{align_of, size_of};

/// Map names, as the kernel sees them (at most 15 bytes).
pub mod maps {
    pub const CONFIG: &str = "ZT_CONFIG";
    pub const IPCACHE: &str = "ZT_IPCACHE";
    /// Single addresses (/32, /128), found with one exact-match lookup before the ipcache.
    pub const HOSTS: &str = "ZT_HOSTS";
    pub const POLICY: &str = "ZT_POLICY";
    pub const ISOLATION: &str = "ZT_ISOLATION";
    pub const CONNTRACK: &str = "ZT_CONNTRACK";
    pub const COUNTERS: &str = "ZT_COUNTERS";
    pub const EVENTS: &str = "ZT_EVENTS";
    pub const CGROUPS: &str = "ZT_CGROUPS";
    pub const INTERFACES: &str = "ZT_INTERFACES";
    pub const EVENT_LIMITS: &str = "ZT_EVENT_LIMITS";
    pub const EVENT_FLOWS: &str = "ZT_EVENT_FLOWS";
    pub const EVENT_BUCKET: &str = "ZT_EVENT_BUCKET";
    /// IPv4 and IPv6 fragment trains: the first fragment's ports, for the fragments after it.
    pub const FRAGMENTS: &str = "ZT_FRAGMENTS";
    /// What the last agent had seen, for its successor ([`super::agent_state`]). The programs
    /// never touch it; it is in the object so it is pinned and checked like every other map.
    pub const AGENT: &str = "ZT_AGENT";

    /// Generations the policy-derived maps hold at once: the one in force and the next one,
    /// built aside (see [`super::Config::slot`]). Their capacities below are per generation.
    pub const SLOTS: u32 = 2;
    pub const IPCACHE_CAPACITY: u32 = 65_536;
    pub const HOSTS_CAPACITY: u32 = 65_536;
    /// Blocks of the policy map ([`super::PolicyKey`]): about one per (subject, peer, direction)
    /// a rule names. Allocated as used, so the capacity costs only the hash table's buckets.
    pub const POLICY_CAPACITY: u32 = 1 << 18;
    pub const ISOLATION_CAPACITY: u32 = 65_536;
    /// A build with `ZT_DATAPATH_VARIANT` set (the second datapath of the upgrade tests, see
    /// `cargo xtask test`) has a few more entries, so that upgrading to it migrates the map.
    pub const CONNTRACK_CAPACITY: u32 =
        if option_env!("ZT_DATAPATH_VARIANT").is_some() { 262_144 + 4_096 } else { 262_144 };
    pub const EVENTS_BYTES: u32 = 1 << 22;
    pub const CGROUPS_CAPACITY: u32 = 65_536;
    pub const INTERFACES_CAPACITY: u32 = 4_096;
    /// Flows whose last event the per-flow suppression window remembers (LRU).
    pub const EVENT_FLOWS_CAPACITY: u32 = 65_536;
    /// Fragment trains in flight (LRU).
    pub const FRAGMENTS_CAPACITY: u32 = 16_384;
}

/// Entries of `ZT_AGENT` (u64 each), written by the agent only.
pub mod agent_state {
    /// The `EVENTS_LOST` counter as the running agent last saw it: what a later agent finds
    /// above it was lost while no agent was reading the ring buffer.
    pub const EVENTS_LOST_SEEN: u32 = 0;
    /// Entries in `ZT_AGENT` (room to grow without a migration).
    pub const COUNT: u32 = 8;
}

/// Program names, as exported by `zt-ebpf`.
pub mod programs {
    pub const TC_INGRESS: &str = "zt_tc_ingress";
    pub const TC_EGRESS: &str = "zt_tc_egress";
    pub const XDP: &str = "zt_xdp";
    pub const CGROUP_INGRESS: &str = "zt_cgroup_ingress";
    pub const CGROUP_EGRESS: &str = "zt_cgroup_egress";
    /// What `cargo xtask bench` measures the others against: a separate object
    /// (zt-ebpf/src/reference.rs, `zt_agent::datapath::reference`).
    pub const REFERENCE_FLOOR: &str = "zt_reference_floor";
    pub const REFERENCE_LOOKUP: &str = "zt_reference_lookup";
    /// Parse, then a new flow's two conntrack inserts.
    pub const REFERENCE_ADMIT: &str = "zt_reference_admit";
    /// Parse, then an event window insert and a ring buffer record.
    pub const REFERENCE_REPORT: &str = "zt_reference_report";
}

/// Numeric identities. Below [`identity::FIRST_USER`] they are reserved.
pub mod identity {
    /// Wildcard in policy keys ("any peer"/"any subject"); never assigned to a packet.
    pub const ANY: u32 = 0;
    /// An address the ipcache has no entry for (the agent installs world prefixes, so this means
    /// the ipcache is empty or the packet has no address).
    pub const UNKNOWN: u32 = 1;
    /// Everything outside the declared identities.
    pub const WORLD: u32 = 2;
    /// The node itself (reserved for host-service identification).
    pub const HOST: u32 = 3;
    /// First identity the agent may assign to a declared workload identity.
    pub const FIRST_USER: u32 = 256;
    /// First identity of a world address range a policy names as a CIDR peer (up to 2^24 - 1:
    /// declared identities). Such ranges are carved out of `WORLD` in the ipcache so rules can
    /// tell them apart; like `WORLD`, they are never isolated.
    pub const FIRST_CIDR: u32 = 1 << 24;

    /// Whether `id` is a declared workload identity (which `ANY` subjects cover).
    pub const fn is_declared(id: u32) -> bool {
        id >= FIRST_USER && id < FIRST_CIDR
    }
}

/// Global mode in [`Config::mode`]. Enforce is zero so that a config never written (a zeroed
/// array slot) fails closed.
pub mod mode {
    /// Drop what policy denies.
    pub const ENFORCE: u32 = 0;
    /// Pass everything; report would-be denials as `audit`.
    pub const MONITOR: u32 = 1;
}

/// The node's state as every packet reads it, once: `ZT_CONFIG`'s one element, a 64-bit word
/// ([`Config::word`]) the agent writes with one atomic store through the map's memory mapping,
/// so a packet reads the old state or the new one whole. A word never written is enforce,
/// generation 0, slot 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub mode: u32,
    /// Policy generation in force; conntrack entries remember the generation that admitted them,
    /// and a flow admitted under another generation is judged again.
    pub generation: u32,
    /// Which half (0 or 1) of the policy-derived maps (`ZT_IPCACHE`, `ZT_HOSTS`, `ZT_POLICY`,
    /// `ZT_ISOLATION`) is in force: every key there carries its slot, so the agent builds the
    /// next generation in the other slot and switches to it with one write of this value.
    pub slot: u32,
}

impl Config {
    /// The word `ZT_CONFIG` holds: the generation in the low 32 bits, the slot's bit above it,
    /// the mode in the byte above that.
    pub const fn word(self) -> u64 {
        self.generation as u64 | ((self.slot & 1) as u64) << 32 | ((self.mode & 0xff) as u64) << 40
    }

    pub const fn from_word(word: u64) -> Self {
        Self { mode: (word >> 40) as u32 & 0xff, generation: word as u32, slot: (word >> 32) as u32 & 1 }
    }
}

/// Isolation flags in `ZT_ISOLATION` (identity → flags). A direction listed by a policy for a
/// subject makes that subject default-deny in that direction. Key [`identity::ANY`] applies to
/// every declared identity. Flags that depend on a direction are `FLAG << direction`
/// ([`Direction::Ingress`] 0, [`Direction::Egress`] 1).
///
/// The wildcard flags say which of a check's four groups can exist, so the kernel probes only
/// those: (subject, peer) always; (subject, any) if the subject has [`ANY_PEER`]; (any, peer) if
/// the peer has [`PEER_OF_ANY`]; (any, any) if the `ANY` entry has [`ANY_ANY`]. An identity that
/// is only a peer has an entry for its wildcard flags alone.
///
/// Policies are judged in two views at once: the *enforced* view (policies in force) decides
/// the packet's fate; the *staged* view (policies in force plus those with `mode: monitor`)
/// decides what would happen once the staged policies are enforced, and a difference is
/// reported as an audit. Each view has its own flags.
pub mod isolation {
    pub const INGRESS: u32 = 1;
    pub const EGRESS: u32 = 2;
    pub const STAGED_INGRESS: u32 = 4;
    pub const STAGED_EGRESS: u32 = 8;
    /// The staged view's flags shifted onto the enforced view's.
    pub const STAGED_SHIFT: u32 = 2;
    /// A staged policy names this subject, so its staged view may differ from its enforced one
    /// (the staged view is judged only then).
    pub const STAGED_RULES: u32 = 16;
    /// Rules of this subject name `any` peer (group (subject, any)).
    pub const ANY_PEER: u32 = 32;
    /// Rules of an `any` subject name this peer (group (any, peer)).
    pub const PEER_OF_ANY: u32 = 128;
    /// On the `ANY` entry: rules of an `any` subject name `any` peer (group (any, any)).
    pub const ANY_ANY: u32 = 512;

    /// `flag` for `direction`.
    pub const fn of(flag: u32, direction: super::Direction) -> u32 {
        flag << direction as u32
    }
}

/// Direction of a policy check, from the subject's point of view.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The destination's ingress rules decided.
    Ingress = 0,
    /// The source's egress rules decided.
    Egress = 1,
    /// No policy was consulted (conntrack, control plane, malformed packet).
    None = 2,
}
pub const DIRECTION_COUNT: u32 = 3;

/// Where a verdict was taken.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress on a workload's host-side veth: traffic leaving the workload.
    TcIngress = 0,
    /// TC egress on a workload's host-side veth: traffic entering the workload.
    TcEgress = 1,
    /// XDP on an uplink: traffic from another node.
    Xdp = 2,
    /// cgroup_skb ingress: traffic delivered to a local process.
    CgroupIngress = 3,
    /// cgroup_skb egress: traffic sent by a local process.
    CgroupEgress = 4,
}
pub const HOOK_COUNT: u32 = 5;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// Would have been denied, passed because of monitor mode.
    Audit = 2,
}
pub const VERDICT_COUNT: u32 = 3;

/// Why a verdict was taken. Every deny reason is distinct so counters explain drops.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An allow rule matched.
    PolicyAllow = 0,
    /// The packet belongs to a flow conntrack already admitted (either direction).
    Established = 1,
    /// Neither end is isolated in the direction concerned, so no policy applies.
    NotIsolated = 2,
    /// ARP and IPv6 neighbour discovery always pass.
    ControlPlane = 3,
    /// An explicit deny rule matched.
    PolicyDeny = 4,
    /// An isolated end has no rule allowing the flow.
    DefaultDeny = 5,
    /// Truncated or inconsistent headers.
    Malformed = 6,
    /// A non-first fragment of a train whose first fragment was not seen (lost, evicted, out of
    /// order or never sent): its ports are unknown.
    FragmentOrphan = 7,
    /// IPv6 extension-header chain longer than the bounded walk.
    ExtHeaderLimit = 8,
    /// A frame that is neither IPv4, IPv6 nor ARP, or has more than two VLAN tags.
    UnsupportedProtocol = 9,
    /// A non-first fragment that would overwrite part of the L4 header of its train.
    FragmentOverlap = 10,
    /// A first fragment too short to hold its L4 header.
    FragmentTiny = 11,
    /// An IPv6 first fragment whose header chain does not reach the L4 header (RFC 7112).
    FragmentSplitHeaders = 12,
    /// A source address the sending workload does not own, or the node's own address arriving
    /// from outside.
    Spoof = 13,
    /// Conntrack or the fragment table refused a new entry: the new flow is not admitted.
    TableFull = 14,
}
pub const REASON_COUNT: u32 = 15;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [Self::Allow, Self::Deny, Self::Audit];

    pub const fn from_u8(v: u8) -> Option<Self> {
        if (v as u32) < VERDICT_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The stable name used in events and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

impl Direction {
    pub const ALL: [Direction; DIRECTION_COUNT as usize] = [Self::Ingress, Self::Egress, Self::None];

    pub const fn from_u8(v: u8) -> Option<Self> {
        if (v as u32) < DIRECTION_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The stable name used in events and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::None => "none",
        }
    }
}

impl Hook {
    pub const ALL: [Hook; HOOK_COUNT as usize] =
        [Self::TcIngress, Self::TcEgress, Self::Xdp, Self::CgroupIngress, Self::CgroupEgress];

    pub const fn from_u8(v: u8) -> Option<Self> {
        if (v as u32) < HOOK_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The stable name used in events and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TcIngress => "tc-ingress",
            Self::TcEgress => "tc-egress",
            Self::Xdp => "xdp",
            Self::CgroupIngress => "cgroup-ingress",
            Self::CgroupEgress => "cgroup-egress",
        }
    }
}

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Self::PolicyAllow,
        Self::Established,
        Self::NotIsolated,
        Self::ControlPlane,
        Self::PolicyDeny,
        Self::DefaultDeny,
        Self::Malformed,
        Self::FragmentOrphan,
        Self::ExtHeaderLimit,
        Self::UnsupportedProtocol,
        Self::FragmentOverlap,
        Self::FragmentTiny,
        Self::FragmentSplitHeaders,
        Self::Spoof,
        Self::TableFull,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        if (v as u32) < REASON_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The stable name used in events and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PolicyAllow => "policy-allow",
            Self::Established => "established",
            Self::NotIsolated => "not-isolated",
            Self::ControlPlane => "control-plane",
            Self::PolicyDeny => "policy-deny",
            Self::DefaultDeny => "default-deny",
            Self::Malformed => "malformed",
            Self::FragmentOrphan => "fragment-orphan",
            Self::ExtHeaderLimit => "ext-header-limit",
            Self::UnsupportedProtocol => "unsupported-protocol",
            Self::FragmentOverlap => "fragment-overlap",
            Self::FragmentTiny => "fragment-tiny",
            Self::FragmentSplitHeaders => "fragment-split-headers",
            Self::Spoof => "spoof",
            Self::TableFull => "table-full",
        }
    }
}

/// The per-CPU `ZT_COUNTERS` array: one packet counter per (verdict, reason, direction, hook),
/// then the flow-event counters. Every judged packet is counted exactly once, whatever the event
/// limits; every packet that matters for an event is counted once more as emitted, suppressed
/// or lost.
pub mod counters {
    use super::{Direction, Hook, Reason, Verdict, DIRECTION_COUNT, HOOK_COUNT, REASON_COUNT, VERDICT_COUNT};

    /// Index of the packet counter of (verdict, reason, direction, hook).
    pub const fn packet_index(verdict: Verdict, reason: Reason, direction: Direction, hook: Hook) -> u32 {
        ((verdict as u32 * REASON_COUNT + reason as u32) * DIRECTION_COUNT + direction as u32) * HOOK_COUNT
            + hook as u32
    }
    /// Packet counters, the first entries of the array.
    pub const PACKET_COUNT: u32 = VERDICT_COUNT * REASON_COUNT * DIRECTION_COUNT * HOOK_COUNT;
    /// Flow events queued on the ring buffer.
    pub const EVENTS_EMITTED: u32 = PACKET_COUNT;
    /// Flow events not sent because of the per-flow window or the rate limit ([`super::EventLimits`]).
    pub const EVENTS_SUPPRESSED: u32 = PACKET_COUNT + 1;
    /// Flow events the ring buffer had no room for.
    pub const EVENTS_LOST: u32 = PACKET_COUNT + 2;
    /// Entries in `ZT_COUNTERS`.
    pub const COUNT: u32 = PACKET_COUNT + 3;
}

/// Whether a verdict is reported as a flow event: a rule newly allowed a flow, or anything was
/// denied or audited. Everything else (established, control plane, not isolated) is only counted.
pub const fn is_reported(verdict: Verdict, reason: Reason) -> bool {
    !matches!(verdict, Verdict::Allow) || matches!(reason, Reason::PolicyAllow)
}

/// The single entry of `ZT_EVENT_LIMITS` (key 0), written by the agent; all zeros (never written)
/// means no limit. How the kernel bounds its flow events, in this order:
///
/// 1. **Per-flow window.** After a flow (its 5-tuple) raised an event, its further events with
///    the same verdict and reason within `window_ns` are suppressed; the flow's next event after
///    the window, or with another verdict or reason, carries how many were
///    ([`FlowEvent::suppressed`]). Flows are remembered in the LRU `ZT_EVENT_FLOWS`.
/// 2. **Token bucket, per CPU.** Each CPU may emit `burst` events back to back and then one every
///    `interval_ns` (lock-free: each CPU has its own bucket in `ZT_EVENT_BUCKET`). The agent
///    splits the node-wide rate and burst evenly over the CPUs. Events over the rate are
///    suppressed and counted by their flow's next event as well.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventLimits {
    /// Per-flow suppression window in nanoseconds; 0: no window.
    pub window_ns: u64,
    /// Per CPU, nanoseconds between events at the sustained rate; 0: no rate limit.
    pub interval_ns: u64,
    /// Per CPU, events that may follow each other without spacing (at least 1 with a rate).
    pub burst: u64,
}

/// A packet's flow as the kernel's parser reads it, and as is the key of `ZT_EVENT_FLOWS` (so
/// the window needs no key built on the BPF stack, which the pipeline fills).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventFlowKey {
    /// IPv6, or IPv4 mapped (see [`IpKey`]); zero when the frame is not IP.
    pub src: IpKey,
    pub dst: IpKey,
    /// For ICMP echo: the echo identifier.
    pub src_port: u16,
    /// For ICMP: the message type.
    pub dst_port: u16,
    pub protocol: u8,
    /// 4, 6, or 0 when the frame is not IP.
    pub family: u8,
}

/// Value of `ZT_EVENT_FLOWS`: a flow's last event, and what was suppressed since.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventFlowState {
    /// When the flow's last event was emitted (`bpf_ktime_get_ns`); 0: none yet.
    pub last_event_ns: u64,
    /// Events suppressed since then, reported by the flow's next event.
    pub suppressed: u64,
    /// Verdict and reason of the last event: the window holds back only repeats of them, so a
    /// flow whose verdict changes (a revoked allow, say) is reported at once.
    pub verdict: u8,
    pub reason: u8,
    pub _pad: [u8; 6],
}

/// IP protocol numbers zt parses.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// An address as the ipcache and conntrack key it: an IPv6 address, IPv4 as `::ffff:a.b.c.d`,
/// so an IPv4 /n prefix is an IPv6 /(96 + n).
pub type IpKey = [u8; 16];

/// An address in one slot: the key of `ZT_HOSTS`, and the key material of the `ZT_IPCACHE` LPM
/// trie, where the slot byte comes first, so every prefix of one slot is longer than
/// [`SLOT_BITS`] and never matches in the other (an IPv4 /n at prefix length 8 + 96 + n).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slotted<K> {
    pub slot: u8,
    pub key: K,
}

/// Bits of the slot in front of a [`Slotted`] key.
pub const SLOT_BITS: u32 = 8;

impl<K> Slotted<K> {
    pub const fn new(slot: u32, key: K) -> Self {
        Self { slot: slot as u8, key }
    }
}

/// Key of `ZT_ISOLATION`: an identity (or [`identity::ANY`]) in one slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IsolationKey {
    pub slot: u32,
    pub identity: u32,
}

/// A (protocol, destination port) point of a policy group's space: `protocol << 16 | port`, so
/// a rule for any protocol covers every point and one for a whole protocol a block of 2^16.
pub const fn policy_point(protocol: u8, port: u16) -> u32 {
    (protocol as u32) << 16 | port as u32
}

/// The shape of the policy map's trees. A group — (slot, subject, peer, direction) — holds the
/// decisions over its point space as sorted runs of points. A block holds at most [`RUNS`] runs;
/// a block with more is *split*: its runs are in its sub-blocks at the next level, only those
/// that have any. Level `l` blocks are `2^SHIFTS[l]` points wide (the whole space, a protocol,
/// 256 ports, 8 ports): a last-level block has at most 8 points, so it always fits. A lookup
/// is one hash probe per level it descends, and one suffices for every group of up to
/// [`RUNS`] runs.
pub mod policy_tree {
    pub const RUNS: usize = 8;
    pub const LEVELS: usize = 4;
    pub const SHIFTS: [u32; LEVELS] = [24, 16, 8, 3];
    const _: () = assert!(1 << SHIFTS[LEVELS - 1] <= RUNS);
}

/// Key of the `ZT_POLICY` hash: one block of one group (see [`policy_tree`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Identity the rule protects, or [`identity::ANY`].
    pub subject: u32,
    /// Identity of the other end, or [`identity::ANY`].
    pub peer: u32,
    /// The block's first point, shifted right by its level's shift.
    pub block: u32,
    pub slot: u8,
    /// [`Direction::Ingress`] or [`Direction::Egress`].
    pub direction: u8,
    pub level: u8,
    pub _pad: u8,
}

impl PolicyKey {
    /// The key of the block at `level` that holds `point`.
    pub const fn new(slot: u32, subject: u32, peer: u32, direction: Direction, level: usize, point: u32) -> Self {
        Self {
            subject,
            peer,
            block: point >> policy_tree::SHIFTS[level],
            slot: slot as u8,
            direction: direction as u8,
            level: level as u8,
            _pad: 0,
        }
    }
}

/// What a policy rule does.
pub mod action {
    /// No rule of this view matches here (the other view's does).
    pub const NONE: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
}

/// Consecutive points with the same winning rule in each view (see [`isolation`]): deny beats
/// allow, then the lowest rule id, over every rule of the group that matches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRun {
    /// First and last point, inclusive.
    pub first: u32,
    pub last: u32,
    /// The enforced view's rule (index into the agent's rule table, starting at 1), or
    /// [`NO_RULE`].
    pub rule_id: u32,
    /// The staged view's rule.
    pub staged_rule_id: u32,
    /// [`action`] of `rule_id`, or `NONE`.
    pub action: u8,
    /// [`action`] of `staged_rule_id`, or `NONE`.
    pub staged_action: u8,
    pub _pad: [u8; 2],
}

/// Value of the `ZT_POLICY` hash: a block's runs, or that it is split.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Sorted by point, disjoint; the first `count` are in use. Points in no run match no rule.
    pub runs: [PortRun; policy_tree::RUNS],
    pub count: u8,
    /// The runs are in the sub-blocks at the next level (`count` is 0).
    pub split: u8,
    pub _pad: [u8; 2],
}

impl PolicyValue {
    /// The run holding `point`, if any: the kernel's search and the agent's evaluator's.
    #[inline(always)]
    pub fn run_at(&self, point: u32) -> Option<&PortRun> {
        let mut i = 0;
        while i < policy_tree::RUNS && i < self.count as usize {
            let run = &self.runs[i];
            if point <= run.last {
                return if run.first <= point { Some(run) } else { None };
            }
            i += 1;
        }
        None
    }
}

/// `rule_id` meaning "no rule": default deny, or no policy consulted.
pub const NO_RULE: u32 = 0;

/// Conntrack key: one entry per flow, found from both its directions. Addresses as in
/// [`IpKey`]; the flow's two ends in the order [`ct::ends`] gives. For ICMP, `src_port` is the
/// echo identifier and `dst_port` the message type, an echo reply's given as its request's
/// ([`ct::key_type`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: IpKey,
    pub dst: IpKey,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The key of a flow's packet whose ends sit as `ends` says ([`ct::ends`]): the same from
    /// both directions of the flow.
    #[inline(always)]
    pub fn of(src: &IpKey, dst: &IpKey, src_port: u16, dst_port: u16, protocol: u8, ends: ct::Ends) -> CtKey {
        let swapped = ends == ct::Ends::Swapped;
        let (first, second) = if swapped { (dst, src) } else { (src, dst) };
        let (first_port, second_port) = if protocol == proto::ICMP || protocol == proto::ICMPV6 {
            // The identifier is the flow's, not an end's.
            (src_port, ct::key_type(protocol, dst_port))
        } else if swapped {
            (dst_port, src_port)
        } else {
            (src_port, dst_port)
        };
        CtKey { src: *first, dst: *second, src_port: first_port, dst_port: second_port, protocol, _pad: [0; 3] }
    }
}

/// ICMP message types zt's conntrack knows.
pub mod icmp {
    pub const ECHO_REPLY: u8 = 0;
    pub const ECHO_REQUEST: u8 = 8;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_ECHO_REPLY: u8 = 129;
}

/// Conntrack: the order of a flow's ends in its key, and the entry flags.
pub mod ct {
    use super::{icmp, proto};

    /// Admitted only because the node was in monitor mode: ignored once the node enforces.
    pub const AUDIT: u32 = 1;
    /// The packet that started the flow had its ends swapped into the key ([`Ends::Swapped`]):
    /// a packet whose ends sit the other way than that is a reply.
    pub const SWAPPED: u32 = 4;
    /// Idle timeouts, each direction on its own: a stale direction is treated as absent.
    pub const TCP_TIMEOUT_NS: u64 = 3_600_000_000_000;
    pub const OTHER_TIMEOUT_NS: u64 = 60_000_000_000;

    /// How a packet's ends sit in its flow's key.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Ends {
        /// Source first.
        AsSent,
        /// Destination first.
        Swapped,
        /// ICMP from an address to itself: no order, the message type tells the direction.
        Same,
    }

    /// The order of a packet's ends in its flow's key, the same from both directions: the lower
    /// address first (as two native-endian u64 words: the kernel reads them so from its aligned
    /// packet record), then, with one address at both ends, the lower port (ICMP's identifier
    /// is not an end's and orders nothing).
    #[inline(always)]
    pub fn ends(src: [u64; 2], dst: [u64; 2], src_port: u16, dst_port: u16, protocol: u8) -> Ends {
        let by = |first_lower: bool| if first_lower { Ends::AsSent } else { Ends::Swapped };
        if src[0] != dst[0] {
            by(src[0] < dst[0])
        } else if src[1] != dst[1] {
            by(src[1] < dst[1])
        } else if protocol == proto::ICMP || protocol == proto::ICMPV6 {
            Ends::Same
        } else {
            by(src_port <= dst_port)
        }
    }

    /// An address as [`ends`] compares it.
    #[inline(always)]
    pub fn words(addr: &super::IpKey) -> [u64; 2] {
        let word = |at: usize| u64::from_ne_bytes([
            addr[at], addr[at + 1], addr[at + 2], addr[at + 3], addr[at + 4], addr[at + 5], addr[at + 6], addr[at + 7],
        ]);
        [word(0), word(8)]
    }

    /// The message type an ICMP flow's key holds for a packet of type `icmp_type`: an echo
    /// reply's request type, so a ping and its answer share one entry.
    #[inline(always)]
    pub fn key_type(protocol: u8, icmp_type: u16) -> u16 {
        match (protocol, icmp_type as u8) {
            (proto::ICMP, icmp::ECHO_REPLY) => icmp::ECHO_REQUEST as u16,
            (proto::ICMPV6, icmp::V6_ECHO_REPLY) => icmp::V6_ECHO_REQUEST as u16,
            _ => icmp_type,
        }
    }

    /// The type of the answer an ICMP message of type `icmp_type` admits: an echo request's
    /// reply; none for other messages.
    #[inline(always)]
    pub fn answer_type(protocol: u8, icmp_type: u16) -> Option<u16> {
        match (protocol, icmp_type as u8) {
            (proto::ICMP, icmp::ECHO_REQUEST) => Some(icmp::ECHO_REPLY as u16),
            (proto::ICMPV6, icmp::V6_ECHO_REQUEST) => Some(icmp::V6_ECHO_REPLY as u16),
            _ => None,
        }
    }
}

/// A conntrack entry: an admitted flow, both directions. Index 0 of the per-direction fields is
/// the direction of the packet that started the flow, 1 its replies'.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Per direction: when a packet of it last passed.
    pub last_seen_ns: [u64; 2],
    pub rule_id: u32,
    /// The policy generation that admitted (or last re-admitted) the flow.
    pub generation: u32,
    /// [`ct::AUDIT`], [`ct::SWAPPED`].
    pub flags: u32,
    /// Per direction: the interface its packets last passed a source check on (an uplink or a
    /// workload's interface) under this generation, or 0. A packet of that direction arriving
    /// there again skips the check, whose answer depends only on the interface, the source and
    /// the policy in force.
    pub ifindex: [u32; 2],
    /// The flow's destination port (ICMP: the type of the message that started it), to judge
    /// the flow again from either direction's packet.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// One verdict, sent from the kernel on the `ZT_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub src_addr: IpKey,
    pub dst_addr: IpKey,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Deciding rule, or [`NO_RULE`].
    pub rule_id: u32,
    pub ifindex: u32,
    pub generation: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// 4, 6, or 0 when the frame is not IP.
    pub family: u8,
    pub hook: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub mode: u8,
    /// How the ends were identified: [`event_flags`].
    pub flags: u8,
    /// The local process's cgroup id on cgroup hooks, else 0.
    pub cgroup_id: u64,
    /// Events of this flow suppressed since its previous event ([`EventLimits`]).
    pub suppressed: u64,
}

/// Key of `ZT_FRAGMENTS`: a fragment train as the receiver reassembles it. `protocol` is the IPv4
/// protocol, or the IPv6 fragment header's next header (the same in every fragment of a train).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: IpKey,
    pub dst: IpKey,
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// What the first fragment of a train said, for the fragments after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentValue {
    pub first_seen_ns: u64,
    pub src_port: u16,
    pub dst_port: u16,
    /// Where the L4 header ends, in bytes from the start of the fragmented data: a later
    /// fragment starting before it would rewrite the header the verdict was taken on.
    pub l4_end: u16,
    /// The L4 protocol.
    pub protocol: u8,
    pub _pad: u8,
}

/// How long a fragment train is followed after its first fragment (Linux gives up reassembly
/// after 30 s for IPv4 and 60 s for IPv6).
pub const FRAGMENT_TIMEOUT_NS: u64 = 60_000_000_000;

/// Value of `ZT_INTERFACES`: what the agent knows about an interface it attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// The identity of the workload behind it, or [`identity::ANY`]: identify it by address.
    pub identity: u32,
    /// [`interface_flags`].
    pub flags: u32,
}

/// [`InterfaceInfo::flags`]: which source-address checks the interface's packets get.
pub mod interface_flags {
    /// A workload's host-side interface: a source must be routed back through it (strict
    /// reverse path), and must not belong to another identity.
    pub const WORKLOAD: u32 = 1;
    /// An uplink: a source must not be the node's own or a local workload's.
    pub const UPLINK: u32 = 2;
}

/// [`FlowEvent::flags`]: an end not flagged was identified by its address (the ipcache).
pub mod event_flags {
    pub const SRC_CGROUP: u8 = 1;
    pub const DST_CGROUP: u8 = 2;
    pub const SRC_INTERFACE: u8 = 4;
    pub const DST_INTERFACE: u8 = 8;
    /// An audit raised by a staged (`mode: monitor`) policy: the policies in force let the
    /// packet through, the staged ones would not; reason, direction and rule are the staged
    /// view's.
    pub const STAGED: u8 = 16;
}

macro_rules! assert_layout {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(size_of::<$t>() == $size && align_of::<$t>() == $align);
    };
}
assert_layout!(Config, 12, 4);
assert_layout!(Slotted<IpKey>, 17, 1);
assert_layout!(PolicyKey, 16, 4);
assert_layout!(PortRun, 20, 4);
assert_layout!(PolicyValue, 20 * policy_tree::RUNS + 4, 4);
assert_layout!(IsolationKey, 8, 4);
assert_layout!(CtKey, 40, 2);
assert_layout!(CtValue, 40, 8);
assert_layout!(FlowEvent, 88, 8);
assert_layout!(EventLimits, 24, 8);
assert_layout!(EventFlowKey, 38, 2);
assert_layout!(EventFlowState, 24, 8);
assert_layout!(FragmentKey, 40, 4);
assert_layout!(FragmentValue, 16, 8);
assert_layout!(InterfaceInfo, 8, 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) with explicit padding fields, so every byte is initialised.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::Slotted<super::IpKey> {}
    unsafe impl aya::Pod for super::IsolationKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::EventLimits {}
    unsafe impl aya::Pod for super::EventFlowKey {}
    unsafe impl aya::Pod for super::EventFlowState {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentValue {}
    unsafe impl aya::Pod for super::InterfaceInfo {}
}
