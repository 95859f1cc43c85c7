//! Identity sources besides CIDRs: cgroups (local processes), host-side interfaces (workloads),
//! certificates (workloads that present an X.509 SVID) and Kubernetes (pods: every pod's
//! addresses, and this node's pods' interfaces). Each refresh computes what the
//! kernel's maps should hold and applies the difference — additions before removals, so a
//! binding that moves never leaves a gap.
//!
//! On a policy reload the sources follow the new policy in two steps around the datapath's
//! switch: [`IdentitySources::stage`] writes the certificate-bound addresses (which live in the
//! slotted ipcache) into the staged generation, so they hold from the switch on;
//! [`IdentitySources::switched`] then brings the unslotted cgroup and interface bindings in line
//! with the new selectors. A cgroup or interface whose identity keeps its name keeps its id and
//! is never unbound; one whose selector moved to another identity is rebound right after the
//! switch, so for that moment the new policy sees it as the identity it had.

pub mod certificate;
pub mod cgroup;
pub mod host;
pub mod kubernetes;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use serde_json::{json, Value};

use crate::{
    datapath::Datapath,
    identity::pods::Cluster,
    policy::compile::Compiled,
};
use certificate::CertificateSource;
use cgroup::CgroupSource;
use kubernetes::KubernetesSource;

/// How often sources are rescanned: a new cgroup, interface or certificate — and an expired
/// one — takes effect within this.
pub const REFRESH_EVERY: Duration = Duration::from_millis(200);

pub struct IdentitySources {
    compiled: Arc<Compiled>,
    cgroups: Option<CgroupSource>,
    certificates: Option<CertificateSource>,
    kubernetes: Option<KubernetesSource>,
    /// The cluster a reload was last asked for, and the view's revision last checked.
    reload_asked: Option<Cluster>,
    reload_checked: Option<u64>,
    /// Interface name → the ifindex bound for it and its identity.
    interfaces: BTreeMap<String, (u32, u32)>,
    /// What this agent has written to the kernel's cgroup map and (for certificates) the
    /// ipcache slot in force.
    kernel_cgroups: BTreeMap<u64, u32>,
    kernel_addresses: BTreeMap<IpAddr, u32>,
    /// During a reload: the policy in force before it, and the addresses written into the
    /// staged generation.
    staged: Option<(Arc<Compiled>, BTreeMap<IpAddr, u32>)>,
    /// Bindings the kernel refused (a full map, most likely), as "source what": each is
    /// reported once while it lasts and retried on every refresh. The rest are applied.
    refused: BTreeSet<String>,
}

impl IdentitySources {
    pub fn new(compiled: Arc<Compiled>, cgroups: Option<CgroupSource>, certificates: Option<CertificateSource>) -> Self {
        Self {
            compiled,
            cgroups,
            certificates,
            kubernetes: None,
            reload_asked: None,
            reload_checked: None,
            interfaces: BTreeMap::new(),
            kernel_cgroups: BTreeMap::new(),
            kernel_addresses: BTreeMap::new(),
            staged: None,
            refused: BTreeSet::new(),
        }
    }

    /// Pods from the Kubernetes API server, and this node's from its CNI.
    pub fn with_kubernetes(self, kubernetes: KubernetesSource) -> Self {
        Self { kubernetes: Some(kubernetes), ..self }
    }

    pub fn kubernetes(&self) -> Option<&KubernetesSource> {
        self.kubernetes.as_ref()
    }

    pub fn kubernetes_mut(&mut self) -> Option<&mut KubernetesSource> {
        self.kubernetes.as_mut()
    }

    /// What the policy is to be compiled over now: the cluster's label sets (none without the
    /// Kubernetes source).
    pub fn cluster(&self) -> Cluster {
        self.kubernetes.as_ref().map(KubernetesSource::cluster).unwrap_or_default()
    }

    /// Whether the cluster has changed since the policy in force was compiled, so that a reload
    /// is due: once per change (a reload in progress is not asked for again).
    pub fn reload_due(&mut self) -> bool {
        let Some(source) = &self.kubernetes else { return false };
        // The cluster is what the view says: unchanged while the view is.
        let revision = source.revision();
        if self.reload_checked == Some(revision) {
            return false;
        }
        self.reload_checked = Some(revision);
        let cluster = source.cluster();
        if cluster == self.compiled.cluster || self.reload_asked.as_ref() == Some(&cluster) {
            return false;
        }
        self.reload_asked = Some(cluster);
        true
    }

    /// The path (relative to the cgroup v2 root) of a cgroup seen by a scan.
    pub fn cgroup_path(&self, cgroup_id: u64) -> Option<&str> {
        self.cgroups.as_ref()?.path_of(cgroup_id)
    }

    /// The identity of a pod of this node, once its interface is bound to it.
    pub fn pod_bound(&self, interface: &str, pod: &kubernetes::PodKey) -> Option<u32> {
        let identity = self.kubernetes.as_ref()?.identity_of(pod, &self.compiled)?;
        self.interfaces.get(interface).is_some_and(|&(_, bound)| bound == identity).then_some(identity)
    }

