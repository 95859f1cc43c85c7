//! `pods` selectors: which pod identities (label sets, `identity::pods`) a subject or peer
//! means. Expanded when the policy is compiled, into the label sets the cluster has then.

use super::labels::Selector;
use crate::identity::pods::{Cluster, PodIdentity};

/// Pods of the matching namespaces whose labels match and, if it is given, whose service
/// account is this one. Every part that is absent matches everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSelector {
    /// `namespace`: exactly this namespace.
    pub namespace: Option<String>,
    /// `namespaceSelector`: the namespaces whose labels match.
    pub namespaces: Option<Selector>,
    /// `matchLabels` AND `matchExpressions`, over the pod's identity labels.
    pub labels: Selector,
    pub service_account: Option<String>,
}

impl PodSelector {
    pub fn matches(&self, pod: &PodIdentity, cluster: &Cluster) -> bool {
        self.namespace.as_ref().is_none_or(|namespace| *namespace == pod.namespace)
            && self.namespaces.as_ref().is_none_or(|selector| selector.matches(cluster.namespace_labels(&pod.namespace)))
            && self.service_account.as_ref().is_none_or(|account| *account == pod.service_account)
            && self.labels.matches(&pod.labels)
    }

    /// The cluster's label sets it selects.
    pub fn select<'a>(&'a self, cluster: &'a Cluster) -> impl Iterator<Item = &'a PodIdentity> + 'a {
        cluster.identities.keys().filter(move |pod| self.matches(pod, cluster))
    }
}

/// Why `name` is not a namespace name (an RFC 1123 label), if it is not.
pub fn namespace_problem(name: &str) -> Option<String> {
    let label = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    (!label(name)).then(|| {
        format!("namespace \"{name}\" is not a Kubernetes namespace name: 1-63 lowercase letters, digits and '-', not starting or ending with '-'")
    })
}

/// Why `name` is not a service account name (an RFC 1123 subdomain), if it is not.
pub fn service_account_problem(name: &str) -> Option<String> {
    let part = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-') && !s.ends_with('-')
    };
    (name.len() > 253 || !name.split('.').all(part)).then(|| {
        format!("service account \"{name}\" is not a Kubernetes name: lowercase letters, digits, '-' and '.', at most 253")
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(namespace: &str, account: &str, pairs: &[(&str, &str)]) -> PodIdentity {
        PodIdentity::of(namespace, account, &labels(pairs)).unwrap()
    }

    #[test]
    fn every_given_part_must_match() {
        let cluster = Cluster {
            identities: [pod("shop", "web", &[("app", "web")]), pod("shop", "api", &[("app", "api")]), pod("dev", "web", &[("app", "web")])]
                .map(|pod| (pod, Default::default()))
                .into(),
            namespaces: [("shop".to_owned(), labels(&[("team", "retail")])), ("dev".to_owned(), labels(&[]))].into(),
        };
        let web = Selector::new(&labels(&[("app", "web")]), [], "matchLabels").unwrap();
        let retail = Selector::new(&labels(&[("team", "retail")]), [], "namespaceSelector").unwrap();
        let names = |selector: &PodSelector| selector.select(&cluster).map(PodIdentity::name).collect::<Vec<_>>();
        let everything = PodSelector { namespace: None, namespaces: None, labels: Selector::default(), service_account: None };
        assert_eq!(names(&everything).len(), 3);
        let web_anywhere = PodSelector { labels: web.clone(), ..everything.clone() };
        assert_eq!(names(&web_anywhere), ["k8s:dev:web:app=web", "k8s:shop:web:app=web"]);
        let web_in_shop = PodSelector { namespace: Some("shop".into()), ..web_anywhere.clone() };
        assert_eq!(names(&web_in_shop), ["k8s:shop:web:app=web"]);
        let retail_pods = PodSelector { namespaces: Some(retail), ..everything.clone() };
        assert_eq!(names(&retail_pods), ["k8s:shop:api:app=api", "k8s:shop:web:app=web"]);
        let api_account = PodSelector { service_account: Some("api".into()), ..everything };
        assert_eq!(names(&api_account), ["k8s:shop:api:app=api"]);
    }

    #[test]
    fn names_are_checked_as_kubernetes_checks_them() {
        assert_eq!(namespace_problem("kube-system"), None);
        assert!(namespace_problem("Shop").is_some() && namespace_problem("-a").is_some() && namespace_problem("").is_some());
        assert!(namespace_problem(&"a".repeat(64)).is_some());
        assert_eq!(service_account_problem("build.bot-1"), None);
        assert!(service_account_problem("a..b").is_some() && service_account_problem("A").is_some());
    }
}
