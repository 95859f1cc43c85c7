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
use zt_common::{
    ct::{self, Ends},
    maps, proto, Config, CtKey, CtValue,
};

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
    /// are, entries of the layouts before it (one per direction) merged per flow (see
    /// [`DirectionCtValue`]).
    pub(super) fn copy_flows(&mut self, pins: &PinDir) -> Result<usize> {
        let path = pins.maps().join(maps::CONNTRACK);
        let old = pinned_definition(&path)?;
        let old_map = || -> Result<aya::maps::Map> { Ok(aya::maps::Map::LruHashMap(MapData::from_pin(&path)?)) };
        let flows: Vec<(CtKey, CtValue)> = match (old.key_size as usize, old.value_size as usize) {
            (key, value) if key == size_of::<CtKey>() && value == size_of::<CtValue>() => {
                HashMap::<MapData, CtKey, CtValue>::try_from(old_map()?)?.iter().filter_map(Result::ok).collect()
            }
            (key, value) if key == size_of::<CtKey>() && value == size_of::<DirectionCtValue>() => merged_directions(
                HashMap::<MapData, CtKey, DirectionCtValue>::try_from(old_map()?)?.iter().filter_map(Result::ok),
            ),
            (key, value) if key == size_of::<CtKey>() && value == size_of::<PreviousCtValue>() => merged_directions(
                HashMap::<MapData, CtKey, PreviousCtValue>::try_from(old_map()?)?
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(key, value)| (key, value.upgraded())),
            ),
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

/// A conntrack entry as zt wrote it while each direction of a flow had an entry of its own,
/// keyed as its packets go (32 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct DirectionCtValue {
    last_seen_ns: u64,
    rule_id: u32,
    generation: u32,
    /// 1: admitted by monitor mode ([`ct::AUDIT`]); 2: the entry of the replies.
    flags: u32,
    /// Where the direction's source passed its check, or 0.
    ifindex: u32,
    /// The flow's destination port (ICMP: the message type that started it).
    port: u16,
    _pad: [u8; 6],
}

// SAFETY: plain integers and explicit padding (32 bytes, as the kernel's entries).
unsafe impl aya::Pod for DirectionCtValue {}
const _: () = assert!(size_of::<DirectionCtValue>() == 32);

/// [`DirectionCtValue::flags`]: the entry of a flow's replies.
const DIRECTION_REPLY: u32 = 2;

/// The entries of both directions of each flow, as one entry of this layout. A flow whose two
/// entries disagree on the generation is judged again on its next packet; a direction with no
/// entry counts as idle past its timeout (its next packet is judged as new, as it was).
fn merged_directions(entries: impl Iterator<Item = (CtKey, DirectionCtValue)>) -> Vec<(CtKey, CtValue)> {
    let mut flows: std::collections::HashMap<CtKey, CtValue> = std::collections::HashMap::new();
    for (key, value) in entries {
        let reply = value.flags & DIRECTION_REPLY != 0;
        let icmp = matches!(key.protocol, proto::ICMP | proto::ICMPV6);
        // The flow's first packet: the entry's own key, or the reply entry's turned around.
        let (src, dst, src_port, dst_port) = match (reply, icmp) {
            (false, _) => (key.src, key.dst, key.src_port, key.dst_port),
            // An echo reply keeps the identifier; the flow started with the request's type.
            (true, true) => (key.dst, key.src, key.src_port, value.port),
            (true, false) => (key.dst, key.src, key.dst_port, key.src_port),
        };
        let ends = ct::ends(ct::words(&src), ct::words(&dst), src_port, dst_port, key.protocol);
        let flow = flows.entry(CtKey::of(&src, &dst, src_port, dst_port, key.protocol, ends)).or_insert(CtValue {
            last_seen_ns: [0; 2],
            rule_id: value.rule_id,
            generation: value.generation,
            flags: if ends == Ends::Swapped { ct::SWAPPED } else { 0 },
            ifindex: [0; 2],
            port: value.port,
            _pad: [0; 2],
        });
        if flow.generation != value.generation {
            // Generation 0 is never in force.
            flow.generation = 0;
        }
        flow.flags |= value.flags & ct::AUDIT;
        flow.last_seen_ns[reply as usize] = value.last_seen_ns;
        flow.ifindex[reply as usize] = value.ifindex;
    }
    flows.into_iter().collect()
}

