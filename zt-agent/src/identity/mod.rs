//! Numeric identities for declared workload identities.
//!
//! Every node compiles the same policy files on its own, so an identity's number must follow
//! from its name alone (plus, on a hash collision, the other names), never from file order or
//! from which node compiled it: an address is classified on one node and the number is compared
//! on another.
//!
//! Which workload an address, a cgroup or an interface is: [`sources`], with [`svid`] verifying
//! the X.509-SVIDs of the certificate source.

pub mod pods;
pub mod sources;
pub mod svid;

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use thiserror::Error;
use zt_common::{identity, maps::ISOLATION_CAPACITY};

/// Names with a fixed meaning in policies; a workload identity cannot take them.
pub const RESERVED_NAMES: [(&str, u32); 4] =
    [("any", identity::ANY), ("unknown", identity::UNKNOWN), ("world", identity::WORLD), ("host", identity::HOST)];

/// One past the largest identity: the number travels in 24 bits.
const ID_LIMIT: u32 = 1 << 24;
const USER_RANGE: u32 = ID_LIMIT - identity::FIRST_USER;

/// At most this many identities can be declared: one isolation entry each.
pub const MAX_IDENTITIES: usize = ISOLATION_CAPACITY as usize;

pub fn is_reserved(name: &str) -> bool {
    RESERVED_NAMES.iter().any(|(reserved, _)| *reserved == name)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity name \"{0}\" is reserved (any, unknown, world, host); choose another name")]
    Reserved(String),
    #[error("{count} identities (declared, and pod label sets), at most {MAX_IDENTITIES} are supported; merge identities that share a role, or give pods fewer distinct labels")]
    TooMany { count: usize },
}

/// The numbers of the declared identities, both ways.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityTable {
    by_name: BTreeMap<String, u32>,
    by_id: BTreeMap<u32, String>,
}

impl IdentityTable {
    /// Numbers a set of identity names (duplicates count once).
    ///
    /// A name's preferred number is
    /// `FIRST_USER + u32_be(SHA-256(name)[0..4]) % (2^24 - FIRST_USER)`. Names are numbered in
    /// bytewise sorted order; a name whose preferred number is already taken gets the next free
    /// one, wrapping from `2^24 - 1` back to `FIRST_USER`. The result depends only on the set of
    /// names, so every node derives the same table, and a name keeps its number as long as no
    /// colliding name sorted before it is added or removed.
    pub fn allocate<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, IdentityError> {
        Self::allocate_with(names, preferred_id)
    }

    /// Numbers pod identities after the declared ones, the same way, so that a declared
    /// identity's number never depends on which pods exist: a pod name whose preferred number
    /// a declared identity holds probes past it.
    pub fn add_pods<'a>(self, names: impl IntoIterator<Item = &'a str>) -> Result<Self, IdentityError> {
        self.add_pods_with(names, preferred_id)
    }

    fn add_pods_with<'a>(
        mut self,
        names: impl IntoIterator<Item = &'a str>,
        preferred: impl Fn(&str) -> u32,
    ) -> Result<Self, IdentityError> {
        let sorted: BTreeSet<&str> = names.into_iter().filter(|name| !self.by_name.contains_key(*name)).collect();
        if self.len() + sorted.len() > MAX_IDENTITIES {
            return Err(IdentityError::TooMany { count: self.len() + sorted.len() });
        }
        self.insert_sorted(sorted, preferred);
        Ok(self)
    }

    fn allocate_with<'a>(
        names: impl IntoIterator<Item = &'a str>,
        preferred: impl Fn(&str) -> u32,
    ) -> Result<Self, IdentityError> {
        let sorted: BTreeSet<&str> = names.into_iter().collect();
        if let Some(reserved) = sorted.iter().find(|name| is_reserved(name)) {
            return Err(IdentityError::Reserved(reserved.to_string()));
        }
        if sorted.len() > MAX_IDENTITIES {
            return Err(IdentityError::TooMany { count: sorted.len() });
        }
        let mut table = Self::default();
        table.insert_sorted(sorted, preferred);
        Ok(table)
    }

    fn insert_sorted(&mut self, sorted: BTreeSet<&str>, preferred: impl Fn(&str) -> u32) {
        for name in sorted {
            // Terminates: at most MAX_IDENTITIES of the USER_RANGE numbers are taken.
            let mut id = preferred(name);
            while self.by_id.contains_key(&id) {
                id = next_user_id(id);
            }
            self.by_name.insert(name.to_owned(), id);
            self.by_id.insert(id, name.to_owned());
        }
    }

    /// The number of a declared or reserved identity.
    pub fn id(&self, name: &str) -> Option<u32> {
        match RESERVED_NAMES.iter().find(|(reserved, _)| *reserved == name) {
            Some((_, id)) => Some(*id),
            None => self.by_name.get(name).copied(),
        }
    }

    /// The name of a declared or reserved identity; a world range a CIDR peer carved out of
    /// world is `world`.
    pub fn name(&self, id: u32) -> Option<&str> {
        if id >= identity::FIRST_CIDR {
            return Some("world");
        }
        match RESERVED_NAMES.iter().find(|(_, reserved)| *reserved == id) {
            Some((name, _)) => Some(name),
            None => self.by_id.get(&id).map(String::as_str),
        }
    }

    /// Declared identities (reserved ones excluded), by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_name.iter().map(|(name, id)| (name.as_str(), *id))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn preferred_id(name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    let prefix = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    identity::FIRST_USER + prefix % USER_RANGE
}

