//! Read-only handles on the datapath's maps, on duplicates of the datapath's own descriptors, so
//! that a metrics scrape reads the kernel without taking the datapath lock (which a reload holds
//! for as long as it stages and switches a policy). Duplicated rather than opened again by map
//! id, which only CAP_SYS_ADMIN may do.


use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray},
    Pod,
};
use zt_common::{Config, CtKey, CtValue, EventFlowKey, EventFlowState, IpKey, IsolationKey, PolicyKey, PolicyValue, Slotted};

use super::{
    config::ConfigWord,
    counters::{self, Counters},
};

/// Descriptors of the maps a [`Probe`] watches.
pub struct Fds {
    pub config: OwnedFd,
    pub counters: OwnedFd,
    pub ipcache: OwnedFd,
    pub hosts: OwnedFd,
    pub policy: OwnedFd,
    pub isolation: OwnedFd,
    pub cgroups: OwnedFd,
    pub interfaces: OwnedFd,
    pub conntrack: OwnedFd,
    pub fragments: OwnedFd,
    pub event_flows: OwnedFd,
}

/// A new descriptor of a map the datapath holds.
pub fn dup(data: &MapData) -> Result<OwnedFd> {
    data.fd().as_fd().try_clone_to_owned().context("duplicating a map descriptor")
}

/// The data of a map still held by the loaded object.
pub fn data_of(map: &Map) -> Result<&MapData> {
    match map {
        Map::HashMap(data) | Map::LruHashMap(data) | Map::LpmTrie(data) | Map::Array(data) | Map::PerCpuArray(data) => {
            Ok(data)
        }
        _ => anyhow::bail!("unexpected map type"),
    }
}

/// How full one map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapUsage {
    /// Short name: `ipcache`, `hosts`, `policy`, `isolation`, `conntrack`, `fragments`, `cgroups`,
    /// `interfaces`, `event_flows`.
    pub name: &'static str,
    pub entries: u64,
    /// The map's `max_entries` (both policy slots for the slotted maps).
    pub capacity: u64,
}

pub struct Probe {
    config: ConfigWord,
    counters: PerCpuArray<MapData, u64>,
    ipcache: LpmTrie<MapData, Slotted<IpKey>, u32>,
    hosts: HashMap<MapData, Slotted<IpKey>, u32>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    isolation: HashMap<MapData, IsolationKey, u32>,
    cgroups: HashMap<MapData, u64, u32>,
    interfaces: HashMap<MapData, u32, zt_common::InterfaceInfo>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    fragments: HashMap<MapData, zt_common::FragmentKey, zt_common::FragmentValue>,
    event_flows: HashMap<MapData, EventFlowKey, EventFlowState>,
}

fn open<T: TryFrom<Map, Error = MapError>>(fd: OwnedFd, wrap: fn(MapData) -> Map) -> Result<T> {
    let data = MapData::from_fd(fd).context("opening a map descriptor")?;
    let id = data.info().map_or(0, |info| info.id());
    T::try_from(wrap(data)).with_context(|| format!("map id {id} has an unexpected type"))
}

impl Probe {
    pub fn open(fds: Fds) -> Result<Self> {
        Ok(Self {
            config: ConfigWord::new(MapData::from_fd(fds.config).context("opening the config map")?)?,
            counters: open(fds.counters, Map::PerCpuArray)?,
            ipcache: open(fds.ipcache, Map::LpmTrie)?,
            hosts: open(fds.hosts, Map::HashMap)?,
            policy: open(fds.policy, Map::HashMap)?,
            isolation: open(fds.isolation, Map::HashMap)?,
            cgroups: open(fds.cgroups, Map::HashMap)?,
            interfaces: open(fds.interfaces, Map::HashMap)?,
            conntrack: open(fds.conntrack, Map::LruHashMap)?,
            fragments: open(fds.fragments, Map::LruHashMap)?,
            event_flows: open(fds.event_flows, Map::LruHashMap)?,
        })
    }

    /// The config in force (the default if none was written, as the kernel reads it).
    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get())
    }

    pub fn counters(&self) -> Result<Counters> {
        counters::read(&self.counters)
    }

    /// Entries and capacity of every map that fills up. Costs one syscall per entry (the
    /// kernel's key walk), so a full conntrack takes a fraction of a second.
    pub fn map_usage(&self) -> Result<Vec<MapUsage>> {
        Ok(vec![
            usage("ipcache", self.ipcache.map(), self.ipcache.keys())?,
            usage("hosts", self.hosts.map(), self.hosts.keys())?,
            usage("policy", self.policy.map(), self.policy.keys())?,
            usage("isolation", self.isolation.map(), self.isolation.keys())?,
            usage("conntrack", self.conntrack.map(), self.conntrack.keys())?,
            usage("fragments", self.fragments.map(), self.fragments.keys())?,
            usage("cgroups", self.cgroups.map(), self.cgroups.keys())?,
            usage("interfaces", self.interfaces.map(), self.interfaces.keys())?,
            usage("event_flows", self.event_flows.map(), self.event_flows.keys())?,
        ])
    }
}

/// Counts the keys a walk of the map yields. The kernel restarts a walk whose last key was
/// removed meanwhile, so under churn the count is capped at the capacity.
fn usage<K: Pod>(
    name: &'static str,
    map: &MapData,
    keys: impl Iterator<Item = Result<K, MapError>>,
) -> Result<MapUsage> {
    let capacity = u64::from(map.info()?.max_entries());
    let mut entries = 0;
    for key in keys.take(capacity as usize) {
        key.with_context(|| format!("walking the {name} map"))?;
        entries += 1;
    }
    Ok(MapUsage { name, entries, capacity })
}
