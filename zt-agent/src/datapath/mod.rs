//! The kernel side as the agent sees it: load the embedded eBPF object ([`load`]: onto the maps
//! pinned in zt's bpffs directory, [`pins`]), fill its maps from a compiled policy, attach it
//! as pinned links ([`attach`]), flip the mode. Dropping a `Datapath` detaches nothing: the pins
//! keep enforcing until `zt-agent detach` ([`pins::detach`]) removes them. (A datapath loaded
//! with [`Datapath::load`], for `policy test` and the kernel tests, pins nothing and attaches
//! nothing.)
//!
//! **Generations.** The policy-derived maps (`ZT_IPCACHE`, `ZT_HOSTS`, `ZT_POLICY`, `ZT_ISOLATION`) have two
//! slots: every key carries one. Packets use the slot named by `ZT_CONFIG`, which they read once.
//! A new policy is [`staged`](Datapath::stage) in the other slot while the old one stays in force,
//! then [`switch`](Datapath::switch) makes it current with one write of the config (slot and
//! generation together), waits until no program can still be using the old slot, and empties it.
//! `ZT_CGROUPS` and `ZT_INTERFACES` are not slotted: their values are identity ids, which are
//! derived from names and so equal in every generation that declares the name.

pub mod attach;
pub mod capacity;
pub mod config;
pub mod counters;
pub mod load;
pub mod pins;
pub mod probe;
mod sys;
pub mod watch;

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, IterableMap as _, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{CgroupSkb, SchedClassifier, Xdp},
    Ebpf,
};
use zt_common::{
    identity, maps, programs, Config, EventLimits, InterfaceInfo, IpKey, IsolationKey, PolicyKey, PolicyValue, Slotted,
    SLOT_BITS,
};

pub use load::{StartKind, StartReport};
pub use pins::PinDir;
use sys::GracePeriod;

use crate::{
    events::limits::EventLimitSettings,
    policy::compile::{ip_key, ipcache_prefix, Compiled},
};
use capacity::Capacities;
use config::ConfigWord;
use counters::Counters;
use probe::Probe;

/// The eBPF object, built from `zt-ebpf` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt-ebpf"));

/// The benchmarks' reference programs (zt-ebpf/src/reference.rs), loaded into their own
/// object: the floor and a parse-and-one-lookup filter. Only with the `reference-programs`
/// feature, which the benchmarks turn on; the agent does not carry them.
#[cfg(feature = "reference-programs")]
pub fn reference_programs() -> Result<Ebpf> {
    static REFERENCE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt-reference"));
    if REFERENCE.is_empty() {
        bail!("built with AYA_BUILD_SKIP: no reference programs; rebuild without it");
    }
    let mut ebpf = Ebpf::load(REFERENCE).context("loading the reference object (are you root?)")?;
    for name in [programs::REFERENCE_FLOOR, programs::REFERENCE_LOOKUP, programs::REFERENCE_ADMIT, programs::REFERENCE_REPORT] {
        let program: &mut aya::programs::Xdp = program_mut(&mut ebpf, name)?;
        program.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}

fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!("this zt-agent was built with AYA_BUILD_SKIP set and carries no eBPF object; rebuild it with `cargo xtask build`");
    }
    Ok(OBJECT)
}

/// Node-wide enforcement mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pass everything, report would-be denials as `audit` events.
    Monitor,
    /// Drop what policy denies.
    Enforce,
}

impl Mode {
    pub fn from_raw(raw: u32) -> Self {
        if raw == zt_common::mode::ENFORCE { Mode::Enforce } else { Mode::Monitor }
    }
    pub fn raw(self) -> u32 {
        match self {
            Mode::Monitor => zt_common::mode::MONITOR,
            Mode::Enforce => zt_common::mode::ENFORCE,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        }
    }
}

/// Where a program is attached, for `status` and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub hook: &'static str,
    /// The target as its link's pin names it (`pins::PinDir::link`).
    #[serde(skip)]
    pub pin_target: String,
}

