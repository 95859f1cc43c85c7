//! Prometheus metrics: what a scrape of `/metrics` reads (a [`Snapshot`] of the kernel counters,
//! the maps and the policy state) and how it is written, with `prometheus-client`. The HTTP side
//! (`/metrics`, `/healthz`, `/readyz`) is in [`server`]; every metric is listed in
//! `docs/metrics.md`.
//!
//! Values are read at scrape time, never cached: the kernel's per-CPU counters are summed, the
//! maps walked, and the policy state read under its lock for a moment.

pub mod server;

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};

use crate::{
    datapath::{
        counters::Counters,
        probe::{MapUsage, Probe},
        Mode,
    },
    events::{fanout::Sinks, sinks::SinkStats},
    identity::sources::kubernetes::ClusterView,
    state::Policies,
};

/// Everything a scrape reads.
pub struct Sources {
    pub probe: Probe,
    pub policies: Arc<Mutex<Policies>>,
    /// The event sinks, whose counters become `zt_sink_events_total`.
    pub sinks: Option<Arc<Sinks>>,
    /// The Kubernetes source's view of the cluster, with `--kubernetes`.
    pub kubernetes: Option<Arc<Mutex<ClusterView>>>,
}

/// The values of one scrape.
#[derive(Debug)]
pub struct Snapshot {
    pub mode: Mode,
    pub generation: u32,
    pub counters: Counters,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    /// From reading the policy files to the switch, for the policy in force.
    pub last_apply: Option<Duration>,
    pub rules: usize,
    pub identities: usize,
    pub maps: Vec<MapUsage>,
    pub sinks: Vec<SinkStats>,
    pub kubernetes: Option<KubernetesStats>,
}

/// How the Kubernetes source stands.
#[derive(Debug)]
pub struct KubernetesStats {
    /// The watches deliver; when not, zt enforces with the pods it last knew.
    pub reachable: bool,
    pub pods: usize,
}

impl Sources {
    pub fn snapshot(&self) -> Result<Snapshot> {
        let config = self.probe.config()?;
        let counters = self.probe.counters()?;
        let maps = self.probe.map_usage()?;
        // The generation and its counters come from one lock, so a scrape never sees a switched
        // generation before the reload that switched it is counted.
        let (generation, reloads_applied, reloads_rejected, last_apply, rules, identities) = {
            let policies = self.policies.lock().expect("policies lock poisoned");
            let current = policies.current();
            let counters = (policies.reloads, policies.rejected, policies.last_apply);
            (policies.generation(), counters.0, counters.1, counters.2, current.rules.len(), current.identities.len())
        };
        Ok(Snapshot {
            mode: Mode::from_raw(config.mode),
            generation,
            counters,
            reloads_applied,
            reloads_rejected,
            last_apply,
            rules,
            identities,
            maps,
            sinks: self.sinks.as_ref().map(|sinks| sinks.stats()).unwrap_or_default(),
            kubernetes: self.kubernetes.as_ref().map(|view| {
                let view = view.lock().expect("cluster view lock poisoned");
                KubernetesStats { reachable: view.last_error.is_none(), pods: view.pods.len() }
            }),
        })
    }
}

/// The two text formats Prometheus scrapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text (ends in `# EOF`).
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Snapshot {
    pub fn encode(self, format: Format) -> Result<String, fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        match format {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?,
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry)?,
        }
        Ok(text)
    }
}

