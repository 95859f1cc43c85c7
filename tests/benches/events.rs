//! `cargo xtask bench`: how fast flow events go from the kernel's ring buffer to a JSON sink,
//! as ratios against the raw ring-buffer drain measured in the same run (absolute rates depend
//! on the machine and its load; the ratios say what decoding, naming and the sink cost).
//!
//! Events are made by the loaded XDP program itself: BPF_PROG_TEST_RUN repeats a denied SYN, and
//! every run writes one flow event. Each stage is timed on its own batches:
//! 1. drain — read the records off the ring buffer;
//! 2. + decode + enrich — into the flow record every sink derives from;
//! 3. + JSON serialization — each record's line, as JSON sinks write it, into one reused buffer;
//! 4. + fan-out + `json:file=/dev/null` — the agent's reader loop (batches handed to the fan-out),
//!    until the sink's thread has written them all.
//!
//! Needs root (loading the programs).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use zt_agent::{
    datapath::{Datapath, Mode},
    events::{self, decode, fanout::Sinks, record::FlowRecord, sinks::SinkSpec, Enricher},
    identity::sources::IdentitySources,
    policy,
    state::Policies,
};
use zt_common::programs;

const POLICY: &str = r#"
apiVersion: zt/v1
kind: Identity
metadata: {name: api}
spec:
  selectors: [{cidr: 10.20.2.0/24}]
---
apiVersion: zt/v1
kind: Identity
metadata: {name: intruder}
spec:
  selectors: [{cidr: 10.20.9.0/24}]
---
apiVersion: zt/v1
kind: Policy
metadata: {name: default-deny}
spec: {subject: [any], ingress: [], egress: []}
"#;

/// Events per batch: well inside the 4 MiB ring buffer (88 bytes a record).
const BATCH: u32 = 20_000;
const ROUNDS: u32 = 10;

fn main() {
    let set = policy::parse_str(POLICY, "bench.yaml").expect("the bench policy parses");
    let compiled = Arc::new(policy::compile::compile(&set).expect("the bench policy compiles"));
    let mut datapath = Datapath::load().expect("loading the datapath needs root (run `cargo xtask bench`)");
    let generation = datapath.install(&compiled).unwrap();
    datapath.set_mode(Mode::Enforce).unwrap();
    let mut ring = datapath.take_events().unwrap();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 20, 9, 2], [10, 20, 2, 2], 64)
        .tcp(40000, 8080, 1, 1024)
        .syn()
        .write(&mut frame, &[])
        .unwrap();

    let policies = Arc::new(Mutex::new(Policies::new(generation, compiled.clone())));
    let sources = Arc::new(Mutex::new(IdentitySources::new(compiled, None, None)));
    let mut enricher = Enricher::new("bench".into(), policies, sources);
    let spec: SinkSpec = format!("json:file=/dev/null,queue={BATCH}").parse().unwrap();
    let sinks = Sinks::start(vec![spec]).unwrap();

    let fill = |datapath: &mut Datapath| {
        let xdp: &mut Xdp = datapath.program(programs::XDP).unwrap();
        xdp.test_run(TestRunOptions { data_in: Some(&frame), repeat: BATCH, ..Default::default() }).unwrap();
    };
    let lost_before = datapath.counters().unwrap().events().lost;
    let mut drain = Duration::ZERO;
    let mut enrich = Duration::ZERO;
    let mut serialize = Duration::ZERO;
    let mut sink = Duration::ZERO;
    for _ in 0..ROUNDS {
        fill(&mut datapath);
        drain += timed(|| assert_eq!(drain_only(&mut ring), BATCH));
        fill(&mut datapath);
        enrich += timed(|| assert_eq!(drain_and_enrich(&mut ring, &mut enricher, |_| ()), BATCH));
        fill(&mut datapath);
        let mut line = Vec::new();
        serialize += timed(|| {
            let serialize = |record: FlowRecord| {
                line.clear();
                record.write_json(&mut line);
                std::hint::black_box(&line);
            };
            assert_eq!(drain_and_enrich(&mut ring, &mut enricher, serialize), BATCH)
        });
        fill(&mut datapath);
        let target = delivered(&sinks) + BATCH as u64;
        sink += timed(|| {
            assert_eq!(events::drain(&mut ring, &mut enricher, &sinks), BATCH as usize);
            // Polled with pauses: a spinning reader would take the core the sink's thread needs.
            while delivered(&sinks) < target {
                std::thread::sleep(Duration::from_micros(100));
            }
        });
    }
    let lost = datapath.counters().unwrap().events().lost - lost_before;
    let dropped: u64 = sinks.stats().iter().map(|s| s.dropped).sum();
    assert_eq!((lost, dropped), (0, 0), "the bench must measure every event: the ring or the queue overflowed");

    let events = (BATCH * ROUNDS) as f64;
    let rate = |d: Duration| events / d.as_secs_f64();
    let baseline = rate(drain);
    println!("events per stage: {} ({ROUNDS} rounds of {BATCH})", BATCH * ROUNDS);
    println!("{:<44} {:>14} {:>8}", "stage", "events/s", "ratio");
    for (stage, d) in [
        ("ring-buffer drain (baseline)", drain),
        ("+ decode + enrich", enrich),
        ("+ JSON serialization", serialize),
        ("+ fan-out + json:file=/dev/null sink", sink),
    ] {
        println!("{stage:<44} {:>14.0} {:>8.3}", rate(d), rate(d) / baseline);
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn drain_only(ring: &mut RingBuf<MapData>) -> u32 {
    let mut n = 0;
    while let Some(record) = ring.next() {
        std::hint::black_box(&*record);
        n += 1;
    }
    n
}

fn drain_and_enrich(ring: &mut RingBuf<MapData>, enricher: &mut Enricher, mut then: impl FnMut(FlowRecord)) -> u32 {
    let mut n = 0;
    while let Some(record) = ring.next() {
        let event = decode(&record).expect("a whole flow event");
        then(std::hint::black_box(enricher.enrich(&event)));
        n += 1;
    }
    n
}

fn delivered(sinks: &Sinks) -> u64 {
    sinks.stats()[0].delivered
}
