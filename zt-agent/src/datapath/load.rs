//! Loading the datapath onto pinned maps: the maps an earlier agent pinned are reused when their
//! definition is the one this agent's object declares, and migrated when it is not.
//!
//! aya reuses a pinned map by name without comparing its definition, so every pin is checked
//! first (type, key and value size, capacity, flags). A map whose definition changed gets a new
//! map pinned in `maps-next/`, filled beside the old one while the old programs keep running
//! on the old one; once every link runs the new programs, the new pin replaces the old
//! ([`Datapath::finish_migration`]). What a migrated map starts with:
//! - `ZT_CONFIG`: the old mode, generation and slot, copied.
//! - `ZT_CONNTRACK`: every old flow, copied (again after the switch, for the flows the old
//!   programs admitted meanwhile), when its entries' layout is unchanged; otherwise empty, and
//!   established flows are judged again as new.
//! - The policy maps (`ZT_IPCACHE`, `ZT_HOSTS`, `ZT_POLICY`, `ZT_ISOLATION`) and the identity maps
//!   (`ZT_CGROUPS`, `ZT_INTERFACES`): empty, filled by the agent from its policy and sources
//!   before the first link switches. They migrate with `ZT_CONFIG` as one group, so the old
//!   programs never see a slot switch the new policy made.
//! - Counters, event state and the ring buffer: new (counters restart at zero).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, MapInfo},
    EbpfLoader,
};
use serde::{Deserialize, Serialize};
use zt_common::{maps, Config, CtKey, CtValue};

use super::{capacity::Capacities, pins::PinDir, Datapath, Mode};

/// How the agent found the datapath when it started: for `status`, `/readyz` and the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReport {
    /// `fresh`: nothing was pinned; `adopted`: an earlier agent's pinned state was taken over.
    pub kind: StartKind,
    /// The generation in force when this agent took over (0 when fresh).
    pub previous_generation: u32,
    /// Pinned links found attached and switched to this agent's programs.
    pub links_adopted: usize,
    /// Of those, the links whose program this agent replaced with a different one (an upgrade).
    pub programs_replaced: usize,
    /// Maps whose definition changed, migrated to new maps.
    pub migrated_maps: Vec<String>,
    /// Flow events the kernel could not queue while no agent read them.
    pub events_lost_while_down: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    #[default]
    Fresh,
    Adopted,
}

impl StartKind {
    pub fn name(self) -> &'static str {
        match self {
            StartKind::Fresh => "fresh",
            StartKind::Adopted => "adopted",
        }
    }
}

/// Maps that migrate together: the config names the slot the policy maps are read in.
const POLICY_GROUP: [&str; 7] =
    [maps::CONFIG, maps::IPCACHE, maps::HOSTS, maps::POLICY, maps::ISOLATION, maps::CGROUPS, maps::INTERFACES];

/// A map as the object declares it, or as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Definition {
    /// `bpf_map_type`.
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl std::fmt::Display for Definition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

