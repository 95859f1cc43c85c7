//! The local view of the cluster's pods and namespaces, as the watchers deliver them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, ResourceExt as _,
};

/// What the source needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Its addresses (`status.podIPs`), none before the CNI gave it one.
    pub ips: Vec<IpAddr>,
    /// The node it is scheduled on.
    pub node: Option<String>,
    /// Its containers' named ports: (name, IP protocol number, port).
    pub named_ports: Vec<(String, u8, u16)>,
}

impl PodView {
    fn of(pod: &Pod) -> Option<PodView> {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        // A pod on the host network has the node's addresses: those are the node's, not its.
        if spec.and_then(|s| s.host_network) == Some(true) {
            return None;
        }
        // A pod that has run to its end keeps its addresses in its status, but they are free
        // again: the next pod given one must not be taken for it.
        if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
            return None;
        }
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
            .unwrap_or_default();
        Some(PodView {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
            labels: pod.labels().clone(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            named_ports: spec.map(named_ports).unwrap_or_default(),
        })
    }
}

fn named_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<(String, u8, u16)> {
    let ports = spec.containers.iter().flat_map(|container| container.ports.iter().flatten());
    ports
        .filter_map(|port| {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => zt_common::proto::TCP,
                "UDP" => zt_common::proto::UDP,
                "SCTP" => zt_common::proto::SCTP,
                _ => return None,
            };
            Some((port.name.clone()?, protocol, u16::try_from(port.container_port).ok()?))
        })
        .collect()
}

/// Pods by (namespace, name), namespaces' labels by name, and how the watches stand.
#[derive(Debug, Default)]
pub struct ClusterView {
    pub pods: BTreeMap<(String, String), PodView>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Both lists have completed once: before that, the view is not the cluster's.
    pub synced: Synced,
    /// The last error of a watch, until it next delivers; the view is kept meanwhile.
    pub last_error: Option<String>,
    /// One more for every event applied: what follows from the view is computed again only
    /// when it has moved.
    pub revision: u64,
    /// Objects of a relist in progress, applied together once it is complete.
    relisting_pods: Option<BTreeMap<(String, String), PodView>>,
    relisting_namespaces: Option<BTreeMap<String, BTreeMap<String, String>>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    pub pods: bool,
    pub namespaces: bool,
}

impl ClusterView {
    fn pod_event(&mut self, event: watcher::Event<Pod>) {
        let key = |pod: &Pod| (pod.namespace().unwrap_or_default(), pod.name_any());
        match event {
            watcher::Event::Apply(pod) => match PodView::of(&pod) {
                Some(view) => drop(self.pods.insert(key(&pod), view)),
                None => drop(self.pods.remove(&key(&pod))),
            },
            watcher::Event::Delete(pod) => drop(self.pods.remove(&key(&pod))),
            watcher::Event::Init => self.relisting_pods = Some(BTreeMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(relist), Some(view)) = (self.relisting_pods.as_mut(), PodView::of(&pod)) {
                    relist.insert(key(&pod), view);
                }
            }
            watcher::Event::InitDone => {
                self.pods = self.relisting_pods.take().unwrap_or_default();
                self.synced.pods = true;
            }
        }
        self.last_error = None;
        self.revision += 1;
    }

    fn namespace_event(&mut self, event: watcher::Event<Namespace>) {
        match event {
            watcher::Event::Apply(ns) => drop(self.namespaces.insert(ns.name_any(), ns.labels().clone())),
            watcher::Event::Delete(ns) => drop(self.namespaces.remove(&ns.name_any())),
            watcher::Event::Init => self.relisting_namespaces = Some(BTreeMap::new()),
            watcher::Event::InitApply(ns) => {
                if let Some(relist) = self.relisting_namespaces.as_mut() {
                    relist.insert(ns.name_any(), ns.labels().clone());
                }
            }
            watcher::Event::InitDone => {
                self.namespaces = self.relisting_namespaces.take().unwrap_or_default();
                self.synced.namespaces = true;
            }
        }
        self.last_error = None;
        self.revision += 1;
    }
}

