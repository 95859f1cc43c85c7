//! Identity sources besides CIDRs: cgroups (local processes), host-side interfaces (workloads)
//! and certificates (workloads that present an X.509 SVID). Each refresh computes what the
//! kernel's maps should hold and applies the difference — additions before removals, so a
//! binding that moves never leaves a gap.

pub mod certificate;
pub mod cgroup;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::{Duration, SystemTime}};

use anyhow::Result;
use serde_json::Value;

use crate::{datapath::Datapath, policy::compile::Compiled};
use certificate::CertificateSource;
use cgroup::CgroupSource;

/// How often sources are rescanned: a new cgroup, interface or certificate — and an expired
/// one — takes effect within this.
pub const REFRESH_EVERY: Duration = Duration::from_millis(200);

pub struct IdentitySources {
    compiled: Arc<Compiled>,
    cgroups: Option<CgroupSource>,
    certificates: Option<CertificateSource>,
    /// Interface name → the ifindex bound for it.
    interfaces: BTreeMap<String, u32>,
    /// What this agent has written to the kernel's cgroup map and (for certificates) ipcache.
    kernel_cgroups: BTreeMap<u64, u32>,
    kernel_addresses: BTreeMap<IpAddr, u32>,
}

impl IdentitySources {
    pub fn new(compiled: Arc<Compiled>, cgroups: Option<CgroupSource>, certificates: Option<CertificateSource>) -> Self {
        Self {
            compiled,
            cgroups,
            certificates,
            interfaces: BTreeMap::new(),
            kernel_cgroups: BTreeMap::new(),
            kernel_addresses: BTreeMap::new(),
        }
    }

    /// The path (relative to the cgroup v2 root) of a cgroup seen by a scan.
    pub fn cgroup_path(&self, cgroup_id: u64) -> Option<&str> {
        self.cgroups.as_ref()?.path_of(cgroup_id)
    }

    /// Whether `addr` is identified because a certificate bound it.
    pub fn bound_by_certificate(&self, addr: IpAddr) -> bool {
        self.kernel_addresses.contains_key(&addr)
    }

    /// Brings the maps in line with the sources. Returns identity events to report.
    pub fn refresh(&mut self, datapath: &mut Datapath) -> Result<Vec<Value>> {
        let mut cgroups = match &mut self.cgroups {
            Some(source) => source.scan(&self.compiled.cgroups),
            None => BTreeMap::new(),
        };
        let mut addresses = BTreeMap::new();
        let mut events = Vec::new();
        if let Some(certificates) = &mut self.certificates {
            let (bound, changes) = certificates.rescan(&self.compiled.spiffe, SystemTime::now());
            events = changes;
            for b in bound {
                addresses.extend(b.addresses.iter().map(|a| (*a, b.identity)));
                // A certificate names a cgroup more precisely than a selector does.
                let cgroup_id = b.cgroup.as_deref().and_then(|path| self.cgroups.as_mut()?.id_of(path));
                if let Some(cgroup_id) = cgroup_id {
                    cgroups.insert(cgroup_id, b.identity);
                }
            }
        }
        self.apply_cgroups(datapath, cgroups)?;
        self.apply_addresses(datapath, addresses)?;
        self.refresh_interfaces(datapath)?;
        Ok(events)
    }

    fn apply_cgroups(&mut self, datapath: &mut Datapath, wanted: BTreeMap<u64, u32>) -> Result<()> {
        for (&cgroup_id, &identity) in &wanted {
            if self.kernel_cgroups.get(&cgroup_id) != Some(&identity) {
                datapath.bind_cgroup(cgroup_id, identity)?;
                let path = self.cgroup_path(cgroup_id).unwrap_or("?");
                tracing::info!(cgroup = %path, cgroup_id, identity = self.name(identity), "cgroup identified");
            }
        }
        for &cgroup_id in self.kernel_cgroups.keys().filter(|id| !wanted.contains_key(id)) {
            datapath.unbind_cgroup(cgroup_id)?;
            tracing::info!(cgroup = %self.cgroup_path(cgroup_id).unwrap_or("?"), cgroup_id, "cgroup no longer identified");
        }
        self.kernel_cgroups = wanted;
        Ok(())
    }

    fn apply_addresses(&mut self, datapath: &mut Datapath, wanted: BTreeMap<IpAddr, u32>) -> Result<()> {
        for (&addr, &identity) in &wanted {
            if self.kernel_addresses.get(&addr) != Some(&identity) {
                datapath.bind_address(addr, identity)?;
            }
        }
        for &addr in self.kernel_addresses.keys().filter(|a| !wanted.contains_key(a)) {
            datapath.unbind_address(addr)?;
        }
        self.kernel_addresses = wanted;
        Ok(())
    }

    fn refresh_interfaces(&mut self, datapath: &mut Datapath) -> Result<()> {
        for (name, identity) in &self.compiled.interfaces {
            // An interface may appear, vanish, or come back with a new index after start; a
            // stale index must not identify whatever interface reuses it.
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).ok();
            let bound = self.interfaces.get(name).copied();
            if bound == ifindex {
                continue;
            }
            if let Some(old) = bound {
                datapath.unbind_interface(old)?;
                self.interfaces.remove(name);
                tracing::info!(interface = %name, ifindex = old, "interface gone");
            }
            if let Some(ifindex) = ifindex {
                datapath.bind_interface(ifindex, *identity)?;
                self.interfaces.insert(name.clone(), ifindex);
                let identity = self.compiled.identities.name(*identity).unwrap_or("?");
                tracing::info!(interface = %name, ifindex, identity, "interface identified");
            }
        }
        Ok(())
    }

    fn name(&self, identity: u32) -> &str {
        self.compiled.identities.name(identity).unwrap_or("?")
    }
}
