//! `cargo xtask bench`, per packet: what the loaded programs cost with BPF_PROG_TEST_RUN, as
//! ratios to two reference programs loaded beside them in the same run (zt-ebpf/src/
//! reference.rs): the floor (an XDP program that does nothing) and the least a filter must do
//! (zt's parser, then one hash lookup of the flow). Absolute times depend on the machine and its
//! load; the ratios say what zt adds.
//!
//! The references are a separate object (`datapath::reference_programs`): nothing of them
//! ships in the datapath's.
//!
//! Each case is a policy of `rules` rules over `identities` identities (one address each),
//! installed in enforce mode, and three flows through it:
//! - established: an allowed SYN run once (conntrack admits it), then repeated;
//! - new allowed: SYNs matching the first rule, each from another source port;
//! - new denied: the same pair to a port no rule names (default deny), likewise.
//!
//! The kernel times a run itself. A repeated run (established) is timed over all repeats; a
//! new flow can only be run once (the next run of the same frame is established), so new flows
//! are timed one run each, over many frames — and the references are timed both ways, each
//! measure divided by the reference timed as it was. Every figure is the median of five
//! rounds, each timing the references and zt in turn. Every run's verdict is checked, so a
//! number never comes from a program that did something else.
//!
//! Writes bench/results/<date>.md and .json (the README's table comes from the .md).
//! Needs root (loading the programs).

use std::{fmt::Write as _, fs, net::IpAddr, path::PathBuf, time::Instant};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use etherparse::PacketBuilder;
use serde_json::{json, Value};
use zt_agent::{
    datapath::{
        capacity::{Capacities, CapacitySetting},
        Datapath, Mode,
    },
    events::limits::EventLimitSettings,
    policy,
};
use zt_common::programs;
use zt_tests::bench_policy::{address, policy_text};

/// Runs of a repeated measure, and frames of a run-once measure.
const REPEAT: u32 = 200_000;
const FRAMES: u16 = 15_000;
/// Every figure is the median of this many rounds, each timing the references and zt in turn
/// (a reference timed once can be off by a third on a shared machine); a round's new flows
/// are `FRAMES / ROUNDS` frames of their own.
const ROUNDS: u16 = 5;
const XDP_PASS: u32 = 2;
const XDP_DROP: u32 = 1;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

/// (rules, identities): the rule sweep at 1k identities, then the identity sweep at 1k rules.
const CASES: [(usize, usize); 6] = [(10, 1_000), (1_000, 1_000), (10_000, 1_000), (100_000, 1_000), (1_000, 10), (1_000, 50_000)];

/// A TCP SYN from w1 to w0.
fn syn(v6: bool, src_port: u16, dst_port: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let builder = match (address(1, v6), address(0, v6)) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => builder.ipv4(src.octets(), dst.octets(), 64),
        (IpAddr::V6(src), IpAddr::V6(dst)) => builder.ipv6(src.octets(), dst.octets(), 64),
        _ => unreachable!("one family"),
    };
    let builder = builder.tcp(src_port, dst_port, 1, 64_240).syn();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).unwrap();
    frame
}

/// A program to time: its name, its object, and how it returns pass and drop.
#[derive(Clone, Copy)]
struct Under {
    name: &'static str,
    tc: bool,
    reference: bool,
}

impl Under {
    fn pass(self) -> u32 {
        if self.tc { TC_ACT_UNSPEC } else { XDP_PASS }
    }

    fn drop(self) -> u32 {
        if self.tc { TC_ACT_SHOT } else { XDP_DROP }
    }
}

const ZT_XDP: Under = Under { name: programs::XDP, tc: false, reference: false };
const ZT_TC: Under = Under { name: programs::TC_EGRESS, tc: true, reference: false };
const FLOOR: Under = Under { name: programs::REFERENCE_FLOOR, tc: false, reference: true };
const LOOKUP: Under = Under { name: programs::REFERENCE_LOOKUP, tc: false, reference: true };
const ADMIT: Under = Under { name: programs::REFERENCE_ADMIT, tc: false, reference: true };
const REPORT: Under = Under { name: programs::REFERENCE_REPORT, tc: false, reference: true };

/// zt's datapath and the reference programs, loaded side by side.
struct Loaded {
    datapath: Datapath,
    references: Ebpf,
}

