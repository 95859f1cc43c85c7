//! The maps the agent fills and reads. Names and layouts come from `zt_common`.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use zt_common::{
    maps::{
        CGROUPS_CAPACITY, CONNTRACK_CAPACITY, EVENTS_BYTES, INTERFACES_CAPACITY, IPCACHE_CAPACITY,
        ISOLATION_CAPACITY, POLICY_CAPACITY,
    },
    Config, CtKey, CtValue, IpKey, PolicyKey, PolicyValue, COUNTER_COUNT,
};

#[map]
pub static ZT_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Address prefix → identity.
#[map]
pub static ZT_IPCACHE: LpmTrie<IpKey, u32> = LpmTrie::with_max_entries(IPCACHE_CAPACITY, 0);

/// cgroup id (the cgroup directory's inode) → identity of the processes in it.
#[map]
pub static ZT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(CGROUPS_CAPACITY, 0);

/// Host-side interface index → identity of the workload behind it.
#[map]
pub static ZT_INTERFACES: HashMap<u32, u32> = HashMap::with_max_entries(INTERFACES_CAPACITY, 0);

/// (subject, peer, direction, protocol, port prefix) → rule.
#[map]
pub static ZT_POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(POLICY_CAPACITY, 0);

/// Identity → isolation flags.
#[map]
pub static ZT_ISOLATION: HashMap<u32, u32> = HashMap::with_max_entries(ISOLATION_CAPACITY, 0);

#[map]
pub static ZT_CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_CAPACITY, 0);

#[map]
pub static ZT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
pub static ZT_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
