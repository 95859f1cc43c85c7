//! The `kubernetes` identity source, its first part: what the API server says about pods and
//! namespaces, kept as a local view by kube-rs watchers, and each pod's label-set identity (see
//! docs/kubernetes.md). The view survives the API server: a watch that fails is retried with
//! backoff while the view keeps what it last knew, and a relist replaces it only once it is
//! complete, so enforcement never works from an empty or half-listed view.

mod view;

pub use view::{follow, ClusterView, PodView};

use std::collections::BTreeMap;

/// Labels that controllers stamp on every pod they make, which would give each rollout (or
/// each pod) an identity of its own and say nothing about what the workload is.
pub const IGNORED_LABELS: [&str; 8] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
];

/// Most identity labels a pod may carry: beyond, it gets no identity (rather than one that
/// drops some labels and so matches selectors meant for others).
pub const MAX_IDENTITY_LABELS: usize = 16;

/// A pod's identity name: namespace, service account and identity labels, canonical (labels
/// sorted by key), so every node names (and numbers) the same pod alike. An error, saying why,
/// for a pod over [`MAX_IDENTITY_LABELS`].
pub fn identity_name(namespace: &str, service_account: &str, labels: &BTreeMap<String, String>) -> Result<String, String> {
    let kept: Vec<String> = labels
        .iter()
        .filter(|(key, _)| !IGNORED_LABELS.contains(&key.as_str()))
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    if kept.len() > MAX_IDENTITY_LABELS {
        return Err(format!(
            "{} identity labels, more than {MAX_IDENTITY_LABELS}: the pod gets no identity of its own",
            kept.len()
        ));
    }
    Ok(format!("k8s:{namespace}:{service_account}:{}", kept.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn identity_names_are_canonical_and_leave_controller_hashes_out() {
        let a = labels(&[("app", "web"), ("tier", "front"), ("pod-template-hash", "5d9f7c")]);
        let b = labels(&[("tier", "front"), ("app", "web"), ("pod-template-hash", "77c4b1")]);
        assert_eq!(identity_name("prod", "web", &a).unwrap(), "k8s:prod:web:app=web,tier=front");
        assert_eq!(identity_name("prod", "web", &a), identity_name("prod", "web", &b), "two rollouts, one identity");
        assert_ne!(identity_name("prod", "web", &a), identity_name("prod", "default", &a), "the service account counts");
        assert_ne!(identity_name("prod", "web", &a), identity_name("dev", "web", &a), "the namespace counts");
        assert_eq!(identity_name("prod", "default", &BTreeMap::new()).unwrap(), "k8s:prod:default:");
    }

    #[test]
    fn a_pod_over_the_label_bound_gets_no_identity() {
        let many: BTreeMap<String, String> = (0..=MAX_IDENTITY_LABELS).map(|i| (format!("l{i:02}"), "x".into())).collect();
        let err = identity_name("prod", "web", &many).unwrap_err();
        assert!(err.contains("17 identity labels, more than 16"), "{err}");
        let mut at_bound = many.clone();
        at_bound.pop_first();
        at_bound.insert("pod-template-hash".into(), "abc".into());
        assert!(identity_name("prod", "web", &at_bound).is_ok(), "ignored labels do not count");
    }
}
