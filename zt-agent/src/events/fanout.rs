//! The fan-out between the event reader and the sinks. The reader hands enriched events to
//! [`Sinks::publish_all`] a batch at a time, which never waits: each sink, and each `zt-agent
//! flows` client, has its own bounded queue, and an event that does not fit in a queue is dropped
//! for that consumer alone and counted. A slow or dead sink therefore never holds up the reader
//! or another sink. Events are shared, not copied: every queue holds an `Arc` of the same record.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot};

use crate::events::{
    record::{Event, Filter, Record},
    sinks::{self, Counters, SinkSpec, SinkStats},
};

/// How many recent flow events `zt-agent flows` (without `--follow`) can show.
pub const RECENT_FLOWS: usize = 256;

/// One consumer's end of the fan-out.
struct Output {
    filter: Filter,
    /// Whether the consumer's format has a form for this event (OCSF and CEF: flows only).
    carries: fn(&Record) -> bool,
    tx: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    /// A `flows` client: removed when it hangs up, its counts also kept in the clients' total.
    client_total: Option<Arc<Counters>>,
}

impl Output {
    fn offer(&self, event: &Event) -> bool {
        if !(self.carries)(event) || !self.filter.accepts(event) {
            return true;
        }
        match self.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.count_drop();
                true
            }
            // A configured sink whose task ended still owes an account of what it was offered.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                if self.client_total.is_some() {
                    return false;
                }
                self.count_drop();
                true
            }
        }
    }

    fn count_drop(&self) {
        self.counters.dropped(1);
        if let Some(total) = &self.client_total {
            total.dropped(1);
        }
    }
}

struct Configured {
    name: String,
    kind: String,
    counters: Arc<Counters>,
    /// A sender kept only to read the queue length.
    tx: mpsc::Sender<Event>,
}

#[derive(Default)]
struct Inner {
    outputs: Vec<Output>,
    recent: VecDeque<Event>,
}

/// The fan-out: configured sinks, `flows` clients, and the recent flows.
pub struct Sinks {
    inner: Mutex<Inner>,
    configured: Vec<Configured>,
    clients: Arc<Counters>,
    /// Signalled (by dropping) when each sink's task has finished.
    finished: Mutex<Vec<oneshot::Receiver<()>>>,
}

/// A `zt-agent flows` client's queue.
pub struct Subscription {
    pub events: mpsc::Receiver<Event>,
    counters: Arc<Counters>,
    total: Arc<Counters>,
}

impl Subscription {
    pub fn delivered(&self) {
        self.counters.delivered(1);
        self.total.delivered(1);
    }
    /// Events this client lost so far because it read too slowly.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped_so_far()
    }
}

impl Sinks {
    /// Starts every sink (network sinks as tasks on the current tokio runtime, stdout and file
    /// sinks on threads of their own, since their writes block).
    pub fn start(specs: Vec<SinkSpec>) -> Result<Arc<Sinks>> {
        let mut inner = Inner::default();
        let mut configured = Vec::new();
        let mut finished = Vec::new();
        for spec in specs {
            let (tx, rx) = mpsc::channel(spec.queue);
            let counters = Arc::new(Counters::default());
            let (done, done_rx) = oneshot::channel();
            configured.push(Configured { name: spec.name.clone(), kind: spec.kind(), counters: counters.clone(), tx: tx.clone() });
            inner.outputs.push(Output {
                filter: spec.filter.clone(),
                carries: spec.format.carries_fn(),
                tx,
                counters: counters.clone(),
                client_total: None,
            });
            sinks::spawn(spec, rx, counters, done)?;
            finished.push(done_rx);
        }
        Ok(Arc::new(Sinks {
            inner: Mutex::new(inner),
            configured,
            clients: Arc::new(Counters::default()),
            finished: Mutex::new(finished),
        }))
    }

    /// Offers `event` to every consumer; never waits.
    pub fn publish(&self, event: impl Into<Record>) {
        self.publish_all(vec![event.into()]);
    }

