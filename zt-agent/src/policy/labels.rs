//! Kubernetes label selectors (matchLabels AND matchExpressions), checked as the API server
//! checks them and matched as it matches them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Every requirement must hold; no requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector at `field` (e.g. `spec.podSelector`), or the error that names what is wrong.
    pub fn from_api(selector: &LabelSelector, field: &str) -> Result<Self, String> {
        let expressions = selector.match_expressions.iter().flatten();
        let expressions = expressions.map(|e| (e.key.as_str(), e.operator.as_str(), e.values.as_deref().unwrap_or_default()));
        Self::new(selector.match_labels.iter().flatten(), expressions, field)
    }

    /// `matchLabels` AND `matchExpressions` (key, operator, values), checked as the API server
    /// checks them; errors name the field under `field`.
    pub fn new<'a>(
        match_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
        match_expressions: impl IntoIterator<Item = (&'a str, &'a str, &'a [String])>,
        field: &str,
    ) -> Result<Self, String> {
        let mut requirements: Vec<Requirement> =
            match_labels.into_iter().map(|(key, value)| Requirement::In(key.clone(), vec![value.clone()])).collect();
        for (i, (key, operator, values)) in match_expressions.into_iter().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            if key.is_empty() {
                return Err(format!("{at}.key: empty"));
            }
            let (key, values) = (key.to_owned(), values.to_vec());
            requirements.push(match operator {
                "In" | "NotIn" if values.is_empty() => return Err(format!("{at}.values: {operator} needs at least one value")),
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => return Err(format!("{at}.values: {operator} takes no values")),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(format!("{at}.operator: {other:?} is not In, NotIn, Exists or DoesNotExist")),
            });
        }
        Ok(Selector { requirements })
    }

    /// Whether it selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|requirement| match requirement {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn labels_and_expressions_all_hold_and_empty_selects_everything() {
        let everything = Selector::from_api(&LabelSelector::default(), "spec.podSelector").unwrap();
        assert!(everything.matches(&labels(&[])) && everything.matches(&labels(&[("a", "b")])));
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                expression("tier", "In", &["front", "edge"]),
                expression("env", "NotIn", &["dev"]),
                expression("team", "Exists", &[]),
                expression("legacy", "DoesNotExist", &[]),
            ]),
        };
        let s = Selector::from_api(&selector, "spec.podSelector").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "edge"), ("team", "a")])), "NotIn holds when the key is absent");
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "edge"), ("team", "a"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "front")])), "team must exist");
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "front"), ("team", "a"), ("legacy", "")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("tier", "front"), ("team", "a")])));
    }

    #[test]
    fn malformed_expressions_name_their_field() {
        for (e, says) in [
            (expression("tier", "In", &[]), "spec.podSelector.matchExpressions[0].values: In needs at least one value"),
            (expression("tier", "Exists", &["x"]), "spec.podSelector.matchExpressions[0].values: Exists takes no values"),
            (expression("tier", "Gt", &["1"]), "spec.podSelector.matchExpressions[0].operator: \"Gt\" is not In, NotIn, Exists or DoesNotExist"),
            (expression("", "Exists", &[]), "spec.podSelector.matchExpressions[0].key: empty"),
        ] {
            let selector = LabelSelector { match_labels: None, match_expressions: Some(vec![e]) };
            assert_eq!(Selector::from_api(&selector, "spec.podSelector").unwrap_err(), says);
        }
    }
}