    /// Whether `addr` is identified because a certificate bound it.
    pub fn bound_by_certificate(&self, addr: IpAddr) -> bool {
        self.kernel_addresses.get(&addr).is_some_and(|&id| id != zt_common::identity::HOST)
    }

    /// Brings the maps in line with the sources. Returns identity events to report.
    pub fn refresh(&mut self, datapath: &mut Datapath) -> Result<Vec<Value>> {
        let (addresses, certificate_cgroups, pod_interfaces, mut events) = self.address_bindings()?;
        let mut cgroups = match &mut self.cgroups {
            Some(source) => source.scan(&self.compiled.cgroups),
            None => BTreeMap::new(),
        };
        // A certificate names a cgroup more precisely than a selector does.
        cgroups.extend(certificate_cgroups);
        self.apply_cgroups(datapath, cgroups, &mut events)?;
        self.apply_addresses(datapath, addresses, &mut events)?;
        self.refresh_interfaces(datapath, pod_interfaces, &mut events)?;
        Ok(events)
    }

    /// A reload, first step (after `Datapath::stage`): the sources answer for `compiled` from
    /// now on, and the addresses that verified certificates bind under its `spiffe` selectors
    /// are written into the staged generation. Returns identity events to report once the
    /// reload is applied. Then `Datapath::switch` and [`switched`](Self::switched), or, if the
    /// reload fails, [`unstage`](Self::unstage).
    pub fn stage(&mut self, compiled: Arc<Compiled>, datapath: &mut Datapath) -> Result<Vec<Value>> {
        let previous = std::mem::replace(&mut self.compiled, compiled);
        let (addresses, _, _, events) = self.address_bindings()?;
        self.staged = Some((previous, addresses.clone()));
        for (&addr, &identity) in &addresses {
            datapath.stage_address(addr, identity)?;
        }
        Ok(events)
    }

    /// Gives up a staged reload: the previous policy's selectors apply again.
    pub fn unstage(&mut self) {
        if let Some((previous, _)) = self.staged.take() {
            self.compiled = previous;
        }
    }

    /// A reload, last step (after `Datapath::switch`): the staged addresses are those in force,
    /// and cgroups and interfaces are bound to the identities of the new selectors.
    pub fn switched(&mut self, datapath: &mut Datapath) -> Result<Vec<Value>> {
        if let Some((_, addresses)) = self.staged.take() {
            self.kernel_addresses = addresses;
        }
        self.refresh(datapath)
    }

    /// Address → identity: the node's own addresses are `host`, each verified certificate's
    /// addresses its identity, and each pod's its label set's; cgroup id → identity for the
    /// certificates; interface → identity for this node's pods; and the identity events of the
    /// certificates and pods whose state changed.
    #[allow(clippy::type_complexity)]
    fn address_bindings(&mut self) -> Result<(BTreeMap<IpAddr, u32>, BTreeMap<u64, u32>, BTreeMap<String, u32>, Vec<Value>)> {
        let (pods, mut events) = match &mut self.kubernetes {
            Some(source) => source.bindings(&self.compiled),
            None => Default::default(),
        };
        let (certified, cgroups, certificate_events) = self.certificate_bindings();
        events.extend(certificate_events);
        // A certificate that names an address proves more than the API server's word.
        let mut addresses = pods.addresses;
        addresses.extend(certified);
        // The node's addresses are its own, whatever a certificate or a pod claims.
        addresses.extend(host::node_addresses()?.into_iter().map(|addr| (addr, zt_common::identity::HOST)));
        Ok((addresses, cgroups, pods.interfaces, events))
    }

    /// Address → identity and cgroup id → identity for every verified certificate, judged with
    /// the current selectors, and the identity events of the certificates whose state changed.
    fn certificate_bindings(&mut self) -> (BTreeMap<IpAddr, u32>, BTreeMap<u64, u32>, Vec<Value>) {
        let (mut addresses, mut cgroups) = (BTreeMap::new(), BTreeMap::new());
        let Some(certificates) = &mut self.certificates else {
            return (addresses, cgroups, Vec::new());
        };
        let (bound, events) = certificates.rescan(&self.compiled.spiffe, SystemTime::now());
        for b in bound {
            addresses.extend(b.addresses.iter().map(|a| (*a, b.identity)));
            let cgroup_id = b.cgroup.as_deref().and_then(|path| self.cgroups.as_mut()?.id_of(path));
            if let Some(cgroup_id) = cgroup_id {
                cgroups.insert(cgroup_id, b.identity);
            }
        }
        (addresses, cgroups, events)
    }