    /// Offers `events`, in order, to every consumer; never waits.
    pub fn publish_all(&self, events: Vec<Record>) {
        if events.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().expect("fan-out lock poisoned");
        for event in events {
            let event = Arc::new(event);
            if event.is_flow() {
                if inner.recent.len() == RECENT_FLOWS {
                    inner.recent.pop_front();
                }
                inner.recent.push_back(event.clone());
            }
            inner.outputs.retain(|output| output.offer(&event));
        }
    }

    /// A new `flows` client: the recent flows it wants, and a queue of `capacity` for the ones
    /// to come (taken together, so none is missed or repeated).
    pub fn subscribe(&self, filter: Filter, capacity: usize) -> (Vec<Event>, Subscription) {
        let (tx, events) = mpsc::channel(capacity);
        let counters = Arc::new(Counters::default());
        let mut inner = self.inner.lock().expect("fan-out lock poisoned");
        let recent = inner.recent.iter().filter(|e| filter.accepts(e)).cloned().collect();
        inner.outputs.push(Output {
            filter,
            carries: Record::is_flow,
            tx,
            counters: counters.clone(),
            client_total: Some(self.clients.clone()),
        });
        (recent, Subscription { events, counters, total: self.clients.clone() })
    }

    /// One entry per configured sink, in the order given, then the `flows` clients' total.
    pub fn stats(&self) -> Vec<SinkStats> {
        let mut stats: Vec<SinkStats> = self
            .configured
            .iter()
            .map(|c| c.counters.snapshot(&c.name, &c.kind, (c.tx.max_capacity() - c.tx.capacity()) as u64))
            .collect();
        stats.push(self.clients.snapshot("flows", "flows", 0));
        stats
    }

