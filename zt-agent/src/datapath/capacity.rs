//! Map capacities, set at start (`--capacity MAP=N`). A capacity is part of a map's definition:
//! changing it on a node with pinned maps migrates the map (see `load`), like any layout change.

use std::{collections::BTreeMap, fmt, str::FromStr};

use anyhow::{bail, Context as _, Result};
use aya::EbpfLoader;
use zt_common::maps;

/// Per map: the option's name, the kernel map, its default capacity and its ceiling; slotted
/// maps hold that many entries per policy generation (the kernel map twice as many).
struct Configurable {
    name: &'static str,
    map: &'static str,
    default: u32,
    ceiling: u32,
    slotted: bool,
}

const CONFIGURABLE: [Configurable; 8] = [
    Configurable { name: "conntrack", map: maps::CONNTRACK, default: maps::CONNTRACK_CAPACITY, ceiling: 1 << 24, slotted: false },
    Configurable { name: "fragments", map: maps::FRAGMENTS, default: maps::FRAGMENTS_CAPACITY, ceiling: 1 << 22, slotted: false },
    Configurable { name: "ipcache", map: maps::IPCACHE, default: maps::IPCACHE_CAPACITY, ceiling: IPCACHE_CEILING, slotted: true },
    Configurable { name: "hosts", map: maps::HOSTS, default: maps::HOSTS_CAPACITY, ceiling: IPCACHE_CEILING, slotted: true },
    Configurable { name: "policy", map: maps::POLICY, default: maps::POLICY_CAPACITY, ceiling: POLICY_CEILING, slotted: true },
    Configurable { name: "cgroups", map: maps::CGROUPS, default: maps::CGROUPS_CAPACITY, ceiling: 1 << 22, slotted: false },
    Configurable { name: "interfaces", map: maps::INTERFACES, default: maps::INTERFACES_CAPACITY, ceiling: 1 << 20, slotted: false },
    Configurable { name: "event-flows", map: maps::EVENT_FLOWS, default: maps::EVENT_FLOWS_CAPACITY, ceiling: 1 << 22, slotted: false },
];

/// The most ipcache and policy entries a policy may compile to, whatever a node's capacity.
pub const IPCACHE_CEILING: u32 = 1 << 22;
pub const POLICY_CEILING: u32 = 1 << 24;

/// One `--capacity` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacitySetting {
    name: &'static str,
    entries: u32,
}

impl FromStr for CapacitySetting {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let names = || CONFIGURABLE.iter().map(|c| c.name).collect::<Vec<_>>().join(", ");
        let Some((name, entries)) = text.split_once('=') else {
            bail!("expected MAP=ENTRIES (MAP is one of {}), got {text:?}", names());
        };
        let Some(map) = CONFIGURABLE.iter().find(|c| c.name == name) else {
            bail!("no map {name:?} has a configurable capacity; use one of {}", names());
        };
        let entries: u32 = entries.replace('_', "").parse().with_context(|| format!("{name}: {entries:?} is not a number of entries"))?;
        if entries == 0 || entries > map.ceiling {
            bail!("{name}: capacity must be 1 to {}, got {entries}", map.ceiling);
        }
        Ok(Self { name: map.name, entries })
    }
}

/// The capacity of every configurable map: its default unless set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacities {
    set: BTreeMap<&'static str, u32>,
}

impl Capacities {
    pub fn new(settings: &[CapacitySetting]) -> Result<Self> {
        let mut set = BTreeMap::new();
        for setting in settings {
            if set.insert(setting.name, setting.entries).is_some() {
                bail!("--capacity {} is given twice", setting.name);
            }
        }
        Ok(Self { set })
    }

    fn entries(&self, map: &Configurable) -> u32 {
        self.set.get(map.name).copied().unwrap_or(map.default)
    }

    /// Entries one policy generation may use in a slotted map (the whole map otherwise).
    pub fn per_generation(&self, map_name: &str) -> u32 {
        CONFIGURABLE.iter().find(|c| c.map == map_name).map_or(0, |c| self.entries(c))
    }

    /// The kernel map's `max_entries` for `map_name`, if its capacity is configurable.
    pub fn max_entries(&self, map_name: &str) -> Option<u32> {
        let map = CONFIGURABLE.iter().find(|c| c.map == map_name)?;
        Some(self.entries(map) * if map.slotted { maps::SLOTS } else { 1 })
    }

    /// Sizes the maps `loader` creates.
    pub fn apply(&self, loader: &mut EbpfLoader) {
        for map in &CONFIGURABLE {
            loader.map_max_entries(map.map, self.max_entries(map.map).expect("configurable"));
        }
    }
}

impl fmt::Display for Capacities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listed: Vec<String> = CONFIGURABLE.iter().map(|c| format!("{}={}", c.name, self.entries(c))).collect();
        f.write_str(&listed.join(","))
    }
}

/// Refuses a policy generation that would not fit, before anything is written: `needed`
/// entries of `map_name`, where one generation holds `capacity`.
pub fn check_fits(map_name: &str, needed: usize, capacity: u32) -> Result<()> {
    if needed > capacity as usize {
        let option = CONFIGURABLE.iter().find(|c| c.map == map_name).map_or(map_name, |c| c.name);
        bail!(
            "this policy needs {needed} {option} entries and this node holds {capacity} per generation: \
             the policy is rejected whole and the one in force stays (raise it with --capacity {option}=N at start)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_say_what_to_fix() {
        let set: CapacitySetting = "conntrack=1_000_000".parse().unwrap();
        let capacities = Capacities::new(&[set]).unwrap();
        assert_eq!(capacities.max_entries(maps::CONNTRACK), Some(1_000_000));
        assert_eq!(capacities.max_entries(maps::IPCACHE), Some(maps::IPCACHE_CAPACITY * maps::SLOTS));
        assert_eq!(capacities.per_generation(maps::IPCACHE), maps::IPCACHE_CAPACITY);
        for (bad, says) in [
            ("conntrack", "expected MAP=ENTRIES"),
            ("ring=5", "no map \"ring\""),
            ("ipcache=lots", "not a number"),
            ("ipcache=0", "must be 1 to"),
        ] {
            let err = bad.parse::<CapacitySetting>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let twice = ["fragments=10".parse().unwrap(), "fragments=20".parse().unwrap()];
        assert!(Capacities::new(&twice).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn a_generation_that_does_not_fit_is_refused_with_the_option_to_raise() {
        assert!(check_fits(maps::IPCACHE, 10, 10).is_ok());
        let err = check_fits(maps::IPCACHE, 11, 10).unwrap_err().to_string();
        assert!(err.contains("needs 11 ipcache entries") && err.contains("--capacity ipcache=N"), "{err}");
    }
}