fn next_user_id(id: u32) -> u32 {
    if id + 1 == ID_LIMIT {
        identity::FIRST_USER
    } else {
        id + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_the_set_of_names_not_their_order() {
        let forward = IdentityTable::allocate(["web", "api", "db"]).unwrap();
        let backward = IdentityTable::allocate(["db", "api", "web", "api"]).unwrap();
        assert_eq!(forward, backward);
        assert_eq!(forward.len(), 3);
        assert_eq!(forward.id("web"), Some(preferred_id("web")));
    }

    #[test]
    fn preferred_id_is_the_documented_hash() {
        // SHA-256("web") = 4b5e57f6...: pins the formula so every node agrees across versions.
        let expected = identity::FIRST_USER + 0x4b5e_57f6 % USER_RANGE;
        assert_eq!(preferred_id("web"), expected);
        for name in ["a", "web", "db", "x/y:z"] {
            let id = preferred_id(name);
            assert!((identity::FIRST_USER..ID_LIMIT).contains(&id), "{name} -> {id}");
        }
    }

    #[test]
    fn collisions_probe_upwards_in_sorted_name_order() {
        let table = IdentityTable::allocate_with(["c", "a", "b"], |_| 1000).unwrap();
        assert_eq!(table.id("a"), Some(1000));
        assert_eq!(table.id("b"), Some(1001));
        assert_eq!(table.id("c"), Some(1002));
    }

    #[test]
    fn probing_wraps_to_the_first_user_id() {
        let table = IdentityTable::allocate_with(["a", "b", "c"], |_| ID_LIMIT - 2).unwrap();
        assert_eq!(table.id("a"), Some(ID_LIMIT - 2));
        assert_eq!(table.id("b"), Some(ID_LIMIT - 1));
        assert_eq!(table.id("c"), Some(identity::FIRST_USER));
    }

    #[test]
    fn pod_identities_never_move_a_declared_identity() {
        let alone = IdentityTable::allocate_with(["web", "db"], |name| if name == "web" { 1000 } else { 2000 }).unwrap();
        // A pod name that sorts before both and wants web's number.
        let pods = ["k8s:a:default:", "k8s:b:default:"];
        let with_pods = alone.clone().add_pods_with(pods, |_| 1000).unwrap();
        assert_eq!((with_pods.id("web"), with_pods.id("db")), (Some(1000), Some(2000)));
        assert_eq!((with_pods.id(pods[0]), with_pods.id(pods[1])), (Some(1001), Some(1002)), "they probe past web");
        assert_eq!(with_pods.name(1001), Some(pods[0]));
        let full: Vec<String> = (0..MAX_IDENTITIES - 1).map(|i| format!("k8s:p:default:n={i}")).collect();
        let err = alone.add_pods(full.iter().map(String::as_str)).unwrap_err();
        assert_eq!(err, IdentityError::TooMany { count: MAX_IDENTITIES + 1 });
    }

    #[test]
    fn reserved_names_are_rejected() {
        for name in ["any", "unknown", "world", "host"] {
            assert_eq!(IdentityTable::allocate(["web", name]), Err(IdentityError::Reserved(name.to_owned())));
        }
    }

    #[test]
    fn more_identities_than_isolation_capacity_is_an_error() {
        let names: Vec<String> = (0..=MAX_IDENTITIES).map(|i| format!("w{i}")).collect();
        let result = IdentityTable::allocate(names.iter().map(String::as_str));
        assert_eq!(result, Err(IdentityError::TooMany { count: MAX_IDENTITIES + 1 }));
    }

    #[test]
    fn full_capacity_allocates_distinct_ids() {
        let names: Vec<String> = (0..MAX_IDENTITIES).map(|i| format!("w{i}")).collect();
        let table = IdentityTable::allocate(names.iter().map(String::as_str)).unwrap();
        assert_eq!(table.len(), MAX_IDENTITIES);
        let ids: BTreeSet<u32> = table.iter().map(|(_, id)| id).collect();
        assert_eq!(ids.len(), MAX_IDENTITIES);
        assert!(ids.iter().all(|id| (identity::FIRST_USER..ID_LIMIT).contains(id)));
    }

    #[test]
    fn names_and_ids_round_trip_including_reserved() {
        let table = IdentityTable::allocate(["web"]).unwrap();
        let web = table.id("web").unwrap();
        assert_eq!(table.name(web), Some("web"));
        assert_eq!(table.name(identity::ANY), Some("any"));
        assert_eq!(table.name(identity::UNKNOWN), Some("unknown"));
        assert_eq!(table.name(identity::WORLD), Some("world"));
        assert_eq!(table.name(identity::HOST), Some("host"));
        assert_eq!(table.id("world"), Some(identity::WORLD));
        assert_eq!(table.name(identity::FIRST_USER - 1), None);
        assert_eq!(table.id("db"), None);
        assert_eq!(table.iter().collect::<Vec<_>>(), vec![("web", web)]);
    }
}