fn pinned_definition(path: &Path) -> Result<Definition> {
    let info = MapInfo::from_pin(path).with_context(|| format!("reading pinned map {}", path.display()))?;
    Ok(Definition {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// zt's maps as the embedded object declares them.
pub(super) fn object_definitions() -> Result<Vec<(String, Definition)>> {
    let object = aya_obj::Object::parse(super::object()?).context("parsing the eBPF object")?;
    let mut definitions = object
        .maps
        .iter()
        .filter(|(name, _)| name.starts_with("ZT_"))
        .map(|(name, map)| {
            let definition = Definition {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
                flags: map.map_flags(),
            };
            Ok((name.clone(), definition))
        })
        .collect::<Result<Vec<_>>>()?;
    definitions.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(definitions)
}

/// Finishes a migration an earlier agent was stopped in the middle of: a `maps-next/` map that
/// a pinned link's program already uses replaces its old pin; one no program uses is dropped.
fn recover_interrupted_migration(pins: &PinDir) -> Result<()> {
    let pending = super::pins::entries(&pins.maps_next())?;
    if pending.is_empty() {
        return Ok(());
    }
    let running: BTreeSet<u32> = pins.pinned_links()?.iter().map(|(_, info)| info.program_id).collect();
    let mut used = BTreeSet::new();
    for id in running {
        // By its pin; by id (which needs CAP_SYS_ADMIN) only for a program an agent stopped
        // before it pinned it.
        let program = match pins.pinned_program(id)? {
            Some(program) => program,
            None => aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .with_context(|| format!("a pinned link runs program {id}, which is neither pinned nor visible"))?,
        };
        used.extend(program.map_ids()?.unwrap_or_default());
    }
    for path in pending {
        let id = MapInfo::from_pin(&path)?.id();
        let name = path.file_name().expect("a pin has a name");
        if used.contains(&id) {
            tracing::warn!(map = %name.to_string_lossy(), "finishing a map migration an earlier agent began");
            std::fs::rename(&path, pins.maps().join(name))?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs onto the maps pinned in `pins`: reused when their definition is
    /// unchanged, migrated otherwise (see the module docs). Nothing is attached here, and a
    /// reused map is not written; `mode`, when given, replaces the pinned one, and must be
    /// given when the pinned mode cannot be carried over.
    pub fn load_pinned(pins: PinDir, mode: Option<Mode>, capacities: Capacities) -> Result<Self> {
        recover_interrupted_migration(&pins)?;
        let adopted = pins.holds_state();
        let mut definitions = object_definitions()?;
        // A capacity other than the pinned map's is a definition change like any other.
        for (name, definition) in &mut definitions {
            if let Some(max_entries) = capacities.max_entries(name) {
                definition.max_entries = max_entries;
            }
        }
        let mut migrating = BTreeSet::new();
        for (name, wanted) in &definitions {
            let pin = pins.maps().join(name);
            if !pin.exists() {
                continue;
            }
            let found = pinned_definition(&pin)?;
            if &found != wanted {
                tracing::warn!(map = %name, pinned = %found, this_agent = %wanted, "map definition changed: migrating");
                migrating.insert(name.clone());
            }
        }
        if POLICY_GROUP.iter().any(|name| migrating.contains(*name)) {
            migrating.extend(POLICY_GROUP.iter().map(|name| name.to_string()));
        }
        migrating.retain(|name| pins.maps().join(name).exists());

        let mut loader = EbpfLoader::new();
        capacities.apply(&mut loader);
        let mut paths: Vec<(String, PathBuf)> = Vec::new();
        for (name, _) in &definitions {
            let path = if migrating.contains(name) { pins.maps_next().join(name) } else { pins.maps().join(name) };
            if migrating.contains(name) && path.exists() {
                std::fs::remove_file(&path)?;
            }
            paths.push((name.clone(), path));
        }
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(super::object()?).context("loading the eBPF object onto the pinned maps (are you root?)")?;
        let mut datapath = Self::from_object(ebpf, capacities)?;

        if migrating.contains(maps::CONFIG) {
            datapath.carry_config_over(&pins, mode)?;
        }
        if migrating.contains(maps::CONNTRACK) {
            datapath.copy_flows(&pins)?;
        }
        let previous = datapath.config()?;
        let lost_seen = datapath.agent_state(zt_common::agent_state::EVENTS_LOST_SEEN)?;
        let lost = datapath.counters()?.events().lost;
        datapath.start = StartReport {
            kind: if adopted { StartKind::Adopted } else { StartKind::Fresh },
            previous_generation: previous.generation,
            migrated_maps: migrating.into_iter().collect(),
            events_lost_while_down: lost.saturating_sub(lost_seen),
            ..StartReport::default()
        };
        match mode {
            Some(mode) => datapath.set_mode(mode)?,
            // Nothing to keep: a new node starts in monitor mode.
            None if !adopted => datapath.set_mode(Mode::Monitor)?,
            None => {}
        }
        datapath.pins = Some(pins);
        Ok(datapath)
    }

    /// A migrated config starts as the old one was: same mode, generation and slot.
    fn carry_config_over(&mut self, pins: &PinDir, mode: Option<Mode>) -> Result<()> {
        let path = pins.maps().join(maps::CONFIG);
        let old = pinned_definition(&path)?;
        // Before the memory-mapped word: a hash holding a `Config` under key 0.
        if old.map_type != aya::maps::MapType::Hash as u32 || old.value_size as usize != size_of::<Config>() {
            if mode.is_none() {
                bail!(
                    "the pinned config's layout changed and this zt-agent cannot read the mode in force \
                     from it: pass --mode enforce or --mode monitor"
                );
            }
            return Ok(());
        }
        let old: HashMap<MapData, u32, Config> = HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(&path)?))?;
        if let Ok(config) = old.get(&0, 0) {
            self.config.set(config);
        }
        Ok(())
    }

    /// Copies the old conntrack's flows that the new one lacks: entries of this layout as they
    /// are, entries of the layout before it converted (see [`PreviousCtValue`]).
    pub(super) fn copy_flows(&mut self, pins: &PinDir) -> Result<usize> {
        let path = pins.maps().join(maps::CONNTRACK);
        let old = pinned_definition(&path)?;
        let old_map = || -> Result<aya::maps::Map> { Ok(aya::maps::Map::LruHashMap(MapData::from_pin(&path)?)) };
        let flows: Vec<(CtKey, CtValue)> = match (old.key_size as usize, old.value_size as usize) {
            (key, value) if key == size_of::<CtKey>() && value == size_of::<CtValue>() => {
                HashMap::<MapData, CtKey, CtValue>::try_from(old_map()?)?.iter().filter_map(Result::ok).collect()
            }
            (key, value) if key == size_of::<CtKey>() && value == size_of::<PreviousCtValue>() => {
                HashMap::<MapData, CtKey, PreviousCtValue>::try_from(old_map()?)?
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(key, value)| (key, value.upgraded()))
                    .collect()
            }
            _ => {
                tracing::warn!("conntrack entries changed layout: established flows are judged again as new");
                return Ok(0);
            }
        };
        let mut new: HashMap<&mut MapData, CtKey, CtValue> = HashMap::try_from(
            self.ebpf.map_mut(maps::CONNTRACK).context("eBPF object has no conntrack map")?,
        )?;
        let mut copied = 0;
        for (key, value) in flows {
            // BPF_NOEXIST: a flow the new programs already track keeps its newer entry.
            if new.insert(key, value, 1).is_ok() {
                copied += 1;
            }
        }
        Ok(copied)
    }
}

/// A conntrack entry as zt wrote it before entries remembered where their source was checked
/// (24 bytes): upgraded with no interface, so each flow's next packet is checked once more.
#[repr(C)]
#[derive(Clone, Copy)]
struct PreviousCtValue {
    last_seen_ns: u64,
    rule_id: u32,
    generation: u32,
    flags: u32,
    port: u16,
    _pad: u16,
}

// SAFETY: plain integers, no padding (24 bytes, as the kernel's entries).
unsafe impl aya::Pod for PreviousCtValue {}
const _: () = assert!(size_of::<PreviousCtValue>() == 24);

impl PreviousCtValue {
    fn upgraded(self) -> CtValue {
        let Self { last_seen_ns, rule_id, generation, flags, port, _pad } = self;
        CtValue { last_seen_ns, rule_id, generation, flags, ifindex: 0, port, _pad: [0; 6] }
    }
}