    /// Stops taking events and gives the sinks up to `grace` to write what they hold.
    pub async fn close(&self, grace: Duration) {
        self.inner.lock().expect("fan-out lock poisoned").outputs.clear();
        let finished = std::mem::take(&mut *self.finished.lock().expect("fan-out lock poisoned"));
        let deadline = tokio::time::Instant::now() + grace;
        for done in finished {
            let _ = tokio::time::timeout_at(deadline, done).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::events::record::FlowVerdict;

    fn flow(verdict: &str, src: &str, dst: &str) -> Record {
        json!({"kind": "flow", "verdict": verdict, "src": {"identity": src}, "dst": {"identity": dst}}).into()
    }

    fn output(filter: Filter, capacity: usize) -> (Output, mpsc::Receiver<Event>, Arc<Counters>) {
        let (tx, rx) = mpsc::channel(capacity);
        let counters = Arc::new(Counters::default());
        let output = Output { filter, carries: |_| true, tx, counters: counters.clone(), client_total: None };
        (output, rx, counters)
    }

    fn sinks_of(outputs: Vec<Output>) -> Sinks {
        Sinks {
            inner: Mutex::new(Inner { outputs, recent: VecDeque::new() }),
            configured: Vec::new(),
            clients: Arc::new(Counters::default()),
            finished: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn filters_select_flows_by_verdict_and_identity_and_pass_agent_events() {
        let filter = Filter { verdicts: vec![FlowVerdict::Deny, FlowVerdict::Audit], identity: Some("db".into()) };
        assert!(filter.accepts(&flow("deny", "web", "db")));
        assert!(filter.accepts(&flow("audit", "db", "web")));
        assert!(!filter.accepts(&flow("allow", "web", "db")), "verdict not asked for");
        assert!(!filter.accepts(&flow("deny", "web", "api")), "neither end is db");
        assert!(filter.accepts(&json!({"kind": "policy", "result": "applied"}).into()));
        assert!(Filter::default().accepts(&flow("allow", "a", "b")));
    }

    #[test]
    fn a_blocked_sink_loses_only_its_own_events_and_counts_them() {
        // Nobody reads `stuck`: its queue of 2 fills and stays full.
        let (stuck, _stuck_rx, stuck_counts) = output(Filter::default(), 2);
        let (healthy, mut healthy_rx, healthy_counts) = output(Filter::default(), 100);
        let sinks = sinks_of(vec![stuck, healthy]);
        for i in 0..10 {
            sinks.publish(json!({"kind": "flow", "verdict": "deny", "n": i}));
        }
        assert_eq!(stuck_counts.dropped_so_far(), 8, "2 queued, the other 8 dropped");
        assert_eq!(healthy_counts.dropped_so_far(), 0);
        let received: Vec<i64> = std::iter::from_fn(|| healthy_rx.try_recv().ok()).map(|e| e["n"].as_i64().unwrap()).collect();
        assert_eq!(received, (0..10).collect::<Vec<_>>(), "the healthy sink got every event, in order");
    }

    #[test]
    fn events_a_filter_or_format_leaves_out_are_neither_queued_nor_dropped() {
        let (mut ocsf_like, mut rx, counts) = output(Filter { verdicts: vec![FlowVerdict::Deny], identity: None }, 1);
        ocsf_like.carries = |event| event["kind"] == "flow";
        let sinks = sinks_of(vec![ocsf_like]);
        sinks.publish(flow("allow", "a", "b"));
        sinks.publish(json!({"kind": "identity", "result": "bound"}));
        sinks.publish(flow("deny", "a", "b"));
        assert_eq!(rx.try_recv().unwrap()["verdict"], "deny");
        assert!(rx.try_recv().is_err());
        assert_eq!(counts.dropped_so_far(), 0);
    }

    #[test]
    fn a_slow_flows_client_drops_and_a_gone_one_is_removed() {
        let sinks = sinks_of(Vec::new());
        sinks.publish(flow("deny", "a", "b"));
        sinks.publish(json!({"kind": "policy"}));
        let (recent, mut slow) = sinks.subscribe(Filter::default(), 1);
        assert_eq!(recent.len(), 1, "recent holds flows only");
        let (_, gone) = sinks.subscribe(Filter::default(), 1);
        drop(gone);
        sinks.publish(flow("deny", "c", "d"));
        sinks.publish(flow("deny", "e", "f"));
        assert_eq!(slow.dropped(), 1);
        assert_eq!(slow.events.try_recv().unwrap()["src"]["identity"], "c");
        slow.delivered();
        assert_eq!(sinks.inner.lock().unwrap().outputs.len(), 1, "the client that hung up is gone");
        let total = sinks.stats().pop().unwrap();
        assert_eq!((total.name.as_str(), total.delivered, total.dropped), ("flows", 1, 1), "{total:?}");
    }

    /// Real sinks: a TCP receiver that accepts but never reads stalls its sink's writes; the file
    /// sink beside it still gets every event, and the stalled one counts what it lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_receiver_does_not_hold_up_the_reader_or_the_file_sink() {
        const EVENTS: u64 = 50_000;
        let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = stalled.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("flows.jsonl");
        let specs = [
            format!("syslog+tcp://127.0.0.1:{port},queue=64,name=stalled"),
            format!("json:file={},queue={EVENTS},name=file", file.display()),
        ];
        let sinks = Sinks::start(specs.iter().map(|s| s.parse().unwrap()).collect()).unwrap();
        let (_connection, _) = stalled.accept().await.unwrap();
        let padding = "x".repeat(1000);
        for n in 0..EVENTS {
            sinks.publish(json!({"kind": "flow", "verdict": "deny", "n": n, "padding": padding}));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let stats = loop {
            let stats = sinks.stats();
            if stats[1].delivered == EVENTS {
                break stats;
            }
            assert!(tokio::time::Instant::now() < deadline, "the file sink never got everything: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let lines = std::fs::read_to_string(&file).unwrap().lines().count() as u64;
        assert_eq!(lines, EVENTS, "the file sink wrote every event");
        assert_eq!(stats[1].dropped, 0);
        let stalled = &stats[0];
        assert!(stalled.dropped > 0, "{stalled:?}");
        assert_eq!(stalled.delivered + stalled.dropped + stalled.queued, EVENTS, "{stalled:?}");
    }

    #[test]
    fn recent_flows_are_bounded() {
        let sinks = sinks_of(Vec::new());
        for i in 0..RECENT_FLOWS + 10 {
            sinks.publish(json!({"kind": "flow", "n": i}));
        }
        let (recent, _) = sinks.subscribe(Filter::default(), 1);
        assert_eq!(recent.len(), RECENT_FLOWS);
        assert_eq!(recent[0]["n"], 10, "the oldest make room");
    }
}