/// A conntrack entry as zt wrote it before entries remembered where their source was checked
/// (24 bytes, one per direction): upgraded with no interface, so each flow's next packet is
/// checked once more.
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
    fn upgraded(self) -> DirectionCtValue {
        let Self { last_seen_ns, rule_id, generation, flags, port, _pad } = self;
        DirectionCtValue { last_seen_ns, rule_id, generation, flags, ifindex: 0, port, _pad: [0; 6] }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::policy::compile::ip_key;

    fn key_of(src: &str, dst: &str, src_port: u16, dst_port: u16, protocol: u8) -> (CtKey, Ends) {
        let (src, dst) = (ip_key(src.parse::<IpAddr>().unwrap()), ip_key(dst.parse::<IpAddr>().unwrap()));
        let ends = ct::ends(ct::words(&src), ct::words(&dst), src_port, dst_port, protocol);
        (CtKey::of(&src, &dst, src_port, dst_port, protocol, ends), ends)
    }

    #[test]
    fn a_packet_and_its_reply_build_one_key() {
        for (a, b) in [("10.0.0.1", "10.0.0.2"), ("10.0.0.2", "10.0.0.1"), ("fd00::9", "fd00::1:0")] {
            let (forward, forward_ends) = key_of(a, b, 40_000, 80, proto::TCP);
            let (reply, reply_ends) = key_of(b, a, 80, 40_000, proto::TCP);
            assert_eq!(forward, reply, "{a} → {b}");
            assert_ne!(forward_ends, reply_ends, "{a} → {b}: the two directions sit either way");
            // Another flow between the same ends is another entry.
            assert_ne!(forward, key_of(a, b, 40_001, 80, proto::TCP).0);
            // A ping and its answer (ICMP: the identifier, then the type).
            let (request, request_ends) = key_of(a, b, 7, 8, proto::ICMP);
            let (answer, answer_ends) = key_of(b, a, 7, 0, proto::ICMP);
            assert_eq!((request, request.dst_port), (answer, 8), "{a} → {b}");
            assert_ne!(request_ends, answer_ends);
        }
        // One address at both ends: the ports order them; for ICMP nothing does.
        let (forward, forward_ends) = key_of("127.0.0.1", "127.0.0.1", 40_000, 80, proto::UDP);
        let (reply, reply_ends) = key_of("127.0.0.1", "127.0.0.1", 80, 40_000, proto::UDP);
        assert_eq!((forward, forward_ends, reply_ends), (reply, Ends::Swapped, Ends::AsSent));
        assert_eq!(key_of("::1", "::1", 7, 128, proto::ICMPV6), (key_of("::1", "::1", 7, 129, proto::ICMPV6).0, Ends::Same));
    }

    fn direction_entry(last_seen_ns: u64, generation: u32, flags: u32, ifindex: u32, port: u16) -> DirectionCtValue {
        DirectionCtValue { last_seen_ns, rule_id: 3, generation, flags, ifindex, port, _pad: [0; 6] }
    }

    /// The entries of the layout before (one per direction) become one entry per flow, which
    /// the kernel finds from either direction (`restart.rs` sends the packets).
    #[test]
    fn entries_of_both_directions_merge_into_one_flow() {
        let (b, a) = (ip_key("10.0.0.2".parse().unwrap()), ip_key("10.0.0.1".parse().unwrap()));
        let old = |src, dst, src_port, dst_port, protocol| CtKey { src, dst, src_port, dst_port, protocol, _pad: [0; 3] };
        let entries = [
            // b:40000 → a:80, its reply, and a ping from b whose answer's entry alone is left.
            (old(b, a, 40_000, 80, proto::TCP), direction_entry(100, 5, 0, 7, 80)),
            (old(a, b, 80, 40_000, proto::TCP), direction_entry(200, 5, DIRECTION_REPLY, 0, 80)),
            (old(a, b, 9, 0, proto::ICMP), direction_entry(300, 5, DIRECTION_REPLY | ct::AUDIT, 0, 8)),
            // A flow whose directions were admitted under two generations.
            (old(a, b, 1, 2, proto::UDP), direction_entry(400, 5, 0, 0, 2)),
            (old(b, a, 2, 1, proto::UDP), direction_entry(500, 6, DIRECTION_REPLY, 0, 2)),
        ];
        let mut merged = merged_directions(entries.into_iter());
        merged.sort_by_key(|(key, _)| key.protocol);
        let tcp = CtValue { last_seen_ns: [100, 200], rule_id: 3, generation: 5, flags: ct::SWAPPED, ifindex: [7, 0], port: 80, _pad: [0; 2] };
        let ping = CtValue { last_seen_ns: [0, 300], flags: ct::SWAPPED | ct::AUDIT, ifindex: [0, 0], port: 8, ..tcp };
        let udp = CtValue { last_seen_ns: [400, 500], generation: 0, flags: 0, port: 2, ..ping };
        assert_eq!(
            merged,
            [
                (key_of("10.0.0.2", "10.0.0.1", 9, 8, proto::ICMP).0, ping),
                (key_of("10.0.0.2", "10.0.0.1", 40_000, 80, proto::TCP).0, tcp),
                (key_of("10.0.0.1", "10.0.0.2", 1, 2, proto::UDP).0, udp),
            ]
        );
    }
}