pub struct Datapath {
    ebpf: Ebpf,
    config: ConfigWord,
    ipcache: LpmTrie<MapData, Slotted<IpKey>, u32>,
    hosts: HashMap<MapData, Slotted<IpKey>, u32>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    isolation: HashMap<MapData, IsolationKey, u32>,
    cgroups: HashMap<MapData, u64, u32>,
    interfaces: HashMap<MapData, u32, InterfaceInfo>,
    counters: PerCpuArray<MapData, u64>,
    event_limits: Array<MapData, EventLimits>,
    agent_state: Array<MapData, u64>,
    attachments: Vec<Attachment>,
    grace_period: GracePeriod,
    /// Where this datapath is pinned; `None` for a private one ([`Datapath::load`]).
    pins: Option<PinDir>,
    start: StartReport,
    capacities: Capacities,
}

/// The data of an array the object declares, taken from it.
fn take_map_data(ebpf: &mut Ebpf, name: &str) -> Result<MapData> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::Array(data)) => Ok(data),
        Some(_) => bail!("map {name} is not an array"),
        None => bail!("eBPF object has no map {name}"),
    }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf.take_map(name).with_context(|| format!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads every program (the verifier runs here) on maps of its own, pinning and attaching
    /// nothing: for `policy test` and the kernel tests.
    pub fn load() -> Result<Self> {
        Self::load_sized(Capacities::default())
    }

    /// [`load`](Self::load), with the maps sized by `capacities`.
    pub fn load_sized(capacities: Capacities) -> Result<Self> {
        let mut loader = aya::EbpfLoader::new();
        capacities.apply(&mut loader);
        let ebpf = loader.load(object()?).context("loading the eBPF object (are you root?)")?;
        Self::from_object(ebpf, capacities)
    }

    /// Verifies the programs of a loaded object and takes its maps.
    fn from_object(mut ebpf: Ebpf, capacities: Capacities) -> Result<Self> {
        for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            program.load().with_context(|| format!("verifying {name}"))?;
        }
        let xdp: &mut Xdp = program_mut(&mut ebpf, programs::XDP)?;
        xdp.load().with_context(|| format!("verifying {}", programs::XDP))?;
        for name in [programs::CGROUP_INGRESS, programs::CGROUP_EGRESS] {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            program.load().with_context(|| format!("verifying {name}"))?;
        }
        Ok(Self {
            config: ConfigWord::new(take_map_data(&mut ebpf, maps::CONFIG)?)?,
            ipcache: take_map(&mut ebpf, maps::IPCACHE)?,
            hosts: take_map(&mut ebpf, maps::HOSTS)?,
            policy: take_map(&mut ebpf, maps::POLICY)?,
            isolation: take_map(&mut ebpf, maps::ISOLATION)?,
            cgroups: take_map(&mut ebpf, maps::CGROUPS)?,
            interfaces: take_map(&mut ebpf, maps::INTERFACES)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            event_limits: take_map(&mut ebpf, maps::EVENT_LIMITS)?,
            agent_state: take_map(&mut ebpf, maps::AGENT)?,
            ebpf,
            attachments: Vec::new(),
            grace_period: GracePeriod::new()?,
            pins: None,
            start: StartReport::default(),
            capacities,
        })
    }

    /// How this datapath was found at start (fresh, adopted, migrated).
    pub fn start_report(&self) -> &StartReport {
        &self.start
    }

    /// An entry of `ZT_AGENT` (`zt_common::agent_state`).
    pub fn agent_state(&self, index: u32) -> Result<u64> {
        Ok(self.agent_state.get(&index, 0)?)
    }

    /// Notes the kernel's count of lost events as seen: a later agent reports what it finds
    /// above it as lost while no agent ran.
    pub fn note_events_seen(&mut self) -> Result<()> {
        let lost = self.counters.get(&zt_common::counters::EVENTS_LOST, 0)?.iter().sum::<u64>();
        self.agent_state.set(zt_common::agent_state::EVENTS_LOST_SEEN, lost, 0)?;
        Ok(())
    }

    /// Once every attachment runs this datapath's programs: the maps migrated beside the old
    /// ones replace them (conntrack first takes the flows the old programs admitted meanwhile),
    /// and the programs are pinned in place of the old ones, which are freed with their last link.
    pub fn finish_migration(&mut self) -> Result<()> {
        let Some(pins) = self.pins.take() else { return Ok(()) };
        let result = self.finish_migration_in(&pins);
        self.pins = Some(pins);
        result
    }

    fn finish_migration_in(&mut self, pins: &PinDir) -> Result<()> {
        if !self.start.migrated_maps.is_empty() {
            // No old program is still running once this returns.
            self.grace_period.wait()?;
            if self.start.migrated_maps.iter().any(|m| m == maps::CONNTRACK) {
                let copied = self.copy_flows(pins)?;
                tracing::info!(copied, "flows admitted by the old programs during the switch copied");
            }
            for name in &self.start.migrated_maps {
                std::fs::rename(pins.maps_next().join(name), pins.maps().join(name))
                    .with_context(|| format!("replacing the pin of migrated map {name}"))?;
            }
        }
        // Pins of maps and programs this object no longer has (an upgrade removed them): the
        // programs that used them were just replaced, and the kernel frees them with their last user.
        for (dir, declared) in [
            (pins.maps(), load::object_definitions()?.into_iter().map(|(name, _)| name).collect::<Vec<_>>()),
            (pins.programs(), self.ebpf.programs().map(|(name, _)| name.to_owned()).collect()),
        ] {
            for pin in pins::entries(&dir)? {
                let name = pin.file_name().expect("a pin has a name").to_string_lossy().into_owned();
                if !declared.contains(&name) {
                    tracing::info!(pin = %pin.display(), "removing the pin of an object this datapath no longer has");
                    std::fs::remove_file(&pin)?;
                }
            }
        }
        let names: Vec<String> = self.ebpf.programs().map(|(name, _)| name.to_owned()).collect();
        for name in names {
            // Pinned aside, then renamed over the old pin: never a moment without one.
            let next = pins.programs_next().join(&name);
            if next.exists() {
                std::fs::remove_file(&next)?;
            }
            let program = self.ebpf.program_mut(&name).expect("listed");
            program.pin(&next).with_context(|| format!("pinning program {name}"))?;
            std::fs::rename(&next, pins.programs().join(&name))?;
        }
        Ok(())
    }

    /// Makes `compiled` the policy in force: [`stage`](Self::stage), then
    /// [`switch`](Self::switch). Returns the new generation (1 on a fresh datapath).
    pub fn install(&mut self, compiled: &Compiled) -> Result<u32> {
        self.stage(compiled)?;
        self.switch()
    }

    /// Writes `compiled` into the slot not in force, emptied first; packets keep using the
    /// other slot until [`switch`](Self::switch). On an error, [`discard_staged`](Self::discard_staged).
    pub fn stage(&mut self, compiled: &Compiled) -> Result<()> {
        // Refused before anything is written: the generation in force stays whole.
        let (hosts, prefixes): (Vec<_>, Vec<_>) =
            compiled.ipcache.iter().partition(|(net, _)| net.prefix_len() == net.max_prefix_len());
        capacity::check_fits(maps::IPCACHE, prefixes.len(), self.capacities.per_generation(maps::IPCACHE))?;
        capacity::check_fits(maps::HOSTS, hosts.len(), self.capacities.per_generation(maps::HOSTS))?;
        capacity::check_fits(maps::POLICY, compiled.policy.len(), self.capacities.per_generation(maps::POLICY))?;
        let slot = self.staging_slot()?;
        self.clear_slot(slot)?;
        for &(net, id) in prefixes {
            let (prefix_len, key) = ipcache_prefix(&net);
            self.ipcache
                .insert(&Key::new(SLOT_BITS + prefix_len, Slotted::new(slot, key)), id, 0)
                .with_context(|| format!("ipcache full at {net} (capacity {})", self.capacities.per_generation(maps::IPCACHE)))?;
        }
        // The hash maps in batches: a large generation is a few dozen calls, not one per entry.
        sys::update_batch(self.hosts.map(), hosts.iter().map(|(net, id)| (Slotted::new(slot, ip_key(net.addr())), *id)))
            .with_context(|| full("hosts map", self.capacities.per_generation(maps::HOSTS), "hosts"))?;
        let isolation = compiled.isolation.iter().map(|(id, flags)| (IsolationKey { slot, identity: *id }, *flags));
        sys::update_batch(self.isolation.map(), isolation)
            .with_context(|| format!("isolation map full (capacity {})", maps::ISOLATION_CAPACITY))?;
        let policy = compiled.policy.iter().map(|block| (PolicyKey { slot: slot as u8, ..block.key }, block.value()));
        sys::update_batch(self.policy.map(), policy)
            .with_context(|| format!("policy map full (capacity {})", self.capacities.per_generation(maps::POLICY)))?;
        Ok(())
    }

    /// Empties the slot not in force (after a failed [`stage`](Self::stage)).
    pub fn discard_staged(&mut self) -> Result<()> {
        let slot = self.staging_slot()?;
        self.clear_slot(slot)
    }

    /// Puts the staged slot in force with one config write — the next generation, in the other
    /// slot, mode unchanged — so every packet is judged wholly by the old generation or wholly
    /// by the new one. Then waits until no program still runs with the old config and empties
    /// the old slot. Returns the new generation; an error means the old generation is still in
    /// force.
    pub fn switch(&mut self) -> Result<u32> {
        let old = self.config()?;
        // Generation 0 means "never installed"; it is skipped when the counter wraps.
        let generation = old.generation.wrapping_add(1).max(1);
        let new = Config { generation, slot: 1 - old.slot, ..old };
        self.config.set(new);
        // The switch is done. What is left in the old slot is invisible to packets, and the
        // next `stage` empties it anyway; it is only removed once no program can be reading it.
        if let Err(err) = self.grace_period.wait().and_then(|()| self.clear_slot(old.slot)) {
            tracing::warn!(error = %format!("{err:#}"), slot = old.slot, "the previous generation's map entries stay until the next reload");
        }
        Ok(generation)
    }

    /// The config in force; a datapath nothing was written to enforces generation 0 in slot 0.
    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get())
    }

    fn staging_slot(&self) -> Result<u32> {
        Ok(1 - self.config()?.slot)
    }

    /// Removes every entry of `slot` from the slotted maps.
    fn clear_slot(&mut self, slot: u32) -> Result<()> {
        // Keys are collected before any is removed (removing during the walk could skip some);
        // a failed step of the walk ends the collection with its error.
        let ipcache: Vec<_> = self
            .ipcache
            .keys()
            .filter(|key| key.as_ref().map_or(true, |key| u32::from(key.data().slot) == slot))
            .collect::<Result<_, _>>()?;
        for key in ipcache {
            remove_if_present(self.ipcache.remove(&key))?;
        }
        // The hash maps are walked and emptied in batches.
        empty_slot::<_, u32>(self.hosts.map(), "hosts", |key: &Slotted<IpKey>| u32::from(key.slot) == slot)?;
        empty_slot::<_, PolicyValue>(self.policy.map(), "policy", |key: &PolicyKey| u32::from(key.slot) == slot)?;
        empty_slot::<_, u32>(self.isolation.map(), "isolation", |key: &IsolationKey| key.slot == slot)?;
        Ok(())
    }

    /// Switches monitor/enforce with one map write; nothing is reloaded.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let config = Config { mode: mode.raw(), ..self.config()? };
        self.config.set(config);
        Ok(())
    }

    /// Processes in cgroup `cgroup_id` are identity `id`, wherever they send from.
    pub fn bind_cgroup(&mut self, cgroup_id: u64, id: u32) -> Result<()> {
        self.cgroups
            .insert(cgroup_id, id, 0)
            .with_context(|| full("cgroup map", self.capacities.per_generation(maps::CGROUPS), "cgroups"))
    }

    /// The cgroup ids bound to an identity, as the kernel has them.
    pub fn cgroup_bindings(&self) -> Result<Vec<u64>> {
        Ok(self.cgroups.keys().collect::<Result<_, _>>()?)
    }

    /// The interface indexes bound to an identity, as the kernel has them.
    pub fn interface_bindings(&self) -> Result<Vec<u32>> {
        let mut bound = Vec::new();
        for entry in self.interfaces.iter() {
            let (ifindex, info) = entry?;
            if info.identity != identity::ANY {
                bound.push(ifindex);
            }
        }
        Ok(bound)
    }

    fn interface_info(&self, ifindex: u32) -> InterfaceInfo {
        self.interfaces.get(&ifindex, 0).unwrap_or_default()
    }

    fn write_interface(&mut self, ifindex: u32, info: InterfaceInfo) -> Result<()> {
        if info == InterfaceInfo::default() {
            return remove_if_present(self.interfaces.remove(&ifindex));
        }
        self.interfaces
            .insert(ifindex, info, 0)
            .with_context(|| full("interface map", self.capacities.per_generation(maps::INTERFACES), "interfaces"))
    }

    /// Marks an interface the agent attaches to with the source checks its packets get
    /// (`zt_common::interface_flags`), before its programs run.
    pub(super) fn mark_interface(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let info = self.interface_info(ifindex);
        self.write_interface(ifindex, InterfaceInfo { flags: info.flags | flags, ..info })
    }

    pub fn unbind_cgroup(&mut self, cgroup_id: u64) -> Result<()> {
        remove_if_present(self.cgroups.remove(&cgroup_id))
    }

    /// The workload behind host-side interface `ifindex` is identity `id`.
    pub fn bind_interface(&mut self, ifindex: u32, id: u32) -> Result<()> {
        let info = self.interface_info(ifindex);
        self.write_interface(ifindex, InterfaceInfo { identity: id, ..info })
    }

    /// `addr` alone is identity `id` (a certificate binding), over any prefix that covers it,
    /// in the generation in force.
    pub fn bind_address(&mut self, addr: std::net::IpAddr, id: u32) -> Result<()> {
        let slot = self.config()?.slot;
        self.bind_address_in(slot, addr, id)
    }

    /// Like [`bind_address`](Self::bind_address), in the staged generation: bindings that must
    /// hold from the moment of the [`switch`](Self::switch) on.
    pub fn stage_address(&mut self, addr: std::net::IpAddr, id: u32) -> Result<()> {
        let slot = self.staging_slot()?;
        self.bind_address_in(slot, addr, id)
    }

    /// A single address goes to the hosts map, which the kernel consults before the ipcache.
    fn bind_address_in(&mut self, slot: u32, addr: std::net::IpAddr, id: u32) -> Result<()> {
        self.hosts
            .insert(Slotted::new(slot, ip_key(addr)), id, 0)
            .with_context(|| full(&format!("hosts map at {addr}"), self.capacities.per_generation(maps::HOSTS), "hosts"))
    }

    pub fn unbind_address(&mut self, addr: std::net::IpAddr) -> Result<()> {
        let slot = self.config()?.slot;
        remove_if_present(self.hosts.remove(&Slotted::new(slot, ip_key(addr))))
    }

    /// Entries in the slotted maps, by slot: (ipcache and hosts, policy, isolation). For tests.
    pub fn slot_entries(&self) -> Result<[(usize, usize, usize); 2]> {
        let mut counts = [(0, 0, 0); 2];
        for key in self.ipcache.keys() {
            counts[usize::from(key?.data().slot & 1)].0 += 1;
        }
        for key in self.hosts.keys() {
            counts[usize::from(key?.slot & 1)].0 += 1;
        }
        for key in self.policy.keys() {
            counts[usize::from(key?.slot & 1)].1 += 1;
        }
        for key in self.isolation.keys() {
            counts[(key?.slot & 1) as usize].2 += 1;
        }
        Ok(counts)
    }

    /// The interface is identified by address again; its source checks stay.
    pub fn unbind_interface(&mut self, ifindex: u32) -> Result<()> {
        let info = self.interface_info(ifindex);
        self.write_interface(ifindex, InterfaceInfo { identity: identity::ANY, ..info })
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The flow-event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        take_map(&mut self.ebpf, maps::EVENTS)
    }

    /// Packet and event counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        counters::read(&self.counters)
    }

    /// Bounds the kernel's flow events ([`EventLimitSettings`], split over the online CPUs).
    /// A datapath never given limits emits every event.
    pub fn set_event_limits(&mut self, settings: &EventLimitSettings) -> Result<()> {
        let cpus = aya::util::online_cpus().map_err(|(what, err)| anyhow::anyhow!("{what}: {err}"))?.len();
        self.event_limits.set(0, settings.per_cpu(cpus as u32), 0).context("writing the event limits")
    }

    /// Read-only handles on the maps, for metrics: reading them takes no lock on the datapath.
    pub fn probe(&self) -> Result<Probe> {
        let conntrack = self.ebpf.map(maps::CONNTRACK).context("eBPF object has no conntrack map")?;
        let event_flows = self.ebpf.map(maps::EVENT_FLOWS).context("eBPF object has no event flow map")?;
        let fragments = self.ebpf.map(maps::FRAGMENTS).context("eBPF object has no fragment map")?;
        Probe::open(probe::Fds {
            config: probe::dup(self.config.map())?,
            counters: probe::dup(self.counters.map())?,
            ipcache: probe::dup(self.ipcache.map())?,
            hosts: probe::dup(self.hosts.map())?,
            policy: probe::dup(self.policy.map())?,
            isolation: probe::dup(self.isolation.map())?,
            cgroups: probe::dup(self.cgroups.map())?,
            interfaces: probe::dup(self.interfaces.map())?,
            conntrack: probe::dup(probe::data_of(conntrack)?)?,
            fragments: probe::dup(probe::data_of(fragments)?)?,
            event_flows: probe::dup(probe::data_of(event_flows)?)?,
        })
    }

    /// A loaded program, for BPF_PROG_TEST_RUN.
    pub fn program<T>(&mut self, name: &str) -> Result<&mut T>
    where
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        program_mut(&mut self.ebpf, name)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).with_context(|| format!("eBPF object has no program {name}"))?;
    program.try_into().with_context(|| format!("program {name} has an unexpected type"))
}

/// The error of a map write the kernel refused, most likely for want of room.
/// Removes the keys of a slotted hash map that `in_slot` picks, `name`d in the error.
fn empty_slot<K: aya::Pod, V: aya::Pod>(map: &MapData, name: &str, in_slot: impl Fn(&K) -> bool) -> Result<()> {
    let emptying = || format!("emptying a slot of the {name} map");
    let keys: Vec<K> = sys::keys_batch::<K, V>(map).with_context(emptying)?.into_iter().filter(|key| in_slot(key)).collect();
    sys::delete_batch(map, &keys).with_context(emptying)
}

fn full(map: &str, capacity: u32, option: &str) -> String {
    format!("the {map} refused the entry (it holds {capacity}; if it is full, raise that with --capacity {option}=N at start)")
}

/// A removal of what is not there is done: aya reports it as `KeyNotFound`, or as the syscall's
/// ENOENT (a binding another path removed first, e.g. an interface the CNI had forgotten).
fn remove_if_present(result: Result<(), aya::maps::MapError>) -> Result<()> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Ok(other?),
    }
}