fn run(loaded: &mut Loaded, under: Under, frame: &[u8], repeat: u32) -> (u32, f64) {
    let options = TestRunOptions { data_in: Some(frame), repeat, ..Default::default() };
    let result = if under.reference {
        let program: &mut Xdp = loaded.references.program_mut(under.name).unwrap().try_into().unwrap();
        program.test_run(options)
    } else if under.tc {
        loaded.datapath.program::<SchedClassifier>(under.name).unwrap().test_run(options)
    } else {
        loaded.datapath.program::<Xdp>(under.name).unwrap().test_run(options)
    }
    .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {}: {e}", under.name));
    (result.return_value, result.duration.as_nanos() as f64)
}

/// Nanoseconds per run of `frame` repeated, the verdict checked.
fn repeated(loaded: &mut Loaded, under: Under, frame: &[u8], expect: u32) -> f64 {
    let (verdict, ns) = run(loaded, under, frame, REPEAT);
    assert_eq!(verdict, expect, "{} returned {verdict}, expected {expect}", under.name);
    ns
}

/// Mean nanoseconds of one run each of `frames`, every verdict checked.
fn once_each(loaded: &mut Loaded, under: Under, frames: &[Vec<u8>], expect: u32) -> f64 {
    let mut total = 0.0;
    for frame in frames {
        let (verdict, ns) = run(loaded, under, frame, 1);
        assert_eq!(verdict, expect, "{} returned {verdict}, expected {expect}", under.name);
        total += ns;
    }
    total / frames.len() as f64
}