/// One metric family: its descriptor, then each series with its labels.
fn family<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    series: impl IntoIterator<Item = ([(&'static str, String); N], Value)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in series {
        let labelled = metric.encode_family(&labels)?;
        match value {
            Value::Counter(n) => ConstCounter::new(n).encode(labelled)?,
            Value::Gauge(n) => ConstGauge::new(n).encode(labelled)?,
            Value::Seconds(s) => ConstGauge::new(s).encode(labelled)?,
        }
    }
    Ok(())
}

/// A metric without labels.
fn single(encoder: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, value: Value) -> fmt::Result {
    family::<0>(encoder, name, help, unit, value.metric_type(), [([], value)])
}

#[derive(Clone, Copy)]
enum Value {
    Counter(u64),
    Gauge(i64),
    Seconds(f64),
}

impl Value {
    fn metric_type(self) -> MetricType {
        match self {
            Value::Counter(_) => MetricType::Counter,
            Value::Gauge(_) | Value::Seconds(_) => MetricType::Gauge,
        }
    }
}

fn gauge(n: impl TryInto<i64>) -> Value {
    Value::Gauge(n.try_into().unwrap_or(i64::MAX))
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        family(
            e,
            "zt_mode",
            "The node's enforcement mode: 1 for the mode in force, 0 for the other.",
            None,
            MetricType::Gauge,
            [Mode::Enforce, Mode::Monitor].map(|mode| ([("mode", mode.name().to_owned())], gauge(i64::from(mode == self.mode)))),
        )?;
        family(
            e,
            "zt_packets",
            "Packets judged by the datapath, by verdict, reason, deciding direction and hook (series appear once non-zero).",
            None,
            MetricType::Counter,
            self.counters.nonzero().map(|c| {
                (
                    [
                        ("verdict", c.verdict.name().to_owned()),
                        ("reason", c.reason.name().to_owned()),
                        ("direction", c.direction.name().to_owned()),
                        ("hook", c.hook.name().to_owned()),
                    ],
                    Value::Counter(c.packets),
                )
            }),
        )?;
        let events = self.counters.events();
        family(
            e,
            "zt_flow_events",
            "Flow events the kernel had to report, by outcome: emitted to the agent, suppressed by the event limits, or lost to a full ring buffer.",
            None,
            MetricType::Counter,
            [("emitted", events.emitted), ("suppressed", events.suppressed), ("lost", events.lost)]
                .map(|(outcome, n)| ([("outcome", outcome.to_owned())], Value::Counter(n))),
        )?;
        single(e, "zt_policy_generation", "The policy generation in force.", None, gauge(self.generation))?;
        family(
            e,
            "zt_policy_reloads",
            "Policy reloads since the agent started, by result: applied, or rejected (the policy in force stayed).",
            None,
            MetricType::Counter,
            [("applied", self.reloads_applied), ("rejected", self.reloads_rejected)]
                .map(|(result, n)| ([("result", result.to_owned())], Value::Counter(n))),
        )?;
        if let Some(took) = self.last_apply {
            single(
                e,
                "zt_policy_last_apply_duration",
                "How long the policy in force took from reading its files to being in force.",
                Some(&Unit::Seconds),
                Value::Seconds(took.as_secs_f64()),
            )?;
        }
        single(e, "zt_policy_rules", "Rules of the policy in force.", None, gauge(self.rules))?;
        single(
            e,
            "zt_policy_identities",
            "Identities of the policy in force: declared, and pod label sets.",
            None,
            gauge(self.identities),
        )?;
        if let Some(kubernetes) = &self.kubernetes {
            single(
                e,
                "zt_kubernetes_api_reachable",
                "1 while the Kubernetes API server's watches deliver; 0 while they fail and zt enforces with the pods it last knew.",
                None,
                gauge(i64::from(kubernetes.reachable)),
            )?;
            single(e, "zt_kubernetes_pods", "Pods the agent knows from the API server (host-network pods left out).", None, gauge(kubernetes.pods))?;
        }
        family(
            e,
            "zt_map_entries",
            "Entries in a datapath map.",
            None,
            MetricType::Gauge,
            self.maps.iter().map(|m| ([("map", m.name.to_owned())], gauge(m.entries))),
        )?;
        family(
            e,
            "zt_map_max_entries",
            "Capacity of a datapath map (for the policy maps: both generations' slots).",
            None,
            MetricType::Gauge,
            self.maps.iter().map(|m| ([("map", m.name.to_owned())], gauge(m.capacity))),
        )?;
        if !self.sinks.is_empty() {
            family(
                e,
                "zt_sink_events",
                "Flow events per sink, by outcome: delivered, or dropped (the sink could not keep up or failed).",
                None,
                MetricType::Counter,
                self.sinks.iter().flat_map(|s| {
                    [("delivered", s.delivered), ("dropped", s.dropped)].map(|(outcome, n)| {
                        ([("sink", s.name.clone()), ("kind", s.kind.clone()), ("outcome", outcome.to_owned())], Value::Counter(n))
                    })
                }),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use zt_common::{counters, Direction, Hook, Reason, Verdict};

    use super::*;

    fn snapshot() -> Snapshot {
        let mut values = vec![0; counters::COUNT as usize];
        values[counters::packet_index(Verdict::Deny, Reason::DefaultDeny, Direction::Egress, Hook::TcIngress) as usize] = 7;
        values[counters::EVENTS_EMITTED as usize] = 2;
        values[counters::EVENTS_SUPPRESSED as usize] = 5;
        Snapshot {
            mode: Mode::Enforce,
            generation: 3,
            counters: Counters::from_summed(values),
            reloads_applied: 2,
            reloads_rejected: 1,
            last_apply: Some(Duration::from_millis(250)),
            rules: 12,
            identities: 4,
            maps: vec![MapUsage { name: "conntrack", entries: 10, capacity: 262_144 }],
            sinks: vec![SinkStats {
                name: "siem".into(),
                kind: "syslog".into(),
                delivered: 2,
                dropped: 0,
                errors: 0,
                reconnects: 0,
                connected: Some(true),
                queued: 0,
            }],
            kubernetes: Some(KubernetesStats { reachable: false, pods: 9 }),
        }
    }

    #[test]
    fn every_metric_is_written_with_its_labels() {
        let text = snapshot().encode(Format::Prometheus).unwrap();
        for line in [
            "# TYPE zt_packets_total counter",
            r#"zt_packets_total{verdict="deny",reason="default-deny",direction="egress",hook="tc-ingress"} 7"#,
            r#"zt_flow_events_total{outcome="emitted"} 2"#,
            r#"zt_flow_events_total{outcome="suppressed"} 5"#,
            r#"zt_flow_events_total{outcome="lost"} 0"#,
            r#"zt_mode{mode="enforce"} 1"#,
            r#"zt_mode{mode="monitor"} 0"#,
            "zt_policy_generation 3",
            r#"zt_policy_reloads_total{result="applied"} 2"#,
            r#"zt_policy_reloads_total{result="rejected"} 1"#,
            "zt_policy_last_apply_duration_seconds 0.25",
            "zt_policy_rules 12",
            "zt_policy_identities 4",
            r#"zt_map_entries{map="conntrack"} 10"#,
            r#"zt_map_max_entries{map="conntrack"} 262144"#,
            r#"zt_sink_events_total{sink="siem",kind="syslog",outcome="delivered"} 2"#,
            r#"zt_sink_events_total{sink="siem",kind="syslog",outcome="dropped"} 0"#,
            "zt_kubernetes_api_reachable 0",
            "zt_kubernetes_pods 9",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        assert_eq!(text.matches("zt_packets_total{").count(), 1, "zero counters are left out:\n{text}");
    }

    #[test]
    fn openmetrics_ends_with_eof() {
        let text = snapshot().encode(Format::OpenMetrics).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# UNIT zt_policy_last_apply_duration_seconds seconds"), "{text}");
    }
}