    fn apply_cgroups(&mut self, datapath: &mut Datapath, wanted: BTreeMap<u64, u32>, events: &mut Vec<Value>) -> Result<()> {
        let mut bound = BTreeMap::new();
        for (&cgroup_id, &identity) in &wanted {
            let path = self.cgroup_path(cgroup_id).unwrap_or("?").to_owned();
            let kept = self.kernel_cgroups.get(&cgroup_id).copied();
            if kept != Some(identity) {
                let result = datapath.bind_cgroup(cgroup_id, identity);
                if !self.applied("cgroup", &path, identity, result, events) {
                    // Refused: the kernel keeps what it had, if anything.
                    bound.extend(kept.map(|kept| (cgroup_id, kept)));
                    continue;
                }
                tracing::info!(cgroup = %path, cgroup_id, identity = self.name(identity), "cgroup identified");
            }
            bound.insert(cgroup_id, identity);
        }
        for &cgroup_id in self.kernel_cgroups.keys().filter(|id| !wanted.contains_key(id)) {
            datapath.unbind_cgroup(cgroup_id)?;
            tracing::info!(cgroup = %self.cgroup_path(cgroup_id).unwrap_or("?"), cgroup_id, "cgroup no longer identified");
        }
        self.kernel_cgroups = bound;
        Ok(())
    }

    fn apply_addresses(&mut self, datapath: &mut Datapath, wanted: BTreeMap<IpAddr, u32>, events: &mut Vec<Value>) -> Result<()> {
        let mut bound = BTreeMap::new();
        for (&addr, &identity) in &wanted {
            let kept = self.kernel_addresses.get(&addr).copied();
            if kept != Some(identity) {
                let result = datapath.bind_address(addr, identity);
                if !self.applied("address", &addr.to_string(), identity, result, events) {
                    bound.extend(kept.map(|kept| (addr, kept)));
                    continue;
                }
            }
            bound.insert(addr, identity);
        }
        for &addr in self.kernel_addresses.keys().filter(|a| !wanted.contains_key(a)) {
            datapath.unbind_address(addr)?;
        }
        self.kernel_addresses = bound;
        Ok(())
    }

    /// Whether a binding was written. One the kernel refused is left out, whole, and reported
    /// once (an error and an identity event) until it is written: the rest of the node's
    /// bindings go on, and what it would have identified stays identified by its address.
    fn applied(&mut self, source: &str, what: &str, identity: u32, result: Result<()>, events: &mut Vec<Value>) -> bool {
        let key = format!("{source} {what}");
        let Err(err) = result else {
            self.refused.remove(&key);
            return true;
        };
        if self.refused.insert(key) {
            let detail = format!("{err:#}");
            let name = self.name(identity).to_owned();
            tracing::error!(source, binding = what, identity = %name, "binding refused: {detail}");
            events.push(json!({
                "kind": "identity",
                "source": source,
                "binding": what,
                "identity": name,
                "identity_id": identity,
                "result": "rejected",
                "reason": "kernel-refused",
                "detail": detail,
            }));
        }
        false
    }

    /// `pods`: this node's pods' interfaces and their identities; an `interface` selector
    /// naming the same interface wins.
    fn refresh_interfaces(&mut self, datapath: &mut Datapath, pods: BTreeMap<String, u32>, events: &mut Vec<Value>) -> Result<()> {
        // An interface may appear, vanish, or come back with a new index after start (a stale
        // index must not identify whatever interface reuses it), and a reload may move or drop
        // its selector.
        let mut selected = pods;
        selected.extend(self.compiled.interfaces.iter().cloned());
        let wanted: BTreeMap<String, (u32, u32)> = selected
            .iter()
            .filter_map(|(name, identity)| {
                let ifindex = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
                Some((name.clone(), (ifindex, *identity)))
            })
            .collect();
        let mut wanted = wanted;
        for (name, &(ifindex, identity)) in wanted.clone().iter() {
            if self.interfaces.get(name) != Some(&(ifindex, identity)) {
                let result = datapath.bind_interface(ifindex, identity);
                if !self.applied("interface", name, identity, result, events) {
                    // Refused: keep what the kernel holds for it, if anything.
                    match self.interfaces.get(name) {
                        Some(&kept) => wanted.insert(name.clone(), kept),
                        None => wanted.remove(name),
                    };
                    continue;
                }
                tracing::info!(interface = %name, ifindex, identity = self.name(identity), "interface identified");
            }
        }
        for (name, &(ifindex, _)) in &self.interfaces {
            let still_bound = wanted.values().any(|&(wanted_index, _)| wanted_index == ifindex);
            if !still_bound {
                datapath.unbind_interface(ifindex)?;
                tracing::info!(interface = %name, ifindex, "interface no longer identified");
            }
        }
        self.interfaces = wanted;
        Ok(())
    }

    /// On adoption, after the first [`refresh`](Self::refresh): removes the cgroup and interface
    /// bindings an earlier agent left that these sources do not make (a cgroup or interface
    /// gone, or no longer selected, while no agent ran).
    pub fn sweep_adopted(&self, datapath: &mut Datapath) -> Result<usize> {
        let mut removed = 0;
        for cgroup_id in datapath.cgroup_bindings()? {
            if !self.kernel_cgroups.contains_key(&cgroup_id) {
                datapath.unbind_cgroup(cgroup_id)?;
                removed += 1;
            }
        }
        for ifindex in datapath.interface_bindings()? {
            if !self.interfaces.values().any(|&(bound, _)| bound == ifindex) {
                datapath.unbind_interface(ifindex)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn name(&self, identity: u32) -> &str {
        self.compiled.identities.name(identity).unwrap_or("?")
    }
}
