//! The `kubernetes` identity source: what the API server says about pods and namespaces, kept
//! as a local view by kube-rs watchers, and what follows from it — the cluster's label sets
//! (`identity::pods`), which the policy is compiled over, and each pod's addresses, bound to its
//! label set's number. The view survives the API server: a watch that fails is retried with
//! backoff while the view keeps what it last knew, and a relist replaces it only once it is
//! complete, so enforcement never works from an empty or half-listed view.

mod view;

pub use view::{follow, ClusterView, PodView};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde_json::{json, Value};

use crate::{
    identity::pods::{Cluster, PodIdentity},
    policy::compile::Compiled,
};

/// A pod of this node, as its CNI plugin chain reported it (`zt-cni` ADD): known before the API
/// server has its address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LocalPod {
    interfaces: BTreeSet<String>,
    addresses: BTreeSet<IpAddr>,
}

/// (namespace, name).
pub type PodKey = (String, String);

pub struct KubernetesSource {
    view: Arc<Mutex<ClusterView>>,
    local: BTreeMap<PodKey, LocalPod>,
    /// Pods without an identity (over the label bound), each reported once while it lasts.
    reported: BTreeSet<PodKey>,
}

/// What the source binds under one compiled policy.
#[derive(Default)]
pub struct Bindings {
    pub addresses: BTreeMap<IpAddr, u32>,
    /// Host-side interface name → identity.
    pub interfaces: BTreeMap<String, u32>,
}

impl KubernetesSource {
    pub fn new(view: Arc<Mutex<ClusterView>>) -> Self {
        Self { view, local: BTreeMap::new(), reported: BTreeSet::new() }
    }

    /// The view, for readers that only look (metrics).
    pub fn view_handle(&self) -> Arc<Mutex<ClusterView>> {
        self.view.clone()
    }

    fn view(&self) -> std::sync::MutexGuard<'_, ClusterView> {
        self.view.lock().expect("cluster view lock poisoned")
    }

    /// Whether both lists have completed once: before, the view is not the cluster's.
    pub fn synced(&self) -> bool {
        let synced = self.view().synced;
        synced.pods && synced.namespaces
    }

    /// The last error of a watch, while the API server is not answering.
    pub fn last_error(&self) -> Option<String> {
        self.view().last_error.clone()
    }

    /// The label sets of every pod the view knows, with their named ports, and the namespaces'
    /// labels: what the policy is compiled over.
    pub fn cluster(&self) -> Cluster {
        let view = self.view();
        let mut cluster = Cluster { namespaces: view.namespaces.clone(), ..Cluster::default() };
        for pod in view.pods.values() {
            let Ok(identity) = PodIdentity::of(&pod.namespace, &pod.service_account, &pod.labels) else { continue };
            let ports = cluster.identities.entry(identity).or_default();
            for (name, protocol, port) in &pod.named_ports {
                ports.entry(name.clone()).or_default().insert((*protocol, *port));
            }
        }
        cluster
    }

    /// A pod of this node, from its CNI: its host-side interface and the addresses the CNI gave it.
    pub fn attach(&mut self, pod: PodKey, interface: &str, addresses: &[IpAddr]) {
        let local = self.local.entry(pod).or_insert_with(|| LocalPod { interfaces: BTreeSet::new(), addresses: BTreeSet::new() });
        local.interfaces.insert(interface.to_owned());
        local.addresses.extend(addresses);
    }

    /// The pod's interface is going (CNI DEL); with its last interface, the pod is forgotten.
    pub fn forget(&mut self, pod: &PodKey, interface: &str) {
        if let Some(local) = self.local.get_mut(pod) {
            local.interfaces.remove(interface);
            if local.interfaces.is_empty() {
                self.local.remove(pod);
            }
        }
    }

    /// The number `compiled` gives the pod's identity: `None` while the view does not know the
    /// pod, or the policy in force was compiled before its label set appeared.
    pub fn identity_of(&self, pod: &PodKey, compiled: &Compiled) -> Option<u32> {
        let view = self.view();
        let pod = view.pods.get(pod)?;
        let identity = PodIdentity::of(&pod.namespace, &pod.service_account, &pod.labels).ok()?;
        compiled.identities.id(&identity.name())
    }

    /// Every known pod's addresses, and this node's pods' interfaces, bound to their identities
    /// under `compiled`; and an identity event for each pod newly found without one.
    pub fn bindings(&mut self, compiled: &Compiled) -> (Bindings, Vec<Value>) {
        let view = self.view.lock().expect("cluster view lock poisoned");
        let (mut bindings, mut events, mut unidentified) = (Bindings::default(), Vec::new(), BTreeSet::new());
        for (key, pod) in &view.pods {
            let identity = match PodIdentity::of(&pod.namespace, &pod.service_account, &pod.labels) {
                Ok(identity) => identity,
                Err(why) => {
                    if !self.reported.contains(key) {
                        tracing::warn!(namespace = %key.0, pod = %key.1, "pod without identity: {why}");
                        events.push(json!({
                            "kind": "identity", "source": "kubernetes", "binding": format!("{}/{}", key.0, key.1),
                            "result": "rejected", "reason": "too-many-labels", "detail": why,
                        }));
                    }
                    unidentified.insert(key.clone());
                    continue;
                }
            };
            // Not yet in the policy in force: a reload for its label set is on its way.
            let Some(id) = compiled.identities.id(&identity.name()) else { continue };
            bindings.addresses.extend(pod.ips.iter().map(|addr| (*addr, id)));
            if let Some(local) = self.local.get(key) {
                bindings.addresses.extend(local.addresses.iter().map(|addr| (*addr, id)));
                bindings.interfaces.extend(local.interfaces.iter().map(|name| (name.clone(), id)));
            }
        }
        drop(view);
        self.reported = unidentified;
        (bindings, events)
    }
}
