//! The `kubernetes` identity source: what the API server says about pods and namespaces, kept
//! as a local view by kube-rs watchers, and what follows from it — the cluster's label sets
//! (`identity::pods`), which the policy is compiled over, and each pod's addresses, bound to its
//! label set's number. The view survives the API server: a watch that fails is retried with
//! backoff while the view keeps what it last knew, and a relist replaces it only once it is
//! complete, so enforcement never works from an empty or half-listed view.

mod view;

pub use view::{follow, ClusterView, PodView};
