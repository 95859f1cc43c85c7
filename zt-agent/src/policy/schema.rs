//! The YAML file format, as serde reads it. Values stay loosely typed (names and selectors as
//! strings, ports as signed numbers) so that validation, not serde, explains what is wrong.

use std::{collections::BTreeMap, fmt};

use serde::{
    de::{self, IgnoredAny},
    Deserialize, Deserializer,
};

use super::{Action, PolicyMode, Protocol};

/// What every document must say first; read leniently to pick the schema of the rest.
#[derive(Deserialize)]
#[serde(expecting = "a mapping with apiVersion, kind, metadata and spec")]
pub(super) struct Header {
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    pub kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Document<Spec> {
    // Checked from the header; declared so that `deny_unknown_fields` accepts them.
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Metadata {
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdentitySpec {
    #[serde(default)]
    pub selectors: Vec<Selector>,
}

/// One of the keys, exactly; validation says so when a selector has none or several.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Selector {
    pub cidr: Option<String>,
    pub cgroup: Option<String>,
    pub spiffe: Option<String>,
    pub interface: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicySpec {
    pub subject: Vec<SubjectItem>,
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default, deserialize_with = "present")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, deserialize_with = "present")]
    pub egress: Option<Vec<EgressRule>>,
}

/// A key that is present is `Some`, even when its value is empty (`ingress:`): a listed
/// direction makes the subject default-deny, whether or not it has rules.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IngressRule {
    pub from: Vec<PeerItem>,
    pub ports: Option<Vec<PortItem>>,
    #[serde(default)]
    pub action: Action,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EgressRule {
    pub to: Vec<PeerItem>,
    pub ports: Option<Vec<PortItem>>,
    #[serde(default)]
    pub action: Action,
}

/// A subject: a name (`web`, `any`) or `{pods: ...}`.
pub(super) enum SubjectItem {
    Name(String),
    Pods(PodsSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodsItem {
    pods: PodsSpec,
}

/// A peer: a name (`web`, `world`, `any`), an address range `{cidr: ..., except: [...]}`, or
/// `{pods: ...}`. Which of the keys a map has is for validation to check.
pub(super) enum PeerItem {
    Name(String),
    Map(PeerMap),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PeerMap {
    pub cidr: Option<String>,
    pub except: Option<Vec<String>>,
    pub pods: Option<PodsSpec>,
}

/// `pods:`, as Kubernetes spells a label selector, with a namespace and a service account.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PodsSpec {
    pub namespace: Option<String>,
    pub namespace_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<ExpressionSpec>,
    pub service_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LabelSelectorSpec {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<ExpressionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExpressionSpec {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// A string or a map, told apart before either is read.
fn name_or_map<'de, D, T, M>(
    deserializer: D,
    expecting: &'static str,
    name: fn(String) -> T,
    map: fn(M) -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    M: Deserialize<'de>,
{
    struct Visitor<T, M> {
        expecting: &'static str,
        name: fn(String) -> T,
        map: fn(M) -> T,
    }

    impl<'de, T, M: Deserialize<'de>> de::Visitor<'de> for Visitor<T, M> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            Ok((self.name)(v.to_owned()))
        }

        fn visit_map<A: de::MapAccess<'de>>(self, access: A) -> Result<T, A::Error> {
            M::deserialize(de::value::MapAccessDeserializer::new(access)).map(self.map)
        }
    }

    deserializer.deserialize_any(Visitor { expecting, name, map })
}

impl<'de> Deserialize<'de> for SubjectItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        name_or_map(deserializer, "an identity name, any, or {pods: SELECTOR}", SubjectItem::Name, |item: PodsItem| {
            SubjectItem::Pods(item.pods)
        })
    }
}

impl<'de> Deserialize<'de> for PeerItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        name_or_map(
            deserializer,
            "an identity name, world, host, any, {cidr: PREFIX, except: [PREFIX, ...]} or {pods: SELECTOR}",
            PeerItem::Name,
            PeerItem::Map,
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortItem {
    pub protocol: Protocol,
    pub port: Option<PortSpec>,
    #[serde(rename = "type")]
    pub icmp_type: Option<i64>,
}

/// `port: 5432`, `port: "6000-6010"` or `port: http` (a container port's name).
pub(super) enum PortSpec {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl de::Visitor<'_> for PortVisitor {
            type Value = PortSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number, a \"LO-HI\" range or a port name")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortSpec, E> {
                // Anything past i64 is out of range anyway; validation says so.
                Ok(PortSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortSpec, E> {
                Ok(PortSpec::Text(v.to_owned()))
            }
        }

        deserializer.deserialize_any(PortVisitor)
    }
}