struct Row {
    rules: usize,
    identities: usize,
    program: &'static str,
    family: &'static str,
    /// (measure, ns, ns of the floor, ns of the lookup reference), each pair timed alike.
    measures: Vec<(&'static str, f64, f64, f64)>,
    /// The admit and report references, once each on the new flows' frames.
    admit_ns: f64,
    report_ns: f64,
}

/// Empties the report reference's ring buffer, which nothing else reads.
fn drain_reference_events(loaded: &mut Loaded) {
    let map = loaded.references.map_mut("REFERENCE_EVENTS").expect("the reference object has its ring buffer");
    let mut ring = aya::maps::RingBuf::try_from(map).unwrap();
    while ring.next().is_some() {}
}

/// Seconds of each part of installing a case's policy in-process.
struct Apply {
    parse: f64,
    compile: f64,
    install: f64,
}

fn measure_case(rules: usize, identities: usize) -> (Vec<Row>, Apply) {
    // Room for 50k identities' two addresses; the rest at the agent's defaults.
    let settings: Vec<CapacitySetting> = ["hosts=262144"].iter().map(|s| s.parse().unwrap()).collect();
    let mut datapath = Datapath::load_sized(Capacities::new(&settings).unwrap()).expect("loading the datapath needs root");
    // The agent's default event limits (`run --event-window 1s --event-rate 5000/s
    // --event-burst 10000`): a flood of denials is counted, not written out one by one.
    let limits = EventLimitSettings { window: std::time::Duration::from_secs(1), rate: 5_000, burst: 10_000 };
    datapath.set_event_limits(&limits).unwrap();
    let text = policy_text(rules, identities);
    let mut started = Instant::now();
    let mut lap = || std::mem::replace(&mut started, Instant::now()).elapsed().as_secs_f64();
    let set = policy::parse_str(&text, "bench.yaml").expect("the bench policy parses");
    let parse = lap();
    let compiled = policy::compile::compile(&set).expect("the bench policy compiles");
    let compile = lap();
    datapath.install(&compiled).expect("the bench policy fits");
    let applied = Apply { parse, compile, install: lap() };
    datapath.set_mode(Mode::Enforce).unwrap();
    let references = zt_agent::datapath::reference_programs().expect("the reference programs load");
    let mut loaded = Loaded { datapath, references };

    let mut rows = Vec::new();
    let programs = [(ZT_XDP, "IPv4", false), (ZT_XDP, "IPv6", true), (ZT_TC, "IPv4", false), (ZT_TC, "IPv6", true)];
    for (n, (under, family, v6)) in (0u16..).zip(programs) {
        // Source ports of their own: conntrack remembers what an earlier program admitted.
        let base = 1 + n * (FRAMES + 1);
        let established = syn(v6, base - 1, 1024);
        let tc = if under.tc { "tc" } else { "xdp" };
        // The established flow: admitted by its first run.
        let (first, _) = run(&mut loaded, under, &established, 1);
        assert_eq!(first, under.pass(), "{tc} {family}: the first rule allows w1 → w0:1024");
        let per_round = FRAMES / ROUNDS;
        let rounds: Vec<[f64; 9]> = (0..ROUNDS)
            .map(|round| {
                let first_port = base + round * per_round;
                let allowed: Vec<Vec<u8>> = (0..per_round).map(|i| syn(v6, first_port + i, 1024)).collect();
                let denied: Vec<Vec<u8>> = (0..per_round).map(|i| syn(v6, first_port + i, 9)).collect();
                // The references on the same frames, timed the same two ways.
                let figures = [
                    repeated(&mut loaded, FLOOR, &established, XDP_PASS),
                    repeated(&mut loaded, LOOKUP, &established, XDP_DROP),
                    once_each(&mut loaded, FLOOR, &allowed, XDP_PASS),
                    once_each(&mut loaded, LOOKUP, &allowed, XDP_DROP),
                    once_each(&mut loaded, ADMIT, &allowed, XDP_PASS),
                    once_each(&mut loaded, REPORT, &denied, XDP_DROP),
                    repeated(&mut loaded, under, &established, under.pass()),
                    once_each(&mut loaded, under, &allowed, under.pass()),
                    once_each(&mut loaded, under, &denied, under.drop()),
                ];
                drain_reference_events(&mut loaded);
                figures
            })
            .collect();
        let median = |i: usize| {
            let mut values: Vec<f64> = rounds.iter().map(|round| round[i]).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let [floor_repeated, lookup_repeated, floor_once, lookup_once, admit_ns, report_ns, established_ns, allowed_ns, denied_ns] =
            std::array::from_fn(median);
        rows.push(Row {
            rules,
            identities,
            program: tc,
            family,
            measures: vec![
                ("established", established_ns, floor_repeated, lookup_repeated),
                ("new allowed", allowed_ns, floor_once, lookup_once),
                ("new denied", denied_ns, floor_once, lookup_once),
            ],
            admit_ns,
            report_ns,
        });
    }
    (rows, applied)
}

fn main() {
    let date = String::from_utf8(std::process::Command::new("date").arg("+%F").output().unwrap().stdout).unwrap();
    let date = date.trim();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name").map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The whole run on one CPU, the last it may use: BPF_PROG_TEST_RUN runs a program on its
    // caller's CPU, so every program and reference is timed on the same one.
    let this = nix::unistd::Pid::from_raw(0);
    let allowed = nix::sched::sched_getaffinity(this).expect("the bench's CPUs");
    let last = (0..nix::sched::CpuSet::count()).rev().find(|&cpu| allowed.is_set(cpu).unwrap_or(false)).expect("a CPU");
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(last).unwrap();
    nix::sched::sched_setaffinity(this, &cpus).expect("pinning the bench to one CPU");

    let mut rows = Vec::new();
    let mut applies = Vec::new();
    for (rules, identities) in CASES {
        eprintln!("bench: {rules} rules, {identities} identities");
        let (case_rows, applied) = measure_case(rules, identities);
        rows.extend(case_rows);
        applies.push((rules, identities, applied));
    }

    let mut md = String::new();
    writeln!(md, "# Per-packet cost, {date}\n").unwrap();
    writeln!(md, "{cpu}, {cores} cores, Linux {kernel}. `cargo xtask bench` (tests/benches/datapath.rs): BPF_PROG_TEST_RUN on the loaded programs, 64-byte TCP SYNs, enforce mode.").unwrap();
    writeln!(md, "Each figure is a ratio to a reference program timed the same way in the same run: **floor** (an XDP program that does nothing), **lookup** (zt's parser and one hash lookup). ns: the kernel's own timing, for scale only.\n").unwrap();
    writeln!(md, "| rules | identities | hook | family | measure | ns | × floor | × lookup |").unwrap();
    writeln!(md, "|---:|---:|---|---|---|---:|---:|---:|").unwrap();
    let mut json_rows = Vec::new();
    for row in &rows {
        for (measure, ns, floor, lookup) in &row.measures {
            writeln!(
                md,
                "| {} | {} | {} | {} | {measure} | {ns:.0} | {:.1} | {:.2} |",
                row.rules,
                row.identities,
                row.program,
                row.family,
                ns / floor,
                ns / lookup
            )
            .unwrap();
            json_rows.push(json!({
                "rules": row.rules, "identities": row.identities, "hook": row.program, "family": row.family,
                "measure": measure, "ns": ns, "floor_ns": floor, "lookup_ns": lookup,
                "admit_reference_ns": row.admit_ns, "report_reference_ns": row.report_ns,
                "vs_floor": ns / floor, "vs_lookup": ns / lookup,
            }));
        }
    }
    // The spread of each measure over the sweeps, which a flat decision keeps within ±10 %.
    writeln!(md, "\nThe spread of each measure over the sweeps: zt's time as a ratio to the run's lookup reference (the median of every case's).\n").unwrap();
    writeln!(md, "| hook | family | measure | spread over 10–100k rules | spread over 10–50k identities |").unwrap();
    writeln!(md, "|---|---|---|---:|---:|").unwrap();
    // Against the run's lookup reference, the median of every case's: it looks up an empty
    // table whatever the case, so how it moves between cases is the machine's noise.
    let reference = |measure: &str| {
        let mut values: Vec<f64> = rows.iter().flat_map(|r| r.measures.iter().filter(|m| m.0 == measure).map(|m| m.3)).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let spread = |program: &str, family: &str, measure: &str, pick: &dyn Fn(&Row) -> bool| {
        let reference = reference(measure);
        let ratios: Vec<f64> = rows
            .iter()
            .filter(|r| r.program == program && r.family == family && pick(r))
            .flat_map(|r| r.measures.iter().filter(|m| m.0 == measure).map(|m| m.1 / reference))
            .collect();
        let (min, max) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        (max / min - 1.0) * 100.0
    };
    for program in ["xdp", "tc"] {
        for family in ["IPv4", "IPv6"] {
            for measure in ["established", "new allowed", "new denied"] {
                let by_rules = spread(program, family, measure, &|r: &Row| r.identities == 1_000);
                let by_identities = spread(program, family, measure, &|r: &Row| r.rules == 1_000);
                writeln!(md, "| {program} | {family} | {measure} | {by_rules:+.0} % | {by_identities:+.0} % |").unwrap();
            }
        }
    }
    // What a new flow costs besides its decision: the admit and report references less the
    // lookup reference, which all three include.
    writeln!(md, "\nA new flow's cost, in parts, × the lookup reference at 1k rules and 1k identities: **admitting** (the admit reference — parse, the flow's conntrack insert — less the lookup reference), **reporting** (the report reference — parse, an event window insert, a ring buffer record — less the lookup reference), and the **rest** (the decision, the counters, the event limits).\n").unwrap();
    writeln!(md, "| hook | family | new allowed | admitting | reporting | rest | new denied | reporting | rest |").unwrap();
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for row in rows.iter().filter(|r| (r.rules, r.identities) == (1_000, 1_000)) {
        let measure = |name: &str| row.measures.iter().find(|m| m.0 == name).expect("measured");
        let (_, allowed, _, lookup) = *measure("new allowed");
        let (_, denied, _, _) = *measure("new denied");
        let (admitting, reporting) = ((row.admit_ns - lookup) / lookup, (row.report_ns - lookup) / lookup);
        writeln!(
            md,
            "| {} | {} | {:.2} | {admitting:.2} | {reporting:.2} | {:.2} | {:.2} | {reporting:.2} | {:.2} |",
            row.program,
            row.family,
            allowed / lookup,
            allowed / lookup - 1.0 - admitting - reporting,
            denied / lookup,
            denied / lookup - 1.0 - reporting
        )
        .unwrap();
    }
    writeln!(md, "\nPolicy apply in-process (no verifier), seconds: parsing the YAML, compiling, installing (writing the maps and switching):\n").unwrap();
    writeln!(md, "| rules | identities | parse | compile | install | total |\n|---:|---:|---:|---:|---:|---:|").unwrap();
    for (rules, identities, a) in &applies {
        writeln!(md, "| {rules} | {identities} | {:.3} | {:.3} | {:.3} | {:.2} |", a.parse, a.compile, a.install, a.parse + a.compile + a.install).unwrap();
    }
    print!("{md}");

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    fs::create_dir_all(&dir).unwrap();
    let results: Value = json!({
        "date": date, "cpu": cpu, "cores": cores, "kernel": kernel, "rows": json_rows,
        "apply": applies
            .iter()
            .map(|(r, i, a)| json!({"rules": r, "identities": i, "seconds": a.parse + a.compile + a.install, "parse": a.parse, "compile": a.compile, "install": a.install}))
            .collect::<Vec<_>>(),
    });
    fs::write(dir.join(format!("{date}.md")), &md).unwrap();
    fs::write(dir.join(format!("{date}.json")), serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    eprintln!("bench: wrote {}/{date}.md and .json", dir.display());
}
