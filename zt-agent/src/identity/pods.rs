//! Pod identities: a pod is what its namespace, service account and identity labels say it is,
//! so all pods with the same three share one identity (a label set), named canonically and
//! numbered like declared identities, so every node that knows the same pods agrees.
//!
//! Policies select them with `pods` selectors (`policy::pods`), expanded when the policy is
//! compiled into the label sets the cluster has at that moment ([`Cluster`]); a label set that
//! appears later is a new compile.

use std::collections::{BTreeMap, BTreeSet};

/// What every pod identity's name starts with; declared identities cannot take it.
pub const PREFIX: &str = "k8s:";

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

/// One label set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    /// The pod's labels less [`IGNORED_LABELS`].
    pub labels: BTreeMap<String, String>,
}

impl PodIdentity {
    /// A pod's identity, or why it has none (over [`MAX_IDENTITY_LABELS`]).
    pub fn of(namespace: &str, service_account: &str, labels: &BTreeMap<String, String>) -> Result<Self, String> {
        let labels: BTreeMap<String, String> =
            labels.iter().filter(|(key, _)| !IGNORED_LABELS.contains(&key.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        if labels.len() > MAX_IDENTITY_LABELS {
            return Err(format!(
                "{} identity labels, more than {MAX_IDENTITY_LABELS}: the pod gets no identity of its own",
                labels.len()
            ));
        }
        Ok(Self { namespace: namespace.to_owned(), service_account: service_account.to_owned(), labels })
    }

    /// `k8s:<namespace>:<service account>:<key>=<value>,...`, labels sorted by key.
    pub fn name(&self) -> String {
        let labels: Vec<String> = self.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
        format!("{PREFIX}{}:{}:{}", self.namespace, self.service_account, labels.join(","))
    }

    /// The identity a [`name`](Self::name) stands for (as events carry it), if it is one.
    /// Unambiguous: namespaces, service accounts, label keys and values hold no `:`, `=` or `,`.
    pub fn from_name(name: &str) -> Option<Self> {
        let mut parts = name.strip_prefix(PREFIX)?.splitn(3, ':');
        let (namespace, service_account, labels) = (parts.next()?, parts.next()?, parts.next()?);
        let labels = match labels {
            "" => BTreeMap::new(),
            labels => labels
                .split(',')
                .map(|pair| pair.split_once('=').map(|(key, value)| (key.to_owned(), value.to_owned())))
                .collect::<Option<_>>()?,
        };
        let identity = Self::of(namespace, service_account, &labels).ok()?;
        (identity.name() == name).then_some(identity)
    }
}

/// The container ports a label set's pods name: name → (IP protocol number, port), the union
/// over its pods (NetworkPolicy's named ports resolve against them).
pub type NamedPorts = BTreeMap<String, BTreeSet<(u8, u16)>>;

/// What a compile knows of the cluster: its label sets with their named ports, and its
/// namespaces' labels (which namespace selectors match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub identities: BTreeMap<PodIdentity, NamedPorts>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl Cluster {
    /// A namespace's labels; one not (yet) known has none.
    pub fn namespace_labels(&self, namespace: &str) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.namespaces.get(namespace).unwrap_or(&NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn name(namespace: &str, service_account: &str, labels: &BTreeMap<String, String>) -> Result<String, String> {
        PodIdentity::of(namespace, service_account, labels).map(|identity| identity.name())
    }

    #[test]
    fn identity_names_are_canonical_and_leave_controller_hashes_out() {
        let a = labels(&[("app", "web"), ("tier", "front"), ("pod-template-hash", "5d9f7c")]);
        let b = labels(&[("tier", "front"), ("app", "web"), ("pod-template-hash", "77c4b1")]);
        assert_eq!(name("prod", "web", &a).unwrap(), "k8s:prod:web:app=web,tier=front");
        assert_eq!(name("prod", "web", &a), name("prod", "web", &b), "two rollouts, one identity");
        assert_ne!(name("prod", "web", &a), name("prod", "default", &a), "the service account counts");
        assert_ne!(name("prod", "web", &a), name("dev", "web", &a), "the namespace counts");
        assert_eq!(name("prod", "default", &BTreeMap::new()).unwrap(), "k8s:prod:default:");
    }

    #[test]
    fn names_read_back_into_their_identity() {
        for pod in [
            PodIdentity::of("shop", "web", &labels(&[("app", "web"), ("app.kubernetes.io/part-of", "shop")])).unwrap(),
            PodIdentity::of("prod", "default", &BTreeMap::new()).unwrap(),
        ] {
            assert_eq!(PodIdentity::from_name(&pod.name()), Some(pod));
        }
        for not_one in ["web", "k8s:shop", "k8s:shop:web:app", "k8s:shop:web:pod-template-hash=1", "k8s:shop:web:b=1,a=2"] {
            assert_eq!(PodIdentity::from_name(not_one), None, "{not_one}");
        }
    }

    #[test]
    fn a_pod_over_the_label_bound_gets_no_identity() {
        let many: BTreeMap<String, String> = (0..=MAX_IDENTITY_LABELS).map(|i| (format!("l{i:02}"), "x".into())).collect();
        let err = name("prod", "web", &many).unwrap_err();
        assert!(err.contains("17 identity labels, more than 16"), "{err}");
        let mut at_bound = many.clone();
        at_bound.pop_first();
        at_bound.insert("pod-template-hash".into(), "abc".into());
        assert!(name("prod", "web", &at_bound).is_ok(), "ignored labels do not count");
    }
}
