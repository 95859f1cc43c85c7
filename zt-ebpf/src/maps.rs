//! The maps the agent fills and reads. Names and layouts come from `zt_common`.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

use crate::parse::Packet;
use zt_common::{
    agent_state, counters,
    maps::{
        CGROUPS_CAPACITY, CONNTRACK_CAPACITY, EVENTS_BYTES, EVENT_FLOWS_CAPACITY, FRAGMENTS_CAPACITY,
        HOSTS_CAPACITY, INTERFACES_CAPACITY, IPCACHE_CAPACITY, ISOLATION_CAPACITY, POLICY_CAPACITY, SLOTS,
    },
    CtKey, CtValue, EventFlowKey, EventFlowState, EventLimits, FragmentKey, FragmentValue, InterfaceInfo, IpKey,
    IsolationKey, PolicyKey, PolicyValue, Slotted,
};

/// The node's mode, generation and slot as one word (`Config::word`). Memory-mapped: the agent
/// writes the word with one atomic store (a map update would copy it in place, and a packet
/// could read a mix), and a packet reads it with one load, no helper call.
#[map]
pub static ZT_CONFIG: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// (slot, address prefix) → identity, for prefixes shorter than an address.
#[map]
pub static ZT_IPCACHE: LpmTrie<Slotted<IpKey>, u32> = LpmTrie::with_max_entries(SLOTS * IPCACHE_CAPACITY, 0);

/// (slot, address) → identity: the ipcache's full-length entries, which are its longest match
/// wherever they exist, in a hash, whose lookup costs the same however many there are.
#[map]
pub static ZT_HOSTS: HashMap<Slotted<IpKey>, u32> = HashMap::with_max_entries(SLOTS * HOSTS_CAPACITY, BPF_F_NO_PREALLOC);

/// cgroup id (the cgroup directory's inode) → identity of the processes in it. Not slotted:
/// identity ids are derived from names, so a binding stays valid across generations.
#[map]
pub static ZT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(CGROUPS_CAPACITY, 0);

/// Interface index → what the agent attached there: the identity of the workload behind it (if
/// it is selected by interface) and the source checks it gets. Not slotted, as cgroups.
#[map]
pub static ZT_INTERFACES: HashMap<u32, InterfaceInfo> = HashMap::with_max_entries(INTERFACES_CAPACITY, 0);

/// (subject, peer, block, slot, direction, level) → the block's runs (`zt_common::policy_tree`).
/// Allocated as used: most groups are one block of one run, a few are many.
#[map]
pub static ZT_POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::with_max_entries(SLOTS * POLICY_CAPACITY, BPF_F_NO_PREALLOC);

/// (slot, identity) → isolation flags.
#[map]
pub static ZT_ISOLATION: HashMap<IsolationKey, u32> = HashMap::with_max_entries(SLOTS * ISOLATION_CAPACITY, 0);

#[map]
pub static ZT_CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);

/// Packet and event counters, laid out by `zt_common::counters`.
#[map]
pub static ZT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
pub static ZT_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Fragment train → its first fragment's ports (see `fragment`).
#[map]
pub static ZT_FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::with_max_entries(FRAGMENTS_CAPACITY, 0);

/// The route lookup of the source check, one per CPU: 64 bytes the stack has no room for.
#[map]
pub static ZT_FIB: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// The packet being judged, one per CPU: kernel-internal scratch space, off the 512-byte stack.
#[map]
pub static ZT_SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// Key 0 → the event limits. An array: a reader racing an update may mix old and new fields,
/// which at worst applies one limit a packet early.
#[map]
pub static ZT_EVENT_LIMITS: Array<EventLimits> = Array::with_max_entries(1, 0);

/// Flow → when it last raised an event and how many of its events were suppressed since.
#[map]
pub static ZT_EVENT_FLOWS: LruHashMap<EventFlowKey, EventFlowState> =
    LruHashMap::with_max_entries(EVENT_FLOWS_CAPACITY, 0);

/// Key 0 → each CPU's token bucket, as the time its budget is spent until (GCRA).
#[map]
pub static ZT_EVENT_BUCKET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The agent's own notes for its successor (`zt_common::agent_state`); no program reads it.
#[map]
pub static ZT_AGENT: Array<u64> = Array::with_max_entries(agent_state::COUNT, 0);