/// Keeps `view` in line with the API server, for as long as it runs: pods of every namespace
/// (each node needs every pod's addresses) and namespaces (their labels). Errors are recorded
/// in the view and the watches retried with backoff; the view keeps what it knew.
pub async fn follow(client: Client, view: Arc<Mutex<ClusterView>>) {
    let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff();
    let namespaces = watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    let pods = apply(pods, view.clone(), ClusterView::pod_event);
    let namespaces = apply(namespaces, view, ClusterView::namespace_event);
    futures_util::future::join(pods, namespaces).await;
}

async fn apply<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    view: Arc<Mutex<ClusterView>>,
    on_event: fn(&mut ClusterView, watcher::Event<K>),
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let mut view = view.lock().expect("cluster view lock poisoned");
        match item {
            Ok(event) => on_event(&mut view, event),
            Err(err) => {
                let err = err.to_string();
                if view.last_error.as_ref() != Some(&err) {
                    tracing::warn!("kubernetes API: {err}; enforcing with what is known");
                }
                view.last_error = Some(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{json, Value};

    use super::*;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn pod(namespace: &str, name: &str, labels: Value, ips: &[&str], rv: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "resourceVersion": rv,
                         "uid": format!("uid-{namespace}-{name}")},
            "spec": {"serviceAccountName": name.split('-').next().unwrap(), "nodeName": "node-a", "containers": []},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
        })
    }

    fn namespace(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels, "resourceVersion": "1"}})
    }

    fn list(kind: &str, items: Vec<Value>, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})
    }

    fn respond(body: &Value) -> Response<Body> {
        Response::builder().body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
    }

    /// A watch response: the events as the API server streams them, one JSON object a line.
    fn watch_events(events: &[(&str, Value)]) -> Response<Body> {
        let lines: String = events.iter().map(|(kind, object)| json!({"type": kind, "object": object}).to_string() + "\n").collect();
        Response::builder().body(Body::from(lines.into_bytes())).unwrap()
    }

    /// Plays the API server: `serve` answers each request (or holds it, for a watch that stays
    /// open) given its URI and how many requests for that path came before.
    fn api_server(mut handle: Handle, serve: impl Fn(&str, bool, usize) -> Option<Response<Body>> + Send + 'static) {
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let uri = request.uri().to_string();
                let path = request.uri().path().to_owned();
                let watching = uri.contains("watch=true");
                let n = seen.entry(format!("{path} {watching}")).or_default();
                match serve(&path, watching, *n) {
                    Some(response) => send.send_response(response),
                    None => held.push(send),
                }
                *n += 1;
            }
        });
    }

    async fn eventually(view: &Arc<Mutex<ClusterView>>, what: &str, done: impl Fn(&ClusterView) -> bool) {
        for _ in 0..200 {
            if done(&view.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: {:#?}", view.lock().unwrap());
    }

    fn start(serve: impl Fn(&str, bool, usize) -> Option<Response<Body>> + Send + 'static) -> Arc<Mutex<ClusterView>> {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        api_server(handle, serve);
        let view = Arc::new(Mutex::new(ClusterView::default()));
        tokio::spawn(follow(Client::new(service, "default"), view.clone()));
        view
    }

    #[tokio::test]
    async fn a_list_then_watch_events_make_the_view() {
        let view = start(|path, watching, n| match (path, watching, n) {
            ("/api/v1/pods", false, 0) => Some(respond(&list(
                "PodList",
                vec![
                    pod("prod", "web-1", json!({"app": "web", "pod-template-hash": "5d9f"}), &["10.244.1.5", "fd00:244:1::5"], "10"),
                    pod("prod", "api-1", json!({"app": "api"}), &["10.244.1.6"], "11"),
                ],
                "12",
            ))),
            ("/api/v1/pods", true, 0) => Some(watch_events(&[
                ("ADDED", pod("prod", "db-1", json!({"app": "db"}), &["10.244.2.9"], "13")),
                ("MODIFIED", pod("prod", "web-1", json!({"app": "web", "tier": "front"}), &["10.244.1.5"], "14")),
                ("DELETED", pod("prod", "api-1", json!({"app": "api"}), &["10.244.1.6"], "15")),
            ])),
            ("/api/v1/namespaces", false, 0) => Some(respond(&list("NamespaceList", vec![namespace("prod", json!({"team": "a"}))], "3"))),
            // Watches that stay open, with nothing more to say.
            _ => None,
        });
        eventually(&view, "the list, then the watch's three events", |v| {
            v.synced == Synced { pods: true, namespaces: true } && v.pods.len() == 2 && !v.pods.contains_key(&("prod".into(), "api-1".into()))
        })
        .await;
        let view = view.lock().unwrap();
        let web = &view.pods[&("prod".to_owned(), "web-1".to_owned())];
        assert_eq!(web.ips, ["10.244.1.5".parse::<IpAddr>().unwrap()], "MODIFIED replaced the pod");
        assert_eq!(web.labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!((web.service_account.as_str(), web.node.as_deref()), ("web", Some("node-a")));
        assert!(view.pods.contains_key(&("prod".to_owned(), "db-1".to_owned())));
        assert_eq!(view.namespaces["prod"]["team"], "a");
    }

    #[tokio::test]
    async fn an_unreachable_api_server_leaves_the_view_as_it_was() {
        let view = start(|path, watching, n| match (path, watching, n) {
            ("/api/v1/pods", false, 0) => {
                Some(respond(&list("PodList", vec![pod("prod", "web-1", json!({"app": "web"}), &["10.244.1.5"], "10")], "12")))
            }
            ("/api/v1/namespaces", false, 0) => Some(respond(&list("NamespaceList", vec![namespace("prod", json!({}))], "3"))),
            ("/api/v1/namespaces", true, _) => None,
            // The pod watch, and every relist after it, fails: the API server is gone.
            _ => Some(
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Body::from(
                        serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "the server is unavailable", "reason": "ServiceUnavailable", "code": 503}))
                        .unwrap(),
                    ))
                    .unwrap(),
            ),
        });
        eventually(&view, "the error recorded", |v| v.synced.pods && v.last_error.is_some()).await;
        // Time for the backoff to retry (and fail) more than once.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let view = view.lock().unwrap();
        assert!(view.last_error.as_ref().unwrap().contains("unavailable"), "{:?}", view.last_error);
        assert_eq!(view.pods.len(), 1, "the pods it knew are kept: {view:#?}");
        assert!(view.pods.contains_key(&("prod".to_owned(), "web-1".to_owned())));
    }

    #[tokio::test]
    async fn a_relist_replaces_the_view_once_complete_and_host_network_and_finished_pods_are_left_out() {
        let view = start(|path, watching, n| match (path, watching, n) {
            ("/api/v1/pods", false, 0) => Some(respond(&list(
                "PodList",
                vec![
                    pod("prod", "web-1", json!({"app": "web"}), &["10.244.1.5"], "10"),
                    pod("prod", "gone-1", json!({"app": "gone"}), &["10.244.1.7"], "11"),
                ],
                "12",
            ))),
            // The watch expires (410 Gone): the watcher lists again.
            ("/api/v1/pods", true, 0) => Some(watch_events(&[(
                "ERROR",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                       "message": "too old resource version"}),
            )])),
            ("/api/v1/pods", false, 1) => {
                let mut node_agent = pod("kube-system", "proxy-1", json!({"k8s-app": "proxy"}), &["192.168.0.10"], "20");
                node_agent["spec"]["hostNetwork"] = json!(true);
                let mut done = pod("prod", "job-1", json!({"app": "job"}), &["10.244.1.9"], "20");
                done["status"]["phase"] = json!("Succeeded");
                let pods = vec![pod("prod", "web-1", json!({"app": "web"}), &["10.244.1.5"], "10"), node_agent, done];
                Some(respond(&list("PodList", pods, "21")))
            }
            ("/api/v1/namespaces", false, 0) => Some(respond(&list("NamespaceList", vec![namespace("prod", json!({}))], "3"))),
            _ => None,
        });
        eventually(&view, "the relist applied", |v| v.pods.len() == 1 && v.synced.pods).await;
        let view = view.lock().unwrap();
        assert!(view.pods.contains_key(&("prod".to_owned(), "web-1".to_owned())), "{view:#?}");
        assert!(!view.pods.keys().any(|(ns, _)| ns == "kube-system"), "a host-network pod has the node's addresses");
        assert!(!view.pods.contains_key(&("prod".to_owned(), "job-1".to_owned())), "a finished pod's address is free again");
    }
}
