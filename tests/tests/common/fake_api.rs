//! A Kubernetes API server that knows only pods and namespaces, serving them as the real one
//! does to a kube-rs watcher: a list (`GET /api/v1/pods`), then a watch
//! (`GET /api/v1/pods?watch=true`) that streams `{"type": "ADDED"|"MODIFIED"|"DELETED",
//! "object": …}` lines for as long as the connection lasts. The test changes the cluster
//! through it (a pod is scheduled, gets its address, goes), and can take it away to play an
//! outage. It listens on loopback inside the namespace it is started in.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    extract::State,
    http::{header, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Namespace,
}

#[derive(Default)]
struct Cluster {
    resource_version: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    watches: Vec<(Kind, mpsc::UnboundedSender<String>)>,
}

impl Cluster {
    fn objects(&mut self, kind: Kind) -> &mut BTreeMap<String, Value> {
        match kind {
            Kind::Pod => &mut self.pods,
            Kind::Namespace => &mut self.namespaces,
        }
    }

    /// Stores (or, with `None`, deletes) an object and tells the watches of its kind.
    fn change(&mut self, kind: Kind, key: String, object: Option<Value>) {
        self.resource_version += 1;
        let version = self.resource_version.to_string();
        let (event, mut object) = match object {
            Some(object) if self.objects(kind).contains_key(&key) => ("MODIFIED", object),
            Some(object) => ("ADDED", object),
            None => match self.objects(kind).remove(&key) {
                Some(object) => ("DELETED", object),
                None => return,
            },
        };
        object["metadata"]["resourceVersion"] = json!(version);
        if event != "DELETED" {
            self.objects(kind).insert(key, object.clone());
        }
        let line = json!({"type": event, "object": object}).to_string() + "\n";
        self.watches.retain(|(watching, tx)| *watching != kind || tx.send(line.clone()).is_ok());
    }
}

pub struct FakeApiServer {
    address: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 in `ns` (an ephemeral port).
    pub fn start(ns: &zt_tests::Netns) -> FakeApiServer {
        let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0")).expect("binding the fake API server");
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let app = Router::new()
            .route("/api/v1/pods", get(|state, query| serve(state, query, Kind::Pod)))
            .route("/api/v1/namespaces", get(|state, query| serve(state, query, Kind::Namespace)))
            .with_state(cluster.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
        FakeApiServer { address, cluster, runtime: Some(runtime) }
    }

    /// A kubeconfig that points kube-rs here, over plain HTTP.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: agent, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]\n\
             current-context: fake\n",
            self.address
        )
    }

    pub fn set_namespace(&self, name: &str, labels: Value) {
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
        self.cluster.lock().unwrap().change(Kind::Namespace, name.to_owned(), Some(object));
    }

    /// Adds or updates a pod scheduled on `node`; `ips` empty until its CNI has given it one.
    pub fn set_pod(&self, namespace: &str, name: &str, service_account: &str, labels: Value, node: &str, ips: &[&str]) {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "uid": format!("uid-{namespace}-{name}")},
            "spec": {"serviceAccountName": service_account, "nodeName": node,
                     "containers": [{"name": "main", "image": "example", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
        });
        self.cluster.lock().unwrap().change(Kind::Pod, format!("{namespace}/{name}"), Some(object));
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.cluster.lock().unwrap().change(Kind::Pod, format!("{namespace}/{name}"), None);
    }

    /// Gone, as in an outage: the watches end and nothing answers any more.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            self.cluster.lock().unwrap().watches.clear();
            runtime.shutdown_background();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A list, or with `watch=true` a stream of the changes from now on.
async fn serve(State(cluster): State<Arc<Mutex<Cluster>>>, uri: Uri, kind: Kind) -> Response {
    let mut cluster = cluster.lock().unwrap();
    if uri.query().unwrap_or_default().split('&').any(|pair| pair == "watch=true") {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        cluster.watches.push((kind, tx));
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|line| line.map(Ok::<_, std::convert::Infallible>)));
        return Body::from_stream(stream).into_response();
    }
    let list_kind = match kind {
        Kind::Pod => "PodList",
        Kind::Namespace => "NamespaceList",
    };
    let version = cluster.resource_version.to_string();
    let items: Vec<Value> = cluster.objects(kind).values().cloned().collect();
    let list = json!({"apiVersion": "v1", "kind": list_kind, "metadata": {"resourceVersion": version}, "items": items});
    ([(header::CONTENT_TYPE, "application/json")], list.to_string()).into_response()
}
