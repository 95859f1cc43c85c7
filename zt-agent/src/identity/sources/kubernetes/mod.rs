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
    /// One more for every change to `local`.
    local_revision: u64,
    /// Pods without an identity (over the label bound), each reported once while it lasts.
    reported: BTreeSet<PodKey>,
    /// The bindings last computed: refreshes come every 200 ms, changes far less often.
    bound: Option<Computed>,
}

/// Bindings, and what they were computed from.
struct Computed {
    revision: u64,
    local_revision: u64,
    /// Held, so that its address is never another policy's.
    compiled: Arc<Compiled>,
    bindings: Bindings,
}

/// What the source binds under one compiled policy.
#[derive(Clone, Default)]
pub struct Bindings {
    pub addresses: BTreeMap<IpAddr, u32>,
    /// Host-side interface name → identity.
    pub interfaces: BTreeMap<String, u32>,
}

impl KubernetesSource {
    pub fn new(view: Arc<Mutex<ClusterView>>) -> Self {
        Self { view, local: BTreeMap::new(), local_revision: 0, reported: BTreeSet::new(), bound: None }
    }

    /// The view, for readers that only look (metrics).
    pub fn view_handle(&self) -> Arc<Mutex<ClusterView>> {
        self.view.clone()
    }

    fn view(&self) -> std::sync::MutexGuard<'_, ClusterView> {
        self.view.lock().expect("cluster view lock poisoned")
    }

    /// Whether both lists have completed once: before, the view is not the cluster's.
    pub fn revision(&self) -> u64 {
        self.view().revision
    }

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
        self.local_revision += 1;
    }

    /// The pod's interface is going (CNI DEL); with its last interface, the pod is forgotten.
    pub fn forget(&mut self, pod: &PodKey, interface: &str) {
        if let Some(local) = self.local.get_mut(pod) {
            local.interfaces.remove(interface);
            if local.interfaces.is_empty() {
                self.local.remove(pod);
            }
            self.local_revision += 1;
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
    pub fn bindings(&mut self, compiled: &Arc<Compiled>) -> (Bindings, Vec<Value>) {
        let view = self.view.lock().expect("cluster view lock poisoned");
        if let Some(computed) = &self.bound {
            let same = (computed.revision, computed.local_revision) == (view.revision, self.local_revision);
            if same && Arc::ptr_eq(&computed.compiled, compiled) {
                return (computed.bindings.clone(), Vec::new());
            }
        }
        let revision = view.revision;
        let (mut bindings, mut events, mut unidentified) = (Bindings::default(), Vec::new(), BTreeSet::new());
        let mut local_addresses = BTreeMap::new();
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
                local_addresses.extend(local.addresses.iter().map(|addr| (*addr, id)));
                bindings.interfaces.extend(local.interfaces.iter().map(|name| (name.clone(), id)));
            }
        }
        // This node's CNI knows its pods' addresses first-hand: over whatever the API server
        // still says of an address just given to another pod.
        bindings.addresses.extend(local_addresses);
        drop(view);
        self.reported = unidentified;
        self.bound = Some(Computed {
            revision,
            local_revision: self.local_revision,
            compiled: compiled.clone(),
            bindings: bindings.clone(),
        });
        (bindings, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile::compile_for, parse_str};

    fn pod(namespace: &str, name: &str, app: &str, ips: &[&str]) -> PodView {
        PodView {
            namespace: namespace.into(),
            name: name.into(),
            service_account: "default".into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            node: Some("node-a".into()),
            named_ports: vec![("http".into(), zt_common::proto::TCP, 8080)],
        }
    }

    fn source(pods: Vec<PodView>) -> KubernetesSource {
        let mut view = ClusterView::default();
        view.pods = pods.into_iter().map(|pod| ((pod.namespace.clone(), pod.name.clone()), pod)).collect();
        view.namespaces.insert("shop".into(), [("team".to_owned(), "retail".to_owned())].into());
        KubernetesSource::new(Arc::new(Mutex::new(view)))
    }

    fn compiled(source: &KubernetesSource) -> Arc<Compiled> {
        let set = parse_str("apiVersion: zt/v1\nkind: Policy\nmetadata: {name: p}\nspec: {subject: [{pods: {}}], ingress: []}\n", "t.yaml").unwrap();
        Arc::new(compile_for(&set, &source.cluster()).unwrap())
    }

    #[test]
    fn the_cluster_is_its_label_sets_with_their_named_ports() {
        let mut other = pod("shop", "web-2", "web", &[]);
        other.named_ports = vec![("http".into(), zt_common::proto::TCP, 8081)];
        let source = source(vec![pod("shop", "web-1", "web", &["10.30.0.1"]), other, pod("shop", "api-1", "api", &[])]);
        let cluster = source.cluster();
        assert_eq!(cluster.identities.len(), 2, "two pods of web, one label set");
        let web = PodIdentity::of("shop", "default", &[("app".to_owned(), "web".to_owned())].into()).unwrap();
        assert_eq!(cluster.identities[&web]["http"], [(zt_common::proto::TCP, 8080), (zt_common::proto::TCP, 8081)].into());
        assert_eq!(cluster.namespace_labels("shop")["team"], "retail");
    }

    #[test]
    fn pods_addresses_and_local_interfaces_are_bound_to_their_label_set() {
        // The API server still gives web-1 an address api-1's CNI has just been given.
        let mut source = source(vec![pod("shop", "web-1", "web", &["10.30.0.1", "10.30.0.2"]), pod("shop", "api-1", "api", &[])]);
        let compiled = compiled(&source);
        let web = compiled.identities.id("k8s:shop:default:app=web").unwrap();
        let api = compiled.identities.id("k8s:shop:default:app=api").unwrap();
        // api-1's address is not known to the API server yet; its CNI said it.
        source.attach(("shop".into(), "api-1".into()), "veth-api", &["10.30.0.2".parse().unwrap()]);
        let (bound, events) = source.bindings(&compiled);
        assert!(events.is_empty());
        let addresses: Vec<(String, u32)> = bound.addresses.iter().map(|(a, id)| (a.to_string(), *id)).collect();
        assert_eq!(addresses, [("10.30.0.1".to_owned(), web), ("10.30.0.2".to_owned(), api)], "the CNI's word wins");
        assert_eq!(bound.interfaces, [("veth-api".to_owned(), api)].into());
        assert_eq!(source.identity_of(&("shop".into(), "api-1".into()), &compiled), Some(api));
        source.forget(&("shop".into(), "api-1".into()), "veth-api");
        assert!(source.bindings(&compiled).0.interfaces.is_empty(), "forgotten on DEL");

        // A label set the policy in force was not compiled for waits for the reload.
        source.view.lock().unwrap().pods.insert(("shop".into(), "db-1".into()), pod("shop", "db-1", "db", &["10.30.0.3"]));
        source.view.lock().unwrap().revision += 1;
        let (bound, _) = source.bindings(&compiled);
        assert!(!bound.addresses.contains_key(&"10.30.0.3".parse().unwrap()));
        assert_eq!(source.identity_of(&("shop".into(), "db-1".into()), &compiled), None);
        let recompiled = self::compiled(&source);
        assert!(source.bindings(&recompiled).0.addresses.contains_key(&"10.30.0.3".parse().unwrap()));
    }

    #[test]
    fn a_pod_over_the_label_bound_is_reported_once_and_left_unbound() {
        let mut many = pod("shop", "big-1", "big", &["10.30.0.9"]);
        many.labels.extend((0..20).map(|i| (format!("l{i}"), "x".to_owned())));
        let mut source = source(vec![many]);
        let compiled = compiled(&source);
        let (bound, events) = source.bindings(&compiled);
        assert!(bound.addresses.is_empty());
        assert_eq!(events.len(), 1);
        assert_eq!((events[0]["binding"].as_str(), events[0]["reason"].as_str()), (Some("shop/big-1"), Some("too-many-labels")));
        source.view.lock().unwrap().revision += 1;
        assert!(source.bindings(&compiled).1.is_empty(), "reported once while it lasts");
    }
}
